"""The observability stack: Prometheus config and alert rules (promtool), the Grafana
dashboards and provisioning, and `ddm stack up|down` running a real Prometheus on loopback
that scrapes a metrics endpoint shaped like Ray's exporter after some ddm traffic."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from cluster_jobs.ops import stack
from ddm_nodes.errors import DDMError

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "infra" / "grafana"
PANEL_TYPES = {"timeseries", "stat", "bargauge"}
GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is missing: apt-get install prometheus (it ships promtool)")
    return exe


# ----------------------------------------------------------------------------- promtool
@pytest.mark.parametrize(
    "check, path",
    [("config", "infra/prometheus/prometheus.yml"), ("rules", "infra/prometheus/alerts.yml")],
)
def test_promtool_accepts(check: str, path: str):
    out = subprocess.run(
        [promtool(), "check", check, path], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_prometheus_config_scrapes_ray_and_itself_on_loopback():
    config = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    assert targets == {"ray": ["127.0.0.1:8080"], "prometheus": ["127.0.0.1:9090"]}
    assert config["rule_files"] == ["alerts.yml"]
    rendered = stack.render_config(port=9191, metrics_export_port=8181)
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in rendered["scrape_configs"]}
    assert targets == {"ray": ["127.0.0.1:8181"], "prometheus": ["127.0.0.1:9191"]}


def test_alert_rules_are_complete():
    rules = [r for g in yaml.safe_load(stack.ALERTS.read_text())["groups"] for r in g["rules"]]
    assert len(rules) == len(stack.alert_exprs()) >= 5
    for rule in rules:
        assert rule["for"], rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    exprs = dict(stack.alert_exprs())
    assert (
        'ray_serve_deployment_replica_healthy{deployment=~"expert-.*"}'
        in exprs["DDMExpertNoHealthyReplica"]
    )


# ----------------------------------------------------------------------------- Grafana
def test_dashboards_are_valid_and_use_the_provisioned_datasource():
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/ddm.yaml").read_text())
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://127.0.0.1:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/ddm.yaml").read_text())
    assert providers["providers"][0]["type"] == "file"

    boards = {p.stem: json.loads(p.read_text()) for p in (GRAFANA / "dashboards").glob("*.json")}
    assert {b["title"] for b in boards.values()} == {"DDM serving", "DDM training"}
    n_targets = 0
    for board in boards.values():
        assert 36 <= board["schemaVersion"] <= 41
        assert board["templating"]["list"] == []  # queries hold only Grafana's own variables
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), board["title"]
        for panel in board["panels"]:
            where = f"{board['title']} / {panel['title']}"
            assert panel["type"] in PANEL_TYPES, where
            assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), where
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, where
            assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, where
            targets = panel["targets"]
            assert targets and all(t["expr"].strip() for t in targets), where
            assert len({t["refId"] for t in targets}) == len(targets), where
            for t in targets:
                assert t["datasource"]["uid"] == source["uid"], where
                used = {"$__" + v[2:] for v in GRAFANA_VARIABLE.findall(t["expr"])}
                assert used <= set(stack.GRAFANA_VARIABLES), (where, used)
            n_targets += len(targets)
    assert len(stack.dashboard_queries()) == n_targets


def test_grafana_expr_substitutes_grafana_variables():
    expr = "rate(x[$__rate_interval]) / rate(y[$__interval]) + increase(z[$__range])"
    assert stack.grafana_expr(expr) == "rate(x[1m]) / rate(y[1m]) + increase(z[1h])"
    assert stack.grafana_expr(expr, "2m", interval="15s", range_="30m") == (
        "rate(x[2m]) / rate(y[15s]) + increase(z[30m])"
    )
    for _, _, e in stack.dashboard_queries():
        assert "$" not in stack.grafana_expr(e)


# ----------------------------------------------------------------------------- stack errors
def test_up_refuses_a_port_in_use(tmp_path, monkeypatch):
    monkeypatch.setenv("DDM_STACK_DIR", str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(DDMError, match="--port"):
            stack.up(port=s.getsockname()[1], metrics_export_port=free_port())
    assert stack.load_stack() is None and stack.down() is False


def test_up_names_the_package_when_prometheus_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("DDM_STACK_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DDMError, match="apt-get install prometheus"):
        stack.up(port=free_port())


# ----------------------------------------------------------------------------- real stack
RAY_LABELS = 'Component="core_worker",NodeAddress="127.0.0.1",SessionName="session_test"'


def _series(name: str, labels: dict[str, str], value: float, worker: str) -> str:
    tags = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f'{name}{{{tags}{"," if tags else ""}{RAY_LABELS},WorkerId="{worker}"}} {value}'


def _histogram(name: str, labels: dict[str, str], values: list[float], worker: str) -> list[str]:
    lines = [
        _series(f"{name}_bucket", {**labels, "le": str(le)}, sum(v <= le for v in values), worker)
        for le in (0.01, 0.1, 1, 10, 100)
    ]
    lines.append(_series(f"{name}_bucket", {**labels, "le": "+Inf"}, len(values), worker))
    lines.append(_series(f"{name}_sum", labels, sum(values), worker))
    lines.append(_series(f"{name}_count", labels, len(values), worker))
    return lines


def ray_exposition() -> str:
    """What Ray's exporter shows after a few top-2 and full requests (one failed with 503
    expert_unavailable, one answered degraded without expert-001, whose only replica is
    down) and with one expert training job running on two workers."""
    r, p, serve = "router", "serve", "ray_ddm_serve_"
    top2, full = {"route": "samples", "strategy": "top-2"}, {"route": "samples", "strategy": "full"}
    e0, e1 = {"expert": "expert-000"}, {"expert": "expert-001"}
    lines = [
        _series(f"{serve}requests_total", {**top2, "status": "200"}, 3, r),
        _series(f"{serve}requests_total", {**full, "status": "200"}, 2, r),
        _series(f"{serve}requests_total", {**full, "status": "503"}, 1, r),
        *_histogram(f"{serve}request_seconds", top2, [0.5, 0.7, 2], r),
        *_histogram(f"{serve}request_seconds", full, [1.5, 3, 0.1], r),
        *_histogram(f"{serve}step_seconds", {"strategy": "top-2"}, [0.01, 0.02], r),
        *_histogram(f"{serve}step_seconds", {"strategy": "full"}, [0.03, 0.04], r),
        _series(f"{serve}expert_calls_total", {**e0, "outcome": "ok"}, 40, r),
        _series(f"{serve}expert_calls_total", {**e1, "outcome": "ok"}, 30, r),
        _series(f"{serve}expert_calls_total", {**e1, "outcome": "unavailable"}, 2, r),
        *_histogram(f"{serve}expert_call_seconds", e0, [0.01, 0.02], r),
        *_histogram(f"{serve}expert_call_seconds", e1, [0.01], r),
        *_histogram(f"{serve}expert_disagreement_degrees", {"strategy": "top-2"}, [12, 20], r),
        *_histogram(f"{serve}expert_disagreement_degrees", {"strategy": "full"}, [30], r),
        _series(f"{serve}errors_total", {"kind": "expert_unavailable"}, 1, r),
        _series(f"{serve}degraded_requests_total", e1, 1, r),
        _series(f"{serve}requests_in_flight", {}, 0, r),
        _series(f"{serve}ticks_total", {}, 10, r),
        _series(f"{serve}tick_gathered_evaluations_total", {}, 60, r),
        _series(f"{serve}tick_expert_calls_total", {}, 40, r),
        _series(f"{serve}tick_expert_rows_total", {}, 480, r),
        _series(f"{serve}requests_queued", {}, 0, r),
    ]
    for k, bucket, n in [
        (0, "0.8-1.0", 64),
        (1, "0.8-1.0", 32),
        (0, "0.0-0.2", 16),
        (1, "0.0-0.2", 80),
    ]:
        for strategy in ("top-2", "full"):
            labels = {"expert": f"expert-{k:03d}", "step_bucket": bucket, "strategy": strategy}
            lines.append(_series(f"{serve}routed_samples_total", labels, n, r))
    for k in (0, 1):
        e = f"expert-{k:03d}"
        lines += _histogram(f"{serve}batch_samples", {"expert": e}, [4, 8], e)
        lines.append(_series(f"{serve}batch_forwards_total", {"expert": e}, 2, e))
        lines.append(_series(f"{serve}batch_forward_samples_total", {"expert": e}, 12, e))
        lines += _histogram(f"{serve}batch_requests", {"expert": e}, [1, 2], e)
        lines += _histogram(f"{serve}expert_forward_seconds", {"expert": e}, [0.005], e)
    for deployment, healthy in [("router", 1), ("expert-000", 1), ("expert-001", 0)]:
        labels = {"application": "ddm", "deployment": deployment, "replica": f"{deployment}#a"}
        lines.append(_series("ray_serve_deployment_replica_healthy", labels, healthy, p))
    job = {"kind": "expert", "expert": "expert-003"}
    for name, value in [
        ("ray_ddm_train_loss", 0.42), ("ray_ddm_train_images_per_second", 850.0),
        ("ray_ddm_train_step", 120), ("ray_ddm_train_images_seen", 15360),
    ]:  # fmt: skip
        lines.append(_series(name, job, value, "rank0"))
    for rank in ("rank0", "rank1"):  # every rank sets the planned steps, rank 0 the rest
        lines.append(_series("ray_ddm_train_steps_total", job, 1000, rank))
    return "\n".join(lines) + "\n"


@pytest.fixture
def ray_like_exporter():
    """A metrics endpoint on loopback answering `ray_exposition()`."""
    body = ray_exposition().encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _query(client: httpx.Client, expr: str) -> list[dict]:
    reply = client.get("/api/v1/query", params={"query": expr}).json()
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


@pytest.mark.integration
def test_stack_up_scrapes_evaluates_and_stops(tmp_path, monkeypatch, ray_like_exporter):
    monkeypatch.setenv("DDM_STACK_DIR", str(tmp_path))
    monkeypatch.setenv("DDM_CLUSTER_DIR", str(tmp_path / "no-cluster"))
    port = free_port()
    info = stack.up(port=port, metrics_export_port=ray_like_exporter)
    try:
        assert info.port == port and info.metrics_export_port == ray_like_exporter
        assert Path(info.config_path).parent == tmp_path
        assert (tmp_path / "alerts.yml").read_text() == stack.ALERTS.read_text()
        assert stack.status()["running"] is True and stack.status()["pid"] == info.pid
        assert stack.up(port=port, metrics_export_port=ray_like_exporter).pid == info.pid
        with pytest.raises(DDMError, match="ddm stack down"):
            stack.up(port=free_port(), metrics_export_port=ray_like_exporter)

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert client.get("/-/ready").status_code == 200
            groups = client.get("/api/v1/rules").json()["data"]["groups"]
            loaded = {r["name"] for g in groups for r in g["rules"] if r["type"] == "alerting"}
            assert loaded == {name for name, _ in stack.alert_exprs()}
            config = client.get("/api/v1/status/config").json()["data"]["yaml"]
            assert f"127.0.0.1:{ray_like_exporter}" in config

            deadline = time.monotonic() + 60  # rate() over 1m needs two scrapes
            while not _query(client, 'count_over_time(up{job="ray"}[1m]) >= 2'):
                assert time.monotonic() < deadline, "the ray target was not scraped twice"
                time.sleep(1)
            assert _query(client, 'up{job="ray"}')[0]["value"][1] == "1"

            for board, panel, expr in stack.dashboard_queries():
                result = _query(client, stack.grafana_expr(expr))
                assert result, f"{board} / {panel}: no series for {expr}"

            alerts = {name: _query(client, expr) for name, expr in stack.alert_exprs()}
            (down,) = alerts["DDMExpertNoHealthyReplica"]
            assert down["metric"]["deployment"] == "expert-001"
            (stalled,) = alerts["DDMTrainingStalled"]  # step 120 of 1000, not moving
            assert stalled["metric"] == {"kind": "expert", "expert": "expert-003"}
            assert alerts["DDMRouterNoHealthyReplica"] == []
    finally:
        assert stack.down() is True
    with pytest.raises(ProcessLookupError):
        os.kill(info.pid, 0)
    assert stack.status() == {"running": False}
    assert stack.down() is False
