"""Streaming `ddm prepare`: sources read in parts and batches, fitting on a seeded sample,
and the Ray Data engine on a 3-node cluster writing the same clusters as the local engine."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from conftest import free_port, run_ddm

from cluster_jobs.data.passes import SAMPLE_PER_CLUSTER, fit_indices, part_size
from cluster_jobs.data.prepare import PrepareConfig, prepare
from cluster_jobs.data.shards import cluster_dataset, write_cluster_shards
from cluster_jobs.data.sources import load_source, open_source
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.store import open_store


def _owners(store: str, manifest: DatasetManifest) -> dict[int, tuple[int, str]]:
    """image index -> (cluster, split), read back through the shards."""
    out = {}
    for c in range(manifest.num_clusters):
        for split in ("train", "heldout"):
            for s in cluster_dataset(store, c, split, manifest=manifest):
                assert int(s["key"]) not in out
                out[int(s["key"])] = (c, split)
    return out


def test_a_source_reads_in_parts_and_batches_never_the_whole(tmp_path):
    images = load_source("shapes", 16, count=900, seed=3)
    keys = [f"{i:08d}" for i in range(len(images))]
    write_cluster_shards(
        open_store(tmp_path), "train", 0, keys, images.images, images.labels.tolist(), 200
    )
    source = open_source(f"wds:{tmp_path}/shards/cluster-000/shard-{{000000..000004}}.tar")
    # what ships to every task: file names, counts and a few integers, not pixels
    assert len(pickle.dumps(source)) < images.images.nbytes / 50
    parts = source.parts(400, seed=0)
    assert [len(p.indices) for p in parts] == [400, 400, 100]  # whole tars: 2 + 2 + 1
    seen = []
    for part in parts:
        for batch in source.read(part, 64):
            assert len(batch.indices) <= 64
            np.testing.assert_array_equal(batch.images, images.images[batch.indices])
            np.testing.assert_array_equal(batch.labels, images.labels[batch.indices])
            seen.extend(batch.indices.tolist())
    assert seen == list(range(900))
    # a random-access source visits its images in a seeded order: parts are mixed
    shapes = open_source("shapes", 16, count=900, seed=3)
    order = np.concatenate([p.indices for p in shapes.parts(400, seed=0)])
    assert sorted(order.tolist()) == list(range(900)) and order.tolist() != list(range(900))
    np.testing.assert_array_equal(
        next(shapes.read(shapes.parts(400, seed=0)[1], 50)).images, images.images[order[400:450]]
    )


def test_fitting_sample_is_seeded_and_bounded_by_k():
    kept = np.arange(100_000)
    a = fit_indices(kept, 8, None, seed=1)
    assert len(a) == SAMPLE_PER_CLUSTER * 8 and (np.diff(a) > 0).all()
    np.testing.assert_array_equal(a, fit_indices(kept, 8, None, seed=1))
    assert not np.array_equal(a, fit_indices(kept, 8, None, seed=2))
    assert len(fit_indices(kept, 8, 5000, seed=1)) == 5000
    np.testing.assert_array_equal(fit_indices(kept[:300], 8, None, seed=1), kept[:300])
    assert len(fit_indices(kept, 2, None, seed=1, dims=1024)) == 4096  # 4 per PCA dimension
    assert part_size(8, 2000) == 16_000


def test_fit_sample_option_reaches_the_fit(tmp_path, digits_set):
    """--fit-sample N >= the data set fits on every image: the old, whole-data clustering."""
    from cluster_jobs.data.clustering import cluster_images

    cfg = PrepareConfig(
        dataset="digits", clusters=3, store=str(tmp_path), fit_sample=len(digits_set)
    )
    done = prepare(cfg)
    whole = cluster_images(digits_set.images, 3, seed=0)
    owners = _owners(cfg.store, done.manifest)
    assert [owners[i][0] for i in range(len(digits_set))] == whole.assignments.tolist()


@pytest.mark.integration
def test_ray_engine_on_three_nodes_writes_the_clusters_of_the_local_engine(
    tmp_path, s3_env, bucket
):
    """The same WebDataset source in S3, prepared by Ray Data over a head and two worker
    nodes (store on S3, nothing shared on disk) and by the local engine: every image gets
    the same cluster and split."""
    data = load_source("shapes", 16, count=1800, seed=5)
    keys = [f"{i:08d}" for i in range(len(data))]
    write_cluster_shards(
        open_store(f"s3://{bucket}/input"), "train", 0, keys, data.images, data.labels, 300
    )
    dataset = f"wds:s3://{bucket}/input/shards/cluster-000/shard-{{000000..000005}}.tar"
    common = ["--dataset", dataset, "--clusters", "3", "--shard-size", "100", "--json"]

    env = {**s3_env, "DDM_CLUSTER_DIR": str(tmp_path / "cluster")}
    ports = ["--port", str(free_port()), "--dashboard-port", str(free_port())]
    ports += ["--metrics-export-port", str(free_port())]
    up = run_ddm("cluster", "up", "--nodes", "3", "--num-cpus", "1", *ports, env=env)
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        lines = run_ddm("cluster", "env", env=env).stdout.splitlines()
        client = {**env, **dict(line.removeprefix("export ").split("=", 1) for line in lines)}
        ray_store = f"s3://{bucket}/ray"
        done = run_ddm("prepare", *common, "--store", ray_store, "--engine", "ray", env=client)
    finally:
        down = run_ddm("cluster", "down", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert down.returncode == 0, down.stderr
    on_ray = json.loads(done.stdout)
    assert on_ray["engine"] == "ray" and on_ray["parts"] == 6  # 300 images per part
    # one CPU per node and a CPU per write task: the parts were written on several nodes
    assert on_ray["write_nodes"] >= 2

    local_store = f"s3://{bucket}/local"
    local = run_ddm("prepare", *common, "--store", local_store, env=s3_env)
    assert local.returncode == 0, local.stderr[-3000:]
    ray_manifest = DatasetManifest.load(open_store(ray_store))
    local_manifest = DatasetManifest.load(open_store(local_store))
    assert ray_manifest.features.sha256 == local_manifest.features.sha256  # the same fit
    assert ray_manifest.stats.counts == local_manifest.stats.counts
    owners = _owners(ray_store, ray_manifest)
    assert len(owners) == len(data)
    assert owners == _owners(local_store, local_manifest)
    assert os.environ.get("RAY_ADDRESS") is None  # the test process never joined the cluster
