"""`dataset.json`: what `ddm prepare` wrote into a store, and the only way to find it.

The manifest is written last and atomically, so a store either has a complete, consistent
dataset or none. Every shard it lists carries the sha256 and sample count it was written
with; readers verify them and refuse a shard that changed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from ddm_nodes import __version__
from ddm_nodes.errors import ManifestError
from ddm_nodes.pretrained import PinnedModel
from ddm_nodes.store import Store, sha256_bytes
from ddm_nodes.versioned_json import parse_versioned

NULL_LABEL = -1  # an unlabelled sample; also the dropped ("null") class of guidance
MANIFEST_KEY = "dataset.json"
FEATURES_KEY = "features.safetensors"
FORMAT_VERSION = 1
Split = Literal["train", "heldout"]
SPLIT_PREFIX: dict[str, str] = {"train": "shards", "heldout": "heldout"}


def shard_key(
    split: Split,
    cluster: int,
    index: int,
    part: int | None = None,
    generation: str | None = None,
) -> str:
    """Where a cluster's shard lives; `part` names the prepare task that wrote it, since
    tasks write the shards of every cluster in parallel; `generation` the `prepare
    --overwrite` run, whose shards must not replace the ones the old dataset.json lists."""
    name = f"shard-{index:06d}" if part is None else f"shard-{part:05d}-{index:05d}"
    if generation is not None:
        name = f"{generation}-{name}"
    return f"{SPLIT_PREFIX[split]}/cluster-{cluster:03d}/{name}.tar"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardEntry(_Strict):
    key: str = Field(description="path under the store root; what readers open")
    uri: str = Field(description="absolute URI where the shard was written")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    count: int = Field(ge=1, description="samples in the shard")


class ClusterShards(_Strict):
    cluster: int = Field(ge=0)
    count: int = Field(ge=0, description="samples over all of this cluster's shards")
    shards: list[ShardEntry]

    @model_validator(mode="after")
    def _counts_add_up(self) -> ClusterShards:
        if sum(s.count for s in self.shards) != self.count:
            raise ValueError(f"cluster {self.cluster}: shard counts do not add up to {self.count}")
        return self


class FeatureSpec(_Strict):
    method: str = Field(description="feature extractor name: pca, pixels, dinov2 or clip")
    dims: int = Field(ge=1)
    params: dict[str, Any] = Field(default_factory=dict)
    metric: Literal["euclidean", "cosine"] = Field(
        "euclidean", description="cosine: L2-normalised features, spherical k-means"
    )
    model: PinnedModel | None = Field(None, description="a learned extractor's pinned weights")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of features.safetensors")
    key: str = Field(FEATURES_KEY, description="where the feature transform and centroids are")


class LatentSpec(_Strict):
    """The VAE whose latents the shards hold: z = (mean(E(x)) - shift) * scale."""

    vae: PinnedModel
    shape: tuple[int, int, int] = Field(description="(height, width, channels) of a latent")
    scaling_factor: float = Field(gt=0)
    shift_factor: float = 0.0


class ClusterStats(_Strict):
    counts: list[int] = Field(description="images per cluster, both splits")
    largest_smallest_ratio: float
    silhouette: float | None = Field(ge=-1, le=1, description="None where undefined")
    silhouette_sample: int = Field(ge=2)
    inertia: float


class DatasetManifest(_Strict):
    format_version: int = FORMAT_VERSION
    source: str
    image_shape: tuple[int, int, int] = Field(description="(height, width, channels)")
    channels: int = Field(ge=1)
    count: int = Field(ge=2, description="images over both splits")
    num_clusters: int = Field(ge=2)
    class_names: list[str] | None = Field(
        default=None, description="label id -> name; None when the data set has no labels"
    )
    class_domains: list[str] | None = Field(
        default=None,
        description="label id -> the data set it comes from, in a mixture of data sets",
    )
    features: FeatureSpec
    latents: LatentSpec | None = Field(
        None, description="set when the shards hold VAE latents the models train on"
    )
    seed: int
    heldout_fraction: float = Field(ge=0, lt=1)
    stats: ClusterStats
    train: list[ClusterShards]
    heldout: list[ClusterShards]
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    ddm_version: str = __version__
    _sha256: str | None = PrivateAttr(None)  # of the bytes it was read from or saved as

    @model_validator(mode="after")
    def _consistent(self) -> DatasetManifest:
        if self.image_shape[2] != self.channels:
            raise ValueError("image_shape[2] must equal channels")
        if self.class_domains is not None and len(self.class_domains) != len(
            self.class_names or []
        ):
            raise ValueError("class_domains must name a domain for every class")
        for split in (self.train, self.heldout):
            if [c.cluster for c in split] != list(range(self.num_clusters)):
                raise ValueError("each split must list clusters 0..K-1 in order")
        total = sum(c.count for c in self.train) + sum(c.count for c in self.heldout)
        if total != self.count:
            raise ValueError(f"shard counts add up to {total}, not count={self.count}")
        return self

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of what the diffusion models and router see: the
        latents when the shards hold them, else the images."""
        return self.latents.shape if self.latents is not None else self.image_shape

    @property
    def labelled(self) -> bool:
        return self.class_names is not None

    def shards(self, split: Split, cluster: int) -> list[ShardEntry]:
        if not 0 <= cluster < self.num_clusters:
            raise ManifestError(
                f"cluster {cluster} is out of range: this store has clusters "
                f"0..{self.num_clusters - 1}"
            )
        return (self.train if split == "train" else self.heldout)[cluster].shards

    @property
    def sha256(self) -> str:
        """What checkpoints record of the clustering they were trained on: the sha256 of
        this manifest's `dataset.json` (new shards, centroids or seed: another hash)."""
        if self._sha256 is None:
            self._sha256 = sha256_bytes(self._bytes())
        return self._sha256

    def _bytes(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    def save(self, store: Store) -> None:
        data = self._bytes()
        store.put_bytes(MANIFEST_KEY, data)
        self._sha256 = sha256_bytes(data)

    @classmethod
    def load(cls, store: Store) -> DatasetManifest:
        if not store.exists(MANIFEST_KEY):
            raise ManifestError(
                f"no {MANIFEST_KEY} in store {store.uri}: "
                f"run `ddm prepare --store {store.uri}` first"
            )
        return cls.from_json(store.get_bytes(MANIFEST_KEY), where=store.url(MANIFEST_KEY))

    @classmethod
    def from_json(cls, data: bytes | str, where: str = MANIFEST_KEY) -> DatasetManifest:
        manifest = parse_versioned(
            cls, data, where, FORMAT_VERSION, "dataset manifest", "re-run `ddm prepare --overwrite`"
        )
        manifest._sha256 = sha256_bytes(data.encode() if isinstance(data, str) else data)
        return manifest
