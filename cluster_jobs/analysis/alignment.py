"""Expert-data alignment, the quantity the paper shows DOES govern quality, measured so
that no figure is computed from the prediction it judges.

Definitions (ids in results.json):

    alignment.*               from runs traced with every expert's prediction: at every
                              evaluation, x̂_0^ref = x_t - t v̄ with v̄ the UNIFORM mean of
                              all K experts' predictions (it does not depend on which experts
                              the strategy chose), its distances d_k to the K centroids in
                              the store's feature space and their ranks (1: nearest). Per
                              sample and step, with w the strategy's merge weights:
        selected_rank         mean rank of the selected clusters (chance: (K+1)/2)
        weighted_rank         sum_k w_k rank_k
        distance_gap          mean d of the selected minus mean d of the others (< 0:
                              the selected are nearer; undefined when all are selected)
        misalignment          sum_k w_k d_k - min_k d_k (0: all weight on the nearest
                              cluster; the one figure that tells `full` from Top-2)
    accuracy.*                on held-out images noised to t (a grid), every expert's guided
                              velocity error ||v_k - (ε - x_0)||^2 / D under the analysis'
                              conditioning; the strategy's selection from its dense merge
                              weights at (x_t, t) (w_k > 0):
        selected / non_selected   mean error of the selected / other experts, per t
        ratio                 selected / non_selected per t (never pooled over t: the
                              errors' scale changes with t by orders of magnitude)
        weighted              sum_k w_k e_k (what the merge weights, for `full`)
        merged                the error of the merged velocity sum_k w_k v_k itself
        random_k              the expected error of as many experts drawn at random (the
                              mean over all K): the baseline a router must beat
        oracle                the true cluster's expert
    calibration.*             the router on noised held-out images: accuracy of its argmax,
                              expected calibration error (ECE_BINS equal-width bins of
                              the max probability) and mean entropy (nats), per t
    disagreement.*            mean angular deviation (router_service.disagreement) among all
                              experts and among the selected ones, and the spread of x̂_0:
                              RMS per value of each expert's x̂_0,k = x_t - t v_k about their
                              mean (angles understate disagreement at high t, where every
                              velocity is mostly the shared noise)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from cluster_jobs.data.shards import cluster_dataset
from ddm_nodes import flow
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.store import Store
from router_service.disagreement import angular_deviation
from router_service.metrics import STEP_BUCKETS, step_bucket
from router_service.policies import RoutingDecision, get_policy
from router_service.sampler import SampleResult, apply_guidance, guidance_batch

T_GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
BUCKETS = [step_bucket((i + 0.5) / STEP_BUCKETS) for i in range(STEP_BUCKETS)]
ECE_BINS = 10
ALIGNMENT_FIELDS = ("selected_rank", "weighted_rank", "distance_gap", "misalignment")


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


def selected_mask(decision: RoutingDecision, num_experts: int) -> torch.Tensor:
    """(N, K) True where the sample's merge gives expert k weight. From the dense weights:
    a decision's empty slots (NO_EXPERT) select nothing."""
    return decision.dense(num_experts) > 0


# --- (i) alignment against a reference that does not depend on the choice ---------------


def _ranks(d: torch.Tensor) -> torch.Tensor:
    """(N, K) rank of each column by distance, 1 = nearest."""
    return d.argsort(dim=1).argsort(dim=1).double() + 1


