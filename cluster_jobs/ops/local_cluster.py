"""`ddm cluster up|down`: a local Ray head on loopback for the embedded default, and with
`--nodes N` N-1 worker nodes beside it: each a separate raylet (`ray start --address ...
--block`) with its own temp dir, CPUs and a node resource `ddm-node-<i>` that places work
on it, so that a multi-node cluster, and the loss of a node, can be tried on one machine.

The head binds its node address and dashboard to 127.0.0.1 and runs with token auth:
the token lives in the cluster's state folder (`~/.ddm/cluster/auth_token`, or
`$DDM_CLUSTER_DIR`), and `cluster.json` beside it tells every ddm client the address and
the token path, so head and clients always agree on `RAY_AUTH_MODE`. Raw `ray` commands
need the same two variables; `ddm cluster env` prints them.

The head and every worker node run as `ray start ... --block` in their own process groups,
and their PIDs are recorded: `down` stops exactly those (SIGTERM: Ray's node stops its
processes; workers first), so other Ray clusters of the same user on the machine keep running.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from cluster_jobs.ops import processes
from ddm_nodes.errors import DDMError

DEFAULT_DIR = Path("~/.ddm/cluster")


class WorkerNode(BaseModel):
    """A worker node `up --nodes` started beside the head."""

    model_config = ConfigDict(extra="forbid")

    index: int  # 1..N-1; the head is node 0
    pid: int  # of its `ray start --address ... --block`
    num_cpus: int
    temp_dir: str  # its own (short: Ray's unix socket paths must stay under 108 bytes)
    metrics_export_port: int

    @property
    def resource(self) -> str:
        return node_resource(self.index)


def node_resource(index: int) -> str:
    """The custom resource that places work on node `index` (0: the head)."""
    return f"ddm-node-{index}"


class ClusterInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gcs_address: str
    dashboard_url: str
    metrics_export_port: int
    token_path: str
    num_cpus: int
    pid: int | None = None  # of `ray start --head --block`; None: a head ddm did not start
    temp_dir: str | None = None  # the head's own Ray temp dir (None: Ray's shared /tmp/ray)
    workers: list[WorkerNode] = []

    def env(self) -> dict[str, str]:
        """What Ray's clients need to talk to this head: ray.init (`serve run`, scripts)
        wants the GCS address in RAY_ADDRESS and refuses a URL there; `ray job` reads
        RAY_API_SERVER_ADDRESS first, `serve deploy|status` RAY_DASHBOARD_ADDRESS."""
        return {
            "RAY_ADDRESS": self.gcs_address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_DASHBOARD_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
        }


def state_dir() -> Path:
    return Path(os.environ.get("DDM_CLUSTER_DIR", DEFAULT_DIR)).expanduser()


def load_info() -> ClusterInfo | None:
    path = state_dir() / "cluster.json"
    return ClusterInfo.model_validate_json(path.read_text()) if path.exists() else None


def use_local_cluster_auth() -> ClusterInfo | None:
    """Make this process a client of the cluster `ddm cluster up` started, if there is one."""
    info = load_info()
    if info is not None:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = info.token_path
    return info


def _ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def _dashboard_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2):
            return True
    except OSError as e:  # an HTTP 401 still means the dashboard answers
        return getattr(e, "code", None) is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def up(
    num_cpus: float | None = None,
    port: int = 6379,
    dashboard_port: int = 8265,
    metrics_export_port: int = 8080,
    timeout_s: float = 180,
    dashboard_agent_listen_port: int | None = None,
    nodes: int = 1,
) -> ClusterInfo:
    """Start the head (or return the running one) and `nodes - 1` worker nodes, each with
    `num_cpus` CPUs. The job agent's port is free-chosen by default: Ray's fixed 52365 makes
    a second head on the machine start without a job agent, and every job submitted to it
    fails with "No available agent"."""
    if nodes < 1:
        raise DDMError(f"--nodes {nodes}: a cluster has at least its head")
    info = load_info()
    if info is not None and _dashboard_up(info.dashboard_url):
        if 1 + len(info.workers) != nodes:
            raise DDMError(
                f"a local cluster of {1 + len(info.workers)} node(s) is already up; "
                "`ddm cluster down` first to start one of another size"
            )
        return info
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    info = ClusterInfo(
        gcs_address=f"127.0.0.1:{port}",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        metrics_export_port=metrics_export_port,
        token_path=str(token),
        num_cpus=num_cpus if num_cpus is not None else (os.cpu_count() or 1),
        # Ray's job supervisor points every job's driver at the cluster named in
        # `<temp dir>/ray_current_cluster`; in the shared /tmp/ray that is whichever head
        # started last on the machine, so a job could join another user's cluster.
        temp_dir=tempfile.mkdtemp(prefix="ddm-h-"),
    )
    cmd = [
        _ray_cli(), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--temp-dir", info.temp_dir,
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--metrics-export-port", str(metrics_export_port), "--num-cpus", str(info.num_cpus),
        "--dashboard-agent-listen-port", str(dashboard_agent_listen_port or free_port()),
        "--resources", json.dumps({node_resource(0): 1}), "--disable-usage-stats",
    ]  # fmt: skip
    env = {**os.environ, **info.env()}
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS"):
        env.pop(key)  # `ray start --head` must not try to join another cluster
    # Job entrypoints say `python`: make it this environment's interpreter, with ddm in it.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # On SIGTERM Ray drains the node so Serve can move replicas to other nodes; a one-node
    # head has none, so the drain would only delay `down` (docs/decisions.md).
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    log_path = folder / "head.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(
            [*cmd, "--block"], env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    info.pid = head.pid
    deadline = time.monotonic() + timeout_s
    while not _dashboard_up(info.dashboard_url):
        if head.poll() is not None:
            lines = log_path.read_text(errors="replace").strip().splitlines()
            last = next((ln for ln in reversed(lines) if ln.strip()), "")
            raise DDMError(
                f"ray start failed: {last.strip()}; is port {port} in use? "
                f"(`ddm cluster down` stops a head ddm started; full log: {log_path})"
            )
        if time.monotonic() > deadline:
            processes.stop(head.pid, grace_s=30, group=True)
            raise DDMError(
                f"the Ray dashboard did not answer at {info.dashboard_url} within "
                f"{timeout_s:.0f} s; the head was stopped (see {log_path} and "
                f"{info.temp_dir}/session_latest/logs/dashboard.log)"
            )
        time.sleep(0.5)
    (folder / "cluster.json").write_text(info.model_dump_json(indent=2))
    try:
        for index in range(1, nodes):
            info.workers.append(_start_worker(info, index, env, folder))
            (folder / "cluster.json").write_text(info.model_dump_json(indent=2))
        _wait_for_nodes(info, env, nodes, deadline)
    except BaseException:
        down()
        raise
    return info


def _start_worker(info: ClusterInfo, index: int, env: dict, folder: Path) -> WorkerNode:
    """`ray start --address HEAD --block` for worker node `index`, in its own process group."""
    node = WorkerNode(
        index=index,
        pid=0,
        num_cpus=info.num_cpus,
        temp_dir=tempfile.mkdtemp(prefix=f"ddm-n{index}-"),
        metrics_export_port=free_port(),
    )
    cmd = [
        _ray_cli(), "start", "--address", info.gcs_address, "--node-ip-address", "127.0.0.1",
        "--num-cpus", str(node.num_cpus), "--resources", json.dumps({node.resource: 1}),
        "--temp-dir", node.temp_dir, "--metrics-export-port", str(node.metrics_export_port),
        "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats", "--block",
    ]  # fmt: skip
    with open(folder / f"node-{index}.log", "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    return node.model_copy(update={"pid": proc.pid})


def _wait_for_nodes(info: ClusterInfo, env: dict, nodes: int, deadline: float) -> None:
    """Until Ray lists `nodes` alive nodes (`ray list nodes`, through the head's API)."""
    if nodes == 1:
        return
    client = {**env, **info.env()}
    while True:
        out = subprocess.run(
            [_ray_cli(), "list", "nodes", "--format", "json", "--address", info.dashboard_url],
            env=client, capture_output=True, text=True,
        )  # fmt: skip
        alive = 0
        if out.returncode == 0:
            try:
                alive = sum(n["state"] == "ALIVE" for n in json.loads(out.stdout or "[]"))
            except json.JSONDecodeError:
                pass  # a head still starting may answer with a warning, not JSON: ask again
        if alive >= nodes:
            return
        for node in info.workers:
            if not processes.alive(node.pid):
                raise DDMError(
                    f"worker node {node.index} exited; see {state_dir() / f'node-{node.index}.log'}"
                )
        if time.monotonic() > deadline:
            raise DDMError(f"only {alive} of {nodes} nodes came up; the cluster was stopped")
        time.sleep(1)


def down() -> bool:
    """Stop the head `up` started, by its PID (never by process name). False if none."""
    info = load_info()
    if info is None:
        return False
    for node in info.workers:  # before the head, so they do not outlive their GCS
        processes.stop(node.pid, grace_s=30, group=True)
        shutil.rmtree(node.temp_dir, ignore_errors=True)
    if info.pid is not None:
        processes.stop(info.pid, grace_s=30, group=True)
        if info.temp_dir is not None:
            shutil.rmtree(info.temp_dir, ignore_errors=True)
    else:  # a cluster.json from before heads were tracked by PID
        env = {**os.environ, **info.env()}
        subprocess.run([_ray_cli(), "stop", "--force"], env=env, capture_output=True)
    (state_dir() / "cluster.json").unlink(missing_ok=True)
    return True


def env_lines() -> list[str]:
    info = load_info()
    if info is None:
        raise DDMError("no local cluster: run `ddm cluster up` first")
    return [f"export {k}={v}" for k, v in info.env().items()]


def status() -> dict:
    info = load_info()
    if info is None:
        return {"running": False}
    return {"running": _dashboard_up(info.dashboard_url), **json.loads(info.model_dump_json())}
