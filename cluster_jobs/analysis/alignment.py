"""Expert-data alignment, the quantity the paper shows DOES govern quality.

Definitions (ids in results.json):

    alignment.centroid_rate   share of (sample, evaluation) pairs whose highest-weighted
                              selected expert is the cluster whose centroid lies nearest to
                              the current denoised estimate x̂_0 = x_t - t v (v the merged
                              velocity) in the data set's feature space, per step bucket
    alignment.knn_rate        the same with "nearest" meaning the smallest mean distance to
                              the `knn` nearest training features of each cluster
    alignment.router_accuracy argmax of the router on held-out images noised to t against
                              their true cluster, over a grid of t
    accuracy.expert_error     per held-out noised image (x_t, t), each expert's velocity
                              error ||v_k - (ε - x_0)||^2 / D; selected (by the strategy on
                              the router's probabilities) vs non-selected experts, their
                              ratio, and the oracle expert's (the true cluster's) error
    disagreement.*            mean angular deviation (router_service.disagreement) per step
                              among all experts and among the selected ones, and its Spearman
                              correlation with per-sample quality (distance of the final
                              sample to its nearest held-out feature: larger is worse)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cluster_jobs.data.shards import cluster_dataset
from ddm_nodes import flow
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.store import Store
from router_service.disagreement import angular_deviation
from router_service.metrics import STEP_BUCKETS, step_bucket
from router_service.policies import get_policy
from router_service.sampler import SampleResult

T_GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
BUCKETS = [step_bucket((i + 0.5) / STEP_BUCKETS) for i in range(STEP_BUCKETS)]


def heldout(
    store: Store, manifest: DatasetManifest, limit: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to `limit` held-out images (N, C, H, W) with their clusters, labels and the
    states the models see (the images, or their VAE latents in a latent dataset), drawn
    per cluster so every cluster is represented."""
    per = math.ceil(limit / manifest.num_clusters)
    latent = manifest.latents is not None
    fields = frozenset({"image", "latent"} if latent else {"image"})
    images, clusters, labels, states = [], [], [], []
    for k in range(manifest.num_clusters):
        samples = cluster_dataset(store, k, "heldout", manifest=manifest, fields=fields)
        for i, s in enumerate(samples):
            if i >= per:
                break
            images.append(s["image"])
            states.append(s["latent"] if latent else s["image"])
            clusters.append(s["cluster"])
            labels.append(s["label"])
    return (
        torch.stack(images),
        torch.tensor(clusters),
        torch.tensor(labels),
        torch.stack(states),
    )


def train_features(
    store: Store, manifest: DatasetManifest, space: Any, per_cluster: int
) -> list[torch.Tensor]:
    """Per cluster: the feature-space embedding of up to `per_cluster` training images."""
    out = []
    for k in range(manifest.num_clusters):
        images = []
        for i, s in enumerate(cluster_dataset(store, k, "train", manifest=manifest)):
            if i >= per_cluster:
                break
            images.append(s["image"])
        out.append(space.embed(torch.stack(images)).float())
    return out


def knn_distances(z: torch.Tensor, bank: list[torch.Tensor], knn: int) -> torch.Tensor:
    """(N, K) mean distance from each row of z to the knn nearest features of cluster k."""
    cols = []
    for feats in bank:
        d = torch.cdist(z, feats)
        cols.append(d.topk(min(knn, feats.shape[0]), dim=1, largest=False).values.mean(dim=1))
    return torch.stack(cols, dim=1)


def trace_alignment(
    result: SampleResult, space: Any, bank: list[torch.Tensor], knn: int
) -> dict[str, Any]:
    """Alignment rates per step bucket from a traced sampling run."""
    hits = {name: {b: [0, 0] for b in BUCKETS} for name in ("centroid", "knn")}
    for step in result.trace:
        t = torch.full((step.x_t.shape[0],), step.t)
        x0_hat = flow.denoised(step.x_t, t, step.velocity)
        z = space.embed(x0_hat).float()
        best = step.decision.ids[:, 0]  # slot 0: the highest-weighted selected expert
        nearest = {
            "centroid": torch.cdist(z, space.centroids.to(z)).argmin(dim=1),
            "knn": knn_distances(z, bank, knn).argmin(dim=1),
        }
        bucket = step_bucket(step.t)
        for name, near in nearest.items():
            hits[name][bucket][0] += int((near == best).sum())
            hits[name][bucket][1] += len(best)
    out = {}
    for name, per in hits.items():
        rates = {b: (h / n if n else None) for b, (h, n) in per.items()}
        total = sum(h for h, _ in per.values()) / max(1, sum(n for _, n in per.values()))
        out[f"{name}_rate"] = total
        out[f"{name}_rate_by_bucket"] = rates
    return out


def _noised(images: torch.Tensor, t: float, seed: int) -> tuple[torch.Tensor, flow.PathSample]:
    gen = torch.Generator().manual_seed(seed)
    tt = torch.full((images.shape[0],), t)
    path = flow.interpolate(images, torch.randn(images.shape, generator=gen), tt)
    return tt, path


