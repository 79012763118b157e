"""Training as Ray jobs: one worker, one launcher.

The launcher runs a Ray Train `TorchTrainer` with `workers` data-parallel workers; inside
each worker Hugging Face Accelerate owns the device, mixed precision and the DDP wrapping
(`accelerator.prepare`, not Ray's prepare_model). An expert's workers form a process group
of their own: no expert ever joins another's, and an expert reads only its own cluster
(train_tasks.training_clusters).

The worker itself (`Worker`) knows Ray only through a small `Reporter`, so the same loop
runs under Ray Train (`RayReporter`) or in a plain process (`LocalReporter`: tests,
benchmarks, a GPU box without Ray).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from cluster_jobs.train_checkpoints import (
    TrainState,
    find_resume_point,
    restore,
    save_training_checkpoint,
)
from cluster_jobs.train_config import TrainConfig
from cluster_jobs.train_tasks import (
    FlowTask,
    batch_stream,
    ema_decay_at,
    lr_at,
    make_task,
    training_clusters,
)
from ddm_nodes import flow
from ddm_nodes.checkpoint import has_checkpoint, read_manifest
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import DDMError
from ddm_nodes.experts import Expert
from ddm_nodes.store import Store, open_store

log = logging.getLogger("ddm.train")


class Reporter(Protocol):
    """How a worker talks to whatever runs it."""

    def resume_pointer(self) -> dict | None: ...

    def report(self, metrics: dict[str, Any], pointer: dict | None) -> None: ...

    def progress(self, cfg: TrainConfig, loss: float, rate: float, state: TrainState) -> None: ...


class RayReporter:
    """Ray Train: checkpoints are reported (every rank reports; rank 0 attaches the pointer)
    and progress goes to Prometheus through Ray's metrics exporter (`ray_` name prefix)."""

    def __init__(self, cfg: TrainConfig):
        from ray.util.metrics import Gauge

        keys = ("kind", "expert")
        self.tags = {"kind": cfg.kind, "expert": cfg.name}
        self.loss = Gauge("ddm_train_loss", "training loss (mean of the log window)", keys)
        self.rate = Gauge("ddm_train_images_per_second", "training throughput", keys)
        self.step = Gauge("ddm_train_step", "optimizer steps done", keys)
        self.total = Gauge("ddm_train_steps_total", "optimizer steps planned", keys)
        self.seen = Gauge("ddm_train_images_seen", "training images consumed", keys)
        self.total.set(cfg.steps, self.tags)

    def resume_pointer(self) -> dict | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return json.loads(Path(d, "pointer.json").read_text())

    def report(self, metrics: dict[str, Any], pointer: dict | None) -> None:
        import ray.train

        if pointer is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            Path(d, "pointer.json").write_text(json.dumps(pointer))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def progress(self, cfg: TrainConfig, loss: float, rate: float, state: TrainState) -> None:
        self.loss.set(loss, self.tags)
        self.rate.set(rate, self.tags)
        self.step.set(state.step, self.tags)
        self.seen.set(state.images_seen, self.tags)


class LocalReporter:
    """A plain process: no framework checkpoint; reports are kept for the caller."""

    def __init__(self):
        self.reports: list[dict[str, Any]] = []

    def resume_pointer(self) -> dict | None:
        return None

    def report(self, metrics: dict[str, Any], pointer: dict | None) -> None:
        self.reports.append(metrics)

    def progress(self, cfg: TrainConfig, loss: float, rate: float, state: TrainState) -> None:
        pass


