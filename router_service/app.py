"""The Serve application: `build_app(args)` binds one ExpertServer deployment per expert
of the store's registry, in a latent dataset the DecoderServer, the ExpertRoster over the
experts and the RouterServer ingress, whose `user_config` is the expert set.

    ddm serve --store demo-out/store                       # what most users run
    serve run router_service.app:build_app store=/abs/store replicas=2
    serve run infra/serve/ddm.yaml                          # the Serve config file

The store is checked before anything is deployed (dataset manifest, a checkpoint for every
expert of the registry trained on the data it names, the pinned feature extractor and VAE
unchanged), so a wrong path or an altered file fails here with a message, not later inside
a replica. The expert versions found here are pinned: every replica, including one
restarted later, loads exactly the manifest hash the router advertises, or fails and is
reported unavailable.

Built again after `ddm experts add|remove` or a router retrained (`serve deploy`, or the
watching `ddm serve`), the app changes in place: an added expert's deployment starts, the
router's user_config takes the new set and router version (requests in flight keep
theirs), and a removed expert's deployment stays for `retire_after_s`, until the requests
admitted with it are done; the first deploy after that stops it.
"""

from __future__ import annotations

import hashlib
import json
import os

from ray.serve import Application

from ddm_nodes import __version__
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import ManifestError
from ddm_nodes.pretrained import verify_pinned
from ddm_nodes.registry import load_registry
from ddm_nodes.store import open_store
from router_service.app_config import AppArgs, RouterConfig
from router_service.deployments import DecoderServer, ExpertRoster, ExpertServer, RouterServer
from router_service.store_models import expert_card, load_router, registry_cards

APP_NAME = "ddm"


def build_app(args: dict | AppArgs) -> Application:
    cfg = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    if "://" not in cfg.store:  # replicas may start in another working directory
        cfg = cfg.model_copy(update={"store": os.path.abspath(os.path.expanduser(cfg.store))})
    store = open_store(cfg.store)
    manifest = DatasetManifest.load(store)
    # each trained on the data its registry entry names, at the data's shape; the versions
    # found now are what every replica loads and the router advertises
    cards, version = registry_cards(store, manifest)
    if cfg.registry is not None and cfg.registry != (version or "default"):
        raise ManifestError(
            f"args.registry is {cfg.registry[:12]}... but {store.uri}'s expert registry is "
            f"now {(version or 'default')[:12]}...: set registry to what `ddm experts list` "
            "prints (or leave it out to deploy whatever the store lists)"
        )
    retiring = [
        expert_card(store, manifest, e)
        for e in load_registry(store, manifest).retiring(cfg.retire_after_s)
    ]
    if manifest.features.model is not None:
        verify_pinned(store, manifest.features.model, "the feature extractor")
    if manifest.latents is not None:
        verify_pinned(store, manifest.latents.vae, "the VAE")
    args_json = cfg.model_dump_json()  # every replica parses the whole AppArgs
    experts = []
    for card in sorted([*cards, *retiring], key=lambda c: c.id):
        card_json = card.model_dump_json()
        options = _versioned(cfg.expert_options(card.id), args_json, card_json)
        experts.append(ExpertServer.options(**options).bind(args_json, card_json))
    decoder = None
    if manifest.latents is not None:
        options = _versioned(cfg.decoder_options(), args_json)
        decoder = DecoderServer.options(**options).bind(args_json)
    names = [card.name for card in sorted([*cards, *retiring], key=lambda c: c.id)]
    roster = ExpertRoster.options(**_versioned(cfg.roster_options(), *names)).bind(*experts)
    router = load_router(store, manifest)  # checked now; replicas load this version
    config = RouterConfig(experts=cards, registry=version, router=router and router.pin)
    options = _versioned(cfg.router_options(config), args_json)
    return RouterServer.options(**options).bind(args_json, roster, decoder)


def _versioned(options: dict, *identity: str) -> dict:
    """`options` with a deployment version made of what its replicas are built from (its
    name, ddm's version and its arguments). Serve restarts a deployment's replicas when its
    version changes and otherwise applies the new options in place; unversioned, a
    deployment deployed from Python gets a random version every time, so a redeploy after
    a registry change would restart every replica, the router and its requests too."""
    digest = hashlib.sha256(json.dumps([__version__, options["name"], *identity]).encode())
    return {**options, "version": digest.hexdigest()[:16], "_internal": True}
