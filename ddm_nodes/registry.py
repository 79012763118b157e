"""The store's expert registry, `experts.json`: which experts make up the DDM, by stable id.

An expert's id is the NNN of `experts/expert-NNN`, and ids are never reused: the trained
expert of cluster k is expert k, an expert copied in from elsewhere (`ddm experts add
--from`) gets the next id no expert of this store ever had, and removing one leaves a gap.
So `expert-004` names the same model in the store, the Serve deployments, the metrics, the
logs and every response for as long as it exists.

A store without `experts.json` has the default registry: one expert per cluster of its
dataset, trained here. The file, once written, lists each expert with

    cluster     the cluster it was trained on, in the dataset it was trained on
    centroid    its data's centroid in THIS store's feature space (None: the clustering's
                centroid of that cluster), what nearest-centroid routes by
    provenance  trained here, or copied (source URI, source dataset hash, the manifest hash
                of the version copied)

and the removed experts (id, when), so that their ids stay taken and a running service can
keep a removed expert's deployment until the requests admitted with it have finished.
Which version of each expert is served is its checkpoint pointer's, as for any model: the
registry says who is in the DDM, the checkpoint says what its weights are.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.names import expert_name
from ddm_nodes.store import Store, sha256_bytes
from ddm_nodes.versioned_json import parse_versioned

REGISTRY_KEY = "experts.json"
REGISTRY_FORMAT = 1


class Provenance(BaseModel):
    """Where an expert came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["trained", "copied"]
    uri: str | None = Field(None, description="the expert folder it was copied from")
    dataset_sha256: str | None = Field(
        None, description="the dataset.json it was trained on, when not this store's"
    )
    manifest_sha256: str | None = Field(None, description="the checkpoint manifest copied")
    added_at: datetime | None = None


TRAINED_HERE = Provenance(source="trained")


class ExpertEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=0, le=999)
    cluster: int = Field(ge=0, description="the cluster it trained on, in its own dataset")
    centroid: list[float] | None = Field(
        None,
        description="its data's centroid in this store's feature space (None: the "
        "clustering's centroid of `cluster`)",
    )
    provenance: Provenance = TRAINED_HERE

    @property
    def name(self) -> str:
        return expert_name(self.id)

    @property
    def dataset_sha256(self) -> str | None:
        """The dataset it was trained on when it is not this store's (None: this store's)."""
        return self.provenance.dataset_sha256


class Removed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    expert: ExpertEntry  # as it was: a running service may still serve it for a while
    removed_at: datetime

    @property
    def id(self) -> int:
        return self.expert.id


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(REGISTRY_FORMAT, ge=1, le=REGISTRY_FORMAT)
    experts: list[ExpertEntry] = Field(min_length=1)
    removed: list[Removed] = Field(default_factory=list)

    @model_validator(mode="after")
    def _ids_unique(self) -> Registry:
        ids = [e.id for e in self.experts]
        taken = set(ids) & {r.id for r in self.removed}
        if len(set(ids)) != len(ids) or taken:
            raise ValueError(f"expert ids must be unique and not removed ones, got {ids}")
        if ids != sorted(ids):
            raise ValueError(f"experts must be listed by ascending id, got {ids}")
        return self

    @property
    def ids(self) -> list[int]:
        return [e.id for e in self.experts]

    @property
    def width(self) -> int:
        """Ids run 0..width-1 (some of them not in the DDM)."""
        return self.ids[-1] + 1

    @property
    def next_id(self) -> int:
        """The id an added expert gets: one no expert of this store ever had."""
        return max([*self.ids, *(r.id for r in self.removed)]) + 1

    def entry(self, expert_id: int) -> ExpertEntry:
        for e in self.experts:
            if e.id == expert_id:
                return e
        raise KeyError(expert_id)

    def is_default(self, manifest: DatasetManifest) -> bool:
        """Whether this is the default DDM: one expert per cluster, trained here."""
        return self.experts == default_registry(manifest).experts

    def adding(self, entry: ExpertEntry) -> Registry:
        return self.model_copy(update={"experts": sorted([*self.experts, entry], key=_id)})

    def removing(self, expert_id: int, when: datetime | None = None) -> Registry:
        gone = Removed(expert=self.entry(expert_id), removed_at=when or datetime.now(UTC))
        left = [e for e in self.experts if e.id != expert_id]
        if not left:
            raise ValueError(f"{gone.expert.name} is the DDM's last expert: a DDM needs one")
        return self.model_copy(update={"experts": left, "removed": [*self.removed, gone]})

    def retiring(self, within_s: float, now: datetime | None = None) -> list[ExpertEntry]:
        """Experts removed less than `within_s` ago (and not added back since)."""
        now = now or datetime.now(UTC)
        return [
            r.expert
            for r in self.removed
            if (now - r.removed_at).total_seconds() < within_s and r.id not in self.ids
        ]

    def to_bytes(self) -> bytes:
        return self.model_dump_json(indent=2).encode()


def _id(e: ExpertEntry) -> int:
    return e.id


def default_registry(manifest: DatasetManifest) -> Registry:
    """One expert per cluster of the dataset, trained here."""
    return Registry(experts=[ExpertEntry(id=k, cluster=k) for k in range(manifest.num_clusters)])


def load_registry(store: Store, manifest: DatasetManifest) -> Registry:
    """The store's registry: experts.json, else the default one."""
    if not store.exists(REGISTRY_KEY):
        return default_registry(manifest)
    return parse_versioned(
        Registry,
        store.get_bytes(REGISTRY_KEY),
        store.url(REGISTRY_KEY),
        REGISTRY_FORMAT,
        "expert registry",
        "restore it, or delete it to serve one expert per cluster",
    )


def registry_sha256(store: Store) -> str | None:
    """sha256 of experts.json (None: the default registry): what a running service watches."""
    return sha256_bytes(store.get_bytes(REGISTRY_KEY)) if store.exists(REGISTRY_KEY) else None


def save_registry(store: Store, registry: Registry) -> None:
    store.put_bytes(REGISTRY_KEY, registry.to_bytes())  # readers see the old or the new
