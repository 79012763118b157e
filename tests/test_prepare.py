"""`prepare` end to end into a local store, read back one cluster at a time."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster_jobs.data.clustering import Clustering, cluster_images, heldout_mask
from cluster_jobs.data.passes import fit_indices, nearest
from cluster_jobs.data.prepare import PrepareConfig, prepare
from cluster_jobs.data.shards import cluster_dataset, clusters_dataset
from ddm_nodes.dataset_manifest import FEATURES_KEY, MANIFEST_KEY, DatasetManifest
from ddm_nodes.errors import DDMError, IntegrityError
from ddm_nodes.features import FeatureSpace
from ddm_nodes.pixels import to_model_range
from ddm_nodes.store import LocalStore


def _root(cfg: PrepareConfig) -> Path:
    return Path(cfg.store)


def _copy(cfg: PrepareConfig, dest: Path) -> PrepareConfig:
    shutil.copytree(_root(cfg), dest)
    return cfg.model_copy(update={"store": str(dest)})


def _expected_pixels(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C) -> float32 (C, H, W) in [-1, 1], the models' convention."""
    return np.transpose(image.astype(np.float32) / 127.5 - 1.0, (2, 0, 1))


def _tar_keys(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})


def _read_split(store, k: int, split: str) -> dict[int, list[dict]]:
    return {c: list(cluster_dataset(store, c, split)) for c in range(k)}


def test_manifest_describes_the_dataset(prepared_digits, digits_set):
    cfg, manifest = prepared_digits
    store = LocalStore(cfg.store)
    assert DatasetManifest.load(store) == manifest
    assert manifest.source == "digits"
    assert manifest.count == len(digits_set)
    assert manifest.image_shape == digits_set.images.shape[1:]
    assert manifest.num_clusters == cfg.clusters
    assert manifest.class_names == digits_set.class_names
    assert manifest.seed == cfg.seed and manifest.heldout_fraction == cfg.heldout_fraction
    assert sum(manifest.stats.counts) == len(digits_set)
    for c in range(cfg.clusters):
        n = manifest.train[c].count + manifest.heldout[c].count
        assert manifest.stats.counts[c] == n
        assert manifest.heldout[c].count == min(round(cfg.heldout_fraction * n), n - 1)
        assert all(s.count <= cfg.shard_size for s in manifest.shards("train", c))
    # small shards: the store really exercises several shards per cluster
    assert max(len(ct.shards) for ct in manifest.train) > 1


def test_every_shard_matches_its_sha256(prepared_digits):
    cfg, manifest = prepared_digits
    store = LocalStore(cfg.store)
    listed = []
    for split in (manifest.train, manifest.heldout):
        for ct in split:
            for s in ct.shards:
                data = (_root(cfg) / s.key).read_bytes()
                assert hashlib.sha256(data).hexdigest() == s.sha256
                assert len(_tar_keys(data)) == s.count
                assert s.uri == store.url(s.key)
                listed.append(s.key)
    # nothing in the store but the manifest, the feature space and the listed shards
    assert store.list() == sorted(listed + [MANIFEST_KEY, FEATURES_KEY])
    features = (_root(cfg) / FEATURES_KEY).read_bytes()
    assert hashlib.sha256(features).hexdigest() == manifest.features.sha256


@dataclass(frozen=True)
class Expected:
    fitted: Clustering  # on the fitting sample
    assignments: np.ndarray  # every image's nearest centroid
    costs: np.ndarray


@pytest.fixture(scope="module")
def expected(prepared_digits, digits_set):
    """The clustering prepare should have used, computed again here from the source: fitted
    on the seeded sample (256 per cluster: a strict subset of digits' 1,797 at K=4), then
    every image assigned to its nearest centroid."""
    cfg, _ = prepared_digits
    sample = fit_indices(np.arange(len(digits_set)), cfg.clusters, None, cfg.seed, cfg.feature_dims)
    assert len(sample) == 256 * cfg.clusters < len(digits_set)
    fitted = cluster_images(
        digits_set.images[sample], cfg.clusters, cfg.features, cfg.feature_dims, cfg.seed
    )
    z = fitted.space.embed(to_model_range(digits_set.images)).double().numpy()
    assignments, costs = nearest(z, fitted.centers, fitted.space.metric)
    return Expected(fitted, assignments, costs)


