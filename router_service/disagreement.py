"""Expert disagreement: how far apart the velocities of the experts a sample selected point.

For a sample that selected m >= 2 experts with (guided) velocities v_1..v_m, flattened:

    mean_v      = (1/m) sum_j v_j                      the unweighted consensus direction
    deviation   = (1/m) sum_j angle(v_j, mean_v)       in degrees, angle = acos(cos sim)

Zero when the experts agree in direction (identical experts), up to 90 degrees when they
cancel. A sample with a single expert has no disagreement (NaN). The paper's analysis (iii)
relates this quantity to per-sample quality; the Serve router exports it per step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def angular_deviation(
    predictions: Iterable[tuple[torch.Tensor, torch.Tensor]], num_samples: int
) -> torch.Tensor:
    """(N,) mean angle in degrees between each selected expert's velocity and their mean,
    NaN where a sample selected fewer than two experts.

    predictions: (rows, v) per expert: rows (n_k,) sample indices, v (n_k, ...) velocities.
    """
    parts = [(rows.to(v.device), v.flatten(1).double()) for rows, v in predictions]
    if not parts:
        return torch.full((num_samples,), math.nan, dtype=torch.float64)
    dims, dev = parts[0][1].shape[1], parts[0][1].device  # computed where the velocities are
    total = torch.zeros(num_samples, dims, dtype=torch.float64, device=dev)
    count = torch.zeros(num_samples, dtype=torch.float64, device=dev)
    for rows, v in parts:
        total.index_add_(0, rows, v)
        count.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64, device=dev))
    mean = total / count.clamp_min(1).unsqueeze(1)
    angles = torch.zeros(num_samples, dtype=torch.float64, device=dev)
    for rows, v in parts:
        cos = torch.nn.functional.cosine_similarity(v, mean[rows], dim=1, eps=1e-12)
        angles.index_add_(0, rows, torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0))))
    return torch.where(count >= 2, angles / count.clamp_min(1), math.nan)
