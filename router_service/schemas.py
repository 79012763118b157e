"""The typed edges of sampling: request and response bodies of the HTTP API, the limits
that bound a request, and the one parser that turns bad input into a message naming the
field and what it accepts.

Requests are strict (`extra="forbid"`, no silent coercion of "4" into 4): an unknown field
or a wrong type is refused rather than guessed at. Bounds that an operator configures
(most images or steps per request) are not in the models but in `Limits`, checked by
`Limits.check` after parsing, so one schema serves every deployment.
"""

from __future__ import annotations

import math
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ddm_nodes.errors import DDMError
from router_service.policies import MAX_TEMPERATURE, MIN_TEMPERATURE

MAX_SEED = 2**63 - 1
# Hosts the API answers by default (the Host header, port ignored): DNS rebinding lets a web
# page send a browser's requests to a loopback service under the page's own host name
DEFAULT_ALLOWED_HOSTS = ("127.0.0.1", "localhost", "::1")


def host_name(authority: str) -> str:
    """The host of a Host header or an allowed_hosts entry, port and IPv6 brackets removed,
    lower case: "[::1]:8000" -> "::1", "LocalHost:80" -> "localhost"."""
    text = authority.strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    if text.count(":") == 1:  # host:port; more colons is a bare IPv6 address
        text = text.partition(":")[0]
    return text.removesuffix(".")


_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}
Model = TypeVar("Model", bound=BaseModel)


class RequestError(DDMError, ValueError):
    """A request the client can fix: HTTP 422 (or the CLI's exit code 2)."""

    def __init__(self, field: str | None, message: str, status: int = 422):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.status = status


def parse(model: type[Model], body: bytes | dict) -> Model:
    """`model` from a JSON body or a dict, or a RequestError naming the first bad field."""
    try:
        if isinstance(body, dict):
            return model.model_validate(body)
        return model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        # a union's errors name the member type tried ("label", "str"): keep field names
        names = [str(p) for p in first["loc"] if p not in _UNION_TAGS and "[" not in str(p)]
        field = ".".join(names) or None
        if first["type"] == "json_invalid":
            raise RequestError(None, f"the body is not valid JSON: {first['msg']}") from None
        if first["type"] == "extra_forbidden":
            allowed = ", ".join(model.model_fields)
            raise RequestError(field, f"unknown field; allowed fields: {allowed}") from None
        given = first.get("input")
        shown = "" if isinstance(given, dict) else f" (got {shown_value(given)})"
        raise RequestError(field, f"{first['msg']}{shown}") from None


SHOWN_CHARS = 80  # how much of a refused value an error message repeats


def shown_value(value: object) -> str:
    """repr(value) for an error message, cut to SHOWN_CHARS: a 4000-digit number or a
    60 KB string is refused, not repeated back."""
    if isinstance(value, int) and value.bit_length() > 256:  # repr() fails past 4300 digits
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[: SHOWN_CHARS - 3]}... ({len(text)} chars)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# The largest top-2 request the other defaults admit: 64 images x 500 Heun steps (2
# evaluations each) x 2 experts. Full routing over 8 experts at that size (4x as much) is
# refused; it fits at a quarter of the images or steps.
DEFAULT_MAX_EXPERT_EVALUATIONS = 64 * 500 * 2 * 2


class Limits(_Strict):
    """What one request may ask for; the service answers 422 beyond it (503 past the
    deadline)."""

    max_n: int = Field(64, ge=1, le=65536, description="most images per request")
    max_steps: int = Field(500, ge=1, le=100000, description="most ODE steps per request")
    max_body_bytes: int = Field(65536, ge=1024, description="largest request body accepted")
    max_expert_evaluations: int = Field(
        DEFAULT_MAX_EXPERT_EVALUATIONS,
        ge=1,
        le=10**12,
        description="most per-sample expert evaluations per request: n x steps x (2 for heun, "
        "1 for euler) x experts per step (K for full, uniform, threshold; k for top-k and "
        "nearest-centroid-k); checked before sampling starts",
    )
    request_timeout_s: float = Field(
        300,
        gt=0,
        le=86400,
        allow_inf_nan=False,
        description="deadline of a whole request, queueing included: no sampling slot by "
        "then is a 503 with Retry-After, sampling past it is cancelled (503 deadline_exceeded)",
    )

    def check(self, n: int, steps: int, n_field: str = "n", steps_field: str = "steps") -> None:
        if n > self.max_n:
            raise RequestError(
                n_field, f"must be between 1 and {self.max_n} (got {shown_value(n)})"
            )
        if steps > self.max_steps:
            raise RequestError(
                steps_field, f"must be between 1 and {self.max_steps} (got {shown_value(steps)})"
            )


Strategy = Field(
    None,
    min_length=1,
    max_length=64,
    description="routing policy: full | uniform | top-K | threshold-T | nearest-centroid[-K]; "
    "omitted: the service's default (top-2 unless configured)",
)
Seed = Field(None, ge=0, le=MAX_SEED, description="initial-noise seed; omitted: a random one")
OnUnavailableField = Field(
    "fail",
    description="an expert with no live replica: 'fail' (503) or 'renormalize' (leave it "
    "out, renormalise the weights, answer with degraded: true)",
)

