"""The local cluster. `ddm cluster up --nodes 3`: a head and two worker nodes on loopback,
each a separate raylet with its own temp dir and a `ddm-node-<i>` resource that places work
on it, listening beyond loopback only where README's security notes say, its token private;
a job there runs the project's packages as uploaded. `ddm cluster down` stops every node by
PID, and never a PID that has since gone to another program. What a job uploads: the
project's packages, nothing else of the source tree."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import (
    free_port,
    listening_sockets,
    run_ddm,
    run_ddm_in_process,
    unlisted_beyond_loopback,
)

from cluster_jobs import PROJECT_ROOT
from cluster_jobs.ops import local_cluster, processes
from cluster_jobs.submit import UPLOADED_PACKAGES, staged_project

pytestmark = pytest.mark.integration

PLACED = textwrap.dedent(
    """
    import json, ray
    ray.init(logging_level="ERROR")

    @ray.remote(num_cpus=0.1)
    def where():
        return ray.get_runtime_context().get_node_id()

    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    placed = {i: ray.get(where.options(resources={f"ddm-node-{i}": 0.01}).remote())
              for i in range(3)}
    print(json.dumps({"nodes": {k: sorted(v) for k, v in nodes.items()}, "placed": placed}))
    """
)
WHERE_FROM = (
    "import cluster_jobs, ddm_nodes, router_service, os; "
    "print('FROM', os.getcwd(), *(m.__file__ for m in (cluster_jobs, ddm_nodes, router_service)))"
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


SUBMIT_WHERE_FROM = textwrap.dedent(
    f"""
    import os, time
    from ray.job_submission import JobSubmissionClient
    from cluster_jobs.submit import staged_project

    client = JobSubmissionClient(os.environ["RAY_API_SERVER_ADDRESS"])
    with staged_project() as working_dir:  # what `ddm submit` gives every job
        sid = client.submit_job(
            entrypoint={"python -c " + shlex.quote(WHERE_FROM)!r},
            runtime_env={{"working_dir": str(working_dir)}},
        )
    while str(client.get_job_status(sid).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(0.5)
    print(client.get_job_status(sid).value)
    print(client.get_job_logs(sid))
    """
)


def test_cluster_up_nodes_starts_separate_raylets_and_down_stops_them(tmp_path):
    env = {**os.environ, "DDM_CLUSTER_DIR": str(tmp_path / "cluster")}
    ports = ["--port", str(free_port()), "--dashboard-port", str(free_port())]
    ports += ["--metrics-export-port", str(free_port())]
    up = run_ddm("cluster", "up", "--nodes", "3", "--num-cpus", "1", *ports, env=env)
    assert up.returncode == 0, up.stderr[-3000:]
    info = json.loads(up.stdout)
    try:
        assert [w["index"] for w in info["workers"]] == [1, 2]
        pids = [info["pid"], *(w["pid"] for w in info["workers"])]
        assert len(set(pids)) == 3 and all(processes.alive(p) for p in pids)
        temp_dirs = [Path(w["temp_dir"]) for w in info["workers"]]
        assert all(d.is_dir() for d in temp_dirs) and len(set(temp_dirs)) == 2
        # the head's own temp dir: Ray points every job's driver at the cluster its
        # ray_current_cluster names, which must be this head whatever else runs on the machine
        head_dir = Path(info["temp_dir"])
        assert head_dir not in temp_dirs
        named = (head_dir / "ray_current_cluster").read_text().strip()  # Ray writes its IP
        assert named.rsplit(":", 1)[1] == info["gcs_address"].rsplit(":", 1)[1]
        temp_dirs.append(head_dir)

        lines = run_ddm("cluster", "env", env=env).stdout.splitlines()
        client = {**env, **dict(line.removeprefix("export ").split("=", 1) for line in lines)}
        done = subprocess.run(
            [sys.executable, "-c", PLACED], env=client, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stderr[-3000:]
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        assert len(seen["nodes"]) == 3  # three raylets alive
        for i, node_id in seen["placed"].items():  # each resource is on its own node
            assert f"ddm-node-{i}" in seen["nodes"][node_id]
        assert len(set(seen["placed"].values())) == 3

        token = Path(info["token_path"])
        assert _mode(token) == 0o600 and _mode(token.parent) == 0o700
        sockets = listening_sockets(*pids)
        assert {"gcs_server", "raylet"} <= {s.process for s in sockets}
        assert not unlisted_beyond_loopback(sockets), "README's security notes miss these"

        # a job runs the uploaded copy of the packages, not the source tree's
        job = subprocess.run(
            [sys.executable, "-c", SUBMIT_WHERE_FROM],
            env=client, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert job.stdout.startswith("SUCCEEDED"), job.stdout[-3000:] + job.stderr[-3000:]
        line = next(x for x in job.stdout.splitlines() if x.startswith("FROM"))
        cwd, *files = line.split()[1:]
        assert "working_dir_files" in cwd and sorted(os.listdir(cwd)) == sorted(UPLOADED_PACKAGES)
        assert all(f.startswith(cwd + "/") for f in files), line
    finally:
        down = run_ddm("cluster", "down", env=env)
    assert down.returncode == 0, down.stderr
    assert not any(processes.alive(p) for p in pids)
    assert not any(d.exists() for d in temp_dirs)
    again = run_ddm("cluster", "status", env=env)
    assert json.loads(again.stdout) == {"running": False}


def test_cluster_up_with_no_nodes_exits_2():
    done = run_ddm_in_process("cluster", "up", "--nodes", "0")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --nodes 0: a cluster has at least its head"


def test_down_leaves_a_recorded_pid_that_is_another_program(tmp_path, monkeypatch):
    """The head's PID now runs `sleep`, a worker's has exited: `down` signals neither,
    says so, and forgets the cluster; a temp dir not named as `up` names them is kept."""
    monkeypatch.setenv("DDM_CLUSTER_DIR", str(tmp_path / "cluster"))
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    exited = subprocess.Popen(["true"])
    exited.wait()
    not_ours = tmp_path / "not-made-by-up"
    not_ours.mkdir()
    info = local_cluster.ClusterInfo(
        gcs_address=f"127.0.0.1:{free_port()}",
        dashboard_url=f"http://127.0.0.1:{free_port()}",
        metrics_export_port=free_port(),
        token_path=str(local_cluster.ensure_token(tmp_path / "cluster")),
        num_cpus=1,
        pid=other.pid,
        temp_dir=str(not_ours),
        workers=[
            local_cluster.WorkerNode(
                index=1, pid=exited.pid, num_cpus=1, temp_dir=str(not_ours), metrics_export_port=1
            )
        ],
    )
    (tmp_path / "cluster" / "cluster.json").write_text(info.model_dump_json())
    try:
        done = run_ddm_in_process("cluster", "down")
        assert done.returncode == 0, done.stderr
        assert processes.alive(other.pid) and other.poll() is None
        notes = done.stderr.splitlines()
        assert f"note: worker node 1 (PID {exited.pid}) had already exited" in notes
        assert any(
            f"PID {other.pid} is no longer the head" in n and "sleep 300" in n for n in notes
        )
        assert done.stdout.strip() == "nothing of it was running; forgot the cluster"
        assert local_cluster.load_info() is None and not_ours.is_dir()
        assert (
            run_ddm_in_process("cluster", "down").stdout.strip() == "no local cluster was running"
        )
    finally:
        processes.stop(other.pid, grace_s=5)


def test_token_file_is_private_from_its_creation(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    old_umask = os.umask(0)  # the modes must not depend on the umask
    try:
        token = local_cluster.ensure_token(folder)
    finally:
        os.umask(old_umask)
    assert _mode(folder) == 0o700 and _mode(token) == 0o600
    assert len(token.read_text()) == 64
    assert local_cluster.ensure_token(folder).read_text() == token.read_text()  # kept
    token.chmod(0o644)  # as an older ddm left it for a moment
    assert _mode(local_cluster.ensure_token(folder)) == 0o600


def test_a_job_uploads_the_packages_and_nothing_else_of_the_tree(tmp_path):
    """A .env, a local store and caches in the source tree stay home: what Ray zips for the
    job (its own packaging code) holds only the packages' sources."""
    from ray._private.runtime_env.packaging import create_package

    tree = tmp_path / "tree"
    for package in UPLOADED_PACKAGES:
        (tree / package / "sub").mkdir(parents=True)
        (tree / package / "__init__.py").write_text("")
        (tree / package / "sub" / "mod.py").write_text("X = 1\n")
        (tree / package / "__pycache__").mkdir()
        (tree / package / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
        (tree / package / ".env").write_text("AWS_SECRET_ACCESS_KEY=x\n")
    (tree / ".env").write_text("AWS_SECRET_ACCESS_KEY=x\n")
    (tree / "store" / "experts").mkdir(parents=True)
    (tree / "store" / "dataset.json").write_text("{}")
    (tree / "store" / "experts" / "w.safetensors").write_bytes(b"\0" * 16)
    (tree / "pyproject.toml").write_text("")
    with staged_project(tree) as staged:
        zipped = tmp_path / "upload.zip"
        create_package(str(staged), zipped, include_gitignore=True)
    with zipfile.ZipFile(zipped) as z:
        files = sorted(n for n in z.namelist() if not n.endswith("/"))
    expected = [f"{p}/{f}" for p in UPLOADED_PACKAGES for f in ("__init__.py", "sub/mod.py")]
    assert files == sorted(expected)

    with staged_project() as staged:  # the real tree: every module of the three packages
        shipped = {p.relative_to(staged) for p in staged.rglob("*.py")}
    sources = {
        p.relative_to(PROJECT_ROOT)
        for package in UPLOADED_PACKAGES
        for p in (PROJECT_ROOT / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert shipped == sources and Path("cluster_jobs/training/__main__.py") in shipped
