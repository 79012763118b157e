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
A recorded PID is signalled only while it still runs the `ray start` that `up` launched.

Every ddm command that drives Ray (`ddm serve`, `ddm prepare --engine ray`) goes through
`driver_target` and `connect`: it joins RAY_ADDRESS or this head, checked to answer first, or
starts a Ray of its own on 127.0.0.1 with token auth, and never calls `ray.init()` without
an address: that follows `<Ray temp dir>/ray_current_cluster`, which a head stopped by PID
leaves behind, and retries the dead GCS for good.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from cluster_jobs.ops import processes
from ddm_nodes.errors import DDMError

DEFAULT_DIR = Path("~/.ddm/cluster")
TOKEN_FILE = "auth_token"
GCS_PROBE_S = 3.0  # a GCS on this machine or its network answers in milliseconds
GCS_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
GCS_SERVING = b"\x08\x01"  # HealthCheckResponse(status=SERVING), serialised
TEMP_DIR_PREFIXES = ("ddm-h-", "ddm-n")  # what `up` names its nodes' Ray temp dirs
LOOPBACK_ONLY_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray 2.60, ray_constants.py


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
        use_token(info.token_path)
    return info


def use_token(path: str) -> None:
    """Token auth with the token in `path`, for this process and what it starts."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
    if "ray._raylet" in sys.modules:
        # Ray copies RAY_AUTH_MODE into its config, and the token into a cache, when it is
        # imported; without a refresh this process would stay unauthenticated while the
        # processes it starts use the token. Ray refreshes them the same way itself
        # (ray._private.authentication.authentication_token_setup).
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def ensure_token(folder: Path) -> Path:
    """The token file in `folder`, created if missing: a 0600 file in a 0700 folder, with
    its mode set as it is created (no moment where another user could read it)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # mkdir's mode goes through the umask and skips a folder that exists
    path = folder / TOKEN_FILE
    try:
        # O_EXCL: never write through a file or link someone else put there
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:  # an older ddm wrote it, then chmodded it
            path.chmod(0o600)
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def driver_target() -> str | None:
    """The GCS (host:port) this process's Ray driver joins, or None for a Ray of its own:
    RAY_ADDRESS when it names a GCS, else the head `ddm cluster up` started, else None. A
    GCS that does not answer fails here, within GCS_PROBE_S, with the fix. Call it
    before Ray is imported: it sets the token auth the driver uses (a Ray of its own gets
    the state folder's token)."""
    info = load_info()
    given = os.environ.get("RAY_ADDRESS", "").strip()
    if given == "local":
        given = ""
    if given and ("://" in given or given == "auto"):
        raise DDMError(
            f"RAY_ADDRESS={given}: give the GCS address host:port of the cluster to join "
            "(`ddm cluster env` prints it; a URL is the job API's), or unset RAY_ADDRESS"
        )
    if given:
        _check_gcs(given, "RAY_ADDRESS", "fix or unset RAY_ADDRESS, or run `ddm cluster up`")
        if info is not None and given == info.gcs_address:
            use_token(info.token_path)
        return given
    if info is not None:
        _check_gcs(
            info.gcs_address,
            f"the head in {state_dir() / 'cluster.json'}",
            "start it again with `ddm cluster up` (`ddm cluster down` forgets it)",
        )
        use_token(info.token_path)
        return info.gcs_address
    use_token(str(ensure_token(state_dir())))
    if "ray" not in sys.modules:
        # Ray's one-machine mode (the default on macOS and Windows): its node address, and
        # with it every server of the Ray, binds 127.0.0.1 instead of the machine's address
        # and all interfaces. Read when Ray is imported, by this process and what it starts;
        # a process that imported Ray already keeps the default for both.
        os.environ[LOOPBACK_ONLY_VAR] = "0"
    return None


def _check_gcs(address: str, named_by: str, fix: str) -> None:
    """Ask the GCS at `address` whether it serves (gRPC's standard health check, which Ray's
    GCS answers without the token). A bare TCP connect is not enough: a proxy or NAT on the
    way may accept any connection, and ray.init would then retry for minutes."""
    import grpc  # Ray's own dependency; importing it does not import Ray

    try:
        with grpc.insecure_channel(address) as channel:
            reply = channel.unary_unary(GCS_HEALTH_CHECK)(b"", timeout=GCS_PROBE_S)
        if reply == GCS_SERVING:
            return
        why = "not serving"
    except grpc.RpcError as e:
        why = e.code().name
    raise DDMError(f"no Ray GCS answers at {address} ({named_by}; {why}): {fix}")


