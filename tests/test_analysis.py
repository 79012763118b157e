"""The analysis toolkit on cases with known answers, then `ddm analyze --quick` end to end
on a tiny real store (with a feature network trained on it)."""

from __future__ import annotations

import json
import math
import shlex
from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny_ddm, run_ddm_in_process

from cluster_jobs.analysis import alignment, quality, stability
from cluster_jobs.training.config import TrainConfig
from cluster_jobs.training.worker import train_local
from router_service.sampler import sample, time_grid

# --- quality: FID, KID, precision / recall / density / coverage ---------------------------


def _gauss(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).double() + shift


def test_fid_and_kid_of_a_set_against_itself_are_zero_and_grow_with_a_shift():
    real = _gauss(600, 16, 0)
    fid_self, kid_self = quality.fid_kid(real, real.clone())
    fid_near, kid_near = quality.fid_kid(real, _gauss(600, 16, 1, shift=0.5))
    fid_far, kid_far = quality.fid_kid(real, _gauss(600, 16, 1, shift=2.0))
    assert abs(fid_self) < 1e-6
    # a mean shift s in every one of 16 dims adds 16 s^2 to the FID
    assert fid_near == pytest.approx(16 * 0.25, rel=0.35)
    assert fid_far == pytest.approx(16 * 4.0, rel=0.1)
    # KID is unbiased over random subsets: about 0 for a set against itself
    assert abs(kid_self) < kid_near / 5 < kid_far / 5


def test_precision_recall_density_coverage_on_identical_and_disjoint_sets():
    real = _gauss(300, 8, 0)
    same = quality.prdc(real, real.clone())
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    assert same["density"] >= 1.0  # each point lies in its own ball and k-1 others at least
    far = quality.prdc(real, _gauss(300, 8, 1, shift=100.0))
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_nearest_real_distance_is_the_distance_to_the_closest_row():
    real = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    fake = torch.tensor([[1.0, 0.0], [10.0, 3.0]], dtype=torch.float64)
    assert quality.nearest_real_distance(real, fake).tolist() == [1.0, 3.0]


# --- stability: a linear field has a known amplification --------------------------------


class _LinearField:
    """v(x, t) = a x for every expert: Euler multiplies x by (1 - a/S) per step."""

    num_experts = 1

    def __init__(self, a: float):
        self.a = a

    def predict(self, k, x_t, t, y=None):
        return self.a * x_t


_NO_ROUTER = SimpleNamespace(router=None, features=None)


@pytest.mark.parametrize("a", [0.5, -0.8])
def test_trajectory_sensitivity_of_a_linear_field(a):
    steps = 10
    x_T = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sens = stability.trajectory_sensitivity(
        _LinearField(a), _NO_ROUTER, "uniform", x_T, steps, eps=1e-3, seed=0
    )
    factor = abs(1 - a / steps)
    # float32 states: the difference of two trajectories 1e-3 apart keeps ~4 digits
    close = dict(rtol=1e-3, atol=0.0)
    expected = torch.full((5,), factor**steps, dtype=torch.float64)
    torch.testing.assert_close(sens["amplification"], expected, **close)
    torch.testing.assert_close(sens["l_eff"], torch.full((5,), factor).double(), **close)
    assert not sens["flipped"].any()


def test_delta_refine_of_a_linear_field():
    a, steps = 0.7, 8
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    refine = stability.delta_refine(_LinearField(a), _NO_ROUTER, "uniform", x_T, steps)
    coarse, fine = (1 - a / steps) ** steps, (1 - a / (2 * steps)) ** (2 * steps)
    expected = abs(coarse - fine) / abs(fine)
    torch.testing.assert_close(refine, torch.full((3,), expected, dtype=torch.float64))


