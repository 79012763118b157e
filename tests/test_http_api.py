"""router_service/http_api.py: the FastAPI app over a SamplingService, driven in-process with
Starlette's TestClient (and httpx's ASGI transport for concurrency) on a tiny real store of
3 conditional dit-tiny experts and a router: image encodings, seeded reproducibility,
served == in-process, validation (422 naming the field, a battery of malformed fields),
body limit (413), Content-Type (415), trusted hosts (421), API keys (401), the compute
budget (422) and the deadline (503), the OpenAI images route, expert identities,
backpressure (503 + Retry-After), unavailable experts (fail / renormalize), backend failures
(500 without the remote traceback), request ids, bounded metric labels, the service
answering after each."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
from pathlib import Path

import httpx
import pytest
import torch
from conftest import BindRecorder, build_tiny_ddm
from fastapi.testclient import TestClient
from PIL import Image

from cluster_jobs.analysis.sampling import run_sample
from ddm_nodes.pixels import from_npy
from router_service import planning
from router_service.app_config import AppArgs, RouterConfig
from router_service.http_api import UNAVAILABLE_RETRY_AFTER_S, host_name, make_api
from router_service.local_experts import LocalExperts
from router_service.metrics import MetricKinds, RouterMetrics
from router_service.policies import MIN_WEIGHT, STRATEGY_LABELS, get_policy
from router_service.sampler import (
    DecoderUnavailable,
    ExpertUnavailable,
    initial_noise,
    sample,
    time_grid,
)
from router_service.schemas import Limits, RequestError, SampleRequest
from router_service.service import Admission, SamplingService
from router_service.store_models import ExpertCard

K, SIZE = 3, 8
LIMITS = Limits(max_n=8, max_steps=20)
KEY = "a-long-key-123"
BASE_URL = "http://127.0.0.1:8000"  # an allowed host (loopback) with a port, as clients send
# what a Ray actor's error carries into str(e): the remote traceback, pid, IP, actor id
REMOTE_ERROR = (
    "ray::ServeReplica:ddm:expert-000.handle_request() (pid=4242, ip=10.1.2.3, "
    "actor_id=8f2e0c1d7b6a5f4e3d2c1b0a01000000)\n"
    "Traceback (most recent call last):\n"
    '  File "/home/ray/anaconda3/lib/python3.11/site-packages/router_service/deployments.py", '
    "line 70, in predict\n"
    "RuntimeError: expert 0 blew up"
)
LEAKS = ("Traceback", 'File "', "/home/ray", "pid=", "10.1.2.3", "actor_id", "blew up")
FASHION = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


# --- fixtures: one tiny store, its experts, a service and a client -----------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("http-api") / "store"
    build_tiny_ddm(root, clusters=K, image_size=SIZE)
    return root


@pytest.fixture(scope="module")
def experts(store) -> LocalExperts:
    return LocalExperts(store)


def _testclient(service: SamplingService) -> TestClient:
    return TestClient(make_api(lambda: service), base_url=BASE_URL)


@pytest.fixture(scope="module")
def client(experts) -> TestClient:
    return _testclient(SamplingService(experts, experts, limits=LIMITS))


def _post(client: TestClient, body: dict, route: str = "/v1/samples", **kwargs) -> httpx.Response:
    return client.post(route, json=body, **kwargs)


def _npy(reply: httpx.Response) -> torch.Tensor:
    assert reply.status_code == 200, reply.text
    return from_npy(base64.b64decode(reply.json()["npy"]))


def _png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def _assert_error(reply: httpx.Response, status: int, param: str | None, *words: str) -> None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param
    for word in words:
        assert word in error["message"], (word, error["message"])
    assert len(reply.headers["X-Request-ID"]) == 32  # a uuid4's hex


# --- POST /v1/samples ----------------------------------------------------------------------


def test_png_format_returns_n_decodable_images_of_the_model_size(client):
    reply = _post(client, {"n": 3, "steps": 2, "seed": 1})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["format"] == "png" and body["npy"] is None and body["shape"] == [3, 1, SIZE, SIZE]
    assert len(body["images"]) == 3
    for b64 in body["images"]:
        image = _png(b64)
        assert image.size == (SIZE, SIZE) and image.mode == "L"


def test_npy_format_is_the_images_in_model_range_and_the_same_seed_repeats_them(client):
    body = {"n": 4, "steps": 3, "seed": 7, "format": "npy", "strategy": "top-2"}
    a = _npy(_post(client, body))
    assert a.shape == (4, 1, SIZE, SIZE) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    # bitwise: one service in this process, one request at a time: the same code, same bytes
    assert torch.equal(_npy(_post(client, body)), a)
    assert not torch.equal(_npy(_post(client, {**body, "seed": 8})), a)


def _expected_full_experts_per_step(experts, n: int, steps: int, seed: int) -> float:
    """What `full` selects, from the router's own probabilities along the same trajectory."""
    result = sample(
        experts,
        experts.router,
        "full",
        initial_noise(n, experts.image_shape, seed),
        time_grid(steps),
        trace=True,
    )
    per_eval = [
        (s.probs >= MIN_WEIGHT).sum(dim=1).clamp_min(1).float().mean() for s in result.trace
    ]
    return float(torch.stack(per_eval).mean())


