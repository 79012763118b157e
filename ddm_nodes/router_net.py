"""The router: p(cluster | x_t, t), a small time-conditioned CNN with a K-way head.

Trained with cross-entropy on the cluster label of x_0 over every cluster's data (as in
Paris and McAllister et al.). It is a diffusers `ModelMixin` so it saves and loads exactly
like an expert: `config.json` + `diffusion_pytorch_model.safetensors`.

The same network trained at t = 0 on the data set's class labels is the feature network
of the analysis (`featnet`): FID, KID and precision/recall are computed in its pooled
features (`features`), as is usual for small data sets where Inception does not apply.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ddm_nodes.experts import TIME_SCALE
from ddm_nodes.presets import get_router_preset


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t * TIME_SCALE: (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
    args = (t.float() * TIME_SCALE)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))  # odd dim: one zero column


class _Block(nn.Module):
    """GroupNorm -> SiLU -> conv, time scale/shift, then stride-2 downsampling."""

    def __init__(self, c_in: int, c_out: int, time_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(min(8, c_in), c_in)
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, 2 * c_out)
        self.down = nn.Conv2d(c_out, c_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv(nn.functional.silu(self.norm(x)))  # (N, C_out, H, W)
        scale, shift = self.time(temb)[:, :, None, None].chunk(2, dim=1)
        h = nn.functional.silu(h * (1 + scale) + shift)
        return self.down(h)  # (N, C_out, ceil(H/2), ceil(W/2))


class RouterNet(ModelMixin, ConfigMixin):
    """logits = router(x_t, t): (N, C, H, W), (N,) -> (N, K)."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        num_clusters: int = 8,
        widths: tuple[int, ...] = (32, 64, 128),
        time_dim: int = 128,
    ):
        super().__init__()
        self.time_mlp = nn.Sequential(
            nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        chans = (widths[0], *widths)
        self.blocks = nn.ModuleList(
            _Block(a, b, time_dim) for a, b in zip(chans[:-1], chans[1:], strict=True)
        )
        self.head = nn.Sequential(nn.GroupNorm(min(8, widths[-1]), widths[-1]), nn.SiLU())
        self.out = nn.Linear(widths[-1], num_clusters)

    @classmethod
    def from_preset(cls, name: str, in_channels: int, num_clusters: int) -> RouterNet:
        p = get_router_preset(name)
        return cls(in_channels, num_clusters, p.widths, p.time_dim)

    def features(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The pooled last-block activations the head classifies: (N, widths[-1])."""
        temb = self.time_mlp(
            timestep_embedding(t.reshape(-1).expand(x_t.shape[0]), self.config.time_dim)
        )  # (N, T)
        h = self.stem(x_t)
        for block in self.blocks:
            h = block(h, temb)
        return self.head(h).mean(dim=(2, 3))  # (N, C)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x_t, t))  # (N, K)
