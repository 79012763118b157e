"""The in-process experts backend: every expert of a store, loaded and verified.

`LocalExperts(store)` is the store's `StoreModels` (manifest, router, feature space, expert
cards) plus `experts/expert-{k:03d}` for every expert k of its registry, loaded through
store_models.py (each file's sha256 checked, nothing unpickled: an altered weight file is
refused with IntegrityError). It answers the sampler's contract, `predict(expert_id, x_t,
t, y) -> v`, and counts calls per expert.
"""

from __future__ import annotations

import os

import torch

from ddm_nodes.experts import Expert, ExpertSpec
from ddm_nodes.store import Store
from router_service.store_models import StoreModels, load_expert


class LocalExperts(StoreModels):
    """A store's experts (and router, and feature space) as in-process modules, by id."""

    def __init__(self, store: Store | str | os.PathLike, device: str | torch.device = "cpu"):
        super().__init__(store if isinstance(store, Store) else str(store), device)
        # the versions its cards describe, even if one is published meanwhile
        self.experts: dict[int, Expert] = {
            card.id: load_expert(self.store, self.manifest, card, self.device)
            for card in self.cards
        }
        self.calls = [0] * self.num_experts  # cumulative (a run's own: SampleResult)

    @property
    def num_experts(self) -> int:
        """The sampler's K: ids run 0..K-1 (ids the registry has not, never routed to)."""
        return self.expert_set.width

    @property
    def specs(self) -> list[ExpertSpec]:
        return [e.spec for e in self.experts.values()]

    def predict(
        self, expert_id: int, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Expert `expert_id`'s velocity v (n, C, H, W) at x_t (n, C, H, W), t (n,)."""
        if expert_id not in self.experts:
            raise ValueError(f"expert id {expert_id} is not one of {sorted(self.experts)}")
        self.calls[expert_id] += 1
        dev = self.device
        with torch.no_grad():
            v = self.experts[expert_id](x_t.to(dev), t.to(dev), None if y is None else y.to(dev))
        return v.to(x_t.device)
