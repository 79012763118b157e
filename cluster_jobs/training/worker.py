"""One data-parallel rank of a training job (launch.py starts `workers` of them).

Inside each rank Hugging Face Accelerate owns the device, mixed precision and the DDP wrapping
(`accelerator.prepare`, not Ray's prepare_model). An expert's workers form a process group
of their own: no expert ever joins another's, and an expert reads only its own cluster
(tasks.training_clusters).

The worker itself (`Worker`) knows Ray only through a small `Reporter`, so the same loop
runs under Ray Train (`RayReporter`) or in a plain process (`LocalReporter`: tests,
benchmarks, a GPU box without Ray).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from cluster_jobs.training.checkpoints import (
    TrainState,
    discard_progress,
    find_resume_point,
    restore,
    save_training_checkpoint,
)
from cluster_jobs.training.config import TrainConfig
from cluster_jobs.training.tasks import (
    batch_stream,
    ema_decay_at,
    lr_at,
    make_task,
    validate,
)
from cluster_jobs.training.writer_lock import writer_lock
from ddm_nodes import flow
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.store import open_store

log = logging.getLogger("ddm.train")


class Reporter(Protocol):
    """How a worker talks to whatever runs it."""

    def resume_pointer(self) -> dict | None: ...

    def report(self, metrics: dict[str, Any], pointer: dict | None) -> None: ...

    def progress(self, cfg: TrainConfig, loss: float, rate: float, state: TrainState) -> None: ...

    def node(self) -> dict | None: ...  # where this rank runs, for training.json


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

    def node(self) -> dict | None:
        """This rank's Ray node: its id and its `ddm-node-<i>` resource (`ddm cluster up
        --nodes`), so a job's checkpoint says which node wrote it."""
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        resources = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id), {})
        named = sorted(r for r in resources if r.startswith("ddm-node-"))
        return {"node_id": node_id, "ddm_node": named[0] if named else None}

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

    def node(self) -> dict | None:
        return None


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
            self.state = restore(
                cfg, self.task, self.store, resume, model, self.ema, optimizer, self.manifest
            )
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
            n = batch["label"].shape[0] * self.world
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

    def checkpoint(self, *, final: bool, throughput: float | None = None) -> dict[str, Any]:
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
            final=final,
            node=self.reporter.node(),
            dataset=self.manifest,
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


def loop_config(cfg: TrainConfig) -> dict[str, str]:
    """What Ray Train hands every rank: the job's whole TrainConfig, as its JSON."""
    return {"config": cfg.model_dump_json()}


def config_of(loop: dict[str, str]) -> TrainConfig:
    """The TrainConfig a rank receives (`loop_config`'s inverse)."""
    return TrainConfig.model_validate_json(loop["config"])


def train_loop(loop: dict[str, str]) -> None:
    """The Ray Train worker function: one rank of ONE job."""
    import ray.train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config_of(loop)
    ctx = ray.train.get_context()
    Worker(cfg, ctx.get_world_rank(), ctx.get_world_size(), RayReporter(cfg)).run()


def train_local(cfg: TrainConfig) -> dict[str, Any]:
    """The same worker in this process, without Ray (single rank), under the same writer
    lock as a job."""
    store, _ = validate(cfg)
    with writer_lock(cfg, store):
        if cfg.restart:  # as the launcher does before any worker starts
            discard_progress(cfg, store)
        return Worker(cfg, 0, 1, LocalReporter()).run()
