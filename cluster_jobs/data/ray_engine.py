"""`ddm prepare --engine ray`: the passes of passes.py on Ray Data, over the current Ray
cluster (RAY_ADDRESS, else the one `ddm cluster up` started, else a Ray of its own).

Each pass is a Ray Dataset of part numbers mapped by the pass's function: reading the
sample and writing shards as tasks, embedding as an actor pool (one fitted feature space
per actor, a GPU each with `--device cuda`). The source's description and each part's
write plan travel through the object store; images never reach the driver but the fitting
sample's. Every node needs the ddm package and the store's credentials, nothing else:
shards go from the writing task straight to the store (docs/decisions.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from cluster_jobs.data.passes import (
    Centroids,
    WritePlan,
    assign_part,
    read_sample,
    write_part,
)
from cluster_jobs.data.sources import Part, Source
from ddm_nodes.dataset_manifest import LatentSpec, ShardEntry


class RayEngine:
    def __init__(self, cfg):
        self.cfg = cfg
        _connect()
        import ray

        # what the passes may use at once: the cluster's CPUs (or GPUs) as Ray counts them
        total = ray.cluster_resources()
        self.slots = max(1, int(total.get("GPU" if cfg.device == "cuda" else "CPU", 1)))
        self.nodes: set[str] = set()  # the Ray nodes that wrote shards

    def _parts(self, parts: list[Part]):
        import ray.data

        return ray.data.from_items(
            [{"part": p.number} for p in parts], override_num_blocks=len(parts)
        )

    def sample(self, source: Source, parts: list[Part], wanted: np.ndarray, progress):
        ds = self._actors(_ReadSample, source, parts, wanted, gpus=0)
        idx, images = [], []
        for done, batch in enumerate(ds.iter_batches(batch_size=1, batch_format="numpy"), 1):
            idx.append(batch["index"][0])
            images.append(batch["images"][0])
            progress("sample", done, len(parts))
        return np.concatenate(idx), np.concatenate(images)

    def assign(
        self, source: Source, parts: list[Part], centroids: Centroids, progress
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        gpus = 1 if self.cfg.device == "cuda" else 0
        ds = self._actors(_Assign, source, parts, centroids, gpus=gpus)
        for done, batch in enumerate(ds.iter_batches(batch_size=1, batch_format="numpy"), 1):
            yield batch["index"][0], batch["cluster"][0], batch["cost"][0]
            progress("assign", done, len(parts))

    def _actors(self, cls, source: Source, parts: list[Part], given: Any, gpus: int):
        """Part numbers mapped by an actor pool of `cls(source, parts, given, batch_size)`."""
        import ray
        import ray.data

        return self._parts(parts).map_batches(
            cls,
            batch_size=1,
            num_cpus=1,
            num_gpus=gpus,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(len(parts), self.slots)),
            fn_constructor_kwargs={
                "source": ray.put(source),
                "parts": ray.put(parts),
                "given": ray.put(given),
                "batch_size": self.cfg.batch_size,
            },
        )

    def write(
        self,
        source: Source,
        parts: list[Part],
        plans: list[WritePlan],
        latents: LatentSpec | None,
        progress,
    ) -> Iterator[list[tuple[str, int, ShardEntry]]]:
        import ray

        cfg = self.cfg
        ds = self._parts(parts).map_batches(
            _write,
            batch_size=1,
            num_cpus=1,
            num_gpus=1 if cfg.device == "cuda" and latents is not None else 0,
            fn_kwargs={
                "source": ray.put(source),
                "parts": ray.put(parts),
                "plans": [ray.put(p) for p in plans],
                "options": (cfg.store, cfg.shard_size, cfg.batch_size, latents, cfg.device),
            },
        )
        for done, batch in enumerate(ds.iter_batches(batch_size=1, batch_format="numpy"), 1):
            self.nodes.add(str(batch["node"][0]))
            yield [
                (s, c, ShardEntry.model_validate(e)) for s, c, e in json.loads(batch["shards"][0])
            ]
            progress("write shards", done, len(parts))


def _connect() -> None:
    from cluster_jobs.ops.local_cluster import connect

    # before Ray is imported here: which cluster, and its token auth, are settled first
    connect(logging_level="ERROR", log_to_driver=False)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


class _ReadSample:
    def __init__(self, source, parts, given, batch_size: int):
        import ray

        self.source, self.parts = ray.get(source), ray.get(parts)
        self.wanted, self.batch_size = ray.get(given), batch_size  # sorted sample indices

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        part = self.parts[int(batch["part"][0])]
        idx, images = read_sample(self.source, part, self.wanted, self.batch_size)
        return {"index": _one(idx), "images": _one(images)}


class _Assign:
    """An actor holding the fitted feature space: a learned extractor loads once."""

    def __init__(self, source, parts, given, batch_size: int):
        import ray
        import torch

        torch.set_num_threads(1)  # one actor per core
        self.source, self.parts = ray.get(source), ray.get(parts)
        self.centroids, self.batch_size = ray.get(given), batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        part = self.parts[int(batch["part"][0])]
        idx, clusters, costs = assign_part(self.source, part, self.centroids, self.batch_size)
        return {"index": _one(idx), "cluster": _one(clusters), "cost": _one(costs)}


def _write(batch: dict[str, Any], source, parts, plans, options) -> dict[str, Any]:
    import ray

    n = int(batch["part"][0])
    store, shard_size, batch_size, latents, device = options
    part = ray.get(parts)[n]
    entries = write_part(
        store, ray.get(source), part, ray.get(plans[n]), shard_size, batch_size, latents, device
    )
    rows = [(s, c, e.model_dump()) for s, c, e in entries]
    node = ray.get_runtime_context().get_node_id()
    return {"shards": np.array([json.dumps(rows)], dtype=object), "node": np.array([node])}


def _one(array: np.ndarray) -> np.ndarray:
    """A batch of one row holding the whole array (rows differ in length between parts)."""
    out = np.empty(1, dtype=object)
    out[0] = array
    return out
