"""`ddm stack up|down|status`: a local Prometheus on loopback over the local Ray cluster,
and the expressions of the project's dashboards and alert rules.

`up` renders infra/prometheus/prometheus.yml into the stack's state folder
(`~/.ddm/stack`, or `$DDM_STACK_DIR`) with the `ray` target's port set to the running
cluster's metrics export port (`ddm cluster up` records it in cluster.json) and copies
alerts.yml beside it, then starts the Debian package's `prometheus` binary as a detached
process whose PID is recorded in `stack.json`: `down` stops exactly that process, never
one found by name. Grafana is not started here: infra/grafana holds its provisioning files
and the dashboards, which read this Prometheus.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from cluster_jobs import INFRA
from cluster_jobs.ops import processes
from cluster_jobs.ops.local_cluster import load_info
from ddm_nodes.errors import DDMError

DEFAULT_DIR = Path("~/.ddm/stack")
PROMETHEUS_CONFIG = INFRA / "prometheus" / "prometheus.yml"
ALERTS = INFRA / "prometheus" / "alerts.yml"
DASHBOARDS = INFRA / "grafana" / "dashboards"
DEFAULT_METRICS_EXPORT_PORT = 8080  # `ddm cluster up`'s, when no cluster.json says otherwise
RAY_JOB = "ray"  # the scrape job of Ray's metrics export port in prometheus.yml
SELF_JOB = "prometheus"
GRAFANA_VARIABLES = ("$__rate_interval", "$__interval", "$__range")


class StackInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    port: int
    metrics_export_port: int  # the Ray head port the `ray` job scrapes
    pid: int
    config_path: str
    log_path: str


def state_dir() -> Path:
    return Path(os.environ.get("DDM_STACK_DIR", DEFAULT_DIR)).expanduser()


def load_stack() -> StackInfo | None:
    path = state_dir() / "stack.json"
    return StackInfo.model_validate_json(path.read_text()) if path.exists() else None


def render_config(port: int, metrics_export_port: int) -> dict:
    """infra/prometheus/prometheus.yml with the scrape targets' ports set."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    ports = {RAY_JOB: metrics_export_port, SELF_JOB: port}
    for job in config["scrape_configs"]:
        if job["job_name"] in ports:
            job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    return config


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def up(
    port: int = 9090, metrics_export_port: int | None = None, timeout_s: float = 60
) -> StackInfo:
    """Start Prometheus on 127.0.0.1:`port` scraping the local Ray head (its metrics export
    port: `metrics_export_port`, else the one in cluster.json, else 8080). Returns the running
    stack if `up` already started one on the same ports."""
    info = load_stack()
    if info is not None and processes.alive(info.pid) and _ready(info.url):
        if info.port == port and metrics_export_port in (None, info.metrics_export_port):
            return info
        raise DDMError(
            f"a stack is already running at {info.url} scraping port "
            f"{info.metrics_export_port}; `ddm stack down` first to start another"
        )
    exe = shutil.which("prometheus")
    if exe is None:
        raise DDMError("prometheus is not installed: apt-get install prometheus")
    if not _port_free(port):
        raise DDMError(f"port {port} is in use on 127.0.0.1; choose another with --port")
    if metrics_export_port is None:
        cluster = load_info()
        metrics_export_port = (
            cluster.metrics_export_port if cluster is not None else DEFAULT_METRICS_EXPORT_PORT
        )
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "prometheus.yml"
    config_path.write_text(
        f"# rendered by `ddm stack up` from {PROMETHEUS_CONFIG}\n"
        + yaml.safe_dump(render_config(port, metrics_export_port), sort_keys=False)
    )
    shutil.copyfile(ALERTS, folder / ALERTS.name)
    log_path = folder / "prometheus.log"
    url = f"http://127.0.0.1:{port}"
    cmd = [
        exe, f"--config.file={config_path}", f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    info = StackInfo(
        url=url,
        port=port,
        metrics_export_port=metrics_export_port,
        pid=proc.pid,
        config_path=str(config_path),
        log_path=str(log_path),
    )
    deadline = time.monotonic() + timeout_s
    while not _ready(url):
        if proc.poll() is not None:
            lines = log_path.read_text(errors="replace").strip().splitlines()
            raise DDMError(
                f"prometheus exited: {lines[-1] if lines else '(no output)'} (full log: {log_path})"
            )
        if time.monotonic() > deadline:
            processes.stop(proc.pid)
            raise DDMError(
                f"prometheus did not answer at {url}/-/ready within {timeout_s:.0f} s and was "
                f"stopped; see {log_path}"
            )
        time.sleep(0.2)
    (folder / "stack.json").write_text(info.model_dump_json(indent=2))
    return info


def down() -> bool:
    """Stop the Prometheus `up` started, by its PID. False if there is none."""
    info = load_stack()
    if info is None:
        return False
    if _is_ours(info):
        processes.stop(info.pid)
    (state_dir() / "stack.json").unlink(missing_ok=True)
    return True


def status() -> dict:
    info = load_stack()
    if info is None:
        return {"running": False}
    running = processes.alive(info.pid) and _ready(info.url)
    return {"running": running, **json.loads(info.model_dump_json())}


def _is_ours(info: StackInfo) -> bool:
    """The recorded PID is still our Prometheus (not a later process that reused it)."""
    if not processes.alive(info.pid):
        return False
    cmdline = Path(f"/proc/{info.pid}/cmdline")
    if not cmdline.exists():  # no procfs: trust the PID
        return True
    return info.config_path in cmdline.read_bytes().decode(errors="replace")


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard title, panel title, expr) of every query of every dashboard in
    infra/grafana/dashboards, with Grafana's variables left in (see `grafana_expr`)."""
    queries = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                queries.append((board["title"], panel["title"], target["expr"]))
    return queries


def alert_exprs() -> list[tuple[str, str]]:
    """(alert name, expr) of every alerting rule in infra/prometheus/alerts.yml."""
    rules = yaml.safe_load(ALERTS.read_text())
    return [
        (rule["alert"], rule["expr"].strip())
        for group in rules["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def grafana_expr(
    expr: str, rate_interval: str = "1m", interval: str | None = None, range_: str = "1h"
) -> str:
    """`expr` as Grafana sends it to Prometheus: `$__rate_interval`, `$__interval` (default:
    `rate_interval`) and `$__range` replaced by durations."""
    values = {
        "$__rate_interval": rate_interval,
        "$__interval": interval or rate_interval,
        "$__range": range_,
    }
    for name in GRAFANA_VARIABLES:  # none of the three names contains another
        expr = expr.replace(name, values[name])
    return expr
