"""Flow matching (rectified flow), stated once and used everywhere.

Convention: x_t = (1 - t) x_0 + t ε, with x_0 data, ε ~ N(0, I), t in [0, 1]; t = 0 is
data and t = 1 is noise. The velocity is v = dx_t/dt = ε - x_0, so sampling integrates
dx/dt = v from t = 1 down to t = 0, and the denoised estimate is x̂_0 = x_t - t v.

Prediction types. An expert's network may predict the velocity v (flow matching), the
noise ε (DDPM-style) or the data x_0; the sampler, Serve and the analysis only ever see
velocities, converted here and nowhere else. From x_t = (1 - t) x_0 + t ε and v = ε - x_0:

    from ε̂:    x̂_0 = (x_t - t ε̂) / (1 - t),  so  v = ε̂ - x̂_0 = (ε̂ - x_t) / (1 - t)
    from x̂_0:  ε̂ = (x_t - (1 - t) x̂_0) / t,  so  v = ε̂ - x̂_0 = (x_t - x̂_0) / t

Each is singular at one end: ε at t = 1 (pure noise says nothing of x_0: Lin et al. 2024's
zero-terminal-SNR argument) and x_0 at t = 0. The denominators are clamped to at least
MIN_DENOMINATOR. Near t = 1 an ε-expert's velocity is then (ε̂ - x_t) / 0.05, which is
small where ε̂ ≈ x_t = ε, and the sampler's last step never evaluates t = 0 (Euler and
Heun's final Euler step evaluate at t >= 1 / steps), so a denominator is clamped only
within 0.05 of an end. Training regresses each type's own target (ε, x_0 or v).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Prediction = Literal["v", "eps", "x0"]
PREDICTIONS: tuple[str, ...] = ("v", "eps", "x0")
MIN_DENOMINATOR = 0.05  # 1 - t for ε, t for x_0: the clamp of `to_velocity`


@dataclass(frozen=True)
class PathSample:
    """One draw along the straight path from data to noise."""

    t: torch.Tensor  # (N,)
    x_t: torch.Tensor  # (N, C, H, W)
    velocity: torch.Tensor  # (N, C, H, W), the regression target ε - x_0
    x0: torch.Tensor  # (N, C, H, W) the data end
    noise: torch.Tensor  # (N, C, H, W) ε, the noise end

    def to(self, device: torch.device | str) -> PathSample:
        return PathSample(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> PathSample:
    tb = _bcast(t, x0)
    return PathSample(t=t, x_t=(1 - tb) * x0 + tb * noise, velocity=noise - x0, x0=x0, noise=noise)


def target(path: PathSample, prediction: Prediction = "v") -> torch.Tensor:
    """What a network of `prediction` type regresses on `path`: v, ε or x_0."""
    return {"v": path.velocity, "eps": path.noise, "x0": path.x0}[_checked(prediction)]


def to_velocity(
    output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: Prediction
) -> torch.Tensor:
    """A network's `prediction`-type output at (x_t, t) as a velocity (module docstring)."""
    if _checked(prediction) == "v":
        return output
    tb = _bcast(t, x_t)
    if prediction == "eps":
        return (output - x_t) / (1 - tb).clamp(min=MIN_DENOMINATOR)
    return (x_t - output) / tb.clamp(min=MIN_DENOMINATOR)


def _checked(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")
    return prediction


def denoised(x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """x̂_0 = x_t - t v: where the straight path through x_t with velocity v meets t = 0."""
    return x_t - _bcast(t, x_t) * velocity


def loss(predicted: torch.Tensor, path: PathSample, prediction: Prediction = "v") -> torch.Tensor:
    """Mean squared error of a network's output against its type's target (v: velocity)."""
    return (predicted.float() - target(path, prediction).float()).pow(2).mean()


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
