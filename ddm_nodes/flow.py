"""Flow matching (rectified flow), stated once and used everywhere.

Convention: x_t = (1 - t) x_0 + t ε, with x_0 data, ε ~ N(0, I), t in [0, 1]; t = 0 is
data and t = 1 is noise. The velocity is v = dx_t/dt = ε - x_0, so sampling integrates
dx/dt = v from t = 1 down to t = 0, and the denoised estimate is x̂_0 = x_t - t v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PathSample:
    """One draw along the straight path from data to noise."""

    t: torch.Tensor  # (N,)
    x_t: torch.Tensor  # (N, C, H, W)
    velocity: torch.Tensor  # (N, C, H, W), the regression target ε - x_0


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> PathSample:
    tb = _bcast(t, x0)
    return PathSample(t=t, x_t=(1 - tb) * x0 + tb * noise, velocity=noise - x0)


def denoised(x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """x̂_0 = x_t - t v: where the straight path through x_t with velocity v meets t = 0."""
    return x_t - _bcast(t, x_t) * velocity


def loss(predicted: torch.Tensor, path: PathSample) -> torch.Tensor:
    """Mean squared velocity error."""
    return (predicted.float() - path.velocity.float()).pow(2).mean()


def logit_normal_t(
    n: int,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """t = sigmoid(m + s z), z ~ N(0, 1): concentrates training on mid-path times, where
    the velocity is hardest to predict (Esser et al. 2024, SD3)."""
    z = torch.randn(n, generator=generator, device=device)
    return torch.sigmoid(mean + std * z)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers copied)."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach().to(e.dtype), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)
