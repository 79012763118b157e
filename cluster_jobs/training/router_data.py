"""What a router trained on the store's current expert set reads: every expert's own data.

A router predicts, from (x_t, t), which expert's data x_0 came from. With the default
registry that is the cluster of this store's data (labels 0..K-1), read as before. Once
`ddm experts add|remove` changed the registry, the router is trained on the set it lists:
- an expert trained here contributes its cluster of this store, labelled with its id;
- an expert copied in contributes its cluster of the store it was copied from, whose
  dataset must still be the one it was trained on, labelled with its id;
- a removed expert's cluster is not read: its id is never a target.
The router's head then has one output per id below the largest + 1 (ids not in the set get
no data and learn a low probability), and its training.json lists the ids it covers, which
is what tells the service that it covers the set.

The samples of the sources are mixed at random in proportion to their sizes (seeded, the
same on every rank: each source is split among data-parallel ranks like any stream).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cluster_jobs.data.shards import IMAGE, clusters_dataset
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import DDMError
from ddm_nodes.names import split_expert_uri
from ddm_nodes.registry import Registry, load_registry
from ddm_nodes.store import Store, open_store


@dataclass(frozen=True)
class ExpertData:
    """Where expert `expert_id`'s training data is: a cluster of a store."""

    expert_id: int
    store: Store
    manifest: DatasetManifest
    cluster: int

    def count(self, split: Literal["train", "heldout"]) -> int:
        return (self.manifest.train if split == "train" else self.manifest.heldout)[
            self.cluster
        ].count


@dataclass(frozen=True)
class RouterData:
    """The router's training data: this store's clusters of the experts trained here, and
    the copied experts' clusters of their own stores."""

    registry: Registry
    own: list[int]  # clusters of this store (= the ids of the experts trained here)
    copied: list[ExpertData]

    @property
    def experts(self) -> list[int]:
        return self.registry.ids


def router_data(store: Store, manifest: DatasetManifest) -> RouterData | None:
    """None for the default registry (the router reads every cluster, as always)."""
    registry = load_registry(store, manifest)
    if registry.is_default(manifest):
        return None
    own, copied = [], []
    for entry in registry.experts:
        if entry.provenance.source == "trained":
            own.append(entry.cluster)
            continue
        uri = entry.provenance.uri or ""
        found = split_expert_uri(uri)
        if found is None:
            raise DDMError(f"{entry.name}'s provenance URI {uri!r} is not an expert folder")
        source = open_store(found[0])
        theirs = DatasetManifest.load(source)
        if theirs.sha256 != entry.dataset_sha256:
            raise DDMError(
                f"{entry.name} was copied from {uri}, trained on dataset "
                f"{str(entry.dataset_sha256)[:12]}..., and {source.uri} now holds "
                f"{theirs.sha256[:12]}...: its data is gone, so a router cannot learn it; "
                f"remove it (`ddm experts remove`) or add its retrained version"
            )
        copied.append(ExpertData(entry.id, source, theirs, entry.cluster))
    return RouterData(registry, own, copied)


def mixed_samples(
    data: RouterData,
    store: Store,
    manifest: DatasetManifest,
    split: Literal["train", "heldout"],
    *,
    shuffle: int,
    seed: int,
    rank: int,
    world_size: int,
    fields: frozenset[str] = IMAGE,
) -> Iterator[dict[str, Any]]:
    """One epoch of every source's samples, `cluster` set to the expert id they teach."""
    streams: list[Iterator[dict[str, Any]]] = []
    sizes: list[int] = []
    common = dict(shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, fields=fields)
    if data.own:
        streams.append(iter(clusters_dataset(store, data.own, split, manifest=manifest, **common)))
        parts = manifest.train if split == "train" else manifest.heldout
        sizes.append(sum(parts[k].count for k in data.own))
    for src in data.copied:
        samples = clusters_dataset(src.store, [src.cluster], split, manifest=src.manifest, **common)
        streams.append(_labelled(samples, src.expert_id))
        sizes.append(src.count(split))
    yield from _interleaved(streams, sizes, seed)


def _labelled(samples, expert_id: int) -> Iterator[dict[str, Any]]:
    for s in samples:
        yield {**s, "cluster": expert_id}


def _interleaved(
    streams: Sequence[Iterator[dict[str, Any]]], sizes: Sequence[int], seed: int
) -> Iterator[dict[str, Any]]:
    """Samples drawn from the streams at random, each in proportion to what it has left."""
    rng = random.Random(seed)
    left = {i: max(1, n) for i, n in enumerate(sizes)}
    while left:
        (i,) = rng.choices(list(left), weights=list(left.values()))
        try:
            yield next(streams[i])
        except StopIteration:
            del left[i]
            continue
        left[i] = max(1, left[i] - 1)
