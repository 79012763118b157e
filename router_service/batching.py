"""Iteration-level batching for an expert replica: sub-batches from different requests,
each at its own step (t is per sample), stacked into one forward pass and split back.

These are the plain functions behind the `@serve.batch` method of the expert deployment
(deployments.py), so they are tested without Ray. A sub-batch is (x (n, C, H, W), t (n,),
y (n,) or None) as float32 / int64 numpy arrays; None labels become NULL_LABEL, which every
expert reads as "no class", so conditional and unconditional requests share a forward.
"""

from __future__ import annotations

import numpy as np

from ddm_nodes.dataset_manifest import NULL_LABEL

SubBatch = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def samples_in(items: list[SubBatch]) -> int:
    """The batch size `@serve.batch` counts: samples, not requests."""
    return sum(len(x) for x, _, _ in items)


def stack(items: list[SubBatch]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """(x, t, y, sizes) of the concatenated sub-batches."""
    sizes = [len(x) for x, _, _ in items]
    x = np.concatenate([x for x, _, _ in items])
    t = np.concatenate([t for _, t, _ in items])
    y = np.concatenate(
        [np.full(len(x), NULL_LABEL, np.int64) if y is None else y for x, _, y in items]
    )
    return x, t, y, sizes


def split(v: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """The inverse of `stack` on the rows of the output."""
    return np.split(v, np.cumsum(sizes)[:-1])


def chunks(item: SubBatch, most: int) -> list[SubBatch]:
    """A sub-batch cut into pieces of at most `most` samples (a batch's size limit)."""
    x, t, y = item
    return [
        (x[i : i + most], t[i : i + most], None if y is None else y[i : i + most])
        for i in range(0, len(x), most)
    ]