@pytest.mark.parametrize("strategy, per_step", [("top-1", 1.0), ("top-2", 2.0), ("full", None)])
def test_usage_counts_expert_calls_and_experts_per_step(client, experts, strategy, per_step):
    n, steps, seed = 4, 3, 11
    body = {"n": n, "steps": steps, "seed": seed, "strategy": strategy, "format": "npy"}
    reply = _post(client, body)
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    assert sorted(usage["expert_calls"]) == ["expert-000", "expert-001", "expert-002"]
    assert usage["evaluations"] == steps
    calls = sum(usage["expert_calls"].values())
    # one call per selected expert per evaluation: at least one, at most every expert
    assert steps <= calls <= K * steps
    if per_step is None:  # full: every expert above MIN_WEIGHT of router probability
        per_step = _expected_full_experts_per_step(experts, n, steps, seed)
        assert 1.0 <= per_step <= K
        if per_step == K:
            assert usage["expert_calls"] == {f"expert-00{k}": steps for k in range(K)}
    assert usage["experts_per_step"] == pytest.approx(per_step, abs=1e-4)  # usage: 4 decimals


def test_an_omitted_seed_is_chosen_returned_and_reproduces_the_images(client):
    first = _post(client, {"n": 2, "steps": 2, "format": "npy"})
    seed = first.json()["seed"]
    assert isinstance(seed, int) and seed >= 0
    again = _post(client, {"n": 2, "steps": 2, "format": "npy", "seed": seed})
    assert again.json()["seed"] == seed
    assert torch.equal(_npy(again), _npy(first))  # bitwise: as above, the same run again


@pytest.mark.parametrize(
    "strategy, extra",
    [
        ("top-2", {}),
        ("full", {"solver": "heun"}),
        ("nearest-centroid-2", {"temperature": 0.5}),
        ("top-2", {"temperature": 0.5}),
        ("uniform", {"label": "7", "guidance": 2.0}),
    ],
)
def test_served_images_equal_the_in_process_sampler(client, experts, strategy, extra):
    n, steps, seed = 3, 3, 5
    body = {"n": n, "steps": steps, "seed": seed, "strategy": strategy, "format": "npy", **extra}
    served = _npy(_post(client, body))
    local = run_sample(experts, strategy, n, steps, seed=seed, **extra)
    # Here both run planning.run on these LocalExperts in this process, and agree bitwise; the
    # tolerance (~8 float32 ulps of images in [-1, 1]) states the contract, served equals
    # in-process up to rounding, so the service may batch work another way (as Serve does)
    torch.testing.assert_close(served, local.images, atol=1e-6, rtol=0)


# --- validation: 422 naming the field, 413 past the body limit ------------------------------


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"n": 0}, "n", ["greater than or equal to 1"]),
        ({"n": LIMITS.max_n + 1}, "n", [f"between 1 and {LIMITS.max_n}"]),
        ({"steps": LIMITS.max_steps + 1}, "steps", [f"between 1 and {LIMITS.max_steps}"]),
        ({"n": "4"}, "n", ["valid integer", "'4'"]),
        ({"colour": "red"}, "colour", ["unknown field", "n, steps, strategy"]),
        ({"strategy": "bogus"}, "strategy", ["bogus", "top-K", "nearest-centroid"]),
        ({"strategy": "top-9"}, "strategy", ["top-9", "1 <= K <= 3"]),
        ({"strategy": "threshold-0"}, "strategy", ["0 < T <= 1"]),
        ({"label": "giraffe"}, "label", ["giraffe", "0..9", "'7'"]),
        ({"guidance": 3.0}, "guidance", ["needs a label"]),
        ({"temperature": 0.5, "strategy": "uniform"}, "temperature", ["router policies"]),
        ({"strategy": "oracle"}, "strategy", ["oracle", "analysis only"]),
        ({"format": "gif"}, "format", ["'png'", "'npy'"]),
        ({"solver": "rk4"}, "solver", ["'euler'", "'heun'"]),
    ],
)
def test_bad_requests_are_422_naming_the_field_and_what_it_accepts(client, body, param, words):
    reply = _post(client, {"steps": 2, **body})
    _assert_error(reply, 422, param, *words)
    assert reply.json()["error"]["type"] == "invalid_request_error"


JSON = {"Content-Type": "application/json"}


def test_a_body_that_is_not_json_is_422(client):
    reply = client.post("/v1/samples", content=b'{"n": 2,', headers=JSON)
    _assert_error(reply, 422, None, "not valid JSON")


def test_a_body_over_the_limit_is_413_declared_or_streamed(client):
    most = LIMITS.max_body_bytes
    padded = b'{"n": 1, "steps": 2, "label": "' + b"x" * most + b'"}'
    reply = client.post("/v1/samples", content=padded, headers=JSON)
    _assert_error(reply, 413, None, f"over {most} bytes")
    # no Content-Length (chunked): cut off while reading
    chunks = (padded[i : i + 4096] for i in range(0, len(padded), 4096))
    reply = client.post("/v1/samples", content=chunks, headers=JSON)
    _assert_error(reply, 413, None, f"over {most} bytes")


def test_the_service_still_answers_after_bad_requests(client):
    for body in ({"n": 0}, {"strategy": "top-9"}, {"label": "giraffe"}, {"oops": 1}):
        assert _post(client, {"steps": 2, **body}).status_code == 422
    too_big = b"x" * (LIMITS.max_body_bytes + 1)
    assert client.post("/v1/samples", content=too_big, headers=JSON).status_code == 413
    assert _post(client, {"n": 1, "steps": 2}).status_code == 200


def test_a_wrongly_typed_label_names_the_label_field(client):
    reply = _post(client, {"steps": 2, "label": 1.5})
    _assert_error(reply, 422, "label")
    assert reply.json()["error"]["message"].startswith("label:")


# --- malformed fields: every one a 4xx with a message, never a 500 ---------------------------

