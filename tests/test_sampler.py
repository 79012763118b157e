"""router_service/sampler.py: analytic oracles for the solvers and the merge, per-step
dispatch counted on fake backends, guidance, tracing; LocalExperts on a real tiny store."""

from __future__ import annotations

import ast
import asyncio
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ddm_nodes import flow
from ddm_nodes.checkpoint import WEIGHTS_FILE
from ddm_nodes.dataset_manifest import NULL_LABEL
from ddm_nodes.errors import IntegrityError, ManifestError
from router_service.policies import get_policy
from router_service.sampler import (
    check_time_grid,
    initial_noise,
    sample,
    sample_async,
    time_grid,
)

SOLVERS = ["euler", "heun"]


# --- fake backends -----------------------------------------------------------------------


class FieldExperts:
    """Expert k answers v = fields[k](x, t, y) and logs every call."""

    def __init__(self, *fields):
        self.fields = fields
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    @property
    def num_experts(self) -> int:
        return len(self.fields)

    def predict(self, k, x, t, y):
        self.calls.append((k, x.clone(), t.clone(), None if y is None else y.clone()))
        return self.fields[k](x, t, y)


def constant(c):
    return lambda x, t, y: torch.full_like(x, c)


def _bt(t, x):
    return t.reshape(-1, *[1] * (x.ndim - 1))


class TableRouter:
    """Logits = log(table[identity % len(table)]), the identity read from channel 0."""

    def __init__(self, table):
        self.table = torch.tensor(table, dtype=torch.float32)
        self.evaluations = 0

    def __call__(self, x, t):
        self.evaluations += 1
        ident = x[:, 0, 0, 0].round().long()
        return torch.log(self.table[ident % len(self.table)])


def fixed_router(table):
    """The same logits, log(table), for every evaluation: row n for sample n."""
    return lambda x, t: torch.log(torch.tensor(table))


def _grid_uniform(n):
    return [1 - i / n for i in range(n + 1)]


# --- time grids and noise ----------------------------------------------------------------


def test_time_grid_runs_from_noise_to_data():
    assert time_grid(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert time_grid(2, start=0.5).tolist() == [0.5, 0.25, 0.0]
    assert len(time_grid(1000)) == 1001
    with pytest.raises(ValueError, match="at least 1"):
        time_grid(0)


@pytest.mark.parametrize(
    "grid,match",
    [
        ([1.0], "at least 2"),
        ([0.0, 1.0], "strictly decreasing"),
        ([1.0, 0.5, 0.5, 0.0], "strictly decreasing"),
        ([1.5, 0.0], r"\[0, 1\]"),
        ([1.0, -0.1], r"\[0, 1\]"),
        ([[1.0, 0.0]], "1-D"),
    ],
)
def test_bad_time_grids_are_refused(grid, match):
    with pytest.raises(ValueError, match=match):
        check_time_grid(grid)


def test_initial_noise_is_seeded():
    a, b = initial_noise(3, (1, 4, 4), seed=7), initial_noise(3, (1, 4, 4), seed=7)
    assert a.shape == (3, 1, 4, 4) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, initial_noise(3, (1, 4, 4), seed=8))


# --- analytic oracles: one expert, known velocity fields ---------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("grid", [_grid_uniform(1), _grid_uniform(7), [1.0, 0.7, 0.2, 0.05, 0.0]])
def test_constant_velocity_moves_by_minus_c_for_any_grid(solver, grid):
    x_T = initial_noise(3, (2, 4, 4), seed=0)
    c = 0.37
    result = sample(FieldExperts(constant(c)), None, "uniform", x_T, grid, solver)
    # x(0) = x(1) + integral_1^0 c dt = x(1) - c, which both solvers hit exactly
    torch.testing.assert_close(result.final, x_T - c, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 10])
