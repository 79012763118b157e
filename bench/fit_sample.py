"""How large a sample `ddm prepare` needs to fit PCA and k-means: Fashion-MNIST (70,000),
K=8, PCA 64, fitted on seeded samples of 2,048 (the default, 256 per cluster), 8,192,
16,384 and all images, every image then assigned to its nearest centroid. Prints JSON: for
each size and seed, the adjusted Rand index against the whole-data fit of the same seed
and the whole-data inertia ratio, beside the whole-data fit's own seed-to-seed ARI.

    python bench/fit_sample.py
"""

import json, time, numpy as np
from sklearn.metrics import adjusted_rand_score as ari
from cluster_jobs.data.sources import load_source
from cluster_jobs.data.clustering import cluster_images
from cluster_jobs.data.passes import fit_indices, nearest
from ddm_nodes.pixels import to_model_range
d = load_source("fashion-mnist")
K = 8
out = {}
def run(size, seed):
    idx = fit_indices(np.arange(len(d)), K, size, seed)
    t = time.time()
    c = cluster_images(d.images[idx], K, seed=seed)
    fit_s = time.time() - t
    labels, costs = [], []
    for i in range(0, len(d), 8192):
        z = c.space.embed(to_model_range(d.images[i:i+8192])).double().numpy()
        l, cost = nearest(z, c.centers, "euclidean"); labels.append(l); costs.append(cost)
    return np.concatenate(labels), float(np.concatenate(costs).sum()), fit_s
ref = {s: run(len(d), s) for s in (0, 1, 2)}
for size in (2048, 8192, 16384, len(d)):
    rows = []
    for s in (0, 1, 2):
        labels, inertia, fit_s = ref[s] if size == len(d) else run(size, s)
        rows.append({"seed": s, "ari_vs_full_same_seed": round(ari(ref[s][0], labels), 4),
                     "inertia_ratio_vs_full": round(inertia / ref[s][1], 4), "fit_s": round(fit_s, 2)})
    out[size] = rows
out["full_seed_to_seed_ari"] = [round(ari(ref[0][0], ref[1][0]), 4), round(ari(ref[0][0], ref[2][0]), 4), round(ari(ref[1][0], ref[2][0]), 4)]
print(json.dumps(out, indent=1))