LABEL_WORDS = ["0..9", "['0', '1'"]  # the refusal lists the ids and the class names
MALFORMED_SAMPLES = [
    # labels: an id is an int or 1-6 ASCII digits; a name at most 64 of [A-Za-z0-9 ./_-]
    ({"label": "²"}, "label", ["neither an id", *LABEL_WORDS]),  # "²".isdigit() is True
    ({"label": "٣"}, "label", ["neither an id", *LABEL_WORDS]),  # an Arabic-Indic 3
    ({"label": "--1"}, "label", ["is not a class name", *LABEL_WORDS]),
    ({"label": "9" * 5000}, "label", ["neither an id", "(5002 chars)", *LABEL_WORDS]),
    ({"label": "a" * 65}, "label", ["neither an id", *LABEL_WORDS]),
    ({"label": "giraffe"}, "label", ["'giraffe' is not a class name", *LABEL_WORDS]),
    ({"label": 10}, "label", ["10 is not a class id", *LABEL_WORDS]),
    ({"label": -1}, "label", ["-1 is not a class id", *LABEL_WORDS]),
    ({"label": 10**30}, "label", ["is not a class id", *LABEL_WORDS]),
    # strategies: ASCII digits and plain decimal numbers only
    ({"strategy": "top-٣"}, "strategy", ["unknown routing policy", "top-K"]),
    ({"strategy": "nearest-centroid-٢"}, "strategy", ["unknown routing policy"]),
    ({"strategy": "threshold-٠.٥"}, "strategy", ["0 < T <= 1"]),
    ({"strategy": "threshold-nan"}, "strategy", ["0 < T <= 1"]),
    ({"strategy": "threshold-1e999"}, "strategy", ["0 < T <= 1"]),
    ({"strategy": "top-99999999999999999999"}, "strategy", ["far more than", "top-K"]),
    ({"strategy": "top-2@٢"}, "strategy", ["positive number, as in full@0.5"]),
    ({"strategy": "top-2@1_0"}, "strategy", ["positive number, as in full@0.5"]),
    ({"strategy": "top-2@1e-320"}, "strategy", ["from 0.001 to"]),  # would route on NaN
    ({"strategy": "x" * 65}, "strategy", ["at most 64 characters"]),
    ({"temperature": 1e-320}, "temperature", ["greater than or equal to 0.001"]),
    # huge numbers
    ({"n": 10**30}, "n", [f"between 1 and {LIMITS.max_n}"]),
    ({"n": 10**4000}, "n", [f"between 1 and {LIMITS.max_n}", "about 4001 digits"]),
    ({"steps": 10**30}, "steps", [f"between 1 and {LIMITS.max_steps}"]),
    ({"seed": 10**30}, "seed", ["less than or equal to 9223372036854775807"]),
    ({"seed": -1}, "seed", ["greater than or equal to 0"]),
    (b'{"guidance": 1e999}', "guidance", ["finite number"]),
    (b'{"n": 1' + b"0" * 5000 + b"}", None, ["not valid JSON", "number out of range"]),
]
MALFORMED_IMAGES = [
    ({"size": "٨x٨"}, "size", ["should match pattern"]),
    ({"n": 10**30}, "n", [f"between 1 and {LIMITS.max_n}"]),
    ({"num_inference_steps": 10**30}, "num_inference_steps", [f"1 and {LIMITS.max_steps}"]),
    ({"strategy": "top-٣"}, "strategy", ["unknown routing policy"]),
    ({"seed": 10**30}, "seed", ["less than or equal to"]),
    ({"prompt": "x" * 1001}, "prompt", ["at most 1000 characters"]),
]


def _send_malformed(client: TestClient, route: str, body: dict | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(route, content=body, headers=JSON)
    base = {"steps": 2} if route == "/v1/samples" else {"prompt": "3", "num_inference_steps": 2}
    return _post(client, {**base, **body}, route)


@pytest.mark.parametrize("body, param, words", MALFORMED_SAMPLES)
def test_malformed_sample_fields_are_422_naming_the_field(client, body, param, words):
    reply = _send_malformed(client, "/v1/samples", body)
    _assert_error(reply, 422, param, *words)
    assert len(reply.json()["error"]["message"]) < 400  # a 5000-char value is not echoed


@pytest.mark.parametrize("body, param, words", MALFORMED_IMAGES)
def test_malformed_images_fields_are_422_naming_the_field(client, body, param, words):
    reply = _send_malformed(client, "/v1/images/generations", body)
    _assert_error(reply, 422, param, *words)


@pytest.mark.parametrize(
    "label, expected",
    [("T-shirt/top", 0), ("t-shirt/top", 0), (" Ankle boot ", 9), ("ankle boot", 9), ("7", 7)],
)
def test_labels_resolve_fashion_mnist_names_and_ids(label, expected):
    assert planning.resolve_label(FASHION, label) == expected


def test_the_service_answers_a_good_request_after_the_whole_battery(client):
    for route, battery in (
        ("/v1/samples", MALFORMED_SAMPLES),
        ("/v1/images/generations", MALFORMED_IMAGES),
    ):
        for body, _, _ in battery:
            reply = _send_malformed(client, route, body)
            assert reply.status_code == 422 and reply.json()["error"]["message"], reply.text
    assert _post(client, {"n": 1, "steps": 2, "label": "7"}).status_code == 200


# --- Content-Type: JSON only ---------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,  # what `curl -d` without -H, or a bare fetch(), sends as no JSON type
        "text/plain",  # a browser's cross-origin POST that needs no preflight
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
    ],
)
@pytest.mark.parametrize("route", ["/v1/samples", "/v1/images/generations"])
def test_a_post_body_not_declared_json_is_415(client, route, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    reply = client.post(route, content=b'{"prompt": "3"}', headers=headers)
    _assert_error(reply, 415, None, "Content-Type: application/json")


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_with_parameters_or_in_any_case_is_accepted(client, content_type):
    body = b'{"n": 1, "steps": 2}'
    reply = client.post("/v1/samples", content=body, headers={"Content-Type": content_type})
    assert reply.status_code == 200, reply.text


def test_a_form_post_is_415(client):
    reply = client.post("/v1/samples", data={"n": "1"})
    _assert_error(reply, 415, None, "Content-Type: application/json", "urlencoded")


# --- trusted hosts (DNS rebinding) ---------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]:8000"]
)
def test_a_foreign_host_is_421_naming_allowed_hosts_on_every_v1_route(client, host):
    headers = {"Host": host}
    for reply in (
        _post(client, {"n": 1, "steps": 2}, headers=headers),
        _post(client, {"prompt": "3"}, "/v1/images/generations", headers=headers),
        client.get("/v1/experts", headers=headers),
    ):
        _assert_error(reply, 421, None, "allowed_hosts", repr(host))


