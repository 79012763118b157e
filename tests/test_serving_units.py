"""Unit tests of the serving layer's pure parts, without Ray or HTTP: batching.py's stacking
of sub-batches, disagreement.py's angular deviation, Policy.select's `available` experts,
the sampler's unavailable-expert handling and per-evaluation stats, RemoteExperts over fake
Serve handles (retries, timeouts, marking experts down), AppArgs, and schemas' errors."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from ddm_nodes.dataset_manifest import NULL_LABEL
from router_service.app_config import AppArgs
from router_service.batching import chunks, samples_in, split, stack
from router_service.disagreement import angular_deviation
from router_service.policies import NO_EXPERT, RoutingDecision, RoutingError, get_policy
from router_service.remote_experts import RemoteExperts
from router_service.sampler import EvaluationStats, ExpertUnavailable, sample, time_grid
from router_service.schemas import Limits, RequestError, SampleRequest, parse
from router_service.service import Admission, QueueTimeout

# --- batching ------------------------------------------------------------------------------


def _sub_batch(n: int, seed: int, labelled: bool):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, 2, 2)).astype(np.float32)
    t = rng.random(n).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int64) if labelled else None
    return x, t, y


def test_stack_then_split_returns_each_sub_batch_in_order():
    items = [_sub_batch(1, 0, True), _sub_batch(3, 1, False), _sub_batch(2, 2, True)]
    assert samples_in(items) == 6
    x, t, y, sizes = stack(items)
    assert sizes == [1, 3, 2] and x.shape == (6, 1, 2, 2) and t.shape == (6,)
    assert y.dtype == np.int64 and y.shape == (6,)
    np.testing.assert_array_equal(y[1:4], [NULL_LABEL] * 3)
    np.testing.assert_array_equal(y[[0, 4, 5]], np.concatenate([items[0][2], items[2][2]]))
    np.testing.assert_array_equal(t, np.concatenate([i[1] for i in items]))
    parts = split(2 * x, sizes)  # as if the forward doubled its input
    assert [len(p) for p in parts] == [1, 3, 2]
    for part, (xi, _, _) in zip(parts, items, strict=True):
        np.testing.assert_array_equal(part, 2 * xi)


@pytest.mark.parametrize(
    "n, most, sizes", [(7, 3, [3, 3, 1]), (6, 3, [3, 3]), (2, 5, [2]), (1, 1, [1])]
)
@pytest.mark.parametrize("labelled", [True, False])
def test_chunks_cut_a_sub_batch_into_pieces_of_at_most_most(n, most, sizes, labelled):
    x, t, y = _sub_batch(n, 3, labelled)
    pieces = chunks((x, t, y), most)
    assert [len(px) for px, _, _ in pieces] == sizes
    assert samples_in(pieces) == n
    np.testing.assert_array_equal(np.concatenate([px for px, _, _ in pieces]), x)
    np.testing.assert_array_equal(np.concatenate([pt for _, pt, _ in pieces]), t)
    if labelled:
        np.testing.assert_array_equal(np.concatenate([py for _, _, py in pieces]), y)
    else:
        assert all(py is None for _, _, py in pieces)


# --- disagreement --------------------------------------------------------------------------


def _rows(*ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def _vectors(*vs) -> torch.Tensor:
    return torch.tensor(vs, dtype=torch.float32).reshape(len(vs), 1, 1, -1)


def _angle(a, b) -> float:
    """Degrees between two plain vectors, computed here from scratch."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return math.degrees(math.acos(max(-1.0, min(1.0, dot / (na * nb)))))


def _expected_deviation(*vs) -> float:
    mean = [sum(c) / len(vs) for c in zip(*vs, strict=True)]
    return sum(_angle(v, mean) for v in vs) / len(vs)


