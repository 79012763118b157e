"""report.md, the claims and the PNG plots of `ddm analyze`, from its results.json content.

Every sentence that states what our data shows is computed from a paired interval, never
typed in, and says "agrees with the paper", "contradicts the paper" or "inconclusive" by
the same rule (intervals.verdict). Rank correlations across a handful of strategies are
printed as description, labelled so, never as a finding.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cluster_jobs.analysis.alignment import BUCKETS, spearman
from cluster_jobs.analysis.intervals import VERDICT_WORDS, Interval, verdict
from ddm_nodes.store import write_atomic

PLOTS = {
    "fid": "fid.png",
    "paired": "paired_differences.png",
    "alignment": "alignment_by_step.png",
    "errors": "expert_error.png",
    "disagreement": "quality_by_disagreement.png",
    "calibration": "router_calibration.png",
}
# Why the stability claims use the mean: sparse routing's instability lives in the tail
# (the trajectories whose top-k choice flips); a median hides exactly that.
STABILITY_STATISTIC = (
    "the mean over trajectories, because sparse routing's instability lives in the few "
    "trajectories whose choice flips, which a median hides"
)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _get(row: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(row, dict) or p not in row:
            return None
        row = row[p]
    return row


def _pair(report: dict[str, Any], a: str, b: str, metric: str) -> dict[str, Any] | None:
    for p in report.get("paired", []):
        if p["metric"] == metric and {p["a"], p["b"]} == {a, b}:
            if p["a"] == a:
                return p
            low, high = p["interval"]  # stored the other way round: negate
            return {
                **p,
                "a": a,
                "b": b,
                "pair": f"{a} - {b}",
                "mean_difference": -p["mean_difference"],
                "interval": [-high, -low],
            }
    return None


def _claim(
    text: str, row: dict[str, Any] | None, side: str, statistic: str, what: str
) -> dict[str, Any] | None:
    if row is None:
        return None
    iv = Interval(
        row["mean_difference"], row["interval"][0], row["interval"][1], row.get("resamples", 0)
    )
    return {
        "claim": text,
        "measure": what,
        "pair": row["pair"],
        "metric": row["metric"],
        "paper_side": side,
        "statistic": statistic,
        "difference": iv.estimate,
        "interval": [iv.low, iv.high],
        "verdict": verdict(iv, side),  # type: ignore[arg-type]
    }


def claims(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's claims tested on this run's intervals (see the module docstring)."""
    rows = report["strategies"]
    out: list[dict[str, Any] | None] = []
    for metric in ("fid", "kid", "fid_inception", "kid_inception"):
        out.append(
            _claim(
                "Top-2 has better quality than the full ensemble",
                _pair(report, "top-2", "full", metric),
                "lower",
                "set statistic on all samples",
                metric,
            )
        )
        out.append(
            _claim(
                "Top-2 has better quality than the monolith",
                _pair(report, "top-2", "monolith", metric),
                "lower",
                "set statistic on all samples",
                metric,
            )
        )
    out.append(
        _claim(
            "the full ensemble is more stable than Top-2 (sensitivity)",
            _pair(report, "top-2", "full", "amplification"),
            "higher",
            STABILITY_STATISTIC,
            "amplification",
        )
    )
    refine = _get(rows.get("full", {}), "stability", "delta_refine") or {}
    for n in refine:
        out.append(
            _claim(
                f"the full ensemble is more stable than Top-2 (Δ_refine, N={n})",
                _pair(report, "top-2", "full", f"delta_refine_{n}"),
                "higher",
                STABILITY_STATISTIC,
                f"delta_refine_{n}",
            )
        )
    out.append(
        _claim(
            "Top-2 routes to better-aligned experts than the full ensemble",
            _pair(report, "top-2", "full", "misalignment"),
            "lower",
            "mean over traced trajectories",
            "misalignment",
        )
    )
    for name, row in rows.items():
        iv = _get(row, "accuracy", "intervals", "selected_minus_non_selected")
        if iv and iv["resamples"]:
            out.append(
                _claim(
                    f"{name}: the selected experts are more accurate than the others",
                    {
                        "pair": f"{name}: selected - non-selected",
                        "metric": "velocity MSE",
                        "mean_difference": iv["estimate"],
                        "interval": [iv["low"], iv["high"]],
                        "resamples": iv["resamples"],
                    },
                    "lower",
                    "mean over (held-out image, t)",
                    "accuracy",
                )
            )
        q = _get(row, "by_disagreement", "fid_q4_minus_q1")
        if q and q["resamples"]:
            out.append(
                _claim(
                    f"{name}: samples whose experts disagree more have worse quality",
                    {
                        "pair": f"{name}: Q4 - Q1 of disagreement",
                        "metric": "fid",
                        "mean_difference": q["estimate"],
                        "interval": [q["low"], q["high"]],
                        "resamples": q["resamples"],
                    },
                    "higher",
                    "FID per quartile (not paired: different samples)",
                    "disagreement",
                )
            )
    return [c for c in out if c is not None]


