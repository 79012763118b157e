"""Per-cluster WebDataset shards: writing them into a store and streaming them back.

A shard is a plain tar of samples `KEY.png`, `KEY.cls` (label, when the data set has one),
`KEY.cluster.txt` and, in a latent dataset, `KEY.latent.npy` (the image's scaled VAE latent,
float32 (c, h, w)), where KEY is the image's index in its source. Shards are written
deterministically (sorted entries, mtime 0), so the same data and seed give the same sha256.

Reading goes through the store: each shard is fetched whole, its sha256 checked against the
manifest, and only then expanded. A shard is at most `shard_size` small images, so holding
one in memory is cheap, and a corrupted or replaced shard is refused before any of its
samples reaches a model.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from ddm_nodes.dataset_manifest import (
    NULL_LABEL,
    ClusterShards,
    DatasetManifest,
    ShardEntry,
    Split,
    shard_key,
)
from ddm_nodes.errors import IntegrityError
from ddm_nodes.pixels import png_bytes, to_model_range
from ddm_nodes.store import Store, open_store, open_url

log = logging.getLogger(__name__)
IMAGE = frozenset({"image"})
# Shards open at once when shuffling (each is held whole in memory: a few MB at most here).
OPEN_SHARDS = 16
TAR_BLOCK = 512
META_FILE = re.compile(r"__[^/]*__($|/)")  # files WebDataset's reader skips


def register_s3_opener() -> None:
    """Let WebDataset open `s3://` URLs with boto3 streaming (no aws CLI, no s3fs)."""

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
        if mode != "rb":
            raise ValueError(f"s3 URLs are read-only in WebDataset here, not {mode!r}")
        return open_url(url)

    wds.gopen_schemes["s3"] = gopen_s3


def write_cluster_shards(
    store: Store,
    split: Split,
    cluster: int,
    keys: Sequence[str],
    images: np.ndarray,
    labels: Sequence[int] | None,
    shard_size: int,
    latents: np.ndarray | None = None,
) -> ClusterShards:
    """Write one cluster's samples (images uint8 (n, H, W, C), latents float32 (n, c, h, w))
    as shards of at most `shard_size`; returns their manifest entries."""
    with tempfile.TemporaryDirectory(prefix="ddm-shards-") as folder:
        stream = ShardStream(store, split, cluster, shard_size, folder)
        for i, key in enumerate(keys):
            label = None if labels is None else labels[i]
            stream.add(
                sample(key, images[i], cluster, label, None if latents is None else latents[i])
            )
        entries = stream.close()
    return ClusterShards(cluster=cluster, count=sum(e.count for e in entries), shards=entries)


def sample(
    key: str, image: np.ndarray, cluster: int, label: int | None, latent: np.ndarray | None
) -> dict[str, Any]:
    """One shard sample's entries."""
    out = {
        "__key__": key,
        "png": png_bytes(image, compress_level=1),
        "cluster.txt": str(cluster).encode(),
    }
    if label is not None:
        out["cls"] = str(label).encode()
    if latent is not None:
        out["latent.npy"] = _npy(latent)
    return out


class ShardStream:
    """One (split, cluster)'s shards, written a sample at a time into a file under `folder`
    and put into the store as each fills (`shard_size` samples): what it holds in memory is
    one sample. `part` numbers the writer, so that parallel writers' shard names differ."""

    def __init__(
        self,
        store: Store,
        split: Split,
        cluster: int,
        shard_size: int,
        folder: str,
        part: int | None = None,
        generation: str | None = None,
    ):
        self.store, self.split, self.cluster = store, split, cluster
        self.shard_size, self.part, self.generation = shard_size, part, generation
        self.path = os.path.join(folder, f"{split}-{cluster}.tar")
        self.entries: list[ShardEntry] = []
        self._file: Any = None
        self._sink: Any = None
        self._count = 0

    def add(self, entry: dict[str, Any]) -> None:
        if self._sink is None:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in _flush
            # ustar with integer mtime: no per-entry PAX header (half the size, twice the speed)
            self._sink = wds.TarWriter(
                self._file,
                encoder=False,
                mtime=0,
                user="ddm",
                group="ddm",
                format=tarfile.USTAR_FORMAT,
            )
        self._sink.write(entry)
        self._count += 1
        if self._count == self.shard_size:
            self._flush()

    def close(self) -> list[ShardEntry]:
        if self._sink is not None:
            self._flush()
        return self.entries

    def _flush(self) -> None:
        self._sink.close()
        self._file.close()
        key = shard_key(self.split, self.cluster, len(self.entries), self.part, self.generation)
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        self.store.put_file(key, self.path)
        self.entries.append(
            ShardEntry(
                key=key, uri=self.store.url(key), sha256=digest.hexdigest(), count=self._count
            )
        )
        self._sink = self._file = None
        self._count = 0


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, np.float32), allow_pickle=False)
    return buf.getvalue()