def test_probes_answer_any_host(client):
    headers = {"Host": "10.244.1.7:8000"}  # a kubelet calls the pod IP
    assert client.get("/healthz", headers=headers).status_code == 200
    assert client.get("/readyz", headers=headers).status_code == 200


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost:8000", "LOCALHOST", "localhost.", "[::1]:8000", "[::1]"]
)
def test_loopback_hosts_are_allowed_by_default_whatever_the_port(client, host):
    assert client.get("/v1/experts", headers={"Host": host}).status_code == 200


def test_configured_hosts_replace_the_defaults_and_star_allows_any(experts):
    named = _client(experts, experts, allowed_hosts=["ddm.example.org", "10.0.0.5:8000"])
    for host in ("ddm.example.org", "DDM.example.org:443", "10.0.0.5"):
        assert named.get("/v1/experts", headers={"Host": host}).status_code == 200, host
    refused = named.get("/v1/experts", headers={"Host": "localhost"})
    _assert_error(refused, 421, None, "ddm.example.org, 10.0.0.5:8000")
    anyone = _client(experts, experts, allowed_hosts=["*"])
    assert anyone.get("/v1/experts", headers={"Host": "anything.example"}).status_code == 200


@pytest.mark.parametrize(
    "authority, host",
    [
        ("localhost:8000", "localhost"),
        ("[::1]:8000", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("LocalHost.", "localhost"),
        ("10.0.0.5", "10.0.0.5"),
    ],
)
def test_host_name_drops_the_port_brackets_and_case(authority, host):
    assert host_name(authority) == host


# --- request ids ---------------------------------------------------------------------------


def test_every_response_carries_a_fresh_request_id(client):
    replies = [
        client.get("/v1/experts"),
        _post(client, {"n": 0}),
        client.post("/v1/samples", content=b"{}"),
        client.get("/v1/experts", headers={"Host": "evil.example"}),
        client.get("/healthz"),
        client.get("/no-such-route"),
    ]
    ids = [r.headers["X-Request-ID"] for r in replies]
    assert [r.status_code for r in replies] == [200, 422, 415, 421, 200, 404]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids) and len(set(ids)) == len(ids)
    given = client.get("/healthz", headers={"X-Request-ID": "mine"})  # not behind Serve
    assert given.headers["X-Request-ID"] != "mine"


def test_behind_serve_the_proxys_request_id_is_the_one_used(experts):
    """Ray Serve's proxy gives each request an x-request-id and puts it on the response
    itself: the service then keeps that id and adds no second header."""
    backend = Wrapped(experts, failing={0, 1, 2}, error=lambda k: RuntimeError(REMOTE_ERROR))
    client = _client(experts, backend, request_ids_from_proxy=True)
    proxy_id = "0d6a3b2e-5c4f-4e1a-9b8d-7f6e5d4c3b2a"
    reply = _post(client, {"n": 1, "steps": 1}, headers={"x-request-id": proxy_id})
    assert reply.status_code == 500 and "x-request-id" not in reply.headers
    assert reply.json()["error"]["message"] == f"internal error; request id {proxy_id}"
    odd = _post(client, {"n": 1, "steps": 1}, headers={"x-request-id": "two words"})
    assert odd.headers["X-Request-ID"] in odd.json()["error"]["message"]


# --- API keys ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(experts) -> TestClient:
    return _testclient(SamplingService(experts, experts, limits=LIMITS, api_key=KEY))


