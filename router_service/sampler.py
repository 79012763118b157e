"""The one sampling loop: flow-matching ODE from noise (t = 1) to data (t = 0), routed.

Every velocity evaluation at (x, t) runs the same five moves:

    route     router probabilities p(k | x, t) (or centroid distances, or oracle clusters)
              -> policy -> RoutingDecision (per sample: expert ids and weights summing to 1)
    group     samples by selected expert
    dispatch  ONE `experts.predict` call per selected expert, all calls gathered
              concurrently; an expert no sample selected is not called
    scatter   each sub-batch's velocities back to its samples
    merge     v(x_n) = sum_k w_nk v_k(x_n), in ascending expert id

The first four happen in a tick of the run's `StepBatcher` (step_batcher.py), which does
them at once for the evaluations of every concurrent run that shares it (the Serve router's
runs do): one router forward and one call per selected expert per tick, however many
requests are in flight. In-process, a run has a batcher of its own.
and the solver turns velocities into steps (see `euler` and `heun`): it receives the run's
`RoutedVelocity`, which performs these moves and keeps the run's counters. Conditioning: with
labels and guidance g != 1, each selected expert gets one call on the stacked batch
[x with labels; x with NULL_LABEL] and applies classifier-free guidance itself,
v_k = v_null + g (v_cond - v_null), before experts are merged (as Paris does). The router
sees (x, t) only.

`experts` is any object with `num_experts` and `predict(expert_id, x_t, t, y) -> v`
(y: (n,) class ids / NULL_LABEL, or None for unconditional), answering either a tensor or
an awaitable of one; the sampler knows nothing of where experts live. `sample_async` is the
core (the Serve router awaits it); `sample` runs it in a fresh event loop for in-process
use. Sync backends are called one after another inside the gather (no threads), so results
are deterministic: the same x_T, policy, grid and weights give the same images every run.

`Models` is what planning a request (planning.py) needs beside the experts: the store's
manifest, router, feature space, image shape and whether the experts take labels.

An expert backend raises `ExpertUnavailable` when no replica of an expert answers. With
`on_unavailable="fail"` (default) the run stops with it; with "renormalize" the expert is
left out for the rest of the run (`Policy.select(available=...)`: weights renormalised
over the others), the evaluation is routed again, and `SampleResult.missing_experts` names
it. `on_evaluation` receives an `EvaluationStats` after every routed evaluation: how many
samples each expert got, the selected experts' disagreement (disagreement.py) and timings;
the Serve router turns these into metrics.

nearest-centroid embeds the denoised estimate x̂_0 = flow.denoised(x, t, v) = x - t v,
with v the merged velocity of the previous evaluation. The first evaluation has no velocity
yet, so it routes `uniform`ly over all experts.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import DDMError
from router_service.disagreement import angular_deviation
from router_service.policies import Policy, RoutingDecision, RoutingError, get_policy
from router_service.step_batcher import (
    DEFAULT_WINDOW_S,
    Evaluation,
    Experts,
    ExpertUnavailable,
    Features,
    Router,
    StepBatcher,
    apply_guidance,
    guidance_batch,
    resolve,
)

__all__ = [  # the sampler's vocabulary, wherever it is defined
    "DecoderUnavailable",
    "EvaluationStats",
    "Experts",
    "ExpertUnavailable",
    "Features",
    "Models",
    "Router",
    "SampleResult",
    "StepBatcher",
    "apply_guidance",
    "guidance_batch",
    "initial_noise",
    "sample",
    "sample_async",
    "time_grid",
]

Solver = Literal["euler", "heun"]
OnUnavailable = Literal["fail", "renormalize"]
# v(x, t, step): what a solver calls; `sample_async` passes a RoutedVelocity
Velocity = Callable[[torch.Tensor, float, int], Awaitable[torch.Tensor]]


class DecoderUnavailable(DDMError):
    """The VAE decoder of a latent DDM did not answer (the Serve backend raises it)."""


class Decoder(Protocol):
    """Final states -> images: a latent DDM's VAE (ddm_nodes.latents.LatentCodec)."""

    def decode(
        self, states: torch.Tensor
    ) -> torch.Tensor | Awaitable[torch.Tensor]: ...  # -> (N, C, H, W) in [-1, 1]


