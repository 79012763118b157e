"""The Serve router service for real: `ddm serve` on a local Ray head (loopback, token
auth), a real Prometheus scraping Ray's metrics port, HTTP clients on loopback.

In file order: served == in-process; the HTTP API through Serve's proxy; 16 concurrent
clients x 10 requests with zero errors, then the same while one replica of a two-replica
expert is killed; an expert with no live replica (its weights altered, its replica
killed: the replacement refuses the weights) answered with 503 or `degraded`; and every
series the dashboards need seen by Prometheus.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import build_tiny_ddm, ddm_serving, free_port

from cluster_jobs.analysis.sampling import run_remote_sample, run_sample, sample_request
from ddm_nodes.checkpoint import WEIGHTS_FILE
from ddm_nodes.names import expert_prefix
from router_service.local_experts import LocalExperts

pytestmark = pytest.mark.integration
K, SIZE = 3, 8
API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
APP_CONFIG = {
    "expert_replicas": {"0": 2},  # expert-000 survives losing one replica
    "expert_timeout_s": 4,
    "expert_down_for_s": 2,
    "health_check_period_s": 2,
    "max_concurrent_requests": 8,
    "max_queued_requests": 64,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return build_tiny_ddm(tmp_path_factory.mktemp("serve") / "store", K, SIZE)


def _cluster_info(env: dict) -> dict:
    return json.loads((Path(env["DDM_CLUSTER_DIR"]) / "cluster.json").read_text())


@pytest.fixture(scope="module")
def served(ray_head, store, tmp_path_factory):
    """`ddm serve` in the foreground as a user runs it; SIGINT stops it."""
    folder = tmp_path_factory.mktemp("served")
    config = folder / "app.json"
    config.write_text(json.dumps(APP_CONFIG))
    with ddm_serving(store, ray_head, folder, "--config", str(config), "--api-key", API_KEY) as url:
        yield url


@pytest.fixture(scope="module")
def prometheus(ray_head, tmp_path_factory):
    """A real Prometheus (Debian package) scraping the head's metrics export port."""
    exe = shutil.which("prometheus")
    assert exe, "prometheus is not installed: `apt-get install prometheus` (.ci/run does)"
    folder = tmp_path_factory.mktemp("prometheus")
    target = f"127.0.0.1:{_cluster_info(ray_head)['metrics_export_port']}"
    (folder / "prometheus.yml").write_text(
        textwrap.dedent(
            f"""
            global: {{scrape_interval: 1s, evaluation_interval: 1s}}
            scrape_configs:
              - job_name: ray
                static_configs: [{{targets: ["{target}"]}}]
            """
        )
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "prometheus.log", "w"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "prometheus did not start"
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _post(url: str, body: dict, path: str = "/v1/samples", headers=AUTH) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=120)


