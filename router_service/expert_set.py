"""The experts one request samples with: `ExpertSet`, a frozen snapshot of the registry.

A request is admitted with the service's current set and keeps it to its end, whatever the
registry says meanwhile: ids are stable (ddm_nodes/registry.py), so the sampler works over
ids 0..width-1 and the ids not in the set are a permanent `available` mask of every
routing decision (the policies already leave masked experts out). Requests admitted before
and after a change share the one step batcher: an expert is called once per tick for every
request that selected it, whichever set it came with.

The set also says what can route it:
- nearest-centroid: always, by each expert's centroid in the store's feature space (an
  added expert's is in its card), so a new expert is routed to from its first request;
- the router policies: only when the set's router was trained on every id of the set
  (removing an expert keeps a router usable; adding one does not until `ddm submit
  --router` trains one on the new set, which the service then swaps in for the requests
  admitted from then on).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch
from pydantic import BaseModel, ConfigDict

from ddm_nodes.errors import ManifestError
from ddm_nodes.features import FeatureSpace
from ddm_nodes.latents import DecodedFeatures, LatentCodec
from router_service.step_batcher import Features


class ExpertCard(BaseModel):
    """Who an expert is, without loading its weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int
    name: str  # "expert-003": its deployment name too
    cluster: int  # the cluster it trained on, in its own dataset
    sha256: str  # of the checkpoint manifest, which pins every file's sha256
    folder: str  # the version folder that manifest is in
    preset: str
    arch: str  # unet or dit
    prediction: str  # what its network predicts: v, eps or x0 (served as velocity)
    conditional: bool
    step: int
    dataset_sha256: str | None = None  # the dataset it trained on when not this store's
    centroid: list[float] | None = None  # in this store's feature space (None: its cluster's)
    source: str = "trained"  # provenance: trained here, or copied


class RouterPin(BaseModel):
    """The router version a deployment serves: its checkpoint folder and manifest sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    folder: str
    sha256: str


class Router(Protocol):
    """logits = router(x_t, t), (N, width), over the expert ids it was trained on."""

    width: int
    ids: frozenset[int]
    pin: RouterPin

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class ExpertSet:
    cards: tuple[ExpertCard, ...]  # ascending id
    features: Features | None  # distances (N, width) to each id's centroid
    router: Router | None  # the router the requests of this set route with; None: none
    width: int  # the sampler's K: ids run 0..width-1 (the router's when it covers the set)
    version: str = ""  # the registry's sha256 it came from ("": the default one)

    @classmethod
    def build(
        cls,
        cards: list[ExpertCard],
        space: FeatureSpace | None,
        codec: LatentCodec | None,
        router: Router | None,
        version: str = "",
    ) -> ExpertSet:
        cards = sorted(cards, key=lambda c: c.id)
        width = cards[-1].id + 1
        if router is not None and {c.id for c in cards} <= router.ids:
            width = router.width  # the router's outputs are ids 0..router.width-1
        features = None
        if space is not None:
            centroids = torch.zeros(width, space.centroids.shape[1])
            for c in cards:
                centroids[c.id] = _centroid(c, space)
            own = FeatureSpace(space.extractor, centroids, space.metric)
            features = own if codec is None else DecodedFeatures(own, codec)
        return cls(tuple(cards), features, router, width, version)

    @cached_property
    def ids(self) -> list[int]:
        return [c.id for c in self.cards]

    @cached_property
    def absent(self) -> frozenset[int]:
        """Ids below `width` that are not in the set: never routed to."""
        return frozenset(range(self.width)) - set(self.ids)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.cards]

    @property
    def router_covers(self) -> bool:
        """Whether the router was trained on every expert of the set."""
        return self.router is not None and set(self.ids) <= self.router.ids

    @property
    def key(self) -> tuple[str, str | None]:
        """What makes two sets the same: the registry and the router version."""
        return self.version, None if self.router is None else self.router.pin.sha256

    @property
    def conditional(self) -> bool:
        return all(c.conditional for c in self.cards)


def _centroid(card: ExpertCard, space: FeatureSpace) -> torch.Tensor:
    if card.centroid is not None:
        if len(card.centroid) != space.centroids.shape[1]:
            raise ManifestError(
                f"{card.name}'s centroid has {len(card.centroid)} dimensions but the store's "
                f"feature space has {space.centroids.shape[1]}: add it again (`ddm experts add`)"
            )
        return torch.tensor(card.centroid, dtype=torch.float32)
    if card.dataset_sha256 is not None or card.cluster >= space.num_clusters:
        raise ManifestError(
            f"{card.name} was trained on other data and the registry has no centroid for it: "
            "add it again with `ddm experts add --from`"
        )
    return space.centroids[card.cluster]