def test_identical_predictions_have_no_disagreement():
    v = _vectors((0.3, -1.2, 2.0), (1.0, 0.5, -0.5))
    out = angular_deviation([(_rows(0, 1), v), (_rows(0, 1), v.clone())], 2)
    torch.testing.assert_close(out, torch.zeros(2, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "vs, degrees",
    [
        (((1.0, 0.0), (0.0, 1.0)), 45.0),  # each 45 degrees from the diagonal mean
        (((2.0, 0.0), (0.0, 1.0)), 45.0),  # atan(1/2) and 90 - atan(1/2)
        (((1.0, 0.0), (-0.5, math.sqrt(3) / 2)), 60.0),  # 120 degrees apart
        (((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)), 30.0),  # 45, 45 and 0 from (2/3, 2/3)
        (((1.0, 0.0), (-0.5, 0.1)), None),  # nearly opposite, not cancelling
    ],
)
def test_angular_deviation_is_the_mean_angle_to_the_mean(vs, degrees):
    expected = _expected_deviation(*vs)
    if degrees is not None:
        assert expected == pytest.approx(degrees)
    predictions = [(_rows(0), _vectors(v)) for v in vs]
    out = angular_deviation(predictions, 1)
    assert float(out[0]) == pytest.approx(expected, abs=1e-4)


def test_rows_scattered_across_experts_and_single_expert_samples():
    # sample 0: experts 0 and 2; sample 1: expert 1 alone; sample 2: experts 0, 1, 2;
    # sample 3: nobody
    a, b, c, d, e = (1.0, 0.0), (0.0, 1.0), (3.0, 4.0), (1.0, 1.0), (-1.0, 2.0)
    predictions = [
        (_rows(0, 2), _vectors(a, c)),  # expert 0
        (_rows(1, 2), _vectors(b, d)),  # expert 1
        (_rows(0, 2), _vectors(c, e)),  # expert 2
    ]
    out = angular_deviation(predictions, 4)
    assert float(out[0]) == pytest.approx(_expected_deviation(a, c), abs=1e-4)
    assert math.isnan(out[1]) and math.isnan(out[3])
    assert float(out[2]) == pytest.approx(_expected_deviation(c, d, e), abs=1e-4)
    assert torch.isnan(angular_deviation([], 3)).all()


# --- Policy.select(available=...) ----------------------------------------------------------

PROBS = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])


def _rows_of(decision: RoutingDecision) -> list[dict[int, float]]:
    out = []
    for ids, ws in zip(decision.ids.tolist(), decision.weights.tolist(), strict=True):
        row = {i: w for i, w in zip(ids, ws, strict=True) if i != NO_EXPERT}
        assert sum(row.values()) == pytest.approx(1.0, abs=1e-6)
        out.append(row)
    return out


def _assert_decision(decision: RoutingDecision, expected: list[dict[int, float]]) -> None:
    got = _rows_of(decision)
    assert [set(r) for r in got] == [set(r) for r in expected]
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, abs=1e-6)


def _available(*live: bool) -> torch.Tensor:
    return torch.tensor(live)


def _select(name: str, available, **inputs) -> RoutingDecision:
    n = next(iter(inputs.values())).shape[0]
    return get_policy(name).select(n, 3, available=available, **inputs)


def test_full_drops_a_missing_expert_and_renormalises_the_others():
    decision = _select("full", _available(True, False, True), probs=PROBS)
    _assert_decision(decision, [{0: 0.2 / 0.5, 2: 0.3 / 0.5}, {0: 0.6 / 0.9, 2: 0.3 / 0.9}])
    assert 1 not in decision.experts()


def test_top_k_takes_the_best_available_experts_and_caps_k():
    decision = _select("top-2", _available(True, False, True), probs=PROBS)
    _assert_decision(decision, [{2: 0.6, 0: 0.4}, {0: 0.6 / 0.9, 2: 0.3 / 0.9}])
    decision = _select("top-1", _available(False, True, True), probs=PROBS)
    _assert_decision(decision, [{1: 1.0}, {2: 1.0}])
    capped = _select("top-3", _available(True, True, False), probs=PROBS)
    _assert_decision(capped, [{0: 0.2 / 0.7, 1: 0.5 / 0.7}, {0: 0.6 / 0.7, 1: 0.1 / 0.7}])