RouterFallbackField = Field(
    "refuse",
    description="a router policy when the router was not trained on the current expert set "
    "(an expert was added since): 'refuse' (422) or 'nearest-centroid' (route by the "
    "experts' centroids instead; the response's strategy says so)",
)


class SampleRequest(_Strict):
    """POST /v1/samples (and what `ddm sample` runs in-process)."""

    n: int = Field(4, ge=1, description="images to sample")
    steps: int = Field(50, ge=1, description="ODE steps from noise to data")
    strategy: str | None = Strategy
    solver: Literal["euler", "heun"] = "euler"
    seed: int | None = Seed
    label: str | int | None = Field(
        None,
        description="class id (an integer, or 1-6 ASCII digits) or class name (at most 64 "
        "letters, digits, spaces and / - . _); omitted: any class",
    )
    guidance: float = Field(
        1.0, ge=0, le=100, allow_inf_nan=False, description="classifier-free guidance scale"
    )
    temperature: float | None = Field(
        None,
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        allow_inf_nan=False,
        description="routing temperature: router policies route on p^(1/T), "
        "nearest-centroid on softmax(-distance / T)",
    )
    format: Literal["png", "npy"] = Field(
        "png", description="png: one base64 PNG per image; npy: one base64 .npy float32 array"
    )
    on_unavailable: Literal["fail", "renormalize"] = OnUnavailableField
    router_fallback: Literal["refuse", "nearest-centroid"] = RouterFallbackField


class ImagesRequest(_Strict):
    """POST /v1/images/generations: the OpenAI images request shape, plus our routing."""

    prompt: str = Field(
        min_length=1, max_length=1000, description="a class name of the data set, e.g. sneaker"
    )
    n: int = Field(1, ge=1, description="images to generate")
    size: str | None = Field(
        None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$", description="WxH; must be the models' image size"
    )
    response_format: Literal["b64_json"] = Field(
        "b64_json", description="only b64_json: images are returned inline, never as URLs"
    )
    model: str | None = Field(None, max_length=200, description="optional; must be 'ddm'")
    num_inference_steps: int = Field(50, ge=1, description="ODE steps")
    guidance_scale: float = Field(1.0, ge=0, le=100, allow_inf_nan=False)
    seed: int | None = Seed
    strategy: str | None = Strategy
    on_unavailable: Literal["fail", "renormalize"] = OnUnavailableField
    router_fallback: Literal["refuse", "nearest-centroid"] = RouterFallbackField


class Usage(BaseModel):
    expert_calls: dict[str, int] = Field(description="predict calls per expert deployment")
    experts_per_step: float = Field(description="mean experts selected per sample and step")
    evaluations: int = Field(description="routed velocity evaluations")


class Timing(BaseModel):
    total_s: float
    per_step_ms: float
    queued_s: float = Field(description="time spent waiting for a sampling slot")
    evaluation_ms_p50: float = Field(
        description="one routed evaluation (waiting for its tick, route, fan out, merge)"
    )
    evaluation_ms_p95: float
    router_ms_p50: float = Field(
        description="an evaluation minus its wait for a tick and the longest expert call it "
        "awaited: routing, grouping, scatter and merging in the router"
    )
    router_ms_p95: float
    tick_wait_ms_p50: float = Field(
        0.0,
        description="an evaluation's wait for its step batcher tick to start (while the "
        "tick before it ran, or for other requests' evaluations to join it)",
    )


class SampleResponse(BaseModel):
    strategy: str = Field(description="the policy that routed it (a fallback's, if one ran)")
    fallback_from: str | None = Field(
        None, description="the strategy asked for, when router_fallback replaced it"
    )
    experts: list[str] = Field(default_factory=list, description="the DDM it sampled with")
    solver: str
    n: int
    steps: int
    seed: int
    label: int | None
    format: Literal["png", "npy"]
    shape: list[int] = Field(description="(N, C, H, W)")
    images: list[str] | None = Field(None, description="base64 PNG per image (format png)")
    npy: str | None = Field(None, description="base64 .npy float32 in [-1, 1] (format npy)")
    usage: Usage
    timing: Timing
    degraded: bool
    missing_experts: list[str]


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str = Field(description="the class name the prompt was matched to")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    seed: int
    usage: Usage
    degraded: bool
    missing_experts: list[str]


class ExpertStatus(BaseModel):
    id: int
    name: str
    cluster: int
    sha256: str
    preset: str
    arch: str = Field(description="its architecture family: unet or dit")
    prediction: str = Field(
        description="what its network predicts (v, eps or x0); the router merges velocities"
    )
    replicas: int = Field(description="replicas running now")
    healthy: bool
    source: str = Field("trained", description="trained here, or copied from another store")


class ExpertsResponse(BaseModel):
    experts: list[ExpertStatus]
    router: bool = Field(description="whether the store has a router network")
    router_current: bool = Field(
        False, description="whether the router was trained on every expert listed"
    )
    registry: str = Field("", description="sha256 of the experts.json served ('': default)")
    pending: list[str] | None = Field(
        None, description="a changed registry's experts, served once each has a replica"
    )
    class_names: list[str] | None
