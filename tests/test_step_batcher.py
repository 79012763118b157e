"""The router's step batcher (router_service/step_batcher.py) on a counting fake backend:
across concurrent runs with different policies, step counts, labels and solvers, a tick
makes at most one call per expert and one router forward, runs join and leave at any
tick, and every run's images equal the same run sampled alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from router_service.sampler import ExpertUnavailable, sample, sample_async, time_grid
from router_service.step_batcher import StepBatcher, TickStats

K, SHAPE = 4, (1, 4, 4)
TOL = 1e-5  # float32: a batched row and a row alone differ in reduction order only


class Counting:
    """Row-wise experts v_k(x, t, y) and a row-wise router; records every call with the
    batcher's tick number at the time (`batcher` is set once it exists)."""

    def __init__(self, delay_s: float = 0.002, down: set[int] = frozenset()):
        g = torch.Generator().manual_seed(0)
        d = SHAPE[0] * SHAPE[1] * SHAPE[2]
        self.a = torch.rand(K, generator=g) * 0.5 - 1.0
        self.b = torch.randn(K, d, generator=g) * 0.3
        self.w = torch.randn(d, K, generator=g)
        self.delay_s, self.down = delay_s, set(down)
        self.batcher: StepBatcher | None = None
        self.calls: list[tuple[int, int, int]] = []  # (tick, expert, rows)
        self.router_calls: list[int] = []  # tick of each router forward

    @property
    def num_experts(self) -> int:
        return K

    def _tick(self) -> int:
        return -1 if self.batcher is None else self.batcher.ticks

    async def predict(self, k, x, t, y):
        self.calls.append((self._tick(), k, len(x)))
        await asyncio.sleep(self.delay_s)  # other runs' evaluations arrive meanwhile
        if k in self.down:
            raise ExpertUnavailable(k, "no replica")
        label = torch.zeros(len(x)) if y is None else (y.float() + 1).clamp(min=0) * 0.1
        shift = (self.b[k] * (t[:, None] + label[:, None])).reshape(len(x), *SHAPE)
        return self.a[k] * x + shift

    def router(self, x, t):
        self.router_calls.append(self._tick())
        return x.flatten(1) @ self.w + t[:, None]


class Centroids:
    def __init__(self):
        self.c = torch.randn(
            K, SHAPE[0] * SHAPE[1] * SHAPE[2], generator=torch.Generator().manual_seed(1)
        )

    def distances(self, images):
        return torch.cdist(images.flatten(1), self.c)


# (policy, n, steps, solver, label, guidance): eight runs unlike each other
RUNS = [
    ("top-1", 3, 4, "euler", None, 1.0),
    ("top-2", 5, 7, "euler", None, 1.0),
    ("full", 2, 5, "heun", None, 1.0),
    ("threshold-0.3", 4, 6, "euler", None, 1.0),
    ("uniform", 1, 3, "euler", None, 1.0),
    ("nearest-centroid", 6, 8, "euler", None, 1.0),
    ("top-2", 3, 6, "heun", 2, 3.0),
    ("full@0.5", 2, 9, "euler", 1, 1.0),
]


def kwargs_of(run, features):
    policy, n, steps, solver, label, guidance = run
    labels = None if label is None else torch.full((n,), label, dtype=torch.long)
    x_T = torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(n * 31 + steps))
    return dict(
        policy=policy,
        x_T=x_T,
        time_grid=time_grid(steps),
        solver=solver,
        labels=labels,
        guidance=guidance,
        features=features,
    )


def alone(run, features):
    backend = Counting(delay_s=0)
    return sample(backend, backend.router, **kwargs_of(run, features)).final


