"""The analysis toolkit on cases with known answers, then `ddm analyze --quick` end to end
on a tiny real store (with a feature network trained on it)."""

from __future__ import annotations

import json
import math
import shlex
from types import SimpleNamespace

import pytest
import torch
from conftest import HETEROGENEOUS, build_tiny_ddm, run_ddm_in_process

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
    """A linear field's flow map is linear: every direction grows by the same factor."""
    steps = 10
    x_T = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    sens = stability.trajectory_sensitivity(
        _LinearField(a), _NO_ROUTER, "uniform", x_T, steps, eps=1e-3, seed=0, count=3
    )
    factor = abs(1 - a / steps)
    # float32 states: the difference of two trajectories 1e-3 apart keeps ~4 digits
    close = dict(rtol=1e-3, atol=0.0)
    expected = torch.full((5,), factor**steps, dtype=torch.float64)
    torch.testing.assert_close(sens["amplification"], expected, **close)
    torch.testing.assert_close(sens["amplification_worst"], expected, **close)
    assert not sens["flipped"].any()


class _Anisotropic:
    """v = A x with A scaling the first pixel by a and the rest by 0: directions grow
    differently, so the worst direction exceeds the mean."""

    num_experts = 1

    def predict(self, k, x_t, t, y=None):
        v = torch.zeros_like(x_t)
        v[:, :, 0, 0] = -3.0 * x_t[:, :, 0, 0]
        return v


def test_amplification_worst_is_the_largest_direction():
    x_T = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    sens = stability.trajectory_sensitivity(
        _Anisotropic(), _NO_ROUTER, "uniform", x_T, 8, eps=1e-3, seed=1, count=4
    )
    assert (sens["amplification_worst"] >= sens["amplification"] - 1e-9).all()
    assert (sens["amplification_worst"] > sens["amplification"] * 1.001).any()


def test_delta_refine_of_a_linear_field_at_every_n():
    a = 0.7
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    refine = stability.delta_refine(_LinearField(a), _NO_ROUTER, "uniform", x_T, [4, 8])
    assert set(refine) == {4, 8}
    for steps, got in refine.items():
        coarse, fine = (1 - a / steps) ** steps, (1 - a / (2 * steps)) ** (2 * steps)
        expected = abs(coarse - fine) / abs(fine)
        torch.testing.assert_close(got, torch.full((3,), expected, dtype=torch.float64))


def test_summary_and_flips_are_reported():
    sens = {
        "amplification": torch.tensor([1.0, 2.0, 3.0, 10.0]),
        "amplification_worst": torch.tensor([1.0, 2.0, 3.0, 12.0]),
        "flipped": torch.tensor([False, False, False, True]),
    }
    r = stability.stability_report(sens, {10: torch.tensor([0.1, 0.2, 0.3, 0.4])})
    assert r["amplification"]["median"] == 2.5 and r["amplification"]["mean"] == 4.0
    assert r["amplification_worst"]["mean"] == 4.5
    assert r["delta_refine"]["10"]["mean"] == pytest.approx(0.25)
    assert r["flipped_fraction"] == 0.25
    assert r["amplification_mean_flipped"] == 10.0 and r["amplification_mean_unflipped"] == 2.0


# --- alignment: identical experts, exact experts, constructed cases ------------------------


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
    assert d["all_degrees"] == pytest.approx(0.0, abs=1e-5)
    assert d["selected_degrees"] == pytest.approx(0.0, abs=1e-5)
    assert d["all_spread"] == pytest.approx(0.0, abs=1e-6)
    images = torch.rand(6, 1, 4, 4) * 2 - 1
    cases = alignment.expert_predictions(experts, images, None, [0.3, 0.8], seed=0)
    for case in cases:  # bitwise: every expert is the same code on the same batch
        e = case.errors
        assert torch.equal(e[:, 0], e[:, 1]) and torch.equal(e[:, 1], e[:, 2])


class _Exact:
    """Expert 0 knows x_0 and answers the target velocity (x_t - x_0) / t exactly; expert k
    is off by k everywhere."""

    def __init__(self, x0: torch.Tensor, K: int = 2):
        self.x0, self.num_experts = x0, K

    def predict(self, k, x_t, t, y=None):
        return (x_t - self.x0) / t.reshape(-1, 1, 1, 1) + float(k)


