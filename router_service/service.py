"""The sampling service behind the HTTP API, free of Ray and of HTTP: it admits a request
(bounded concurrency and queue), plans it against the store's models, runs the one
sampler with whatever experts backend it was given (Serve handles in the router
deployment, local modules in tests), and shapes the answer.

Backpressure: at most `max_active` requests sample at once (their expert calls interleave,
which is what lets the expert replicas batch across requests) and at most `max_queued`
more wait for a slot; past that a request is refused at once with `Overloaded` (HTTP 503
with Retry-After) instead of piling up.

Deadline: a request has `limits.request_timeout_s` from when the service takes it to its
answer. Still waiting for a slot then, it leaves the queue with `QueueTimeout` (an
`Overloaded`) before any sampling; still sampling, the run is cancelled and
`DeadlineExceeded` raised. Either way its slot (or its place in the queue) is given back.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from ddm_nodes.errors import DDMError
from ddm_nodes.names import expert_name
from ddm_nodes.pixels import npy_bytes, pngs
from router_service import planning
from router_service.expert_set import ExpertSet
from router_service.metrics import RouterMetrics
from router_service.policies import get_policy, strategy_label
from router_service.sampler import Decoder, EvaluationStats, Experts, SampleResult
from router_service.schemas import (
    DEFAULT_ALLOWED_HOSTS,
    ExpertsResponse,
    ExpertStatus,
    ImageData,
    ImagesRequest,
    ImagesResponse,
    Limits,
    RequestError,
    SampleRequest,
    SampleResponse,
    Timing,
    Usage,
)
from router_service.step_batcher import DEFAULT_MAX_ROWS, DEFAULT_WINDOW_S, StepBatcher
from router_service.store_models import StoreModels

SERVED_MODEL = "ddm"  # the one `model` name /v1/images/generations accepts


class Overloaded(DDMError):
    """Every sampling slot is busy and the queue is full: try again later."""

    def __init__(self, retry_after_s: int, message: str | None = None):
        super().__init__(message or f"the service is at capacity; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class QueueTimeout(Overloaded):
    """No sampling slot came free before the request's deadline; nothing was sampled."""

    def __init__(self, retry_after_s: int, timeout_s: float):
        super().__init__(
            retry_after_s,
            f"no sampling slot came free within limits.request_timeout_s ({timeout_s:g} s): "
            f"the service is at capacity; retry in {retry_after_s} s",
        )


class DeadlineExceeded(DDMError):
    """Sampling ran past the request's deadline and was cancelled."""

    def __init__(self, timeout_s: float):
        super().__init__(
            f"the request did not finish within limits.request_timeout_s ({timeout_s:g} s, "
            "queueing included) and was cancelled; ask for fewer images (n) or steps, a "
            "sparser strategy (top-1, top-2) or solver euler"
        )


class Admission:
    """At most `max_active` holders at once and `max_queued` waiting; beyond, Overloaded."""

    def __init__(self, max_active: int, max_queued: int, retry_after_s: int = 1):
        if max_active < 1 or max_queued < 0:
            raise ValueError("max_active must be >= 1 and max_queued >= 0")
        self.max_active, self.max_queued = max_active, max_queued
        self.retry_after_s = retry_after_s
        self.active = 0
        self.waiting = 0
        self._slots: asyncio.Semaphore | None = None

    @asynccontextmanager
    async def slot(self, timeout_s: float | None = None) -> AsyncIterator[float]:
        """Hold a sampling slot; yields the seconds spent waiting for it. No slot within
        `timeout_s`: QueueTimeout, holding nothing."""
        if self.active + self.waiting >= self.max_active + self.max_queued:
            raise Overloaded(self.retry_after_s)
        if self._slots is None:  # made in the running loop
            self._slots = asyncio.Semaphore(self.max_active)
        start = time.perf_counter()
        self.waiting += 1
        wait = asyncio.timeout(timeout_s)
        try:
            # a cancelled acquire takes no slot (asyncio.Semaphore passes a wake-up it got
            # while being cancelled on to the next waiter)
            async with wait:
                await self._slots.acquire()
        except TimeoutError:
            if not wait.expired():
                raise
            raise QueueTimeout(self.retry_after_s, timeout_s) from None
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            yield time.perf_counter() - start
        finally:
            self.active -= 1
            self._slots.release()


@dataclass
class Sampled:
    plan: planning.Plan
    result: SampleResult
    timing: Timing


