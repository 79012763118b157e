"""Loading a store's trained models for sampling, shared by the in-process backend and the
Serve deployments: one expert, the router, and each expert's identity card.

`StoreModels` is what the routing side of sampling needs from a store (the dataset
manifest, the router, the feature space and every expert's card, but no expert weights):
the Serve router holds one; `LocalExperts` extends it with the experts themselves.

Every load goes through `checkpoint.load_model` (each file's sha256 checked before it is
parsed, nothing unpickled) and is checked against the dataset manifest: the expert must
have been trained on the cluster it is loaded for and make the data set's state shape.

In a latent dataset the experts and router work on VAE latents: `state_shape` is the
latents' shape, `decoder` turns final states into images (one decode per request, here in
the router process: see docs/decisions.md), and `features` decodes x̂_0 before embedding
it, since the clusters were found among images.
"""

from __future__ import annotations

import json

import torch
from pydantic import BaseModel, ConfigDict

from ddm_nodes.checkpoint import (
    MANIFEST_FILE,
    TRAINING_FILE,
    fetch_verified,
    has_checkpoint,
    load_model,
    read_manifest,
)
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import ManifestError
from ddm_nodes.experts import Expert, ExpertSpec
from ddm_nodes.features import FeatureSpace
from ddm_nodes.latents import DecodedFeatures, LatentCodec
from ddm_nodes.names import ROUTER_PREFIX, expert_name, expert_prefix
from ddm_nodes.router_net import RouterNet
from ddm_nodes.store import Store, open_store, sha256_bytes


class ExpertCard(BaseModel):
    """Who an expert is, without loading its weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int
    name: str  # "expert-003": its deployment name too
    cluster: int
    sha256: str  # of the checkpoint manifest, which pins every file's sha256
    preset: str
    conditional: bool
    step: int


def check_experts_present(store: Store, manifest: DatasetManifest) -> None:
    """ManifestError naming every cluster without a trained expert."""
    missing = [
        k for k in range(manifest.num_clusters) if not has_checkpoint(store, expert_prefix(k))
    ]
    if missing:
        raise ManifestError(
            f"store {store.uri} has no trained expert for cluster(s) "
            f"{', '.join(map(str, missing))} of {manifest.num_clusters}: train them with "
            f"`ddm submit --store {store.uri} --clusters all`"
        )


def _checked_spec(
    store: Store, manifest: DatasetManifest, k: int, cluster: int | None, training: dict
) -> ExpertSpec:
    prefix = expert_prefix(k)
    if cluster != k:
        raise ManifestError(f"{store.url(prefix)} was trained on cluster {cluster}, not {k}")
    spec = ExpertSpec(**training["model"])
    h, w, c = manifest.model_shape
    if (spec.image_size, spec.image_size, spec.channels) != (h, w, c):
        what = "latents" if manifest.latents is not None else "images"
        raise ManifestError(
            f"{store.url(prefix)} makes {spec.channels}x{spec.image_size}x"
            f"{spec.image_size} states but the dataset's {what} are {c}x{h}x{w}; retrain it"
        )
    return spec


def load_expert(
    store: Store, manifest: DatasetManifest, k: int, device: str | torch.device = "cpu"
) -> Expert:
    """Expert k (trained on cluster k), verified, in eval mode on `device`."""
    loaded = load_model(store, expert_prefix(k), kind="expert")
    spec = _checked_spec(store, manifest, k, loaded.manifest.cluster, loaded.training)
    return Expert(loaded.model, spec).to(device).eval()


def expert_card(store: Store, manifest: DatasetManifest, k: int) -> ExpertCard:
    """Expert k's identity from its manifest and training.json (both verified)."""
    prefix = expert_prefix(k)
    ckpt = read_manifest(store, prefix)
    training = json.loads(fetch_verified(store, prefix, ckpt, TRAINING_FILE))
    spec = _checked_spec(store, manifest, k, ckpt.cluster, training)
    return ExpertCard(
        id=k,
        name=expert_name(k),
        cluster=k,
        sha256=sha256_bytes(store.get_bytes(f"{prefix}/{MANIFEST_FILE}")),
        preset=spec.preset,
        conditional=spec.conditional,
        step=ckpt.step,
    )


def load_router(
    store: Store, manifest: DatasetManifest, device: str | torch.device = "cpu"
) -> RouterNet | None:
    """The store's router network on `device`, or None when it has none."""
    if not has_checkpoint(store, ROUTER_PREFIX):
        return None
    net = load_model(store, ROUTER_PREFIX, kind="router").model
    if net.config.num_clusters != manifest.num_clusters:
        raise ManifestError(
            f"{store.url(ROUTER_PREFIX)} routes over {net.config.num_clusters} "
            f"clusters but the dataset has {manifest.num_clusters}: retrain it with "
            "`ddm submit --router`"
        )
    if net.config.in_channels != manifest.model_shape[2]:
        raise ManifestError(
            f"{store.url(ROUTER_PREFIX)} routes {net.config.in_channels}-channel states but "
            f"the dataset's have {manifest.model_shape[2]}: retrain it with `ddm submit --router`"
        )
    return net.to(device).eval()


class RouterFn:
    """logits = router(x_t, t), (N, K), under no_grad, on the router's device."""

    def __init__(self, net: RouterNet, device: torch.device):
        self.net, self.device = net, device

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net(x_t.to(self.device), t.to(self.device)).to(x_t.device)


class StoreModels:
    """A store's manifest, router (if any), feature space, expert cards and, in a latent
    dataset, its VAE."""

    def __init__(self, store: Store | str, device: str | torch.device = "cpu"):
        self.store = store if isinstance(store, Store) else open_store(store)
        self.manifest = DatasetManifest.load(self.store)
        self.device = torch.device(device)
        check_experts_present(self.store, self.manifest)
        self.cards = [expert_card(self.store, self.manifest, k) for k in self.expert_ids]
        self.router_net: RouterNet | None = load_router(self.store, self.manifest, self.device)
        # the clustering's space, on images (the analysis embeds real images in it)
        self.feature_space = FeatureSpace.load(self.store, self.manifest, self.device)
        self.codec = (
            None
            if self.manifest.latents is None
            else LatentCodec.load(self.store, self.manifest.latents, self.device)
        )
        # what nearest-centroid embeds: the sampler's states (latents: decoded first)
        self.features = (
            self.feature_space
            if self.codec is None
            else DecodedFeatures(self.feature_space, self.codec)
        )

    @property
    def expert_ids(self) -> range:
        return range(self.manifest.num_clusters)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the DDM makes."""
        h, w, c = self.manifest.image_shape
        return c, h, w

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the states the experts denoise: the images, or their latents."""
        h, w, c = self.manifest.model_shape
        return c, h, w

    @property
    def decoder(self) -> LatentCodec | None:
        """Final states -> images in a latent dataset; None when the states are images."""
        return self.codec

    @property
    def conditional(self) -> bool:
        """Whether every expert takes class labels."""
        return all(card.conditional for card in self.cards)

    @property
    def router(self) -> RouterFn | None:
        """logits = router(x_t, t), (N, K), or None when the store has no router."""
        return None if self.router_net is None else RouterFn(self.router_net, self.device)
