"""The streaming passes of `ddm prepare`, each a function of one part of the source, so the
local engine (one process and a process pool) and the Ray engine (Ray Data over the
cluster) run the same code and give the same cluster to every image:

    sample   read the seeded fitting sample (the only images held at once)
    assign   embed every image and take its nearest centroid
    write    encode (PNG, VAE latent) and stream each sample into its cluster's shards

Between them, the driver fits the feature transform and k-means on the sample and draws
the held-out split from the assignments: one small integer per image, never an image.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from cluster_jobs.data.shards import ShardStream, sample
from cluster_jobs.data.sources import Part, Source
from ddm_nodes.dataset_manifest import LatentSpec, ShardEntry, Split
from ddm_nodes.features import FeatureSpace
from ddm_nodes.pixels import to_model_range
from ddm_nodes.store import open_store

# The fitting sample, after faiss's rule (at most 256 points per centroid): more moves
# centroids by less than k-means' own seed-to-seed spread (docs/decisions.md). PCA gets at
# least SAMPLE_PER_DIM images per dimension it keeps.
SAMPLE_PER_CLUSTER = 256
SAMPLE_PER_DIM = 4


def fit_size(k: int, dims: int) -> int:
    return max(SAMPLE_PER_CLUSTER * k, SAMPLE_PER_DIM * dims)


def fit_indices(
    kept: np.ndarray, k: int, sample: int | None, seed: int, dims: int = 64
) -> np.ndarray:
    """The sorted source indices the feature transform and k-means are fitted on."""
    size = min(len(kept), sample or fit_size(k, dims))
    if size == len(kept):
        return kept
    return np.sort(np.random.default_rng([seed, 2]).choice(kept, size, replace=False))


def part_size(k: int, shard_size: int) -> int:
    """Images per part: enough that each of its K clusters fills about one train shard."""
    return k * shard_size


def read_sample(source: Source, part: Part, wanted: np.ndarray, batch_size: int):
    """(indices, images) of the part's images in `wanted` (sorted)."""
    got = list(source.read(part, batch_size, only=wanted))
    if not got:
        h, w, c = source.image_shape
        return np.zeros(0, np.int64), np.zeros((0, h, w, c), np.uint8)
    return np.concatenate([b.indices for b in got]), np.concatenate([b.images for b in got])


@dataclass(frozen=True)
class Centroids:
    """What assigning needs: the fitted space and its centroids in float64, as k-means
    fitted them (the float32 copy in the store rounds ties differently)."""

    space: FeatureSpace
    centers: np.ndarray  # (K, D) float64


def assign_part(source: Source, part: Part, centroids: Centroids, batch_size: int):
    """(indices, clusters, costs) of every image of the part: its nearest centroid and its
    k-means cost (squared distance, or 1 - cosine)."""
    out = ([], [], [])
    with torch.inference_mode():
        for batch in source.read(part, batch_size):
            z = centroids.space.embed(to_model_range(batch.images)).double().numpy()
            clusters, costs = nearest(z, centroids.centers, centroids.space.metric)
            for acc, value in zip(out, (batch.indices, clusters, costs), strict=True):
                acc.append(value)
    if not out[0]:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return tuple(np.concatenate(acc) for acc in out)


def nearest(z: np.ndarray, centers: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    if metric == "cosine":
        sims = z @ centers.T
        best = sims.argmax(axis=1)
        return best.astype(np.int64), 1 - sims[np.arange(len(z)), best]
    d2 = (z * z).sum(1)[:, None] - 2 * z @ centers.T + (centers * centers).sum(1)[None, :]
    best = d2.argmin(axis=1)
    return best.astype(np.int64), np.maximum(d2[np.arange(len(z)), best], 0.0)


@dataclass(frozen=True)
class WritePlan:
    """Where each image of a part goes, aligned with `part.indices`."""

    clusters: np.ndarray  # int64
    heldout: np.ndarray  # bool
    generation: str | None = None  # prepare --overwrite's: new shards beside the old ones


def write_part(
    store_uri: str,
    source: Source,
    part: Part,
    plan: WritePlan,
    shard_size: int,
    batch_size: int,
    latents: LatentSpec | None,
    device: str,
) -> list[tuple[Split, int, ShardEntry]]:
    """Stream the part's images into per-(split, cluster) shards named after the part;
    returns (split, cluster, entry) of every shard written."""
    store = open_store(store_uri)
    codec = None if latents is None else _codec(store_uri, latents.model_dump_json(), device)
    where = {int(i): n for n, i in enumerate(part.indices)}
    streams: dict[tuple[Split, int], ShardStream] = {}
    with tempfile.TemporaryDirectory(prefix="ddm-prepare-") as folder:
        for batch in source.read(part, batch_size):
            z = None
            if codec is not None:
                with torch.inference_mode():
                    z = codec.encode(to_model_range(batch.images)).cpu().numpy()
            for j, index in enumerate(batch.indices):
                n = where[int(index)]
                split: Split = "heldout" if plan.heldout[n] else "train"
                c = int(plan.clusters[n])
                key = (split, c)
                if key not in streams:
                    streams[key] = ShardStream(
                        store, split, c, shard_size, folder, part.number, plan.generation
                    )
                label = None if batch.labels is None else int(batch.labels[j])
                streams[key].add(
                    sample(f"{index:08d}", batch.images[j], c, label, None if z is None else z[j])
                )
        return [(s, c, e) for (s, c), stream in sorted(streams.items()) for e in stream.close()]


@lru_cache(maxsize=1)
def _codec(store_uri: str, spec_json: str, device: str):
    """The dataset's pinned VAE, loaded once per process that writes."""
    from ddm_nodes.latents import LatentCodec

    return LatentCodec.load(
        open_store(store_uri), LatentSpec.model_validate_json(spec_json), device
    )
