"""Embed every image, cluster the embeddings with k-means, split off a held-out set.

`method` is `pca`, `pixels`, `dinov2:REF` or `clip:REF` (learned_features.py). The metric
is Euclidean k-means, or cosine: L2-normalised features and spherical k-means (centroids
renormalised to the unit sphere every iteration), as the Paris and McAllister pipelines
cluster DINOv2 features. By default learned features use cosine and the others Euclidean.

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
from ddm_nodes.features import FeatureExtractor, FeatureSpace, get_extractor
from ddm_nodes.pixels import to_model_range

KMEANS_RESTARTS = 3  # best-of-3 inertia: cheap next to PCA, and steadier cluster sizes
SPHERICAL_ITERATIONS = 100
EMBED_CHUNK = 8192
LEARNED = ("dinov2", "clip")


@dataclass(frozen=True)
class Clustering:
    space: FeatureSpace
    assignments: np.ndarray  # (N,) int64 cluster id per image
    stats: ClusterStats
    centers: np.ndarray  # (K, D) float64: the centroids as k-means left them


def make_extractor(
    images: np.ndarray,
    method: str,
    dims: int,
    seed: int,
    device: str = "cpu",
    batch_size: int = 64,
) -> FeatureExtractor:
    """The extractor `method` names, fitted on `images` (uint8 (N, H, W, C)) when it fits."""
    name, _, ref = method.partition(":")
    if name in LEARNED:
        if not ref:
            raise DDMError(f"--features {name} needs a model: {name}:FOLDER or {name}:HUB_ID")
        return get_extractor(name).load_ref(ref, device, batch_size)
    if ref:
        raise DDMError(f"--features {method!r}: only {' and '.join(LEARNED)} take a :REF")
    try:
        extractor_cls = get_extractor(name)
    except ValueError:
        raise DDMError(
            f"unknown --features {method!r}; expected pca, pixels, dinov2:REF or clip:REF"
        ) from None
    return extractor_cls.fit(to_model_range(images), dims, seed)


def cluster_images(
    images: np.ndarray,
    k: int,
    method: str = "pca",
    dims: int = 64,
    seed: int = 0,
    silhouette_sample: int = 5000,
    *,
    metric: str | None = None,
    device: str = "cpu",
    batch_size: int = 64,
) -> Clustering:
    """images: uint8 (N, H, W, C). Returns the fitted feature space and one cluster per image."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(images)
    if not 2 <= k <= n:
        raise DDMError(f"--clusters {k} is out of range: use 2 <= K <= {n} (the number of images)")
    metric = metric or ("cosine" if method.partition(":")[0] in LEARNED else "euclidean")
    # Multi-threaded BLAS beside torch's idle OpenMP pool oversubscribes the cores
    # (docs/decisions.md).
    with threadpool_limits(1, user_api="blas"):
        extractor = make_extractor(images, method, dims, seed, device, batch_size)
        space = FeatureSpace(extractor, torch.zeros(1, extractor.dims), metric)
        chunks = [
            space.embed(to_model_range(images[i : i + EMBED_CHUNK]))
            for i in range(0, n, EMBED_CHUNK)
        ]
        z = torch.cat(chunks).numpy().astype(np.float64)  # (N, D); float64: reproducible k-means
        if metric == "cosine":
            centers, assignments, inertia = spherical_kmeans(z, k, seed, KMEANS_RESTARTS)
        else:
            km = KMeans(n_clusters=k, init="k-means++", n_init=KMEANS_RESTARTS, random_state=seed)
            km.fit(z)
            centers, assignments, inertia = km.cluster_centers_, km.labels_, km.inertia_
        assignments = assignments.astype(np.int64)
        silhouette = _silhouette(z, assignments, silhouette_sample, seed, silhouette_score, metric)
    counts = np.bincount(assignments, minlength=k)
    if counts.min() == 0:
        raise DDMError(
            f"k-means left {int((counts == 0).sum())} of {k} clusters empty (too few distinct "
            "images): use fewer --clusters"
        )
    return Clustering(
        space=FeatureSpace(extractor, torch.from_numpy(centers).float(), metric),
        assignments=assignments,
        stats=ClusterStats(
            counts=counts.tolist(),
            largest_smallest_ratio=float(counts.max() / counts.min()),
            silhouette=silhouette,
            silhouette_sample=min(silhouette_sample, n),
            # 6 significant digits: the raw float sum varies with OpenMP's summation order
            inertia=float(f"{inertia:.6g}"),
        ),
        centers=np.asarray(centers, np.float64),
    )


def spherical_kmeans(
    z: np.ndarray, k: int, seed: int, restarts: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Spherical k-means on unit rows z (N, D): k-means++ seeding on cosine distance, then
    assign by the largest cosine and renormalise each centroid's mean; best of `restarts`.
    Returns (unit centroids (K, D), labels (N,), inertia = sum of 1 - cosine)."""
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        centers = z[[rng.integers(len(z))]]
        while len(centers) < k:  # k-means++: the next seed far (in cosine) from the chosen
            gap = np.clip(1 - (z @ centers.T).max(axis=1), 0, None)
            p = gap / gap.sum() if gap.sum() > 0 else np.full(len(z), 1 / len(z))
            centers = np.vstack([centers, z[rng.choice(len(z), p=p)]])
        labels = None
        for _ in range(SPHERICAL_ITERATIONS):
            new = (z @ centers.T).argmax(axis=1)
            if labels is not None and (new == labels).all():
                break
            labels = new
            for c in range(k):
                members = z[labels == c]
                if len(members):  # an emptied cluster keeps its centroid
                    mean = members.sum(axis=0)
                    centers[c] = mean / max(np.linalg.norm(mean), 1e-12)
        inertia = float((1 - (z * centers[labels]).sum(axis=1)).sum())
        if best is None or inertia < best[2]:
            best = (centers.copy(), labels, inertia)
    return best


def _silhouette(z, labels, sample, seed, score, metric="euclidean") -> float | None:
    """On a random sample (the exact score is O(N^2)); None where it is undefined."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(z), size=min(sample, len(z)), replace=False)
    if not 2 <= len(np.unique(labels[idx])) <= len(idx) - 1:
        return None
    return float(score(z[idx], labels[idx], metric=metric))


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