def test_v1_routes_need_the_bearer_key(keyed):
    body = {"n": 1, "steps": 2}
    missing = _post(keyed, body)
    _assert_error(missing, 401, None, "Authorization: Bearer")
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "authentication_error"
    for header in (f"Bearer {KEY}x", "Bearer wrong-key-0000", KEY, f"Basic {KEY}"):
        assert _post(keyed, body, headers={"Authorization": header}).status_code == 401
    assert _post(keyed, body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    images = {"prompt": "3", "num_inference_steps": 2}
    assert _post(keyed, images, "/v1/images/generations").status_code == 401
    assert keyed.get("/v1/experts").status_code == 401
    reply = keyed.get("/v1/experts", headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 200 and len(reply.json()["experts"]) == K


def test_probes_need_no_key(keyed):
    assert keyed.get("/healthz").json() == {"status": "ok"}
    ready = keyed.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "detail": "ready"}


# --- POST /v1/images/generations -----------------------------------------------------------


@pytest.mark.parametrize("prompt", ["3", "a photo of a 3"])
def test_images_route_matches_the_prompt_to_a_class(client, prompt):
    body = {"prompt": prompt, "n": 2, "num_inference_steps": 2, "size": "8x8", "seed": 3}
    reply = _post(client, body, "/v1/images/generations")
    assert reply.status_code == 200, reply.text
    out = reply.json()
    assert out["seed"] == 3 and out["degraded"] is False and len(out["data"]) == 2
    for item in out["data"]:
        assert item["revised_prompt"] == "3"
        assert _png(item["b64_json"]).size == (SIZE, SIZE)
    assert out["usage"]["evaluations"] == 2


def test_images_route_samples_the_matched_class(client):
    images = _post(
        client, {"prompt": "3", "num_inference_steps": 2, "seed": 4}, "/v1/images/generations"
    )
    samples = _post(client, {"n": 1, "steps": 2, "seed": 4, "label": 3})
    # the same PNG bytes: both routes plan the same run, sampled in this process
    assert images.json()["data"][0]["b64_json"] == samples.json()["images"][0]


@pytest.mark.parametrize(
    "extra, param, words",
    [
        ({"prompt": "giraffe"}, "prompt", ["giraffe", "0, 1, 2, 3, 4, 5, 6, 7, 8, 9"]),
        ({"size": "16x16"}, "size", ["8x8"]),
        ({"response_format": "url"}, "response_format", ["b64_json"]),
        ({"model": "other"}, "model", ["'ddm'"]),
        ({"n": LIMITS.max_n + 1}, "n", [f"between 1 and {LIMITS.max_n}"]),
        ({"num_inference_steps": 21}, "num_inference_steps", ["between 1 and 20"]),
    ],
)
def test_images_route_refuses_what_it_cannot_serve(client, extra, param, words):
    body = {"prompt": "3", "num_inference_steps": 2, **extra}
    _assert_error(_post(client, body, "/v1/images/generations"), 422, param, *words)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("sneaker", 7),
        ("Sneakers", 7),
        ("a photo of an ankle boot", 9),
        ("shirt", 6),
        ("t-shirt", 0),
        ("top", 0),
        ("bags", 8),
        ("Trouser", 1),
        ("two coats", 4),
    ],
)
def test_match_prompt_on_fashion_mnist_names(prompt, expected):
    assert planning.match_prompt(FASHION, prompt) == expected


def test_match_prompt_refuses_an_unknown_prompt_listing_the_names():
    with pytest.raises(RequestError) as e:
        planning.match_prompt(FASHION, "giraffe")
    assert e.value.field == "prompt" and e.value.status == 422
    assert "giraffe" in str(e.value) and ", ".join(FASHION) in str(e.value)
    with pytest.raises(RequestError, match="no class names"):
        planning.match_prompt(None, "sneaker")


# --- GET /v1/experts -----------------------------------------------------------------------


def test_experts_lists_each_expert_with_its_manifest_sha256(client, store):
    reply = client.get("/v1/experts")
    assert reply.status_code == 200
    body = reply.json()
    assert body["router"] is True and body["class_names"] == [str(i) for i in range(10)]
    assert [e["name"] for e in body["experts"]] == ["expert-000", "expert-001", "expert-002"]
    for k, e in enumerate(body["experts"]):
        # the published version: the one the expert's pointer names
        prefix = store / "experts" / f"expert-{k:03d}"
        version = json.loads((prefix / "current.json").read_text())["version"]
        manifest = (prefix / "versions" / version / "manifest.json").read_bytes()
        assert e["id"] == e["cluster"] == k
        assert len(e["sha256"]) == 64 and int(e["sha256"], 16) >= 0
        assert e["sha256"] == hashlib.sha256(manifest).hexdigest()
        assert e["preset"] == "dit-tiny" and e["replicas"] == 1 and e["healthy"] is True


# --- fake experts backends -----------------------------------------------------------------


class GatedExperts:
    """Async: every predict waits for `gate`, then answers zeros."""

    num_experts = K

    def __init__(self):
        self.gate = asyncio.Event()
        self.calls = 0

    async def predict(self, k, x, t, y):
        self.calls += 1
        await self.gate.wait()
        return torch.zeros_like(x)


class Wrapped:
    """LocalExperts, except that `failing` experts raise `error(k)` and `down` ones report
    unhealthy."""

    def __init__(self, inner, failing=(), error=None, down=()):
        self.inner, self.failing, self.error, self.down = inner, set(failing), error, set(down)
        self.asked: list[int] = []

    @property
    def num_experts(self) -> int:
        return self.inner.num_experts

    def predict(self, k, x, t, y):
        self.asked.append(k)
        if k in self.failing:
            raise self.error(k)
        return self.inner.predict(k, x, t, y)

    def healthy(self, k) -> bool:
        return k not in self.down


def _client(experts, backend, **options) -> TestClient:
    return _testclient(SamplingService(experts, backend, **{"limits": LIMITS, **options}))


async def _until(condition) -> None:
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the service never reached the expected state")


# --- backpressure --------------------------------------------------------------------------


def test_past_the_queue_requests_get_503_with_retry_after_and_the_others_finish(experts):
    backend = GatedExperts()
    admission = Admission(max_active=1, max_queued=1, retry_after_s=2)
    service = SamplingService(experts, backend, limits=LIMITS, admission=admission)
    api = make_api(lambda: service)
    body = {"n": 1, "steps": 1, "strategy": "uniform", "format": "npy"}

    async def scenario():
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
            first = asyncio.create_task(http.post("/v1/samples", json=body))
            await _until(lambda: admission.active == 1)
            second = asyncio.create_task(http.post("/v1/samples", json=body))
            await _until(lambda: admission.waiting == 1)
            third = await http.post("/v1/samples", json=body)
            assert not first.done() and not second.done()
            backend.gate.set()
            return third, await first, await second

    third, first, second = asyncio.run(scenario())
    _assert_error(third, 503, None, "capacity")
    assert third.headers["Retry-After"] == "2" and third.json()["error"]["type"] == "overloaded"
    for reply in (first, second):  # zero velocity: the images are the clipped initial noise
        noise = initial_noise(1, (1, SIZE, SIZE), reply.json()["seed"])
        # bitwise: the same seeded noise, every step adds exactly 0, the same clamp
        assert torch.equal(_npy(reply), noise.clamp(-1, 1))
    assert second.json()["timing"]["queued_s"] > 0
    assert admission.active == 0 and admission.waiting == 0


