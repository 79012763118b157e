"""Size presets of the expert and router networks: registries by name (as DiT's
`DiT_models`), light enough to import anywhere, so the command line offers their names as
choices without loading the networks. `image_size`, `channels` and classes come from the
data; the networks are built in experts.py and router_net.py."""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ddm_nodes.errors import DDMError

DEFAULT_EXPERT_PRESET = "unet-tiny"
DEFAULT_ROUTER_PRESET = "router-tiny"
DEFAULT_VAE_PRESET = "vae-tiny"
DEFAULT_EXPERT_LR = 3e-4  # long runs; the demo's short ones pass their own
DEFAULT_ROUTER_LR = 1e-3  # the router and the featnet: small classifiers learn fast
DEFAULT_VAE_LR = 5e-4


class ExpertPreset(BaseModel):
    """An architecture size; `image_size`, `channels` and classes come from the data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    arch: Literal["unet", "dit"]
    # unet
    block_channels: tuple[int, ...] = ()
    attention: tuple[bool, ...] = Field((), description="per level: self-attention or not")
    layers_per_block: int = 1
    norm_groups: int = 8
    # dit
    patch_size: int = 2
    width: int = 128
    depth: int = 4
    heads: int = 4

    @property
    def downsample(self) -> int:
        """The factor the image side must be divisible by."""
        return 2 ** (len(self.block_channels) - 1) if self.arch == "unet" else self.patch_size


EXPERT_PRESETS: dict[str, ExpertPreset] = {
    p.name: p
    for p in [
        ExpertPreset(name="unet-tiny", arch="unet", block_channels=(32, 64, 64),
                     attention=(False, False, True)),
        ExpertPreset(name="unet-s", arch="unet", block_channels=(64, 128, 256),
                     attention=(False, True, True), layers_per_block=2, norm_groups=32),
        ExpertPreset(name="dit-tiny", arch="dit", patch_size=4, width=128, depth=4, heads=4),
        # DiT-S/B/L/XL (Peebles & Xie) at patch 2 suit 16-32 px latents (the paper's DiT-B/2
        # on 32x32x4 SD-VAE latents); patch 4 and 8 keep 64-256 px pixels at 256-1024 tokens
        ExpertPreset(name="dit-s", arch="dit", patch_size=2, width=384, depth=12, heads=6),
        ExpertPreset(name="dit-s-4", arch="dit", patch_size=4, width=384, depth=12, heads=6),
        ExpertPreset(name="dit-b", arch="dit", patch_size=2, width=768, depth=12, heads=12),
        ExpertPreset(name="dit-b-4", arch="dit", patch_size=4, width=768, depth=12, heads=12),
        ExpertPreset(name="dit-b-8", arch="dit", patch_size=8, width=768, depth=12, heads=12),
        ExpertPreset(name="dit-l", arch="dit", patch_size=2, width=1024, depth=24, heads=16),
        ExpertPreset(name="dit-xl", arch="dit", patch_size=2, width=1152, depth=28, heads=16),
    ]
}  # fmt: skip


P = TypeVar("P")


def _lookup(registry: dict[str, P], name: str, what: str) -> P:
    try:
        return registry[name]
    except KeyError:
        raise DDMError(f"unknown {what} {name!r}; expected one of {sorted(registry)}") from None


def get_preset(name: str) -> ExpertPreset:
    return _lookup(EXPERT_PRESETS, name, "preset")


class RouterPreset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    widths: tuple[int, ...]
    time_dim: int = 128


ROUTER_PRESETS: dict[str, RouterPreset] = {
    p.name: p
    for p in [
        RouterPreset(name="router-tiny", widths=(32, 64, 128)),
        RouterPreset(name="router-s", widths=(64, 128, 256, 256), time_dim=256),
    ]
}


def get_router_preset(name: str) -> RouterPreset:
    return _lookup(ROUTER_PRESETS, name, "router preset")


class VaePreset(BaseModel):
    """A diffusers AutoencoderKL size for `ddm train vae`; each level after the first
    halves the side (vae-tiny: 32x32x3 -> 16x16x4)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    block_channels: tuple[int, ...]
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_groups: int = 8
    mid_attention: bool = False
    kl_weight: float = Field(1e-3, description="of the KL term per latent element")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_channels) - 1)


VAE_PRESETS: dict[str, VaePreset] = {
    p.name: p
    for p in [
        VaePreset(name="vae-tiny", block_channels=(32, 64)),
        VaePreset(name="vae-s", block_channels=(64, 128, 128), layers_per_block=2,
                  norm_groups=32, mid_attention=True),
    ]
}  # fmt: skip


def get_vae_preset(name: str) -> VaePreset:
    return _lookup(VAE_PRESETS, name, "VAE preset")