class Models(Protocol):
    """What planning a request needs of a store's models beside the experts (the
    router deployment's StoreModels, the in-process LocalExperts)."""

    @property
    def manifest(self) -> DatasetManifest: ...

    @property
    def router(self) -> Router | None: ...  # None: the store has no router

    @property
    def features(self) -> Features | None: ...  # None: no nearest-centroid

    @property
    def state_shape(self) -> tuple[int, int, int]: ...  # (C, H, W) of x_t: images or latents

    @property
    def decoder(self) -> Decoder | None: ...  # None: the states are images

    @property
    def conditional(self) -> bool: ...  # every expert takes class labels


# --- time grids: small pure functions ----------------------------------------------------


def time_grid(steps: int, start: float = 1.0, end: float = 0.0) -> torch.Tensor:
    """steps + 1 evenly spaced times from `start` (1.0: noise) down to `end` (0.0: data)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    grid = torch.linspace(start, end, steps + 1, dtype=torch.float64)
    check_time_grid(grid)
    return grid


def check_time_grid(grid: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """The grid as a float64 tensor, or a ValueError: 1-D, at least 2 points, within [0, 1]
    and strictly decreasing (sampling runs from noise towards data)."""
    g = torch.as_tensor(grid, dtype=torch.float64)
    if g.ndim != 1 or len(g) < 2:
        raise ValueError(f"a time grid is 1-D with at least 2 points, got shape {tuple(g.shape)}")
    if not (torch.isfinite(g).all() and g.min() >= 0 and g.max() <= 1):
        raise ValueError(f"time grid values must lie in [0, 1], got {g.tolist()}")
    if not (g[1:] < g[:-1]).all():
        raise ValueError("a time grid must be strictly decreasing (t = 1 noise to t = 0 data)")
    return g


def initial_noise(n: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """x_T ~ N(0, I) of shape (n, *shape), float32 on the CPU, from a seeded generator."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


# --- solvers: same signature, state in locals; `velocity` is the run's RoutedVelocity -------


async def euler(velocity: Velocity, x: torch.Tensor, grid: list[float]) -> torch.Tensor:
    """Euler: x <- x + (t_next - t) v(x, t)."""
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        x = x + (t_next - t) * await velocity(x, t, i)
    return x


async def heun(velocity: Velocity, x: torch.Tensor, grid: list[float]) -> torch.Tensor:
    """Heun (explicit trapezoid): predict with v(x, t), correct with the mean of v(x, t) and
    v(x_pred, t_next). A step that ends at t = 0 stays an Euler step, as in k-diffusion:
    experts never train at t = 0 exactly, the velocity of a sharp data distribution is
    singular there, and it saves one routed evaluation."""
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        v = await velocity(x, t, i)
        x_pred = x + (t_next - t) * v
        if t_next == 0:
            x = x_pred
        else:
            x = x + (t_next - t) * (v + await velocity(x_pred, t_next, i)) / 2
    return x


SOLVERS: dict[str, Callable[..., Awaitable[torch.Tensor]]] = {"euler": euler, "heun": heun}


# --- named results -----------------------------------------------------------------------


@dataclass(frozen=True)
class StepTrace:
    """One velocity evaluation (Heun makes two per step, the second at the next time)."""

    step: int  # index of the grid interval this evaluation belongs to
    t: float
    x_t: torch.Tensor  # (N, C, H, W) the state routed and denoised
    decision: RoutingDecision
    velocity: torch.Tensor  # (N, C, H, W) the merged velocity
    probs: torch.Tensor | None = None  # (N, K) router probabilities, when a router was given
    distances: torch.Tensor | None = None  # (N, K) nearest-centroid's distances of x̂_0
    predictions: torch.Tensor | None = None  # (K, N, C, H, W) every expert's (guided) velocity