def test_time_linear_field_euler_and_heun_closed_forms(n):
    """v = b t. Euler: sum_i (-1/n) b (1 - i/n) = -b (n + 1) / (2n). Heun is the trapezoid
    rule (exact) except on the last step to t = 0, which is Euler: -b/2 - b / (2 n^2)."""
    b = 1.5
    x_T = initial_noise(2, (1, 3, 3), seed=1)

    def field(x, t, y):
        return b * _bt(t, x).expand_as(x)

    euler = sample(FieldExperts(field), None, "uniform", x_T, time_grid(n), "euler").final
    heun = sample(FieldExperts(field), None, "uniform", x_T, time_grid(n), "heun").final
    torch.testing.assert_close(euler, x_T - b * (n + 1) / (2 * n), rtol=0, atol=1e-6)
    torch.testing.assert_close(heun, x_T - b / 2 - b / (2 * n * n), rtol=0, atol=1e-6)


def test_heun_on_a_grid_that_stops_before_t0_is_exact_for_a_time_linear_field():
    b = 2.0
    x_T = initial_noise(2, (1, 3, 3), seed=2)
    grid = time_grid(3, start=0.9, end=0.3)
    out = sample(
        FieldExperts(lambda x, t, y: b * _bt(t, x).expand_as(x)), None, "uniform", x_T, grid, "heun"
    )
    # integral_0.9^0.3 b t dt = b (0.3^2 - 0.9^2) / 2
    torch.testing.assert_close(out.final, x_T + b * (0.09 - 0.81) / 2, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [1, 4, 9])
@pytest.mark.parametrize("a", [-0.8, 0.5, 2.0])
def test_state_linear_field_closed_forms(n, a):
    """v = a x with dt = -1/n. Euler multiplies by (1 - a/n) per step; Heun by
    (1 - a/n + a^2 / (2 n^2)) per step except the last (Euler) one."""
    x_T = initial_noise(4, (1, 2, 2), seed=3).double()
    experts = FieldExperts(lambda x, t, y: a * x)
    euler = sample(experts, None, "uniform", x_T, time_grid(n), "euler").final
    heun = sample(experts, None, "uniform", x_T, time_grid(n), "heun").final
    h = -1.0 / n
    torch.testing.assert_close(euler, x_T * (1 + a * h) ** n, rtol=1e-12, atol=1e-12)
    heun_factor = (1 + a * h + (a * h) ** 2 / 2) ** (n - 1) * (1 + a * h)
    torch.testing.assert_close(heun, x_T * heun_factor, rtol=1e-12, atol=1e-12)
    # and both approach the ODE's solution x_T e^{-a} as the grid refines
    assert abs(heun_factor - math.exp(-a)) <= abs((1 + a * h) ** n - math.exp(-a)) + 1e-12


@pytest.mark.parametrize("solver", SOLVERS)
def test_the_exact_velocity_of_a_point_mass_lands_on_it(solver):
    """For data = the single point x0, v(x, t) = (x - x0) / t (= ε - x0 along the straight
    path); every step stays on the path and the last one ends exactly at x0. Heun never
    evaluates at t = 0, where this field is singular."""
    x0 = initial_noise(3, (1, 4, 4), seed=4)
    x_T = initial_noise(3, (1, 4, 4), seed=5)

    def field(x, t, y):
        assert bool((t > 0).all())
        return (x - x0) / _bt(t, x)

    out = sample(FieldExperts(field), None, "uniform", x_T, time_grid(6), solver).final
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


# --- the merge ---------------------------------------------------------------------------


