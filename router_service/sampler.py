"""The one sampling loop: flow-matching ODE from noise (t = 1) to data (t = 0), routed.

Every velocity evaluation at (x, t) runs the same five moves:

    route     router probabilities p(k | x, t) (or centroid distances, or oracle clusters)
              -> policy -> RoutingDecision (per sample: expert ids and weights summing to 1)
    group     samples by selected expert
    dispatch  ONE `experts.predict` call per selected expert with its sub-batch, all calls
              gathered concurrently; an expert no sample selected is not called
    scatter   each sub-batch's velocities back to its samples
    merge     v(x_n) = sum_k w_nk v_k(x_n), in ascending expert id

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
import inspect
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from ddm_nodes import flow
from ddm_nodes.dataset_manifest import NULL_LABEL, DatasetManifest
from ddm_nodes.errors import DDMError
from ddm_nodes.names import expert_name
from router_service.disagreement import angular_deviation
from router_service.policies import (
    Policy,
    RoutingDecision,
    RoutingError,
    get_policy,
)

Solver = Literal["euler", "heun"]
OnUnavailable = Literal["fail", "renormalize"]
# v(x, t, step): what a solver calls; `sample_async` passes a RoutedVelocity
Velocity = Callable[[torch.Tensor, float, int], Awaitable[torch.Tensor]]
# logits = router(x_t, t): (N, K), or an awaitable of them
Router = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | Awaitable[torch.Tensor]]


class ExpertUnavailable(DDMError):
    """No live replica of an expert answered (the Serve backend raises it)."""

    def __init__(self, expert_id: int, reason: str):
        super().__init__(f"{expert_name(expert_id)} is unavailable: {reason}")
        self.expert_id = expert_id
        self.reason = reason


class DecoderUnavailable(DDMError):
    """The VAE decoder of a latent DDM did not answer (the Serve backend raises it)."""


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
    seconds: float  # the whole evaluation: route, dispatch, merge
    expert_seconds: dict[int, float]  # each called expert's call latency as awaited here


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


async def _resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


@dataclass
class RoutedVelocity:
    """v(x, t, step) of one run, the `velocity` every solver receives: route, group,
    dispatch, scatter, merge (see the module docstring). Holds the run's counters."""

    experts: Experts
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
            probs, distances, decision = await self._route(x, t)
            everyone = self.trace_all_experts
            ids = list(range(K)) if everyone else decision.experts()
            if self.missing & set(decision.experts()):
                raise RoutingError(f"routing selected missing experts {sorted(self.missing)}")
            rows = {k: decision.rows(k).to(x.device) for k in ids}
            timed = await asyncio.gather(
                *(self._timed(k, x, t, None if everyone else rows[k]) for k in ids),
                return_exceptions=True,
            )
            failed = [r for r in timed if isinstance(r, ExpertUnavailable)]
            for r in timed:
                if isinstance(r, BaseException) and not isinstance(r, ExpertUnavailable):
                    raise r
            if not failed:
                break
            self.missing.update(e.expert_id for e in failed)
            if self.on_unavailable == "fail" or len(self.missing) >= K:
                raise failed[0]
        outputs = [v for v, _ in timed]

        dense = decision.dense(K).to(x.device, x.dtype)  # (N, K)
        velocity = torch.zeros_like(x)
        chosen = []  # (rows, v) of the selected experts, for their disagreement
        for k, v in zip(ids, outputs, strict=True):  # ascending k: a fixed summation order
            r = rows[k]
            if everyone:
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
            routed = [0] * K
            for k, (r, _) in zip(ids, chosen, strict=True):
                routed[k] = len(r)
            self.on_evaluation(
                EvaluationStats(
                    step=step,
                    t=t_value,
                    routed=routed,
                    disagreement=self.disagreement[-1],
                    seconds=time.perf_counter() - start,
                    expert_seconds={k: s for k, (_, s) in zip(ids, timed, strict=True)},
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
                    probs=probs,
                    distances=distances,
                    predictions=torch.stack(outputs) if everyone else None,
                )
            )
        return velocity

    async def _route(self, x: torch.Tensor, t: torch.Tensor):
        """(router probabilities, centroid distances, RoutingDecision) for this state."""
        n, K = x.shape[0], self.num_experts
        probs = distances = None
        if self.router is not None and (self.policy.needs == "router" or self.trace is not None):
            with torch.no_grad():
                logits = self.router(x, t)
            probs = torch.softmax((await _resolve(logits)).float(), dim=-1).cpu()
        available = None
        if self.missing:
            available = torch.ones(K, dtype=torch.bool)
            available[sorted(self.missing)] = False
        if self.policy.needs == "features" and self.previous is None:
            # no velocity yet, so no x̂_0 to embed
            decision = get_policy("uniform").select(n, K, available=available)
        else:
            if self.policy.needs == "features":
                x0_hat = flow.denoised(x, t, self.previous)
                distances = self.features.distances(x0_hat).float().cpu()
            clusters = None if self.clusters is None else self.clusters.cpu()
            decision = self.policy.select(
                n, K, probs=probs, distances=distances, clusters=clusters, available=available
            )
        return probs, distances, decision

    async def _timed(
        self, k: int, x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        v = await self._predict(k, x, t, rows)
        return v, time.perf_counter() - start

    async def _predict(
        self, k: int, x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor | None
    ) -> torch.Tensor:
        """Expert k's velocity on the samples `rows` (all when None), guidance applied."""
        if rows is not None:
            x, t = x[rows], t[rows]
        y = self.labels
        if y is not None and rows is not None:
            y = y[rows]
        self.calls[k] += 1
        if y is None or self.guidance == 1:
            return await _resolve(self.experts.predict(k, x, t, y))
        stacked = await _resolve(self.experts.predict(k, *guidance_batch(x, t, y)))
        return apply_guidance(stacked, self.guidance)


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
    """
    if isinstance(policy, str):
        policy = get_policy(policy)
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(SOLVERS)}")
    grid = check_time_grid(time_grid).tolist()
    num_experts = int(experts.num_experts)
    n = x_T.shape[0]
    if num_experts < 1:
        raise ValueError("there are no experts to sample with")
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
    policy.check_experts(num_experts)

    velocity = RoutedVelocity(
        experts=experts,
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
    )
    final = await SOLVERS[solver](velocity, x_T, grid)
    return SampleResult(
        decoded=None if decoder is None else await _resolve(decoder.decode(final)),
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
