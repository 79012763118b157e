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

from router_service.policies import Policy, RoutingError, get_policy
from router_service.sampler import (
    Decoder,
    EvaluationStats,
    Experts,
    Models,
    SampleResult,
    initial_noise,
    sample_async,
    time_grid,
)
from router_service.schemas import MAX_SEED, Limits, RequestError, SampleRequest


@dataclass(frozen=True)
class Plan:
    """A request checked against the models: what the sampler will run."""

    request: SampleRequest
    policy: Policy
    label: int | None
    seed: int


def resolve_label(class_names: list[str] | None, label: str | int | None) -> int | None:
    """A class name (case-insensitive) or id -> id; None stays None (unconditional)."""
    if label is None:
        return None
    if class_names is None:
        raise RequestError("label", "this data set has no class labels; omit the label")
    if isinstance(label, int) or label.lstrip("-").isdigit():
        i = int(label)
        if 0 <= i < len(class_names):
            return i
    else:
        by_name = {n.lower(): i for i, n in enumerate(class_names)}
        if label.strip().lower() in by_name:
            return by_name[label.strip().lower()]
    raise RequestError(
        "label",
        f"{label!r} is unknown; use an id 0..{len(class_names) - 1} or one of {class_names}",
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


def plan(
    request: SampleRequest,
    models: Models,
    num_experts: int,
    limits: Limits,
    default_strategy: str = DEFAULT_STRATEGY,
) -> Plan:
    """Check a parsed request against the limits and the models; RequestError if not."""
    limits.check(request.n, request.steps)
    name = request.strategy or default_strategy
    try:
        get_policy(name).check_experts(num_experts)
    except RoutingError as e:
        raise RequestError("strategy", str(e)) from None
    try:
        policy = get_policy(name, temperature=request.temperature)
    except RoutingError as e:
        raise RequestError("temperature", str(e)) from None
    if policy.needs == "router" and models.router is None:
        raise RequestError(
            "strategy",
            f"{policy.name!r} needs a router and the store has none; use uniform or "
            "nearest-centroid, or train one with `ddm submit --router`",
        )
    if policy.needs == "oracle":
        raise RequestError("strategy", "oracle routing needs true clusters: analysis only")
    label = resolve_label(models.manifest.class_names, request.label)
    if label is not None and not models.conditional:
        raise RequestError("label", "the experts were trained without labels; omit it")
    if request.guidance != 1.0 and label is None:
        raise RequestError(
            "guidance", "needs a label: classifier-free guidance is per class (label / --label)"
        )
    seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED)
    return Plan(request, policy, label, seed)


async def run(
    p: Plan,
    experts: Experts,
    models: Models,
    on_evaluation: Callable[[EvaluationStats], None] | None = None,
    decoder: Decoder | None = None,
) -> SampleResult:
    """Sample a planned request with `experts` as the backend; `decoder` (default: the
    models') turns a latent DDM's final states into images."""
    r = p.request
    labels = None if p.label is None else torch.full((r.n,), p.label, dtype=torch.long)
    return await sample_async(
        experts,
        models.router,
        p.policy,
        initial_noise(r.n, models.state_shape, p.seed),
        time_grid(r.steps),
        r.solver,
        labels=labels,
        guidance=r.guidance,
        features=models.features,
        on_unavailable=r.on_unavailable,
        on_evaluation=on_evaluation,
        decoder=decoder or models.decoder,
    )
