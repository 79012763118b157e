"""Planning a sampling request: `plan` checks a `SampleRequest` against the limits and the
models and fixes what it left open (strategy, seed, label id) in a `Plan`; `run` samples
that plan through the one sampler. `ddm sample` in-process and the Serve router both plan
here, so the same seed, strategy, steps and weights give the same images whichever backend
answers `predict`.

`models` is a `Models` (sampler.py): `LocalExperts` in-process, the router deployment's
`StoreModels` behind Serve.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddm_nodes.names import expert_name
from router_service.expert_set import ExpertSet
from router_service.policies import Policy, RoutingError, get_policy
from router_service.sampler import (
    Decoder,
    EvaluationStats,
    Experts,
    Models,
    SampleResult,
    StepBatcher,
    initial_noise,
    sample_async,
    time_grid,
)
from router_service.schemas import MAX_SEED, Limits, RequestError, SampleRequest, shown_value


@dataclass(frozen=True)
class Plan:
    """A request checked against the models: what the sampler will run."""

    request: SampleRequest
    policy: Policy
    label: int | None
    seed: int
    experts: ExpertSet  # the DDM it was admitted with, kept to its end
    fallback_from: str | None = None  # the router policy asked for, replaced (router_fallback)


LABEL_ID = re.compile(r"[0-9]{1,6}")  # ASCII: str.isdigit() also takes "²" and "٣"
# a class name: Fashion-MNIST's "T-shirt/top" and "Ankle boot" are the widest kind here
LABEL_NAME = re.compile(r"[A-Za-z0-9 ./_-]{1,64}")


def resolve_label(class_names: list[str] | None, label: str | int | None) -> int | None:
    """A class name (case-insensitive) or id -> id; None stays None (unconditional).
    A string of 1-6 ASCII digits is an id, any other string a name."""
    if label is None:
        return None
    if class_names is None:
        raise RequestError("label", "this data set has no class labels; omit the label")
    if isinstance(label, str) and LABEL_ID.fullmatch(label):
        label = int(label)
    if isinstance(label, int):
        if 0 <= label < len(class_names):
            return label
        why = "is not a class id"
    elif LABEL_NAME.fullmatch(label):
        by_name = {n.lower(): i for i, n in enumerate(class_names)}
        if label.strip().lower() in by_name:
            return by_name[label.strip().lower()]
        why = "is not a class name"
    else:
        why = (
            "is neither an id (1-6 ASCII digits) nor a class name (at most 64 letters, "
            "digits, spaces and / - . _)"
        )
    raise RequestError(
        "label",
        f"{shown_value(label)} {why}; use an id 0..{len(class_names) - 1} or one of {class_names}",
    )


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def match_prompt(class_names: list[str] | None, prompt: str) -> int:
    """The class a free-text prompt names: "sneaker", "Sneakers", "a photo of an ankle
    boot". Exact names (and their '/' alternatives, singular or plural) first, then the
    longest class name that appears as whole words in the prompt."""
    if class_names is None:
        raise RequestError("prompt", "this data set has no class names to match a prompt to")
    forms: list[tuple[str, int]] = []
    for i, name in enumerate(class_names):
        for alt in {name, *name.split("/")}:
            if w := _words(alt):
                forms.append((w, i))
    p = _words(prompt)
    for candidate in (p, p.removesuffix("s"), p.removesuffix("es")):
        hits = {i for w, i in forms if w == candidate}
        if len(hits) == 1:
            return hits.pop()
    padded = f" {p} "
    inside = [(len(w), i) for w, i in forms if f" {w} " in padded or f" {w}s " in padded]
    if inside:
        longest = max(n for n, _ in inside)
        hits = {i for n, i in inside if n == longest}
        if len(hits) == 1:
            return hits.pop()
    raise RequestError(
        "prompt", f"{prompt!r} names none of the known classes: {', '.join(class_names)}"
    )


DEFAULT_STRATEGY = "top-2"
EVALUATIONS_PER_STEP = {"euler": 1, "heun": 2}  # velocity evaluations per ODE step, at most


def experts_per_step(policy: Policy, num_experts: int) -> int:
    """The most experts `policy` evaluates per sample and step: k for top-k and
    nearest-centroid-k, every expert for full, uniform and threshold (which may take all)."""
    return num_experts if policy.k is None else min(policy.k, num_experts)


def expert_evaluations(request: SampleRequest, policy: Policy, num_experts: int) -> int:
    """Per-sample expert evaluations `request` may cost: what limits.max_expert_evaluations
    bounds."""
    per_step = EVALUATIONS_PER_STEP[request.solver] * experts_per_step(policy, num_experts)
    return request.n * request.steps * per_step


def _check_budget(
    request: SampleRequest, policy: Policy, num_experts: int, limits: Limits, steps_field: str
) -> None:
    cost = expert_evaluations(request, policy, num_experts)
    if cost <= limits.max_expert_evaluations:
        return
    solver, per_step = request.solver, experts_per_step(policy, num_experts)
    lower = [f"n or {steps_field}"]
    if solver == "heun":
        lower.append("solver euler")
    if per_step > 1:
        lower.append(f"a sparser strategy ({'top-1' if per_step == 2 else 'top-1, top-2'})")
    raise RequestError(
        None,
        f"the request needs n {request.n} x {steps_field} {request.steps} x "
        f"{EVALUATIONS_PER_STEP[solver]} ({solver}) x {per_step} "
        f"experts per step ({policy.name}) = {cost} expert evaluations, over this service's "
        f"limits.max_expert_evaluations of {limits.max_expert_evaluations}; lower "
        f"{', or '.join(lower)}",
    )


def plan(
    request: SampleRequest,
    models: Models,
    experts: ExpertSet,
    limits: Limits,
    default_strategy: str = DEFAULT_STRATEGY,
    steps_field: str = "steps",
) -> Plan:
    """Check a parsed request against the limits, the models and the expert set it will
    sample with; RequestError if not. `steps_field` names the steps in messages
    (num_inference_steps on the images route)."""
    limits.check(request.n, request.steps, steps_field=steps_field)
    name = request.strategy or default_strategy
    present = len(experts.ids)
    try:
        get_policy(name).check_experts(present)
    except RoutingError as e:
        raise RequestError("strategy", str(e)) from None
    try:
        policy = get_policy(name, temperature=request.temperature)
    except RoutingError as e:
        raise RequestError("temperature", str(e)) from None
    if policy.needs == "router" and experts.router is None:
        raise RequestError(
            "strategy",
            f"{policy.name!r} needs a router and the store has none; use uniform or "
            "nearest-centroid, or train one with `ddm submit --router`",
        )
    fallback_from = None
    if policy.needs == "router" and not experts.router_covers:
        if request.router_fallback == "refuse":
            raise RequestError(
                "strategy",
                f"{policy.name!r} routes with the router, which was trained on "
                f"{', '.join(expert_name(k) for k in sorted(experts.router.ids))}, and the "
                f"DDM now has {', '.join(experts.names)}: train a router on the current set "
                "(`ddm submit --router --force`), or ask for router_fallback "
                "'nearest-centroid' or strategy nearest-centroid",
            )
        fallback_from = policy.name
        policy = get_policy("nearest-centroid", temperature=request.temperature)
    if policy.needs == "oracle":
        raise RequestError("strategy", "oracle routing needs true clusters: analysis only")
    _check_budget(request, policy, present, limits, steps_field)
    label = resolve_label(models.manifest.class_names, request.label)
    if label is not None and not experts.conditional:
        raise RequestError("label", "the experts were trained without labels; omit it")
    if request.guidance != 1.0 and label is None:
        raise RequestError(
            "guidance", "needs a label: classifier-free guidance is per class (label / --label)"
        )
    seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED)
    return Plan(request, policy, label, seed, experts, fallback_from)


async def run(
    p: Plan,
    experts: Experts,
    models: Models,
    on_evaluation: Callable[[EvaluationStats], None] | None = None,
    decoder: Decoder | None = None,
    batcher: StepBatcher | None = None,
) -> SampleResult:
    """Sample a planned request with `experts` as the backend; `decoder` (default: the
    models') turns a latent DDM's final states into images; `batcher` (the service's)
    shares its ticks with the other requests in flight."""
    r = p.request
    labels = None if p.label is None else torch.full((r.n,), p.label, dtype=torch.long)
    return await sample_async(
        experts,
        p.experts.router,
        p.policy,
        initial_noise(r.n, models.state_shape, p.seed),
        time_grid(r.steps),
        r.solver,
        labels=labels,
        guidance=r.guidance,
        features=p.experts.features,
        on_unavailable=r.on_unavailable,
        on_evaluation=on_evaluation,
        decoder=decoder or models.decoder,
        batcher=batcher,
        expert_ids=p.experts.ids,
        num_experts=p.experts.width,
    )