# --- the compute budget and the deadline ---------------------------------------------------


def test_the_default_budget_admits_top_2_at_the_largest_default_request_but_not_full():
    limits = Limits()
    largest = SampleRequest(n=limits.max_n, steps=limits.max_steps, solver="heun")
    top2 = planning.expert_evaluations(largest, get_policy("top-2"), 8)
    assert top2 == limits.max_n * limits.max_steps * 2 * 2 == limits.max_expert_evaluations
    full = planning.expert_evaluations(largest, get_policy("full"), 8)
    assert full == 4 * top2 > limits.max_expert_evaluations
    # k is capped at the number of experts; threshold may take every expert
    capped = planning.expert_evaluations(largest, get_policy("nearest-centroid-9"), 3)
    assert capped == planning.expert_evaluations(largest, get_policy("threshold-0.5"), 3)
    assert capped == limits.max_n * limits.max_steps * 2 * 3


def test_a_request_over_the_budget_is_422_with_the_figures_before_any_expert_call(experts):
    backend = Wrapped(experts)
    small = LIMITS.model_copy(update={"max_expert_evaluations": 50})
    client = _client(experts, backend, limits=small)
    over = _post(client, {"n": 2, "steps": 5, "solver": "heun", "strategy": "full"})
    _assert_error(
        over,
        422,
        None,
        "n 2 x steps 5 x 2 (heun) x 3 experts per step (full) = 60 expert evaluations",
        "limits.max_expert_evaluations of 50",
        "lower n or steps, or solver euler, or a sparser strategy (top-1, top-2)",
    )
    images = _post(
        client,
        {"prompt": "3", "n": 2, "num_inference_steps": 10, "strategy": "uniform"},
        "/v1/images/generations",
    )
    _assert_error(images, 422, None, "num_inference_steps 10", "= 60 expert evaluations")
    assert backend.asked == []  # refused before sampling
    fits = _post(client, {"n": 2, "steps": 5, "solver": "heun", "strategy": "top-2"})  # 40
    assert fits.status_code == 200, fits.text


def _http(service: SamplingService) -> httpx.AsyncClient:
    api = make_api(lambda: service)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url=BASE_URL)


def test_sampling_past_the_deadline_is_cancelled_with_503_and_frees_its_slot(experts):
    backend = GatedExperts()  # the gate stays shut: the first step never ends
    kinds, seen = recording_kinds()
    limits = LIMITS.model_copy(update={"request_timeout_s": 0.2})
    service = SamplingService(
        experts, backend, limits=limits, metrics=RouterMetrics(kinds), admission=Admission(1, 0)
    )
    body = {"n": 1, "steps": 2, "strategy": "uniform", "format": "npy"}

    async def scenario():
        async with _http(service) as http:
            late = await http.post("/v1/samples", json=body)
            slot_free = (service.admission.active, service.admission.waiting) == (0, 0)
            backend.gate.set()
            # the one slot is free again: a request after it is admitted and answered
            return late, slot_free, await http.post("/v1/samples", json=body)

    late, slot_free, after = asyncio.run(scenario())
    _assert_error(late, 503, None, "limits.request_timeout_s (0.2 s", "cancelled", "fewer images")
    assert late.json()["error"]["type"] == "deadline_exceeded"
    assert "Retry-After" not in late.headers  # the same request would run out again
    assert slot_free and after.status_code == 200, after.text
    assert {"kind": "deadline_exceeded"} in seen["ddm_serve_errors"]


def test_no_slot_before_the_deadline_is_503_with_retry_after_and_nothing_sampled(experts):
    # two services over one Admission: the first holds its only slot (default deadline),
    # the second has 0.2 s to get it
    admission = Admission(max_active=1, max_queued=1, retry_after_s=3)
    holding, waiting = GatedExperts(), GatedExperts()
    holder = SamplingService(experts, holding, limits=LIMITS, admission=admission)
    short = LIMITS.model_copy(update={"request_timeout_s": 0.2})
    waiter = SamplingService(experts, waiting, limits=short, admission=admission)
    body = {"n": 1, "steps": 1, "strategy": "uniform", "format": "npy"}

    async def scenario():
        async with _http(holder) as first_http, _http(waiter) as second_http:
            first = asyncio.create_task(first_http.post("/v1/samples", json=body))
            await _until(lambda: admission.active == 1)
            second = await second_http.post("/v1/samples", json=body)
            left_queue = admission.waiting == 0 and not first.done()
            holding.gate.set()
            return second, left_queue, await first

    second, left_queue, first = asyncio.run(scenario())
    _assert_error(
        second, 503, None, "no sampling slot came free within limits.request_timeout_s (0.2 s)"
    )
    assert second.headers["Retry-After"] == "3" and second.json()["error"]["type"] == "overloaded"
    assert left_queue and waiting.calls == 0  # it never started sampling
    assert first.status_code == 200, first.text
    assert admission.active == admission.waiting == 0


# --- metric labels: a bounded set whatever the requests name --------------------------------


