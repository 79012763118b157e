"""Expert denoisers: Hugging Face diffusers models behind one contract, v = expert(x_t, t, y).

An expert folder is a diffusers `save_pretrained` folder (`config.json` +
`diffusion_pytorch_model.safetensors`) that anyone can `from_pretrained`. The wrapper adds
what diffusers leaves to the caller: our time convention (t in [0, 1], see flow.py), the
null label for classifier-free guidance, and the conversion of the network's prediction
type (v, ε or x_0: `ExpertSpec.prediction`) to the velocity every caller receives. One DDM
may mix architectures (UNet, DiT) and prediction types.

Conditioning: with labels, a label embedding is added to the timestep embedding (UNet:
`num_class_embeds`; DiT: its AdaLN-Zero label embedding). The null label is one extra
embedding row; training drops labels to it (flow-matching jobs do this explicitly, so the
DiT's own built-in dropout is switched off to keep one dropout, not two).
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding
from pydantic import BaseModel, ConfigDict, Field

from ddm_nodes import flow
from ddm_nodes.dataset_manifest import NULL_LABEL
from ddm_nodes.errors import DDMError
from ddm_nodes.presets import get_preset

TIME_SCALE = 1000.0  # diffusers' timestep embeddings are tuned for t in [0, 1000)
DENOISER_CLASSES = {cls.__name__: cls for cls in (UNet2DModel, DiTTransformer2DModel)}


class ExpertSpec(BaseModel):
    """Everything needed to rebuild an expert's network; saved in training.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str
    image_size: int = Field(ge=4)
    channels: int = Field(ge=1)
    num_classes: int = Field(0, ge=0, description="0: unconditional")
    prediction: flow.Prediction = Field(
        "v", description="what the network predicts: v (velocity), eps (noise) or x0 (data)"
    )

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def arch(self) -> str:
        """The architecture family of its preset: unet or dit."""
        return get_preset(self.preset).arch


def build_denoiser(spec: ExpertSpec) -> UNet2DModel | DiTTransformer2DModel:
    """A freshly initialised diffusers model for `spec`."""
    p = get_preset(spec.preset)
    if spec.image_size % p.downsample:
        what = "patch size" if p.arch == "dit" else "downsampling factor"
        raise DDMError(
            f"image size {spec.image_size} is not divisible by the {what} {p.downsample} of "
            f"preset {p.name}; pick another --preset or prepare with --image-size"
        )
    if p.arch == "unet":
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in p.attention)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(p.attention))
        return UNet2DModel(
            sample_size=spec.image_size,
            in_channels=spec.channels,
            out_channels=spec.channels,
            block_out_channels=p.block_channels,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=p.layers_per_block,
            norm_num_groups=p.norm_groups,
            attention_head_dim=8,
            num_class_embeds=spec.num_classes + 1 if spec.conditional else None,
        )
    return DiTTransformer2DModel(
        num_attention_heads=p.heads,
        attention_head_dim=p.width // p.heads,
        in_channels=spec.channels,
        out_channels=spec.channels,
        num_layers=p.depth,
        sample_size=spec.image_size,
        patch_size=p.patch_size,
        # unconditional DiTs still need a label table: one class, always the null row
        num_embeds_ada_norm=max(spec.num_classes, 1),
    )


class Expert(torch.nn.Module):
    """v = expert(x_t, t, y): velocity under flow.py's convention, any diffusers denoiser
    of any prediction type."""

    def __init__(self, denoiser: UNet2DModel | DiTTransformer2DModel, spec: ExpertSpec):
        super().__init__()
        self.denoiser = denoiser
        self.spec = spec
        self.is_dit = isinstance(denoiser, DiTTransformer2DModel)
        for m in denoiser.modules():  # one label dropout (the job's), not two
            if isinstance(m, LabelEmbedding):
                m.dropout_prob = 0.0

    @classmethod
    def create(cls, spec: ExpertSpec) -> Expert:
        return cls(build_denoiser(spec), spec)

    @property
    def null_index(self) -> int:
        """The embedding row of the null label (one past the real classes)."""
        return max(self.spec.num_classes, 1) if self.is_dit else self.spec.num_classes

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        native: bool = False,
    ) -> torch.Tensor:
        """x_t (N, C, H, W), t (N,) in [0, 1], y (N,) class ids or NULL_LABEL -> v (N, C, H, W);
        `native`: the network's own prediction (ε or x_0 for those types), for training."""
        out = self._network(x_t, t, y)
        if native:
            return out
        return flow.to_velocity(out, x_t, t.reshape(-1).expand(x_t.shape[0]), self.spec.prediction)

    def _network(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        n = x_t.shape[0]
        timestep = (t.reshape(-1).expand(n) * TIME_SCALE).to(x_t.device, torch.float32)
        labels = None
        if self.spec.conditional or self.is_dit:
            if y is None or not self.spec.conditional:
                y = torch.full((n,), NULL_LABEL, dtype=torch.long, device=x_t.device)
            labels = torch.where(y < 0, self.null_index, y).to(x_t.device, torch.long)
        if self.is_dit:
            return self.denoiser(x_t, timestep=timestep, class_labels=labels).sample
        return self.denoiser(x_t, timestep, class_labels=labels).sample