def cluster_dataset(
    store: Store | str, cluster: int, split: Split = "train", **kwargs: Any
) -> wds.DataPipeline:
    """Stream ONE cluster's samples as dicts {key, image (C, H, W) float in [-1, 1] (and/or
    latent (c, h, w), see `fields`), label (int, NULL_LABEL when unlabelled), cluster}.
    Only that cluster's shards are ever opened: what an expert job reads."""
    return clusters_dataset(store, [cluster], split, **kwargs)


def clusters_dataset(
    store: Store | str,
    clusters: Sequence[int],
    split: Split = "train",
    *,
    manifest: DatasetManifest | None = None,
    shuffle: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    fields: frozenset[str] = IMAGE,
    select: Callable[[Iterator[dict[str, Any]]], Iterator[dict[str, Any]]] | None = None,
) -> wds.DataPipeline:
    """Stream the samples of the given clusters (see `cluster_dataset`), decoding `fields`
    ("image" and/or "latent").

    With `shuffle`, shard order is shuffled with `seed` (each cluster spread evenly along
    it), OPEN_SHARDS shards are read at once in random interleaving, and a `shuffle`-sample
    buffer (seeded `seed + rank`) mixes further. Shards hold one cluster each: read one after
    another, with a buffer smaller than a shard, a batch would hold one cluster, and a router
    (or monolith) trained on such batches learns the recent batches' cluster, not the
    image's (router accuracy 0.57 at t=0 on Fashion-MNIST, K=8, before this).
    `rank`/`world_size` give each data-parallel worker a disjoint share: whole shards when
    there are at least as many shards as ranks, else every world_size-th sample. `seed` must
    be the same on every rank (the share is cut from the one shuffled order).
    `select`, a stage over the rank's undecoded samples in their final order, keeps what it
    yields and drops the rest before decoding: a data-loader worker keeps its own batches
    there (cluster_jobs/training/loader.py). Shards are not split among data-loader
    workers: a rank's one to four shards would leave most of them idle.
    """
    store = open_store(store) if isinstance(store, str) else store
    manifest = manifest or DatasetManifest.load(store)
    groups: list[list[ShardEntry]] = []
    for cluster in clusters:
        own_prefix = shard_key(split, cluster, 0).rsplit("/", 1)[0] + "/"
        groups.append(list(manifest.shards(split, cluster)))
        for s in groups[-1]:
            if not s.key.startswith(own_prefix):  # isolation: never read another cluster's data
                raise IntegrityError(
                    f"manifest lists {s.key} under cluster {cluster}; re-run prepare"
                )
    shards = _spread_order(groups, seed) if shuffle else [s for g in groups for s in g]
    by_shard = world_size > 1 and len(shards) >= world_size
    if by_shard:
        shards = shards[rank::world_size]
    stages: list[Any] = [
        wds.SimpleShardList([s.key for s in shards]),
        _verified_opener(store, {s.key: s.sha256 for s in shards}),
    ]
    if shuffle:
        stages.append(_interleaved(OPEN_SHARDS, seed))
    else:
        stages += [_tar_expander, wds.tariterators.group_by_keys]
    if world_size > 1 and not by_shard:
        stages.append(_every_nth(rank, world_size))
    if shuffle:
        stages.append(wds.shuffle(shuffle, seed=seed + rank))
    if select is not None:
        stages.append(select)
    allowed = frozenset(clusters)
    stages.append(wds.map(lambda s: _decode_sample(s, allowed, fields)))
    return wds.DataPipeline(*stages)


