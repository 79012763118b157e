"""The training input pipeline in data-loader worker processes (cluster_jobs/training/loader.py):
the same batches as one process, each sample decoded once by one worker, expert isolation and
sha256 verification inside the workers, and the CPUs Ray reserves for them."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from cluster_jobs.data import shards
from cluster_jobs.data.shards import clusters_dataset
from cluster_jobs.training import loader
from cluster_jobs.training.config import TrainConfig
from cluster_jobs.training.loader import OwnBatches, collate, loader_workers
from cluster_jobs.training.tasks import batch_stream
from ddm_nodes.dataset_manifest import MANIFEST_KEY, DatasetManifest
from ddm_nodes.errors import IntegrityError
from ddm_nodes.store import LocalStore


def _cfg(store: str, kind: str = "expert", **kw) -> TrainConfig:
    if kind == "expert":
        kw.setdefault("cluster", 0)
    return TrainConfig(kind=kind, store=store, **kw)


def _take(cfg: TrainConfig, n: int, rank: int = 0, world: int = 1) -> list[dict]:
    store = LocalStore(cfg.store)
    stream = batch_stream(cfg, store, DatasetManifest.load(store), rank, world)
    return list(itertools.islice(stream, n))


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def _samples(batches: list[dict]) -> Counter:
    """The batches' samples as a multiset of (pixels, label, cluster)."""
    return Counter(
        (b["image"][i].numpy().tobytes(), int(b["label"][i]), int(b["cluster"][i]))
        for b in batches
        for i in range(len(b["image"]))
    )


