"""Loading a store's trained models for sampling, shared by the in-process backend and the
Serve deployments: one expert, the router, and each expert's identity card.

`StoreModels` is what the routing side of sampling needs from a store (the dataset
manifest, the router, the feature space and the card of every expert of its registry, but
no expert weights), and the `ExpertSet` requests sample with: the Serve router holds one;
`LocalExperts` extends it with the experts themselves.

Every load verifies each file's sha256 before it is parsed (nothing unpickled) and is
checked against the data its registry entry names: the expert must have been trained on
this clustering (the dataset.json hash it recorded) or, copied from another store, on the
dataset recorded when it was copied; on its cluster; and make the data set's state shape.
An expert is built from the spec its training.json records, its config.json must agree
with that spec, and its weights are loaded strictly (every tensor, no more). A card pins
the version it describes, so a replica loads exactly what the router advertises
(`load_expert(store, manifest, card)`); a `RouterPin` does the same for the router.

In a latent dataset the experts and router work on VAE latents: `state_shape` is the
latents' shape, `decoder` turns final states into images (one decode per request, here in
the router process: see docs/decisions.md), and `features` decodes x̂_0 before embedding
it, since the clusters were found among images.
"""

from __future__ import annotations

import json

import torch
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
from ddm_nodes.names import ROUTER_PREFIX, expert_prefix
from ddm_nodes.registry import ExpertEntry, Registry, load_registry, registry_sha256
from ddm_nodes.router_net import RouterNet
from ddm_nodes.store import Store, open_store
from router_service.expert_set import ExpertCard, ExpertSet, RouterPin

__all__ = [
    "ExpertCard",
    "RouterPin",
    "StoreModels",
    "expert_card",
    "load_expert",
    "load_router",
]


def check_experts_present(store: Store, manifest: DatasetManifest, registry: Registry) -> None:
    """ManifestError naming every expert of the registry without a checkpoint."""
    missing = [e for e in registry.experts if not has_checkpoint(store, expert_prefix(e.id))]
    if not missing:
        return
    if all(e.provenance.source == "trained" and e.id == e.cluster for e in missing):
        raise ManifestError(
            f"store {store.uri} has no trained expert for cluster(s) "
            f"{', '.join(str(e.cluster) for e in missing)} of {manifest.num_clusters}: train "
            f"them with `ddm submit --store {store.uri} --clusters all`"
        )
    raise ManifestError(
        f"store {store.uri} has no checkpoint for {', '.join(e.name for e in missing)}, which "
        f"its {store.url('experts.json')} lists: add it again (`ddm experts add --from`) or "
        f"remove it (`ddm experts remove`)"
    )


RETRAIN_EXPERTS = "retrain the experts with `ddm submit --clusters all --force`"


def _expert_checkpoint(
    store: Store,
    manifest: DatasetManifest,
    who: ExpertEntry | ExpertCard,
    card: ExpertCard | None = None,
) -> tuple[Checkpoint, ExpertSpec]:
    """Expert `who`'s checkpoint (the version `card` pins, else the published one), checked:
    trained on the data the registry says (this store's clustering, or the dataset a copied
    expert recorded), on its cluster, at the data's shape."""
    prefix = expert_prefix(who.id)
    ckpt = (
        open_checkpoint(store, prefix)
        if card is None
        else open_pinned(store, card.folder, card.sha256)
    )
    if ckpt.manifest.kind != "expert":
        raise ManifestError(f"{store.url(ckpt.folder)} holds a {ckpt.manifest.kind}, not an expert")
    name = who.name
    if who.dataset_sha256 is None:
        check_dataset(store, ckpt, manifest, name, RETRAIN_EXPERTS)
    elif ckpt.manifest.dataset_sha256 != who.dataset_sha256:
        raise ManifestError(
            f"{store.url(ckpt.folder)} was trained on dataset "
            f"{str(ckpt.manifest.dataset_sha256)[:12]}... but the registry copied {name} from "
            f"one trained on {who.dataset_sha256[:12]}...: "
            "the folder was replaced; add the expert again with `ddm experts add --from`"
        )
    if ckpt.manifest.cluster != who.cluster:
        raise ManifestError(
            f"{store.url(prefix)} was trained on cluster {ckpt.manifest.cluster}, not {who.cluster}"
        )
    training = json.loads(fetch_verified(store, ckpt, TRAINING_FILE))
    spec = ExpertSpec(**training["model"])
    h, w, c = manifest.model_shape
    if (spec.image_size, spec.image_size, spec.channels) != (h, w, c):
        what = "latents" if manifest.latents is not None else "images"
        raise ManifestError(
            f"{store.url(prefix)} makes {spec.channels}x{spec.image_size}x"
            f"{spec.image_size} states but the dataset's {what} are {c}x{h}x{w}; retrain it"
        )
    return ckpt, spec


def load_expert(
    store: Store,
    manifest: DatasetManifest,
    card: ExpertCard | int,
    device: str | torch.device = "cpu",
) -> Expert:
    """The expert `card` describes, exactly the version it pins (an id: the registry's
    expert of that id, its published version), verified, in eval mode on `device`."""
    if isinstance(card, int):
        card = expert_card(store, manifest, card)
    ckpt, spec = _expert_checkpoint(store, manifest, card, card)
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