def test_an_exact_expert_has_zero_error_and_selection_is_scored():
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    cases = alignment.expert_predictions(_Exact(x0), x0, None, [0.2, 0.6], seed=3)
    for case in cases:
        assert float(case.errors[:, 0].max()) < 1e-10
        assert torch.allclose(case.errors[:, 1], torch.ones(8, dtype=torch.float64))

    def router(x, t):  # always prefers expert 0, the exact one
        return torch.tensor([[5.0, 0.0]]).expand(x.shape[0], 2)

    r = alignment.expert_accuracy(router, None, "top-1", cases, torch.zeros(8).long())
    for by_t in r["by_t"].values():
        assert by_t["selected"] < 1e-10 and by_t["non_selected"] == pytest.approx(1.0)
        assert by_t["ratio"] < 1e-9 and by_t["oracle"] < 1e-10
        assert by_t["random_k"] == pytest.approx(0.5) and by_t["merged"] < 1e-10
        assert by_t["selected_is_oracle"] == 1.0
    assert r["units"]["selected_minus_non_selected"].max() < -0.99


def test_padding_slots_never_select_expert_0():
    """threshold and full leave padding slots (id -1); expert 0 must not be counted as
    non-selected because of them (the old scatter of `selected` into column max(id, 0))."""
    x0 = torch.rand(6, 1, 2, 2) * 2 - 1
    cases = alignment.expert_predictions(_Exact(x0, K=3), x0, None, [0.5], seed=0)

    def router(x, t):  # row 0 puts everything on expert 0 (others padded); the rest spread
        logits = torch.zeros(x.shape[0], 3)
        logits[0] = torch.tensor([20.0, 0.0, 0.0])
        logits[1:, 1] = 1.0
        return logits

    from router_service.policies import get_policy

    probs = torch.softmax(router(x0, None), dim=-1)
    decision = get_policy("threshold-0.2").select(6, 3, probs=probs)
    assert (decision.ids == -1).any()  # the case has padding
    mask = alignment.selected_mask(decision, 3)
    assert mask[1:, 0].all()  # expert 0 is selected wherever its weight is above 0.2
    assert mask[0].tolist() == [True, False, False]
    by_t = alignment.expert_accuracy(router, None, "threshold-0.2", cases, torch.zeros(6).long())
    # rows 1..5 select all three (errors 0, 1, 4: mean 5/3); row 0 selects the exact one
    assert by_t["by_t"]["0.5"]["selected"] == pytest.approx((0 + 5 * 5 / 3) / 6)