def recording_kinds() -> tuple[MetricKinds, dict[str, list[dict]]]:
    """ray.util.metrics' Counter, Gauge and Histogram interface, recording each series' tags
    (as Ray does, a record must carry exactly the declared tag keys)."""
    seen: dict[str, list[dict]] = {}

    class Metric:
        def __init__(self, name, description="", boundaries=None, tag_keys=()):
            self.name, self.tag_keys = name, set(tag_keys or ())
            seen.setdefault(name, [])

        def _record(self, tags):
            assert set(tags or {}) == self.tag_keys, (self.name, tags)
            seen[self.name].append(dict(tags or {}))

        def inc(self, value=1.0, tags=None):
            self._record(tags)

        def observe(self, value, tags=None):
            self._record(tags)

        def set(self, value, tags=None):
            self._record(tags)

    return MetricKinds(Counter=Metric, Gauge=Metric, Histogram=Metric), seen


def test_twenty_thresholds_make_one_strategy_label_and_answers_keep_the_name(experts):
    kinds, seen = recording_kinds()
    client = _client(experts, experts, metrics=RouterMetrics(kinds))
    for i in range(20):
        name = f"threshold-{0.05 + 0.013 * i:.3f}"
        reply = _post(client, {"n": 1, "steps": 1, "strategy": name})
        assert (
            reply.status_code == 200
            and reply.json()["strategy"] == f"threshold-{float(name[10:]):g}"
        )
    for name in ("top-2@0.5", "top-2@3", "nearest-centroid-2", "nearest-centroid", "full@0.25"):
        assert _post(client, {"n": 1, "steps": 1, "strategy": name}).status_code == 200
    for name in ("top-9", "top-99999", "bogus", "threshold-٠.٥"):  # refused: 422
        assert _post(client, {"n": 1, "steps": 1, "strategy": name}).status_code == 422

    def labels(series: str) -> set[str]:
        return {tags["strategy"] for tags in seen[series]}

    assert labels("ddm_serve_requests") == {
        "threshold",
        "top-2",
        "nearest-centroid",
        "full",
        "top-k",
        "invalid",
    }
    thresholds = [t for t in seen["ddm_serve_requests"] if t["strategy"] == "threshold"]
    assert len(thresholds) == 20
    for series in (
        "ddm_serve_request_seconds",
        "ddm_serve_step_seconds",
        "ddm_serve_routed_samples",
    ):
        assert "threshold" in labels(series) and labels(series) <= STRATEGY_LABELS, series
    assert labels("ddm_serve_expert_disagreement_degrees") <= STRATEGY_LABELS


# --- unavailable experts, failing backends, readiness ---------------------------------------


def _unavailable(k: int) -> ExpertUnavailable:
    # the reason RemoteExperts gives after its retries quotes the remote error's first line
    return ExpertUnavailable(k, f"3 attempts failed, the last with RayActorError: {REMOTE_ERROR}")


def test_an_unavailable_expert_fails_the_request_with_503_by_default(experts):
    client = _client(experts, Wrapped(experts, failing={1}, error=_unavailable))
    reply = _post(client, {"n": 2, "steps": 2, "strategy": "full"})
    _assert_error(reply, 503, None, "expert-001", "renormalize")
    assert reply.json()["error"]["type"] == "expert_unavailable"
    assert reply.headers["Retry-After"] == str(UNAVAILABLE_RETRY_AFTER_S)
    for leak in LEAKS:  # our sentence, not the remote error's text
        assert leak not in reply.text, leak
    assert reply.headers["X-Request-ID"] in reply.json()["error"]["message"]


def test_renormalize_leaves_the_unavailable_expert_out_and_says_so(client, experts):
    n, steps, seed = 3, 3, 9
    body = {"n": n, "steps": steps, "seed": seed, "strategy": "full", "format": "npy"}
    backend = Wrapped(experts, failing={1}, error=_unavailable)
    degraded = _post(_client(experts, backend), {**body, "on_unavailable": "renormalize"})
    assert degraded.status_code == 200, degraded.text
    out = degraded.json()
    assert out["degraded"] is True and out["missing_experts"] == ["expert-001"]
    calls = out["usage"]["expert_calls"]
    # expert 1 was asked once, then left out; the first evaluation was dispatched again
    assert calls == {"expert-000": steps + 1, "expert-001": 1, "expert-002": steps + 1}
    assert backend.asked.count(1) == 1
    images = _npy(degraded)
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1

    healthy = _post(client, body)
    assert healthy.json()["degraded"] is False and healthy.json()["missing_experts"] == []
    assert not torch.allclose(images, _npy(healthy), atol=1e-4)

    # the same as a run whose router never gives expert 1 any probability
    def router_without_1(x, t):
        logits = experts.router(x, t).clone()
        logits[:, 1] = -torch.inf
        return logits

    expected = sample(
        experts,
        router_without_1,
        "full",
        initial_noise(n, experts.image_shape, seed),
        time_grid(steps),
    )
    # another code path to the same weights (renormalised after the failure vs a zero
    # probability from the start): float32 rounding differs, and 3 steps carry that to
    # images in [-1, 1] well within 1e-5
    torch.testing.assert_close(images, expected.images, atol=1e-5, rtol=0)


def test_a_failing_backend_is_a_generic_500_logged_under_its_request_id(experts, caplog):
    def boom(k):
        return RuntimeError(REMOTE_ERROR)  # as a RayTaskError's text arrives

    backend = Wrapped(experts, failing={0, 1, 2}, error=boom)
    service = SamplingService(experts, backend, limits=LIMITS)
    client = _testclient(service)
    with caplog.at_level(logging.ERROR, logger="ddm.serve"):
        reply = _post(client, {"n": 1, "steps": 2})
    request_id = reply.headers["X-Request-ID"]
    _assert_error(reply, 500, None, f"internal error; request id {request_id}")
    assert reply.json()["error"]["type"] == "internal_error"
    for leak in LEAKS:
        assert leak not in reply.text, leak
    (record,) = [r for r in caplog.records if r.name == "ddm.serve"]
    assert request_id in record.getMessage() and "10.1.2.3" in str(record.exc_info[1])
    assert service.admission.active == service.admission.waiting == 0
    backend.failing.clear()
    assert _post(client, {"n": 1, "steps": 2}).status_code == 200


