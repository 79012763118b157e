"""The training input pipeline: a rank's batches decoded in data-loader worker processes, so
that decoding PNGs in the training process does not cap the accelerator (one process
decodes a few thousand small images a second).

Every loader worker reads the rank's whole shard stream (fetched, sha256-verified,
interleaved and shuffled exactly as one process reads it) and decodes and collates only its
own batches: batch g of the endless stream belongs to worker g % workers, and the samples of
the other workers' batches are dropped before they are decoded. The DataLoader takes one
batch from each worker in turn, so the batches that cross the process boundary arrive in
the order of the one-process stream: the same batches, the same clusters mixed in each, the
same shares of the data-parallel ranks, for any number of loader workers (0: no worker
process, the rank decodes its batches itself). Reading a sample it drops costs a worker a
tar header (shards.py reads them directly), a tenth of decoding a small PNG; the price is
that every worker fetches every shard of its rank (n times the bytes from the store).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cluster_jobs.data.shards import IMAGE, clusters_dataset
from cluster_jobs.training.config import TrainConfig
from cluster_jobs.training.router_data import RouterData, mixed_samples
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import DDMError
from ddm_nodes.store import Store

log = logging.getLogger("ddm.train")
MAX_AUTO_WORKERS = 8  # auto's cap: every worker also reads every sample of its rank
PREFETCH_PER_WORKER = 2  # batches each worker keeps ready
EPOCH_SEED_STRIDE = 7919  # epoch e reshuffles with seed + e * EPOCH_SEED_STRIDE


def loader_workers(cfg: TrainConfig, rank_cpus: Callable[[], float] | None = None) -> int:
    """`cfg.loader_workers`, or when left to auto: none on the CPU (the training threads use
    the cores), else up to MAX_AUTO_WORKERS of the CPUs a rank has beyond its
    `cpus_per_worker` (`rank_cpus()`, asked only then; default: this process's CPUs)."""
    if cfg.loader_workers is not None:
        return cfg.loader_workers
    if cfg.device == "cpu":
        return 0
    cpus = rank_cpus() if rank_cpus is not None else len(os.sched_getaffinity(0))
    return max(0, min(MAX_AUTO_WORKERS, math.floor(cpus - cfg.cpus_per_worker)))


def loader_batches(
    cfg: TrainConfig,
    store: Store,
    manifest: DatasetManifest,
    clusters: Sequence[int],
    rank: int = 0,
    world: int = 1,
    split: Literal["train", "heldout"] = "train",
    fields: frozenset[str] = IMAGE,
    mixed: RouterData | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of `clusters`' samples (this rank's share, its `fields` decoded),
    reshuffled every epoch, decoded in `loader_workers(cfg)` worker processes. `mixed`: a
    router's data over several stores (router_data.py) instead, decoded in this process
    (its sources are interleaved after decoding, where loader workers cannot split it)."""
    batches = RankBatches(cfg, store, manifest, clusters, rank, world, split, fields, mixed)
    workers = 0 if mixed is not None else loader_workers(cfg)
    if workers == 0:
        yield from batches
        return
    log.info("%s: rank %d decodes its batches in %d loader workers", cfg.name, rank, workers)
    yield from DataLoader(
        batches,
        batch_size=None,  # the workers collate: batches cross the process boundary
        num_workers=workers,
        pin_memory=cfg.device == "cuda",
        prefetch_factor=PREFETCH_PER_WORKER,
        worker_init_fn=_quiet_unless_first,
        # the stream is endless and iterated once: there is no next epoch to keep workers for
        persistent_workers=False,
    )


class RankBatches(IterableDataset):
    """One rank's endless batches; in a data-loader worker, only that worker's batches."""

    def __init__(
        self,
        cfg: TrainConfig,
        store: Store,
        manifest: DatasetManifest,
        clusters: Sequence[int],
        rank: int,
        world: int,
        split: Literal["train", "heldout"],
        fields: frozenset[str] = IMAGE,
        mixed: RouterData | None = None,
    ):
        self.cfg, self.store, self.manifest = cfg, store, manifest
        self.clusters, self.rank, self.world, self.split = list(clusters), rank, world, split
        self.fields, self.mixed = fields, mixed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.mixed is not None:
            yield from self._mixed_epochs(self.mixed)
            return
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        size = self.cfg.batch_size
        epoch, first = 0, 0  # `first`: the stream's index of the epoch's first batch
        while True:
            own = OwnBatches(first, size, worker, workers)
            samples = clusters_dataset(
                self.store,
                self.clusters,
                self.split,
                manifest=self.manifest,
                shuffle=self.cfg.shuffle_buffer,
                seed=self.cfg.seed + EPOCH_SEED_STRIDE * epoch,  # the same on every rank
                rank=self.rank,
                world_size=self.world,
                fields=self.fields,
                select=own,
            )
            for chunk in _chunks(samples, size):
                # a short last batch is only used when the data holds less than one batch
                if len(chunk) == size or own.count < size:
                    yield collate(chunk)
            if own.count == 0:
                raise DDMError(f"{self.cfg.name}: no training samples in {self.store.uri}")
            first += max(1, own.count // size)  # the batches this epoch yielded
            epoch += 1

    def _mixed_epochs(self, data: RouterData) -> Iterator[dict[str, torch.Tensor]]:
        size, epoch = self.cfg.batch_size, 0
        while True:
            samples = mixed_samples(
                data,
                self.store,
                self.manifest,
                self.split,
                shuffle=self.cfg.shuffle_buffer,
                seed=self.cfg.seed + EPOCH_SEED_STRIDE * epoch,
                rank=self.rank,
                world_size=self.world,
                fields=self.fields,
            )
            seen = 0
            for chunk in _chunks(samples, size):
                if len(chunk) == size or seen < size:  # short: only a data set under a batch
                    yield collate(chunk)
                seen += len(chunk)
            if seen == 0:
                raise DDMError(f"{self.cfg.name}: no training samples for the router's experts")
            epoch += 1


class OwnBatches:
    """Pipeline stage: of the undecoded samples of one epoch, those of the batches
    `first`, `first + 1`, ... that belong to `worker` (batch g is worker g % workers');
    `count` is how many samples went by, kept or not."""

    def __init__(self, first: int, size: int, worker: int, workers: int):
        self.first, self.size, self.worker, self.workers = first, size, worker, workers
        self.count = 0

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        self.count = 0
        for sample in src:
            if (self.first + self.count // self.size) % self.workers == self.worker:
                yield sample
            self.count += 1


def batched(samples: Iterable[dict[str, Any]], size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of `size` samples; the last one may be smaller."""
    for chunk in _chunks(samples, size):
        yield collate(chunk)


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """One batch from sample dicts: tensors and arrays stacked, ints as a long tensor; other
    values (the sample's key) are left out."""
    batch: dict[str, torch.Tensor] = {}
    for name, value in samples[0].items():
        values = [s[name] for s in samples]
        if isinstance(value, torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(value, np.ndarray):
            batch[name] = torch.from_numpy(np.stack(values))
        elif isinstance(value, int | np.integer):
            batch[name] = torch.tensor(values, dtype=torch.long)
    return batch


def _chunks(samples: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _quiet_unless_first(worker: int) -> None:
    """Every loader worker reads every shard; one of them says so in the log."""
    if worker > 0:
        logging.getLogger(clusters_dataset.__module__).setLevel(logging.WARNING)
