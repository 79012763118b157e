"""`dataset.json` and `features.safetensors`: round trips, refusals, integrity."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ddm_nodes.dataset_manifest import (
    FEATURES_KEY,
    FORMAT_VERSION,
    MANIFEST_KEY,
    ClusterShards,
    ClusterStats,
    DatasetManifest,
    FeatureSpec,
    ShardEntry,
    shard_key,
)
from ddm_nodes.errors import IntegrityError, ManifestError
from ddm_nodes.features import FeatureSpace, PCAFeatures, PixelFeatures
from ddm_nodes.store import LocalStore


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _split(store, split: str, counts: list[list[int]]) -> list[ClusterShards]:
    out = []
    for c, shard_counts in enumerate(counts):
        entries = [
            ShardEntry(
                key=shard_key(split, c, i),
                uri=store.url(shard_key(split, c, i)),
                sha256=_sha(f"{split}{c}{i}"),
                count=n,
            )
            for i, n in enumerate(shard_counts)
        ]
        out.append(ClusterShards(cluster=c, count=sum(shard_counts), shards=entries))
    return out


def make_manifest(store, train=((5, 3), (4,)), heldout=((1,), (1,)), **overrides):
    train_l, held_l = [list(c) for c in train], [list(c) for c in heldout]
    count = sum(map(sum, train_l)) + sum(map(sum, held_l))
    fields = dict(
        source="digits",
        image_shape=(8, 8, 1),
        channels=1,
        count=count,
        num_clusters=len(train_l),
        class_names=[str(d) for d in range(10)],
        features=FeatureSpec(method="pca", dims=4, params={"x": 1}, sha256=_sha("features")),
        seed=3,
        heldout_fraction=0.1,
        stats=ClusterStats(
            counts=[sum(t) + sum(h) for t, h in zip(train_l, held_l, strict=True)],
            largest_smallest_ratio=1.5,
            silhouette=0.2,
            silhouette_sample=count,
            inertia=12.5,
        ),
        train=_split(store, "train", train_l),
        heldout=_split(store, "heldout", held_l),
    )
    fields.update(overrides)
    return DatasetManifest(**fields)


# --- DatasetManifest -----------------------------------------------------------------------


def test_manifest_round_trip(tmp_path):
    store = LocalStore(tmp_path)
    manifest = make_manifest(store)
    manifest.save(store)
    assert store.list() == [MANIFEST_KEY]
    loaded = DatasetManifest.load(store)
    assert loaded == manifest
    assert loaded.model_dump() == manifest.model_dump()
    assert loaded.labelled
    assert [s.key for s in loaded.shards("train", 0)] == [
        "shards/cluster-000/shard-000000.tar",
        "shards/cluster-000/shard-000001.tar",
    ]
    assert [s.key for s in loaded.shards("heldout", 1)] == ["heldout/cluster-001/shard-000000.tar"]


def test_manifest_without_labels(tmp_path):
    store = LocalStore(tmp_path)
    manifest = make_manifest(store, class_names=None)
    manifest.save(store)
    assert not DatasetManifest.load(store).labelled


def test_missing_manifest_names_prepare(tmp_path):
    with pytest.raises(ManifestError, match="ddm prepare"):
        DatasetManifest.load(LocalStore(tmp_path))


def test_newer_format_version_asks_for_upgrade(tmp_path):
    store = LocalStore(tmp_path)
    raw = json.loads(make_manifest(store).model_dump_json())
    raw["format_version"] = FORMAT_VERSION + 1
    raw["a_field_from_the_future"] = True
    store.put_bytes(MANIFEST_KEY, json.dumps(raw).encode())
    with pytest.raises(ManifestError, match="upgrade"):
        DatasetManifest.load(store)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2"])
def test_invalid_json(tmp_path, text):
    store = LocalStore(tmp_path)
    store.put_bytes(MANIFEST_KEY, text.encode())
    with pytest.raises(ManifestError, match="not valid JSON"):
        DatasetManifest.load(store)


@pytest.mark.parametrize("text", ["[]", "42", '{"source": "digits"}'])
def test_valid_json_but_not_a_manifest(text):
    with pytest.raises(ManifestError, match="not a valid dataset manifest"):
        DatasetManifest.from_json(text)


def test_total_count_must_add_up(tmp_path):
    store = LocalStore(tmp_path)
    raw = json.loads(make_manifest(store).model_dump_json())
    raw["count"] += 1
    with pytest.raises(ManifestError, match="count"):
        DatasetManifest.from_json(json.dumps(raw))
    with pytest.raises(ValidationError):
        DatasetManifest.model_validate(raw)


def test_cluster_count_must_add_up(tmp_path):
    store = LocalStore(tmp_path)
    raw = json.loads(make_manifest(store).model_dump_json())
    raw["train"][0]["count"] += 1  # the shards of cluster 0 no longer add up to it
    raw["count"] += 1  # even with the total kept consistent
    with pytest.raises(ManifestError, match="do not add up"):
        DatasetManifest.from_json(json.dumps(raw))


def test_clusters_must_be_listed_in_order(tmp_path):
    store = LocalStore(tmp_path)
    raw = json.loads(make_manifest(store).model_dump_json())
    raw["train"].reverse()
    with pytest.raises(ManifestError):
        DatasetManifest.from_json(json.dumps(raw))


def test_bad_sha256_is_refused(tmp_path):
    store = LocalStore(tmp_path)
    raw = json.loads(make_manifest(store).model_dump_json())
    raw["train"][0]["shards"][0]["sha256"] = "not-a-hash"
    with pytest.raises(ManifestError, match="sha256"):
        DatasetManifest.from_json(json.dumps(raw))


@pytest.mark.parametrize("cluster", [-1, 2, 100])
def test_shards_out_of_range_cluster(tmp_path, cluster):
    manifest = make_manifest(LocalStore(tmp_path))
    with pytest.raises(ManifestError, match="out of range"):
        manifest.shards("train", cluster)


# --- FeatureSpace --------------------------------------------------------------------------


# A feature space and its copy read back from bytes hold the same float32 values, but the
# fitted components are scikit-learn's column-major array and the restored ones row-major:
# the GEMM takes another path, and what they compute may differ in the last bits. Values
# here are up to ~3, sums of 36 products: a few float32 ulps (eps 1.2e-7) stay below 1e-6
# (measured: 5e-7), far below any real change to the space.
SAME_SPACE = dict(rtol=1e-5, atol=1e-6)


def _images(n=60, seed=0) -> torch.Tensor:
    """Images with a few strong directions of variation, in [-1, 1], (N, 1, 6, 6)."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(4, 36)) * np.array([[4.0], [3.0], [2.0], [1.0]])
    x = rng.normal(size=(n, 4)) @ basis + 0.05 * rng.normal(size=(n, 36))
    x = np.tanh(x / np.abs(x).max())
    return torch.from_numpy(x.astype(np.float32)).reshape(n, 1, 6, 6)


