"""The HTTP API (FastAPI): the Serve router deployment's ingress, testable without Ray.

    POST /v1/samples              SampleRequest -> SampleResponse
    POST /v1/images/generations   the OpenAI images request shape -> ImagesResponse
    GET  /v1/experts              each expert's id, cluster, sha256, replicas, health
    GET  /healthz                 the process answers (liveness)
    GET  /readyz                  every expert has a live replica (readiness); 503 if not

With an API key configured, /v1/* need `Authorization: Bearer KEY` (401 otherwise);
/healthz and /readyz stay open for probes. Every error is JSON in the OpenAI shape,
{"error": {"message", "type", "param"}}: 401 no/wrong key, 413 body over the limit, 422 a
request the client can fix (the message names the field and what it accepts), 503
overloaded or an expert unavailable (with Retry-After), 500 anything else; the service
keeps serving after any of them.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from router_service.policies import get_policy
from router_service.sampler import DecoderUnavailable, ExpertUnavailable
from router_service.schemas import ImagesRequest, RequestError, SampleRequest, parse
from router_service.service import Overloaded, SamplingService

UNAVAILABLE_RETRY_AFTER_S = 5


class HTTPError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


def error_response(
    status: int, kind: str, message: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


def _authorize(service: SamplingService, request: Request) -> None:
    if service.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), service.api_key.encode()
    ):
        raise HTTPError(
            401,
            "authentication_error",
            "missing or wrong API key: send `Authorization: Bearer KEY`",
            {"WWW-Authenticate": "Bearer"},
        )


async def _body(service: SamplingService, request: Request) -> bytes:
    """The request body, refused with 413 past the limit without reading all of it."""
    most = service.limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > most:
        raise HTTPError(413, "invalid_request_error", f"the body is over {most} bytes")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > most:
            raise HTTPError(413, "invalid_request_error", f"the body is over {most} bytes")
    return bytes(data)


def make_api(get_service: Callable[[], SamplingService]) -> FastAPI:
    """The FastAPI app; `get_service` returns the replica's service when a request comes."""
    api = FastAPI(
        title="ddm",
        description="Decentralized Diffusion Models: per-step routed sampling",
        docs_url="/docs",
        redoc_url=None,
    )

    async def handle(request: Request, route: str, work) -> JSONResponse:
        service = get_service()
        start = time.perf_counter()
        strategy, status = "invalid", 500
        try:
            _authorize(service, request)
            reply, strategy = await work(service, await _body(service, request))
            status = 200
            return JSONResponse(reply.model_dump(mode="json"))
        except HTTPError as e:
            status = e.status
            return error_response(e.status, e.kind, e.message, headers=e.headers)
        except RequestError as e:
            status = e.status
            return error_response(e.status, "invalid_request_error", str(e), e.field)
        except Overloaded as e:
            status = 503
            _count_error(service, "overloaded")
            headers = {"Retry-After": str(e.retry_after_s)}
            return error_response(503, "overloaded", str(e), headers=headers)
        except ExpertUnavailable as e:
            status = 503
            _count_error(service, "expert_unavailable")
            headers = {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)}
            message = f"{e} (send on_unavailable: renormalize to sample without it)"
            return error_response(503, "expert_unavailable", message, headers=headers)
        except DecoderUnavailable as e:
            status = 503
            _count_error(service, "decoder_unavailable")
            headers = {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)}
            return error_response(503, "decoder_unavailable", str(e), headers=headers)
        except Exception as e:  # the service stays up; the client learns what failed
            _count_error(service, "internal")
            return error_response(500, "internal_error", f"{type(e).__name__}: {e}")
        finally:
            if service.metrics is not None:
                service.metrics.request(route, strategy, status, time.perf_counter() - start)

    @api.post("/v1/samples")
    async def samples(request: Request) -> JSONResponse:
        async def work(service: SamplingService, body: bytes):
            reply = await service.samples(parse(SampleRequest, body))
            return reply, reply.strategy

        return await handle(request, "samples", work)

    @api.post("/v1/images/generations")
    async def images(request: Request) -> JSONResponse:
        async def work(service: SamplingService, body: bytes):
            req = parse(ImagesRequest, body)
            return await service.images(req), get_policy(
                req.strategy or service.default_strategy
            ).name

        return await handle(request, "images", work)

    @api.get("/v1/experts")
    async def experts(request: Request) -> JSONResponse:
        service = get_service()
        try:
            _authorize(service, request)
        except HTTPError as e:
            return error_response(e.status, e.kind, e.message, headers=e.headers)
        return JSONResponse((await service.experts_info()).model_dump(mode="json"))

    @api.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> JSONResponse:
        ok, why = await get_service().ready()
        return JSONResponse({"ready": ok, "detail": why}, status_code=200 if ok else 503)

    return api


def _count_error(service: SamplingService, kind: str) -> None:
    if service.metrics is not None:
        service.metrics.error(kind)