def test_threshold_applies_to_the_renormalised_probabilities():
    # expert 1 out: row 0 becomes (0.4, 0, 0.6), row 1 (2/3, 0, 1/3)
    decision = _select("threshold-0.35", _available(True, False, True), probs=PROBS)
    _assert_decision(decision, [{0: 0.4, 2: 0.6}, {0: 1.0}])


def test_nearest_centroid_skips_a_missing_cluster():
    distances = torch.tensor([[1.0, 2.0, 4.0], [3.0, 0.5, 1.0]])
    one = _select("nearest-centroid", _available(False, True, True), distances=distances)
    _assert_decision(one, [{1: 1.0}, {1: 1.0}])
    two = _select("nearest-centroid-2", _available(True, False, True), distances=distances)
    w = [1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-2))]  # softmax(-d) over the two
    _assert_decision(two, [{0: w[0], 2: 1 - w[0]}, {2: w[1], 0: 1 - w[1]}])
    capped = _select("nearest-centroid-3", _available(False, False, True), distances=distances)
    _assert_decision(capped, [{2: 1.0}, {2: 1.0}])


def test_uniform_spreads_over_the_available_experts():
    decision = get_policy("uniform").select(2, 3, available=_available(True, False, True))
    _assert_decision(decision, [{0: 0.5, 2: 0.5}, {0: 0.5, 2: 0.5}])


def test_oracle_cannot_route_around_a_missing_true_cluster():
    oracle = get_policy("oracle")
    clusters = torch.tensor([0, 2])
    ok = oracle.select(2, 3, clusters=clusters, available=_available(True, False, True))
    _assert_decision(ok, [{0: 1.0}, {2: 1.0}])
    with pytest.raises(RoutingError, match="missing expert"):
        oracle.select(2, 3, clusters=clusters, available=_available(True, True, False))


@pytest.mark.parametrize(
    "name, inputs",
    [
        ("full", {"probs": PROBS}),
        ("top-2", {"probs": PROBS}),
        ("uniform", {}),
        ("nearest-centroid", {"distances": torch.ones(2, 3)}),
        ("oracle", {"clusters": torch.tensor([0, 1])}),
    ],
)
def test_no_available_expert_is_a_routing_error(name, inputs):
    with pytest.raises(RoutingError, match="no expert is available"):
        get_policy(name).select(2, 3, available=_available(False, False, False), **inputs)


def test_available_of_the_wrong_shape_is_refused():
    with pytest.raises(RoutingError, match="available"):
        get_policy("full").select(2, 3, probs=PROBS, available=_available(True, False))


def test_top_k_never_selects_a_missing_expert_when_an_available_one_has_probability_zero():
    probs = torch.tensor([[0.3, 0.0, 0.7]])  # expert 1's probability underflowed to 0
    decision = get_policy("top-2").select(
        1, 3, probs=probs, available=_available(False, True, True)
    )
    assert 0 not in decision.experts()


def test_routing_around_a_missing_expert_never_yields_nan_weights():
    probs = torch.tensor([[1.0, 0.0, 0.0]])
    decision = get_policy("full").select(1, 3, probs=probs, available=_available(False, True, True))
    assert torch.isfinite(decision.weights).all() and 0 not in decision.experts()


# --- the sampler with unavailable experts --------------------------------------------------

N, SHAPE, STEPS = 4, (1, 2, 2), 3


class LinearExperts:
    """Expert k answers v = a_k x + b_k; `failing` experts raise ExpertUnavailable."""

    A, B = (0.5, -0.3, 1.1), (0.2, -0.4, 0.1)

    def __init__(self, failing=()):
        self.failing = set(failing)
        self.asked: list[int] = []

    num_experts = 3

    def predict(self, k, x, t, y):
        self.asked.append(k)
        if k in self.failing:
            raise ExpertUnavailable(k, "no replica (test)")
        return self.A[k] * x + self.B[k]