def _spread_order(groups: list[list[ShardEntry]], seed: int) -> list[ShardEntry]:
    """The clusters' shards (one group per cluster) in random order, each cluster's spread
    evenly along it (the j-th of its n shards lands near position j/n), so that any
    OPEN_SHARDS consecutive ones span the clusters instead of clumping."""
    rng = np.random.default_rng(seed)
    keyed = []
    for group in groups:
        for j, i in enumerate(rng.permutation(len(group))):
            keyed.append(((j + rng.random()) / len(group), group[i]))
    keyed.sort(key=lambda pair: pair[0])
    return [s for _, s in keyed]


def _interleaved(open_at_once: int, seed: int):
    """Samples from up to `open_at_once` shards at a time, the next one drawn from a random
    open shard; a finished shard is replaced by the next in order."""

    def interleave(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = random.Random(seed)
        pending = iter(src)
        live: list[Iterator[dict[str, Any]]] = []
        while True:
            while len(live) < open_at_once and (shard := next(pending, None)) is not None:
                expanded = _tar_expander([shard])
                live.append(wds.tariterators.group_by_keys(expanded))
            if not live:
                return
            i = rng.randrange(len(live))
            sample = next(live[i], None)
            if sample is None:
                live.pop(i)
            else:
                yield sample

    return interleave


def _tar_expander(shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """`wds.tariterators.tar_file_expander` for shards held in memory: the same file dicts
    and end-of-shard markers, read straight from the ustar headers `ShardStream` writes
    (~15x faster per file than `tarfile`: every data-loader worker reads every sample of its
    rank, training/loader.py). A shard in another tar dialect goes through WebDataset's."""
    for shard in shards:
        data = shard["stream"].getvalue()
        files = _ustar_files(data)
        if files is None:
            yield from wds.tariterators.tar_file_expander([shard])
            continue
        for name, start, size in files:
            if not META_FILE.match(name):
                yield {"fname": name, "data": data[start : start + size], "__url__": shard["url"]}
        yield {}


def _ustar_files(data: bytes) -> list[tuple[str, int, int]] | None:
    """(name, offset, size) of each file of a plain ustar archive; None when `data` holds
    anything else (pax or GNU headers, links, base-256 sizes, a truncated member)."""
    files, offset = [], 0
    while offset + TAR_BLOCK <= len(data):
        header = data[offset : offset + TAR_BLOCK]
        if not header.strip(b"\0"):
            return files  # the end-of-archive blocks
        kind, binary_size = header[156:157], header[124] & 0x80
        if header[257:262] != b"ustar" or kind not in (b"0", b"\0") or binary_size:
            return None
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        start = offset + TAR_BLOCK
        if start + size > len(data):
            return None
        files.append(((prefix + b"/" + name if prefix else name).decode(), start, size))
        offset = start + -(-size // TAR_BLOCK) * TAR_BLOCK
    return files


def _every_nth(offset: int, n: int):
    def select(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for i, sample in enumerate(src):
            if i % n == offset:
                yield sample

    return select


def _verified_opener(store: Store, sha_by_key: dict[str, str]):
    def open_shards(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in src:
            key = item["url"]
            data = store.get_verified(key, sha_by_key[key])
            log.info("reading shard %s (%d bytes, sha256 verified)", store.url(key), len(data))
            yield {"url": store.url(key), "stream": io.BytesIO(data)}

    return open_shards


def _decode_sample(
    sample: dict[str, Any], allowed: frozenset[int], fields: frozenset[str] = IMAGE
) -> dict[str, Any]:
    """The sample's `fields` ("image": pixels in [-1, 1]; "latent": its VAE latent), key,
    label and cluster; only what is asked for is decoded (PNG decoding is the cost)."""
    got = int(sample["cluster.txt"])
    if got not in allowed:
        raise IntegrityError(
            f"sample {sample['__key__']} in {sample['__url__']} belongs to cluster {got}, "
            f"not {sorted(allowed)}; re-run prepare"
        )
    out = {
        "key": sample["__key__"],
        "label": int(sample["cls"]) if "cls" in sample else NULL_LABEL,
        "cluster": got,
    }
    if "image" in fields:
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
        out["image"] = to_model_range(pixels[..., None] if pixels.ndim == 2 else pixels)
    if "latent" in fields:
        if "latent.npy" not in sample:
            raise IntegrityError(
                f"sample {sample['__key__']} in {sample['__url__']} has no latent; the "
                "manifest says the shards hold them: re-run `ddm prepare --overwrite`"
            )
        latent = np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False)
        out["latent"] = torch.from_numpy(latent)
    return out