def test_summary_and_flips_are_reported():
    sens = {
        "amplification": torch.tensor([1.0, 2.0, 3.0, 10.0]),
        "l_eff": torch.tensor([1.0, 1.0, 1.0, 1.0]),
        "flipped": torch.tensor([False, False, False, True]),
    }
    r = stability.stability_report(sens, torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert r["amplification"]["median"] == 2.5 and r["amplification"]["mean"] == 4.0
    assert r["flipped_fraction"] == 0.25
    assert r["amplification_mean_flipped"] == 10.0 and r["amplification_mean_unflipped"] == 2.0


# --- alignment: identical experts, exact experts, rank correlation ----------------------


class _Same:
    """K experts that all answer the same velocity."""

    def __init__(self, K: int):
        self.num_experts = K

    def predict(self, k, x_t, t, y=None):
        return torch.sin(x_t) + t.reshape(-1, 1, 1, 1)


def test_identical_experts_have_zero_disagreement_and_equal_errors():
    experts = _Same(3)
    run = sample(
        experts, None, "uniform", torch.randn(4, 1, 4, 4), time_grid(3), trace_all_experts=True
    )
    d = alignment.disagreement(run)
    assert d["all_mean"] == pytest.approx(0.0, abs=1e-5)
    assert d["selected_mean"] == pytest.approx(0.0, abs=1e-5)
    images = torch.rand(6, 1, 4, 4) * 2 - 1
    _, errors = alignment.expert_errors(experts, images, None, [0.3, 0.8], seed=0)
    for e in errors:  # bitwise: every expert is the same code on the same batch
        assert torch.equal(e[0], e[1]) and torch.equal(e[1], e[2])


class _Exact:
    """An expert that knows x_0 answers the target velocity (x_t - x_0) / t exactly."""

    num_experts = 2

    def __init__(self, x0: torch.Tensor):
        self.x0 = x0

    def predict(self, k, x_t, t, y=None):
        exact = (x_t - self.x0) / t.reshape(-1, 1, 1, 1)
        return exact if k == 0 else exact + 1.0


def test_an_exact_expert_has_zero_error_and_selection_is_scored():
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    cases, errors = alignment.expert_errors(_Exact(x0), x0, None, [0.2, 0.6], seed=3)
    for e in errors:
        assert float(e[0].max()) < 1e-10
        assert torch.allclose(e[1], torch.ones(8, dtype=e.dtype))

    def router(x, t):  # always prefers expert 0, the exact one
        return torch.tensor([[5.0, 0.0]]).expand(x.shape[0], 2)

    r = alignment.selected_vs_not(router, None, "top-1", cases, errors, torch.zeros(8).long())
    assert r["selected_mean"] < 1e-10 and r["non_selected_mean"] == pytest.approx(1.0)
    assert r["ratio"] < 1e-9 and r["oracle_mean"] < 1e-10


def test_spearman_on_known_orders():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert alignment.spearman(a, a * 10) == pytest.approx(1.0)
    assert alignment.spearman(a, -a) == pytest.approx(-1.0)
    assert alignment.spearman(a[:2], a[:2]) is None


# --- `ddm analyze --quick` end to end ------------------------------------------------------


@pytest.fixture(scope="module")
def analysed_store(tmp_path_factory) -> str:
    root = build_tiny_ddm(tmp_path_factory.mktemp("analyze") / "store", 3, 8)
    common = dict(store=root, steps=20, batch_size=32, checkpoint_every=20, cpus_per_worker=1)
    train_local(TrainConfig(kind="featnet", preset="router-tiny", lr=1e-3, **common))
    train_local(TrainConfig(kind="monolith", preset="dit-tiny", **{**common, "steps": 3}))
    return root


class _InceptionContract(torch.nn.Module):
    """Same call contract as NVIDIA's TorchScript inception-2015-12-05.pt (uint8 RGB in,
    `return_features=True`, pool features out), with no weights: it tests the plumbing of
    `--inception`, not Inception itself."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4)
        return pooled.flatten(1)


def test_report_reads_the_stability_and_alignment_correlations_the_right_way():
    """Lower L_eff is more stable, lower FID better: stable-and-worse is the paper's
    dissociation, stable-and-better is not; alignment up with FID down is the paper's claim."""
    from cluster_jobs.analysis.report import findings

    def report(l_eff, align, fid):
        rows = {
            name: {
                "quality": {"fid": {"mean": f, "std": 0.1}},
                "stability": {"l_eff": {"median": lip}, "delta_refine": {"median": 0.1}},
                "alignment": {"centroid_rate": a},
            }
            for name, lip, a, f in zip(("full", "top-1", "top-2"), l_eff, align, fid, strict=True)
        }
        return " ".join(findings({"strategies": rows}))

    stable_is_worse = report([0.90, 0.91, 0.92], [0.9, 0.8, 0.7], [9.0, 8.0, 7.0])
    assert "the paper's dissociation" in stable_is_worse and "against the paper" in stable_is_worse
    stable_is_better = report([0.90, 0.91, 0.92], [0.9, 0.8, 0.7], [7.0, 8.0, 9.0])
    assert "more stable strategies are the better ones" in stable_is_better
    assert "the paper's claim" in stable_is_better and "against" not in stable_is_better


def test_ddm_analyze_quick_writes_results_report_and_plots(analysed_store, tmp_path, ddm):
    out = tmp_path / "report"
    inception = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(_InceptionContract()), str(inception))
    done = ddm(
        "analyze",
        "--store",
        analysed_store,
        "--out",
        str(out),
        "--strategies",
        "full,top-1,top-2,nearest-centroid,uniform",
        "--include-monolith",
        "--inception",
        str(inception),
        "--quick",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[analyze" in done.stderr  # progress is shown
    results = json.loads((out / "results.json").read_text())
    assert results["featnet"]["heldout_accuracy"] > 0.2
    rows = results["strategies"]
    assert list(rows) == ["full", "top-1", "top-2", "nearest-centroid", "uniform", "monolith"]
    for name, row in rows.items():
        assert len(row["quality"]["fid"]["per_seed"]) == 2
        assert math.isfinite(row["quality"]["fid"]["mean"])
        assert 0 <= row["quality"]["precision"]["mean"] <= 1
        assert math.isfinite(row["quality"]["fid_inception"]["mean"])
        assert row["stability"]["l_eff"]["median"] > 0
        if name != "monolith":
            assert 0 <= row["alignment"]["centroid_rate"] <= 1
            assert row["disagreement"]["all_mean_degrees"] >= 0
    assert rows["top-1"]["experts_per_step"] == 1.0
    assert rows["top-2"]["accuracy"]["non_selected_mean"] is not None
    assert rows["uniform"]["accuracy"]["ratio"] is None  # uniform selects every expert
    assert set(results["router_accuracy_by_t"]) == {f"{t:.1f}" for t in alignment.T_GRID}
    report = (out / "report.md").read_text()
    assert "| strategy | FID" in report and "## What our data shows" in report
    assert "FID (Inception)" in report
    assert "**Sparse vs full.**" in report and "Quick mode" in report
    for png in ["fid.png", "stability_vs_quality.png", "alignment_by_step.png"]:
        assert (out / png).stat().st_size > 1000
    assert (out / "samples-top-2.png").exists() and (out / "samples-monolith.png").exists()


def test_ddm_analyze_bad_input_exits_2(analysed_store, tmp_path, ddm):
    for run, args in (
        (ddm, ["--strategies", "top-9"]),  # the console script once; the rest in-process
        (run_ddm_in_process, ["--strategies", "oracle"]),
        (run_ddm_in_process, ["--seeds", "a,b"]),
        (run_ddm_in_process, ["--inception", str(tmp_path / "missing.pt")]),
    ):
        done = run("analyze", "--store", analysed_store, "--out", str(tmp_path), *args)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# --- `ddm submit --analyze`: the analysis as a Ray job ----------------------------------------


def test_submit_analyze_checks_its_arguments_before_any_job(analysed_store, tmp_path, ddm):
    """Bad `ddm analyze` arguments after `--` fail with exit 2 before Ray is contacted (the
    address below answers nothing), and so does mixing --analyze with training."""
    no_ray = ["--address", "http://127.0.0.1:9"]
    for run, tail, needle in (
        (ddm, ["--analyze", "--", "--out", str(tmp_path), "--strategies", "top-9"], "top-9"),
        (run_ddm_in_process, ["--analyze", "--", "--out", str(tmp_path), "--bogus"], "--bogus"),
        (run_ddm_in_process, ["--analyze", "--", "--n", "10"], "--out"),
        (
            run_ddm_in_process,
            ["--analyze", "--router", "--", "--out", str(tmp_path)],
            "separately",
        ),
        (run_ddm_in_process, ["--", "--out", str(tmp_path)], "only --analyze"),
    ):
        done = run("submit", "--store", analysed_store, *no_ray, *tail)
        assert done.returncode == 2, (tail, done.stderr)
        assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_submit_analyze_job_runs_the_checked_arguments_with_an_absolute_out(
    analysed_store, tmp_path, monkeypatch
):
    from cluster_jobs.analysis.command import job_config
    from cluster_jobs.analysis.config import AnalyzeConfig
    from cluster_jobs.submit import AnalyzeJob, entrypoint, submission_id

    monkeypatch.chdir(tmp_path)
    cfg = job_config(analysed_store, ["--out", "report", "--quick", "--seeds", "0"])
    assert (cfg.store, cfg.out, cfg.seeds) == (analysed_store, str(tmp_path / "report"), [0])
    assert cfg.quick and cfg.n == 64 and cfg.steps == 8  # --quick's settings, where not given
    job = AnalyzeJob(cfg)
    command = shlex.split(entrypoint(job))
    assert command[:4] == ["python", "-m", "cluster_jobs.analysis", "--config"]
    assert AnalyzeConfig.model_validate_json(command[4]) == cfg  # the job gets it whole
    assert submission_id(job) == submission_id(AnalyzeJob(cfg.model_copy()))  # stable per config
    assert submission_id(job) != submission_id(AnalyzeJob(cfg.model_copy(update={"n": 100})))
    kept = job_config(analysed_store, ["--out=s3://bucket/report"])
    assert kept.out == "s3://bucket/report"  # a store URI is left as given
