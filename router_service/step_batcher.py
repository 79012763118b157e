"""Iteration-level scheduling of routed evaluations (Orca's and vLLM's idea, for a DDM).

Every run of the sampler submits each velocity evaluation, an `Evaluation`, to a
`StepBatcher` and awaits its `Routed` answer. The batcher gathers the evaluations of every
run that joined it into a tick and, per tick:

    route     ONE router forward over the concatenated states of every evaluation whose
              policy (or trace) needs probabilities (one per router while a swapped-in
              router and the one before it both have runs in flight); ONE feature-space
              call per feature space for nearest-centroid's x̂_0; then each evaluation's
              own policy on its own rows (a policy that fails fails only its evaluation)
    group     the rows of every evaluation by selected expert
    dispatch  ONE `experts.predict` call per selected expert, all gathered concurrently
              (classifier-free guidance: an evaluation's rows go twice, with its labels and
              with the null label, and the guidance is applied on its own rows)
    scatter   each expert's answer back to its evaluations

Merging, counters and the solver stay with each run (sampler.py). Runs join and leave at
any tick. A tick starts as soon as every joined run is waiting on it (runs in lockstep wait
for nobody), when its rows reach `max_rows`, or `window_s` after it could first have
started (its oldest evaluation's arrival, or the end of the tick before: a run that is slow
to come back is not waited for longer). One tick runs at a time per batcher; what arrives
meanwhile goes to the next.

A backend's `ExpertUnavailable` for expert k is handed to every evaluation that selected k
in that tick (each run then fails or routes again without k, as it asked); any other error
of an expert call or of the router fails the evaluations that needed it.

Per-row independence makes the results the same as a run on its own, within float
tolerance: a denoiser's output row depends on its input row only, so only the order of
floating-point reductions inside a batched forward differs.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ddm_nodes import flow
from ddm_nodes.dataset_manifest import NULL_LABEL
from ddm_nodes.errors import DDMError
from ddm_nodes.names import expert_name
from router_service.policies import Policy, RoutingDecision, RoutingError, get_policy

# logits = router(x_t, t): (N, K), or an awaitable of them
Router = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | Awaitable[torch.Tensor]]
DEFAULT_WINDOW_S = 0.02
DEFAULT_MAX_ROWS = 1024


class ExpertUnavailable(DDMError):
    """No live replica of an expert answered (the Serve backend raises it)."""

    def __init__(self, expert_id: int, reason: str):
        super().__init__(f"{expert_name(expert_id)} is unavailable: {reason}")
        self.expert_id = expert_id
        self.reason = reason


class Experts(Protocol):
    """What the sampler needs from a set of experts, local or remote."""

    @property
    def num_experts(self) -> int: ...

    def predict(
        self, expert_id: int, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor | Awaitable[torch.Tensor]: ...


class Features(Protocol):
    """A feature space with the K cluster centroids: nearest-centroid's input."""

    def distances(self, images: torch.Tensor) -> torch.Tensor: ...  # (N, C, H, W) -> (N, K)