def step_alignment(weights: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sample (N,), from merge weights (N, K) and reference distances (N, K): the
    ALIGNMENT_FIELDS of the module docstring."""
    w, d = weights.double(), d.double()
    mask = w > 0
    ranks = _ranks(d)
    chosen = mask.sum(dim=1).double()
    others = (~mask).sum(dim=1).double()
    sel_d = (d * mask).sum(dim=1) / chosen
    non_d = (d * ~mask).sum(dim=1) / others.where(others > 0, torch.nan)
    return {
        "selected_rank": (ranks * mask).sum(dim=1) / chosen,
        "weighted_rank": (w * ranks).sum(dim=1),
        "distance_gap": sel_d - non_d,
        "misalignment": (w * d).sum(dim=1) - d.min(dim=1).values,
    }


def reference_alignment(result: SampleResult, space: Any) -> dict[str, Any]:
    """The alignment figures of a run traced with `trace_all_experts`, per step bucket and
    overall, with each sample's mean over its steps (`per_sample`, for paired
    comparisons)."""
    if not result.trace or result.trace[0].predictions is None:
        raise ValueError("reference alignment needs a run traced with trace_all_experts")
    K = result.trace[0].predictions.shape[0]
    per_step = {f: [] for f in ALIGNMENT_FIELDS}
    buckets: dict[str, dict[str, list[torch.Tensor]]] = {b: {} for b in BUCKETS}
    for step in result.trace:
        t = torch.full((step.x_t.shape[0],), step.t)
        x0_ref = flow.denoised(step.x_t, t, step.predictions.mean(dim=0))
        d = space.distances(x0_ref).float()
        fields = step_alignment(step.decision.dense(K), d)
        for f, v in fields.items():
            per_step[f].append(v)
            buckets[step_bucket(step.t)].setdefault(f, []).append(v)
    out: dict[str, Any] = {"chance_rank": (K + 1) / 2}
    for f in ALIGNMENT_FIELDS:
        stacked = torch.stack(per_step[f])  # (evaluations, N)
        out[f] = _nanmean(stacked)
        out[f"{f}_by_bucket"] = {
            b: (_nanmean(torch.stack(v[f])) if f in v else None) for b, v in buckets.items()
        }
        out.setdefault("per_sample", {})[f] = stacked.nanmean(dim=0)
    return out


def _nanmean(x: torch.Tensor) -> float | None:
    v = x[~x.isnan()]
    return float(v.mean()) if len(v) else None


# --- (ii) the selected experts' accuracy ----------------------------------------------------


def _noised(images: torch.Tensor, t: float, seed: int) -> tuple[torch.Tensor, flow.PathSample]:
    gen = torch.Generator().manual_seed(seed)
    tt = torch.full((images.shape[0],), t)
    path = flow.interpolate(images, torch.randn(images.shape, generator=gen), tt)
    return tt, path


@dataclass
class ErrorCase:
    """Held-out images noised to one t, with every expert's guided prediction."""

    t: float
    x_t: torch.Tensor
    tt: torch.Tensor
    target: torch.Tensor  # the path's velocity ε - x_0
    predictions: torch.Tensor  # (K, N, C, H, W)

    @property
    def errors(self) -> torch.Tensor:
        """(N, K) per-sample MSE of each expert."""
        diff = self.predictions - self.target[None]
        return diff.flatten(2).pow(2).mean(dim=2).T.double()

    @property
    def x0_hat(self) -> torch.Tensor:
        """x̂_0 from the experts' uniform mean (what nearest-centroid routes on here)."""
        return flow.denoised(self.x_t, self.tt, self.predictions.mean(dim=0))


@torch.no_grad()
def expert_predictions(
    experts: Any,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    t_grid: list[float],
    seed: int,
    guidance: float = 1.0,
) -> list[ErrorCase]:
    """Per t: every expert's velocity on the noised images, guided as the sampler guides."""
    cases = []
    for i, t in enumerate(t_grid):
        tt, path = _noised(images, t, seed + 101 * i)
        preds = []
        for k in range(experts.num_experts):
            if labels is None or guidance == 1:
                preds.append(experts.predict(k, path.x_t, tt, labels))
            else:
                stacked = experts.predict(k, *guidance_batch(path.x_t, tt, labels))
                preds.append(apply_guidance(stacked, guidance))
        cases.append(ErrorCase(t, path.x_t, tt, path.velocity, torch.stack(preds).float()))
    return cases


def _decide(policy: Any, case: ErrorCase, router: Any, space: Any, K: int) -> RoutingDecision:
    n = case.x_t.shape[0]
    if policy.needs == "router":
        probs = torch.softmax(router(case.x_t, case.tt).float(), dim=-1)
        return policy.select(n, K, probs=probs)
    if policy.needs == "features":
        return policy.select(n, K, distances=space.distances(case.x0_hat).float())
    return policy.select(n, K)


def expert_accuracy(
    router: Any,
    space: Any,
    strategy: str,
    cases: list[ErrorCase],
    clusters: torch.Tensor,
) -> dict[str, Any]:
    """accuracy.* of the module docstring, per t, with the per-(image, t) differences
    selected - non_selected and selected - random_k (`units`, for intervals)."""
    policy = get_policy(strategy)
    by_t, diff_non, diff_random = {}, [], []
    for case in cases:
        e = case.errors  # (N, K)
        n, K = e.shape
        w = _decide(policy, case, router, space, K).dense(K).double()
        mask = w > 0
        sel = (e * mask).sum(dim=1) / mask.sum(dim=1)
        others = (~mask).sum(dim=1)
        non = (e * ~mask).sum(dim=1) / others.clamp_min(1)
        has_non = others > 0
        merged = torch.einsum("nk,kn...->n...", w.float(), case.predictions)
        merged_err = (merged - case.target).flatten(1).pow(2).mean(dim=1).double()
        random_k = e.mean(dim=1)
        oracle = e[torch.arange(n), clusters]
        non_mean = float(non[has_non].mean()) if has_non.any() else None
        by_t[f"{case.t:.1f}"] = {
            "selected": float(sel.mean()),
            "non_selected": non_mean,
            "ratio": float(sel[has_non].mean() / non[has_non].mean()) if has_non.any() else None,
            "weighted": float((w * e).sum(dim=1).mean()),
            "merged": float(merged_err.mean()),
            "random_k": float(random_k.mean()),
            "oracle": float(oracle.mean()),
            "selected_is_oracle": float(mask[torch.arange(n), clusters].double().mean()),
        }
        diff_non.append((sel - non)[has_non])
        diff_random.append(sel - random_k)
    return {
        "by_t": by_t,
        "units": {
            "selected_minus_non_selected": torch.cat(diff_non),
            "selected_minus_random_k": torch.cat(diff_random),
        },
    }