ReplicaCounts = Callable[[], Awaitable[dict[str, int]]]


class SamplingService:
    """Plans, admits and runs sampling requests; see the module docstring."""

    def __init__(
        self,
        models: StoreModels,
        experts: Experts,
        limits: Limits | None = None,
        admission: Admission | None = None,
        metrics: RouterMetrics | None = None,
        api_key: str | None = None,
        replica_counts: ReplicaCounts | None = None,
        default_strategy: str = planning.DEFAULT_STRATEGY,
        decoder: Decoder | None = None,
        allowed_hosts: Sequence[str] = DEFAULT_ALLOWED_HOSTS,
        request_ids_from_proxy: bool = False,
        step_window_s: float = DEFAULT_WINDOW_S,
        step_max_rows: int = DEFAULT_MAX_ROWS,
    ):
        self.models = models
        self.decoder = decoder  # None: the models' own (in-process), if any
        self.experts = experts
        self.limits = limits or Limits()
        self.admission = admission or Admission(max_active=8, max_queued=32)
        self.metrics = metrics
        self.api_key = api_key or None
        self.replica_counts = replica_counts
        self.default_strategy = get_policy(default_strategy).name
        # the HTTP edge's: Host headers /v1/* answer ("*": any), and whether Ray Serve's
        # proxy gives each request its id (and the X-Request-ID response header)
        self.allowed_hosts = tuple(allowed_hosts)
        self.request_ids_from_proxy = request_ids_from_proxy
        # the DDM new requests are admitted with; a changed registry waits in `pending`
        # until every expert of it has a running replica (`offer`)
        self.expert_set: ExpertSet = models.expert_set
        self.pending: ExpertSet | None = None
        # every admitted request's evaluations go through one batcher: one router forward
        # and one call per selected expert per tick, across requests
        self.batcher = StepBatcher(
            experts,
            models.router,
            window_s=step_window_s,
            max_rows=step_max_rows,
            on_tick=None if metrics is None else metrics.tick,
        )

    async def _sample(self, request: SampleRequest, steps_field: str = "steps") -> Sampled:
        start = time.perf_counter()
        plan = planning.plan(
            request,
            self.models,
            await self.current_set(),
            self.limits,
            self.default_strategy,
            steps_field,
        )
        strategy = strategy_label(plan.policy)
        evaluations: list[EvaluationStats] = []

        def hook(stats: EvaluationStats) -> None:
            evaluations.append(stats)
            if self.metrics is not None:
                self.metrics.evaluation(strategy, stats)

        timeout_s = self.limits.request_timeout_s
        async with self.admission.slot(timeout_s) as queued:  # planning took microseconds
            self._report_load()
            deadline = asyncio.timeout(timeout_s - (time.perf_counter() - start))
            try:
                async with deadline:
                    result = await planning.run(
                        plan, self.experts, self.models, hook, self.decoder, self.batcher
                    )
            except TimeoutError:
                if not deadline.expired():  # a TimeoutError of the backend's own
                    raise
                raise DeadlineExceeded(timeout_s) from None
            finally:
                self._report_load()
        total = time.perf_counter() - start
        if result.missing_experts and self.metrics is not None:
            self.metrics.degraded_request(result.missing_experts)
        steps_ms = [1000 * e.seconds for e in evaluations]
        router_ms = [1000 * e.router_seconds for e in evaluations]
        timing = Timing(
            total_s=round(total, 4),
            per_step_ms=round(1000 * (total - queued) / request.steps, 3),
            queued_s=round(queued, 4),
            evaluation_ms_p50=_quantile(steps_ms, 0.5),
            evaluation_ms_p95=_quantile(steps_ms, 0.95),
            router_ms_p50=_quantile(router_ms, 0.5),
            router_ms_p95=_quantile(router_ms, 0.95),
            tick_wait_ms_p50=_quantile([1000 * e.waited for e in evaluations], 0.5),
        )
        return Sampled(plan, result, timing)

    def offer(self, expert_set: ExpertSet) -> None:
        """A new expert set (the registry changed, or a router was swapped in): requests
        admitted from when it is served (`current_set`) sample with it; those admitted
        before keep theirs."""
        if expert_set.key == self.expert_set.key and self.pending is None:
            return
        self.pending = expert_set

    async def current_set(self) -> ExpertSet:
        """The set new requests get: the pending one as soon as each of its experts has a
        running replica (an added expert's deployment takes seconds to start)."""
        pending = self.pending  # concurrent requests await the counts: keep this one's view
        if pending is not None:
            counts = await self.replica_counts() if self.replica_counts else {}
            running = self.replica_counts is None or all(
                counts.get(n, 0) > 0 for n in pending.names
            )
            if running and self.pending is pending:  # not replaced by a newer one meanwhile
                self.expert_set, self.pending = pending, None
        return self.expert_set

    def _report_load(self) -> None:
        if self.metrics is not None:
            self.metrics.load(self.admission.active, self.admission.waiting)

    @staticmethod
    def _usage(s: Sampled) -> Usage:
        result = s.result
        return Usage(
            expert_calls={expert_name(k): result.expert_calls[k] for k in s.plan.experts.ids},
            experts_per_step=round(result.experts_per_step, 4),
            evaluations=result.evaluations,
        )

    async def samples(self, request: SampleRequest) -> SampleResponse:
        s = await self._sample(request)
        images = s.result.images
        encoded = {}
        if request.format == "png":
            encoded["images"] = [base64.b64encode(png).decode() for png in pngs(images)]
        else:
            encoded["npy"] = base64.b64encode(npy_bytes(images)).decode()
        return SampleResponse(
            strategy=s.plan.policy.name,
            fallback_from=s.plan.fallback_from,
            experts=s.plan.experts.names,
            solver=request.solver,
            n=request.n,
            steps=request.steps,
            seed=s.plan.seed,
            label=s.plan.label,
            format=request.format,
            shape=list(images.shape),
            usage=self._usage(s),
            timing=s.timing,
            degraded=bool(s.result.missing_experts),
            missing_experts=[expert_name(k) for k in s.result.missing_experts],
            **encoded,
        )

    async def images(self, request: ImagesRequest) -> ImagesResponse:
        if request.model is not None and request.model != SERVED_MODEL:
            raise RequestError("model", f"this service serves {SERVED_MODEL!r} only")
        c, h, w = self.models.image_shape
        if request.size is not None and request.size != f"{w}x{h}":
            raise RequestError("size", f"the models make {w}x{h} images; use size {w}x{h}")
        self.limits.check(request.n, request.num_inference_steps, "n", "num_inference_steps")
        label = planning.match_prompt(self.models.manifest.class_names, request.prompt)
        sample_request = SampleRequest(
            n=request.n,
            steps=request.num_inference_steps,
            strategy=request.strategy,
            seed=request.seed,
            label=label,
            guidance=request.guidance_scale,
            on_unavailable=request.on_unavailable,
            router_fallback=request.router_fallback,
        )
        s = await self._sample(sample_request, steps_field="num_inference_steps")
        name = self.models.manifest.class_names[label]
        return ImagesResponse(
            created=int(time.time()),
            data=[
                ImageData(b64_json=base64.b64encode(png).decode(), revised_prompt=name)
                for png in pngs(s.result.images)
            ],
            seed=s.plan.seed,
            usage=self._usage(s),
            degraded=bool(s.result.missing_experts),
            missing_experts=[expert_name(k) for k in s.result.missing_experts],
        )

    async def experts_info(self) -> ExpertsResponse:
        served = await self.current_set()
        counts = await self.replica_counts() if self.replica_counts else {}
        rows = []
        for card in served.cards:
            replicas = counts.get(card.name, 1 if self.replica_counts is None else 0)
            healthy = replicas > 0 and _healthy(self.experts, card.id)
            rows.append(
                ExpertStatus(
                    id=card.id,
                    name=card.name,
                    cluster=card.cluster,
                    sha256=card.sha256,
                    preset=card.preset,
                    arch=card.arch,
                    prediction=card.prediction,
                    replicas=replicas,
                    healthy=healthy,
                    source=card.source,
                )
            )
        return ExpertsResponse(
            experts=rows,
            router=served.router is not None,
            router_current=served.router_covers,
            registry=served.version,
            pending=None if self.pending is None else self.pending.names,
            class_names=self.models.manifest.class_names,
        )

    async def ready(self) -> tuple[bool, str]:
        """Ready when every expert has a live replica and is not marked down."""
        info = await self.experts_info()
        down = [e.name for e in info.experts if not e.healthy]
        return (not down, f"no healthy replica: {', '.join(down)}" if down else "ready")


def _quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile, 3 decimals (0.0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 3)


def _healthy(experts: Experts, k: int) -> bool:
    check = getattr(experts, "healthy", None)
    return True if check is None else bool(check(k))