async def resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def guidance_batch(
    x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert call for classifier-free guidance: the batch twice, with its labels and
    with the null label (every caller that guides, so that all guide alike)."""
    return torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL_LABEL)])


def apply_guidance(stacked: torch.Tensor, guidance: float) -> torch.Tensor:
    """v_null + g (v_cond - v_null) from the answer to a `guidance_batch` call."""
    n = stacked.shape[0] // 2
    v_cond, v_null = stacked[:n], stacked[n:]
    return v_null + guidance * (v_cond - v_null)


@dataclass(eq=False)
class Evaluation:
    """One run's velocity evaluation at (x, t), with what its routing needs."""

    x: torch.Tensor  # (n, C, H, W)
    t: torch.Tensor  # (n,)
    policy: Policy
    num_experts: int
    router: Router | None = None  # its run's (None: the batcher's)
    labels: torch.Tensor | None = None  # (n,) long
    guidance: float = 1.0
    features: Features | None = None
    clusters: torch.Tensor | None = None
    previous: torch.Tensor | None = None  # the run's last merged velocity (nearest-centroid)
    missing: frozenset[int] = frozenset()  # unavailable: the run routes around them
    absent: frozenset[int] = frozenset()  # not in the run's DDM (sparse ids): never routed
    want_probs: bool = False  # a trace records router probabilities whatever the policy
    everyone: bool = False  # trace_all_experts: every expert on every row
    submitted: float = field(default_factory=time.perf_counter)
    future: asyncio.Future | None = None

    @property
    def guided(self) -> bool:
        return self.labels is not None and self.guidance != 1


@dataclass
class Routed:
    """A tick's answer to one evaluation."""

    probs: torch.Tensor | None  # (n, K) router probabilities, when the router ran for it
    distances: torch.Tensor | None  # (n, K) nearest-centroid's distances of x̂_0
    decision: RoutingDecision
    ids: list[int]  # experts called for it, ascending
    rows: dict[int, torch.Tensor]  # expert id -> its selected rows
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # id -> (guided) velocity
    failed: list[ExpertUnavailable] = field(default_factory=list)
    expert_seconds: dict[int, float] = field(default_factory=dict)
    waited: float = 0.0  # from submission to its tick's start
    tick: int = 0


@dataclass(frozen=True)
class TickStats:
    """What one tick did: for metrics and the batcher's tests."""

    tick: int
    evaluations: int
    rows: int  # the evaluations' samples (before guidance doubles any)
    expert_rows: dict[int, int]  # rows sent in the one call to each called expert
    seconds: float


class StepBatcher:
    """Gathers the evaluations of concurrent runs into ticks (see the module docstring)."""

    def __init__(
        self,
        experts: Experts,
        router: Router | None,
        window_s: float = DEFAULT_WINDOW_S,
        max_rows: int = DEFAULT_MAX_ROWS,
        on_tick: Callable[[TickStats], None] | None = None,
    ):
        if window_s < 0 or max_rows < 1:
            raise ValueError("window_s must be >= 0 and max_rows >= 1")
        self.experts, self.router = experts, router
        self.window_s, self.max_rows = window_s, max_rows
        self.on_tick = on_tick
        self.runs = 0  # runs joined: each has at most one evaluation pending
        self.ticks = 0
        self._pending: list[Evaluation] = []
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task | None = None
        self._last_tick_end = 0.0

    @property
    def num_experts(self) -> int:
        return int(self.experts.num_experts)

    @asynccontextmanager
    async def joined(self):
        """A run's membership: ticks wait for the evaluations of joined runs only."""
        self.runs += 1
        try:
            yield self
        finally:
            self.runs -= 1
            self._kick()

    async def evaluate(self, ev: Evaluation) -> Routed:
        ev.future = asyncio.get_running_loop().create_future()
        ev.submitted = time.perf_counter()
        self._pending.append(ev)
        self._kick()
        return await ev.future

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()
        loop = asyncio.get_running_loop()
        # a driver of another loop (one that ended mid-tick) will never run again
        stale = self._driver is None or self._driver.done() or self._driver.get_loop() is not loop
        if self._pending and stale:
            self._driver = loop.create_task(self._drive())

    def _ready(self) -> bool:
        rows = sum(len(e.x) for e in self._pending)
        return len(self._pending) >= self.runs or rows >= self.max_rows

    async def _drive(self) -> None:
        self._wake = asyncio.Event()
        while self._pending:
            # the window counts from when this tick could start (its oldest evaluation's
            # arrival, or the end of the tick before it), so runs resuming from that tick
            # have a whole window to rejoin and lockstep survives a slow resume
            deadline = max(self._pending[0].submitted, self._last_tick_end) + self.window_s
            while not self._ready() and (left := deadline - time.perf_counter()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
            take, rows = [], 0
            while self._pending and (not take or rows + len(self._pending[0].x) <= self.max_rows):
                ev = self._pending.pop(0)
                # a cancelled run's evaluation, or one of a loop that ended, is dropped
                if not ev.future.done() and ev.future.get_loop() is asyncio.get_running_loop():
                    take.append(ev)
                    rows += len(ev.x)
            if take:
                try:
                    await self._tick(take)
                except BaseException as e:  # a fault of the tick itself: no run waits forever
                    for ev in take:
                        _settle(ev, error=e)
                    if not isinstance(e, Exception):
                        raise
                finally:
                    self._last_tick_end = time.perf_counter()

    async def _tick(self, items: list[Evaluation]) -> None:
        start = time.perf_counter()
        self.ticks += 1
        tick = self.ticks
        routed: dict[int, Routed] = {}
        try:
            probs = await self._router_probs(items)
            distances = self._distances(items)
        except Exception as e:  # the router or a feature space failed: all of them
            for ev in items:
                _settle(ev, error=e)
            return
        for i, ev in enumerate(items):
            try:
                routed[i] = _decide(ev, probs.get(i), distances.get(i))
            except Exception as e:  # this evaluation's policy: only it fails
                _settle(ev, error=e)
            else:
                routed[i].waited = start - ev.submitted
                routed[i].tick = tick
        users: dict[int, list[int]] = {}  # expert id -> evaluations that call it
        for i, r in routed.items():
            for k in r.ids:
                users.setdefault(k, []).append(i)
        called = sorted(users)
        answers = await asyncio.gather(
            *(self._call(k, [(items[i], routed[i]) for i in users[k]]) for k in called),
            return_exceptions=True,
        )
        errors: dict[int, BaseException] = {}
        for k, answer in zip(called, answers, strict=True):
            if isinstance(answer, ExpertUnavailable):
                for i in users[k]:
                    routed[i].failed.append(answer)
            elif isinstance(answer, BaseException):
                for i in users[k]:
                    errors.setdefault(i, answer)
        for i, r in routed.items():
            if i in errors:
                _settle(items[i], error=errors[i])
            else:
                _settle(items[i], result=r)
        if self.on_tick is not None:
            self.on_tick(
                TickStats(
                    tick=tick,
                    evaluations=len(items),
                    rows=sum(len(ev.x) for ev in items),
                    expert_rows={
                        k: sum(_call_rows(items[i], routed[i], k) for i in users[k]) for k in called
                    },
                    seconds=time.perf_counter() - start,
                )
            )

    async def _router_probs(self, items: list[Evaluation]) -> dict[int, torch.Tensor]:
        """Router probabilities for the evaluations that need them: one forward per router
        (runs admitted before and after a router was swapped in each keep theirs)."""
        groups: list[tuple[Router, list[int]]] = []
        for i, ev in enumerate(items):
            router = ev.router if ev.router is not None else self.router
            if router is None or not (ev.policy.needs == "router" or ev.want_probs):
                continue
            # == : a bound method is a new object at every access, equal to the others
            same = next((g for g in groups if g[0] == router), None)
            if same is None:
                groups.append((router, [i]))
            else:
                same[1].append(i)
        out: dict[int, torch.Tensor] = {}
        for router, need in groups:
            x = torch.cat([items[i].x for i in need])
            t = torch.cat([items[i].t.to(x.dtype) for i in need])
            with torch.no_grad():
                logits = await resolve(router(x, t))
            probs = torch.softmax(logits.float(), dim=-1).cpu()
            out.update(zip(need, probs.split([len(items[i].x) for i in need]), strict=True))
        return out

    @staticmethod
    def _distances(items: list[Evaluation]) -> dict[int, torch.Tensor]:
        """nearest-centroid's distances of each x̂_0, one call per feature space."""
        spaces: dict[int, list[int]] = {}
        for i, ev in enumerate(items):
            if ev.policy.needs == "features" and ev.previous is not None:
                spaces.setdefault(id(ev.features), []).append(i)
        out: dict[int, torch.Tensor] = {}
        for group in spaces.values():
            x0 = torch.cat(
                [flow.denoised(items[i].x, items[i].t, items[i].previous) for i in group]
            )
            d = items[group[0]].features.distances(x0).float().cpu()
            out.update(zip(group, d.split([len(items[i].x) for i in group]), strict=True))
        return out

    async def _call(self, k: int, users: Sequence[tuple[Evaluation, Routed]]) -> None:
        """ONE predict call to expert k with every user's rows; scatters the answer."""
        xs, ts, ys, sizes = [], [], [], []
        labelled = any(ev.labels is not None for ev, _ in users)
        for ev, r in users:
            rows = r.rows[k] if not ev.everyone else None
            x, t = (ev.x, ev.t) if rows is None else (ev.x[rows], ev.t[rows])
            y = None
            if labelled:
                y = ev.labels if ev.labels is not None else torch.full_like(ev.t, NULL_LABEL)
                y = y.long() if rows is None else y[rows].long()
            if ev.guided:
                x, t, y = guidance_batch(x, t, y)
            xs.append(x)
            ts.append(t.to(ev.x.dtype))
            ys.append(y)
            sizes.append(len(x))
        start = time.perf_counter()
        v = await resolve(
            self.experts.predict(
                k, torch.cat(xs), torch.cat(ts), torch.cat(ys) if labelled else None
            )
        )
        seconds = time.perf_counter() - start
        for (ev, r), part in zip(users, v.split(sizes), strict=True):
            r.outputs[k] = apply_guidance(part, ev.guidance) if ev.guided else part
            r.expert_seconds[k] = seconds


def _call_rows(ev: Evaluation, r: Routed, k: int) -> int:
    n = len(ev.x) if ev.everyone else len(r.rows[k])
    return 2 * n if ev.guided else n


def _decide(ev: Evaluation, probs: torch.Tensor | None, distances: torch.Tensor | None) -> Routed:
    """Evaluation `ev`'s own policy on its own rows."""
    n, K = len(ev.x), ev.num_experts
    available = None
    if ev.missing or ev.absent:
        available = torch.ones(K, dtype=torch.bool)
        available[sorted(ev.missing | ev.absent)] = False
    if ev.policy.needs == "features" and ev.previous is None:
        # no velocity yet, so no x̂_0 to embed
        decision = get_policy("uniform").select(n, K, available=available)
    else:
        clusters = None if ev.clusters is None else ev.clusters.cpu()
        decision = ev.policy.select(
            n, K, probs=probs, distances=distances, clusters=clusters, available=available
        )
    if (ev.missing | ev.absent) & set(decision.experts()):
        raise RoutingError(f"routing selected missing experts {sorted(ev.missing)}")
    ids = sorted(set(range(K)) - ev.absent) if ev.everyone else decision.experts()
    rows = {k: decision.rows(k).to(ev.x.device) for k in ids}
    return Routed(probs=probs, distances=distances, decision=decision, ids=ids, rows=rows)


def _settle(ev: Evaluation, result: Routed | None = None, error: BaseException | None = None):
    if ev.future.done():  # its run was cancelled meanwhile
        return
    if error is not None:
        ev.future.set_exception(error)
    else:
        ev.future.set_result(result)