def _router(dropped: int | None = None):
    """Logits that depend on x (so routing changes along the trajectory); `dropped` gets
    -inf (probability exactly 0)."""

    def router(x, t):
        m = x.flatten(1).mean(dim=1)
        logits = torch.stack([m, -m, 0.5 * torch.ones_like(m) + t], dim=1)
        if dropped is not None:
            logits[:, dropped] = -torch.inf
        return logits

    return router


def _x_T() -> torch.Tensor:
    return torch.randn((N, *SHAPE), generator=torch.Generator().manual_seed(0))


def _run(experts, router, policy, **kwargs):
    return sample(experts, router, policy, _x_T(), time_grid(STEPS), **kwargs)


def test_an_unavailable_expert_fails_the_run_by_default():
    with pytest.raises(ExpertUnavailable) as e:
        _run(LinearExperts(failing={1}), _router(), "full")
    assert e.value.expert_id == 1 and "expert-001" in str(e.value)
    with pytest.raises(ExpertUnavailable):
        _run(LinearExperts(failing={1}), _router(), "full", on_unavailable="fail")


# Not threshold-T: until the missing expert is first selected, its probability still counts
# in the threshold (legitimately), so the runs may differ before it is found missing. For full
# and top-K, routing around an expert nobody selected yet changes nothing.
@pytest.mark.parametrize("policy", ["full", "top-2", "top-1"])
@pytest.mark.parametrize("missing", [0, 1, 2])
def test_renormalize_equals_a_router_that_never_picks_the_missing_expert(policy, missing):
    backend = LinearExperts(failing={missing})
    degraded = _run(backend, _router(), policy, on_unavailable="renormalize")
    reference = _run(LinearExperts(), _router(dropped=missing), policy)
    if policy == "full":  # every expert is asked at the first evaluation
        assert backend.asked[:3] == [0, 1, 2]
    if missing in backend.asked:  # asked once, then left out for the rest of the run
        assert backend.asked.count(missing) == 1 and degraded.missing_experts == [missing]
    else:  # never selected: nothing was missing
        assert degraded.missing_experts == []
    # the same weights by another code path (renormalised over the available experts vs a
    # zero probability from the start): float32 rounding differs by a few ulps of O(1) values
    torch.testing.assert_close(degraded.final, reference.final, atol=1e-6, rtol=1e-6)


def test_every_expert_unavailable_fails_even_with_renormalize():
    with pytest.raises(ExpertUnavailable):
        _run(LinearExperts(failing={0, 1, 2}), _router(), "full", on_unavailable="renormalize")


@pytest.mark.parametrize(
    "policy, failing, per_sample",
    [("top-2", (), 2), ("full", (), 3), ("uniform", (), 3), ("top-2", (2,), 2), ("full", (0,), 2)],
)
def test_on_evaluation_reports_each_evaluation(policy, failing, per_sample):
    stats: list[EvaluationStats] = []
    backend = LinearExperts(failing=failing)
    result = _run(
        backend, _router(), policy, on_unavailable="renormalize", on_evaluation=stats.append
    )
    assert len(stats) == result.evaluations == STEPS
    assert [s.step for s in stats] == list(range(STEPS))
    assert [s.t for s in stats] == pytest.approx(time_grid(STEPS)[:-1].tolist())
    for s in stats:
        assert len(s.routed) == 3 and sum(s.routed) == N * per_sample
        called = {k for k, r in enumerate(s.routed) if r > 0}
        assert set(s.expert_seconds) == called and not called & set(failing)
        assert all(v >= 0 for v in s.expert_seconds.values()) and s.seconds >= 0
        assert s.disagreement >= 0  # every sample has >= 2 experts here
    assert result.disagreement == pytest.approx([s.disagreement for s in stats])