def test_pca_matches_numpy_eigendecomposition():
    images = _images()
    pca = PCAFeatures.fit(images, dims=3, seed=0)
    x = images.reshape(len(images), -1).double().numpy()
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    evals, evecs = np.linalg.eigh(cov)
    top = evecs[:, ::-1][:, :3].T  # (3, P), largest variance first
    np.testing.assert_allclose(pca.mean.numpy(), mean, atol=1e-5)
    # the same directions up to sign
    overlap = np.abs(np.sum(pca.components.double().numpy() * top, axis=1))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-4)
    assert pca.explained == pytest.approx(evals[::-1][:3].sum() / evals.sum(), rel=1e-4)


def test_feature_space_bytes_round_trip():
    images = _images()
    extractor = PCAFeatures.fit(images, dims=3, seed=0)
    centroids = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.5, 0.0], [0.0, 0.0, 2.0]])
    space = FeatureSpace(extractor, centroids)

    restored = FeatureSpace.from_bytes(space.to_bytes())
    assert isinstance(restored.extractor, PCAFeatures)
    assert restored.num_clusters == 3
    # the tensors read back are the bytes written: bitwise
    assert torch.equal(restored.centroids, centroids)
    assert torch.equal(restored.extractor.mean, extractor.mean)
    assert torch.equal(restored.extractor.components, extractor.components)
    assert restored.extractor.params() == extractor.params()
    # what they compute is equal up to float32 rounding: another layout, another GEMM path
    torch.testing.assert_close(restored.embed(images), space.embed(images), **SAME_SPACE)
    torch.testing.assert_close(restored.distances(images), space.distances(images), **SAME_SPACE)

    # embeddings and distances as plain numpy computes them from the stored tensors
    x = images.reshape(len(images), -1).double().numpy()
    mean = extractor.mean.double().numpy()
    comps = extractor.components.double().numpy()
    z = (x - mean) @ comps.T
    np.testing.assert_allclose(restored.embed(images).numpy(), z, atol=1e-4)
    d = np.sqrt(((z[:, None, :] - centroids.double().numpy()[None]) ** 2).sum(-1))
    np.testing.assert_allclose(restored.distances(images).numpy(), d, atol=1e-4)


