"""The in-process experts backend: every expert of a store, loaded and verified.

`LocalExperts(store)` loads `experts/expert-{k:03d}` for every cluster k of the store's
dataset manifest through `checkpoint.load_model` (each file's sha256 checked, nothing
unpickled: an altered weight file is refused with IntegrityError), the router if the store
has one, and the feature space the data was clustered in. It answers the sampler's
contract, `predict(expert_id, x_t, t, y) -> v`, and counts calls per expert.
"""

from __future__ import annotations

import os

import torch

from ddm_nodes.checkpoint import MANIFEST_FILE, ROUTER_PREFIX, expert_prefix, load_model
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import ManifestError
from ddm_nodes.experts import Expert, ExpertSpec
from ddm_nodes.features import FeatureSpace
from ddm_nodes.router_net import RouterNet
from ddm_nodes.store import Store, open_store


class LocalExperts:
    """A store's K experts (and router, and feature space) as in-process modules."""

    def __init__(self, store: Store | str | os.PathLike, device: str | torch.device = "cpu"):
        self.store = store if isinstance(store, Store) else open_store(store)
        self.manifest = DatasetManifest.load(self.store)
        self.device = torch.device(device)
        K = self.manifest.num_clusters
        missing = [k for k in range(K) if not self._has(expert_prefix(k))]
        if missing:
            raise ManifestError(
                f"store {self.store.uri} has no trained expert for cluster(s) "
                f"{', '.join(map(str, missing))} of {K}: train them with "
                f"`ddm submit --store {self.store.uri} --clusters all`"
            )
        self.experts: list[Expert] = [self._load_expert(k) for k in range(K)]
        self.router_net: RouterNet | None = None
        if self._has(ROUTER_PREFIX):
            net = load_model(self.store, ROUTER_PREFIX, kind="router").model
            if net.config.num_clusters != K:
                raise ManifestError(
                    f"{self.store.url(ROUTER_PREFIX)} routes over {net.config.num_clusters} "
                    f"clusters but the dataset has {K}: retrain it with `ddm submit --router`"
                )
            self.router_net = net.to(self.device)
        self.features = FeatureSpace.load(self.store, self.manifest)
        self.calls = [0] * K  # predict calls per expert, cumulative (a run's own: SampleResult)

    def _has(self, prefix: str) -> bool:
        return self.store.exists(f"{prefix}/{MANIFEST_FILE}")

    def _load_expert(self, k: int) -> Expert:
        prefix = expert_prefix(k)
        loaded = load_model(self.store, prefix, kind="expert")
        if loaded.manifest.cluster != k:
            raise ManifestError(
                f"{self.store.url(prefix)} was trained on cluster {loaded.manifest.cluster}, "
                f"not {k}"
            )
        spec = ExpertSpec(**loaded.training["model"])
        h, w, c = self.manifest.image_shape
        if (spec.image_size, spec.image_size, spec.channels) != (h, w, c):
            raise ManifestError(
                f"{self.store.url(prefix)} makes {spec.channels}x{spec.image_size}x"
                f"{spec.image_size} images but the dataset's are {c}x{h}x{w}; retrain it"
            )
        return Expert(loaded.model, spec).to(self.device).eval()

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the experts make."""
        h, w, c = self.manifest.image_shape
        return c, h, w

    @property
    def specs(self) -> list[ExpertSpec]:
        return [e.spec for e in self.experts]

    @property
    def router(self):
        """logits = router(x_t, t), (N, K), or None when the store has no router."""
        return None if self.router_net is None else self._route

    def _route(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.router_net(x_t.to(self.device), t.to(self.device)).to(x_t.device)

    def predict(
        self, expert_id: int, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Expert `expert_id`'s velocity v (n, C, H, W) at x_t (n, C, H, W), t (n,)."""
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"expert id {expert_id} is not in 0..{self.num_experts - 1}")
        self.calls[expert_id] += 1
        dev = self.device
        with torch.no_grad():
            v = self.experts[expert_id](x_t.to(dev), t.to(dev), None if y is None else y.to(dev))
        return v.to(x_t.device)
