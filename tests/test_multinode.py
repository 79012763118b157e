"""`ddm cluster up --nodes 3`: a head and two worker nodes on loopback, each a separate
raylet with its own temp dir and a `ddm-node-<i>` resource that places work on it; `ddm
cluster down` stops every one of them by PID."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import free_port, run_ddm, run_ddm_in_process

from cluster_jobs.ops import processes

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