def test_merge_of_two_experts_is_the_router_weighted_sum():
    table = [[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]]
    x_T = initial_noise(3, (1, 2, 2), seed=5)
    c0, c1 = 1.25, -0.5
    experts = FieldExperts(constant(c0), constant(c1))
    out = sample(experts, fixed_router(table), "full", x_T, time_grid(2), "euler").final
    for n, (p0, p1) in enumerate(table):
        torch.testing.assert_close(out[n], x_T[n] - (p0 * c0 + p1 * c1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_oracle_sends_each_sample_to_its_true_cluster(solver):
    consts = [0.1, 0.2, 0.3]
    experts = FieldExperts(*(constant(c) for c in consts))
    x_T = initial_noise(4, (1, 2, 2), seed=6)
    clusters = torch.tensor([1, 0, 2, 1])
    out = sample(experts, None, "oracle", x_T, time_grid(3), solver, clusters=clusters)
    for n, k in enumerate(clusters.tolist()):
        torch.testing.assert_close(out.final[n], x_T[n] - consts[k], rtol=0, atol=1e-6)
    assert out.experts_per_step == 1.0


# --- dispatch: counted calls, sub-batches, scatter ---------------------------------------

# Sample n's router probabilities are TABLE[n % 3]; expert 3 is (almost) never probable.
TABLE = [[0.6, 0.3, 0.1, 1e-9], [0.1, 0.6, 0.3, 1e-9], [0.3, 0.1, 0.6, 1e-9]]
N_DISPATCH = 7


def _expected_choice(policy: str) -> list[dict[int, float]]:
    """Per sample {expert: weight}, from TABLE by the policy's definition."""
    out = []
    for n in range(N_DISPATCH):
        p = TABLE[n % 3]
        ranked = sorted(range(4), key=lambda i: (-p[i], i))
        chosen = {"top-1": ranked[:1], "top-2": ranked[:2], "full": ranked[:3]}[policy]
        total = sum(p[i] for i in chosen)
        out.append({i: p[i] / total for i in chosen})
    return out


class IdentityExperts:
    """Expert k leaves channel 0 (the sample's identity n) alone and moves channel 1 with
    velocity 10 (k + 1) + n: every velocity encodes who computed it and for whom. Logs
    (evaluation, k, identities) per call; `router` shares the evaluation counter."""

    def __init__(self, router: TableRouter, num_experts: int = 4):
        self.router = router
        self.num_experts = num_experts
        self.log: list[tuple[int, int, list[int]]] = []

    def _velocity(self, k, x, t, y):
        ident = x[:, 0, 0, 0].round()
        v = torch.zeros_like(x)
        v[:, 1] = (10 * (k + 1) + ident).reshape(-1, 1, 1)
        self.log.append((self.router.evaluations, k, ident.long().tolist()))
        return v

    def predict(self, k, x, t, y):
        return self._velocity(k, x, t, y)


class AsyncIdentityExperts(IdentityExperts):
    """The same experts behind `async def predict`, yielding to the loop mid-call."""

    def __init__(self, router, num_experts=4):
        super().__init__(router, num_experts)
        self.in_flight = 0
        self.max_in_flight = 0

    async def predict(self, k, x, t, y):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0)
        v = self._velocity(k, x, t, y)
        await asyncio.sleep(0)
        self.in_flight -= 1
        return v


def _identity_x_T() -> torch.Tensor:
    x_T = initial_noise(N_DISPATCH, (2, 2, 2), seed=9)
    x_T[:, 0] = torch.arange(float(N_DISPATCH)).reshape(-1, 1, 1)
    return x_T


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("policy", ["top-1", "top-2", "full"])
@pytest.mark.parametrize("backend", [IdentityExperts, AsyncIdentityExperts])
def test_each_evaluation_calls_each_selected_expert_once_with_its_own_samples(
    solver, policy, backend
):
    router = TableRouter(TABLE)
    experts = backend(router)
    x_T = _identity_x_T()
    result = sample(experts, router, policy, x_T, time_grid(3), solver)
    choice = _expected_choice(policy)

    evaluations = 3 if solver == "euler" else 5  # Heun: 2 per step, the last step 1
    assert router.evaluations == result.evaluations == evaluations
    for e in range(1, evaluations + 1):
        calls = [(k, ids) for ev, k, ids in experts.log if ev == e]
        called = [k for k, _ in calls]
        assert len(called) == len(set(called))  # at most one call per expert
        wanted = {k for row in choice for k in row}
        assert set(called) == wanted and 3 not in called  # none to unselected experts
        for k, ids in calls:  # the sub-batch is exactly the samples that selected k
            assert ids == [n for n in range(N_DISPATCH) if k in choice[n]]
    assert sum(result.expert_calls) == len(experts.log)
    assert result.expert_calls[3] == 0

    # scatter: every sample got its own experts' velocities, weighted (constant along the
    # path, so both solvers move channel 1 by exactly minus the merged velocity)
    for n in range(N_DISPATCH):
        v = sum(w * (10 * (k + 1) + n) for k, w in choice[n].items())
        torch.testing.assert_close(result.final[n, 1], x_T[n, 1] - v, rtol=0, atol=1e-5)
        assert torch.equal(result.final[n, 0], x_T[n, 0])  # bitwise: every step adds exactly 0
    mean_selected = sum(len(r) for r in choice) / N_DISPATCH
    assert result.experts_per_step == pytest.approx(mean_selected)


def test_an_async_backend_runs_concurrently_and_gives_the_same_result_as_a_sync_one():
    x_T = _identity_x_T()
    sync_router, async_router = TableRouter(TABLE), TableRouter(TABLE)
    sync_experts = IdentityExperts(sync_router)
    async_experts = AsyncIdentityExperts(async_router)
    a = sample(sync_experts, sync_router, "top-2", x_T, time_grid(4), "heun")
    b = asyncio.run(sample_async(async_experts, async_router, "top-2", x_T, time_grid(4), "heun"))
    # bitwise: `sample` runs `sample_async`, so the same code on the same bytes
    assert torch.equal(a.final, b.final)
    assert sync_experts.log == async_experts.log
    assert async_experts.max_in_flight == 3  # all three selected experts' calls overlapped


def test_an_expert_no_sample_selected_is_never_called():
    router = TableRouter([[0.9, 0.1, 1e-9, 1e-9]])  # every sample: top-1 is expert 0
    experts = IdentityExperts(router)
    result = sample(experts, router, "top-1", _identity_x_T(), time_grid(5), "euler")
    assert result.expert_calls == [5, 0, 0, 0]
    assert {k for _, k, _ in experts.log} == {0}


def test_uniform_without_trace_never_calls_the_router():
    router = TableRouter(TABLE)
    experts = IdentityExperts(router)
    result = sample(experts, router, "uniform", _identity_x_T(), time_grid(2), "euler")
    assert router.evaluations == 0
    assert result.expert_calls == [2, 2, 2, 2]
    assert result.experts_per_step == 4.0


def test_the_same_inputs_give_the_same_images():
    def field(k):
        return lambda x, t, y: torch.sin(3 * x + k) * _bt(t, x)

    x_T = initial_noise(5, (1, 4, 4), seed=11)
    runs = [
        sample(
            FieldExperts(*(field(k) for k in range(3))),
            lambda x, t: torch.stack([x.mean((1, 2, 3)) * k for k in range(3)], dim=1),
            "threshold-0.3",
            x_T.clone(),
            time_grid(6),
            "heun",
        ).final
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


# --- guidance ----------------------------------------------------------------------------


class LabelExperts(FieldExperts):
    """Expert k: NULL_K[k] for the null label, COND_K[k] + y for a real label y."""

    NULL_K = [0.5, -1.0]
    COND_K = [2.0, 3.0]

    def __init__(self):
        super().__init__(*(self._field(k) for k in range(2)))

    def _field(self, k):
        def field(x, t, y):
            if y is None:
                return torch.full_like(x, self.NULL_K[k])
            v = torch.where(y < 0, self.NULL_K[k], self.COND_K[k] + y.to(x.dtype))
            return v.reshape(-1, 1, 1, 1).expand_as(x).clone()

        return field


@pytest.mark.parametrize("guidance", [1.0, 3.0, 0.0])
def test_each_expert_applies_guidance_before_the_merge(guidance):
    table = [[0.7, 0.3], [0.25, 0.75], [0.5, 0.5], [0.9, 0.1]]
    labels = torch.tensor([0, 3, NULL_LABEL, 1])
    x_T = initial_noise(4, (1, 2, 2), seed=6)
    experts = LabelExperts()
    out = sample(
        experts, fixed_router(table), "full", x_T, time_grid(2), labels=labels, guidance=guidance
    )
    for n, y in enumerate(labels.tolist()):
        v = 0.0
        for k in range(2):
            null = LabelExperts.NULL_K[k]
            cond = null if y == NULL_LABEL else LabelExperts.COND_K[k] + y
            v += table[n][k] * (null + guidance * (cond - null))
        torch.testing.assert_close(out.final[n], x_T[n] - v, rtol=1e-6, atol=1e-6)

    assert out.expert_calls == [2, 2]  # one call per expert per step, guided or not
    for _, x, t, y in experts.calls:
        if guidance == 1:  # one plain pass with the labels
            assert torch.equal(y, labels) and len(x) == 4
        else:  # [x with labels; x with null], stacked into one call
            assert len(x) == 8 and torch.equal(x[:4], x[4:]) and torch.equal(t[:4], t[4:])
            assert torch.equal(y[:4], labels) and bool((y[4:] == NULL_LABEL).all())


def test_without_labels_experts_get_no_labels_and_guidance_is_refused():
    experts = LabelExperts()
    x_T = torch.zeros(2, 1, 2, 2)
    out = sample(experts, None, "uniform", x_T, time_grid(1))
    torch.testing.assert_close(out.final, x_T - sum(LabelExperts.NULL_K) / 2)
    assert all(y is None for *_, y in experts.calls)
    with pytest.raises(ValueError, match="needs labels"):
        sample(experts, None, "uniform", x_T, time_grid(1), guidance=2.0)


# --- nearest-centroid --------------------------------------------------------------------


class ScalarFeatures:
    """distances(images) = |mean pixel - centroid_k|; records what it embedded."""

    def __init__(self, centroids):
        self.centroids = torch.tensor(centroids)
        self.seen: list[torch.Tensor] = []

    def distances(self, images):
        self.seen.append(images.clone())
        return (images.mean(dim=(1, 2, 3))[:, None] - self.centroids[None]).abs()


@pytest.mark.parametrize("solver", SOLVERS)
def test_nearest_centroid_embeds_the_denoised_estimate_after_a_uniform_first_step(solver):
    features = ScalarFeatures([-1.0, 0.0, 1.0])
    # expert k pulls x towards its centroid: x̂_0 = x - t v lands near centroid k
    experts = FieldExperts(*(lambda x, t, y, c=c: x - c for c in (-1.0, 0.0, 1.0)))
    x_T = initial_noise(6, (1, 3, 3), seed=12) + torch.linspace(-1.5, 1.5, 6).reshape(6, 1, 1, 1)
    policy = get_policy("nearest-centroid-2", temperature=0.3)
    result = sample(experts, None, policy, x_T, time_grid(4), solver, features=features, trace=True)
    trace = result.trace
    assert trace[0].decision.ids.tolist() == [[0, 1, 2]] * 6  # uniform: no velocity yet
    assert trace[0].distances is None
    assert len(features.seen) == len(trace) - 1
    for prev, step, seen in zip(trace[:-1], trace[1:], features.seen, strict=True):
        t = torch.full((6,), step.t)
        # bitwise: t rounded to float32 (as a Python float or a tensor), then one multiply
        # and one subtraction per element, each correctly rounded on any CPU
        torch.testing.assert_close(seen, step.x_t - step.t * prev.velocity, rtol=0, atol=0)
        torch.testing.assert_close(seen, flow.denoised(step.x_t, t, prev.velocity))
        for n, d in enumerate(step.distances.tolist()):
            near = sorted(range(3), key=lambda i: (d[i], i))[:2]
            z = sum(math.exp(-d[i] / 0.3) for i in near)
            assert step.decision.ids[n].tolist() == near
            assert step.decision.weights[n].tolist() == pytest.approx(
                [math.exp(-d[i] / 0.3) / z for i in near], rel=1e-5
            )
    assert torch.isfinite(result.final).all()


# --- traces ------------------------------------------------------------------------------


def test_trace_records_every_evaluation():
    router = TableRouter(TABLE)
    experts = IdentityExperts(router)
    x_T = _identity_x_T()
    result = sample(experts, router, "top-2", x_T, time_grid(4), "heun", trace=True)
    trace = result.trace
    assert [s.t for s in trace] == [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]
    assert [s.step for s in trace] == [0, 0, 1, 1, 2, 2, 3]
    assert torch.equal(trace[0].x_t, x_T)
    table = torch.tensor(TABLE)[torch.arange(N_DISPATCH) % 3]
    for s in trace:
        torch.testing.assert_close(s.probs, table / table.sum(1, keepdim=True))
        assert s.decision.ids.shape == (N_DISPATCH, 2) and s.predictions is None
        assert s.velocity.shape == x_T.shape
    untraced = sample(IdentityExperts(router), router, "top-2", x_T, time_grid(4), "heun")
    # bitwise: tracing only records, the same arithmetic runs on the same bytes
    assert torch.equal(untraced.final, result.final) and untraced.trace is None


def test_trace_all_experts_calls_every_expert_once_per_evaluation():
    router = TableRouter(TABLE)
    experts = IdentityExperts(router)
    x_T = _identity_x_T()
    result = sample(experts, router, "top-1", x_T, time_grid(3), trace_all_experts=True)
    assert result.expert_calls == [3, 3, 3, 3]
    for _, _, ids in experts.log:
        assert ids == list(range(N_DISPATCH))  # the whole batch
    for s in result.trace:
        assert s.predictions.shape == (4, *x_T.shape)
        for k in range(4):
            expected = 10 * (k + 1) + torch.arange(float(N_DISPATCH))
            assert torch.equal(s.predictions[k, :, 1, 0, 0], expected)
    plain = sample(IdentityExperts(router), router, "top-1", x_T, time_grid(3))
    # bitwise although the experts saw other batches: IdentityExperts' velocities are small
    # integers, exact in any batch, and both runs merge them with the same arithmetic
    torch.testing.assert_close(result.final, plain.final, rtol=0, atol=0)


# --- refusals ----------------------------------------------------------------------------


def test_missing_routing_inputs_and_bad_arguments_are_refused():
    experts = FieldExperts(constant(0.0), constant(1.0))
    x_T = torch.zeros(2, 1, 2, 2)
    grid = time_grid(2)
    with pytest.raises(ValueError, match=r"needs a router.*ddm submit --store STORE --router"):
        sample(experts, None, "top-1", x_T, grid)
    with pytest.raises(ValueError, match="feature space"):
        sample(experts, None, "nearest-centroid", x_T, grid)
    with pytest.raises(ValueError, match="true cluster"):
        sample(experts, None, "oracle", x_T, grid)
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        sample(experts, None, "uniform", x_T, grid, "rk4")
    with pytest.raises(ValueError, match="unknown routing policy"):
        sample(experts, None, "top-k", x_T, grid)
    with pytest.raises(ValueError, match=r"only 2.*1 <= K <= 2"):
        sample(experts, lambda x, t: torch.zeros(2, 2), "top-3", x_T, grid)
    with pytest.raises(ValueError, match=r"shape \(2, 3\), expected \(2, 2\)"):
        sample(experts, lambda x, t: torch.zeros(2, 3), "top-1", x_T, grid)
    with pytest.raises(ValueError, match="labels have shape"):
        sample(experts, None, "uniform", x_T, grid, labels=torch.zeros(3, dtype=torch.long))


RAY_SHELL = {"deployments.py", "app.py", "remote_experts.py", "metrics.py"}


def test_router_service_imports_no_cluster_jobs_and_only_its_serve_shell_imports_ray():
    root = Path(__file__).parents[1] / "router_service"
    files = sorted(root.glob("*.py"))
    assert {f.name for f in files} >= {"policies.py", "sampler.py", "local_experts.py"}
    for f in files:
        banned = {"cluster_jobs"} if f.name in RAY_SHELL else {"ray", "cluster_jobs"}
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in banned, f"{f.name}: {name}"


# --- LocalExperts on a real tiny store ---------------------------------------------------


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory) -> Path:
    """digits at 16x16, K=2, both experts and the router trained for 3 steps. Read-only."""
    from conftest import build_tiny_ddm

    root = tmp_path_factory.mktemp("local-experts") / "store"
    build_tiny_ddm(root, clusters=2, image_size=16, router_lr=None)
    return root


@pytest.fixture
def store_copy(trained_store, tmp_path) -> Path:
    dest = tmp_path / "store"
    shutil.copytree(trained_store, dest)
    return dest


def test_local_experts_predict_and_sample(trained_store):
    from router_service.local_experts import LocalExperts

    local = LocalExperts(trained_store)
    assert local.num_experts == 2 and local.image_shape == (1, 16, 16)
    assert local.router is not None and local.features.num_clusters == 2
    x = initial_noise(3, local.image_shape, seed=0)
    v = local.predict(1, x, torch.full((3,), 0.5), None)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert local.calls == [0, 1]

    x_T = initial_noise(4, local.image_shape, seed=1)
    runs = [sample(local, local.router, "top-1", x_T, time_grid(3), "heun") for _ in range(2)]
    assert runs[0].images.shape == (4, 1, 16, 16) and torch.isfinite(runs[0].final).all()
    assert float(runs[0].images.abs().max()) <= 1.0
    assert torch.equal(runs[0].final, runs[1].final)  # one process, same code, same bytes
    assert sum(local.calls) == 1 + sum(runs[0].expert_calls) + sum(runs[1].expert_calls)
    assert runs[0].experts_per_step == 1.0

    labels = torch.tensor([0, 1, NULL_LABEL, 9])
    guided = sample(
        local,
        local.router,
        "nearest-centroid-2",
        x_T,
        time_grid(2),
        features=local.features,
        labels=labels,
        guidance=2.0,
    )
    assert torch.isfinite(guided.final).all() and guided.expert_calls == [2, 2]


def test_local_experts_refuse_a_corrupted_expert(store_copy):
    from router_service.local_experts import LocalExperts

    version = json.loads((store_copy / "experts/expert-001/current.json").read_text())["version"]
    weights = store_copy / "experts/expert-001/versions" / version / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="expert-001"):
        LocalExperts(store_copy)


def test_local_experts_without_a_router_or_an_expert(store_copy):
    from router_service.local_experts import LocalExperts

    (store_copy / "router/current.json").unlink()  # the published router's pointer
    local = LocalExperts(store_copy)
    assert local.router is None
    x_T = initial_noise(2, local.image_shape, seed=2)
    with pytest.raises(ValueError, match=r"ddm submit --store STORE --router"):
        sample(local, local.router, "top-1", x_T, time_grid(2))
    assert torch.isfinite(sample(local, None, "uniform", x_T, time_grid(2)).final).all()

    (store_copy / "experts/expert-000/current.json").unlink()
    with pytest.raises(ManifestError, match=r"cluster\(s\) 0 of 2.*ddm submit"):
        LocalExperts(store_copy)
