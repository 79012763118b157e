"""Prometheus metrics of the serving path, through Ray's metrics exporter.

Every Serve replica is a Ray worker process; `ray.util.metrics` objects created in it are
exported by the node's metrics agent at the head's metrics export port (names get Ray's
`ray_` prefix, counters a `_total` suffix), beside Ray Serve's own `ray_serve_*` series, so
one Prometheus scrape target covers the router and every expert replica. Outside Ray the
same objects are inert, so the service runs unchanged in unit tests.

The `strategy` label comes from a bounded set (policies.strategy_label: `threshold` for
every threshold-T, `nearest-centroid` for every K, `top-1` .. `top-8` then `top-k`, no
temperatures), since each distinct value is a new series and requests choose the name.

Router (`RouterMetrics`): requests by route, strategy and status; request latency; per
evaluation latency; expert calls and their latency by expert and outcome; samples routed
to each expert by step bucket; selected-expert disagreement; errors by kind; degraded
requests by missing expert; requests in flight and queued; per step-batcher tick, the
evaluations (requests) it gathered and the rows of each expert call it made.
Expert replicas (`ExpertMetrics`): samples and requests per `@serve.batch` forward, and
the forward's latency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ddm_nodes.names import expert_name
from router_service.policies import strategy_label
from router_service.sampler import EvaluationStats
from router_service.step_batcher import TickStats

LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
STEP_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
DEGREES = [1, 2, 5, 10, 15, 20, 30, 45, 60, 90]
SAMPLES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
STEP_BUCKETS = 5  # t in [0, 1] in fifths: "0.0-0.2" (nearly data) .. "0.8-1.0" (noise)


def step_bucket(t: float) -> str:
    i = min(max(int(t * STEP_BUCKETS), 0), STEP_BUCKETS - 1)
    return f"{i / STEP_BUCKETS:.1f}-{(i + 1) / STEP_BUCKETS:.1f}"


@dataclass(frozen=True)
class MetricKinds:
    """The metric classes, with `ray.util.metrics`' constructors and methods (inc, observe,
    set with `tags=`); another set (a recording one in tests) sees every series and label."""

    Counter: Any
    Gauge: Any
    Histogram: Any


def ray_metric_kinds() -> MetricKinds:
    from ray.util.metrics import Counter, Gauge, Histogram

    return MetricKinds(Counter, Gauge, Histogram)


class RouterMetrics:
    def __init__(self, kinds: MetricKinds | None = None) -> None:
        kinds = kinds or ray_metric_kinds()
        Counter, Gauge, Histogram = kinds.Counter, kinds.Gauge, kinds.Histogram

        self.requests = Counter(
            "ddm_serve_requests",
            "sampling HTTP requests by route, strategy and status code",
            tag_keys=("route", "strategy", "status"),
        )
        self.latency = Histogram(
            "ddm_serve_request_seconds",
            "request latency, queueing included",
            boundaries=LATENCY_S,
            tag_keys=("route", "strategy"),
        )
        self.step = Histogram(
            "ddm_serve_step_seconds",
            "one routed evaluation: route, fan out to experts, merge",
            boundaries=STEP_S,
            tag_keys=("strategy",),
        )
        self.expert_calls = Counter(
            "ddm_serve_expert_calls",
            "expert predict calls from the router by outcome (ok, retried, unavailable)",
            tag_keys=("expert", "outcome"),
        )
        self.expert_latency = Histogram(
            "ddm_serve_expert_call_seconds",
            "expert predict call latency as the router awaits it (transport, queue, batch)",
            boundaries=STEP_S,
            tag_keys=("expert",),
        )
        self.routed = Counter(
            "ddm_serve_routed_samples",
            "samples routed to each expert, by step bucket (t: 1 noise, 0 data)",
            tag_keys=("expert", "step_bucket", "strategy"),
        )
        self.disagreement = Histogram(
            "ddm_serve_expert_disagreement_degrees",
            "mean angle between the selected experts' velocities and their mean (>= 2 experts)",
            boundaries=DEGREES,
            tag_keys=("strategy",),
        )
        self.errors = Counter("ddm_serve_errors", "failed requests by kind", tag_keys=("kind",))
        self.degraded = Counter(
            "ddm_serve_degraded_requests",
            "requests answered without an expert that had no live replica",
            tag_keys=("expert",),
        )
        self.tick_evaluations = Histogram(
            "ddm_serve_tick_evaluations",
            "evaluations (one per request in flight) the step batcher gathered into one tick",
            boundaries=SAMPLES,
        )
        self.call_rows = Histogram(
            "ddm_serve_expert_call_rows",
            "rows (samples, doubled under guidance) in one expert call of a tick",
            boundaries=SAMPLES,
            tag_keys=("expert",),
        )
        # exact totals beside the histograms: Ray's exporter rebuilds a histogram's _sum
        # from bucket midpoints, so mean = _sum / _count is off (0.5 for ticks of 1)
        self.ticks = Counter("ddm_serve_ticks", "step-batcher ticks")
        self.tick_gathered = Counter(
            "ddm_serve_tick_gathered_evaluations", "evaluations the step batcher's ticks gathered"
        )
        self.tick_calls = Counter("ddm_serve_tick_expert_calls", "expert calls ticks made")
        self.tick_rows = Counter(
            "ddm_serve_tick_expert_rows", "rows (doubled under guidance) ticks sent to experts"
        )
        self.in_flight = Gauge("ddm_serve_requests_in_flight", "requests being sampled")
        self.queued = Gauge("ddm_serve_requests_queued", "requests waiting for a sampling slot")

    def request(self, route: str, strategy: str, status: int, seconds: float) -> None:
        strategy = strategy_label(strategy)
        self.requests.inc(1, tags={"route": route, "strategy": strategy, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route, "strategy": strategy})

    def evaluation(self, strategy: str, stats: EvaluationStats) -> None:
        strategy = strategy_label(strategy)
        self.step.observe(stats.seconds, tags={"strategy": strategy})
        bucket = step_bucket(stats.t)
        for k, n in enumerate(stats.routed):
            if n:
                tags = {"expert": expert_name(k), "step_bucket": bucket, "strategy": strategy}
                self.routed.inc(n, tags=tags)
        for k, seconds in stats.expert_seconds.items():
            self.expert_latency.observe(seconds, tags={"expert": expert_name(k)})
        if not math.isnan(stats.disagreement):
            self.disagreement.observe(stats.disagreement, tags={"strategy": strategy})

    def tick(self, stats: TickStats) -> None:
        self.ticks.inc(1)
        self.tick_gathered.inc(stats.evaluations)
        if stats.expert_rows:
            self.tick_calls.inc(len(stats.expert_rows))
            self.tick_rows.inc(sum(stats.expert_rows.values()))
        self.tick_evaluations.observe(stats.evaluations)
        for k, rows in stats.expert_rows.items():
            self.call_rows.observe(rows, tags={"expert": expert_name(k)})

    def expert_call(self, k: int, outcome: str) -> None:
        self.expert_calls.inc(1, tags={"expert": expert_name(k), "outcome": outcome})

    def error(self, kind: str) -> None:
        self.errors.inc(1, tags={"kind": kind})

    def degraded_request(self, missing: list[int]) -> None:
        for k in missing:
            self.degraded.inc(1, tags={"expert": expert_name(k)})

    def load(self, in_flight: int, queued: int) -> None:
        self.in_flight.set(in_flight)
        self.queued.set(queued)


class ExpertMetrics:
    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        # exact totals (see RouterMetrics.ticks): mean batch = samples / forwards
        self.forwards = Counter(
            "ddm_serve_batch_forwards", "batched expert forwards", tag_keys=("expert",)
        )
        self.forward_samples = Counter(
            "ddm_serve_batch_forward_samples", "samples in batched forwards", tag_keys=("expert",)
        )

        self.batch_samples = Histogram(
            "ddm_serve_batch_samples",
            "samples stacked into one expert forward by @serve.batch",
            boundaries=SAMPLES,
            tag_keys=("expert",),
        )
        self.batch_requests = Histogram(
            "ddm_serve_batch_requests",
            "sub-batches (requests' steps) stacked into one expert forward",
            boundaries=SAMPLES,
            tag_keys=("expert",),
        )
        self.forward = Histogram(
            "ddm_serve_expert_forward_seconds",
            "one batched expert forward pass",
            boundaries=STEP_S,
            tag_keys=("expert",),
        )

    def batch(self, k: int, samples: int, requests: int, seconds: float) -> None:
        tags = {"expert": expert_name(k)}
        self.forwards.inc(1, tags=tags)
        self.forward_samples.inc(samples, tags=tags)
        self.batch_samples.observe(samples, tags=tags)
        self.batch_requests.observe(requests, tags=tags)
        self.forward.observe(seconds, tags=tags)
