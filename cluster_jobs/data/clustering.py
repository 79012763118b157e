"""Embed every image, cluster the embeddings with k-means, split off a held-out set.

Deterministic by construction: the exact PCA solver, k-means++ seeded with `seed`, and a
held-out split drawn per cluster from a generator seeded with `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from ddm_nodes.dataset_manifest import ClusterStats
from ddm_nodes.errors import DDMError
from ddm_nodes.features import FeatureSpace, get_extractor
from ddm_nodes.pixels import to_model_range

KMEANS_RESTARTS = 3  # best-of-3 inertia: cheap next to PCA, and steadier cluster sizes
EMBED_CHUNK = 8192


@dataclass(frozen=True)
class Clustering:
    space: FeatureSpace
    assignments: np.ndarray  # (N,) int64 cluster id per image
    stats: ClusterStats


def cluster_images(
    images: np.ndarray,
    k: int,
    method: str = "pca",
    dims: int = 64,
    seed: int = 0,
    silhouette_sample: int = 5000,
) -> Clustering:
    """images: uint8 (N, H, W, C). Returns the fitted feature space and one cluster per image."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(images)
    if not 2 <= k <= n:
        raise DDMError(f"--clusters {k} is out of range: use 2 <= K <= {n} (the number of images)")
    x = to_model_range(images)  # (N, C, H, W)
    # Multi-threaded BLAS beside torch's idle OpenMP pool oversubscribes the cores
    # (docs/decisions.md).
    with threadpool_limits(1, user_api="blas"):
        extractor = get_extractor(method).fit(x, dims, seed)
        chunks = [extractor.embed(x[i : i + EMBED_CHUNK]) for i in range(0, n, EMBED_CHUNK)]
        z = torch.cat(chunks).numpy().astype(np.float64)  # (N, D); float64: reproducible k-means
        km = KMeans(n_clusters=k, init="k-means++", n_init=KMEANS_RESTARTS, random_state=seed)
        km.fit(z)
        assignments = km.labels_.astype(np.int64)
        silhouette = _silhouette(z, assignments, silhouette_sample, seed, silhouette_score)
    counts = np.bincount(assignments, minlength=k)
    if counts.min() == 0:
        raise DDMError(
            f"k-means left {int((counts == 0).sum())} of {k} clusters empty (too few distinct "
            "images): use fewer --clusters"
        )
    return Clustering(
        space=FeatureSpace(extractor, torch.from_numpy(km.cluster_centers_).float()),
        assignments=assignments,
        stats=ClusterStats(
            counts=counts.tolist(),
            largest_smallest_ratio=float(counts.max() / counts.min()),
            silhouette=silhouette,
            silhouette_sample=min(silhouette_sample, n),
            # 6 significant digits: the raw float sum varies with OpenMP's summation order
            inertia=float(f"{km.inertia_:.6g}"),
        ),
    )


def _silhouette(z, labels, sample, seed, score) -> float | None:
    """On a random sample (the exact score is O(N^2)); None where it is undefined."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(z), size=min(sample, len(z)), replace=False)
    if not 2 <= len(np.unique(labels[idx])) <= len(idx) - 1:
        return None
    return float(score(z[idx], labels[idx]))


def heldout_mask(assignments: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Stratified by cluster: each cluster gives round(fraction * n_k) images, keeping >= 1
    for training."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(assignments), dtype=bool)
    for c in range(int(assignments.max()) + 1):
        members = np.flatnonzero(assignments == c)
        n_held = min(int(round(fraction * len(members))), len(members) - 1)
        mask[rng.permutation(members)[:n_held]] = True
    return mask
