"""The Serve router service for real: `ddm serve` on a local Ray head (loopback, token
auth), a real Prometheus scraping Ray's metrics port, HTTP clients on loopback.

First, without a head: the Ray `ddm serve` starts on its own when there is no cluster to
join ignores a stale `ray_current_cluster`, listens on loopback only and refuses a client
without its token. Then, on the head, in file order: a second `ddm serve` that would take
the first one's name, prefix or move its HTTP port is refused while the first keeps
serving; served == in-process; the HTTP API through Serve's proxy; 16 concurrent
clients x 10 requests with zero errors, then the same while one replica of a two-replica
expert is killed; an expert with no live replica (its weights altered, its replica
killed: the replacement refuses the weights) answered with 503 or `degraded`; and every
series the dashboards need seen by Prometheus.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import (
    HETEROGENEOUS,
    build_tiny_ddm,
    ddm_serving,
    free_port,
    listening_sockets,
    log_lines_about,
    run_ddm,
)

from cluster_jobs.analysis.sampling import run_remote_sample, run_sample, sample_request
from ddm_nodes.checkpoint import WEIGHTS_FILE, open_checkpoint
from ddm_nodes.names import expert_prefix
from ddm_nodes.store import open_store
from router_service.local_experts import LocalExperts

pytestmark = pytest.mark.integration
K, SIZE = 4, 8  # a heterogeneous DDM: one ε-prediction DiT and three velocity UNets
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
    return build_tiny_ddm(
        tmp_path_factory.mktemp("serve") / "store", K, SIZE, experts=HETEROGENEOUS
    )


def _cluster_info(env: dict) -> dict:
    return json.loads((Path(env["DDM_CLUSTER_DIR"]) / "cluster.json").read_text())


@pytest.fixture(scope="module")
def served(store, ray_head, tmp_path_factory):
    """`ddm serve` in the foreground as a user runs it; SIGINT stops it. The store is
    trained before the head starts, so the head never shares the cores with training."""
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


OWN_RAY = textwrap.dedent(
    """
    import sys
    from cluster_jobs.ops.local_cluster import connect

    assert connect(logging_level="ERROR")  # what `ddm serve` does with no cluster to join
    import ray

    print(ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.read()  # until the test has looked
    """
)
GCS_CLIENT = textwrap.dedent(
    """
    import sys
    from ray._raylet import GcsClient

    try:
        print(len(GcsClient(address=sys.argv[1]).internal_kv_keys(b"", None, timeout=10)))
    except Exception as e:
        print(type(e).__name__)
    """
)


def _line_within(proc: subprocess.Popen, timeout_s: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    return proc.stdout.readline().strip() if ready else ""


def test_a_ray_of_its_own_ignores_a_stale_address_file_and_needs_the_token():
    """A head stopped by PID leaves `ray_current_cluster` behind; `ray.init()` would follow
    it and retry the dead GCS for good. `connect` starts its own Ray instead: on loopback
    only, with the state folder's token, and nothing written to ~/.ray."""
    # Ray's temp dir (RAY_TMPDIR) and HOME of the test's own: the machine's /tmp/ray and
    # ~/.ray are never touched. Short, because Ray's socket paths live under it.
    root = Path(tempfile.mkdtemp(prefix="ddm-t-"))
    try:
        (root / "ray").mkdir()
        stale = root / "ray" / "ray_current_cluster"
        stale.write_text("10.255.255.1:6379")  # a GCS that never answers
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env |= {"RAY_TMPDIR": str(root), "HOME": str(root / "home")}
        env["DDM_CLUSTER_DIR"] = str(root / "cluster")
        log = root / "own-ray.log"
        with open(log, "w") as err:
            own = subprocess.Popen(
                [sys.executable, "-c", OWN_RAY], env=env, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
        try:
            gcs = _line_within(own, 120)
            assert gcs.startswith("127.0.0.1:"), (gcs, log.read_text()[-3000:])
            sockets = listening_sockets(own.pid)
            assert {"gcs_server", "raylet"} <= {s.process for s in sockets}
            assert [s for s in sockets if s.bind != "loopback"] == []

            token = root / "cluster" / "auth_token"
            assert stat.S_IMODE(token.stat().st_mode) == 0o600
            assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
            with_token = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
            answers = {}
            for who, client_env in (("no token", env), ("token", with_token)):
                done = subprocess.run(
                    [sys.executable, "-c", GCS_CLIENT, gcs], env=client_env,
                    capture_output=True, text=True, timeout=120,
                )  # fmt: skip
                answers[who] = done.stdout.strip().splitlines()[-1:]
            assert answers["no token"] == ["AuthenticationError"], answers
            assert answers["token"][0].isdigit(), answers
        finally:
            own.stdin.close()
            own.wait(timeout=60)
        assert stale.read_text() == "10.255.255.1:6379"
        assert not (root / "home" / ".ray").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(
    "host, added",
    [("10.0.0.5", "10.0.0.5"), ("ddm.example.org", "ddm.example.org"), ("::1", None),
     ("localhost", None), ("0.0.0.0", None), ("::", None)],
)  # fmt: skip
def test_serve_answers_the_host_it_binds(host, added):
    """`--host H` adds H to allowed_hosts; a loopback name is there already, and a wildcard
    is no name a client sends (a browser sent to 0.0.0.0 reaches loopback)."""
    from cluster_jobs.ops.serving import is_loopback, with_bound_host
    from router_service.app_config import AppArgs

    args = AppArgs(store="s")
    bound = with_bound_host(args, host)
    expected = [*args.allowed_hosts, *([added] if added else [])]
    assert bound.allowed_hosts == expected
    assert is_loopback(host) == (host in ("::1", "localhost"))


def _serve_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_a_second_serve_is_refused_and_the_first_keeps_serving(served, store, ray_head):
    """Serve keeps the HTTP address it was started with, and one app per name and prefix:
    a second `ddm serve` asking otherwise is refused, naming what runs, and the first one
    (whose Ctrl-C deletes its own app only) keeps answering."""
    port = str(_serve_port(served))
    cases = {
        "same name": ["--port", port],
        "other port": ["--port", str(free_port())],
        "same prefix": ["--port", port, "--app-name", "ddm-two"],
    }
    with ThreadPoolExecutor(len(cases)) as pool:
        runs = {
            name: pool.submit(run_ddm, "serve", "--store", store, *args, env=ray_head)
            for name, args in cases.items()
        }
        done = {name: run.result() for name, run in runs.items()}
    for name, run in done.items():
        assert run.returncode == 2 and run.stdout == "", (name, run.stderr[-2000:])
    lines = {name: run.stderr.strip().splitlines()[-1] for name, run in done.items()}
    assert "'ddm' already runs" in lines["same name"] and "--app-name" in lines["same name"]
    assert f"127.0.0.1:{port}" in lines["other port"] and f"--port {port}" in lines["other port"]
    assert "route prefix / is taken" in lines["same prefix"], lines
    experts = httpx.get(f"{served}/v1/experts", headers=AUTH, timeout=30)
    assert experts.status_code == 200 and len(experts.json()["experts"]) == K


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
    assert f"1 <= K <= {K}" in bad.json()["error"]["message"]
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
        ("expert-003", 1, True),
    ]
    # the heterogeneous DDM as the router sees it: what each network predicts and is
    assert [(e["arch"], e["prediction"]) for e in experts] == [
        ("dit", "eps"),
        ("unet", "v"),
        ("unet", "v"),
        ("unet", "v"),
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
    served_version = open_checkpoint(open_store(store), expert_prefix(2)).folder
    weights = Path(store) / served_version / WEIGHTS_FILE
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
        # full over the experts left: every one but expert-002
        assert len(body["images"]) == 2 and body["usage"]["experts_per_step"] == K - 1
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
    "ray_ddm_serve_ticks_total",
    "ray_ddm_serve_tick_gathered_evaluations_total",
    "ray_ddm_serve_tick_expert_calls_total",
    "ray_ddm_serve_tick_expert_rows_total",
    "ray_ddm_serve_tick_evaluations_bucket",
    "ray_ddm_serve_expert_call_rows_bucket",
    "ray_ddm_serve_batch_forwards_total",
    "ray_ddm_serve_batch_forward_samples_total",
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


def _serving(url: str, env: dict | None = None) -> dict:
    reply = httpx.get(f"{url}/v1/experts", headers=AUTH, timeout=10)
    rid = reply.headers.get("x-request-id", "?")
    assert reply.status_code == 200, reply.text + (log_lines_about(env, rid) if env else "")
    return reply.json()


def _names(url: str, env: dict | None = None) -> list[str]:
    return [e["name"] for e in _serving(url, env)["experts"]]


def _until(check, timeout_s: float, what: str) -> float:
    """When `check()` first holds."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.5)
    return time.monotonic()


def _deployments(env: dict) -> set[str]:
    out = _ray_python(
        env,
        "from ray import serve\nprint(','.join(serve.status().applications['ddm'].deployments))\n",
    )
    return set(out.strip().split(","))


def _change_the_set_live(
    served: str, env: dict, store: str, other: str, added: list[str], after: list[str]
) -> tuple[float, ...]:
    """Add an expert, train a router on the new set, remove one, while clients sample;
    when each change was made and when it was served."""
    from cluster_jobs.training.config import TrainConfig
    from cluster_jobs.training.worker import train_local

    time.sleep(3)
    add = run_ddm("experts", "add", "--store", store, "--from", f"{other}/experts/expert-001")
    assert add.returncode == 0, add.stderr
    wrote = time.monotonic()
    live = _until(lambda: _names(served, env) == added, 120, "the added expert served")
    assert _serving(served, env)["router_current"] is False
    time.sleep(4)
    trained = time.monotonic()
    router = dict(kind="router", preset="router-tiny", steps=3, batch_size=8, checkpoint_every=3)
    train_local(TrainConfig(**router, store=store, cpus_per_worker=1, restart=True))
    swapped = _until(lambda: _serving(served, env)["router_current"], 120, "the new router")
    time.sleep(4)
    remove = run_ddm("experts", "remove", "--store", store, "expert-002")
    assert remove.returncode == 0, remove.stderr
    asked = time.monotonic()
    gone = _until(lambda: _names(served, env) == after, 60, "the removal served")
    time.sleep(4)
    return wrote, live, trained, swapped, asked, gone


def test_experts_added_and_removed_live_under_load(served, store, ray_head, tmp_path_factory):
    """Eight clients sample without pause while `ddm experts add --from` brings in an
    expert trained on other data (another clustering of digits), a router is trained on
    the new set, and `ddm experts remove` takes one out: zero failed requests; every
    request samples with one whole set and router, those it was admitted with. After the
    add, requests use the new expert under nearest-centroid and top-2 falls back to it, as
    asked; once the new router is swapped in, top-2 routes with it; after the removal none
    calls the removed expert, whose deployment stays up for the requests admitted before."""
    other = build_tiny_ddm(tmp_path_factory.mktemp("elsewhere") / "store", 2, SIZE)
    old = [f"expert-{k:03d}" for k in range(K)]
    added, after = [*old, "expert-004"], ["expert-000", "expert-001", "expert-003", "expert-004"]
    assert _serving(served)["registry"] == "" and _names(served) == old
    done: list[tuple[float, float, int, dict | str]] = []
    stop = False

    def client(c: int) -> None:
        with httpx.Client(timeout=120) as http:
            r = 0
            while not stop:
                body = {
                    "n": 2,
                    "steps": 20,
                    "strategy": "nearest-centroid" if c % 2 else "top-2",
                    "router_fallback": "nearest-centroid",
                    "seed": 1000 * c + r,
                }
                start = time.monotonic()
                reply = http.post(f"{served}/v1/samples", json=body, headers=AUTH)
                answer = reply.json() if reply.status_code == 200 else reply.text
                done.append((start, time.monotonic(), reply.status_code, answer))
                r += 1

    with ThreadPoolExecutor(8) as pool:
        clients = [pool.submit(client, c) for c in range(8)]
        try:
            changes = _change_the_set_live(served, ray_head, store, other, added, after)
        finally:
            stop = True
        for c in clients:
            c.result()
    wrote, live, trained, swapped, asked, gone = changes
    failed = [(code, answer) for _, _, code, answer in done if code != 200]
    assert not failed, failed[:3]
    figures = {
        "requests": len(done),
        "add_to_served_s": round(live - wrote, 1),
        "router_trained_to_served_s": round(swapped - trained, 1),
        "remove_to_served_s": round(gone - asked, 1),
        "longest_request_s": round(max(end - start for start, end, *_ in done), 1),
    }
    print(json.dumps(figures))  # for the record (pytest -s), not asserted
    sets = {tuple(a["experts"]) for *_, a in done}
    assert sets == {tuple(old), tuple(added), tuple(after)}, sets
    for start, _end, _, a in done:
        calls = a["usage"]["expert_calls"]
        assert sorted(calls) == a["experts"]  # counted over its own set only
        top2 = "top-2" in (a["strategy"], a["fallback_from"])  # what its client asked for
        if start < wrote:  # admitted before the registry changed
            assert a["experts"] == old
        if live < start < trained:  # with the added expert and the old router
            assert a["experts"] == added
            assert a["strategy"] == "nearest-centroid" and calls["expert-004"] >= 1
            assert a["fallback_from"] == ("top-2" if top2 else None)
        if swapped < start < asked:  # with the router trained on the new set
            assert a["experts"] == added and a["strategy"] == (
                "top-2" if top2 else "nearest-centroid"
            )
            assert a["fallback_from"] is None
        if start > gone:
            assert a["experts"] == after and "expert-002" not in calls
            assert a["fallback_from"] is None  # the new router covers a subset of its set
    # requests in flight across each change finished as they were admitted
    assert any(a["experts"] == old and end > live for _, end, _, a in done)
    assert any(a["fallback_from"] == "top-2" and end > swapped for _, end, _, a in done)
    assert any(a["experts"] == added and end > gone for _, end, _, a in done)
    # the removed expert's deployment stays for requests admitted before (retire_after_s)
    assert {"expert-002", "expert-004", "experts", "router"} <= _deployments(ray_head)
    listing = json.loads(run_ddm("experts", "list", "--store", store, "--json").stdout)
    assert [r["name"] for r in listing["experts"]] == after
    assert [r["name"] for r in listing["removed"]] == ["expert-002"]
