"""Sampling stability, the quantities the paper shows do NOT predict quality.

Definitions (ids in results.json):

    stability.amplification   the finite-difference Jacobian-vector growth of the sampling
                              map x_T -> x_0: ||x_0(x_T + δ_j) - x_0(x_T)|| / ||δ_j|| for
                              `directions` random directions δ_j (N(0, I) scaled to an RMS of
                              `eps` per value), per trajectory its mean over directions
    stability.amplification_worst   the same, its largest direction
    stability.flipped         whether any routing decision (the set of selected experts of
                              the sample at some step) differs under some δ_j
    stability.delta_refine    ||x_0^N - x_0^{2N}|| / ||x_0^{2N}||: the same noise integrated
                              with N and 2N Euler steps (numerical convergence), for every N
                              of `refine_steps`

Every figure is reported per strategy as mean, median and 90th percentile over
trajectories. The per-trajectory values are kept (`per_trajectory`) because trajectories of
every strategy start from the same x_T: strategies are compared on them paired
(intervals.py). A per-step Lipschitz ratio is not reported: the geometric mean of the
telescoping gap ratios is amplification^(1/steps), the same figure again.
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


def directions(shape: tuple[int, ...], count: int, eps: float, seed: int) -> list[torch.Tensor]:
    """`count` seeded random perturbations of x_T, each of RMS `eps` per value."""
    gen = torch.Generator().manual_seed(seed + 7919)
    dims = torch.Size(shape[1:]).numel()
    out = []
    for _ in range(count):
        d = torch.randn(shape, generator=gen)
        scale = (eps * dims**0.5 / _norms(d)).reshape(-1, *[1] * (len(shape) - 1))
        out.append(d * scale.float())
    return out


def trajectory_sensitivity(
    experts: Experts,
    models: Models,
    policy: str,
    x_T: torch.Tensor,
    steps: int,
    eps: float,
    seed: int,
    count: int = 1,
    **kw: Any,
) -> dict[str, torch.Tensor]:
    """Per trajectory: amplification (mean over `count` directions), its worst direction,
    flipped (see the module docstring). `kw` goes to `sample` (labels, guidance)."""
    base = run(experts, models, policy, x_T, steps, trace=True, **kw)
    base_sel = _selections(base)
    growth, flipped = [], torch.zeros(x_T.shape[0], dtype=torch.bool)
    for delta in directions(tuple(x_T.shape), count, eps, seed):
        moved = run(experts, models, policy, x_T + delta, steps, trace=True, **kw)
        growth.append(_norms(moved.final - base.final) / _norms(delta))
        for a, b in zip(base_sel, _selections(moved), strict=True):
            flipped |= torch.tensor([x != y for x, y in zip(a, b, strict=True)])
    g = torch.stack(growth)  # (directions, N)
    return {
        "amplification": g.mean(dim=0),
        "amplification_worst": g.max(dim=0).values,
        "flipped": flipped,
        "final": base.final,
    }


def delta_refine(
    experts: Experts,
    models: Models,
    policy: str,
    x_T: torch.Tensor,
    refine_steps: list[int],
    known: dict[int, torch.Tensor] | None = None,
    **kw: Any,
) -> dict[int, torch.Tensor]:
    """{N: per trajectory ||x_0^N - x_0^{2N}|| / ||x_0^{2N}||}; each grid is integrated once
    (`known`: final states already computed, by step count)."""
    finals = dict(known or {})
    for steps in sorted({s for n in refine_steps for s in (n, 2 * n)}):
        if steps not in finals:
            finals[steps] = run(experts, models, policy, x_T, steps, **kw).final
    return {
        n: _norms(finals[n] - finals[2 * n]) / _norms(finals[2 * n]).clamp_min(1e-12)
        for n in refine_steps
    }


def stability_report(
    sens: dict[str, torch.Tensor], refine: dict[int, torch.Tensor]
) -> dict[str, Any]:
    flipped = sens["flipped"]
    amp = sens["amplification"]
    return {
        "amplification": summary(amp),
        "amplification_worst": summary(sens["amplification_worst"]),
        "delta_refine": {str(n): summary(v) for n, v in refine.items()},
        "flipped_fraction": float(flipped.double().mean()),
        "amplification_mean_flipped": float(amp[flipped].mean()) if flipped.any() else None,
        "amplification_mean_unflipped": float(amp[~flipped].mean()) if (~flipped).any() else None,
    }
