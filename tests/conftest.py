"""Shared fixtures: a real S3-compatible server (moto in server mode) on loopback, a real
local Ray head (`ddm cluster up`), `ddm serve`; and what the processes ddm starts listen on,
checked against README's security notes."""

from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from cluster_jobs.ops.s3_server import free_port, moto_server

# Tests press Ctrl-C on the processes they start (`ddm demo`, `ddm serve`, `serve run`). A
# shell that runs pytest in the background (`make test &` in a script) ignores SIGINT, and
# an ignored signal survives exec: Ctrl-C would never reach those children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    """moto's S3 server as a real HTTP endpoint on 127.0.0.1 (a free port)."""
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as (_, endpoint):
        yield endpoint


AWS_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)


@pytest.fixture(scope="session")
def aws_envs(s3_endpoint, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Whole environments for subprocesses. "s3": the moto server with test keys.
    "no_credentials": the same server, with no AWS credentials anywhere (no key variables,
    no profile, credential and config files that do not exist, no instance metadata)."""
    nowhere = tmp_path_factory.mktemp("no-aws")
    common = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    base = {k: v for k, v in os.environ.items() if k not in AWS_CREDENTIAL_VARS}
    return {
        "s3": {**base, **S3_ENV, **common},
        "no_credentials": {
            **base,
            **common,
            "AWS_SHARED_CREDENTIALS_FILE": str(nowhere / "credentials"),
            "AWS_CONFIG_FILE": str(nowhere / "config"),
        },
    }


def _fresh_boto3_session(monkeypatch) -> None:
    """boto3's default session caches the credentials it resolved first; start a fresh one so
    each test sees exactly the environment it set up."""
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


@pytest.fixture
def s3_env(aws_envs, monkeypatch) -> dict[str, str]:
    """Point this process (and, through the returned env, subprocesses) at the moto server."""
    wanted = aws_envs["s3"]
    for k in (*S3_ENV, "AWS_ENDPOINT_URL", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.setenv(k, wanted[k])
    _fresh_boto3_session(monkeypatch)
    return dict(os.environ)


@pytest.fixture
def no_aws_credentials(aws_envs, monkeypatch) -> dict[str, str]:
    """This process (and, through the returned env, subprocesses) with no AWS credentials;
    the endpoint still points at the moto server so nothing leaves loopback."""
    wanted = aws_envs["no_credentials"]
    for k in AWS_CREDENTIAL_VARS:
        monkeypatch.delenv(k, raising=False)
    for k in (
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_CONFIG_FILE",
        "AWS_EC2_METADATA_DISABLED",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
    ):
        monkeypatch.setenv(k, wanted[k])
    _fresh_boto3_session(monkeypatch)
    return dict(os.environ)


@pytest.fixture
def bucket(s3_env) -> str:
    """A fresh, empty bucket on the moto server."""
    import boto3

    name = f"ddm-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def run_ddm(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    """Run the installed `ddm` console script as a user would."""
    exe = Path(sys.executable).with_name("ddm")
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


@pytest.fixture(scope="session")
def ddm():
    """The `ddm` CLI as a subprocess: `ddm("prepare", "--store", ..., env=...)`."""
    return run_ddm


def run_ddm_in_process(*args: str) -> subprocess.CompletedProcess:
    """The same CLI in this process (Typer's test runner): for batteries of bad-input cases,
    where a subprocess per case would spend most of its time importing torch. At least
    one case per battery should still go through `run_ddm`, the console script."""
    from typer.testing import CliRunner

    from cluster_jobs.cli import app

    result = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


# --- data shared across modules (loaded once per session; tests must not modify them) ---


@pytest.fixture(scope="session")
def digits_set():
    from cluster_jobs.data.sources import load_source

    return load_source("digits")


@pytest.fixture(scope="session")
def mnist5k_set():
    from cluster_jobs.data.sources import load_source

    return load_source("mnist-5k")


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory):
    """`digits` prepared by the library into a local store, with small shards so every cluster
    has several. Read-only: a test that changes a store copies this one first."""
    from cluster_jobs.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("prepared-digits") / "store"
    cfg = PrepareConfig(dataset="digits", clusters=4, store=str(root), shard_size=150, seed=0)
    return cfg, prepare(cfg).manifest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """In-process tensors in tests are tiny: intra-op threads only add overhead (and thrash
    on 2 busy cores). Also undoes a training worker's own set_num_threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ddm cluster up` on free loopback ports; `ddm cluster down` afterwards."""
    env = {**os.environ, "DDM_CLUSTER_DIR": str(tmp_path_factory.mktemp("cluster"))}
    up = run_ddm(
        "cluster",
        "up",
        "--num-cpus",
        "2",
        "--port",
        str(free_port()),
        "--dashboard-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
        env=env,
    )
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    assert info["dashboard_url"].startswith("http://127.0.0.1:")
    try:
        yield env
    finally:
        down = run_ddm("cluster", "down", env=env)
        assert down.returncode == 0, down.stderr


def head_log_tails(env: dict, lines: int = 15) -> str:
    """The last lines of the raylet's and GCS's logs of the head `env` names: why a node
    it should have is gone, when a test fails on it."""
    cluster = Path(env.get("DDM_CLUSTER_DIR", "")) / "cluster.json"
    if not cluster.is_file():
        return ""
    temp_dir = json.loads(cluster.read_text()).get("temp_dir")
    if not temp_dir:
        return ""
    logs = Path(temp_dir) / "session_latest" / "logs"
    tails = []
    for name in ("raylet.out", "gcs_server.out"):
        if (logs / name).is_file():
            tail = (logs / name).read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"\n--- {logs / name} ---\n" + "\n".join(tail))
    return "".join(tails)


def log_lines_about(env: dict, needle: str, after: int = 40) -> str:
    """Every line of the head's Ray logs (replicas' and workers') that mentions `needle`
    (a request id), with the `after` lines that follow it: the traceback behind a 500,
    when a test fails on one."""
    cluster = Path(env.get("DDM_CLUSTER_DIR", "")) / "cluster.json"
    if not cluster.is_file():
        return ""
    logs = Path(json.loads(cluster.read_text()).get("temp_dir") or "") / "session_latest" / "logs"
    found = []
    for log in sorted(logs.rglob("*")):
        if not log.is_file() or log.suffix not in (".log", ".err", ".out"):
            continue
        lines = log.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if needle in line:
                found.append(f"\n--- {log.name}:{i + 1} ---\n" + "\n".join(lines[i : i + after]))
    return "".join(found)


@contextlib.contextmanager
def ddm_serving(store: str | Path, env: dict, folder: Path, *args: str) -> Iterator[str]:
    """`ddm serve --store STORE ARGS` in the foreground as a user runs it, on a free port;
    yields its URL once it says it is serving; SIGINT stops it."""
    port = free_port()
    log_path = folder / "serve.log"
    exe = str(Path(sys.executable).with_name("ddm"))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [exe, "serve", "--store", str(store), "--port", str(port), *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while f"serving {store} at" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:] + head_log_tails(env)
            assert time.monotonic() < deadline, "ddm serve did not start within 300 s"
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


class BindRecorder:
    """Stands in for a Serve deployment: records the options and arguments it is bound with."""

    def __init__(self):
        self.bound: list[tuple[dict, tuple]] = []

    def options(self, **options):
        return SimpleNamespace(bind=lambda *args: self.bound.append((options, args)) or args)


# one ε-prediction DiT and velocity UNets: a heterogeneous DDM (ExpertSpec.prediction)
HETEROGENEOUS = (("dit-tiny", "eps"), ("unet-tiny", "v"), ("unet-tiny", "v"), ("unet-tiny", "v"))


def build_tiny_ddm(
    root: str | Path,
    clusters: int,
    image_size: int,
    router_lr=1e-3,
    experts: tuple[tuple[str, str], ...] | None = None,
) -> str:
    """A real, tiny DDM store: digits in `clusters` clusters at image_size x image_size, one
    expert per cluster (dit-tiny velocity experts, or `experts`' (preset, prediction) per
    cluster) and a router-tiny router, each trained 3 steps."""
    from cluster_jobs.data.prepare import PrepareConfig, prepare
    from cluster_jobs.training.config import TrainConfig
    from cluster_jobs.training.worker import train_local

    root = str(root)
    prepare(
        PrepareConfig(
            dataset="digits", clusters=clusters, store=root, image_size=image_size, workers=1
        )
    )
    common = dict(store=root, steps=3, batch_size=8, checkpoint_every=3, cpus_per_worker=1)
    kinds = experts or (("dit-tiny", "v"),) * clusters
    assert len(kinds) == clusters, "one (preset, prediction) per cluster"
    for k, (preset, prediction) in enumerate(kinds):
        train_local(
            TrainConfig(kind="expert", cluster=k, preset=preset, prediction=prediction, **common)
        )
    lr = {} if router_lr is None else {"lr": router_lr}
    train_local(TrainConfig(kind="router", preset="router-tiny", **lr, **common))
    return root


# --- listening sockets, against README's "Listening sockets" table ---

README = Path(__file__).resolve().parents[1] / "README.md"
ALL_INTERFACES, MACHINE_ADDRESS, LOOPBACK = "all interfaces", "machine address", "loopback"


@dataclass(frozen=True)
class Listening:
    pid: int
    process: str  # `process_name(argv)`
    ip: str
    port: int

    @property
    def bind(self) -> str:
        if self.ip in ("0.0.0.0", "::"):
            return ALL_INTERFACES
        address = ipaddress.ip_address(self.ip)
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
        return LOOPBACK if (mapped or address).is_loopback else MACHINE_ADDRESS


def process_name(argv: list[str]) -> str:
    """How README names a process: a Ray worker by its class (`ray::ServeReplica`), a Python
    program by its module, its path inside site-packages or `ddm SUBCOMMAND`, anything else
    by its executable's name."""
    first = argv[0].split()[0] if argv and argv[0].strip() else "?"
    if first.startswith("ray::"):
        return "ray::" + re.split(r"[:.]", first[len("ray::") :])[0]
    if not Path(first).name.startswith("python"):
        return Path(first).name
    rest = [a for a in argv[1:] if a not in ("-u", "-B", "-E", "-s", "-I")]
    if rest[:1] == ["-m"] and len(rest) > 1:
        return rest[1]
    if not rest or rest[0] == "-c":
        return "python -c"
    script = rest[0]
    if "/site-packages/" in script:
        return script.split("/site-packages/", 1)[1]
    name = Path(script).name
    return f"{name} {rest[1]}" if name in ("ddm", "ray") and len(rest) > 1 else name


def listening_sockets(*pids: int) -> list[Listening]:
    """Every listening TCP socket of these processes and all their descendants (psutil
    reads /proc/PID/fd and /proc/net/tcp{,6})."""
    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        top = psutil.Process(pid)
        for p in [top, *top.children(recursive=True)]:
            procs[p.pid] = p
    found = set()
    for p in procs.values():
        try:
            name = process_name(p.cmdline())
            conns = p.net_connections(kind="inet")
        except psutil.NoSuchProcess:  # a worker that ended while we looked
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                found.add(Listening(p.pid, name, c.laddr.ip, c.laddr.port))
    return sorted(found, key=lambda s: (s.process, s.port))


def readme_listening_rows() -> list[tuple[list[str], str, str]]:
    """README's "Listening sockets" table: (process name patterns, port, bind) per row."""
    text = README.read_text()
    section = text[text.index("### Listening sockets") :]
    section = section[: section.index("\n## ")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 4 or set(cells[0]) <= {"-", " "}:
            continue
        if cells[0] == "process":  # the header
            continue
        rows.append((re.findall(r"`([^`]+)`", cells[0]), cells[1], cells[2]))
    return rows


def unlisted_beyond_loopback(sockets: list[Listening]) -> list[Listening]:
    """The sockets bound beyond loopback that no README row names with that bind."""
    rows = readme_listening_rows()
    return [
        s
        for s in sockets
        if s.bind != LOOPBACK
        and not any(
            s.bind in bind and any(fnmatch.fnmatchcase(s.process, pat) for pat in pats)
            for pats, _, bind in rows
        )
    ]
