"""Sampling stability, the quantities the paper shows do NOT predict quality.

Definitions (ids in results.json):

    stability.amplification   ||x_0(x_T + δ) - x_0(x_T)|| / ||δ||, per trajectory: how much
                              a small random perturbation δ of the starting noise grows by
                              the end, with the same policy and grid (δ ~ N(0, I) scaled to
                              an RMS of `eps` per pixel)
    stability.l_eff           the per-step effective Lipschitz estimate: the geometric mean
                              over steps i of ||Δx_{i+1}|| / ||Δx_i||, Δx_i the difference
                              of the two trajectories at step i
    stability.flipped         whether any routing decision (the set of selected experts of
                              the sample at some step) differs between the two trajectories
    stability.delta_refine    ||x_0^N - x_0^{2N}|| / ||x_0^{2N}||: the same noise integrated
                              with N and 2N steps (numerical convergence)

Each is reported per strategy as mean, median and 90th percentile over trajectories, with
the fraction of flipped trajectories, and the mean over flipped and unflipped ones apart:
sparse routing's mean sensitivity can be dominated by the few trajectories whose top-k
choice flips.
"""

from __future__ import annotations

from typing import Any

import torch

from router_service.sampler import Experts, Models, SampleResult, sample, time_grid


def _norms(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).double().norm(dim=1)


def summary(values: torch.Tensor) -> dict[str, float]:
    """mean, median, p90 of a 1-D tensor (NaNs dropped)."""
    v = values.double()[~values.double().isnan()]
    if len(v) == 0:
        return {"mean": float("nan"), "median": float("nan"), "p90": float("nan")}
    return {
        "mean": float(v.mean()),
        "median": float(torch.quantile(v, 0.5)),  # the midpoint of an even count
        "p90": float(torch.quantile(v, 0.9)),
    }


def run(experts: Experts, models: Models, policy: str, x_T: torch.Tensor, steps: int, **kw):
    """`sample` on an Euler grid of `steps` with the models' router and feature space."""
    return sample(
        experts,
        models.router,
        policy,
        x_T,
        time_grid(steps),
        features=models.features,
        **kw,
    )


def _selections(result: SampleResult) -> list[list[frozenset[int]]]:
    """Per evaluation, per sample: the set of experts selected."""
    out = []
    for step in result.trace:
        ids = step.decision.ids.tolist()
        out.append([frozenset(i for i in row if i >= 0) for row in ids])
    return out


def trajectory_sensitivity(
    experts: Experts,
    models: Models,
    policy: str,
    x_T: torch.Tensor,
    steps: int,
    eps: float,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Per trajectory: amplification, l_eff, flipped (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    delta = torch.randn(x_T.shape, generator=gen)
    dims = x_T[0].numel()
    delta = delta * (eps * dims**0.5 / _norms(delta)).reshape(-1, *[1] * (x_T.ndim - 1)).float()
    base = run(experts, models, policy, x_T, steps, trace=True)
    moved = run(experts, models, policy, x_T + delta, steps, trace=True)
    states = [s.x_t for s in base.trace] + [base.final]
    moved_states = [s.x_t for s in moved.trace] + [moved.final]
    gaps = torch.stack([_norms(a - b) for a, b in zip(moved_states, states, strict=True)])
    ratios = gaps[1:] / gaps[:-1].clamp_min(1e-300)  # (steps, N)
    flipped = torch.zeros(x_T.shape[0], dtype=torch.bool)
    for a, b in zip(_selections(base), _selections(moved), strict=True):
        flipped |= torch.tensor([x != y for x, y in zip(a, b, strict=True)])
    return {
        "amplification": gaps[-1] / _norms(delta),
        "l_eff": ratios.clamp_min(1e-300).log().mean(dim=0).exp(),
        "flipped": flipped,
    }


def delta_refine(
    experts: Experts, models: Models, policy: str, x_T: torch.Tensor, steps: int
) -> torch.Tensor:
    """Per trajectory: ||x_0^N - x_0^{2N}|| / ||x_0^{2N}||."""
    coarse = run(experts, models, policy, x_T, steps).final
    fine = run(experts, models, policy, x_T, 2 * steps).final
    return _norms(coarse - fine) / _norms(fine).clamp_min(1e-12)


def stability_report(sens: dict[str, torch.Tensor], refine: torch.Tensor) -> dict[str, Any]:
    flipped = sens["flipped"]
    amp = sens["amplification"]
    return {
        "amplification": summary(amp),
        "l_eff": summary(sens["l_eff"]),
        "delta_refine": summary(refine),
        "flipped_fraction": float(flipped.double().mean()),
        "amplification_mean_flipped": float(amp[flipped].mean()) if flipped.any() else None,
        "amplification_mean_unflipped": float(amp[~flipped].mean()) if (~flipped).any() else None,
    }