def _odd_batches(count: int) -> int:
    """A batch size giving an odd number of full batches per epoch, so that the next epoch
    starts on loader worker 1 (cluster sizes depend on the k-means fit, not on this test)."""
    return next(s for s in range(16, 64) if count // s % 2)


@pytest.mark.parametrize("kind", ["expert", "monolith"])
def test_loader_workers_give_the_batches_of_one_process(prepared_digits, kind):
    """Batch for batch, over more than two epochs: the same mixing of clusters, the same
    reshuffling, whatever the number of worker processes."""
    store, manifest = prepared_digits[0].store, prepared_digits[1]
    count = sum(c.count for c in manifest.train) if kind == "monolith" else manifest.train[0].count
    size = _odd_batches(count)
    cfg = _cfg(store, kind, batch_size=size, shuffle_buffer=50, seed=3)
    n = 2 * (count // size) + 3  # into the third epoch
    one = _take(cfg.model_copy(update={"loader_workers": 0}), n)
    assert _same(_take(cfg.model_copy(update={"loader_workers": 2}), n), one)


def test_the_stream_covers_each_sample_once_per_epoch(prepared_digits):
    """Every epoch is full batches of distinct samples of the cluster: all of them but the
    short remainder, which is left out (a partial batch would change the step's shape)."""
    cfg, manifest = prepared_digits
    count = manifest.train[0].count
    size = _odd_batches(count)
    per_epoch = count // size  # odd: epoch 2 starts on worker 1
    want = Counter(
        (s["image"].numpy().tobytes(), s["label"], s["cluster"])
        for s in clusters_dataset(cfg.store, [0])
    )
    assert max(want.values()) == 1  # digits has no duplicate images in a cluster
    run = _cfg(cfg.store, cluster=0, batch_size=size, shuffle_buffer=40, loader_workers=2)
    batches = _take(run, 3 * per_epoch)
    epochs = [batches[e * per_epoch : (e + 1) * per_epoch] for e in range(3)]
    for epoch in epochs:
        got = _samples(epoch)
        assert max(got.values()) == 1 and not got - want  # each sample once, all from the cluster
        assert sum(got.values()) == per_epoch * size == count - count % size
    assert not _same(epochs[0], epochs[1])  # reshuffled


def test_a_seed_gives_the_same_batches_and_another_seed_others(prepared_digits):
    store = prepared_digits[0].store
    cfg = _cfg(store, "monolith", batch_size=32, shuffle_buffer=50, seed=1, loader_workers=2)
    first = _take(cfg, 12)
    assert _same(_take(cfg, 12), first)
    assert not _same(_take(cfg.model_copy(update={"seed": 2}), 12), first)


def test_batches_from_loader_workers_mix_the_clusters(prepared_digits):
    """As tests/test_prepare.py asks of one process: shards hold one cluster each, and every
    batch of a shuffled read must draw on most of them."""
    cfg, manifest = prepared_digits
    K = manifest.num_clusters
    run = _cfg(cfg.store, "monolith", batch_size=64, shuffle_buffer=50, seed=3, loader_workers=2)
    for batch in _take(run, 2 * manifest.count // 64):
        assert len(set(batch["cluster"].tolist())) >= K - 1


@pytest.mark.parametrize("shuffle", [0, 50])
def test_ranks_times_loader_workers_decode_disjoint_complete_shares(
    prepared_digits, monkeypatch, shuffle
):
    """One epoch of every (rank, loader worker): each sample decoded by exactly one of them,
    in whole batches, and nothing decoded that its worker drops."""
    cfg, manifest = prepared_digits
    everything = range(manifest.num_clusters)
    keys = [s["key"] for s in clusters_dataset(cfg.store, everything)]
    decoded = []
    decode = shards._decode_sample
    monkeypatch.setattr(
        shards, "_decode_sample", lambda s, *args: decoded.append(s) or decode(s, *args)
    )
    size = 32
    for world, workers in [(1, 2), (2, 2), (3, 2), (2, 3)]:
        parts = []
        for rank, worker in itertools.product(range(world), range(workers)):
            decoded.clear()
            own = OwnBatches(first=5, size=size, worker=worker, workers=workers)
            read = clusters_dataset(
                cfg.store, everything, shuffle=shuffle, seed=7, rank=rank, world_size=world,
                select=own,
            )  # fmt: skip
            got = [s["key"] for s in read]
            assert len(decoded) == len(got)
            # whole batches: worker w of n has the rank's batches g = w (mod n), g from 5 on
            mine = [b for b in range(-(-own.count // size)) if (5 + b) % workers == worker]
            assert len(got) == sum(min(size, own.count - b * size) for b in mine)
            parts.append(got)
        assert sorted(k for p in parts for k in p) == sorted(keys), (world, workers)


def test_an_experts_loader_workers_open_only_its_own_clusters_shards(prepared_digits, tmp_path):
    """Every other cluster's shards deleted from the store: the expert's workers never miss
    them, for more than an epoch."""
    cfg, manifest = prepared_digits
    root = tmp_path / "store"
    shutil.copytree(cfg.store, root)
    own = "shards/cluster-001/"
    for k in LocalStore(root).list():
        if k.endswith(".tar") and not k.startswith(own):
            (root / k).unlink()
    run = _cfg(str(root), cluster=1, batch_size=64, shuffle_buffer=50, loader_workers=2)
    batches = _take(run, 2 * manifest.train[1].count // 64 + 1)
    assert all(b["cluster"].tolist() == [1] * 64 for b in batches)


def test_loader_workers_refuse_another_clusters_shard_and_a_corrupted_one(
    prepared_digits, tmp_path
):
    cfg, manifest = prepared_digits
    root = tmp_path / "store"
    shutil.copytree(cfg.store, root)
    run = _cfg(str(root), cluster=0, batch_size=16, shuffle_buffer=0, loader_workers=2)
    shard = root / manifest.shards("train", 0)[-1].key
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        _take(run, 100)

    raw = json.loads((root / MANIFEST_KEY).read_text())  # cluster 0 lists cluster 1's shards
    for field in ("shards", "count"):
        raw["train"][0][field], raw["train"][1][field] = (
            raw["train"][1][field],
            raw["train"][0][field],
        )
    (root / MANIFEST_KEY).write_text(json.dumps(raw))
    with pytest.raises(IntegrityError, match="cluster"):
        _take(run, 1)


def test_loader_workers_round_trip_through_the_config_json():
    for value in (None, 0, 2):
        cfg = _cfg("/s", loader_workers=value)
        assert TrainConfig.model_validate_json(cfg.model_dump_json()).loader_workers == value
    assert _cfg("/s", loader_workers=5).config_hash() == _cfg("/s").config_hash()


def test_auto_loader_workers(monkeypatch):
    """None on the CPU; on cuda, the rank's CPUs beyond its own, up to MAX_AUTO_WORKERS."""
    assert loader_workers(_cfg("/s"), lambda: 64) == 0
    assert loader_workers(_cfg("/s", loader_workers=3), lambda: 64) == 3
    cuda = _cfg("/s", device="cuda", cpus_per_worker=2)
    assert loader_workers(cuda, lambda: 64) == loader.MAX_AUTO_WORKERS
    assert loader_workers(cuda, lambda: 5.5) == 3
    assert loader_workers(cuda, lambda: 1) == 0


def test_collate_stacks_every_array_and_number_it_is_given():
    """Whatever a sample carries (a latent beside the image, say) reaches the batch."""
    samples = [
        {
            "key": str(i),
            "image": torch.full((1, 2, 2), float(i)),
            "latent": np.full((4, 1, 1), i, np.float32),
            "label": i,
            "cluster": np.int64(7),
        }
        for i in range(3)
    ]
    batch = collate(samples)
    assert set(batch) == {"image", "latent", "label", "cluster"}
    assert batch["image"].shape == (3, 1, 2, 2) and batch["image"][2].max() == 2
    assert batch["latent"].shape == (3, 4, 1, 1) and batch["latent"].dtype == torch.float32
    assert batch["label"].tolist() == [0, 1, 2] and batch["label"].dtype == torch.long
    assert batch["cluster"].tolist() == [7, 7, 7]


def _expand(expander, data: bytes) -> list[dict]:
    shard = {"url": "mem://shard.tar", "stream": io.BytesIO(data)}
    return list(wds.tariterators.group_by_keys(expander([shard])))


def test_shards_read_as_webdatasets_reader_reads_them(prepared_digits):
    """The fast ustar reader gives WebDataset's samples on every shard `prepare` wrote."""
    cfg, manifest = prepared_digits
    for split in (manifest.train, manifest.heldout):
        for entry in (s for ct in split for s in ct.shards):
            data = (Path(cfg.store) / entry.key).read_bytes()
            assert shards._ustar_files(data) is not None  # the fast path, not the fallback
            theirs = _expand(wds.tariterators.tar_file_expander, data)
            assert _expand(shards._tar_expander, data) == theirs
            assert len(theirs) == entry.count


def test_a_shard_in_another_tar_dialect_goes_through_webdatasets_reader():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in [("a/x.png", b"12"), ("a/x.cls", b"3"), ("y.cls", b"4" * 700)]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(body), 1.5  # a float mtime: a pax header each
            tar.addfile(info, io.BytesIO(body))
    data = buf.getvalue()
    assert shards._ustar_files(data) is None
    got = _expand(shards._tar_expander, data)
    assert got == _expand(wds.tariterators.tar_file_expander, data)
    assert [s["__key__"] for s in got] == ["a/x", "y"] and got[1]["cls"] == b"4" * 700
