"""`ddm demo` end to end with tiny settings (what `make demo` runs): a real local Ray head,
real Ray jobs, the real Serve app over HTTP and a real Prometheus (`ddm stack`). While it
holds everything up (`--keep`), every PromQL expression of the Grafana dashboards and the
alert rules is evaluated through Prometheus' HTTP API, and every socket its processes
listen on beyond loopback must be in README's security notes; then Ctrl-C must stop all
of it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import listening_sockets, unlisted_beyond_loopback

from cluster_jobs.ops import stack
from cluster_jobs.ops.demo import DemoConfig

DEMO_TIMEOUT_S = 900


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`ddm demo --keep` until it has written endpoints.json; yields (out, endpoints, proc)."""
    out = tmp_path_factory.mktemp("demo")
    exe = Path(sys.executable).with_name("ddm")
    args = [
        str(exe), "demo", "--out", str(out), "--dataset", "digits", "--clusters", "2",
        "--preset", "dit-tiny", "--image-size", "8", "--expert-steps", "150",
        "--router-steps", "150", "--warmup-steps", "7", "--n", "4", "--sample-steps", "4",
        "--keep",
    ]  # fmt: skip
    log = open(out / "demo.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + DEMO_TIMEOUT_S
    try:
        while not (out / "endpoints.json").exists():
            assert proc.poll() is None, (out / "demo.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the demo did not get ready in time"
            time.sleep(1)
        yield out, json.loads((out / "endpoints.json").read_text()), proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_demo_writes_samples_and_a_report(demo):
    out, endpoints, _ = demo
    for strategy in ("top-2", "full"):
        png = out / f"samples-{strategy}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert endpoints[f"samples-{strategy}"] == str(png)
    report = Path(endpoints["report"]).read_text()
    assert "| strategy | FID" in report
    results = json.loads((out / "analysis" / "results.json").read_text())
    assert set(results["strategies"]) == {"full", "top-1", "top-2"}
    # what the demo's jobs ran with (training.json) is what the demo asked for
    demo = DemoConfig(preset="dit-tiny", expert_steps=150, router_steps=150, warmup_steps=7)
    for prefix, asked in (
        ("experts/expert-000", demo.expert_options()),
        ("experts/expert-001", demo.expert_options()),
        ("router", demo.classifier_options()),
        ("featnet", demo.classifier_options()),
    ):
        version = json.loads((out / "store" / prefix / "current.json").read_text())["version"]
        folder = out / "store" / prefix / "versions" / version
        ran = json.loads((folder / "training.json").read_text())["config"]
        assert {k: ran[k] for k in asked} == asked, (prefix, ran)
    log = (out / "demo.log").read_text()
    for step in range(1, 8):
        assert f"[{step}/7]" in log  # progress is shown
    assert "Prometheus" in log and endpoints["prometheus_url"] in log


def _range_query(prom: str, expr: str, start: float) -> dict:
    reply = httpx.get(
        f"{prom}/api/v1/query_range",
        params={"query": expr, "start": start, "end": time.time(), "step": 5},
        timeout=30,
    )
    return reply.json()


def test_every_dashboard_and_alert_expression_evaluates(demo):
    out, endpoints, _ = demo
    prom = endpoints["prometheus_url"]
    serve = endpoints["serve_url"]
    # One more of each strategy and one bad request, so rates have two points to use.
    for strategy in ("top-2", "full"):
        body = {"n": 2, "steps": 3, "strategy": strategy}
        assert httpx.post(f"{serve}/v1/samples", json=body, timeout=120).status_code == 200
    assert httpx.post(f"{serve}/v1/samples", json={"n": 0}, timeout=30).status_code == 422
    time.sleep(12)  # two scrapes at the config's 5 s interval
    start = (out / "demo.log").stat().st_ctime - 900  # covers the whole demo
    # a new replica's first export through Ray's metrics agent can lag the scrapes, so
    # panels get up to 90 s to show a series
    deadline = time.monotonic() + 90
    while True:
        empty = []
        for dashboard, panel, expr in stack.dashboard_queries():
            reply = _range_query(prom, stack.grafana_expr(expr), start)
            assert reply["status"] == "success", (dashboard, panel, expr, reply)
            if not reply["data"]["result"]:
                empty.append(f"{dashboard} / {panel}: {expr}")
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert not empty, "panels without any series:\n" + "\n".join(empty)
    for name, expr in stack.alert_exprs():
        reply = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=30).json()
        assert reply["status"] == "success", (name, expr, reply)
    rules = httpx.get(f"{prom}/api/v1/rules", timeout=30).json()["data"]["groups"]
    loaded = {r["name"] for g in rules for r in g["rules"]}
    assert loaded == {name for name, _ in stack.alert_exprs()}


def test_every_socket_beyond_loopback_is_in_the_security_notes(demo):
    """What `ddm cluster up`, `ddm stack up` and `ddm serve` listen on (the demo starts the
    three, and is the root of their process trees)."""
    out, endpoints, proc = demo
    head_pid = json.loads((out / "cluster" / "cluster.json").read_text())["pid"]
    prom_pid = json.loads((out / "stack" / "stack.json").read_text())["pid"]
    sockets = listening_sockets(proc.pid)
    pids = {s.pid for s in sockets}
    seen = {s.process for s in sockets}
    assert prom_pid in pids and {"gcs_server", "raylet", "ddm serve"} <= seen, sorted(seen)
    assert head_pid in {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    serve_port = int(endpoints["serve_url"].rsplit(":", 1)[1])
    prom_port = int(endpoints["prometheus_url"].rsplit(":", 1)[1])
    for port in (serve_port, prom_port):
        (bound,) = {s.bind for s in sockets if s.port == port}
        assert bound == "loopback", (port, bound)
    unlisted = unlisted_beyond_loopback(sockets)
    assert not unlisted, "README's security notes miss these:\n" + "\n".join(map(str, unlisted))


def test_ctrl_c_stops_everything_the_demo_started(demo):
    out, _, proc = demo
    head_pid = json.loads((out / "cluster" / "cluster.json").read_text())["pid"]
    prom_pid = json.loads((out / "stack" / "stack.json").read_text())["pid"]
    assert _alive(head_pid) and _alive(prom_pid)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=180) == 0
    log = (out / "demo.log").read_text()
    assert "stopping the Serve app" in log and "stopping Prometheus" in log
    assert "stopping Ray head" in log
    deadline = time.monotonic() + 30
    while (_alive(head_pid) or _alive(prom_pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(head_pid) and not _alive(prom_pid)
    assert not (out / "cluster" / "cluster.json").exists()
    assert not (out / "stack" / "stack.json").exists()