def _sentence(c: dict[str, Any]) -> str:
    low, high = c["interval"]
    return (
        f"{c['claim']}: {c['pair']} {c['metric']} = {_fmt(c['difference'])} "
        f"[{_fmt(low)}, {_fmt(high)}] {VERDICT_WORDS[c['verdict']]}."
    )


def dissociation(found: list[dict[str, Any]]) -> str:
    """The paper's headline in one sentence: Top-2 better AND full more stable."""

    def first(measure: str) -> str | None:
        for c in found:
            if c["measure"] == measure and c["pair"] == "top-2 - full":
                return c["verdict"]
        return None

    q, s = first("fid_inception") or first("fid"), first("amplification")
    if q is None or s is None:
        return "The dissociation was not tested (it needs both full and top-2)."
    if q == "agrees" and s == "agrees":
        return (
            "The dissociation is reproduced: Top-2 has the better quality and the full "
            "ensemble is the more stable, both with intervals clear of zero."
        )
    return (
        f"The dissociation is not reproduced: quality {VERDICT_WORDS[q]}, stability "
        f"{VERDICT_WORDS[s]}."
    )


def description(report: dict[str, Any]) -> str | None:
    """Rank correlations across strategies: a description of this handful, not a finding."""
    import torch

    rows = report["strategies"]
    pairs = [
        (
            _get(r, "alignment", "misalignment"),
            _get(r, "quality", "fid", "mean"),
            _get(r, "stability", "amplification", "mean"),
        )
        for r in rows.values()
    ]
    pairs = [p for p in pairs if None not in p]
    if len(pairs) < 3:
        return None
    mis, fid, amp = (torch.tensor(v, dtype=torch.float64) for v in zip(*pairs, strict=True))
    return (
        f"Description only, not a finding ({len(pairs)} strategies; at n=4 even |ρ|=1 "
        f"has p≈0.08): Spearman ρ(misalignment, FID) = {_fmt(spearman(mis, fid))}, "
        f"ρ(amplification, FID) = {_fmt(spearman(amp, fid))}."
    )