# --- the router's calibration ---------------------------------------------------------------


def expected_calibration_error(probs: torch.Tensor, truth: torch.Tensor) -> float:
    """ECE over ECE_BINS equal-width bins of the max probability."""
    conf, pred = probs.max(dim=1)
    right = (pred == truth).double()
    bins = (conf.double() * ECE_BINS).long().clamp(max=ECE_BINS - 1)
    ece = 0.0
    for b in range(ECE_BINS):
        inside = bins == b
        if inside.any():
            ece += float(inside.double().mean()) * abs(
                float(right[inside].mean()) - float(conf[inside].double().mean())
            )
    return ece


@torch.no_grad()
def router_calibration(router: Any, images: torch.Tensor, clusters: torch.Tensor, seed: int):
    """{t: {accuracy, ece, entropy}} of the router on held-out images noised to t."""
    out = {}
    for i, t in enumerate(T_GRID):
        tt, path = _noised(images, t, seed + i)
        probs = torch.softmax(router(path.x_t, tt).double(), dim=1)
        entropy = -(probs * probs.clamp_min(1e-300).log()).sum(dim=1)
        out[f"{t:.1f}"] = {
            "accuracy": float((probs.argmax(dim=1) == clusters).double().mean()),
            "ece": expected_calibration_error(probs, clusters),
            "entropy": float(entropy.mean()),
        }
    return out


# --- (iii) disagreement -----------------------------------------------------------------------


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


def _spread(x0: torch.Tensor) -> torch.Tensor:
    """(N,) RMS per value of x̂_0 estimates (M, N, ...) about their mean."""
    centred = x0 - x0.mean(dim=0, keepdim=True)
    return centred.flatten(2).pow(2).mean(dim=2).mean(dim=0).sqrt().double()


def disagreement(result: SampleResult) -> dict[str, Any]:
    """From a run traced with every expert's prediction: per sample the mean angular
    deviation among all experts and among the selected ones, the x̂_0 spread among all and
    among the selected, and their per step bucket means."""
    n = result.final.shape[0]
    K = result.trace[0].predictions.shape[0]
    series: dict[str, list[torch.Tensor]] = {
        "all_degrees": [],
        "selected_degrees": [],
        "all_spread": [],
        "selected_spread": [],
    }
    buckets: dict[str, dict[str, list[float]]] = {b: {} for b in BUCKETS}
    everyone = torch.arange(n)
    for step in result.trace:
        preds = step.predictions  # (K, N, C, H, W)
        mask = selected_mask(step.decision, K)
        t = torch.full((n,), step.t)
        x0 = torch.stack([flow.denoised(step.x_t, t, p) for p in preds])
        sel_spread = torch.full((n,), math.nan, dtype=torch.float64)
        for i in range(n):
            if mask[i].sum() >= 2:
                sel_spread[i] = _spread(x0[mask[i], i : i + 1])[0]
        chosen = [
            (step.decision.rows(k), preds[k][step.decision.rows(k)])
            for k in step.decision.experts()
        ]
        values = {
            "all_degrees": angular_deviation([(everyone, p) for p in preds], n).double(),
            "selected_degrees": angular_deviation(chosen, n).double(),
            "all_spread": _spread(x0),
            "selected_spread": sel_spread,
        }
        for name, v in values.items():
            series[name].append(v)
            m = _nanmean(v)
            if m is not None:
                buckets[step_bucket(step.t)].setdefault(name, []).append(m)
    out: dict[str, Any] = {"per_sample": {}}
    for name, steps in series.items():
        per = torch.stack(steps).nanmean(dim=0)
        out["per_sample"][name] = per
        out[name] = _nanmean(per)
        out[f"{name}_by_bucket"] = {
            b: (sum(v[name]) / len(v[name]) if name in v else None) for b, v in buckets.items()
        }
    return out