def test_on_evaluation_disagreement_is_nan_with_one_expert_per_sample():
    stats: list[EvaluationStats] = []
    _run(LinearExperts(), _router(), "top-1", on_evaluation=stats.append)
    assert all(math.isnan(s.disagreement) for s in stats)
    assert all(sum(s.routed) == N for s in stats)


@pytest.mark.parametrize(
    "policy, logits",
    [
        ("top-2", [0.0, -math.inf, 1.0]),  # expert 1 (available) has probability exactly 0
        ("full", [200.0, 0.0, 0.0]),  # experts 1 and 2 underflow to 0 next to expert 0
    ],
)
def test_renormalize_never_asks_a_missing_expert_twice(policy, logits):
    class Guarded(LinearExperts):
        def predict(self, k, x, t, y):
            if k in self.failing and k in self.asked:
                raise RuntimeError(f"expert {k} asked again after it was found missing")
            return super().predict(k, x, t, y)

    def router(x, t):
        return torch.tensor(logits).expand(x.shape[0], 3)

    result = _run(Guarded(failing={0}), router, policy, on_unavailable="renormalize")
    assert result.missing_experts == [0] and torch.isfinite(result.final).all()


# --- RemoteExperts over fake Serve handles -------------------------------------------------


class Response:
    """What `handle.predict.remote(...)` returns: awaitable, cancellable."""

    def __init__(self, outcome):
        self.outcome = outcome
        self.cancelled = False

    def __await__(self):
        return self._result().__await__()

    async def _result(self):
        if self.outcome == "hang":
            await asyncio.Event().wait()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome(*self.args)

    def cancel(self):
        self.cancelled = True


class Handle:
    """A fake DeploymentHandle: the n-th call gets outcomes[n] (the last one repeats); an
    outcome is a function of the numpy arguments, an exception to raise, or "hang"."""

    def __init__(self, *outcomes):
        self.outcomes = outcomes
        self.calls: list[tuple] = []
        self.responses: list[Response] = []
        self.predict = SimpleNamespace(remote=self._remote)

    def _remote(self, *args):
        self.calls.append(args)
        response = Response(self.outcomes[min(len(self.calls), len(self.outcomes)) - 1])
        response.args = args
        self.responses.append(response)
        return response


class Recorder:
    def __init__(self):
        self.calls: list[tuple[int, str]] = []

    def expert_call(self, k, outcome):
        self.calls.append((k, outcome))


def _double(x, t, y):
    return 2 * x


def _predict(experts: RemoteExperts, k: int, y=None) -> torch.Tensor:
    x = torch.arange(8, dtype=torch.float32).reshape(2, 1, 2, 2)
    return asyncio.run(experts.predict(k, x, torch.tensor([0.5, 0.25]), y))


def test_remote_predict_sends_numpy_and_returns_a_tensor():
    handle = Handle(_double)
    metrics = Recorder()
    experts = RemoteExperts([Handle(_double), handle], metrics=metrics)
    assert experts.num_experts == 2
    v = _predict(experts, 1, y=torch.tensor([3, NULL_LABEL]))
    assert isinstance(v, torch.Tensor) and v.dtype == torch.float32
    torch.testing.assert_close(v, 2 * torch.arange(8, dtype=torch.float32).reshape(2, 1, 2, 2))
    ((x, t, y),) = handle.calls
    assert all(isinstance(a, np.ndarray) for a in (x, t, y))
    np.testing.assert_array_equal(t, [0.5, 0.25])
    np.testing.assert_array_equal(y, [3, NULL_LABEL])
    assert metrics.calls == [(1, "ok")]
    _predict(experts, 1)
    assert handle.calls[-1][2] is None  # no labels: None, not an array


