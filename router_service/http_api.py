"""The HTTP API (FastAPI): the Serve router deployment's ingress, testable without Ray.

    POST /v1/samples              SampleRequest -> SampleResponse
    POST /v1/images/generations   the OpenAI images request shape -> ImagesResponse
    GET  /v1/experts              each expert's id, cluster, sha256, replicas, health
    GET  /healthz                 the process answers (liveness)
    GET  /readyz                  every expert has a live replica (readiness); 503 if not

/v1/* answer only a Host the service allows (`allowed_hosts`, loopback by default; 421
otherwise) and, with an API key configured, need `Authorization: Bearer KEY` (401
otherwise); POST bodies must be `Content-Type: application/json` (415 otherwise). /healthz
and /readyz stay open for probes, which call pod IPs. Every response carries an
`X-Request-ID`. Every error is JSON in the OpenAI shape,
{"error": {"message", "type", "param"}}: 401 no/wrong key, 413 body over the limit, 415 not
JSON, 421 a foreign Host, 422 a request the client can fix (the message names the field and
what it accepts), 503 overloaded, past the deadline or an expert unavailable (Retry-After
where a retry may succeed), 500 anything else: a message with the request id only, the
exception goes to the log (`ddm.serve`) under that id. The service keeps serving after
any of them.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ddm_nodes.names import expert_name
from router_service.policies import strategy_label
from router_service.sampler import DecoderUnavailable, ExpertUnavailable
from router_service.schemas import ImagesRequest, RequestError, SampleRequest, host_name, parse
from router_service.service import DeadlineExceeded, Overloaded, QueueTimeout, SamplingService

log = logging.getLogger("ddm.serve")

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


REQUEST_ID_HEADER = "X-Request-ID"
# what an id from Ray Serve's proxy looks like (a uuid); anything else is not logged as one
_PROXY_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIds:
    """ASGI middleware: every HTTP request gets an id, in `scope["state"]["request_id"]`
    and in the response's X-Request-ID header. Behind Ray Serve the proxy has already given
    the request its id (`x-request-id`) and adds the response header itself, so that one is
    kept and no second header is added."""

    def __init__(self, app: ASGIApp, get_service: Callable[[], SamplingService]):
        self.app, self.get_service = app, get_service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = MutableHeaders(scope=scope).get("x-request-id", "")
        try:
            from_proxy = self.get_service().request_ids_from_proxy
        except RuntimeError:  # the replica is still starting: /healthz must answer anyway
            from_proxy = False
        from_proxy = from_proxy and _PROXY_REQUEST_ID.fullmatch(given) is not None
        request_id = given if from_proxy else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start" and not from_proxy:
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id(request: Request) -> str:
    return request.scope["state"]["request_id"]


def _check_host(service: SamplingService, request: Request) -> None:
    """Refuse a Host the service was not told it serves: DNS rebinding points a web page's
    own name at 127.0.0.1, and the browser then sends that name."""
    if "*" in service.allowed_hosts:
        return
    given = request.headers.get("host", "")
    if host_name(given) not in {host_name(h) for h in service.allowed_hosts}:
        raise HTTPError(
            421,
            "invalid_request_error",
            f"this service does not answer Host {given[:100]!r}; it answers "
            f"{', '.join(service.allowed_hosts)}: add the name clients use to the app "
            "argument allowed_hosts (`ddm serve --host` adds its own)",
        )


def _require_json(request: Request) -> None:
    # a browser sends text/plain and form posts cross-origin without a preflight; JSON
    # only keeps a foreign page from posting here even where the Host check allows it
    given = request.headers.get("content-type")
    if given is None or given.partition(";")[0].strip().lower() != "application/json":
        got = "none" if given is None else repr(given[:100])
        raise HTTPError(
            415,
            "invalid_request_error",
            f"send the body as JSON with `Content-Type: application/json` (got {got})",
        )


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
    declared = request.headers.get("content-length", "")
    if re.fullmatch(r"[0-9]{1,19}", declared) and int(declared) > most:
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
    api.add_middleware(RequestIds, get_service=get_service)

    async def handle(request: Request, route: str, work) -> JSONResponse:
        service = get_service()
        rid = request_id(request)
        start = time.perf_counter()
        labels = {"strategy": "invalid"}  # `work` names the strategy once the body parses
        status = 500
        try:
            _check_host(service, request)
            _authorize(service, request)
            _require_json(request)
            reply = await work(service, await _body(service, request), labels)
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
            _count_error(service, "queue_timeout" if isinstance(e, QueueTimeout) else "overloaded")
            headers = {"Retry-After": str(e.retry_after_s)}
            return error_response(503, "overloaded", str(e), headers=headers)
        except DeadlineExceeded as e:
            status = 503
            _count_error(service, "deadline_exceeded")
            return error_response(503, "deadline_exceeded", str(e))
        except ExpertUnavailable as e:
            # the reason may quote a remote error (a dead actor's pid, IP, id): log it only
            status = 503
            _count_error(service, "expert_unavailable")
            log.warning("request %s: %s", rid, e)
            headers = {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)}
            message = (
                f"{expert_name(e.expert_id)} is unavailable: no live replica answered "
                f"(request id {rid}); retry in {UNAVAILABLE_RETRY_AFTER_S} s, or send "
                "on_unavailable: renormalize to sample without it"
            )
            return error_response(503, "expert_unavailable", message, headers=headers)
        except DecoderUnavailable as e:
            status = 503
            _count_error(service, "decoder_unavailable")
            log.warning("request %s: %s", rid, e)
            headers = {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)}
            message = (
                f"the image decoder did not answer (request id {rid}); "
                f"retry in {UNAVAILABLE_RETRY_AFTER_S} s"
            )
            return error_response(503, "decoder_unavailable", message, headers=headers)
        except Exception:  # the service stays up; the details go to the log, not the client
            _count_error(service, "internal")
            log.exception("request %s failed", rid)
            return error_response(500, "internal_error", f"internal error; request id {rid}")
        finally:
            if service.metrics is not None:
                elapsed = time.perf_counter() - start
                service.metrics.request(route, labels["strategy"], status, elapsed)

    @api.post("/v1/samples")
    async def samples(request: Request) -> JSONResponse:
        async def work(service: SamplingService, body: bytes, labels: dict):
            req = parse(SampleRequest, body)
            labels["strategy"] = strategy_label(req.strategy or service.default_strategy)
            return await service.samples(req)

        return await handle(request, "samples", work)

    @api.post("/v1/images/generations")
    async def images(request: Request) -> JSONResponse:
        async def work(service: SamplingService, body: bytes, labels: dict):
            req = parse(ImagesRequest, body)
            labels["strategy"] = strategy_label(req.strategy or service.default_strategy)
            return await service.images(req)

        return await handle(request, "images", work)

    @api.get("/v1/experts")
    async def experts(request: Request) -> JSONResponse:
        service = get_service()
        try:
            _check_host(service, request)
            _authorize(service, request)
        except HTTPError as e:
            return error_response(e.status, e.kind, e.message, headers=e.headers)
        try:
            return JSONResponse((await service.experts_info()).model_dump(mode="json"))
        except Exception:  # as for sampling: the details to the log, not to the client
            rid = request_id(request)
            log.exception("request %s (GET /v1/experts) failed", rid)
            return error_response(500, "internal_error", f"internal error; request id {rid}")

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
