"""Losing a node, on a real multi-node cluster on loopback (`ddm cluster up --nodes 4`: a head
and three worker raylets) whose only shared storage is the moto S3 server: no job, replica
or Ray Train run reads a directory another node wrote.

1. Training: `ddm submit --clusters all --wait` spreads the experts over the nodes; the
   worker node of one of them is SIGKILLed mid-training (its raylet and every process under
   it); that job fails (`--max-failures 0`: no Ray Train restart), is submitted again as
   `-r1`, runs on another node, resumes from its S3 checkpoint and its final weights verify.
2. Serving: 2 replicas per expert on distinct nodes; another worker node is SIGKILLed while
   8 clients sample: no request fails and every expert is back to 2 replicas.

Both scenarios share one cluster start-up (a node each; the cluster keeps two).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import httpx
import psutil
import pytest
from conftest import ddm_serving, free_port, run_ddm

from cluster_jobs.ops.local_cluster import node_resource
from ddm_nodes.checkpoint import (
    TRAINING_FILE,
    fetch_verified,
    load_model,
    open_checkpoint,
    read_manifest,
)
from ddm_nodes.errors import DDMError
from ddm_nodes.names import expert_prefix
from ddm_nodes.store import open_store

pytestmark = pytest.mark.integration

NODES = 4  # the head and three workers: each scenario loses one, two remain
STEPS, CHECKPOINT_EVERY = 400, 100
TRAIN = [
    "--preset", "dit-tiny", "--batch-size", "8", "--steps", str(STEPS),
    "--checkpoint-every", str(CHECKPOINT_EVERY), "--log-every", "1", "--warmup-steps", "10",
    "--max-failures", "0",
]  # fmt: skip
CLIENTS, THINK_S = 8, 0.25


@pytest.fixture(scope="module")
def s3(aws_envs):
    """This process on the moto server for the whole module (the store is read from here)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in aws_envs["s3"].items():
            if k.startswith("AWS_"):
                mp.setenv(k, v)
        mp.setattr(boto3, "DEFAULT_SESSION", None)
        yield aws_envs["s3"]


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """`ddm cluster up --nodes 4`, every raylet started with the S3 environment (and only
    that: no store directory exists on any node)."""
    env = {**s3, "DDM_CLUSTER_DIR": str(tmp_path_factory.mktemp("cluster"))}
    ports = ["--port", str(free_port()), "--dashboard-port", str(free_port())]
    ports += ["--metrics-export-port", str(free_port())]
    up = run_ddm("cluster", "up", "--nodes", str(NODES), "--num-cpus", "2", *ports, env=env)
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        yield env, json.loads(up.stdout)
    finally:
        down = run_ddm("cluster", "down", env=env)
        assert down.returncode == 0, down.stderr


@pytest.fixture(scope="module")
def store(s3, cluster) -> str:
    name = f"ddm-nodeloss-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    uri = f"s3://{name}/ddm"
    args = ["--dataset", "digits", "--clusters", "2", "--image-size", "16", "--store", uri]
    done = run_ddm("prepare", *args, env=cluster[0])
    assert done.returncode == 0, done.stderr[-3000:]
    return uri


def ray_cli(env: dict, *args: str) -> str:
    """A raw `ray` command as a client of the cluster (its address and token)."""
    info = json.loads((Path(env["DDM_CLUSTER_DIR"]) / "cluster.json").read_text())
    client = {
        **env,
        "RAY_ADDRESS": info["dashboard_url"],
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": info["token_path"],
    }
    ray = str(Path(sys.executable).with_name("ray"))
    done = subprocess.run([ray, *args], env=client, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def node_names(env: dict) -> dict[str, str]:
    """{Ray node id: its ddm-node-<i> resource} of the nodes alive."""
    nodes = json.loads(ray_cli(env, "list", "nodes", "--format", "json", "--detail"))
    named = {}
    for n in nodes:
        if n["state"] == "ALIVE":
            named[n["node_id"]] = next(r for r in n["resources_total"] if r.startswith("ddm-node-"))
    return named


def node(worker: dict) -> str:
    """A worker node's ddm-node-<i> resource, from its cluster.json entry."""
    return node_resource(worker["index"])


def kill_node(worker: dict) -> list[int]:
    """SIGKILL a worker node as a lost machine goes: its `ray start` process, the raylet and
    every process under them (Ray's workers are the raylet's children), and anything else
    naming its temp dir; found by its PID and temp dir, never by a process name."""
    root = psutil.Process(worker["pid"])
    procs = {root, *root.children(recursive=True)}
    for p in psutil.process_iter(["cmdline"]):
        if worker["temp_dir"] in " ".join(p.info["cmdline"] or []):
            procs.add(p)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(procs), timeout=10)
    pids = sorted(p.pid for p in procs)
    assert not any(psutil.pid_exists(pid) for pid in pids)
    return pids


