"""Learned feature extractors for clustering: DINOv2 and CLIP vision towers through Hugging
Face `transformers`, as the Paris and McAllister et al. pipelines cluster DINOv2 features.

`--features dinov2:REF` / `--features clip:REF`: REF is a folder written by `save_pretrained`
(model and image processor) or a hub id. The feature is the model's pooled output (DINOv2:
the layer-normed CLS token; CLIP: the post-layernorm CLS token), one vector per image.

Preprocessing follows the image processor's statistics but runs in torch on the batch: the
[-1, 1] images are mapped to [0, 1], grey ones repeated to RGB, resized (bicubic,
antialiased) straight to the processor's crop size, normalised by its mean and std. Square
images are resized whole rather than resized-then-centre-cropped: at 32-256 px the border
is part of the picture.

After `ddm prepare` the weights live in the store (pretrained.py), and `restore` loads that
copy, refusing it unless its hash is the one the clustering was computed with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch

from ddm_nodes.errors import ManifestError
from ddm_nodes.features import FeatureExtractor, register_extractor
from ddm_nodes.names import PRETRAINED_FOLDER
from ddm_nodes.pretrained import (
    PinnedModel,
    describe,
    load_pretrained,
    materialized,
    pin,
    resolved,
)
from ddm_nodes.store import Store

FEATURES_PREFIX = f"{PRETRAINED_FOLDER}/features"
EMBED_BATCH = 64


class LearnedFeatures(FeatureExtractor):
    """A pretrained vision model's pooled features; nothing is fitted."""

    transformers_class: ClassVar[str]  # the transformers model class REF is loaded as

    def __init__(
        self,
        model: torch.nn.Module,
        processor: dict[str, Any],
        ref: str,
        weights_sha256: str,
        device: str | torch.device = "cpu",
        batch_size: int = EMBED_BATCH,
        folder: Path | None = None,
    ):
        self.model = model.to(device).eval().requires_grad_(False)
        self.folder = folder  # the source folder, until `pin` copies it into the store
        self.ref = ref
        self.weights_sha256 = weights_sha256
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.size = int(processor.get("size", model.config.image_size))
        self.mean = torch.tensor(processor.get("mean", [0.5, 0.5, 0.5])).reshape(1, 3, 1, 1)
        self.std = torch.tensor(processor.get("std", [0.5, 0.5, 0.5])).reshape(1, 3, 1, 1)

    @classmethod
    def model_class(cls) -> type:
        import transformers

        return getattr(transformers, cls.transformers_class)

    @classmethod
    def load_ref(
        cls, ref: str, device: str | torch.device = "cpu", batch_size: int = EMBED_BATCH
    ) -> LearnedFeatures:
        """The extractor REF names (a folder or hub id); DDMError naming REF when it cannot."""
        what = f"{cls.method} feature extractor"
        with resolved(ref, what) as folder:
            model = load_pretrained(cls.model_class().from_pretrained, folder, ref, what)
            sha = describe(folder, ref).weights_sha256
            return cls(model, _processor_stats(folder), ref, sha, device, batch_size, folder)

    @classmethod
    def fit(cls, images: torch.Tensor, dims: int, seed: int) -> LearnedFeatures:
        raise TypeError(f"{cls.method} features load from a REF: use load_ref")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = torch.nn.functional.interpolate(
                x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False
            )
        return (x - self.mean) / self.std

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = self.preprocess(images[i : i + self.batch_size]).to(self.device)
            out.append(self.model(pixel_values=x).pooler_output.float().cpu())
        return torch.cat(out)  # (N, D)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def params(self) -> dict[str, Any]:
        return {"ref": self.ref, "weights_sha256": self.weights_sha256, "image_size": self.size}

    @classmethod
    def from_tensors(cls, tensors, params) -> LearnedFeatures:
        raise TypeError(f"{cls.method} features load their weights from a store: use restore")

    @classmethod
    def restore(cls, tensors, params, store, pinned, device="cpu") -> LearnedFeatures:
        what = f"{cls.method} feature extractor {params.get('ref')!r}"
        if store is None or pinned is None:
            raise ManifestError(
                f"the {what} is not pinned in this store; re-run `ddm prepare --overwrite`"
            )
        if pinned.weights_sha256 != params.get("weights_sha256"):
            raise ManifestError(
                f"the store's copy of the {what} has weights {pinned.weights_sha256[:12]}..., "
                f"but the clusters were computed with {str(params.get('weights_sha256'))[:12]}"
                "...; re-run `ddm prepare --overwrite`"
            )
        with materialized(store, pinned, what) as folder:
            model = load_pretrained(cls.model_class().from_pretrained, folder, pinned.ref, what)
            return cls(model, _processor_stats(folder), pinned.ref, pinned.weights_sha256, device)

    def pin(self, store: Store) -> PinnedModel:
        if self.folder is None:
            raise ValueError("this extractor was restored from a store; it is pinned already")
        return pin(store, FEATURES_PREFIX, self.folder, self.ref)

    @property
    def dims(self) -> int:
        return int(self.model.config.hidden_size)


def _processor_stats(folder: Path) -> dict[str, Any]:
    """Crop size, mean and std from the image processor's config (preprocessor_config.json),
    read as JSON: the statistics are all `embed` needs, and transformers' fast processors
    would import torchvision, which cannot be installed beside this CPU torch."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    size = cfg.get("crop_size") or cfg.get("size") or {}
    side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
    out: dict[str, Any] = {}
    if side:
        out["size"] = int(side)
    if cfg.get("image_mean") and cfg.get("image_std"):
        out["mean"], out["std"] = cfg["image_mean"], cfg["image_std"]
    return out


@register_extractor
class DINOv2Features(LearnedFeatures):
    method = "dinov2"
    transformers_class = "Dinov2Model"


@register_extractor
class CLIPFeatures(LearnedFeatures):
    method = "clip"
    transformers_class = "CLIPVisionModel"