def test_each_cluster_reads_back_exactly_its_images(prepared_digits, digits_set, expected):
    cfg, manifest = prepared_digits
    k = cfg.clusters
    held = heldout_mask(expected.assignments, cfg.heldout_fraction, cfg.seed)

    seen: dict[str, set[int]] = {"train": set(), "heldout": set()}
    for split in ("train", "heldout"):
        for c, samples in _read_split(cfg.store, k, split).items():
            keys = [int(s["key"]) for s in samples]
            assert len(keys) == len(set(keys))
            assert len(keys) == (manifest.train if split == "train" else manifest.heldout)[c].count
            want = (expected.assignments == c) & (held if split == "heldout" else ~held)
            assert set(keys) == set(np.flatnonzero(want).tolist())
            for s in samples:
                i = int(s["key"])
                assert s["cluster"] == c
                assert s["label"] == digits_set.labels[i]
                assert s["image"].dtype == torch.float32
                # bitwise: uint8 / 127.5 - 1 in float32 is two correctly rounded operations,
                # the same bits from numpy here and torch in the reader, on any CPU
                np.testing.assert_array_equal(
                    s["image"].numpy(), _expected_pixels(digits_set.images[i])
                )
            assert not seen[split] & set(keys), "an image is in two clusters"
            seen[split] |= set(keys)
    assert not seen["train"] & seen["heldout"]
    assert seen["train"] | seen["heldout"] == set(range(len(digits_set)))


def test_feature_space_in_store_is_the_clustering(prepared_digits, expected):
    cfg, manifest = prepared_digits
    space = FeatureSpace.load(LocalStore(cfg.store), manifest)
    assert space.num_clusters == cfg.clusters
    # bitwise: prepare ran this same cluster_images on the same sample in this process, and
    # the store holds its tensors' bytes
    fitted = expected.fitted.space
    assert torch.equal(space.centroids, fitted.centroids)
    assert torch.equal(space.extractor.components, fitted.extractor.components)
    assert torch.equal(space.extractor.mean, fitted.extractor.mean)
    stats = manifest.stats
    assert stats.silhouette == expected.fitted.stats.silhouette  # on the fitting sample
    assert stats.counts == np.bincount(expected.assignments, minlength=cfg.clusters).tolist()
    # every image's cost, summed in another order, rounded to 6 digits where it is made
    assert stats.inertia == pytest.approx(expected.costs.sum(), rel=1e-5)


def test_ranks_split_a_cluster_disjointly(prepared_digits):
    cfg, manifest = prepared_digits
    c = max(range(cfg.clusters), key=lambda i: len(manifest.train[i].shards))
    everything = {s["key"] for s in cluster_dataset(cfg.store, c)}
    parts = [
        {s["key"] for s in cluster_dataset(cfg.store, c, rank=r, world_size=2)} for r in (0, 1)
    ]
    assert not parts[0] & parts[1]
    assert parts[0] | parts[1] == everything


def test_shuffled_reading_of_all_clusters_mixes_them_in_every_batch(prepared_digits):
    """Shards hold one cluster each; a router trained on batches read shard after shard learns
    the recent batches' cluster. Every batch of a shuffled read (buffer smaller than a shard)
    must draw on most clusters, where a shard-after-shard read draws on one or two."""
    cfg, manifest = prepared_digits
    K = manifest.num_clusters
    everything = range(K)

    def clusters_per_batch(**kw):
        seen = [s["cluster"] for s in clusters_dataset(cfg.store, everything, **kw)]
        return [len(set(seen[i : i + 64])) for i in range(0, len(seen) - 63, 64)]

    assert min(clusters_per_batch(shuffle=50, seed=3)) >= K - 1
    assert max(clusters_per_batch()) <= 2  # what the shuffle has to undo


def test_ranks_split_a_shuffled_read_disjointly(prepared_digits):
    """Each rank shuffles its own buffer, but cuts its share from one seeded shard order."""
    cfg, manifest = prepared_digits
    everything = range(manifest.num_clusters)
    all_keys = {s["key"] for s in clusters_dataset(cfg.store, everything)}
    for world in (2, 3):
        parts = [
            [
                s["key"]
                for s in clusters_dataset(
                    cfg.store, everything, shuffle=50, seed=5, rank=r, world_size=world
                )
            ]
            for r in range(world)
        ]
        assert sum(map(len, parts)) == len(all_keys)
        assert set().union(*parts) == all_keys