def test_served_sampling_equals_in_process(served, store, tmp_path, ddm, ray_head):
    experts = LocalExperts(store)
    for strategy in ("top-2", "full", "nearest-centroid"):
        request = sample_request(strategy, n=6, steps=8, seed=11)
        remote = run_remote_sample(served, request, API_KEY)
        local = run_sample(experts, strategy, n=6, steps=8, seed=11)
        # other processes (the Serve replicas) and other batches (@serve.batch stacks
        # sub-batches): float32 rounding differs at every expert call, and 8 steps carry it
        # to images in [-1, 1]; 1e-4 bounds that, and README quotes it
        assert float((remote.images - local.images).abs().max()) <= 1e-4, strategy
        assert remote.expert_calls == local.expert_calls
    # the CLI, as README shows it
    out = ddm(
        "sample",
        "--url",
        served,
        "--out",
        str(tmp_path / "s.png"),
        "--npy",
        str(tmp_path / "s.npy"),
        "--n",
        "4",
        "--steps",
        "5",
        "--json",
        env={**ray_head, "DDM_API_KEY": API_KEY},
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["backend"] == served
    assert np.load(tmp_path / "s.npy").shape == (4, 1, SIZE, SIZE)


def test_http_api_through_serve(served):
    assert httpx.get(f"{served}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{served}/readyz").status_code == 200
    denied = _post(served, {"n": 1, "steps": 2}, headers={})
    assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
    bad = _post(served, {"n": 1, "steps": 2, "strategy": "top-7"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "strategy"
    assert "1 <= K <= 3" in bad.json()["error"]["message"]
    png = _post(served, {"n": 2, "steps": 3, "strategy": "top-1", "seed": 1})
    assert png.status_code == 200, png.text
    assert [base64.b64decode(i)[:4] for i in png.json()["images"]] == [b"\x89PNG"] * 2
    images = _post(
        served, {"prompt": "a 7", "n": 2, "num_inference_steps": 3}, "/v1/images/generations"
    )
    assert images.status_code == 200, images.text
    assert [d["revised_prompt"] for d in images.json()["data"]] == ["7", "7"]
    experts = httpx.get(f"{served}/v1/experts", headers=AUTH).json()["experts"]
    assert [(e["name"], e["replicas"], e["healthy"]) for e in experts] == [
        ("expert-000", 2, True),
        ("expert-001", 1, True),
        ("expert-002", 1, True),
    ]


def _readme_curl_commands() -> list[str]:
    """The curl commands of README's HTTP API section, continuation lines joined."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### HTTP API") : text.index("### Serving metrics")]
    lines = "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S)).replace("\\\n", " ")
    return [line.strip() for line in lines.splitlines() if line.strip().startswith("curl ")]


def test_readme_curl_examples_work(served, tmp_path):
    commands = _readme_curl_commands()
    assert len(commands) >= 5 and any("/v1/images/generations" in c for c in commands)
    for command in commands:
        command = command.replace("http://127.0.0.1:8000", served).replace('"sneaker"', '"7"')
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command.replace("curl ", "curl --fail-with-body ", 1)],
            env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "DDM_API_KEY": API_KEY},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, (command, done.stdout[-500:], done.stderr[-500:])
        if "| python3" not in command:
            assert isinstance(json.loads(done.stdout), dict), command
    assert np.load(tmp_path / "x.npy").shape == (2, 1, SIZE, SIZE)


def _load(url: str, clients: int, requests: int, strategy: str) -> list[int]:
    def client(c: int) -> list[int]:
        codes = []
        with httpx.Client(timeout=120) as http:
            for r in range(requests):
                body = {"n": 2, "steps": 6, "strategy": strategy, "seed": 100 * c + r}
                codes.append(http.post(f"{url}/v1/samples", json=body, headers=AUTH).status_code)
        return codes

    with ThreadPoolExecutor(clients) as pool:
        return [code for codes in pool.map(client, range(clients)) for code in codes]


def _ray_python(env: dict, code: str) -> str:
    """Run `code` in a fresh Ray driver attached to the test head; its stdout."""
    prelude = (
        "import ray\n"
        f"ray.init(address={_cluster_info(env)['gcs_address']!r}, logging_level='ERROR')\n"
        "names = [a['name'] for a in ray.util.list_named_actors(all_namespaces=True)"
        " if a['namespace'] == 'serve']\n"
    )
    info = _cluster_info(env)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": info["token_path"]}
    done = subprocess.run(
        [sys.executable, "-c", prelude + code], env={**env, **auth}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _kill_replicas(env: dict, deployment: str, count: int) -> list[str]:
    out = _ray_python(
        env,
        f"victims = [n for n in names if '#{deployment}#' in n][:{count}]\n"
        "for n in victims:\n"
        "    ray.kill(ray.get_actor(n, namespace='serve'), no_restart=True)\n"
        "print(','.join(victims))\n",
    )
    return [v for v in out.strip().split(",") if v]


def test_load_then_a_replica_killed_under_load(served, ray_head):
    codes = _load(served, clients=16, requests=10, strategy="top-2")
    assert len(codes) == 160 and set(codes) == {200}, sorted(set(codes))

    # `full` sends every request to expert-000; kill one of its two replicas mid-load
    with ThreadPoolExecutor(1) as pool:
        under_load = pool.submit(_load, served, 8, 6, "full")
        time.sleep(2)
        killed = _kill_replicas(ray_head, "expert-000", 1)
        codes = under_load.result()
    assert len(killed) == 1
    assert len(codes) == 48 and set(codes) == {200}, sorted(set(codes))


def test_an_expert_without_live_replicas(served, store, ray_head):
    weights = Path(store) / expert_prefix(2) / WEIGHTS_FILE
    original = weights.read_bytes()
    weights.write_bytes(original[:-16] + bytes(16))  # replacements now refuse to load
    try:
        assert _kill_replicas(ray_head, "expert-002", 1)
        failed = _post(served, {"n": 2, "steps": 3, "strategy": "full", "seed": 5})
        assert failed.status_code == 503, failed.text
        assert "expert-002" in failed.json()["error"]["message"]
        assert int(failed.headers["retry-after"]) > 0
        degraded = _post(
            served,
            {"n": 2, "steps": 3, "strategy": "full", "seed": 5, "on_unavailable": "renormalize"},
        )
        assert degraded.status_code == 200, degraded.text
        body = degraded.json()
        assert body["degraded"] is True and body["missing_experts"] == ["expert-002"]
        assert len(body["images"]) == 2 and body["usage"]["experts_per_step"] == 2.0
        assert httpx.get(f"{served}/readyz").status_code == 503
    finally:
        weights.write_bytes(original)


SERIES = [
    "ray_ddm_serve_requests_total",
    "ray_ddm_serve_request_seconds_bucket",
    "ray_ddm_serve_step_seconds_bucket",
    "ray_ddm_serve_expert_calls_total",
    "ray_ddm_serve_expert_call_seconds_bucket",
    "ray_ddm_serve_routed_samples_total",
    "ray_ddm_serve_batch_samples_bucket",
    "ray_ddm_serve_batch_requests_bucket",
    "ray_ddm_serve_expert_forward_seconds_bucket",
    "ray_ddm_serve_expert_disagreement_degrees_bucket",
    "ray_ddm_serve_errors_total",
    "ray_ddm_serve_degraded_requests_total",
]


def _query(prom: str, expr: str) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr})
    reply = httpx.get(f"{prom}/api/v1/query?{q}", timeout=10).json()
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def test_prometheus_sees_every_serving_series(served, prometheus):
    deadline = time.monotonic() + 120
    missing = SERIES
    while missing and time.monotonic() < deadline:
        missing = [name for name in SERIES if not _query(prometheus, name)]
        time.sleep(2)
    assert not missing, f"Prometheus has no {missing}"
    by_status = {
        (r["metric"]["route"], r["metric"]["status"])
        for r in _query(prometheus, "ray_ddm_serve_requests_total")
    }
    assert {("samples", "200"), ("samples", "422"), ("samples", "401")} <= by_status
    buckets = {r["metric"]["step_bucket"] for r in _query(prometheus, SERIES[5])}
    assert buckets == {"0.0-0.2", "0.2-0.4", "0.4-0.6", "0.6-0.8", "0.8-1.0"}
    kinds = {r["metric"]["kind"] for r in _query(prometheus, "ray_ddm_serve_errors_total")}
    assert "expert_unavailable" in kinds
    degraded = _query(prometheus, "ray_ddm_serve_degraded_requests_total")
    assert {r["metric"]["expert"] for r in degraded} == {"expert-002"}
    batch = _query(prometheus, "max(ray_ddm_serve_batch_requests_bucket{le='1.0'})")
    assert batch, "no batch-size histogram"