class FailingDecoder:
    def decode(self, final):
        raise DecoderUnavailable(f"no decoder replica answered: {REMOTE_ERROR}")


def test_an_unavailable_decoder_is_503_in_our_words(experts):
    client = _client(experts, experts, decoder=FailingDecoder())
    reply = _post(client, {"n": 1, "steps": 1})
    _assert_error(reply, 503, None, "decoder did not answer", "retry in")
    assert reply.json()["error"]["type"] == "decoder_unavailable"
    assert reply.headers["Retry-After"] == str(UNAVAILABLE_RETRY_AFTER_S)
    for leak in LEAKS:
        assert leak not in reply.text, leak


def test_readiness_and_expert_health_follow_the_backend(experts):
    client = _client(experts, Wrapped(experts, down={1}))
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert "expert-001" in ready.json()["detail"]
    health = [e["healthy"] for e in client.get("/v1/experts").json()["experts"]]
    assert health == [True, False, True]


# --- the expert deployment's class, driven without Serve ----------------------------------


def _unversioned(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in ("version", "_internal")}


def test_the_app_arguments_reach_every_replica_whole(store, monkeypatch):
    """build_app hands every deployment the whole AppArgs as its JSON (no hand-picked
    fields): what each replica parses equals what `ddm serve` was given."""
    import router_service.app as app_module

    experts, roster, router = BindRecorder(), BindRecorder(), BindRecorder()
    monkeypatch.setattr(app_module, "ExpertServer", experts)
    monkeypatch.setattr(app_module, "ExpertRoster", roster)
    monkeypatch.setattr(app_module, "RouterServer", router)
    given = AppArgs(
        store=str(Path(store).resolve()),
        replicas=2,
        device="cpu",
        torch_threads=3,
        router_torch_threads=1,
        step_window_s=0.007,
        step_max_rows=77,
        default_strategy="full",
        expert_timeout_s=7,
        expert_replicas={1: 3},
        limits={"max_n": 5},
    )
    app_module.build_app(given)
    cards = [ExpertCard.model_validate_json(args[1]) for _, args in experts.bound]
    assert [card.id for card in cards] == list(range(K))
    for (options, (args_json, _)), card in zip(experts.bound, cards, strict=True):
        assert AppArgs.model_validate_json(args_json) == given
        assert _unversioned(options) == given.expert_options(card.id)
    ((_, handles),) = roster.bound  # every expert deployment is in the app through it
    assert len(handles) == K
    ((options, (args_json, _, decoder)),) = router.bound
    assert AppArgs.model_validate_json(args_json) == given
    config = RouterConfig.model_validate(options["user_config"])
    assert _unversioned(options) == given.router_options(config)
    # a version made of the arguments: a redeploy restarts only what changed
    assert len({o["version"] for o, _ in [*experts.bound, *router.bound]}) == K + 1
    assert decoder is None  # a pixel-space store: nothing to decode
    # the router advertises exactly the versions the expert replicas were pinned to, and
    # the default registry (no experts.json) is what it serves
    assert config.experts == cards and config.registry == ""


def test_expert_replica_batches_concurrent_sub_batches_at_different_steps(
    store, experts, monkeypatch
):
    """@serve.batch stacks sub-batches of concurrent calls (each at its own t) into one
    forward; reconfigure (the user_config path) changes the batch limit; a sub-batch over
    the limit goes in pieces; every answer equals the in-process expert's."""
    from ray.serve import batching as serve_batching

    from router_service.deployments import ExpertServer

    # outside a replica there is no replica context for Serve's max_ongoing_requests hint
    monkeypatch.setattr(
        serve_batching._BatchQueue,
        "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
        lambda self: None,
    )

    card = experts.cards[1].model_dump_json()
    replica = ExpertServer.func_or_class(AppArgs(store=str(store)).model_dump_json(), card)
    forwards: list[int] = []
    model = replica.expert

    def counting(x, t, y):
        forwards.append(len(x))
        return model(x, t, y)

    replica.expert = counting
    g = torch.Generator().manual_seed(0)
    subs = [
        (torch.randn(n, 1, SIZE, SIZE, generator=g), torch.full((n,), t))
        for n, t in [(2, 0.9), (3, 0.4)]
    ]

    async def concurrently(max_batch: int, wait: float):
        replica.reconfigure({"max_batch": max_batch, "batch_wait_timeout_s": wait})
        forwards.clear()
        outs = await asyncio.gather(*(replica.predict(x.numpy(), t.numpy(), None) for x, t in subs))
        return outs, list(forwards)

    async def both():  # one event loop: the batch queue lives in it
        return await concurrently(8, 0.2), await concurrently(2, 0.0)

    (outs, batched), (pieces, split_up) = asyncio.run(both())
    assert batched == [5]  # one forward for both requests
    for (x, t), v in zip(subs, outs, strict=True):
        expected = experts.predict(1, x, t.float(), None)
        # another batch (5 samples stacked vs 2 or 3): another GEMM shape, so float32 rounding
        # differs; measured ~1e-6 on velocities of O(1)
        torch.testing.assert_close(torch.from_numpy(v), expected, atol=1e-5, rtol=1e-5)
    assert sorted(split_up) == [1, 2, 2]  # limit 2: the 3-sample sub-batch went in pieces
    assert [len(v) for v in pieces] == [2, 3]
    # the batch queue is the replica's: the class still pickles for a deployment after use
    import ray.cloudpickle

    assert ray.cloudpickle.loads(ray.cloudpickle.dumps(ExpertServer.func_or_class))