@dataclass(frozen=True)
class EvaluationStats:
    """What one routed evaluation did, for metrics (`on_evaluation`)."""

    step: int
    t: float
    routed: list[int]  # samples sent to each expert id (length K)
    disagreement: float  # mean angular deviation (degrees) over samples with >= 2 experts; NaN
    seconds: float  # the whole evaluation: waiting for its tick, route, dispatch, merge
    expert_seconds: dict[int, float]  # each called expert's call latency as awaited here
    waited: float = 0.0  # of `seconds`, the wait for its tick to start (step_batcher.py)
    tick: int = 0  # the batcher's tick that answered it

    @property
    def router_seconds(self) -> float:
        """The router's own share: the evaluation less its wait for the tick and the
        longest expert call it awaited (routing, grouping, scatter, merge)."""
        return self.seconds - self.waited - max(self.expert_seconds.values(), default=0.0)


@dataclass(frozen=True)
class SampleResult:
    final: torch.Tensor  # (N, C, H, W) the ODE state at the grid's last time, unclipped
    expert_calls: list[int]  # predict calls per expert id during this run
    evaluations: int  # routed velocity evaluations
    experts_per_step: float  # mean over evaluations and samples of experts selected
    trace: list[StepTrace] | None = None
    missing_experts: list[int] = field(default_factory=list)  # left out ("renormalize")
    disagreement: list[float] = field(default_factory=list)  # per evaluation, NaN: none
    # (N,) per sample: mean over its evaluations with >= 2 selected experts of their angular
    # deviation (degrees); NaN for a sample that never had two
    sample_disagreement: torch.Tensor | None = None
    decoded: torch.Tensor | None = None  # the decoder's images of `final` (latent DDMs)

    @property
    def images(self) -> torch.Tensor:
        """(N, C, H, W) float in [-1, 1]: the decoded final state, or the final state
        itself clipped to the pixel range when the states are images."""
        return self.decoded if self.decoded is not None else self.final.clamp(-1.0, 1.0)


# --- one routed velocity evaluation ------------------------------------------------------