class Worker:
    """One data-parallel rank of one job: builds, resumes, trains, checkpoints."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, reporter: Reporter):
        from accelerate import Accelerator

        self.cfg, self.rank, self.world, self.reporter = cfg, rank, world, reporter
        if cfg.device == "cpu":
            torch.set_num_threads(max(1, math.floor(cfg.cpus_per_worker)))
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu")
        log.info(
            "%s: rank %d of %d in this job's own process group (device %s, %s precision)",
            cfg.name,
            rank,
            world,
            self.accelerator.device,
            cfg.mixed_precision,
        )
        self.store = open_store(cfg.store)
        self.manifest = DatasetManifest.load(self.store)
        self.task = make_task(cfg, self.manifest)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = self.task.build()
        self.ema = copy.deepcopy(model).requires_grad_(False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.state = TrainState()
        # With --restart the launcher emptied the store's checkpoints first.
        resume = find_resume_point(cfg, self.store, reporter.resume_pointer())
        if resume is not None:
            self.state = restore(cfg, self.task, self.store, resume, model, self.ema, optimizer)
            log.info(
                "%s: resumed from %s at step %d", cfg.name, self.store.url(resume), self.state.step
            )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.ema.to(self.accelerator.device)
        self.window: list[float] = []

    def run(self) -> dict[str, Any]:
        """Train to `cfg.steps`; returns the final report's metrics."""
        cfg, state = self.cfg, self.state
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + self.rank * 1009 + state.step)
        batches = batch_stream(cfg, self.store, self.manifest, self.rank, self.world)
        tick, tick_images = time.perf_counter(), 0
        started, start_images = None, 0  # throughput excludes start-up and the first step
        while state.step < cfg.steps:
            batch = next(batches)
            loss = self.step(batch, gen)
            n = batch["image"].shape[0] * self.world
            state.images_seen += n
            tick_images += n
            if started is None:
                started, start_images = time.perf_counter(), state.images_seen
            self.window = (self.window + [loss])[-cfg.log_every :]
            if state.step % cfg.log_every == 0 and self.rank == 0:
                now = time.perf_counter()
                rate = tick_images / (now - tick)
                mean = sum(self.window) / len(self.window)
                eta = (cfg.steps - state.step) * cfg.batch_size * self.world / max(rate, 1e-9)
                log.info(
                    "%s: step %d/%d loss %.4f images/s %.1f ETA %.0fs",
                    cfg.name,
                    state.step,
                    cfg.steps,
                    mean,
                    rate,
                    eta,
                )
                self.reporter.progress(cfg, mean, rate, state)
                tick, tick_images = now, 0
            if state.step % cfg.checkpoint_every == 0:
                self.checkpoint(final=False)
        throughput = None
        if started is not None and state.images_seen > start_images:
            throughput = (state.images_seen - start_images) / (time.perf_counter() - started)
        if state.step % cfg.checkpoint_every:  # so that training can be continued from here
            self.checkpoint(final=False)
        return self.checkpoint(final=True, throughput=throughput)

    def step(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> float:
        acc, cfg = self.accelerator, self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.state.step)
        with acc.autocast():
            loss = self.task.loss(self.model, batch, gen)
        acc.backward(loss)
        acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        flow.ema_update(self.ema, acc.unwrap_model(self.model), ema_decay_at(cfg, self.state.step))
        self.state.step += 1
        return loss.item()

    def checkpoint(self, final: bool, throughput: float | None = None) -> dict[str, Any]:
        """Rank 0 writes; every rank reports (Ray Train expects all of them to)."""
        state = self.state
        loss = sum(self.window) / len(self.window) if self.window else None
        metrics = {
            "step": state.step,
            "images_seen": state.images_seen,
            "loss": loss,
            "final": final,
            "images_per_s": throughput,
        }
        if self.rank != 0:
            self.reporter.report(metrics, None)
            return metrics
        prefix = save_training_checkpoint(
            self.cfg,
            self.task,
            self.store,
            self.accelerator.unwrap_model(self.model),
            self.ema,
            self.optimizer,
            state,
            loss,
            final,
        )
        metrics["prefix"] = prefix
        self.reporter.report(metrics, {"prefix": prefix, "step": state.step})
        log.info(
            "%s: %s checkpoint at step %d -> %s",
            self.cfg.name,
            "final" if final else "resumable",
            state.step,
            self.store.url(prefix),
        )
        return metrics


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function: one rank of ONE job."""
    import ray.train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = TrainConfig.model_validate(config)
    ctx = ray.train.get_context()
    Worker(cfg, ctx.get_world_rank(), ctx.get_world_size(), RayReporter(cfg)).run()


def train_local(cfg: TrainConfig) -> dict[str, Any]:
    """The same worker in this process, without Ray (single rank)."""
    validate(cfg)
    return Worker(cfg, 0, 1, LocalReporter()).run()


# --- the launcher ---------------------------------------------------------------------


@dataclass
class TrainOutcome:
    name: str
    prefix: str
    step: int
    images_seen: int
    loss: float | None
    skipped: bool = False
    images_per_s: float | None = None


def validate(cfg: TrainConfig) -> tuple[Store, DatasetManifest]:
    """Everything that can be checked before a worker group starts (~17 s saved per error)."""
    store = open_store(cfg.store)
    manifest = DatasetManifest.load(store)
    task = make_task(cfg, manifest)
    if isinstance(task, FlowTask):
        Expert.create(task.spec)  # image size vs patch / downsampling
    for k in training_clusters(cfg, manifest):
        for shard in manifest.shards("train", k):
            if not store.exists(shard.key):
                raise DDMError(
                    f"shard {store.url(shard.key)} of cluster {k} is missing; re-run "
                    "`ddm prepare --overwrite`"
                )
    return store, manifest


def launch(cfg: TrainConfig, storage_path: str | None = None) -> TrainOutcome:
    """Train one model with a Ray Train TorchTrainer (connects to the job's Ray cluster)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    store, _ = validate(cfg)
    if not cfg.restart and has_checkpoint(store, cfg.prefix):
        done = read_manifest(store, cfg.prefix)
        if done.final and done.step >= cfg.steps:
            log.info("%s: already trained to step %d; nothing to do", cfg.name, done.step)
            return TrainOutcome(cfg.name, cfg.prefix, done.step, done.images_seen, done.loss, True)
    if cfg.restart:
        store.delete(store.list(cfg.prefix + "/"))

    ray.init(ignore_reinit_error=True, log_to_driver=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=cfg.model_dump(),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.device == "cuda",
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=f"ddm-{cfg.name}-{cfg.config_hash()}",
            storage_path=storage_path or os.path.join(tempfile.gettempdir(), "ddm-ray-train"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()
    m = result.metrics or {}
    return TrainOutcome(
        cfg.name,
        m.get("prefix", cfg.prefix),
        m.get("step", 0),
        m.get("images_seen", 0),
        m.get("loss"),
        images_per_s=m.get("images_per_s"),
    )
