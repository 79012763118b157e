"""`ddm prepare`: data -> features -> k-means -> [VAE latents] -> per-cluster WebDataset
shards in a store.

Every model the dataset depends on (a learned feature extractor, a VAE) is loaded before
anything in the store changes, so a bad REF fails with nothing written, and is pinned into
the store beside the shards (pretrained.py).

Write order is what keeps a store consistent: an existing `dataset.json` is removed first,
then shards and the feature space are written, and the new manifest goes last (atomically),
so no manifest ever points at shards that are missing or half-written.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cluster_jobs.data.clustering import cluster_images, heldout_mask
from cluster_jobs.data.shards import write_cluster_shards
from cluster_jobs.data.sources import load_source
from ddm_nodes.dataset_manifest import (
    FEATURES_KEY,
    MANIFEST_KEY,
    SPLIT_PREFIX,
    ClusterShards,
    DatasetManifest,
    FeatureSpec,
)
from ddm_nodes.errors import DDMError
from ddm_nodes.names import PRETRAINED_FOLDER
from ddm_nodes.store import Store, open_store

Progress = Callable[[str, int, int], None]  # (what, done, total)


class PrepareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field("fashion-mnist", description="data source name (see sources.py)")
    count: int | None = Field(
        None, ge=2, description="images: shapes generates this many; others: a seeded subset"
    )
    clusters: int = Field(8, ge=2, description="K: number of data clusters, one expert each")
    store: str = Field(description="store URI: a path, file:///abs/path or s3://bucket/prefix")
    features: str = Field(
        "pca", description="feature space of the clustering: pca | pixels | dinov2:REF | clip:REF"
    )
    feature_dims: int = Field(64, ge=1, le=4096, description="feature dimensions (pca)")
    metric: Literal["euclidean", "cosine"] | None = Field(
        None,
        description="k-means metric; cosine: L2-normalised features, spherical k-means "
        "(default: cosine for dinov2/clip, else euclidean)",
    )
    latents: str | None = Field(
        None,
        description="vae:REF (a folder, a hub id, or 'store': the store's `ddm train vae`): "
        "store VAE latents for the models to train on",
    )
    device: str = Field("cpu", description="where feature extractors and the VAE run")
    batch_size: int = Field(64, ge=1, description="images per feature / VAE batch")
    shard_size: int = Field(2000, ge=1, description="samples per WebDataset shard at most")
    seed: int = Field(0, ge=0, description="seeds PCA, k-means and the held-out split")
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="per-cluster held-out share")
    image_size: int | None = Field(None, ge=4, le=4096, description="resize to a square side")
    silhouette_sample: int = Field(5000, ge=2, description="images the silhouette uses")
    overwrite: bool = Field(False, description="replace a dataset already in the store")
    workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        description="processes that encode and write shards",
    )


@dataclass
class PrepareResult:
    manifest: DatasetManifest
    seconds: dict[str, float] = field(default_factory=dict)


def prepare(cfg: PrepareConfig, progress: Progress | None = None) -> PrepareResult:
    progress = progress or (lambda what, done, total: None)
    clock = _Clock()
    store = open_store(cfg.store)
    store.check()
    if store.exists(MANIFEST_KEY) and not cfg.overwrite:
        raise DDMError(
            f"store {store.uri} already holds a prepared dataset; pass --overwrite to replace it"
        )

    progress("load", 0, 1)
    data = load_source(cfg.dataset, cfg.image_size, count=cfg.count, seed=cfg.seed)
    clock.lap("load")
    codec = _vae(cfg, store) if cfg.latents else None
    latent_shape = None if codec is None else codec.latent_shape(data.images.shape[1:])
    progress("cluster", 0, 1)
    clustering = cluster_images(
        data.images,
        cfg.clusters,
        cfg.features,
        cfg.feature_dims,
        cfg.seed,
        cfg.silhouette_sample,
        metric=cfg.metric,
        device=cfg.device,
        batch_size=cfg.batch_size,
    )
    clock.lap("cluster")
    latents = None
    if codec is not None:
        latents = _encode(codec, data.images, progress)
        clock.lap("encode")
    held = heldout_mask(clustering.assignments, cfg.heldout_fraction, cfg.seed)

    # Invalidate first: from here until the new manifest lands, the store has none.
    store.delete([MANIFEST_KEY])
    stale = [k for prefix in SPLIT_PREFIX.values() for k in store.list(prefix + "/")]
    store.delete(stale + [FEATURES_KEY] + store.list(PRETRAINED_FOLDER + "/"))

    # Samples inside a cluster are written in a seeded random order, so a reader's
    # shuffle buffer starts from mixed data rather than the source's order.
    rng = np.random.default_rng(cfg.seed)
    tasks = []
    for c in range(cfg.clusters):
        for split, in_split in (("train", ~held), ("heldout", held)):
            idx = rng.permutation(np.flatnonzero((clustering.assignments == c) & in_split))
            labels = data.labels[idx].tolist() if data.labels is not None else None
            keys = [f"{i:08d}" for i in idx]
            z = None if latents is None else latents[idx]
            tasks.append((cfg.store, split, c, keys, data.images[idx], labels, cfg.shard_size, z))
    splits: dict[str, list[ClusterShards]] = {"train": [], "heldout": []}
    # PNG encoding and tar writing are pure-Python bound: one process per core.
    with _pool(min(cfg.workers, len(tasks))) as pool:
        for done, (task, shards) in enumerate(
            zip(tasks, pool.map(_write_task, tasks), strict=True), 1
        ):
            splits[task[1]].append(shards)
            progress("write shards", done, len(tasks))
    clock.lap("write")

    features_sha, features_model = clustering.space.save(store)
    latent_spec = None if codec is None else codec.pin(store, latent_shape)
    h, w, ch = data.images.shape[1:]
    manifest = DatasetManifest(
        source=data.source,
        image_shape=(h, w, ch),
        channels=ch,
        count=len(data),
        num_clusters=cfg.clusters,
        class_names=data.class_names,
        features=FeatureSpec(
            method=clustering.space.extractor.method,
            dims=clustering.space.extractor.dims,
            params=clustering.space.extractor.params(),
            metric=clustering.space.metric,
            model=features_model,
            sha256=features_sha,
        ),
        latents=latent_spec,
        seed=cfg.seed,
        heldout_fraction=cfg.heldout_fraction,
        stats=clustering.stats,
        train=splits["train"],
        heldout=splits["heldout"],
    )
    manifest.save(store)
    clock.lap("manifest")
    return PrepareResult(manifest, clock.laps)


def _vae(cfg: PrepareConfig, store: Store):
    """The VAE `--latents vae:REF` names, loaded (DDMError naming REF when it cannot be)."""
    from ddm_nodes.latents import LatentCodec

    kind, _, ref = (cfg.latents or "").partition(":")
    if kind != "vae" or not ref:
        raise DDMError(f"--latents {cfg.latents!r}: expected vae:FOLDER, vae:HUB_ID or vae:store")
    if ref == "store":
        return LatentCodec.from_store_vae(store, cfg.device, cfg.batch_size)
    return LatentCodec.from_ref(ref, cfg.device, cfg.batch_size)


def _encode(codec, images: np.ndarray, progress: Progress) -> np.ndarray:
    """Scaled latents (N, c, h, w) float32 of every image, in batches."""
    from ddm_nodes.pixels import to_model_range

    chunk = 1024
    out = []
    for i in range(0, len(images), chunk):
        out.append(codec.encode(to_model_range(images[i : i + chunk])).numpy())
        progress("encode latents", min(i + chunk, len(images)), len(images))
    return np.concatenate(out)


def _write_task(task: tuple) -> ClusterShards:
    store_uri, *args = task
    return write_cluster_shards(open_store(store_uri), *args)


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[Any]:
    """A process pool, or the calling process itself for one worker."""
    if workers <= 1:
        yield builtins
        return
    # fork: workers inherit the imported modules instead of re-importing torch (seconds).
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        yield pool


class _Clock:
    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 3)
        self.laps["total"] = round(now - self.start, 3)
        self.last = now