def latest(store, k: int) -> dict | None:
    """Expert k's newest resumable checkpoint: its pointer and the node its training.json
    says wrote it."""
    key = f"{expert_prefix(k)}/checkpoints/latest.json"
    if not store.exists(key):
        return None
    pointer = json.loads(store.get_bytes(key))
    try:
        training = load_training(store, pointer["prefix"])
    except DDMError:  # pruned between the two reads: the next poll sees the newer one
        return None
    return {**pointer, "node": training["node"]}


def load_training(store, prefix: str) -> dict:
    return json.loads(fetch_verified(store, open_checkpoint(store, prefix), TRAINING_FILE))


def test_a_lost_node_costs_its_expert_one_checkpoint_interval(cluster, store, tmp_path):
    env, info = cluster
    s = open_store(store)
    log_path = tmp_path / "submit.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        submit = subprocess.Popen(
            [str(Path(sys.executable).with_name("ddm")), "submit", "--store", store,
             "--clusters", "all", *TRAIN, "--wait", "--max-retries", "2"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:  # until both experts wrote a resumable checkpoint
            seen = {k: latest(s, k) for k in (0, 1)}
            if all(seen.values()):
                break
            assert submit.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no checkpoints after 300 s: {seen}"
            time.sleep(0.5)
        placed = {k: c["node"]["ddm_node"] for k, c in seen.items()}
        assert placed[0] != placed[1], f"both experts train on {placed[0]}: not spread"
        workers = {node(w): w for w in info["workers"]}
        victim_k = next(k for k, n in placed.items() if n in workers)
        victim = workers[placed[victim_k]]
        # lose the node half-way between two checkpoints: time one interval, then half one
        first = seen[victim_k]["step"]
        t0 = time.monotonic()
        while (latest(s, victim_k) or {"step": first})["step"] == first:
            assert submit.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep((time.monotonic() - t0) / 2)
        killed_pids = kill_node(victim)
        killed_at = time.monotonic()
        at_kill = json.loads(s.get_bytes(f"{expert_prefix(victim_k)}/checkpoints/latest.json"))
        assert at_kill["step"] < STEPS, "the expert finished before its node was lost"
        submit.wait(timeout=420)
    finally:
        if submit.poll() is None:
            submit.kill()
    out = log_path.read_text()
    if submit.returncode != 0:
        failed = re.findall(r"FAILED\s+(\S+)", out)
        pytest.fail(out[-2000:] + "\n".join(ray_cli(env, "job", "logs", f)[-4000:] for f in failed))
    elapsed = time.monotonic() - started

    # the victim was submitted again as -r1, and that job resumed from the S3 checkpoint
    retried = re.findall(r"resubmitted\s+(\S+-r1) \(after (\S+)\)", out)
    assert len(retried) == 1, out
    new_sid, old_sid = retried[0]
    assert f"expert-{victim_k:03d}" in new_sid
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", ray_cli(env, "job", "logs", new_sid))
    assert resumed, f"{new_sid} did not resume"
    resume_step = int(resumed[0][1])
    assert resumed[0][0] == s.url(at_kill["prefix"]) and resume_step == at_kill["step"] > 0
    before = ray_cli(env, "job", "logs", old_sid)
    done_before = max(int(n) for n in re.findall(rf"step (\d+)/{STEPS} loss", before))
    redone = done_before - resume_step
    assert 0 <= redone <= CHECKPOINT_EVERY

    # it finished on another node, its final weights verify, and Ray Train's run state
    # went to S3 beside the store, not to a node's disk
    final = load_model(s, expert_prefix(victim_k), kind="expert")
    assert final.manifest.final and final.manifest.step == STEPS
    assert final.training["node"]["ddm_node"] not in (None, placed[victim_k])
    other = 1 - victim_k
    assert load_model(s, expert_prefix(other), kind="expert").manifest.step == STEPS
    assert s.list("ray-train/"), "Ray Train wrote no run state under the store"
    print(
        json.dumps(
            {
                "scenario": "training node loss",
                "placed": placed,
                "killed": placed[victim_k],
                "killed_pids": len(killed_pids),
                "resumed_at_step": resume_step,
                "steps_done_before_loss": done_before,
                "steps_redone": redone,
                "checkpoint_every": CHECKPOINT_EVERY,
                "finished_on": final.training["node"]["ddm_node"],
                "loss_to_finish_s": round(time.monotonic() - killed_at, 1),
                "total_s": round(elapsed, 1),
            }
        )
    )


def replicas_by_node(env: dict) -> dict[str, list[str]]:
    """{expert deployment: the ddm-node-<i> of each ALIVE replica}."""
    names = node_names(env)
    actors = json.loads(
        ray_cli(
            env,
            "list",
            "actors",
            "--format",
            "json",
            "--detail",
            "--limit",
            "10000",
            "--filter",
            "state=ALIVE",
        )  # fmt: skip
    )
    out: dict[str, list[str]] = {}
    for a in actors:
        m = re.match(r"SERVE_REPLICA::\S+#(expert-\d+)#", a.get("name") or "")
        if m:
            out.setdefault(m.group(1), []).append(names.get(a["node_id"], "dead"))
    return out


def test_a_lost_node_fails_no_request_and_its_replicas_come_back(cluster, store, tmp_path):
    env, info = cluster
    s = open_store(store)
    for k in (0, 1):  # the first scenario trained them
        assert read_manifest(s, expert_prefix(k)).final, f"expert {k} is not trained"
    config = tmp_path / "app.json"
    config.write_text(
        json.dumps(
            {
                "replicas": 2,
                "max_replicas_per_node": 1,
                "router_resources": {"ddm-node-0": 0.01},
                "default_strategy": "nearest-centroid",
                # how soon Serve finds a replica gone and starts another (default 10 s)
                "health_check_period_s": 2,
            }
        )
    )
    with ddm_serving(store, env, tmp_path, "--config", str(config), "--no-access-log") as url:
        placed = replicas_by_node(env)
        for nodes in placed.values():
            assert len(nodes) == 2 and len(set(nodes)) == 2, placed
        alive = set(node_names(env).values())
        candidates = [w for w in info["workers"] if node(w) in alive]
        victim = max(candidates, key=lambda w: sum(n.count(node(w)) for n in placed.values()))
        assert any(node(victim) in nodes for nodes in placed.values()), placed

        codes: list[tuple[float, int]] = []
        stop = threading.Event()

        def client(c: int) -> None:
            with httpx.Client(timeout=120) as http:
                r = 0
                while not stop.is_set():
                    body = {"n": 2, "steps": 6, "seed": 1000 * c + r}
                    try:
                        code = http.post(f"{url}/v1/samples", json=body).status_code
                    except httpx.HTTPError as e:  # a reset connection fails a request too
                        code = type(e).__name__
                    codes.append((time.monotonic(), code))
                    r += 1
                    # users pause between requests; back to back, 8 clients would hold both
                    # cores and the replacement replica would take minutes to start
                    stop.wait(THINK_S)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        try:
            while len(codes) < 2 * CLIENTS:
                time.sleep(0.2)
            kill_node(victim)
            killed_at = time.monotonic()
            deadline = killed_at + 180
            while True:  # until every expert has 2 live replicas again, none on the dead node
                now = replicas_by_node(env)
                if all(len(n) == 2 and "dead" not in n for n in now.values()) and len(now) == 2:
                    break
                assert time.monotonic() < deadline, f"replicas did not recover: {now}"
                time.sleep(1)
            recovered_s = time.monotonic() - killed_at
            time.sleep(3)  # the recovered replicas take requests too
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=180)
        experts = httpx.get(f"{url}/v1/experts", timeout=30).json()["experts"]
    failed = [str(code) for _, code in codes if code != 200]
    after = [code for at, code in codes if at > killed_at]
    assert not failed, f"{len(failed)} of {len(codes)} requests failed: {sorted(set(failed))}"
    assert after, "no request completed after the node was lost"
    assert [e["replicas"] for e in experts] == [2, 2]
    print(
        json.dumps(
            {
                "scenario": "serving node loss",
                "placed": placed,
                "killed": node(victim),
                "requests": len(codes),
                "requests_after_loss": len(after),
                "failed": len(failed),
                "replicas_recovered_s": round(recovered_s, 1),
                "replicas_now": replicas_by_node(env),
            }
        )
    )
