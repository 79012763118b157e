"""`ddm sample`: DDM sampling through the one sampler (router_service.sampler), either
in-process from a store's verified experts and router, or from a running `ddm serve`
(`--url`), to an image grid and raw arrays. Both take the same request body."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch

from ddm_nodes.errors import DDMError
from ddm_nodes.pixels import from_npy
from router_service.local_experts import LocalExperts
from router_service.planning import plan, run
from router_service.schemas import Limits, RequestError, SampleRequest, SampleResponse, parse

CLI_LIMITS = Limits(max_n=4096, max_steps=1000)


@dataclass
class SampleRun:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    expert_calls: list[int]
    experts_per_step: float
    seconds: float
    degraded: bool = False
    missing_experts: list[str] = field(default_factory=list)


def sample_request(
    strategy: str,
    n: int,
    steps: int,
    solver: str = "euler",
    seed: int = 0,
    label: str | None = None,
    guidance: float = 1.0,
    temperature: float | None = None,
) -> SampleRequest:
    """The CLI's options as the request body both backends take (strict: bad input exits 2)."""
    body = dict(strategy=strategy, n=n, steps=steps, solver=solver, seed=seed, label=label)
    body.update(guidance=float(guidance), temperature=temperature, format="npy")
    with cli_flags():
        request = parse(SampleRequest, body)
        CLI_LIMITS.check(request.n, request.steps)
    return request


@contextmanager
def cli_flags() -> Iterator[None]:
    """A RequestError names a request field; on the command line, name its flag."""
    try:
        yield
    except RequestError as e:
        flag = f"--{e.field.replace('_', '-')}: " if e.field else ""
        raise DDMError(flag + str(e).removeprefix(f"{e.field}: ")) from None


def run_sample(
    experts: LocalExperts, strategy: str, n: int, steps: int, **options: Any
) -> SampleRun:
    """In-process: the store's experts as local modules; `options` as `sample_request`."""
    request = sample_request(strategy, n, steps, **options)
    with cli_flags():
        p = plan(request, experts, experts.expert_set, CLI_LIMITS)
    start = time.perf_counter()
    result = asyncio.run(run(p, experts, experts))
    return SampleRun(
        result.images, result.expert_calls, result.experts_per_step, time.perf_counter() - start
    )


def run_remote_sample(
    url: str, request: SampleRequest, api_key: str | None = None, timeout_s: float = 600
) -> SampleRun:
    """Through a running `ddm serve`: POST /v1/samples, the images as one npy array."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.perf_counter()
    try:
        reply = httpx.post(
            f"{url.rstrip('/')}/v1/samples",
            content=request.model_dump_json(),
            headers={"Content-Type": "application/json", **headers},
            timeout=timeout_s,
        )
    except httpx.HTTPError as e:
        raise DDMError(f"cannot reach {url}: {e}; is `ddm serve` running there?") from None
    if reply.status_code != 200:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text[:300]
        raise DDMError(f"{url} answered {reply.status_code}: {message}")
    body = SampleResponse.model_validate_json(reply.content)
    images = from_npy(base64.b64decode(body.npy))
    calls = [body.usage.expert_calls[k] for k in sorted(body.usage.expert_calls)]
    return SampleRun(
        images,
        calls,
        body.usage.experts_per_step,
        time.perf_counter() - start,
        body.degraded,
        body.missing_experts,
    )