def test_feature_space_bytes_are_deterministic():
    """Same space, same bytes: the manifest's sha256 must not change from run to run."""
    images = _images()
    space = FeatureSpace(PCAFeatures.fit(images, dims=3, seed=0), torch.eye(3))
    first = space.to_bytes()
    assert all(space.to_bytes() == first for _ in range(20))
    rebuilt = FeatureSpace(PCAFeatures.fit(images, dims=3, seed=0), torch.eye(3))
    assert rebuilt.to_bytes() == first


def test_pixel_feature_space_round_trip():
    images = _images(n=5)
    space = FeatureSpace(PixelFeatures.fit(images, 0, 0), torch.zeros(2, 36))
    restored = FeatureSpace.from_bytes(space.to_bytes())
    assert isinstance(restored.extractor, PixelFeatures)
    assert restored.extractor.dims == 36
    flat = images.reshape(5, -1).double().numpy()
    np.testing.assert_allclose(
        restored.distances(images).numpy(),
        np.repeat(np.linalg.norm(flat, axis=1)[:, None], 2, axis=1),
        atol=1e-5,
    )


def _saved_space(store):
    images = _images()
    space = FeatureSpace(PCAFeatures.fit(images, dims=3, seed=0), torch.randn(2, 3))
    sha, pinned = space.save(store)
    assert sha == hashlib.sha256(store.get_bytes(FEATURES_KEY)).hexdigest()
    assert pinned is None  # PCA's tensors are all in the file: nothing to pin
    manifest = make_manifest(
        store,
        features=FeatureSpec(method="pca", dims=3, params=space.extractor.params(), sha256=sha),
    )
    return space, manifest, images


def test_feature_space_load_through_store(tmp_path):
    store = LocalStore(tmp_path)
    space, manifest, images = _saved_space(store)
    loaded = FeatureSpace.load(store, manifest)
    # the tensors read through the store are the bytes saved: bitwise
    assert torch.equal(loaded.centroids, space.centroids)
    assert torch.equal(loaded.extractor.mean, space.extractor.mean)
    assert torch.equal(loaded.extractor.components, space.extractor.components)
    # what they compute: equal up to float32 rounding, another layout (see SAME_SPACE)
    torch.testing.assert_close(loaded.distances(images), space.distances(images), **SAME_SPACE)


def test_tampered_features_are_refused(tmp_path):
    store = LocalStore(tmp_path)
    _, manifest, _ = _saved_space(store)
    path = tmp_path / FEATURES_KEY
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit inside the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        FeatureSpace.load(store, manifest)


def test_feature_space_with_wrong_cluster_count_is_refused(tmp_path):
    store = LocalStore(tmp_path)
    _, manifest, _ = _saved_space(store)  # 2 centroids
    three = make_manifest(
        store, train=((1,), (1,), (1,)), heldout=((1,), (1,), (1,)), features=manifest.features
    )
    with pytest.raises(ManifestError, match="centroids"):
        FeatureSpace.load(store, three)
