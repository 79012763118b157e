"""The feature space the data was clustered in, and the cluster centroids inside it.

`features.safetensors` holds a fitted extractor's tensors and the K centroids, so any
image (a real one, or a denoised estimate x̂_0 mid-sampling) can be embedded into the same
space as the training data and its distance to every cluster measured. Extractors are
pluggable: subclass `FeatureExtractor`, give it a `method` name and register it with
`@register_extractor`. Learned extractors (DINOv2, CLIP: learned_features.py) keep their
weights out of this file: the store holds a pinned copy (pretrained.py) and this file
records the hash of the weights it was made with.

A space's metric is "euclidean" or "cosine": cosine spaces L2-normalise every feature
vector (and their centroids come from spherical k-means), so the Euclidean distance between
unit vectors that `distances` returns orders clusters exactly as cosine similarity does.

Images enter as float tensors (N, C, H, W) in [-1, 1], the same range the models see.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ddm_nodes.dataset_manifest import FEATURES_KEY, DatasetManifest
from ddm_nodes.errors import ManifestError
from ddm_nodes.pretrained import PinnedModel
from ddm_nodes.store import Store, sha256_bytes

Metric = str  # "euclidean" | "cosine"

FEATURE_EXTRACTORS: dict[str, type[FeatureExtractor]] = {}


def register_extractor(cls: type[FeatureExtractor]) -> type[FeatureExtractor]:
    FEATURE_EXTRACTORS[cls.method] = cls
    return cls


class FeatureExtractor(ABC):
    """Maps images to feature vectors; fitted once on the data set, then frozen."""

    method: ClassVar[str]

    @classmethod
    @abstractmethod
    def fit(cls, images: torch.Tensor, dims: int, seed: int) -> FeatureExtractor: ...

    @abstractmethod
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, D) float32."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def params(self) -> dict[str, Any]: ...

    @classmethod
    @abstractmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any]): ...

    @classmethod
    def restore(
        cls,
        tensors: dict[str, torch.Tensor],
        params: dict[str, Any],
        store: Store | None,
        pinned: PinnedModel | None,
        device: str | torch.device = "cpu",
    ) -> FeatureExtractor:
        """The saved extractor; learned ones load their pinned weights from the store."""
        return cls.from_tensors(tensors, params)

    def pin(self, store: Store) -> PinnedModel | None:
        """Copy what the extractor needs beyond `tensors` into the store (learned weights)."""
        return None

    @property
    @abstractmethod
    def dims(self) -> int: ...


def _gram_pca(x: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact PCA of N < P rows through the N x N Gram matrix: O(N^2 P), where the covariance
    costs O(P^3) (a 2,048-image sample of 64x64 RGB: 4 s instead of 10 minutes). Signs as
    scikit-learn's svd_flip: each component's largest-magnitude entry is positive."""
    mean = x.mean(axis=0, dtype=np.float64)
    xc = x.astype(np.float64) - mean
    values, vectors = np.linalg.eigh(xc @ xc.T)  # ascending
    top = np.argsort(values)[::-1][:dims]
    values, vectors = np.clip(values[top], 1e-12, None), vectors[:, top]
    components = (xc.T @ vectors / np.sqrt(values)).T  # (dims, P), unit rows
    peak = np.abs(components).argmax(axis=1)
    components *= np.sign(components[np.arange(len(components)), peak])[:, None]
    return mean, components, float(values.sum() / max((xc * xc).sum(), 1e-12))