def _table(report: dict[str, Any]) -> str:
    n = (report["settings"]["refine_steps"] or [None])[-1]
    cols = [
        ("FID", ("quality", "fid", "mean")),
        ("95% interval", ("quality", "fid")),
        ("KID", ("quality", "kid", "mean")),
        ("FID (Inception)", ("quality", "fid_inception", "mean")),
        ("chimera", ("quality", "chimera", "mean")),
        ("precision", ("quality", "precision", "mean")),
        ("recall", ("quality", "recall", "mean")),
        ("amplification mean / median / p90", ("stability", "amplification")),
        (f"Δ_refine N={n} mean", ("stability", "delta_refine", str(n), "mean")),
        ("flipped", ("stability", "flipped_fraction")),
        ("experts/step", ("experts_per_step",)),
        ("selected rank", ("alignment", "selected_rank")),
        ("misalignment", ("alignment", "misalignment")),
        ("disagreement (°)", ("disagreement", "all_degrees")),
        ("x̂_0 spread", ("disagreement", "all_spread")),
    ]
    if not report["settings"].get("inception"):
        cols = [c for c in cols if "Inception" not in c[0]]
    if not report.get("class_domains"):
        cols = [c for c in cols if c[0] != "chimera"]
    paper = report["paper"]["fid"]
    lines = [
        "| strategy | " + " | ".join(c for c, _ in cols) + " | paper FID |",
        "| --- " * (len(cols) + 2) + "|",
    ]
    for name, row in report["strategies"].items():
        cells = []
        for label, path in cols:
            v = _get(row, *path)
            if label == "95% interval":
                v = f"[{_fmt(_get(v, 'low'))}, {_fmt(_get(v, 'high'))}]" if v else "-"
            elif isinstance(v, dict):
                v = " / ".join(_fmt(v.get(k)) for k in ("mean", "median", "p90"))
            cells.append(_fmt(v))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(paper.get(name))} |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> None:
    plots = _plots(report, out)
    s = report["settings"]
    floor = report["floor"]
    found = report.get("claims") or claims(report)
    calib = report.get("router_calibration_by_t") or {}
    desc = description(report)
    text = [
        "# DDM analysis",
        "",
        f"Store `{report['store']}`, K = {report['num_experts']} experts; {s['n']} images per "
        f"strategy and seed, seeds {s['seeds']} (sample i of every strategy starts from the "
        f"same x_T), {s['steps']} Euler steps; conditioning: labels {s['labels']}, guidance "
        f"{s['guidance']}, in every analysis. Quality against held-out half B "
        f"({report['reference']['images']} images) in the feature network's space (held-out "
        f"accuracy {_fmt(report['featnet']['heldout_accuracy'])}); real-vs-real floor (half A, "
        f"{floor['images']} images): FID {_fmt(floor['fid']['estimate'])}, KID "
        f"{_fmt(floor['kid']['estimate'])}"
        + (
            f", Inception FID {_fmt(floor.get('fid_inception'))} on "
            f"{floor.get('inception_images')} images"
            if "fid_inception" in floor
            else ""
        )
        + f". {'Quick mode: small n, for CI; not for conclusions. ' if s['quick'] else ''}"
        f"Stability on {s['stability_n']} trajectories ({s['directions']} directions, δ RMS "
        f"{s['eps']}), alignment and disagreement on {s['alignment_n']}, expert errors on "
        f"{s['accuracy_n']} held-out images; {s['resamples']} bootstrap resamples. "
        f"{report['seconds']:.0f} s.",
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
        "Each line is a paired difference with its bootstrap 95% interval; the verdict says "
        "whether the whole interval lies on the paper's side of zero.",
        "",
        f"- {dissociation(found)}",
        *[f"- {_sentence(c)}" for c in found],
        *([f"- {desc}"] if desc else []),
        "",
        "Router against t (held-out images noised to t): "
        + (
            ", ".join(
                f"t={t} accuracy {_fmt(c['accuracy'])} ECE {_fmt(c['ece'])} entropy "
                f"{_fmt(c['entropy'])}"
                for t, c in calib.items()
            )
            or "no router"
        )
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

    fig, ax = plt.subplots(figsize=(7, 3.5))
    fid = [_get(rows[n], "quality", "fid", "mean") for n in names]
    low = [
        f - (_get(rows[n], "quality", "fid", "low") or f) for n, f in zip(names, fid, strict=True)
    ]
    high = [
        (_get(rows[n], "quality", "fid", "high") or f) - f for n, f in zip(names, fid, strict=True)
    ]
    ax.bar(names, fid, yerr=[low, high], color="tab:blue")
    ax.axhline(report["floor"]["fid"]["estimate"], color="k", ls="--", label="real-vs-real")
    ax.set_ylabel("FID (featnet)")
    ax.set_title("FID per strategy (bootstrap 95% interval)")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=7)
    save(fig, "fid")

    vs_full = [p for p in report.get("paired", []) if p["b"] == "full"]
    if vs_full:
        fig, ax = plt.subplots(figsize=(7, 0.25 * len(vs_full) + 1.5))
        for i, p in enumerate(vs_full):
            lo, hi = p["interval"]
            scale = max(abs(lo), abs(hi), 1e-12)
            ax.plot([lo / scale, hi / scale], [i, i], color="tab:blue")
            ax.plot(p["mean_difference"] / scale, i, "o", color="tab:blue")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(
            range(len(vs_full)), [f"{p['a']}: {p['metric']}" for p in vs_full], fontsize=6
        )
        ax.set_xlabel("a - full, scaled by the interval's largest end")
        ax.set_title("paired differences against the full ensemble (95%)")
        save(fig, "paired")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n in names:
        mis = _get(rows[n], "alignment", "misalignment_by_bucket")
        if mis:
            ax.plot(BUCKETS, [mis.get(b) for b in BUCKETS], marker="o", label=n)
    ax.set_xlabel("t bucket (1: noise, 0: data)")
    ax.set_ylabel("Σ w d − min d")
    ax.set_title("misalignment per step (x̂_0 of the uniform mean)")
    ax.legend(fontsize=7)
    save(fig, "alignment")

    with_acc = [n for n in names if _get(rows[n], "accuracy", "by_t")]
    if with_acc:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for n in with_acc:
            by_t = rows[n]["accuracy"]["by_t"]
            ts = [t for t in by_t if by_t[t]["ratio"] is not None]
            if ts:
                ax.plot([float(t) for t in ts], [by_t[t]["ratio"] for t in ts], marker="o", label=n)
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xlabel("t")
        ax.set_ylabel("selected / non-selected MSE")
        ax.set_title("per-expert accuracy per t")
        ax.legend(fontsize=7)
        save(fig, "errors")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n in names:
        q = _get(rows[n], "by_disagreement", "quartiles")
        if q:
            ax.plot([r["quartile"] for r in q], [r["fid"] for r in q], marker="o", label=n)
    ax.set_xlabel("quartile of the selected experts' disagreement (4: most)")
    ax.set_ylabel("FID of the quartile")
    ax.set_title("quality by disagreement")
    ax.legend(fontsize=7)
    save(fig, "disagreement")

    calib = report.get("router_calibration_by_t")
    if calib:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ts = [float(t) for t in calib]
        for key in ("accuracy", "ece", "entropy"):
            ax.plot(ts, [c[key] for c in calib.values()], marker="o", label=key)
        ax.set_xlabel("t")
        ax.set_title("router calibration against t")
        ax.legend(fontsize=7)
        save(fig, "calibration")
    for n in names:
        if (out / f"samples-{n}.png").exists():
            made[f"samples {n}"] = f"samples-{n}.png"
    return made
