"""`ddm analyze`: test the paper's claims on a trained DDM in a store, with intervals.

Every strategy (and the monolith, if asked) samples `n` images per seed through the one
sampler, all under one conditioning (`labels`, `guidance`), and sample i of every strategy
starts from the same x_T and label: strategies are compared PAIRED, with bootstrap
intervals of the differences (intervals.py). Quality is scored against half B of the
held-out images; half A against half B is the real-vs-real floor. For every strategy:
stability on shared x_T (stability.py), non-circular alignment and disagreement from runs
traced with every expert's prediction (alignment.py). Once: every expert's error on noised
held-out images and the router's calibration against t.

Writes DIR/results.json (every figure, its definition, the settings, `paired` intervals,
`claims` with their verdicts), DIR/report.md and PNG plots (report.py).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster_jobs.analysis import alignment, intervals, quality, stability
from cluster_jobs.analysis.config import AnalyzeConfig
from ddm_nodes.checkpoint import check_dataset, has_checkpoint, load_model
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import DDMError
from ddm_nodes.experts import Expert, ExpertSpec
from ddm_nodes.names import MONOLITH_PREFIX, ROUTER_PREFIX
from ddm_nodes.pixels import grid_png
from ddm_nodes.registry import REGISTRY_KEY, load_registry
from ddm_nodes.store import Store, open_store, write_atomic
from router_service.local_experts import LocalExperts
from router_service.policies import RoutingError, get_policy
from router_service.sampler import initial_noise
from router_service.store_models import check_experts_present

MONOLITH = "monolith"
CHUNK = 250  # images per sampling call: bounds memory, not results
ERROR_T = [0.1, 0.3, 0.5, 0.7, 0.9]
BASELINES = ("full", "top-2")  # every other arm is compared with these, paired
QUARTILES = 4
PAPER = {
    "system": "Paris, 8 DiT-B/2 experts, LAION-Art (Roy et al. 2026)",
    "fid": {"monolith": 29.64, "top-1": 30.60, "top-2": 22.60, "full": 47.89},
    "delta_refine": {"top-2": 0.051, "full": 0.020},
}
# Per-sample quality figures, compared as means; the set figures (FID, KID) are recomputed
# on each resample.
SET_METRICS = ("fid", "kid", "fid_inception", "kid_inception")
SAMPLE_METRICS = ("confidence", "chimera", "nearest_distance")


def _say(message: str) -> None:
    print(f"[analyze {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class _Monolith:
    """The monolith as a one-expert backend (and its `models`: no router, no features; the
    DDM's decoder in a latent dataset)."""

    def __init__(self, store, models):
        loaded = load_model(store, MONOLITH_PREFIX, kind="monolith")
        check_dataset(
            store, loaded.checkpoint, models.manifest, "the monolith",
            "retrain it with `ddm submit --monolith --force`",
        )  # fmt: skip
        self.expert = Expert(loaded.model, ExpertSpec(**loaded.training["model"])).eval()
        self.state_shape = models.state_shape
        self.decoder = models.decoder
        self.conditional = self.expert.spec.conditional
        self.router = None
        self.features = None
        self.num_experts = 1

    def predict(self, expert_id, x_t, t, y=None):
        with torch.no_grad():
            return self.expert(x_t, t, y)


@dataclass
class Conditioning:
    """The labels and guidance every analysis uses (cfg.labels, cfg.guidance)."""

    mode: str
    guidance: float
    heldout_labels: torch.Tensor
    num_classes: int

    def labels(self, n: int, seed: int) -> torch.Tensor | None:
        """Labels for n generated samples of a seed (the same for every strategy)."""
        if self.mode == "none":
            return None
        gen = torch.Generator().manual_seed(seed + 31337)
        if self.mode == "uniform":
            return torch.randint(0, self.num_classes, (n,), generator=gen)
        pick = torch.randint(0, len(self.heldout_labels), (n,), generator=gen)
        return self.heldout_labels[pick]  # the held-out class frequencies

    def for_images(self, true: torch.Tensor, seed: int) -> torch.Tensor | None:
        """Labels for held-out images (expert errors): their own under "true"."""
        return true if self.mode == "true" else self.labels(len(true), seed)

    def sample_kw(self, n: int, seed: int) -> dict[str, Any]:
        return {"labels": self.labels(n, seed), "guidance": self.guidance}


@dataclass
class Arm:
    """One strategy's pooled samples over the seeds, row-aligned with every other arm."""

    feats: torch.Tensor
    probs: torch.Tensor
    disagreement: torch.Tensor  # (N,) selected experts' mean deviation, NaN: one expert
    inception: torch.Tensor | None = None
    per_sample: dict[str, torch.Tensor] = field(default_factory=dict)


def _sample_arm(backend, models, policy, cfg, cond, featnet, inception, out, name) -> Arm:
    feats, probs, dis, inc = [], [], [], []
    per_seed_inception = max(1, cfg.inception_n // len(cfg.seeds))
    for seed in cfg.seeds:
        _say(f"{name} seed {seed}: sampling {cfg.n} images, {cfg.steps} steps")
        x_T = initial_noise(cfg.n, models.state_shape, seed)
        y = cond.labels(cfg.n, seed)
        images = []
        for rows in torch.arange(cfg.n).split(CHUNK):
            r = stability.run(
                backend,
                models,
                policy,
                x_T[rows],
                cfg.steps,
                decoder=models.decoder,
                labels=None if y is None else y[rows],
                guidance=cond.guidance,
            )
            images.append(r.images)
            d = r.sample_disagreement
            dis.append(d if d is not None else torch.full((len(rows),), float("nan")))
        images = torch.cat(images)
        f, p = featnet.embed(images)
        feats.append(f)
        probs.append(p)
        if inception is not None:
            inc.append(inception.embed(images[:per_seed_inception]))
        if seed == cfg.seeds[0]:
            write_atomic(out / f"samples-{name}.png", grid_png(images[:64]))
    return Arm(
        torch.cat(feats),
        torch.cat(probs),
        torch.cat(dis).double(),
        torch.cat(inc) if inc else None,
    )


def _halves(clusters: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves of the held-out images, each cluster split in two (seeded)."""
    gen = torch.Generator().manual_seed(seed + 4242)
    a, b = [], []
    for k in clusters.unique().tolist():
        rows = (clusters == k).nonzero().squeeze(1)
        rows = rows[torch.randperm(len(rows), generator=gen)]
        a.append(rows[: len(rows) // 2])
        b.append(rows[len(rows) // 2 :])
    return torch.cat(a), torch.cat(b)


@dataclass
class Scoring:
    """The references, the shared resamples and each arm's bootstrap draws."""

    ref: quality.Reference
    real_feats: torch.Tensor  # half B, for PRDC and nearest distances
    ref_inception: quality.Reference | None
    class_domains: list[str] | None
    resamples: int
    seed: int
    draws: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    points: dict[str, dict[str, float]] = field(default_factory=dict)

    def score(self, name: str, arm: Arm) -> dict[str, Any]:
        n = len(arm.feats)
        counts = quality.counts_of(intervals.resample_indices(n, self.resamples, self.seed), n)
        scorer = quality.Scorer(self.ref, arm.feats)
        arm.per_sample["confidence"] = arm.probs.max(dim=1).values
        arm.per_sample["nearest_distance"] = quality.nearest_real_distance(
            self.real_feats, arm.feats
        )
        if self.class_domains:
            arm.per_sample["chimera"] = quality.chimeras(arm.probs, self.class_domains)
        point = {"fid": float(scorer.fid()[0]), "kid": float(scorer.kid()[0])}
        draws = {"fid": scorer.fid(counts).numpy(), "kid": scorer.kid(counts).numpy()}
        if arm.inception is not None and self.ref_inception is not None:
            m = len(arm.inception)
            inc_counts = quality.counts_of(
                intervals.resample_indices(m, self.resamples, self.seed + 1), m
            )
            inc = quality.Scorer(self.ref_inception, arm.inception)
            point["fid_inception"] = float(inc.fid()[0])
            point["kid_inception"] = float(inc.kid()[0])
            draws["fid_inception"] = inc.fid(inc_counts).numpy()
            draws["kid_inception"] = inc.kid(inc_counts).numpy()
        idx = torch.from_numpy(intervals.resample_indices(n, self.resamples, self.seed))
        for metric, values in arm.per_sample.items():
            point[metric] = float(values.double().mean())
            draws[metric] = values.double()[idx].mean(dim=1).numpy()
        point.update(quality.prdc(self.real_feats, arm.feats))
        self.points[name], self.draws[name] = point, draws
        return {
            metric: {
                **intervals.percentile_interval(point[metric], draws[metric]).as_dict(),
                "mean": point[metric],
            }
            if metric in draws
            else {"mean": point[metric]}
            for metric in point
        }

    def paired(self, a: str, b: str) -> list[dict[str, Any]]:
        out = []
        for metric in (*SET_METRICS, *SAMPLE_METRICS):
            if metric not in self.draws[a] or metric not in self.draws[b]:
                continue
            est = self.points[a][metric] - self.points[b][metric]
            iv = intervals.percentile_interval(est, self.draws[a][metric] - self.draws[b][metric])
            out.append(_pair_row(a, b, metric, iv))
        return out


def _pair_row(a: str, b: str, metric: str, iv: intervals.Interval) -> dict[str, Any]:
    return {
        "pair": f"{a} - {b}",
        "a": a,
        "b": b,
        "metric": metric,
        "mean_difference": iv.estimate,
        "interval": [iv.low, iv.high],
        "resamples": iv.resamples,
    }


def _paired_units(a: str, b: str, metric: str, va, vb, cfg) -> dict[str, Any]:
    """A per-unit figure (trajectory or sample) of two arms on shared x_T, paired."""
    diff = va.double() - vb.double()
    iv = intervals.mean_interval(diff, cfg.resamples, cfg.seeds[0] + 5)
    return _pair_row(a, b, metric, iv)


def _floor(
    scoring: Scoring, half_a: torch.Tensor, inception_a: torch.Tensor | None, cfg
) -> dict[str, Any]:
    """Half A of the held-out images scored against half B, as if it were generated."""
    out = {"images": len(half_a)}
    s = quality.Scorer(scoring.ref, half_a)
    counts = quality.counts_of(
        intervals.resample_indices(len(half_a), cfg.resamples, cfg.seeds[0] + 9), len(half_a)
    )
    for metric, fn in (("fid", s.fid), ("kid", s.kid)):
        out[metric] = intervals.percentile_interval(float(fn()[0]), fn(counts).numpy()).as_dict()
    if inception_a is not None and scoring.ref_inception is not None:
        si = quality.Scorer(scoring.ref_inception, inception_a)
        out["fid_inception"] = float(si.fid()[0])
        out["kid_inception"] = float(si.kid()[0])
        out["inception_images"] = len(inception_a)
    return out


def _by_disagreement(scoring: Scoring, arm: Arm, cfg) -> dict[str, Any] | None:
    """Quality per quartile of the selected experts' disagreement (within one strategy),
    and the interval of FID(Q4) - FID(Q1) from resampling each quartile on its own."""
    d = arm.disagreement
    keep = (~d.isnan()).nonzero().squeeze(1)
    if len(keep) < QUARTILES * 20:
        return None
    order = keep[d[keep].argsort()]
    bins = order.tensor_split(QUARTILES)
    rows, fid_draws = [], []
    for q, rows_q in enumerate(bins):
        s = quality.Scorer(scoring.ref, arm.feats[rows_q])
        m = len(rows_q)
        counts = quality.counts_of(
            intervals.resample_indices(m, cfg.resamples, cfg.seeds[0] + 11 + q), m
        )
        fid_draws.append(s.fid(counts).numpy())
        rows.append(
            {
                "quartile": q + 1,
                "samples": m,
                "disagreement_degrees": [float(d[rows_q].min()), float(d[rows_q].max())],
                "fid": float(s.fid()[0]),
                "kid": float(s.kid()[0]),
                "nearest_distance": float(arm.per_sample["nearest_distance"][rows_q].mean()),
                **(
                    {"chimera": float(arm.per_sample["chimera"][rows_q].mean())}
                    if "chimera" in arm.per_sample
                    else {}
                ),
            }
        )
    gap = rows[-1]["fid"] - rows[0]["fid"]
    iv = intervals.percentile_interval(gap, fid_draws[-1] - fid_draws[0])
    return {"quartiles": rows, "fid_q4_minus_q1": iv.as_dict()}


def preflight(cfg: AnalyzeConfig, store: Store) -> None:
    """Every check that needs only the store's manifests, so that a bad argument fails in a
    second, before any output, and `ddm submit --analyze` fails before a job is submitted.
    (--inception is not checked here: it names a file on the machine the analysis runs on.)"""
    manifest = DatasetManifest.load(store)
    registry = load_registry(store, manifest)
    if not registry.is_default(manifest):
        raise DDMError(
            f"the analysis pairs expert k with cluster k of this store's data, and "
            f"{store.url(REGISTRY_KEY)} lists {', '.join(e.name for e in registry.experts)}: "
            "analyse a store whose DDM is one trained expert per cluster (`ddm experts list`)"
        )
    check_experts_present(store, manifest, registry)
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
    if cfg.labels != "none" and not manifest.class_names:
        raise DDMError(f"--labels {cfg.labels}: the data set has no labels; use --labels none")


def _check_conditional(cfg: AnalyzeConfig, models: Any, what: str) -> None:
    if cfg.labels != "none" and not models.conditional:
        raise DDMError(
            f"--labels {cfg.labels}: the {what} is unconditional (trained without labels); "
            "use --labels none"
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
    _check_conditional(cfg, experts, "DDM's experts")
    K = experts.num_experts
    manifest = experts.manifest
    _say(f"{store.uri}: K={K}, featnet held-out accuracy {featnet.heldout_accuracy}")
    cond = Conditioning(
        cfg.labels, cfg.guidance, torch.tensor([0]), len(manifest.class_names or [])
    )

    real_images, clusters, labels, real_states = alignment.heldout(store, manifest, limit=100_000)
    cond.heldout_labels = labels
    half_a, half_b = _halves(clusters, cfg.seeds[0])
    feats_a, _ = featnet.embed(real_images[half_a])
    feats_b, _ = featnet.embed(real_images[half_b])
    inc_a = inc_b = None
    if inception is not None:
        _say(f"Inception on {2 * min(cfg.inception_n, len(half_b))} held-out images")
        inc_a = inception.embed(real_images[half_a[: cfg.inception_n]])
        inc_b = inception.embed(real_images[half_b[: cfg.inception_n]])
    scoring = Scoring(
        ref=quality.Reference.of(feats_b),
        real_feats=feats_b,
        ref_inception=quality.Reference.of(inc_b) if inc_b is not None else None,
        class_domains=manifest.class_domains,
        resamples=cfg.resamples,
        seed=cfg.seeds[0],
    )
    floor = _floor(scoring, feats_a, inc_a, cfg)
    _say(f"{len(real_images)} held-out images in halves of {len(half_a)} / {len(half_b)}")

    runs: list[tuple[str, Any, Any]] = [(s, experts, experts) for s in cfg.strategies]
    if cfg.include_monolith:
        mono = _Monolith(store, experts)
        _check_conditional(cfg, mono, "monolith")
        runs.append((MONOLITH, mono, mono))

    results: dict[str, Any] = {}
    units: dict[str, dict[str, torch.Tensor]] = {}
    stab_x = initial_noise(cfg.stability_n, experts.state_shape, cfg.seeds[0] + 1000)
    stab_kw = cond.sample_kw(cfg.stability_n, cfg.seeds[0] + 1000)
    trace_x = initial_noise(cfg.alignment_n, experts.state_shape, cfg.seeds[0] + 2000)
    trace_kw = cond.sample_kw(cfg.alignment_n, cfg.seeds[0] + 2000)
    for name, backend, models in runs:
        policy = "uniform" if name == MONOLITH else name
        arm = _sample_arm(backend, models, policy, cfg, cond, featnet, inception, out, name)
        row: dict[str, Any] = {"quality": scoring.score(name, arm)}
        per_seed = []
        for i in range(len(cfg.seeds)):
            rows = slice(i * cfg.n, (i + 1) * cfg.n)
            per_seed.append(quality.fid_kid(feats_b, arm.feats[rows])[0])
        row["quality"]["fid"]["per_seed"] = per_seed
        row["experts_per_step"] = None
        row["by_disagreement"] = _by_disagreement(scoring, arm, cfg)

        _say(f"{name}: stability on {cfg.stability_n} trajectories")
        sens = stability.trajectory_sensitivity(
            backend,
            models,
            policy,
            stab_x,
            cfg.steps,
            cfg.eps,
            cfg.seeds[0],
            cfg.directions,
            **stab_kw,
        )
        refine = stability.delta_refine(
            backend,
            models,
            policy,
            stab_x,
            cfg.refine_steps,
            {cfg.steps: sens["final"]},
            **stab_kw,
        )
        row["stability"] = stability.stability_report(sens, refine)
        units[name] = {"amplification": sens["amplification"]}
        units[name].update({f"delta_refine_{n}": v for n, v in refine.items()})

        if name != MONOLITH:
            _say(f"{name}: alignment and disagreement on {cfg.alignment_n} traced trajectories")
            traced = stability.run(
                experts, experts, policy, trace_x, cfg.steps, trace_all_experts=True, **trace_kw
            )
            row["experts_per_step"] = traced.experts_per_step
            al = alignment.reference_alignment(traced, experts.features)
            dis = alignment.disagreement(traced)
            for f, v in al.pop("per_sample").items():
                units[name][f] = v
            dis_per = dis.pop("per_sample")
            units[name]["all_spread"] = dis_per["all_spread"]
            row["alignment"], row["disagreement"] = al, dis
            row["disagreement"]["spearman_selected_vs_nearest_distance"] = alignment.spearman(
                arm.disagreement, arm.per_sample["nearest_distance"]
            )
        results[name] = row

    paired: list[dict[str, Any]] = []
    names = [n for n, _, _ in runs]
    for b in BASELINES:
        if b not in names:
            continue
        for a in names:
            if a == b or any(p["a"] == b and p["b"] == a for p in paired):
                continue
            paired += scoring.paired(a, b)
            for metric in sorted(set(units[a]) & set(units[b])):
                paired.append(_paired_units(a, b, metric, units[a][metric], units[b][metric], cfg))

    per_cluster = max(1, cfg.accuracy_n // K)
    pick = torch.cat([(clusters == k).nonzero().squeeze(1)[:per_cluster] for k in range(K)])
    calibration = None
    if experts.router is not None:
        _say("router calibration against t")
        calibration = alignment.router_calibration(
            experts.router, real_states[pick], clusters[pick], cfg.seeds[0]
        )
    _say(f"every expert's velocity error on {len(pick)} held-out images")
    y = cond.for_images(labels[pick], cfg.seeds[0] + 3000)
    cases = alignment.expert_predictions(
        experts, real_states[pick], y, ERROR_T, 17, guidance=cond.guidance
    )
    for name in cfg.strategies:
        if get_policy(name).needs == "router" and experts.router is None:
            continue
        acc = alignment.expert_accuracy(
            experts.router, experts.features, name, cases, clusters[pick]
        )
        acc["intervals"] = {
            k: intervals.mean_interval(v, cfg.resamples, cfg.seeds[0] + 13).as_dict()
            for k, v in acc.pop("units").items()
        }
        results[name]["accuracy"] = acc

    report = {
        "settings": cfg.model_dump(),
        "conditioning": {
            "labels": cfg.labels,
            "guidance": cfg.guidance,
            "where": "sampling, stability, alignment and expert errors alike",
        },
        "store": store.uri,
        "num_experts": K,
        "class_domains": sorted(set(manifest.class_domains)) if manifest.class_domains else None,
        "featnet": {"heldout_accuracy": featnet.heldout_accuracy, "dims": featnet.dims},
        "heldout_images": len(real_images),
        "reference": {"images": len(half_b), "half": "B"},
        "floor": floor,
        "definitions": DEFINITIONS,
        "strategies": results,
        "paired": paired,
        "router_calibration_by_t": calibration,
        "paper": PAPER,
        "seconds": time.perf_counter() - start,
    }
    from cluster_jobs.analysis.report import claims, write_report

    report["claims"] = claims(report)
    write_atomic(out / "results.json", json.dumps(report, indent=2, default=float).encode())
    write_report(report, out)
    if remote_out:
        dest = open_store(cfg.out)
        for path in sorted(out.iterdir()):
            dest.put_file(path.name, path)
        shutil.rmtree(out)
    _say(f"wrote {cfg.out}/results.json, report.md and plots in {report['seconds']:.0f} s")
    return report


DEFINITIONS = {
    "quality.fid": "Fréchet distance of featnet features, generated (all seeds pooled) vs "
    "held-out half B; matches torchmetrics' FID (tested)",
    "quality.kid": "unbiased polynomial-kernel MMD^2 over the whole sets (the mean over "
    "every subset); resamples use pairs of distinct rows only",
    "quality.precision": "share of generated samples inside a real sample's k-NN ball (k=5)",
    "quality.recall": "share of real samples inside a generated sample's k-NN ball (k=5)",
    "quality.density": "mean number of real k-NN balls holding a generated sample, / k",
    "quality.coverage": "share of real samples whose k-NN ball holds a generated sample",
    "quality.confidence": "featnet's mean max-softmax on generated samples",
    "quality.chimera": f"share of samples whose featnet probability of the likeliest domain "
    f"(dataset.json's class_domains) is below {quality.CHIMERA_BELOW}",
    "quality.nearest_distance": "mean featnet distance of a sample to its nearest held-out "
    "image (larger: worse)",
    "quality.fid_inception": "FID over Inception-v3 pool features (--inception) on the first "
    "inception_n samples (spread over the seeds) and inception_n held-out images",
    "quality.kid_inception": "KID over the same Inception features",
    "floor": "held-out half A scored against half B as if generated: what a perfect "
    "generator of that many samples gets (FID's bias depends on the sample count)",
    "paired": "a - b on shared x_T and labels, bootstrap percentile 95% interval over "
    "resampled rows (the same rows in both arms)",
    "by_disagreement": "one strategy's samples in quartiles of their selected experts' mean "
    "angular deviation over the run; FID per quartile against half B",
    "stability.amplification": "mean over random directions δ_j (RMS eps per value) of "
    "||x_0(x_T + δ_j) - x_0(x_T)|| / ||δ_j||: finite-difference Jacobian-vector growth",
    "stability.amplification_worst": "its largest direction per trajectory",
    "stability.delta_refine": "{N: ||x_0^N - x_0^{2N}|| / ||x_0^{2N}||}, same noise",
    "stability.flipped_fraction": "share of trajectories whose routing decisions change "
    "under some δ_j",
    "alignment.*": "from x̂_0 of the UNIFORM mean of all experts' predictions (independent "
    "of the strategy's choice), distances to the centroids in the store's feature space: "
    "selected_rank (chance (K+1)/2), weighted_rank, distance_gap (selected - others), "
    "misalignment (sum_k w_k d_k - min_k d_k), per t bucket",
    "accuracy.by_t": "per t: selected / non-selected / weighted / merged / random-k / "
    "oracle experts' velocity MSE on noised held-out images, selection from dense weights",
    "accuracy.intervals": "per (image, t): selected - non_selected and selected - "
    "random_k, mean with bootstrap interval",
    "router_calibration_by_t": "router argmax accuracy, ECE (10 bins) and mean entropy on "
    "held-out images noised to t",
    "disagreement.*_degrees": "mean angle between experts' velocities and their mean, among "
    "all / the selected experts, per sample and step",
    "disagreement.*_spread": "RMS per value of the experts' x̂_0 about their mean, among all "
    "/ the selected",
}
