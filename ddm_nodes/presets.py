"""Size presets of the expert and router networks: registries by name (as DiT's
`DiT_models`), light enough to import anywhere, so the command line offers their names as
choices without loading the networks. `image_size`, `channels` and classes come from the
data; the networks are built in experts.py and router_net.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ddm_nodes.errors import DDMError

DEFAULT_EXPERT_PRESET = "unet-tiny"
DEFAULT_ROUTER_PRESET = "router-tiny"
DEFAULT_EXPERT_LR = 3e-4  # long runs; the demo's short ones pass their own
DEFAULT_ROUTER_LR = 1e-3  # the router and the featnet: small classifiers learn fast


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
        ExpertPreset(name="dit-s", arch="dit", patch_size=2, width=384, depth=12, heads=6),
        ExpertPreset(name="dit-b", arch="dit", patch_size=2, width=768, depth=12, heads=12),
    ]
}  # fmt: skip


def get_preset(name: str) -> ExpertPreset:
    try:
        return EXPERT_PRESETS[name]
    except KeyError:
        raise DDMError(
            f"unknown preset {name!r}; expected one of {sorted(EXPERT_PRESETS)}"
        ) from None


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
    try:
        return ROUTER_PRESETS[name]
    except KeyError:
        raise DDMError(
            f"unknown router preset {name!r}; expected one of {sorted(ROUTER_PRESETS)}"
        ) from None