@pytest.mark.parametrize(
    "error",
    [
        RayActorError(),
        ActorUnavailableError("replica restarting", None),
        ReplicaUnavailableError("replica-abc"),
    ],
)
def test_a_dead_replica_is_retried(error):
    handle = Handle(error, _double)
    metrics = Recorder()
    experts = RemoteExperts([handle], retries=2, metrics=metrics)
    v = _predict(experts, 0)
    assert len(handle.calls) == 2 and v.shape == (2, 1, 2, 2)
    assert experts.healthy(0)
    assert metrics.calls == [(0, "retried"), (0, "ok")]


def test_an_expert_failing_every_retry_is_unavailable_and_marked_down():
    handle = Handle(RayActorError(error_msg="actor died\nwith a traceback"))
    other = Handle(_double)
    experts = RemoteExperts([other, handle], retries=1, down_for_s=60)
    with pytest.raises(ExpertUnavailable) as e:
        _predict(experts, 1)
    assert e.value.expert_id == 1 and len(handle.calls) == 2  # retries + 1 attempts
    assert "2 attempts failed" in str(e.value) and "RayActorError: actor died" in str(e.value)
    assert "traceback" not in str(e.value)  # first line of the error only
    assert not experts.healthy(1) and experts.healthy(0)
    with pytest.raises(ExpertUnavailable, match="marked down"):
        _predict(experts, 1)
    assert len(handle.calls) == 2  # failed at once, the handle was not called
    _predict(experts, 0)  # the other expert is unaffected


def test_an_expert_is_probed_again_after_its_down_window():
    handle = Handle(RayActorError(), RayActorError(), _double)
    experts = RemoteExperts([handle], retries=0, down_for_s=0.02)
    for _ in range(2):
        with pytest.raises(ExpertUnavailable):
            _predict(experts, 0)
        assert not experts.healthy(0)
        asyncio.run(asyncio.sleep(0.03))
        assert experts.healthy(0)
    assert _predict(experts, 0).shape == (2, 1, 2, 2) and len(handle.calls) == 3


def test_a_replica_that_never_answers_times_out_and_is_cancelled():
    handle = Handle("hang")
    metrics = Recorder()
    experts = RemoteExperts([handle], timeout_s=0.05, retries=2, down_for_s=60, metrics=metrics)
    with pytest.raises(ExpertUnavailable, match=r"no replica answered within 0\.05 s"):
        _predict(experts, 0)
    assert len(handle.calls) == 1 and handle.responses[0].cancelled  # no retry after a timeout
    assert not experts.healthy(0) and metrics.calls == [(0, "unavailable")]


def test_a_deployment_that_failed_to_deploy_is_unavailable_without_retry():
    handle = Handle(DeploymentUnavailableError("expert-000"))
    experts = RemoteExperts([handle], retries=2, down_for_s=60)
    with pytest.raises(ExpertUnavailable, match="failed to deploy"):
        _predict(experts, 0)
    assert len(handle.calls) == 1 and not experts.healthy(0)


def test_an_error_that_is_not_a_dead_replica_propagates_without_retry():
    handle = Handle(ValueError("bad input shape"))
    experts = RemoteExperts([handle], retries=2)
    with pytest.raises(ValueError, match="bad input shape"):
        _predict(experts, 0)
    assert len(handle.calls) == 1 and experts.healthy(0)


# --- AppArgs -------------------------------------------------------------------------------


@pytest.fixture
def no_env_key(monkeypatch):
    monkeypatch.delenv("DDM_API_KEY", raising=False)


