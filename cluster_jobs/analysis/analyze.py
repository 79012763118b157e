"""`ddm analyze`: reproduce the paper's analyses on a trained DDM in a store.

For every strategy (and the monolith, if asked) and every seed: sample `n` images through
the one sampler, embed them with the store's feature network and score them against the
held-out split (quality.py). On seed 0, for every strategy: trajectory sensitivity and
numerical convergence (stability.py), expert-data alignment of traced trajectories, and
expert disagreement with every expert's prediction recorded (alignment.py). Once: router
accuracy against t and every expert's velocity error on noised held-out images.

Writes DIR/results.json (every figure with its definition id and the settings),
DIR/report.md (the table, one sentence per analysis, the paper's figures beside ours) and
PNG plots (report.py).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cluster_jobs.analysis import alignment, quality, stability
from cluster_jobs.analysis.config import AnalyzeConfig
from ddm_nodes.checkpoint import has_checkpoint, load_model
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import DDMError
from ddm_nodes.experts import Expert, ExpertSpec
from ddm_nodes.names import MONOLITH_PREFIX, ROUTER_PREFIX
from ddm_nodes.pixels import grid_png
from ddm_nodes.store import Store, open_store, write_atomic
from router_service.local_experts import LocalExperts
from router_service.policies import RoutingError, get_policy
from router_service.sampler import initial_noise
from router_service.store_models import check_experts_present

MONOLITH = "monolith"
CHUNK = 250  # images per sampling call: bounds memory, not results
ERROR_T = [0.1, 0.3, 0.5, 0.7, 0.9]
PAPER = {
    "system": "Paris, 8 DiT-B/2 experts, LAION-Art (Roy et al. 2026)",
    "fid": {"monolith": 29.64, "top-1": 30.60, "top-2": 22.60, "full": 47.89},
    "delta_refine": {"top-2": 0.051, "full": 0.020},
}


def _say(message: str) -> None:
    print(f"[analyze {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class _Monolith:
    """The monolith as a one-expert backend (and its `models`: no router, no features; the
    DDM's decoder in a latent dataset)."""

    def __init__(self, store, models):
        loaded = load_model(store, MONOLITH_PREFIX, kind="monolith")
        self.expert = Expert(loaded.model, ExpertSpec(**loaded.training["model"])).eval()
        self.state_shape = models.state_shape
        self.decoder = models.decoder
        self.router = None
        self.features = None
        self.num_experts = 1

    def predict(self, expert_id, x_t, t, y=None):
        with torch.no_grad():
            return self.expert(x_t, t, y)


def _sample_images(experts, models, policy: str, n: int, steps: int, seed: int):
    """n images in chunks; returns (images, mean experts per step)."""
    x_T = initial_noise(n, models.state_shape, seed)
    images, per_step = [], []
    for x in x_T.split(CHUNK):
        r = stability.run(experts, models, policy, x, steps, decoder=models.decoder)
        images.append(r.images)
        per_step.append(r.experts_per_step * len(x))
    return torch.cat(images), sum(per_step) / n


def _spread(values: list[float]) -> dict[str, Any]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return {"mean": mean, "std": math.sqrt(var), "per_seed": values}


def preflight(cfg: AnalyzeConfig, store: Store) -> None:
    """Every check that needs only the store's manifests, so that a bad argument fails in a
    second, before any output, and `ddm submit --analyze` fails before a job is submitted.
    (--inception is not checked here: it names a file on the machine the analysis runs on.)"""
    manifest = DatasetManifest.load(store)
    check_experts_present(store, manifest)
    quality.FeatNet.check_present(store)
    for name in cfg.strategies:
        policy = get_policy(name)
        try:
            policy.check_experts(manifest.num_clusters)
        except RoutingError as e:
            raise DDMError(f"--strategies: {e}") from None
        if policy.needs == "router" and not has_checkpoint(store, ROUTER_PREFIX):
            raise DDMError(
                f"--strategies {name} needs a router; the store has none: train it with "
                f"`ddm submit --store {store.uri} --router`"
            )
    if cfg.include_monolith and not has_checkpoint(store, MONOLITH_PREFIX):
        raise DDMError(
            f"--include-monolith: the store has no monolith: train it with "
            f"`ddm submit --store {store.uri} --monolith`"
        )


def run_analysis(cfg: AnalyzeConfig) -> dict[str, Any]:
    start = time.perf_counter()
    store = open_store(cfg.store)
    preflight(cfg, store)
    inception = quality.Inception.load(cfg.inception) if cfg.inception else None
    remote_out = "://" in cfg.out and not cfg.out.startswith("file://")
    if remote_out:  # e.g. s3://bucket/report: written here, uploaded at the end
        out = Path(tempfile.mkdtemp(prefix="ddm-analyze-"))
    else:
        out = Path(cfg.out.removeprefix("file://")).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    featnet = quality.FeatNet.load(store)
    experts = LocalExperts(store)
    K = experts.num_experts
    manifest = experts.manifest
    _say(f"{store.uri}: K={K}, featnet held-out accuracy {featnet.heldout_accuracy}")

    real_images, clusters, labels, real_states = alignment.heldout(store, manifest, limit=100_000)
    real_feats, _ = featnet.embed(real_images)
    real_inception = inception.embed(real_images) if inception else None
    _say(f"{len(real_images)} held-out images embedded")
    bank = alignment.train_features(store, manifest, experts.feature_space, cfg.train_per_cluster)

    runs: list[tuple[str, Any, Any]] = [(s, experts, experts) for s in cfg.strategies]
    if cfg.include_monolith:
        mono = _Monolith(store, experts)
        runs.append((MONOLITH, mono, mono))

    results: dict[str, Any] = {}
    for name, backend, models in runs:
        policy = "uniform" if name == MONOLITH else name
        row: dict[str, Any] = {}
        metrics: dict[str, list[float]] = {}
        for seed in cfg.seeds:
            _say(f"{name} seed {seed}: sampling {cfg.n} images, {cfg.steps} steps")
            images, per_step = _sample_images(backend, models, policy, cfg.n, cfg.steps, seed)
            fake, confidence = featnet.embed(images)
            fid, kid = quality.fid_kid(real_feats, fake)
            scores = {"fid": fid, "kid": kid, **quality.prdc(real_feats, fake)}
            scores["confidence"] = float(confidence.mean())
            if inception is not None:
                fid_i, kid_i = quality.fid_kid(real_inception, inception.embed(images))
                scores["fid_inception"], scores["kid_inception"] = fid_i, kid_i
            for k, v in scores.items():
                metrics.setdefault(k, []).append(v)
            row["experts_per_step"] = per_step
            if seed == cfg.seeds[0]:
                write_atomic(out / f"samples-{name}.png", grid_png(images[:64]))
        row["quality"] = {k: _spread(v) for k, v in metrics.items()}

        seed = cfg.seeds[0]
        _say(f"{name}: stability on {cfg.stability_n} trajectories")
        x_T = initial_noise(cfg.stability_n, experts.state_shape, seed)
        sens = stability.trajectory_sensitivity(
            backend, models, policy, x_T, cfg.steps, cfg.eps, seed
        )
        refine = stability.delta_refine(backend, models, policy, x_T, cfg.steps)
        row["stability"] = stability.stability_report(sens, refine)

        if name != MONOLITH:
            _say(f"{name}: alignment and disagreement")
            x_T = initial_noise(cfg.alignment_n, experts.state_shape, seed + 1)
            traced = stability.run(experts, experts, policy, x_T, cfg.steps, trace=True)
            row["alignment"] = alignment.trace_alignment(traced, experts.features, bank, cfg.knn)
            x_T = initial_noise(cfg.disagreement_n, experts.state_shape, seed + 2)
            everyone = stability.run(
                experts,
                experts,
                policy,
                x_T,
                cfg.steps,
                trace_all_experts=True,
                decoder=experts.decoder,
            )
            dis = alignment.disagreement(everyone)
            final_feats, final_conf = featnet.embed(everyone.images)
            nearest = quality.nearest_real_distance(real_feats, final_feats)
            row["disagreement"] = {
                "all_mean_degrees": dis["all_mean"],
                "selected_mean_degrees": dis["selected_mean"],
                "all_by_bucket": dis["all_by_bucket"],
                "spearman_all_vs_nearest_distance": alignment.spearman(
                    dis["all_per_sample"], nearest
                ),
                "spearman_selected_vs_nearest_distance": alignment.spearman(
                    dis["selected_per_sample"], nearest
                ),
                "spearman_all_vs_confidence": alignment.spearman(dis["all_per_sample"], final_conf),
            }
        results[name] = row

    per_cluster = max(1, cfg.accuracy_n // K)
    pick = torch.cat([(clusters == k).nonzero().squeeze(1)[:per_cluster] for k in range(K)])
    router_acc, errors = None, None
    if experts.router is not None:
        _say("router accuracy against t")
        router_acc = alignment.router_accuracy(
            experts.router, real_states[pick], clusters[pick], cfg.seeds[0]
        )
        _say(f"every expert's velocity error on {len(pick)} held-out images")
        y = labels[pick] if experts.conditional else None
        cases, errs = alignment.expert_errors(experts, real_states[pick], y, ERROR_T, 17)
        errors = {}
        for name in cfg.strategies:
            errors[name] = alignment.selected_vs_not(
                experts.router, experts.features, name, cases, errs, clusters[pick]
            )
            results[name]["accuracy"] = errors[name]

    report = {
        "settings": cfg.model_dump(),
        "store": store.uri,
        "num_experts": K,
        "featnet": {"heldout_accuracy": featnet.heldout_accuracy, "dims": featnet.dims},
        "heldout_images": len(real_images),
        "definitions": DEFINITIONS,
        "strategies": results,
        "router_accuracy_by_t": router_acc,
        "paper": PAPER,
        "seconds": time.perf_counter() - start,
    }
    write_atomic(out / "results.json", json.dumps(report, indent=2, default=float).encode())
    from cluster_jobs.analysis.report import write_report

    write_report(report, out)
    if remote_out:
        dest = open_store(cfg.out)
        for path in sorted(out.iterdir()):
            dest.put_file(path.name, path)
        shutil.rmtree(out)
    _say(f"wrote {cfg.out}/results.json, report.md and plots in {report['seconds']:.0f} s")
    return report


DEFINITIONS = {
    "quality.fid": "Fréchet distance of featnet features, generated vs held-out (torchmetrics)",
    "quality.kid": "kernel inception distance (polynomial-kernel MMD^2) of featnet features",
    "quality.precision": "share of generated samples inside a real sample's k-NN ball (k=5)",
    "quality.recall": "share of real samples inside a generated sample's k-NN ball (k=5)",
    "quality.density": "mean number of real k-NN balls holding a generated sample, / k",
    "quality.coverage": "share of real samples whose k-NN ball holds a generated sample",
    "quality.confidence": "featnet's mean max-softmax on generated samples",
    "quality.fid_inception": "FID over a local TorchScript Inception-v3's pool features "
    "(--inception; the standard FID on RGB data)",
    "quality.kid_inception": "KID over the same Inception features",
    "stability.amplification": "||x_0(x_T + δ) - x_0(x_T)|| / ||δ||, δ of RMS eps per pixel",
    "stability.l_eff": "geometric mean over steps of ||Δx_{i+1}|| / ||Δx_i||",
    "stability.delta_refine": "||x_0^N - x_0^{2N}|| / ||x_0^{2N}||, same noise",
    "stability.flipped_fraction": "share of trajectories whose routing decisions change under δ",
    "alignment.centroid_rate": "share of (sample, step) whose top-weighted expert is the "
    "cluster with the nearest centroid to x̂_0 = x_t - t v",
    "alignment.knn_rate": "the same with the smallest mean distance to the k nearest "
    "training features of each cluster",
    "alignment.router_accuracy_by_t": "router argmax vs true cluster on noised held-out images",
    "accuracy.ratio": "selected experts' mean velocity MSE / non-selected experts' mean MSE on "
    "noised held-out images (router policies: the router's probabilities at (x_t, t); "
    "nearest-centroid: distances of x̂_0 from the experts' mean velocity; uniform: none)",
    "accuracy.oracle_mean": "the true cluster's expert's mean velocity MSE",
    "disagreement.all_mean_degrees": "mean angle between each expert's velocity and the mean "
    "of all experts' velocities, per sample and step",
    "disagreement.selected_mean_degrees": "the same among the selected experts (>= 2)",
    "disagreement.spearman_*": "Spearman correlation of per-sample disagreement with the "
    "final sample's distance to its nearest held-out feature (larger: worse) or featnet "
    "confidence",
}
