"""Uncertainty: paired bootstrap intervals and the verdicts drawn from them.

Strategies are compared on shared noise: sample i of every strategy (and seed) starts from
the same x_T, so the comparison is paired, and the interval of a difference comes from
resampling the PAIRS (the same resampled indices for both arms), recomputing each arm's
statistic on its resample. A set statistic such as FID is recomputed whole on every
resample; resampling with replacement biases it, but by the same amount in both arms of a
pair, which is what a difference needs.

A verdict compares a claim's interval with zero: the claim agrees with the paper when the
whole interval lies on the paper's side, contradicts it when the whole interval lies on the
other side, and is inconclusive otherwise. No figure is a finding without its interval.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

CONFIDENCE = 0.95
Direction = Literal["lower", "higher"]  # the side of zero the paper predicts
Verdict = Literal["agrees", "contradicts", "inconclusive"]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval."""

    estimate: float
    low: float
    high: float
    resamples: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "confidence": CONFIDENCE,
            "resamples": self.resamples,
        }


def percentile_interval(estimate: float, draws: np.ndarray) -> Interval:
    """The central CONFIDENCE interval of bootstrap draws (NaN draws dropped)."""
    draws = draws[np.isfinite(draws)]
    if len(draws) == 0:
        return Interval(estimate, float("nan"), float("nan"), 0)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high), len(draws))


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) row indices drawn with replacement, from a seeded generator."""
    return np.random.default_rng([seed, 17]).integers(0, n, size=(resamples, n))


def paired_difference(
    statistic: Callable[[torch.Tensor], float],
    a: torch.Tensor,
    b: torch.Tensor,
    resamples: int,
    seed: int,
) -> Interval:
    """statistic(a) - statistic(b) for row-aligned a and b (row i of both from the same
    x_T), with the interval of resampled pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired sets differ in length: {len(a)} vs {len(b)}")
    estimate = statistic(a) - statistic(b)
    draws = np.array(
        [
            statistic(a[torch.from_numpy(idx)]) - statistic(b[torch.from_numpy(idx)])
            for idx in resample_indices(len(a), resamples, seed)
        ]
    )
    return percentile_interval(estimate, draws)


def mean_interval(values: torch.Tensor, resamples: int, seed: int) -> Interval:
    """The mean of per-unit values (NaNs dropped) with its bootstrap interval."""
    v = values.double()
    v = v[~v.isnan()]
    if len(v) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    idx = torch.from_numpy(resample_indices(len(v), resamples, seed))
    return percentile_interval(float(v.mean()), v[idx].mean(dim=1).numpy())


def verdict(interval: Interval, paper_side: Direction) -> Verdict:
    """Whether the interval of (difference) lies wholly on the paper's side of zero
    ("lower": the paper predicts a negative difference), wholly on the other, or spans 0."""
    if not (np.isfinite(interval.low) and np.isfinite(interval.high)):
        return "inconclusive"
    below, above = interval.high < 0, interval.low > 0
    if (below and paper_side == "lower") or (above and paper_side == "higher"):
        return "agrees"
    if below or above:
        return "contradicts"
    return "inconclusive"


VERDICT_WORDS: dict[Verdict, str] = {
    "agrees": "agrees with the paper",
    "contradicts": "contradicts the paper",
    "inconclusive": "is inconclusive here (the interval spans zero)",
}