def connect(**init: Any) -> bool:
    """Make this process a Ray driver (`init`: more ray.init arguments): of the cluster
    `driver_target` names, else of a Ray of its own on 127.0.0.1 with token auth. True when
    it started its own, which ends with this process."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return False
    address = driver_target()
    import ray

    if address is not None:
        try:
            ray.init(address=address, **init)
        except ConnectionError as e:
            # The GCS answered (driver_target asked it): what failed is joining it, most
            # often because no live node of it runs here, and a driver runs on a node.
            info = load_info()
            logs = ""
            if info is not None and info.gcs_address == address and info.temp_dir:
                logs = f"; the head's logs: {info.temp_dir}/session_latest/logs"
            raise DDMError(
                f"the Ray GCS at {address} answers but this process could not join it "
                f"({e.__cause__ or e}): run this on a live node of that cluster, or restart "
                f"the head (`ddm cluster down && ddm cluster up`){logs}"
            ) from e
        return False
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **init)
    return True


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
    fails with "No available agent". So is the Ray Client server's: a head whose client
    server cannot bind Ray's fixed 10001 stops all of itself moments after it came up."""
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
    token = ensure_token(folder)
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
        "--ray-client-server-port", str(free_port()),
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


@dataclass
class Down:
    """What `down` did: the PIDs it stopped, and a line for each recorded process it left
    alone (gone already, or the PID now runs another program)."""

    stopped: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def down() -> Down | None:
    """Stop the nodes `up` started, by their PIDs (never by process name), each only while
    it still runs the `ray start` that `up` launched; then forget the cluster. None if there
    is none."""
    info = load_info()
    if info is None:
        return None
    done = Down()
    for node in info.workers:  # before the head, so they do not outlive their GCS
        flags = {"--address": info.gcs_address, "--temp-dir": node.temp_dir}
        _stop_node(node.pid, f"worker node {node.index}", flags, done)
        _remove_temp_dir(node.temp_dir)
    if info.pid is not None:
        flags = {"--head": None, "--port": info.gcs_address.rpartition(":")[2]}
        if info.temp_dir is not None:
            flags["--temp-dir"] = info.temp_dir
        _stop_node(info.pid, "the head", flags, done)
        if info.temp_dir is not None:
            _remove_temp_dir(info.temp_dir)
    else:  # a cluster.json ddm did not write: nothing here is known to be ddm's to stop
        done.notes.append(f"cluster.json names no PID of the head at {info.gcs_address}")
    (state_dir() / "cluster.json").unlink(missing_ok=True)
    return done


def _stop_node(pid: int, what: str, flags: dict[str, str | None], done: Down) -> None:
    argv = processes.command_line(pid)
    if argv is None:
        processes.kill_group(pid)  # a raylet or GCS may outlive a `ray start` killed hard
        done.notes.append(f"{what} (PID {pid}) had already exited")
    elif not _is_ray_start(argv, flags):
        shown = " ".join(argv)[:120] or "a process of another user"
        done.notes.append(f"PID {pid} is no longer {what} ddm started but {shown!r}; left it")
    else:
        processes.stop(pid, grace_s=30, group=True)
        done.stopped.append(pid)


def _is_ray_start(argv: list[str], flags: dict[str, str | None]) -> bool:
    """`argv` is `ray start ... --block` with every flag in `flags` (a None value: the flag
    alone) as `up` gave them."""
    if not any(Path(a).name == "ray" for a in argv[:2]) or "start" not in argv:
        return False
    if "--block" not in argv:
        return False
    for flag, value in flags.items():
        if flag not in argv:
            return False
        at = argv.index(flag)
        if value is not None and argv[at + 1 : at + 2] != [value]:
            return False
    return True


def _remove_temp_dir(path: str) -> None:
    # only a folder named as `up` names them: a cluster.json edited by hand must not make
    # `down` delete a folder ddm did not create
    if Path(path).name.startswith(TEMP_DIR_PREFIXES):
        shutil.rmtree(path, ignore_errors=True)


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