def test_expert_options_replicas_overrides_and_autoscaling(no_env_key):
    args = AppArgs(store="/s", replicas=2, expert_replicas={1: 4})
    first, second = args.expert_options(0), args.expert_options(1)
    assert first["name"] == "expert-000" and first["num_replicas"] == 2
    assert second["name"] == "expert-001" and second["num_replicas"] == 4
    assert "autoscaling_config" not in first
    assert first["user_config"] == {
        "max_batch": 64,
        "batch_wait_timeout_s": args.batch_wait_timeout_s,
    }
    assert first["ray_actor_options"] == {
        "num_cpus": AppArgs.model_fields["expert_num_cpus"].default,
        "num_gpus": 0.0,
    }

    scaled = AppArgs(
        store="/s",
        expert_replicas={2: 3},
        autoscaling={"min_replicas": 1, "max_replicas": 5, "target_ongoing_requests": 8},
    )
    auto = scaled.expert_options(0)
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 5,
        "target_ongoing_requests": 8,
    }
    fixed = scaled.expert_options(2)  # an explicit count wins over autoscaling
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    router = scaled.router_options()
    assert router["max_ongoing_requests"] == 8 + 32 + 16


def test_serve_cli_strings_are_coerced(no_env_key):
    args = AppArgs(
        store="/s",
        replicas="2",
        expert_replicas={"0": "3"},
        max_batch="16",
        batch_wait_timeout_s="0.01",
        device="cuda",
    )
    assert args.replicas == 2 and args.expert_replicas == {0: 3}
    assert args.batch.max_batch == 16 and args.batch.batch_wait_timeout_s == 0.01
    assert args.expert_num_gpus == 1.0  # cuda without a GPU count: one per replica


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"replica": 2}, "replica"),
        ({"default_strategy": "bogus"}, "bogus"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "max_replicas"),
        ({"autoscaling": {"max": 2}}, "max"),
        ({"replicas": 0}, "replicas"),
        ({"api_key": "short"}, "api_key"),
        ({"limits": {"max_n": "8"}}, "max_n"),  # Limits stays strict inside AppArgs
    ],
)
def test_bad_app_args_are_refused(no_env_key, fields, words):
    with pytest.raises(ValidationError, match=words):
        AppArgs(store="/s", **fields)


def test_allowed_hosts_default_to_loopback_and_take_names_addresses_and_star(no_env_key):
    assert AppArgs(store="/s").allowed_hosts == ["127.0.0.1", "localhost", "::1"]
    hosts = ["ddm.example.org", "10.0.0.5:8000", "[::1]:8000", "::", "0.0.0.0", "*"]
    assert AppArgs(store="/s", allowed_hosts=hosts).allowed_hosts == hosts


@pytest.mark.parametrize("hosts", [[], ["http://ddm.example.org"], ["two words"], ["a/b"]])
def test_bad_allowed_hosts_are_refused_naming_the_field(no_env_key, hosts):
    with pytest.raises(ValidationError, match="allowed_hosts"):
        AppArgs(store="/s", allowed_hosts=hosts)


def test_the_budget_and_deadline_are_limits_in_the_app_args(no_env_key):
    assert Limits().max_expert_evaluations == 64 * 500 * 2 * 2
    assert Limits().request_timeout_s == 300
    given = {"max_expert_evaluations": 1000, "request_timeout_s": 2.5}
    limits = AppArgs.model_validate_json(AppArgs(store="/s", limits=given).model_dump_json()).limits
    assert (limits.max_expert_evaluations, limits.request_timeout_s) == (1000, 2.5)
    for bad in (
        {"max_expert_evaluations": 0},
        {"request_timeout_s": 0},
        {"request_timeout_s": "5"},  # strict, as every Limits field
        {"request_timeout_s": float("inf")},
    ):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            AppArgs(store="/s", limits=bad)


def test_api_key_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("DDM_API_KEY", "from-the-env-123")
    assert AppArgs(store="/s").api_key == "from-the-env-123"
    assert AppArgs(store="/s", api_key="given-key-4567").api_key == "given-key-4567"
    monkeypatch.delenv("DDM_API_KEY")
    assert AppArgs(store="/s").api_key is None


def test_a_short_api_key_from_the_environment_is_refused_too(monkeypatch):
    monkeypatch.setenv("DDM_API_KEY", "abc")
    with pytest.raises(ValidationError, match="DDM_API_KEY must be at least 8"):
        AppArgs(store="/s")


