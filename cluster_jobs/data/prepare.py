"""`ddm prepare`: data -> features -> k-means -> [VAE latents] -> per-cluster WebDataset
shards in a store, streamed (passes.py): memory depends on the batch, shard and fitting
sample sizes, not on the number of images.

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
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from threadpoolctl import threadpool_limits

from cluster_jobs.data.clustering import cluster_images, heldout_mask
from cluster_jobs.data.passes import (
    Centroids,
    WritePlan,
    assign_part,
    fit_indices,
    part_size,
    read_sample,
    write_part,
)
from cluster_jobs.data.sources import Part, Source, open_source
from ddm_nodes.dataset_manifest import (
    FEATURES_KEY,
    MANIFEST_KEY,
    SPLIT_PREFIX,
    ClusterShards,
    DatasetManifest,
    FeatureSpec,
    ShardEntry,
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
        description="processes that encode and write shards (local engine)",
    )
    engine: Literal["local", "ray"] = Field(
        "local",
        description="local: this process and a process pool; ray: Ray Data on the current "
        "Ray cluster (`ddm cluster up`, RAY_ADDRESS), else a local Ray",
    )
    fit_sample: int | None = Field(
        None,
        ge=2,
        description="images the feature transform and k-means are fitted on "
        "(default: 256 per cluster, at least 4 per --feature-dims)",
    )


@dataclass
class PrepareResult:
    manifest: DatasetManifest
    seconds: dict[str, float] = field(default_factory=dict)  # per phase, and the total
    sizes: dict[str, int] = field(default_factory=dict)  # images, parts, write_nodes


def prepare(cfg: PrepareConfig, progress: Progress | None = None) -> PrepareResult:
    progress = progress or (lambda what, done, total: None)
    clock = _Clock()
    store = open_store(cfg.store)
    store.check()
    if store.exists(MANIFEST_KEY) and not cfg.overwrite:
        raise DDMError(
            f"store {store.uri} already holds a prepared dataset; pass --overwrite to replace it"
        )

    progress("scan", 0, 1)
    source = open_source(cfg.dataset, cfg.image_size, count=cfg.count, seed=cfg.seed)
    if not 2 <= cfg.clusters <= len(source):
        raise DDMError(
            f"--clusters {cfg.clusters} is out of range: use 2 <= K <= {len(source)} "
            "(the number of images)"
        )
    codec = _vae(cfg, store) if cfg.latents else None
    latent_shape = None if codec is None else codec.latent_shape(source.image_shape)
    parts = source.parts(part_size(cfg.clusters, cfg.shard_size), cfg.seed)
    engine = _engine(cfg)
    clock.lap("scan")

    wanted = fit_indices(source.kept, cfg.clusters, cfg.fit_sample, cfg.seed, cfg.feature_dims)
    got = [engine.sample(source, parts, wanted, progress)]
    order = np.argsort(got[0][0], kind="stable")
    sample_images = got[0][1][order]
    del got
    clock.lap("sample")
    progress("fit", 0, 1)
    clustering = cluster_images(
        sample_images,
        cfg.clusters,
        cfg.features,
        cfg.feature_dims,
        cfg.seed,
        cfg.silhouette_sample,
        metric=cfg.metric,
        device=cfg.device,
        batch_size=cfg.batch_size,
    )
    del sample_images
    clock.lap("fit")

    # One small integer per image, by position in source.kept: the whole plan in memory.
    clusters = np.full(len(source), -1, np.int64)
    inertia = 0.0
    centroids = Centroids(clustering.space, clustering.centers)
    for idx, labels, costs in engine.assign(source, parts, centroids, progress):
        clusters[np.searchsorted(source.kept, idx)] = labels
        inertia += float(costs.sum())
    if (clusters < 0).any():
        raise DDMError(f"{int((clusters < 0).sum())} images were not read back; re-run prepare")
    counts = np.bincount(clusters, minlength=cfg.clusters)
    if counts.min() == 0:
        raise DDMError(
            f"k-means left {int((counts == 0).sum())} of {cfg.clusters} clusters empty (too few "
            "distinct images): use fewer --clusters"
        )
    clock.lap("assign")
    held = heldout_mask(clusters, cfg.heldout_fraction, cfg.seed)

    # Over a prepared store the new files go beside the old ones, under a generation of
    # their own, and dataset.json (the one pointer to them) is replaced last: until then
    # the old data set stays whole and servable, and a run killed half-way leaves it so.
    generation = uuid.uuid4().hex[:8] if store.exists(MANIFEST_KEY) else None
    # pinned before the shards: every writer encodes with the store's verified copy
    latent_spec = None if codec is None else codec.pin(store, latent_shape)
    plans = []
    for part in parts:
        at = np.searchsorted(source.kept, part.indices)
        plans.append(WritePlan(clusters[at], held[at], generation))
    written: dict[tuple[str, int], list[ShardEntry]] = {}
    for entries in engine.write(source, parts, plans, latent_spec, progress):
        for split, c, entry in entries:
            written.setdefault((split, c), []).append(entry)
    splits = {
        split: [
            ClusterShards(
                cluster=c,
                count=sum(e.count for e in written.get((split, c), [])),
                shards=sorted(written.get((split, c), []), key=lambda e: e.key),
            )
            for c in range(cfg.clusters)
        ]
        for split in ("train", "heldout")
    }
    clock.lap("write")

    features_key = FEATURES_KEY if generation is None else f"features-{generation}.safetensors"
    features_sha, features_model = clustering.space.save(store, features_key)
    h, w, ch = source.image_shape
    manifest = DatasetManifest(
        source=source.name,
        image_shape=(h, w, ch),
        channels=ch,
        count=len(source),
        num_clusters=cfg.clusters,
        class_names=source.class_names,
        class_domains=source.class_domains,
        features=FeatureSpec(
            method=clustering.space.extractor.method,
            dims=clustering.space.extractor.dims,
            params=clustering.space.extractor.params(),
            metric=clustering.space.metric,
            model=features_model,
            sha256=features_sha,
            key=features_key,
        ),
        latents=latent_spec,
        seed=cfg.seed,
        heldout_fraction=cfg.heldout_fraction,
        stats=clustering.stats.model_copy(
            update={
                "counts": counts.tolist(),
                "largest_smallest_ratio": float(counts.max() / counts.min()),
                # 6 significant digits: the float sum's order depends on the parts
                "inertia": float(f"{inertia:.6g}"),
            }
        ),
        train=splits["train"],
        heldout=splits["heldout"],
    )
    manifest.save(store)
    _delete_unlisted(store, manifest)
    clock.lap("manifest")
    sizes = {"images": len(source), "parts": len(parts), "write_nodes": len(engine.nodes)}
    return PrepareResult(manifest, clock.laps, sizes)


def _delete_unlisted(store, manifest: DatasetManifest) -> None:
    """Once the new dataset.json is in place: every shard, feature file and pinned model
    file it does not list (an older generation's, or a killed run's)."""
    splits = (manifest.train, manifest.heldout)
    listed = {s.key for split in splits for c in split for s in c.shards}
    listed.add(manifest.features.key)
    for pinned in (manifest.features.model, manifest.latents and manifest.latents.vae):
        if pinned is not None:
            listed |= {f"{pinned.prefix}/{name}" for name in pinned.files}
    candidates = [k for prefix in SPLIT_PREFIX.values() for k in store.list(prefix + "/")]
    candidates += [k for k in store.list("features") if k.endswith(".safetensors")]
    candidates += store.list(PRETRAINED_FOLDER + "/")
    store.delete([k for k in candidates if k not in listed])


def _engine(cfg: PrepareConfig):
    if cfg.engine == "ray":
        from cluster_jobs.data.ray_engine import RayEngine

        return RayEngine(cfg)
    return LocalEngine(cfg)


class LocalEngine:
    """This process reads and embeds; a process pool (one per core) writes, since PNG
    encoding and tar writing are pure-Python bound."""

    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg
        self.nodes = {"this machine"}

    def sample(self, source: Source, parts: list[Part], wanted: np.ndarray, progress: Progress):
        got = []
        for done, part in enumerate(parts, 1):
            got.append(read_sample(source, part, wanted, self.cfg.batch_size))
            progress("sample", done, len(parts))
        return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])

    def assign(self, source: Source, parts: list[Part], centroids: Centroids, progress: Progress):
        with threadpool_limits(1, user_api="blas"):
            for done, part in enumerate(parts, 1):
                yield assign_part(source, part, centroids, self.cfg.batch_size)
                progress("assign", done, len(parts))

    def write(self, source, parts, plans, latents, progress: Progress):
        cfg = self.cfg
        tasks = [
            (cfg.store, source, part, plan, cfg.shard_size, cfg.batch_size, latents, cfg.device)
            for part, plan in zip(parts, plans, strict=True)
        ]
        with _pool(min(cfg.workers, len(tasks))) as pool:
            for done, entries in enumerate(pool.map(_write_task, tasks), 1):
                yield entries
                progress("write shards", done, len(tasks))


def _vae(cfg: PrepareConfig, store: Store):
    """The VAE `--latents vae:REF` names, loaded (DDMError naming REF when it cannot be)."""
    from ddm_nodes.latents import LatentCodec

    kind, _, ref = (cfg.latents or "").partition(":")
    if kind != "vae" or not ref:
        raise DDMError(f"--latents {cfg.latents!r}: expected vae:FOLDER, vae:HUB_ID or vae:store")
    if ref == "store":
        return LatentCodec.from_store_vae(store, cfg.device, cfg.batch_size)
    return LatentCodec.from_ref(ref, cfg.device, cfg.batch_size)


def _write_task(task: tuple) -> list:
    return write_part(*task)


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