@dataclass
class RoutedVelocity:
    """v(x, t, step) of one run, the `velocity` every solver receives: submits the
    evaluation to the run's StepBatcher (route, group, dispatch, scatter: step_batcher.py),
    then merges and keeps the run's counters."""

    batcher: StepBatcher
    router: Router | None
    policy: Policy
    features: Features | None
    clusters: torch.Tensor | None
    labels: torch.Tensor | None
    guidance: float
    trace: list[StepTrace] | None
    trace_all_experts: bool
    on_unavailable: OnUnavailable = "fail"
    on_evaluation: Callable[[EvaluationStats], None] | None = None
    calls: list[int] = field(default_factory=list)
    absent: frozenset[int] = frozenset()  # ids not in the run's DDM: never routed to
    selected: list[float] = field(default_factory=list)
    disagreement: list[float] = field(default_factory=list)
    missing: set[int] = field(default_factory=set)
    deviation_sum: torch.Tensor | None = None  # (N,) per-sample sums behind sample_disagreement
    deviation_count: torch.Tensor | None = None
    previous: torch.Tensor | None = None  # the last merged velocity (nearest-centroid)

    @property
    def num_experts(self) -> int:
        return len(self.calls)

    async def __call__(self, x: torch.Tensor, t_value: float, step: int) -> torch.Tensor:
        start = time.perf_counter()
        n, K = x.shape[0], self.num_experts
        t = torch.full((n,), t_value, dtype=x.dtype, device=x.device)
        while True:  # once, or again after an expert was found missing ("renormalize")
            routed = await self.batcher.evaluate(
                Evaluation(
                    x=x,
                    t=t,
                    policy=self.policy,
                    router=self.router,
                    num_experts=K,
                    labels=self.labels,
                    guidance=self.guidance,
                    features=self.features,
                    clusters=self.clusters,
                    previous=self.previous,
                    missing=frozenset(self.missing),
                    absent=self.absent,
                    want_probs=self.trace is not None,
                    everyone=self.trace_all_experts,
                )
            )
            for k in routed.ids:
                self.calls[k] += 1
            if not routed.failed:
                break
            self.missing.update(e.expert_id for e in routed.failed)
            if self.on_unavailable == "fail" or len(self.missing | self.absent) >= K:
                raise routed.failed[0]
        decision, ids, rows = routed.decision, routed.ids, routed.rows
        outputs = [routed.outputs[k] for k in ids]
        dense = decision.dense(K).to(x.device, x.dtype)  # (N, K)
        velocity = torch.zeros_like(x)
        chosen = []  # (rows, v) of the selected experts, for their disagreement
        for k, v in zip(ids, outputs, strict=True):  # ascending k: a fixed summation order
            r = rows[k]
            if self.trace_all_experts:
                v = v[r]  # traced experts that no sample selected add nothing
            chosen.append((r, v))
            w = dense[r, k].reshape(-1, *[1] * (x.ndim - 1))
            velocity[r] += w * v.to(x.dtype)

        self.previous = velocity
        self.selected.append(float(decision.counts().float().mean()))
        per_sample = angular_deviation(chosen, n)
        defined = per_sample[~per_sample.isnan()]
        if self.deviation_sum is None:
            self.deviation_sum = torch.zeros(n, dtype=torch.float64)
            self.deviation_count = torch.zeros(n, dtype=torch.float64)
        dev = per_sample.detach().double().cpu()
        seen = ~dev.isnan()
        self.deviation_sum[seen] += dev[seen]
        self.deviation_count += seen.double()
        self.disagreement.append(float(defined.mean()) if len(defined) else math.nan)
        if self.on_evaluation is not None:
            routed_rows = [0] * K
            for k, (r, _) in zip(ids, chosen, strict=True):
                routed_rows[k] = len(r)
            end = time.perf_counter()
            self.on_evaluation(
                EvaluationStats(
                    step=step,
                    t=t_value,
                    routed=routed_rows,
                    disagreement=self.disagreement[-1],
                    seconds=end - start,
                    expert_seconds=dict(routed.expert_seconds),
                    waited=routed.waited,
                    tick=routed.tick,
                )
            )
        if self.trace is not None:
            self.trace.append(
                StepTrace(
                    step=step,
                    t=t_value,
                    x_t=x,
                    decision=decision,
                    velocity=velocity,
                    probs=routed.probs,
                    distances=routed.distances,
                    predictions=torch.stack(outputs) if self.trace_all_experts else None,
                )
            )
        return velocity


# --- the sampler -------------------------------------------------------------------------