@torch.no_grad()
def router_accuracy(router: Any, images: torch.Tensor, clusters: torch.Tensor, seed: int):
    """{t: accuracy} of the router's argmax against the true cluster."""
    out = {}
    for i, t in enumerate(T_GRID):
        tt, path = _noised(images, t, seed + i)
        out[f"{t:.1f}"] = float((router(path.x_t, tt).argmax(dim=1) == clusters).double().mean())
    return out


@torch.no_grad()
def expert_errors(
    experts: Any,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    t_grid: list[float],
    seed: int,
) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """Per t: (x_t, t, target) and every expert's per-sample error (K, N)."""
    cases, errors = [], []
    for i, t in enumerate(t_grid):
        tt, path = _noised(images, t, seed + 101 * i)
        per_expert, v_sum = [], torch.zeros_like(path.x_t)
        for k in range(experts.num_experts):
            v = experts.predict(k, path.x_t, tt, labels)
            v_sum += v
            per_expert.append((v - path.velocity).flatten(1).pow(2).mean(dim=1))
        v_mean = v_sum / experts.num_experts
        cases.append(
            {"t": t, "x_t": path.x_t, "tt": tt, "x0_hat": flow.denoised(path.x_t, tt, v_mean)}
        )
        errors.append(torch.stack(per_expert))  # (K, N)
    return cases, errors


def selected_vs_not(
    router: Any,
    space: Any,
    strategy: str,
    cases: list[dict[str, Any]],
    errors: list[torch.Tensor],
    clusters: torch.Tensor,
) -> dict[str, Any]:
    """Selected experts' mean error vs the non-selected ones', and the oracle expert's.
    Router policies select on the router's probabilities at (x_t, t); nearest-centroid on
    the distances of x̂_0 from the experts' mean velocity (as the sampler does after its
    first, uniform step); uniform selects everyone (no non-selected experts)."""
    policy = get_policy(strategy)
    sel_all, non_all, oracle_all = [], [], []
    by_t = {}
    for case, err in zip(cases, errors, strict=True):
        K, n = err.shape
        if policy.needs == "router":
            probs = torch.softmax(router(case["x_t"], case["tt"]).float(), dim=-1)
            decision = policy.select(n, K, probs=probs)
        elif policy.needs == "features":
            decision = policy.select(n, K, distances=space.distances(case["x0_hat"]).float())
        else:
            decision = policy.select(n, K)
        mask = torch.zeros(n, K, dtype=torch.bool)
        mask.scatter_(1, decision.ids.clamp_min(0), decision.selected)
        e = err.t()  # (N, K)
        sel, non = e[mask], e[~mask]
        oracle = e[torch.arange(n), clusters]
        sel_all.append(sel)
        non_all.append(non)
        oracle_all.append(oracle)
        by_t[f"{case['t']:.1f}"] = {
            "selected": float(sel.mean()),
            "non_selected": float(non.mean()) if len(non) else None,
            "oracle": float(oracle.mean()),
        }
    sel, non, oracle = torch.cat(sel_all), torch.cat(non_all), torch.cat(oracle_all)
    return {
        "selected_mean": float(sel.mean()),
        "non_selected_mean": float(non.mean()) if len(non) else None,
        "ratio": float(sel.mean() / non.mean()) if len(non) else None,
        "oracle_mean": float(oracle.mean()),
        "selected_median": float(sel.median()),
        "non_selected_median": float(non.median()) if len(non) else None,
        "by_t": by_t,
    }


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman rank correlation of two 1-D tensors (NaN pairs dropped)."""
    keep = ~(a.isnan() | b.isnan())
    a, b = a[keep].double(), b[keep].double()
    if len(a) < 3:
        return None
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return float((ra * rb).sum() / denom) if denom > 0 else None


def disagreement(result: SampleResult) -> dict[str, Any]:
    """From a run traced with every expert's prediction: per-sample mean deviation among all
    experts and among the selected ones, and per step bucket means."""
    n = result.final.shape[0]
    all_dev, sel_dev = [], []
    buckets = {b: [] for b in BUCKETS}
    for step in result.trace:
        preds = step.predictions  # (K, N, C, H, W)
        everyone = torch.arange(n)
        all_dev.append(angular_deviation([(everyone, p) for p in preds], n))
        chosen = [
            (step.decision.rows(k), preds[k][step.decision.rows(k)])
            for k in step.decision.experts()
        ]
        sel = angular_deviation(chosen, n)
        sel_dev.append(sel)
        buckets[step_bucket(step.t)].append(float(all_dev[-1].mean()))
    all_per = torch.stack(all_dev).mean(dim=0)
    sel_per = torch.stack(sel_dev).nanmean(dim=0)
    return {
        "all_per_sample": all_per,
        "selected_per_sample": sel_per,
        "all_mean": float(all_per.mean()),
        "selected_mean": float(sel_per.nanmean()) if not sel_per.isnan().all() else None,
        "all_by_bucket": {b: (sum(v) / len(v) if v else None) for b, v in buckets.items()},
    }
