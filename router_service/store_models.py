"""Loading a store's trained models for sampling, shared by the in-process backend and the
Serve deployments: one expert, the router, and each expert's identity card.

`StoreModels` is what the routing side of sampling needs from a store (the dataset
manifest, the router, the feature space and every expert's card, but no expert weights):
the Serve router holds one; `LocalExperts` extends it with the experts themselves.

Every load verifies each file's sha256 before it is parsed (nothing unpickled) and is
checked against the dataset manifest: the expert must have been trained on this clustering
(the dataset.json hash it recorded), on the cluster it is loaded for, and make the data
set's state shape. An expert is built from the spec its training.json records, its
config.json must agree with that spec, and its weights are loaded strictly (every tensor,
no more). A card pins the version it describes, so a replica loads exactly what the router
advertises (`load_expert(..., card=)`).

In a latent dataset the experts and router work on VAE latents: `state_shape` is the
latents' shape, `decoder` turns final states into images (one decode per request, here in
the router process: see docs/decisions.md), and `features` decodes x̂_0 before embedding
it, since the clusters were found among images.
"""

from __future__ import annotations

import json

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load as load_safetensors

from ddm_nodes.checkpoint import (
    CONFIG_FILE,
    TRAINING_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    check_dataset,
    fetch_verified,
    has_checkpoint,
    load_model,
    open_checkpoint,
    open_pinned,
)
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import ManifestError
from ddm_nodes.experts import Expert, ExpertSpec
from ddm_nodes.features import FeatureSpace
from ddm_nodes.latents import DecodedFeatures, LatentCodec
from ddm_nodes.names import ROUTER_PREFIX, expert_name, expert_prefix
from ddm_nodes.router_net import RouterNet
from ddm_nodes.store import Store, open_store


class ExpertCard(BaseModel):
    """Who an expert is, without loading its weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int
    name: str  # "expert-003": its deployment name too
    cluster: int
    sha256: str  # of the checkpoint manifest, which pins every file's sha256
    folder: str  # the version folder that manifest is in
    preset: str
    arch: str  # unet or dit
    prediction: str  # what its network predicts: v, eps or x0 (served as velocity)
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


RETRAIN_EXPERTS = "retrain the experts with `ddm submit --clusters all --force`"


def _expert_checkpoint(
    store: Store, manifest: DatasetManifest, k: int, card: ExpertCard | None
) -> tuple[Checkpoint, ExpertSpec]:
    ckpt = (
        open_checkpoint(store, expert_prefix(k))
        if card is None
        else open_pinned(store, card.folder, card.sha256)
    )
    if ckpt.manifest.kind != "expert":
        raise ManifestError(f"{store.url(ckpt.folder)} holds a {ckpt.manifest.kind}, not an expert")
    check_dataset(store, ckpt, manifest, expert_name(k), RETRAIN_EXPERTS)
    training = json.loads(fetch_verified(store, ckpt, TRAINING_FILE))
    return ckpt, _checked_spec(store, manifest, k, ckpt.manifest.cluster, training)


def load_expert(
    store: Store,
    manifest: DatasetManifest,
    k: int,
    device: str | torch.device = "cpu",
    card: ExpertCard | None = None,
) -> Expert:
    """Expert k (trained on cluster k), verified, in eval mode on `device`: the version
    `card` pins, else the published one."""
    ckpt, spec = _expert_checkpoint(store, manifest, k, card)
    expert = Expert.create(spec)
    recorded = _config_fields(json.loads(fetch_verified(store, ckpt, CONFIG_FILE)))
    built = _config_fields(dict(expert.denoiser.config))
    differ = sorted(n for n in recorded.keys() | built.keys() if recorded.get(n) != built.get(n))
    if differ:
        raise ManifestError(
            f"{store.url(ckpt.folder)}/{CONFIG_FILE} disagrees with the model spec its "
            f"{TRAINING_FILE} records ({spec.preset}) on {', '.join(differ[:5])}: the folder "
            "was altered; retrain the expert"
        )
    weights = load_safetensors(fetch_verified(store, ckpt, WEIGHTS_FILE))
    try:
        expert.denoiser.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise ManifestError(
            f"{store.url(ckpt.folder)}: the weights do not fit the recorded spec ({first}); "
            "retrain the expert"
        ) from None
    return expert.to(device).eval()


def _config_fields(config: dict) -> dict:
    """A diffusers config's fields, JSON-normalised (tuples as lists), without the `_`
    bookkeeping keys (class name, diffusers version)."""
    return {k: v for k, v in json.loads(json.dumps(config)).items() if not k.startswith("_")}


def expert_card(store: Store, manifest: DatasetManifest, k: int) -> ExpertCard:
    """Expert k's identity from its manifest and training.json (both verified)."""
    ckpt, spec = _expert_checkpoint(store, manifest, k, None)
    return ExpertCard(
        id=k,
        name=expert_name(k),
        cluster=k,
        sha256=ckpt.manifest_sha256,
        folder=ckpt.folder,
        preset=spec.preset,
        arch=spec.arch,
        prediction=spec.prediction,
        conditional=spec.conditional,
        step=ckpt.manifest.step,
    )


def load_router(
    store: Store, manifest: DatasetManifest, device: str | torch.device = "cpu"
) -> RouterNet | None:
    """The store's router network on `device`, or None when it has none."""
    if not has_checkpoint(store, ROUTER_PREFIX):
        return None
    loaded = load_model(store, ROUTER_PREFIX, kind="router")
    check_dataset(
        store,
        loaded.checkpoint,
        manifest,
        "the router",
        "retrain it with `ddm submit --router --force`",
    )
    net = loaded.model
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

    def __init__(
        self,
        store: Store | str,
        device: str | torch.device = "cpu",
        cards: list[ExpertCard] | None = None,
    ):
        self.store = store if isinstance(store, Store) else open_store(store)
        self.manifest = DatasetManifest.load(self.store)
        self.device = torch.device(device)
        check_experts_present(self.store, self.manifest)
        # `cards`: the versions a deployment pinned; each is checked as it is read again
        self.cards = cards or [expert_card(self.store, self.manifest, k) for k in self.expert_ids]
        for card in cards or []:
            _expert_checkpoint(self.store, self.manifest, card.id, card)
        self.router_net: RouterNet | None = load_router(self.store, self.manifest, self.device)
        # one callable for the models' life: a StepBatcher is bound to it
        self._router = None if self.router_net is None else RouterFn(self.router_net, self.device)
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
        return self._router