async def sample_async(
    experts: Experts,
    router: Router | None,
    policy: Policy | str,
    x_T: torch.Tensor,
    time_grid: torch.Tensor | Sequence[float],
    solver: Solver = "euler",
    *,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
    features: Features | None = None,
    clusters: torch.Tensor | None = None,
    trace: bool = False,
    trace_all_experts: bool = False,
    on_unavailable: OnUnavailable = "fail",
    on_evaluation: Callable[[EvaluationStats], None] | None = None,
    decoder: Decoder | None = None,
    batcher: StepBatcher | None = None,
    expert_ids: Sequence[int] | None = None,
    num_experts: int | None = None,
) -> SampleResult:
    """Integrate dx/dt = v from x_T at time_grid[0] to time_grid[-1], routing every
    velocity evaluation through `policy`.

    experts   `num_experts` K and `predict(expert_id, x_t, t, y)` (sync or async)
    router    logits = router(x_t, t), (N, K) (or an awaitable of them); needed by the
              router policies (full, top-K, threshold-T), else optional
    policy    a Policy or a name for `get_policy`
    x_T       (N, C, H, W) the starting state (`initial_noise` for a seeded one)
    labels    (N,) class ids or NULL_LABEL; with guidance g != 1 each selected expert
              applies classifier-free guidance before the merge
    features  anything with `distances(images) -> (N, K)`: nearest-centroid's feature space
    clusters  (N,) the true cluster of each sample: the oracle policy's input
    trace     record a StepTrace per evaluation (router probabilities whenever a router is
              given, even when the policy does not use them)
    trace_all_experts  also record every expert's prediction: every expert is then called
              on the whole batch at every evaluation (K calls instead of the selected
              ones) and the merge uses those same predictions, so the trajectory matches an
              untraced run within float tolerance (batches are composed differently)
    on_unavailable  "fail": an ExpertUnavailable from the backend ends the run;
              "renormalize": that expert is left out from then on (see the module doc)
    on_evaluation   called with an EvaluationStats after every routed evaluation
    decoder   a latent DDM's VAE: the final states are decoded ONCE, into `images`
    batcher   the StepBatcher this run's evaluations join, shared with concurrent runs
              (the Serve router's); it must call these `experts` (its router forwards
              group the runs by their own `router`). None: a batcher of this run alone
    expert_ids  the experts of the DDM, by stable id (expert_set.py); ids below K that are
              not listed are never routed to. None: every id 0..K-1
    num_experts  K, the width of the routing decisions (and of the router's outputs);
              default: experts.num_experts, or the largest of `expert_ids` + 1
    """
    if isinstance(policy, str):
        policy = get_policy(policy)
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(SOLVERS)}")
    grid = check_time_grid(time_grid).tolist()
    if num_experts is None:
        num_experts = int(experts.num_experts) if expert_ids is None else max(expert_ids) + 1
    if expert_ids is None:
        expert_ids = range(num_experts)
    if not expert_ids:
        raise ValueError("there are no experts to sample with")
    if max(expert_ids) >= num_experts:
        raise ValueError(f"expert ids {list(expert_ids)} do not fit num_experts {num_experts}")
    absent = frozenset(range(num_experts)) - set(expert_ids)
    n = x_T.shape[0]
    if policy.needs == "router" and router is None:
        raise RoutingError(
            f"policy {policy.name!r} needs a router, and none was given: train one with "
            "`ddm submit --store STORE --router` or use uniform / nearest-centroid"
        )
    if policy.needs == "features" and features is None:
        raise RoutingError(f"policy {policy.name!r} needs the data set's feature space")
    if policy.needs == "oracle" and clusters is None:
        raise RoutingError("the oracle policy needs each sample's true cluster (clusters=)")
    if labels is not None and tuple(labels.shape) != (n,):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({n},)")
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance}")
    if guidance != 1 and labels is None:
        raise ValueError(f"guidance {guidance} needs labels: guidance compares them to null")
    if on_unavailable not in ("fail", "renormalize"):
        raise ValueError(f"on_unavailable must be 'fail' or 'renormalize', got {on_unavailable!r}")
    policy.check_experts(num_experts - len(absent))
    if batcher is None:
        batcher = StepBatcher(experts, router, window_s=DEFAULT_WINDOW_S)
    elif batcher.experts is not experts:
        raise ValueError("the batcher calls other experts than this run's")

    velocity = RoutedVelocity(
        batcher=batcher,
        router=router,
        policy=policy,
        features=features,
        clusters=clusters,
        labels=None if labels is None else labels.to(x_T.device, torch.long),
        guidance=float(guidance),
        trace=[] if (trace or trace_all_experts) else None,
        trace_all_experts=trace_all_experts,
        on_unavailable=on_unavailable,
        on_evaluation=on_evaluation,
        calls=[0] * num_experts,
        absent=absent,
    )
    async with batcher.joined():
        final = await SOLVERS[solver](velocity, x_T, grid)
    return SampleResult(
        decoded=None if decoder is None else await resolve(decoder.decode(final)),
        final=final,
        expert_calls=velocity.calls,
        evaluations=len(velocity.selected),
        experts_per_step=sum(velocity.selected) / len(velocity.selected),
        trace=velocity.trace,
        missing_experts=sorted(velocity.missing),
        disagreement=velocity.disagreement,
        sample_disagreement=(
            velocity.deviation_sum / velocity.deviation_count
            if velocity.deviation_sum is not None
            else None
        ),
    )


def sample(*args: Any, **kwargs: Any) -> SampleResult:
    """`sample_async` run to completion in a fresh event loop, for in-process use (inside a
    running event loop, await `sample_async` instead). Same arguments."""
    return asyncio.run(sample_async(*args, **kwargs))