def test_rank_gap_and_misalignment_on_a_constructed_case():
    d = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    top2 = torch.tensor([[0.75, 0.25, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    full = torch.full((2, 4), 0.25)
    a = alignment.step_alignment(top2, d)
    torch.testing.assert_close(a["selected_rank"], torch.tensor([1.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(a["weighted_rank"], torch.tensor([1.25, 1.5], dtype=torch.float64))
    torch.testing.assert_close(a["distance_gap"], torch.tensor([-2.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(a["misalignment"], torch.tensor([0.25, 0.5], dtype=torch.float64))
    f = alignment.step_alignment(full, d)
    assert torch.equal(f["selected_rank"], torch.tensor([2.5, 2.5], dtype=torch.float64))  # chance
    assert f["distance_gap"].isnan().all()  # nothing is left unselected
    torch.testing.assert_close(f["misalignment"], torch.tensor([1.5, 1.5], dtype=torch.float64))


def test_reference_alignment_uses_the_uniform_mean_not_the_merge():
    """Two experts, one per cluster; top-1 always picks expert 1. x̂_0 of the uniform mean
    sits nearest cluster 0, so the choice ranks 2nd however the merge moves x̂_0."""

    class Space:
        def distances(self, x0):
            m = x0.flatten(1).mean(dim=1, keepdim=True)
            return (m - torch.tensor([[0.0, 10.0]])).abs()

    class Two:
        num_experts = 2

        def predict(self, k, x_t, t, y=None):
            return torch.zeros_like(x_t) if k == 0 else torch.full_like(x_t, -5.0)

    def router(x, t):
        return torch.tensor([[0.0, 9.0]]).expand(x.shape[0], 2)

    run = sample(
        Two(), router, "top-1", torch.zeros(3, 1, 2, 2), time_grid(2), trace_all_experts=True
    )
    al = alignment.reference_alignment(run, Space())
    assert al["selected_rank"] == pytest.approx(2.0) and al["chance_rank"] == 1.5
    assert al["misalignment"] > 0 and al["distance_gap"] > 0


def test_router_calibration_of_a_perfect_and_a_flat_router():
    images = torch.rand(8, 1, 2, 2) * 2 - 1
    clusters = torch.tensor([0, 1] * 4)

    def perfect(x, t):
        return torch.nn.functional.one_hot(clusters, 2).float() * 50

    def flat(x, t):
        return torch.zeros(x.shape[0], 2)

    sure = alignment.router_calibration(perfect, images, clusters, 0)["0.5"]
    assert sure["accuracy"] == 1.0 and sure["ece"] < 1e-6 and sure["entropy"] < 1e-6
    unsure = alignment.router_calibration(flat, images, clusters, 0)["0.5"]
    assert unsure["entropy"] == pytest.approx(math.log(2))
    assert unsure["ece"] == pytest.approx(0.0, abs=1e-9)  # 50% confident, 50% right


def test_spearman_on_known_orders():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert alignment.spearman(a, a * 10) == pytest.approx(1.0)
    assert alignment.spearman(a, -a) == pytest.approx(-1.0)
    assert alignment.spearman(a[:2], a[:2]) is None


# --- intervals and verdicts ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("low", "high", "side", "expected"),
    [
        (-2.0, -0.5, "lower", "agrees"),
        (0.5, 2.0, "lower", "contradicts"),
        (-0.5, 0.5, "lower", "inconclusive"),
        (0.5, 2.0, "higher", "agrees"),
        (-2.0, -0.5, "higher", "contradicts"),
        (-0.5, 0.5, "higher", "inconclusive"),
    ],
)
def test_verdict_in_every_direction(low, high, side, expected):
    from cluster_jobs.analysis.intervals import Interval, verdict

    assert verdict(Interval((low + high) / 2, low, high, 100), side) == expected


def test_report_claims_say_agrees_contradicts_or_inconclusive_from_the_interval():
    from cluster_jobs.analysis.report import claims, dissociation

    def report(fid_interval, amp_interval):
        def row(metric, iv):
            return {
                "pair": "top-2 - full",
                "a": "top-2",
                "b": "full",
                "metric": metric,
                "mean_difference": sum(iv) / 2,
                "interval": iv,
                "resamples": 100,
            }

        return {
            "strategies": {"full": {}, "top-2": {}},
            "paired": [row("fid", fid_interval), row("amplification", amp_interval)],
        }

    agree = claims(report([-3.0, -1.0], [0.1, 0.4]))
    assert {c["verdict"] for c in agree} == {"agrees"}
    assert "is reproduced" in dissociation(agree)
    against = claims(report([1.0, 3.0], [-0.4, -0.1]))
    assert {c["verdict"] for c in against} == {"contradicts"}
    assert "not reproduced" in dissociation(against)
    unsure = claims(report([-1.0, 1.0], [-0.1, 0.1]))
    assert {c["verdict"] for c in unsure} == {"inconclusive"}


def test_paired_bootstrap_sees_a_shift_that_unpaired_noise_hides():
    from cluster_jobs.analysis.intervals import mean_interval, paired_difference

    base = torch.randn(400, generator=torch.Generator().manual_seed(0)) * 10
    a, b = base + 0.5, base  # per-unit noise is 20x the shift, shared by both arms
    iv = paired_difference(lambda v: float(v.mean()), a, b, 200, seed=0)
    assert iv.low == pytest.approx(0.5) and iv.high == pytest.approx(0.5)
    spread = mean_interval(a, 200, seed=0)
    assert spread.high - spread.low > 1.0  # unpaired, the same shift is lost in the noise


def test_resampled_fid_equals_fid_of_the_resampled_rows():
    import numpy as np

    real, fake = _gauss(300, 8, 0), _gauss(200, 8, 1, shift=0.3)
    scorer = quality.Scorer(quality.Reference.of(real), fake)
    idx = np.random.default_rng(0).integers(0, 200, size=(3, 200))
    got = scorer.fid(quality.counts_of(idx, 200))
    want = [quality.fid_kid(real, fake[torch.from_numpy(i)])[0] for i in idx]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    wide = quality.Scorer(quality.Reference.of(_gauss(300, 64, 2)), _gauss(40, 64, 3))
    assert wide.gram is not None  # D > n: the Gram path
    torch.testing.assert_close(
        wide.fid()[0],
        torch.tensor(quality.fid_kid(_gauss(300, 64, 2), _gauss(40, 64, 3))[0]).double(),
        rtol=1e-6,
        atol=1e-9,
    )


# --- `ddm analyze --quick` end to end ------------------------------------------------------


ANALYSED_K = len(HETEROGENEOUS)


@pytest.fixture(scope="module")
def analysed_store(tmp_path_factory) -> str:
    # a heterogeneous DDM: the analysis sees velocities whatever each expert predicts
    root = build_tiny_ddm(
        tmp_path_factory.mktemp("analyze") / "store", ANALYSED_K, 8, experts=HETEROGENEOUS
    )
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
    assert results["conditioning"]["labels"] == "none"
    rows = results["strategies"]
    assert list(rows) == ["full", "top-1", "top-2", "nearest-centroid", "uniform", "monolith"]
    for name, row in rows.items():
        assert len(row["quality"]["fid"]["per_seed"]) == 3  # the default seeds 0, 1, 2
        fid = row["quality"]["fid"]
        assert math.isfinite(fid["mean"]) and fid["low"] <= fid["high"]
        assert 0 <= row["quality"]["precision"]["mean"] <= 1
        assert math.isfinite(row["quality"]["fid_inception"]["mean"])
        assert set(row["stability"]["delta_refine"]) == {"4", "8"}
        assert row["stability"]["amplification_worst"]["mean"] >= (
            row["stability"]["amplification"]["mean"] - 1e-9
        )
        if name != "monolith":
            assert 1 <= row["alignment"]["selected_rank"] <= ANALYSED_K
            assert set(row["alignment"]["misalignment_by_bucket"]) == set(alignment.BUCKETS)
            assert row["disagreement"]["all_degrees"] >= 0
    assert rows["top-1"]["experts_per_step"] == 1.0
    # chance: the mean of ranks 1..K
    assert rows["uniform"]["alignment"]["selected_rank"] == pytest.approx((ANALYSED_K + 1) / 2)
    assert rows["uniform"]["accuracy"]["by_t"]["0.5"]["ratio"] is None  # nothing unselected
    assert rows["top-2"]["accuracy"]["by_t"]["0.5"]["ratio"] is not None
    floor = results["floor"]
    assert floor["images"] + results["reference"]["images"] == results["heldout_images"]
    pairs = {(p["pair"], p["metric"]) for p in results["paired"]}
    assert ("top-2 - full", "fid") in pairs and ("top-2 - full", "misalignment") in pairs
    assert ("monolith - top-2", "kid") in pairs
    for p in results["paired"]:
        low, high = p["interval"]
        assert low <= p["mean_difference"] <= high or not math.isfinite(low)
    assert {c["verdict"] for c in results["claims"]} <= {"agrees", "contradicts", "inconclusive"}
    calib = results["router_calibration_by_t"]
    assert set(calib) == {f"{t:.1f}" for t in alignment.T_GRID}
    assert all(0 <= c["ece"] <= 1 for c in calib.values())
    report = (out / "report.md").read_text()
    assert "| strategy | FID" in report and "## What our data shows" in report
    assert "FID (Inception)" in report and "Quick mode" in report
    assert "dissociation" in report and "real-vs-real floor" in report
    for png in ["fid.png", "paired_differences.png", "alignment_by_step.png"]:
        assert (out / png).stat().st_size > 1000
    assert (out / "samples-top-2.png").exists() and (out / "samples-monolith.png").exists()


def test_ddm_analyze_bad_input_exits_2(analysed_store, tmp_path, ddm):
    for run, args in (
        (ddm, ["--strategies", "top-9"]),  # the console script once; the rest in-process
        (run_ddm_in_process, ["--strategies", "oracle"]),
        (run_ddm_in_process, ["--seeds", "a,b"]),
        (run_ddm_in_process, ["--inception", str(tmp_path / "missing.pt")]),
        (run_ddm_in_process, ["--guidance", "3"]),  # guidance without labels
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