def test_concurrent_runs_share_ticks_and_equal_their_runs_alone():
    features = Centroids()
    backend = Counting()
    ticks: list[TickStats] = []
    batcher = StepBatcher(backend, backend.router, window_s=0.05, on_tick=ticks.append)
    backend.batcher = batcher

    async def main():
        async def one(i, run):
            if i >= 6:  # two runs join while the others are in flight
                await asyncio.sleep(0.02)
            kw = kwargs_of(run, features)
            return await sample_async(backend, backend.router, **kw, batcher=batcher)

        return await asyncio.gather(*(one(i, r) for i, r in enumerate(RUNS)))

    results = asyncio.run(main())
    per_tick = [(tick, k) for tick, k, _ in backend.calls]
    assert len(per_tick) == len(set(per_tick)), "an expert was called twice in one tick"
    assert len(backend.router_calls) == len(set(backend.router_calls)) <= len(ticks)
    evaluations = sum(r.evaluations for r in results)
    assert sum(s.evaluations for s in ticks) == evaluations
    assert max(s.evaluations for s in ticks) >= 6, [s.evaluations for s in ticks]
    assert len(ticks) < evaluations / 2  # batching happened, not one tick per evaluation
    # runs left at different ticks: the last ticks carry only the longest runs
    assert ticks[-1].evaluations < len(RUNS)
    for s in ticks:
        assert all(rows <= 2 * s.rows for rows in s.expert_rows.values())
    for run, result in zip(RUNS, results, strict=True):
        expected = alone(run, features)
        assert torch.allclose(result.final, expected, atol=TOL, rtol=0), run
        assert result.evaluations == run[2] * (2 if run[3] == "heun" else 1) - (
            1 if run[3] == "heun" else 0
        )


def test_a_run_alone_is_not_kept_waiting_by_the_window():
    backend = Counting(delay_s=0)
    batcher = StepBatcher(backend, backend.router, window_s=5.0)
    backend.batcher = batcher

    async def main():
        kw = kwargs_of(RUNS[1], None)
        return await asyncio.wait_for(
            sample_async(backend, backend.router, **kw, batcher=batcher), timeout=4
        )

    result = asyncio.run(main())  # a 5 s window would time out if it were waited
    assert batcher.ticks == result.evaluations


def test_an_unavailable_expert_fails_or_reroutes_each_run_as_it_asked():
    backend = Counting(down={2})
    batcher = StepBatcher(backend, backend.router, window_s=0.05)
    backend.batcher = batcher
    run = ("uniform", 3, 4, "euler", None, 1.0)

    async def main():
        kw = kwargs_of(run, None)
        failing = sample_async(backend, backend.router, **kw, batcher=batcher)
        rerouted = sample_async(
            backend, backend.router, **kw, on_unavailable="renormalize", batcher=batcher
        )
        return await asyncio.gather(failing, rerouted, return_exceptions=True)

    failed, rerouted = asyncio.run(main())
    assert isinstance(failed, ExpertUnavailable) and failed.expert_id == 2
    assert rerouted.missing_experts == [2]
    assert rerouted.expert_calls[2] == 1  # tried once, then left out
    assert batcher.runs == 0


def test_a_cancelled_run_leaves_the_others_running():
    backend = Counting()
    batcher = StepBatcher(backend, backend.router, window_s=0.05)
    backend.batcher = batcher

    async def main():
        kw = kwargs_of(RUNS[1], None)
        doomed = asyncio.ensure_future(sample_async(backend, backend.router, **kw, batcher=batcher))
        kept = asyncio.ensure_future(sample_async(backend, backend.router, **kw, batcher=batcher))
        await asyncio.sleep(0.01)
        doomed.cancel()
        return await kept, doomed

    kept, doomed = asyncio.run(main())
    assert doomed.cancelled()
    assert torch.allclose(kept.final, alone(RUNS[1], None), atol=TOL, rtol=0)
    assert batcher.runs == 0


def test_a_batcher_of_other_experts_is_refused():
    backend, other = Counting(), Counting()
    with pytest.raises(ValueError, match="other experts"):
        sample(
            backend,
            backend.router,
            **kwargs_of(RUNS[0], None),
            batcher=StepBatcher(other, other.router),
        )