def expert_card(store: Store, manifest: DatasetManifest, entry: ExpertEntry | int) -> ExpertCard:
    """A registry entry's (or the registry's expert of that id's) identity card: its
    published version's manifest and training.json (both verified)."""
    if isinstance(entry, int):
        registry = load_registry(store, manifest)
        if entry not in registry.ids:
            raise ManifestError(f"expert id {entry} is not one of {store.uri}'s {registry.ids}")
        entry = registry.entry(entry)
    ckpt, spec = _expert_checkpoint(store, manifest, entry)
    return ExpertCard(
        id=entry.id,
        name=entry.name,
        cluster=entry.cluster,
        sha256=ckpt.manifest_sha256,
        folder=ckpt.folder,
        preset=spec.preset,
        arch=spec.arch,
        prediction=spec.prediction,
        conditional=spec.conditional,
        step=ckpt.manifest.step,
        dataset_sha256=entry.dataset_sha256,
        centroid=entry.centroid,
        source=entry.provenance.source,
    )


def registry_cards(store: Store, manifest: DatasetManifest) -> tuple[list[ExpertCard], str]:
    """The cards of the store's registry as it is now, and its version (the sha256 of
    experts.json, "" for the default registry); every expert checked."""
    version = registry_sha256(store) or ""
    registry = load_registry(store, manifest)
    check_experts_present(store, manifest, registry)
    return [expert_card(store, manifest, e) for e in registry.experts], version


def load_router(
    store: Store,
    manifest: DatasetManifest,
    device: str | torch.device = "cpu",
    pin: RouterPin | None = None,
) -> RouterFn | None:
    """The store's router on `device` (the version `pin` names, else the published one),
    or None when it has none."""
    if pin is None and not has_checkpoint(store, ROUTER_PREFIX):
        return None
    ckpt = None if pin is None else open_pinned(store, pin.folder, pin.sha256)
    loaded = load_model(store, ROUTER_PREFIX, kind="router", checkpoint=ckpt)
    check_dataset(
        store,
        loaded.checkpoint,
        manifest,
        "the router",
        "retrain it with `ddm submit --router --force`",
    )
    net = loaded.model
    retrain = "retrain it with `ddm submit --router --force`"
    # a router trained on a changed registry lists the expert ids it learnt; else it
    # learnt the clusters
    ids = loaded.training.get("model", {}).get("experts")
    if ids is None and net.config.num_clusters != manifest.num_clusters:
        raise ManifestError(
            f"{store.url(ROUTER_PREFIX)} routes over {net.config.num_clusters} "
            f"clusters but the dataset has {manifest.num_clusters}: {retrain}"
        )
    if ids is not None and (not ids or max(ids) >= net.config.num_clusters):
        raise ManifestError(
            f"{store.url(ROUTER_PREFIX)} lists experts {ids} it has no output for: {retrain}"
        )
    if net.config.in_channels != manifest.model_shape[2]:
        raise ManifestError(
            f"{store.url(ROUTER_PREFIX)} routes {net.config.in_channels}-channel states but "
            f"the dataset's have {manifest.model_shape[2]}: {retrain}"
        )
    covers = frozenset(range(manifest.num_clusters) if ids is None else ids)
    pinned = RouterPin(folder=loaded.checkpoint.folder, sha256=loaded.checkpoint.manifest_sha256)
    return RouterFn(net.to(device).eval(), torch.device(device), covers, pinned)


class RouterFn:
    """logits = router(x_t, t), (N, width), under no_grad, on the router's device; `ids`
    are the experts it was trained on, `pin` its version."""

    def __init__(self, net: RouterNet, device: torch.device, ids: frozenset[int], pin: RouterPin):
        self.net, self.device, self.ids, self.pin = net, device, ids, pin
        self.width = int(net.config.num_clusters)

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
        registry_version: str = "",
        router: RouterPin | None = None,
    ):
        self.store = store if isinstance(store, Store) else open_store(store)
        self.manifest = DatasetManifest.load(self.store)
        self.device = torch.device(device)
        # `cards`: the versions a deployment pinned; each is checked as it is read again
        version = registry_version
        if cards is None:
            cards, version = registry_cards(self.store, self.manifest)
        for card in cards:
            _expert_checkpoint(self.store, self.manifest, card, card)
        self.cards = cards
        # `router`: the version a deployment pinned (else the published one, if any)
        self._router = load_router(self.store, self.manifest, self.device, router)
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
        self._routers: dict[str, RouterFn] = {}  # versions swapped in since (expert_set_of)
        self.expert_set = self.expert_set_of(self.cards, version)

    def expert_set_of(
        self, cards: list[ExpertCard], version: str = "", router: RouterPin | None = None
    ) -> ExpertSet:
        """The snapshot requests sample with, for these cards and this router version (it
        is loaded once: the router the models hold until then stays theirs)."""
        fn = self._router
        if router is not None and (fn is None or fn.pin != router):
            fn = self._routers.get(router.sha256) or load_router(
                self.store, self.manifest, self.device, router
            )
            self._routers[router.sha256] = fn
        return ExpertSet.build(cards, self.feature_space, self.codec, fn, version)

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
        return self.expert_set.conditional

    @property
    def router(self) -> RouterFn | None:
        """logits = router(x_t, t), (N, K), or None when the store has no router."""
        return self._router
