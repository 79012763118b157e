"""Training as real Ray jobs on a real local head (loopback, token auth): two isolated
experts through `ddm submit`, a job killed mid-run that resumes, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from cluster_jobs.data.prepare import PrepareConfig, prepare
from cluster_jobs.training.config import TrainConfig
from cluster_jobs.training.tasks import heldout_loss
from ddm_nodes.checkpoint import load_model, read_manifest
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.experts import Expert, ExpertSpec
from ddm_nodes.names import expert_prefix
from ddm_nodes.store import open_store

pytestmark = pytest.mark.integration
TINY = ["--preset", "dit-tiny", "--batch-size", "16"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("store") / "digits"
    prepare(
        PrepareConfig(
            dataset="digits", clusters=3, store=str(root), image_size=16, shard_size=200, workers=1
        )
    )
    return str(root)


def job_logs(env: dict, sid: str) -> str:
    ray = Path(sys.executable).with_name("ray")
    out = subprocess.run(
        [str(ray), "job", "logs", sid],
        env={**env, **_client_env(env)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout + out.stderr


def _client_env(env: dict) -> dict:
    info = json.loads((Path(env["DDM_CLUSTER_DIR"]) / "cluster.json").read_text())
    return {
        "RAY_ADDRESS": info["dashboard_url"],
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": info["token_path"],
    }


def submitted_ids(stdout: str) -> list[str]:
    return [
        line.split()[1]
        for line in stdout.splitlines()
        if line.split()
        and line.split()[0] in ("submitted", "resubmitted", "skipped-finished", "skipped-running")
    ]


def test_two_experts_train_in_isolation(ray_head, store, ddm):
    submit = [
        "submit",
        "--store",
        store,
        "--clusters",
        "0,1",
        "--steps",
        "30",
        "--checkpoint-every",
        "10",
        "--warmup-steps",
        "3",
        "--weight-decay",
        "0.02",
        *TINY,
    ]
    done = ddm(*submit, "--wait", env=ray_head)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = submitted_ids(done.stdout)
    assert [i.split("-")[2] for i in ids] == ["000", "001"]

    s = open_store(store)
    for k, sid in enumerate(ids):
        loaded = load_model(s, expert_prefix(k), kind="expert")  # verifies every sha256
        assert loaded.manifest.final and loaded.manifest.cluster == k
        assert loaded.manifest.step == 30 and loaded.manifest.images_seen == 30 * 16
        # the options reached the worker's loop: training.json is what it ran with
        ran = loaded.training["config"]
        assert ran["warmup_steps"] == 3 and ran["weight_decay"] == pytest.approx(0.02, rel=0)
        assert (ran["preset"], ran["batch_size"], ran["cluster"]) == ("dit-tiny", 16, k)
        # which node wrote it: the one-node cluster's head (`ddm cluster up` names it node 0)
        assert loaded.training["node"]["ddm_node"] == "ddm-node-0"
        assert len(loaded.training["node"]["node_id"]) == 56
        logs = job_logs(ray_head, sid)
        read = {
            line.split("/shards/")[1].split("/")[0]
            for line in logs.splitlines()
            if "reading shard" in line
        }
        assert read == {f"cluster-{k:03d}"}, logs[-3000:]
        assert "rank 0 of 1 in this job's own process group" in logs

    listed = ddm("jobs", "--json", env=ray_head)
    assert listed.returncode == 0, listed.stderr
    states = {row["submission_id"]: row["status"] for row in json.loads(listed.stdout)}
    assert all(states[sid] == "SUCCEEDED" for sid in ids)

    again = ddm(*submit, env=ray_head)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split().count("skipped-finished") == 2


def test_readme_raw_ray_job_submit_works_as_printed(ray_head, store):
    """README: `eval "$(ddm cluster env)"` then `ray job submit --working-dir . -- python -m
    cluster_jobs.training expert ...` (expert 0 is already trained: the job says so, exits 0)."""
    root = Path(__file__).resolve().parent.parent
    bindir = Path(sys.executable).parent
    script = (
        f'export PATH="{bindir}:$PATH"; eval "$(ddm cluster env)"; '
        "ray job submit --working-dir . -- python -m cluster_jobs.training expert "
        f"--store {store} --cluster 0 --preset dit-tiny --steps 30 --batch-size 16"
    )
    out = subprocess.run(
        ["bash", "-c", script], cwd=root, env=ray_head, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "already trained to step 30" in out.stdout + out.stderr


def _latest_step(store: str, k: int) -> int:
    path = Path(store) / expert_prefix(k) / "checkpoints" / "latest.json"
    return json.loads(path.read_text())["step"] if path.exists() else 0


def _wait_for_step(store: str, k: int, at_least: int, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while (step := _latest_step(store, k)) < at_least:
        assert time.monotonic() < deadline, f"no checkpoint >= {at_least} (at {step})"
        time.sleep(0.2)
    return step


def test_killed_job_resumes_from_its_checkpoint(ray_head, store, ddm):
    args = [
        "--store",
        store,
        "--clusters",
        "2",
        "--steps",
        "300",
        "--checkpoint-every",
        "25",
        *TINY,
    ]
    first = ddm("submit", *args, env=ray_head)
    assert first.returncode == 0, first.stderr
    sid = submitted_ids(first.stdout)[0]

    # Ray Train's FailureConfig: SIGKILL the worker; the group restarts and resumes.
    step_a = _wait_for_step(store, 2, 50)
    workers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])
    ]
    assert workers, "no Ray Train worker process found"
    for p in workers:
        os.kill(p.pid, signal.SIGKILL)

    # A job killed as a whole, then submitted again: resumes from latest.json.
    step_b = _wait_for_step(store, 2, step_a + 25)
    subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "job", "stop", sid],
        env={**ray_head, **_client_env(ray_head)},
        capture_output=True,
        timeout=120,
    )
    at_stop = _latest_step(store, 2)
    again = ddm("submit", *args, "--wait", env=ray_head)
    assert again.returncode == 0, again.stdout + again.stderr
    sid2 = submitted_ids(again.stdout)[0]
    assert sid2 == f"{sid}-r1"

    logs1, logs2 = job_logs(ray_head, sid), job_logs(ray_head, sid2)
    assert "resumed from" in logs1, "the worker group restart did not resume"
    resumed = [
        int(line.rsplit("at step ", 1)[1].split()[0])
        for line in logs2.splitlines()
        if "resumed from" in line
    ]
    assert resumed and resumed[0] >= at_stop >= step_b and resumed[0] % 25 == 0
    final = read_manifest(open_store(store), expert_prefix(2))
    assert final.final and final.step == 300
    assert final.images_seen == 300 * 16  # resumed counts, not restarted ones


def test_training_lowers_the_heldout_loss(ray_head, store):
    """After the resume test's 300 steps, expert 2 beats its own step-0 initialisation."""
    s = open_store(store)
    manifest = DatasetManifest.load(s)
    cfg = TrainConfig(kind="expert", store=store, cluster=2, preset="dit-tiny", batch_size=16)
    trained = load_model(s, expert_prefix(2), kind="expert")
    spec = ExpertSpec(**trained.training["model"])
    torch.manual_seed(cfg.seed)  # the same initialisation the job started from
    initial = Expert.create(spec).eval()
    after = Expert(trained.model, spec).eval()
    assert heldout_loss(after, cfg, s, manifest) < heldout_loss(initial, cfg, s, manifest)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cluster", "7"], "out of range"),
        (["--cluster", "0", "--preset", "dit-huge"], "'dit-huge' is not one of 'unet-tiny'"),
        (["--cluster", "0", "--mixed-precision", "fp16"], "fp16 needs --device cuda"),
    ],
)
def test_bad_training_input_exits_2(store, args, message):
    out = subprocess.run(
        [sys.executable, "-m", "cluster_jobs.training", "expert", "--store", store, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_patch_size_and_missing_shards_exit_2(tmp_path, ddm):
    odd = tmp_path / "odd"
    prepare(PrepareConfig(dataset="digits", clusters=2, store=str(odd), image_size=18, workers=1))
    out = ddm("train", "expert", "--store", str(odd), "--cluster", "0", "--preset", "dit-tiny")
    assert out.returncode == 2 and "not divisible" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

    next((odd / "shards" / "cluster-001").glob("*.tar")).unlink()
    out = ddm("train", "expert", "--store", str(odd), "--cluster", "1", "--preset", "dit-s")
    assert out.returncode == 2 and "missing" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