@register_extractor
class PCAFeatures(FeatureExtractor):
    """PCA of the flattened pixels (scikit-learn's exact solvers: deterministic)."""

    method = "pca"

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, explained: float):
        self.mean = mean.float()  # (P,)
        self.components = components.float()  # (D, P)
        self.explained = explained

    @classmethod
    def fit(cls, images: torch.Tensor, dims: int, seed: int) -> PCAFeatures:
        from sklearn.decomposition import PCA

        x = images.reshape(len(images), -1).float().numpy()
        dims = min(dims, x.shape[0], x.shape[1])
        if x.shape[0] < x.shape[1]:
            mean, components, explained = _gram_pca(x, dims)
        else:
            # covariance_eigh costs O(P^3) once, independent of N: exact, and free of
            # randomised-solver noise
            pca = PCA(n_components=dims, svd_solver="covariance_eigh", random_state=seed).fit(x)
            mean, components = pca.mean_, pca.components_
            explained = float(pca.explained_variance_ratio_.sum())
        return cls(
            torch.from_numpy(mean.astype(np.float32)),
            torch.from_numpy(components.astype(np.float32)),
            explained,
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = images.reshape(len(images), -1).to(self.mean)  # (N, P)
        return (x - self.mean) @ self.components.T  # (N, D)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "components": self.components}

    def params(self) -> dict[str, Any]:
        return {"explained_variance_ratio": round(self.explained, 6)}

    @classmethod
    def from_tensors(cls, tensors, params) -> PCAFeatures:
        return cls(
            tensors["mean"], tensors["components"], params.get("explained_variance_ratio", 0)
        )

    @property
    def dims(self) -> int:
        return self.components.shape[0]


@register_extractor
class PixelFeatures(FeatureExtractor):
    """The flattened pixels themselves (no fitting)."""

    method = "pixels"

    def __init__(self, num_pixels: int):
        self.num_pixels = num_pixels

    @classmethod
    def fit(cls, images: torch.Tensor, dims: int, seed: int) -> PixelFeatures:
        return cls(images[0].numel())

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return images.reshape(len(images), -1).float()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def params(self) -> dict[str, Any]:
        return {"num_pixels": self.num_pixels}

    @classmethod
    def from_tensors(cls, tensors, params) -> PixelFeatures:
        return cls(int(params["num_pixels"]))

    @property
    def dims(self) -> int:
        return self.num_pixels


def get_extractor(method: str) -> type[FeatureExtractor]:
    if method not in FEATURE_EXTRACTORS:
        import ddm_nodes.learned_features  # noqa: F401  (registers dinov2 and clip)
    try:
        return FEATURE_EXTRACTORS[method]
    except KeyError:
        raise ValueError(
            f"unknown feature method {method!r}; expected one of {sorted(FEATURE_EXTRACTORS)}"
        ) from None


class FeatureSpace:
    """A fitted extractor plus the K cluster centroids in its space."""

    def __init__(
        self, extractor: FeatureExtractor, centroids: torch.Tensor, metric: Metric = "euclidean"
    ):
        if metric not in ("euclidean", "cosine"):
            raise ValueError(f"unknown metric {metric!r}; expected euclidean or cosine")
        self.extractor = extractor
        self.metric = metric
        self.centroids = centroids.float()  # (K, D)
        if metric == "cosine":
            self.centroids = torch.nn.functional.normalize(self.centroids, dim=-1)

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        z = self.extractor.embed(images)
        return torch.nn.functional.normalize(z, dim=-1) if self.metric == "cosine" else z

    def distances(self, images: torch.Tensor) -> torch.Tensor:
        """Distance from each image's features to each centroid: (N, K) (Euclidean; between
        unit vectors in a cosine space)."""
        z = self.embed(images)
        return torch.cdist(z, self.centroids.to(z))

    def to_bytes(self) -> bytes:
        tensors = {f"extractor.{k}": v.contiguous() for k, v in self.extractor.tensors().items()}
        tensors["centroids"] = self.centroids.contiguous()
        # ONE metadata entry: safetensors writes its metadata map in hash order, so two entries
        # made the bytes (and the manifest's sha256) differ between runs with the same seed.
        meta = {
            "feature_space": json.dumps(
                {
                    "method": self.extractor.method,
                    "params": self.extractor.params(),
                    "metric": self.metric,
                }
            )
        }
        return save_safetensors(tensors, metadata=meta)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        store: Store | None = None,
        pinned: PinnedModel | None = None,
        device: str | torch.device = "cpu",
    ) -> FeatureSpace:
        tensors = load_safetensors(data)
        meta = json.loads(safetensors_metadata(data).get("feature_space", "{}"))
        extractor_cls = get_extractor(meta.get("method", "?"))
        inner = {k.removeprefix("extractor."): v for k, v in tensors.items() if k != "centroids"}
        extractor = extractor_cls.restore(inner, meta.get("params", {}), store, pinned, device)
        return cls(extractor, tensors["centroids"], meta.get("metric", "euclidean"))

    def save(self, store: Store, key: str = FEATURES_KEY) -> tuple[str, PinnedModel | None]:
        """Pin a learned extractor's weights, then write `key` (`features.safetensors`);
        returns the file's sha256 and the pinned weights, for the manifest."""
        pinned = self.extractor.pin(store)
        data = self.to_bytes()
        store.put_bytes(key, data)
        return sha256_bytes(data), pinned

    @classmethod
    def load(
        cls, store: Store, manifest: DatasetManifest, device: str | torch.device = "cpu"
    ) -> FeatureSpace:
        data = store.get_verified(manifest.features.key, manifest.features.sha256)
        space = cls.from_bytes(data, store, manifest.features.model, device)
        if space.num_clusters != manifest.num_clusters:
            raise ManifestError(
                f"{store.url(manifest.features.key)} has {space.num_clusters} centroids but the "
                f"manifest says K={manifest.num_clusters}; re-run `ddm prepare --overwrite`"
            )
        return space


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The header's `__metadata__` (safetensors: u64 little-endian length, then JSON)."""
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
