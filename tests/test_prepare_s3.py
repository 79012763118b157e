"""`ddm prepare` into S3 (moto on loopback) through the real CLI, read back per cluster."""

from __future__ import annotations

import json
import shlex
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cluster_jobs.data.prepare import PrepareConfig, prepare
from cluster_jobs.data.shards import cluster_dataset
from cluster_jobs.training.config import TrainConfig
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.store import open_store

K = 4


@pytest.mark.integration
def test_prepare_into_s3_and_read_back_by_cluster(ddm, s3_env, bucket, mnist5k_set, tmp_path):
    uri = f"s3://{bucket}/runs/mnist"
    args = ["prepare", "--dataset", "mnist-5k", "--clusters", str(K), "--store", uri, "--json"]
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(ddm, *args, env=s3_env)
        # meanwhile, the same prepare into a directory, in this process (deterministic for
        # the default seed, 0): the store must not change which cluster an image is in
        local = prepare(PrepareConfig(dataset="mnist-5k", clusters=K, store=str(tmp_path)))
        assignments = np.full(len(mnist5k_set), -1)
        for c in range(K):
            for split in ("train", "heldout"):
                for s in cluster_dataset(str(tmp_path), c, split, manifest=local.manifest):
                    assignments[int(s["key"])] = c
        proc = run.result()
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["images"] == len(mnist5k_set)
    assert summary["clusters"] == K

    store = open_store(uri)
    manifest = DatasetManifest.load(store)
    assert manifest.count == len(mnist5k_set)
    assert [c.count for c in manifest.train] == summary["train_counts"]
    assert [c.count for c in manifest.heldout] == summary["heldout_counts"]
    # everything landed under the prefix, nothing beside it
    raw = store.client.list_objects_v2(Bucket=bucket)["Contents"]
    assert all(o["Key"].startswith("runs/mnist/") for o in raw)

    assert manifest.seed == 0

    images = mnist5k_set.images.astype(np.float32) / 127.5 - 1.0  # (N, H, W, C) in [-1, 1]
    owner: dict[int, int] = {}
    for c in range(K):
        keys = []
        for split in ("train", "heldout"):
            for s in cluster_dataset(uri, c, split, manifest=manifest):
                i = int(s["key"])
                assert s["cluster"] == c
                assert s["label"] == mnist5k_set.labels[i]
                # bitwise: uint8 / 127.5 - 1 in float32, two correctly rounded operations
                np.testing.assert_array_equal(s["image"].numpy(), images[i].transpose(2, 0, 1))
                keys.append(i)
        assert len(keys) == manifest.train[c].count + manifest.heldout[c].count
        assert sorted(keys) == np.flatnonzero(assignments == c).tolist()
        for i in keys:
            assert i not in owner, f"image {i} is in clusters {owner[i]} and {c}"
            owner[i] = c
    assert len(owner) == len(mnist5k_set)
    assert sum(manifest.stats.counts) == len(mnist5k_set)


@pytest.mark.integration
def test_submit_emit_kuberay_writes_one_rayjob_per_job(ddm, s3_env, bucket, tmp_path):
    """`ddm submit --emit kuberay` against a prepared S3 store: manifests, no Ray needed."""
    import yaml

    uri = f"s3://{bucket}/runs/digits"
    prep = ddm("prepare", "--dataset", "digits", "--clusters", "3", "--store", uri, env=s3_env)
    assert prep.returncode == 0, prep.stderr
    out = tmp_path / "manifests"
    args = ["submit", "--store", uri, "--router", "--steps", "50", "--emit", "kuberay"]
    done = ddm(*args, "--out", str(out), "--address", "http://127.0.0.1:9", env=s3_env)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"rayjob-expert-00{k}.yaml" for k in range(3)] + ["rayjob-router.yaml"]
    job = yaml.safe_load((out / "rayjob-expert-001.yaml").read_text())
    assert job["kind"] == "RayJob" and job["metadata"]["name"].startswith("ddm-expert-001-")
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:5] == ["python", "-m", "cluster_jobs.training", "expert", "--config"]
    cfg = TrainConfig.model_validate_json(command[5])  # the whole config, as submitted
    assert (cfg.store, cfg.cluster, cfg.steps) == (uri, 1, 50)
    missing_out = ddm(*args, env=s3_env)
    assert missing_out.returncode == 2 and "--out" in missing_out.stderr
    local = ddm("submit", "--store", str(tmp_path), "--emit", "kuberay", "--out", str(out))
    assert local.returncode == 2
