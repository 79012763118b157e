"""The Serve application: `build_app(args)` binds one ExpertServer deployment per expert
of the store, in a latent dataset the DecoderServer, and the RouterServer ingress over
their handles.

    ddm serve --store demo-out/store                       # what most users run
    serve run router_service.app:build_app store=/abs/store replicas=2
    serve run infra/serve/ddm.yaml                          # the Serve config file

The store is checked before anything is deployed (dataset manifest, one trained expert
per cluster trained on this clustering, the pinned feature extractor and VAE unchanged),
so a wrong path or an altered file fails here with a message, not later inside a replica.
The expert versions found here are pinned: every replica, including one restarted later,
loads exactly the manifest hash the router advertises, or fails and is reported
unavailable.
"""

from __future__ import annotations

import os

from ray.serve import Application

from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.pretrained import verify_pinned
from ddm_nodes.store import open_store
from router_service.app_config import AppArgs
from router_service.deployments import DecoderServer, ExpertServer, RouterServer
from router_service.store_models import check_experts_present, expert_card

APP_NAME = "ddm"


def build_app(args: dict | AppArgs) -> Application:
    cfg = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    if "://" not in cfg.store:  # replicas may start in another working directory
        cfg = cfg.model_copy(update={"store": os.path.abspath(os.path.expanduser(cfg.store))})
    store = open_store(cfg.store)
    manifest = DatasetManifest.load(store)
    check_experts_present(store, manifest)
    # each trained on this clustering, on its cluster, at the data's shape; the versions
    # found now are what every replica loads and the router advertises
    cards = [expert_card(store, manifest, k) for k in range(manifest.num_clusters)]
    if manifest.features.model is not None:
        verify_pinned(store, manifest.features.model, "the feature extractor")
    if manifest.latents is not None:
        verify_pinned(store, manifest.latents.vae, "the VAE")
    args_json = cfg.model_dump_json()  # every replica parses the whole AppArgs
    experts = [
        ExpertServer.options(**cfg.expert_options(card.id)).bind(args_json, card.model_dump_json())
        for card in cards
    ]
    decoder = None
    if manifest.latents is not None:
        decoder = DecoderServer.options(**cfg.decoder_options()).bind(args_json)
    cards_json = [card.model_dump_json() for card in cards]
    return RouterServer.options(**cfg.router_options()).bind(
        args_json, experts, decoder, cards_json
    )
