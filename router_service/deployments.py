"""The Ray Serve deployments: one `ExpertServer` deployment per expert (`expert-003`,
its own replicas, `@serve.batch` across requests), in a latent dataset the `DecoderServer`
(the VAE decoder, once per request), the `ExpertRoster` that binds the expert deployments
into the app, and the `RouterServer` ingress (the FastAPI app of http_api.py) that owns the
router network and the policies, and fans out to the experts by deployment name and to the
decoder through the handle it was bound with. app.py builds the graph.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import torch
from ray import serve

from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.latents import LatentCodec
from ddm_nodes.names import expert_name
from ddm_nodes.store import open_store
from router_service import batching
from router_service.app_config import AppArgs, BatchConfig, RouterConfig
from router_service.http_api import make_api
from router_service.metrics import ExpertMetrics, RouterMetrics
from router_service.remote_experts import RemoteDecoder, RemoteExperts
from router_service.service import Admission, SamplingService
from router_service.store_models import ExpertCard, StoreModels, load_expert

_initial = BatchConfig()
log = logging.getLogger("ddm.serve")


@serve.deployment
class ExpertServer:
    """Expert k, loaded hash-verified from the store, answering batched predict calls: the
    version its card pins (the one the router advertises), never whatever the store's
    pointer says when the replica happens to (re)start."""

    def __init__(self, args: str, card: str):
        cfg = AppArgs.model_validate_json(args)
        torch.set_num_threads(cfg.torch_threads)
        s = open_store(cfg.store)
        pinned = ExpertCard.model_validate_json(card)
        self.k = pinned.id
        self.device = torch.device(cfg.device)
        self.expert = load_expert(s, DatasetManifest.load(s), pinned, self.device)
        self.metrics = ExpertMetrics()
        self.max_batch = _initial.max_batch
        # The batch queue belongs to this replica, not to the class: a class-level one is
        # shipped with the class's by-value pickle and, once used in a process, cannot be.
        self.forward = serve.batch(
            max_batch_size=_initial.max_batch,
            batch_wait_timeout_s=_initial.batch_wait_timeout_s,
            batch_size_fn=batching.samples_in,
        )(self._forward)

    def reconfigure(self, config: dict) -> None:
        """`user_config` (BatchConfig): applied at start and on every `serve deploy`."""
        cfg = BatchConfig.model_validate(config)
        self.max_batch = cfg.max_batch
        self.forward.set_max_batch_size(cfg.max_batch)
        self.forward.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    async def predict(self, x: np.ndarray, t: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        """v (n, C, H, W) for one sub-batch; larger than a batch, it goes in pieces."""
        parts = batching.chunks((x, t, y), self.max_batch)
        outs = await asyncio.gather(*(self.forward(p) for p in parts))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    async def _forward(self, items: list[batching.SubBatch]) -> list[np.ndarray]:
        start = time.perf_counter()
        x, t, y, sizes = batching.stack(items)
        dev = self.device
        with torch.no_grad():
            v = self.expert(*(torch.from_numpy(a).to(dev) for a in (x, t, y)))
        out = batching.split(v.float().cpu().numpy(), sizes)
        self.metrics.batch(self.k, len(x), len(items), time.perf_counter() - start)
        return out


@serve.deployment
class DecoderServer:
    """A latent dataset's VAE decoder, loaded verified from the store's pinned copy, on the
    experts' device: final latents -> images, once per request. Decoding runs in a thread,
    so a replica keeps answering health checks during a long decode."""

    def __init__(self, args: str):
        cfg = AppArgs.model_validate_json(args)
        torch.set_num_threads(cfg.torch_threads)
        s = open_store(cfg.store)
        manifest = DatasetManifest.load(s)
        if manifest.latents is None:
            raise ValueError(f"{cfg.store} holds images, not latents: there is nothing to decode")
        self.codec = LatentCodec.load(s, manifest.latents, cfg.device)

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        def run() -> np.ndarray:
            return self.codec.decode(torch.from_numpy(latents)).cpu().numpy()

        return await asyncio.to_thread(run)


_service: SamplingService | None = None  # this replica's; set by RouterServer.__init__


def current_service() -> SamplingService:
    """The replica's service. Serve ships the FastAPI app and the deployment class to the
    replica by value (with copies of their globals), so both reach the one service through
    module functions, which are pickled by reference: this one and `install_service`."""
    if _service is None:
        raise RuntimeError("the router replica has not finished starting")
    return _service


def install_service(service: SamplingService) -> None:
    global _service
    _service = service


api = make_api(current_service)


@serve.deployment
class ExpertRoster:
    """The app's expert deployments, bound here rather than into the router: adding one
    changes this deployment's arguments only, so the router takes a new expert set from
    its `user_config` in place (no restart, requests in flight keep theirs) and reaches the
    experts by name."""

    def __init__(self, *experts):
        pass  # bound only so that Serve deploys them; the router calls them by name


@serve.deployment
@serve.ingress(api)
class RouterServer:
    """The HTTP ingress: routes every step and fans out to the expert deployments. Its
    `user_config` (RouterConfig) is the expert set: the cards build_app pinned."""

    def __init__(self, args: str, roster=None, decoder=None):
        self.cfg = AppArgs.model_validate_json(args)
        torch.set_num_threads(self.cfg.router_torch_threads)
        self.roster, self.decoder = roster, decoder
        self.app_name = serve.get_replica_context().app_name
        self._counts: tuple[float, dict[str, int]] = (0.0, {})
        self.models: StoreModels | None = None

    def reconfigure(self, config: dict) -> None:
        """The first call (as the replica starts) loads the store's routing models for
        these cards; a later one (`serve deploy` of a changed registry) offers the new set
        to the running service."""
        given = RouterConfig.model_validate(config)
        if self.models is not None:
            offered = self.models.expert_set_of(given.experts, given.registry, given.router)
            current_service().offer(offered)
            return
        cfg = self.cfg
        metrics = RouterMetrics()
        remote = RemoteExperts(
            (),
            cfg.expert_timeout_s,
            cfg.expert_retries,
            cfg.expert_down_for_s,
            metrics,
            lookup=self._handle,
        )
        self.models = StoreModels(
            cfg.store, cards=given.experts, registry_version=given.registry, router=given.router
        )
        decoder = self.decoder
        install_service(
            SamplingService(
                self.models,
                remote,
                cfg.limits,
                Admission(cfg.max_concurrent_requests, cfg.max_queued_requests),
                metrics,
                cfg.api_key,
                self.replica_counts,
                default_strategy=cfg.default_strategy,
                decoder=None if decoder is None else RemoteDecoder(decoder, cfg.expert_timeout_s),
                allowed_hosts=cfg.allowed_hosts,
                request_ids_from_proxy=True,  # Serve's proxy ids every request and response
                step_window_s=cfg.step_window_s,
                step_max_rows=cfg.step_max_rows,
            )
        )

    def _handle(self, k: int):
        return serve.get_deployment_handle(expert_name(k), app_name=self.app_name)

    async def replica_counts(self) -> dict[str, int]:
        """RUNNING replicas per deployment of this app, from the controller (cached 1 s)."""
        at, counts = self._counts
        if time.monotonic() - at > 1.0:
            try:
                status = await asyncio.to_thread(serve.status)
            except Exception as e:  # the controller mid-update: the last counts stand
                log.warning(
                    "serve.status() failed (%s: %s); using the last replica counts",
                    type(e).__name__,
                    str(e)[:200],
                )
                return counts
            app = status.applications.get(self.app_name)
            deployments = app.deployments if app is not None else {}
            counts = {name: d.replica_states.get("RUNNING", 0) for name, d in deployments.items()}
            self._counts = (time.monotonic(), counts)
        return counts
