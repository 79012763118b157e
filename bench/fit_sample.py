"""How large a sample `ddm prepare` needs to fit PCA and k-means: Fashion-MNIST (70,000),
K=8, PCA 64, fitted on seeded samples of 2,048 (the default, 256 per cluster), 8,192,
16,384 and all images, every image then assigned to its nearest centroid. Prints JSON: for
each size and seed, the adjusted Rand index against the whole-data fit of the same seed
and the whole-data inertia ratio, beside the whole-data fit's own seed-to-seed ARI.

    python bench/fit_sample.py
"""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from cluster_jobs.data.clustering import cluster_images
from cluster_jobs.data.passes import fit_indices, nearest
from cluster_jobs.data.sources import ImageSet, load_source
from ddm_nodes.pixels import to_model_range

K = 8
SEEDS = (0, 1, 2)
SIZES = (2048, 8192, 16384)


def fit_and_assign(data: ImageSet, size: int, seed: int) -> tuple[np.ndarray, float, float]:
    """(every image's cluster, the whole-data inertia, fit seconds) of a fit on `size`."""
    idx = fit_indices(np.arange(len(data)), K, size, seed)
    start = time.perf_counter()
    fitted = cluster_images(data.images[idx], K, seed=seed)
    fit_s = time.perf_counter() - start
    labels, costs = [], []
    for i in range(0, len(data), 8192):
        z = fitted.space.embed(to_model_range(data.images[i : i + 8192])).double().numpy()
        got, cost = nearest(z, fitted.centers, "euclidean")
        labels.append(got)
        costs.append(cost)
    return np.concatenate(labels), float(np.concatenate(costs).sum()), fit_s


def main() -> None:
    data = load_source("fashion-mnist")
    full = {s: fit_and_assign(data, len(data), s) for s in SEEDS}
    report: dict = {"by_sample_size": {}}
    for size in SIZES:
        rows = []
        for s in SEEDS:
            labels, inertia, fit_s = fit_and_assign(data, size, s)
            rows.append(
                {
                    "seed": s,
                    "ari_vs_full_same_seed": round(adjusted_rand_score(full[s][0], labels), 4),
                    "inertia_ratio_vs_full": round(inertia / full[s][1], 4),
                    "fit_s": round(fit_s, 2),
                }
            )
        report["by_sample_size"][size] = rows
    report["full_fit_s"] = [round(full[s][2], 2) for s in SEEDS]
    report["full_fit_seed_to_seed_ari"] = [
        round(adjusted_rand_score(full[a][0], full[b][0]), 4)
        for a, b in itertools.combinations(SEEDS, 2)
    ]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