# --- schemas -------------------------------------------------------------------------------


def test_parse_names_an_unknown_field_and_lists_the_allowed_ones():
    with pytest.raises(RequestError) as e:
        parse(SampleRequest, {"n": 2, "colour": "red"})
    assert e.value.field == "colour" and e.value.status == 422
    assert str(e.value) == (
        "colour: unknown field; allowed fields: n, steps, strategy, solver, seed, label, "
        "guidance, temperature, format, on_unavailable, router_fallback"
    )


def test_parse_reads_json_bytes_strictly():
    assert parse(SampleRequest, b'{"n": 3, "label": "7"}').n == 3
    with pytest.raises(RequestError, match=r"n: Input should be a valid integer \(got '3'\)"):
        parse(SampleRequest, b'{"n": "3"}')
    with pytest.raises(RequestError, match="not valid JSON") as e:
        parse(SampleRequest, b"{")
    assert e.value.field is None
    with pytest.raises(RequestError, match="object") as e:
        parse(SampleRequest, b"[1, 2]")
    assert e.value.field is None


def test_limits_check_names_the_field_and_the_range():
    limits = Limits(max_n=8, max_steps=20)
    limits.check(8, 20)
    with pytest.raises(RequestError) as e:
        limits.check(9, 5)
    assert e.value.field == "n" and str(e.value) == "n: must be between 1 and 8 (got 9)"
    with pytest.raises(RequestError) as e:
        limits.check(1, 21, "--n", "--steps")
    assert e.value.field == "--steps"
    assert str(e.value) == "--steps: must be between 1 and 20 (got 21)"
    with pytest.raises(ValidationError):
        Limits(max_body_bytes=100)


def test_replicas_spread_over_nodes_and_the_router_pinned_reach_serve(no_env_key):
    """What serving across nodes needs: every expert's replicas on distinct nodes, the
    ingress on the node the clients call; Serve's own option checks accept both."""
    from router_service.deployments import ExpertServer, RouterServer

    args = AppArgs(
        store="/s", replicas=2, max_replicas_per_node=1, router_resources={"ddm-node-0": 0.01}
    )
    expert, router = args.expert_options(1), args.router_options()
    assert expert["max_replicas_per_node"] == 1 and expert["num_replicas"] == 2
    assert router["ray_actor_options"]["resources"] == {"ddm-node-0": 0.01}
    assert ExpertServer.options(**expert)._replica_config.max_replicas_per_node == 1
    placed = RouterServer.options(**router).ray_actor_options
    assert placed["resources"] == {"ddm-node-0": 0.01}
    plain = AppArgs(store="/s")
    assert "max_replicas_per_node" not in plain.expert_options(0)
    assert "resources" not in plain.router_options()["ray_actor_options"]
    with pytest.raises(ValueError, match="max_replicas_per_node"):
        AppArgs(store="/s", max_replicas_per_node=0)


# --- Admission -----------------------------------------------------------------------------


def test_a_wait_that_times_out_or_is_cancelled_holds_no_slot():
    admission = Admission(max_active=1, max_queued=2, retry_after_s=4)

    async def wait_for_slot():
        async with admission.slot():
            pass

    async def scenario():
        async with admission.slot():
            with pytest.raises(QueueTimeout, match="retry in 4 s") as e:
                async with admission.slot(timeout_s=0.01):
                    raise AssertionError("got a slot that was held")
            assert e.value.retry_after_s == 4 and admission.waiting == 0
            waiter = asyncio.create_task(wait_for_slot())
            while admission.waiting == 0:
                await asyncio.sleep(0.001)
            waiter.cancel()  # as when a client goes away while queued
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert (admission.active, admission.waiting) == (1, 0)
        async with admission.slot(timeout_s=0.01) as queued:  # free again at once
            assert admission.active == 1 and queued < 0.01

    asyncio.run(scenario())
    assert (admission.active, admission.waiting) == (0, 0)
