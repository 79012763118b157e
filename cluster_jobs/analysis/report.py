"""report.md and the PNG plots of `ddm analyze`, from its results.json content.

Every sentence that states what our data shows is computed from the figures, never typed
in: which strategy has the best FID, whether sparse Top-2 beats the full ensemble, whether
the full ensemble is the most stable, and how stability and alignment rank-correlate with
FID across strategies.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cluster_jobs.analysis.alignment import BUCKETS, spearman
from ddm_nodes.store import write_atomic

PLOTS = {
    "fid": "fid.png",
    "dissociation": "stability_vs_quality.png",
    "alignment": "alignment_by_step.png",
    "errors": "expert_error.png",
    "disagreement": "disagreement_vs_quality.png",
}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _get(row: dict, *path: str) -> Any:
    for p in path:
        if not isinstance(row, dict) or p not in row:
            return None
        row = row[p]
    return row


def _rank_corr(rows: dict[str, dict], a: tuple[str, ...], b: tuple[str, ...]) -> float | None:
    import torch

    pairs = [(_get(r, *a), _get(r, *b)) for r in rows.values()]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    if len(pairs) < 3:
        return None
    xs, ys = zip(*pairs, strict=True)
    return spearman(torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64))


def _stability_verdict(rho: float | None) -> str:
    """ρ(L_eff, FID): lower L_eff is more stable and lower FID better, so ρ > 0 means the
    stable strategies are the good ones, and ρ < 0 that stability is bought with quality
    (the paper: the full ensemble is the most stable and the worst)."""
    if rho is None or abs(rho) < 0.5:
        return "stability does not predict quality here, as the paper found."
    if rho > 0:
        return "here the more stable strategies are the better ones, unlike the paper."
    return (
        "here the more stable strategies are the worse ones: stability does not buy "
        "quality, the paper's dissociation."
    )


def findings(report: dict[str, Any]) -> list[str]:
    rows = report["strategies"]
    fid = {k: _get(r, "quality", "fid", "mean") for k, r in rows.items()}
    out = []
    best = min(fid, key=fid.get)
    out.append(
        f"**Quality.** The best FID is {best} ({fid[best]:.3g}); "
        + ", ".join(f"{k} {v:.3g}" for k, v in sorted(fid.items(), key=lambda kv: kv[1]))
        + "."
    )
    if "top-2" in fid and "full" in fid:
        spread = max(
            _get(rows["top-2"], "quality", "fid", "std") or 0,
            _get(rows["full"], "quality", "fid", "std") or 0,
        )
        gap = fid["full"] - fid["top-2"]
        if abs(gap) <= 2 * spread:
            verdict = "Top-2 and the full ensemble are indistinguishable within seed noise"
        elif gap > 0:
            verdict = "Top-2 beats the full ensemble, as in the paper (22.60 vs 47.89)"
        else:
            verdict = "the full ensemble beats Top-2, unlike the paper (22.60 vs 47.89)"
        out.append(
            f"**Sparse vs full.** {verdict}: Top-2 {fid['top-2']:.3g} vs full {fid['full']:.3g} "
            f"(difference {abs(gap):.3g}; largest std over seeds {spread:.3g})."
        )
    lip = {k: _get(r, "stability", "l_eff", "median") for k, r in rows.items()}
    lip = {k: v for k, v in lip.items() if v is not None}
    refine = {k: _get(r, "stability", "delta_refine", "median") for k, r in rows.items()}
    if lip:
        stable = min(lip, key=lip.get)
        rho = _rank_corr(rows, ("stability", "l_eff", "median"), ("quality", "fid", "mean"))
        out.append(
            f"**Stability.** The most stable strategy by median L_eff is {stable} "
            f"({lip[stable]:.4g}); by median Δ_refine "
            f"{min(refine, key=lambda k: refine[k] or math.inf)}. Spearman ρ(L_eff, FID) "
            f"across strategies = {_fmt(rho)}: {_stability_verdict(rho)}"
        )
        flips = {k: _get(r, "stability", "flipped_fraction") for k, r in rows.items()}
        out.append(
            "**Flips.** Share of trajectories whose routing changed under δ: "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in flips.items() if v is not None)
            + "; a sparse strategy's mean amplification with and without a flip: "
            + ", ".join(
                f"{k} {_fmt(_get(r, 'stability', 'amplification_mean_flipped'))} / "
                f"{_fmt(_get(r, 'stability', 'amplification_mean_unflipped'))}"
                for k, r in rows.items()
                if k.startswith("top-")
            )
            + "."
        )
    rho_a = _rank_corr(rows, ("alignment", "centroid_rate"), ("quality", "fid", "mean"))
    if rho_a is not None:
        if rho_a <= -0.5:
            verdict = "better-aligned routing goes with lower FID, the paper's claim"
        elif rho_a >= 0.5:
            verdict = "better-aligned routing goes with higher FID here, against the paper's claim"
        else:
            verdict = "no clear relation here"
        out.append(
            f"**Alignment (i).** Spearman ρ(centroid alignment rate, FID) across strategies "
            f"= {_fmt(rho_a)}: {verdict}."
        )
    ratios = {k: _get(r, "accuracy", "ratio") for k, r in rows.items()}
    ratios = {k: v for k, v in ratios.items() if v is not None}
    if ratios:
        out.append(
            "**Per-expert accuracy (ii).** Selected / non-selected velocity error: "
            + ", ".join(f"{k} {v:.3g}" for k, v in ratios.items())
            + (
                "; the selected experts predict better (ratio < 1)."
                if all(v < 1 for v in ratios.values())
                else "; the selected experts are not always the more accurate ones."
            )
        )
    dis = {k: _get(r, "disagreement", "spearman_all_vs_nearest_distance") for k, r in rows.items()}
    dis = {k: v for k, v in dis.items() if v is not None}
    if dis:
        out.append(
            "**Disagreement (iii).** Spearman ρ(per-sample disagreement among all experts, "
            "distance to the nearest held-out sample) per strategy: "
            + ", ".join(f"{k} {v:.2f}" for k, v in dis.items())
            + " (positive: samples where experts disagree end up farther from real data)."
        )
    return out


def _table(report: dict[str, Any]) -> str:
    cols = [
        ("FID", ("quality", "fid", "mean")),
        ("± (seeds)", ("quality", "fid", "std")),
        ("KID", ("quality", "kid", "mean")),
        ("precision", ("quality", "precision", "mean")),
        ("recall", ("quality", "recall", "mean")),
        ("L_eff (median)", ("stability", "l_eff", "median")),
        ("Δ_refine (median)", ("stability", "delta_refine", "median")),
        ("flipped", ("stability", "flipped_fraction")),
        ("experts/step", ("experts_per_step",)),
        ("alignment", ("alignment", "centroid_rate")),
        ("sel/non-sel error", ("accuracy", "ratio")),
        ("disagreement (°)", ("disagreement", "all_mean_degrees")),
    ]
    if report["settings"].get("inception"):
        cols[2:2] = [("FID (Inception)", ("quality", "fid_inception", "mean"))]
    paper = report["paper"]["fid"]
    lines = [
        "| strategy | " + " | ".join(c for c, _ in cols) + " | paper FID |",
        "| --- " * (len(cols) + 2) + "|",
    ]
    for name, row in report["strategies"].items():
        cells = [_fmt(_get(row, *path)) for _, path in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(paper.get(name))} |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> None:
    plots = _plots(report, out)
    s = report["settings"]
    router = report.get("router_accuracy_by_t") or {}
    text = [
        "# DDM analysis",
        "",
        f"Store `{report['store']}`, K = {report['num_experts']} experts; {s['n']} images per "
        f"strategy and seed, seeds {s['seeds']}, {s['steps']} Euler steps; quality against "
        f"{report['heldout_images']} held-out images in the feature network's space "
        f"(held-out accuracy {_fmt(report['featnet']['heldout_accuracy'])}). "
        f"{'Quick mode: small n, for CI; not for conclusions. ' if s['quick'] else ''}"
        f"Stability on {s['stability_n']} trajectories (δ RMS {s['eps']}), alignment on "
        f"{s['alignment_n']}, disagreement on {s['disagreement_n']}, expert errors on "
        f"{s['accuracy_n']} held-out images. {report['seconds']:.0f} s.",
        "",
        _table(report),
        "",
        f"Paper ({report['paper']['system']}): FID "
        + ", ".join(f"{k} {v}" for k, v in report["paper"]["fid"].items())
        + "; Δ_refine "
        + ", ".join(f"{k} {v}" for k, v in report["paper"]["delta_refine"].items())
        + ".",
        "",
        "## What our data shows",
        "",
        *[f"- {line}" for line in findings(report)],
        "",
        "Router accuracy against t (held-out images noised to t): "
        + (", ".join(f"t={t} {_fmt(a)}" for t, a in router.items()) or "no router")
        + ".",
        "",
        "## Plots",
        "",
        *[f"![{name}]({file})" for name, file in plots.items()],
        "",
        "## Definitions",
        "",
        *[f"- `{k}`: {v}" for k, v in report["definitions"].items()],
        "",
    ]
    write_atomic(out / "report.md", "\n".join(text).encode())


def _plots(report: dict[str, Any], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["strategies"]
    names = list(rows)
    made = {}

    def save(fig, key: str) -> None:
        fig.tight_layout()
        fig.savefig(out / PLOTS[key], dpi=110)
        plt.close(fig)
        made[key] = PLOTS[key]

    fig, ax = plt.subplots(figsize=(6, 3.5))
    fid = [_get(rows[n], "quality", "fid", "mean") for n in names]
    err = [_get(rows[n], "quality", "fid", "std") or 0 for n in names]
    ax.bar(names, fid, yerr=err, color="tab:blue")
    ax.set_ylabel("FID (featnet)")
    ax.set_title("FID per strategy (± std over seeds)")
    ax.tick_params(axis="x", rotation=30)
    save(fig, "fid")

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, key, label in [
        (axes[0], "l_eff", "median L_eff"),
        (axes[1], "delta_refine", "median Δ_refine"),
    ]:
        for n in names:
            x, y = (
                _get(rows[n], "stability", key, "median"),
                _get(rows[n], "quality", "fid", "mean"),
            )
            if x is not None:
                ax.scatter(x, y)
                ax.annotate(n, (x, y), fontsize=8)
        ax.set_xlabel(label + " (lower: more stable)")
        ax.set_ylabel("FID")
    fig.suptitle("stability vs quality (the dissociation)")
    save(fig, "dissociation")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n in names:
        rates = _get(rows[n], "alignment", "centroid_rate_by_bucket")
        if rates:
            ax.plot(BUCKETS, [rates.get(b) for b in BUCKETS], marker="o", label=n)
    ax.set_xlabel("t bucket (1: noise, 0: data)")
    ax.set_ylabel("selected = nearest cluster")
    ax.set_title("expert-data alignment per step")
    ax.legend(fontsize=7)
    save(fig, "alignment")

    with_acc = [n for n in names if _get(rows[n], "accuracy", "selected_mean") is not None]
    if with_acc:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = range(len(with_acc))
        sel = [_get(rows[n], "accuracy", "selected_mean") for n in with_acc]
        non = [_get(rows[n], "accuracy", "non_selected_mean") or 0 for n in with_acc]
        ax.bar([x - 0.2 for x in xs], sel, width=0.4, label="selected")
        ax.bar([x + 0.2 for x in xs], non, width=0.4, label="non-selected")
        oracle = _get(rows[with_acc[0]], "accuracy", "oracle_mean")
        ax.axhline(oracle, color="k", linestyle="--", label="oracle expert")
        ax.set_xticks(list(xs), with_acc, rotation=30)
        ax.set_ylabel("velocity MSE")
        ax.set_title("selected vs non-selected experts' error")
        ax.legend(fontsize=7)
        save(fig, "errors")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n in names:
        d = _get(rows[n], "disagreement", "all_mean_degrees")
        if d is not None:
            ax.scatter(d, _get(rows[n], "quality", "fid", "mean"))
            ax.annotate(n, (d, _get(rows[n], "quality", "fid", "mean")), fontsize=8)
    ax.set_xlabel("mean disagreement among all experts (degrees)")
    ax.set_ylabel("FID")
    ax.set_title("disagreement vs quality")
    save(fig, "disagreement")
    for n in names:
        if (out / f"samples-{n}.png").exists():
            made[f"samples {n}"] = f"samples-{n}.png"
    return made