def test_shuffled_reading_yields_the_same_samples(prepared_digits):
    cfg, _ = prepared_digits
    plain = [s["key"] for s in cluster_dataset(cfg.store, 0)]
    shuffled = [s["key"] for s in cluster_dataset(cfg.store, 0, shuffle=100, seed=1)]
    assert sorted(plain) == sorted(shuffled)


def test_rerun_without_overwrite_is_refused(prepared_digits):
    cfg, _ = prepared_digits
    before = (_root(cfg) / MANIFEST_KEY).read_bytes()
    with pytest.raises(DDMError, match="--overwrite"):
        prepare(cfg)
    assert (_root(cfg) / MANIFEST_KEY).read_bytes() == before


def test_overwrite_replaces_everything(prepared_digits, tmp_path):
    cfg = _copy(prepared_digits[0], tmp_path / "store")
    new_cfg = cfg.model_copy(update={"clusters": 3, "shard_size": 1000, "overwrite": True})
    manifest = prepare(new_cfg).manifest
    assert manifest.num_clusters == 3
    store = LocalStore(new_cfg.store)
    assert DatasetManifest.load(store) == manifest
    shards = sorted(
        s.key for split in (manifest.train, manifest.heldout) for c in split for s in c.shards
    )
    # no stale shard from the earlier, finer preparation survives
    assert sorted(store.list("shards/") + store.list("heldout/")) == shards
    assert store.list() == sorted(shards + [MANIFEST_KEY, manifest.features.key])
    keys = {
        s["key"]
        for c in range(3)
        for sp in ("train", "heldout")
        for s in cluster_dataset(store, c, sp)
    }
    assert len(keys) == manifest.count


def test_same_seed_writes_identical_shards(prepared_digits, tmp_path):
    cfg, manifest = prepared_digits
    # one writer process here, a pool in the fixture: the bytes must not depend on it
    again = prepare(cfg.model_copy(update={"store": str(tmp_path / "again"), "workers": 1}))
    m2 = again.manifest

    def shas(m):
        return [
            (s.key, s.sha256, s.count) for sp in (m.train, m.heldout) for c in sp for s in c.shards
        ]

    assert shas(m2) == shas(manifest)
    assert m2.features.sha256 == manifest.features.sha256
    assert m2.stats == manifest.stats


@pytest.mark.parametrize("which", ["first", "last"])
def test_corrupted_shard_is_refused_before_its_samples(prepared_digits, tmp_path, which):
    cfg = _copy(prepared_digits[0], tmp_path / "store")
    manifest = prepared_digits[1]
    c = max(range(cfg.clusters), key=lambda i: len(manifest.train[i].shards))
    shards = manifest.shards("train", c)
    bad = 0 if which == "first" else len(shards) - 1
    path = _root(cfg) / shards[bad].key
    bad_keys = set(_tar_keys(path.read_bytes()))
    good_keys = {k for s in shards[:bad] for k in _tar_keys((_root(cfg) / s.key).read_bytes())}
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # one byte flipped
    path.write_bytes(bytes(data))

    got = []
    with pytest.raises(IntegrityError, match="sha256"):
        for sample in cluster_dataset(cfg.store, c):
            got.append(sample["key"])
    assert not set(got) & bad_keys
    assert set(got) == good_keys


def test_manifest_pointing_at_another_cluster_is_refused(prepared_digits, tmp_path):
    cfg = _copy(prepared_digits[0], tmp_path / "store")
    raw = json.loads((_root(cfg) / MANIFEST_KEY).read_text())
    raw["train"][0]["shards"], raw["train"][1]["shards"] = (
        raw["train"][1]["shards"],
        raw["train"][0]["shards"],
    )
    raw["train"][0]["count"], raw["train"][1]["count"] = (
        raw["train"][1]["count"],
        raw["train"][0]["count"],
    )
    (_root(cfg) / MANIFEST_KEY).write_text(json.dumps(raw))
    with pytest.raises(IntegrityError, match="cluster"):
        list(cluster_dataset(cfg.store, 0))
