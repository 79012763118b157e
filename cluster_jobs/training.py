"""Training as Ray jobs: one worker function, one launcher, three tasks.

    expert    flow matching on ONE cluster's shards (the DDM's isolated experts)
    monolith  flow matching on every cluster's shards (the paper's "Monolithic" row)
    router    cross-entropy p(cluster | x_t, t) on every cluster's shards

The launcher runs a Ray Train `TorchTrainer`; inside each worker Hugging Face Accelerate
owns the device, mixed precision and the data-parallel wrapping (`accelerator.prepare`).
An expert's workers form a process group of their own: no expert ever joins another's.

Checkpoints go to the store (checkpoint.py's format) every `checkpoint_every` steps:
`<prefix>/checkpoints/step-NNNNNN/` plus an atomic `<prefix>/checkpoints/latest.json`
pointer, and the finished model to `<prefix>/` itself. A restarted worker group resumes
from `ray.train.get_checkpoint()`; a re-submitted job resumes from `latest.json`. Either
way at most `checkpoint_every` steps are lost.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load as load_safetensors

from cluster_jobs.shards import clusters_dataset
from ddm_nodes import flow
from ddm_nodes.checkpoint import (
    MONOLITH_PREFIX,
    ROUTER_PREFIX,
    TRAINING_FILE,
    WEIGHTS_FILE,
    CheckpointManifest,
    expert_prefix,
    fetch_verified,
    load_state,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_manifest,
    save_checkpoint,
)
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import DDMError
from ddm_nodes.experts import NULL_LABEL, Expert, ExpertSpec, get_preset
from ddm_nodes.router_net import RouterNet, get_router_preset
from ddm_nodes.store import Store, open_store

log = logging.getLogger("ddm.train")
Kind = Literal["expert", "router", "monolith"]
DEFAULT_EXPERT_PRESET = "unet-tiny"
DEFAULT_ROUTER_PRESET = "router-tiny"
LATEST = "checkpoints/latest.json"
# How a run is carried out, not what it trains: left out of the config hash.
SCHEDULING_FIELDS = {
    "restart",
    "max_failures",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "cpus_per_worker",
}


class TrainConfig(BaseModel):
    """Everything one training job needs; saved in training.json beside the weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    store: str = Field(description="store URI holding the prepared dataset")
    cluster: int | None = Field(None, ge=0, description="the expert's cluster (experts only)")
    preset: str = Field(DEFAULT_EXPERT_PRESET, description="EXPERT_PRESETS / ROUTER_PRESETS")
    steps: int = Field(1000, ge=1, le=10_000_000)
    batch_size: int = Field(64, ge=1, le=65_536, description="per worker")
    lr: float = Field(3e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    label_dropout: float = Field(0.1, ge=0, le=1, description="to the null label, for CFG")
    unconditional: bool = Field(False, description="ignore labels even when the data has them")
    workers: int = Field(1, ge=1, le=1024, description="data-parallel workers in this job")
    cpus_per_worker: float = Field(1.0, gt=0)
    device: Literal["cpu", "cuda"] = "cpu"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="step-numbered checkpoints retained")
    shuffle_buffer: int = Field(2000, ge=0)
    log_every: int = Field(50, ge=1)
    seed: int = Field(0, ge=0)
    max_failures: int = Field(2, ge=0, description="worker-group restarts Ray Train allows")
    restart: bool = Field(False, description="discard existing checkpoints and start over")

    @model_validator(mode="after")
    def _cluster_iff_expert(self) -> TrainConfig:
        if (self.kind == "expert") != (self.cluster is not None):
            raise ValueError("--cluster is required for experts and only for experts")
        if self.mixed_precision == "fp16" and self.device == "cpu":
            raise ValueError("fp16 needs --device cuda; use bf16 or no on the CPU")
        return self

    @property
    def prefix(self) -> str:
        if self.kind == "expert":
            return expert_prefix(self.cluster)
        return ROUTER_PREFIX if self.kind == "router" else MONOLITH_PREFIX

    @property
    def name(self) -> str:
        return f"expert-{self.cluster:03d}" if self.kind == "expert" else self.kind

    def config_hash(self) -> str:
        """Short hash of what determines the trained model (not how it is scheduled)."""
        fields = self.model_dump(exclude=SCHEDULING_FIELDS)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]


# --- tasks: what is learned, from which data ------------------------------------------


class FlowTask:
    """Flow matching: regress the velocity ε - x_0 at a logit-normal t."""

    def __init__(self, cfg: TrainConfig, manifest: DatasetManifest):
        h, w, c = manifest.image_shape
        if h != w:
            raise DDMError(f"experts need square images, the store has {h}x{w}")
        get_preset(cfg.preset)
        classes = 0 if cfg.unconditional or not manifest.labelled else len(manifest.class_names)
        self.spec = ExpertSpec(preset=cfg.preset, image_size=h, channels=c, num_classes=classes)
        self.cfg = cfg

    def build(self) -> torch.nn.Module:
        return Expert.create(self.spec)

    def weights_module(self, model: torch.nn.Module) -> Any:
        return model.denoiser  # the diffusers model that save_pretrained writes

    def loss(self, model, batch, gen: torch.Generator) -> torch.Tensor:
        x0, y = batch["image"], batch["label"]
        n = x0.shape[0]
        if not self.spec.conditional:
            y = torch.full_like(y, NULL_LABEL)
        elif self.cfg.label_dropout > 0:
            drop = torch.rand(n, generator=gen) < self.cfg.label_dropout
            y = torch.where(drop, NULL_LABEL, y)
        t = flow.logit_normal_t(n, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        path = flow.interpolate(x0, noise, t)
        dev = _device_of(model)
        pred = model(path.x_t.to(dev), t.to(dev), y.to(dev))
        return flow.loss(pred, _to(path, dev))

    def spec_json(self) -> dict[str, Any]:
        return self.spec.model_dump()


class RouterTask:
    """Cross-entropy on the cluster of x_0, at t uniform in [0, 1] (routing runs at every t)."""

    def __init__(self, cfg: TrainConfig, manifest: DatasetManifest):
        self.preset = get_router_preset(cfg.preset)
        self.channels = manifest.channels
        self.num_clusters = manifest.num_clusters

    def build(self) -> torch.nn.Module:
        return RouterNet.from_preset(self.preset.name, self.channels, self.num_clusters)

    def weights_module(self, model: torch.nn.Module) -> Any:
        return model

    def loss(self, model, batch, gen: torch.Generator) -> torch.Tensor:
        x0 = batch["image"]
        t = torch.rand(x0.shape[0], generator=gen)
        path = flow.interpolate(x0, torch.randn(x0.shape, generator=gen), t)
        dev = _device_of(model)
        logits = model(path.x_t.to(dev), t.to(dev))
        return torch.nn.functional.cross_entropy(logits.float(), batch["cluster"].to(dev))

    def spec_json(self) -> dict[str, Any]:
        return {
            "preset": self.preset.name,
            "channels": self.channels,
            "num_clusters": self.num_clusters,
        }


def make_task(cfg: TrainConfig, manifest: DatasetManifest) -> FlowTask | RouterTask:
    if cfg.kind == "expert" and not 0 <= cfg.cluster < manifest.num_clusters:
        raise DDMError(
            f"--cluster {cfg.cluster} is out of range: the store has clusters "
            f"0..{manifest.num_clusters - 1}"
        )
    return RouterTask(cfg, manifest) if cfg.kind == "router" else FlowTask(cfg, manifest)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(path: flow.PathSample, dev: torch.device) -> flow.PathSample:
    return flow.PathSample(path.t.to(dev), path.x_t.to(dev), path.velocity.to(dev))


# --- data -----------------------------------------------------------------------------


def training_clusters(cfg: TrainConfig, manifest: DatasetManifest) -> list[int]:
    """Isolation lives here: an expert sees its own cluster and nothing else."""
    return [cfg.cluster] if cfg.kind == "expert" else list(range(manifest.num_clusters))


def batch_stream(
    cfg: TrainConfig,
    store: Store,
    manifest: DatasetManifest,
    rank: int = 0,
    world: int = 1,
    split: Literal["train", "heldout"] = "train",
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches {image, label, cluster}, reshuffled every epoch."""
    clusters = training_clusters(cfg, manifest)
    epoch = 0
    while True:
        pipeline = clusters_dataset(
            store,
            clusters,
            split,
            manifest=manifest,
            shuffle=cfg.shuffle_buffer,
            seed=cfg.seed + 7919 * epoch + rank,
            rank=rank,
            world_size=world,
        )
        buf: list[dict[str, Any]] = []
        yielded = False
        for sample in pipeline:
            buf.append(sample)
            if len(buf) == cfg.batch_size:
                yield _collate(buf)
                buf, yielded = [], True
        if not yielded:
            if buf:  # fewer samples than one batch: train on what there is
                yield _collate(buf)
            else:
                raise DDMError(f"{cfg.name}: no training samples in {store.uri}")
        epoch += 1


def _collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "cluster": torch.tensor([s["cluster"] for s in samples], dtype=torch.long),
    }


# --- checkpoints ----------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0
    images_seen: int = 0


def _step_prefix(cfg: TrainConfig, step: int) -> str:
    return f"{cfg.prefix}/checkpoints/step-{step:06d}"


def find_resume_point(cfg: TrainConfig, store: Store) -> str | None:
    """The newest checkpoint to resume from: Ray Train's (a restarted worker group, or a
    run restored under the same name) or the store's latest.json (a re-submitted job).
    Both can exist and disagree (Ray only knows the checkpoints it was told of), so the
    higher step wins."""
    import ray.train

    candidates = []
    ckpt = ray.train.get_checkpoint() if _in_ray_train() else None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            candidates.append(json.loads(Path(d, "pointer.json").read_text()))
    key = f"{cfg.prefix}/{LATEST}"
    if store.exists(key):
        candidates.append(json.loads(store.get_bytes(key)))
    return max(candidates, key=lambda c: c["step"])["prefix"] if candidates else None


def _in_ray_train() -> bool:
    try:
        import ray.train

        ray.train.get_context()
        return True
    except Exception:  # outside a Ray Train worker: no context to resume from
        return False


def save_training_checkpoint(
    cfg: TrainConfig,
    task,
    store: Store,
    model,
    ema,
    optimizer,
    state: TrainState,
    loss: float | None,
    final: bool,
) -> str:
    """Rank 0 only. Returns the prefix written."""
    prefix = cfg.prefix if final else _step_prefix(cfg, state.step)
    training = {
        "config": cfg.model_dump(),
        "model": task.spec_json(),
        "kind": cfg.kind,
        "config_hash": cfg.config_hash(),
    }
    manifest = CheckpointManifest(
        kind=cfg.kind,
        cluster=cfg.cluster,
        step=state.step,
        images_seen=state.images_seen,
        loss=loss,
        data_store=store.uri,
        final=final,
    )
    tensors, meta = None, None
    if not final:
        opt_tensors, opt_meta = optimizer_to_tensors(optimizer.state_dict())
        tensors = {
            **{f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()},
            **opt_tensors,
        }
        meta = {"optimizer": opt_meta, "step": state.step, "images_seen": state.images_seen}
    save_checkpoint(store, prefix, task.weights_module(ema), training, manifest, tensors, meta)
    if not final:
        store.put_bytes(
            f"{cfg.prefix}/{LATEST}", json.dumps({"prefix": prefix, "step": state.step}).encode()
        )
        _prune(cfg, store)
    return prefix


def _prune(cfg: TrainConfig, store: Store) -> None:
    keys = store.list(f"{cfg.prefix}/checkpoints/step-")
    folders = sorted({k.split("/")[-2] for k in keys}, key=lambda f: int(f.split("-")[1]))
    for old in folders[: -cfg.keep_checkpoints]:
        store.delete([k for k in keys if k.split("/")[-2] == old])


def restore(cfg: TrainConfig, task, store: Store, prefix: str, model, ema, optimizer) -> TrainState:
    manifest = read_manifest(store, prefix)
    tensors, meta = load_state(store, prefix, manifest)
    saved = json.loads(fetch_verified(store, prefix, manifest, TRAINING_FILE))
    if saved["model"] != task.spec_json():
        raise DDMError(
            f"{cfg.name}: checkpoint {store.url(prefix)} was trained with {saved['model']}, "
            f"not {task.spec_json()}; pass --restart to discard it"
        )
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema_weights = load_safetensors(fetch_verified(store, prefix, manifest, WEIGHTS_FILE))
    task.weights_module(ema).load_state_dict(ema_weights)
    optimizer.load_state_dict(optimizer_from_tensors(tensors, meta["optimizer"]))
    return TrainState(step=meta["step"], images_seen=meta["images_seen"])


# --- the worker function --------------------------------------------------------------


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant (EMA does the averaging)."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def ema_decay_at(cfg: TrainConfig, step: int) -> float:
    """EMA warm-up (as diffusers' EMAModel): short runs are not dominated by the init."""
    return min(cfg.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    cfg: TrainConfig,
    store: Store,
    manifest: DatasetManifest,
    max_images: int = 512,
    seed: int = 0,
) -> float:
    """Mean flow-matching loss on the held-out split of the model's clusters, with noise, t
    and (null) labels drawn from `seed`, so two models are compared on identical draws."""
    eval_cfg = cfg.model_copy(update={"shuffle_buffer": 0, "label_dropout": 0.0})
    task = make_task(eval_cfg, manifest)
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for k in training_clusters(cfg, manifest):
        for sample_batch in _finite_batches(eval_cfg, store, manifest, k):
            total += task.loss(model, sample_batch, gen).item() * len(sample_batch["image"])
            count += len(sample_batch["image"])
            if count >= max_images:
                return total / count
    if count == 0:
        raise DDMError(f"{cfg.name}: the held-out split is empty; prepare with --heldout > 0")
    return total / count


def _finite_batches(cfg: TrainConfig, store: Store, manifest: DatasetManifest, cluster: int):
    buf = []
    for sample in clusters_dataset(store, [cluster], "heldout", manifest=manifest):
        buf.append(sample)
        if len(buf) == cfg.batch_size:
            yield _collate(buf)
            buf = []
    if buf:
        yield _collate(buf)


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker of ONE job."""
    import ray.train
    from accelerate import Accelerator

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = TrainConfig.model_validate(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.device == "cpu":
        torch.set_num_threads(max(1, math.floor(cfg.cpus_per_worker)))
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu")
    log.info(
        "%s: rank %d of %d in this job's own process group (device %s, %s precision)",
        cfg.name,
        rank,
        world,
        accelerator.device,
        cfg.mixed_precision,
    )

    store = open_store(cfg.store)
    manifest = DatasetManifest.load(store)
    task = make_task(cfg, manifest)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = task.build()
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    state = TrainState()
    resume = find_resume_point(cfg, store)  # with --restart the launcher emptied the store
    if resume is not None:
        state = restore(cfg, task, store, resume, model, ema, optimizer)
        log.info("%s: resumed from %s at step %d", cfg.name, store.url(resume), state.step)

    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + rank * 1009 + state.step)
    batches = batch_stream(cfg, store, manifest, rank, world)
    metrics = _TrainMetrics(cfg)
    window: list[float] = []
    tick, tick_images = time.perf_counter(), 0
    first_step_done: float | None = None
    first_images = 0

    while state.step < cfg.steps:
        batch = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, state.step)
        with accelerator.autocast():
            loss = task.loss(model, batch, gen)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        flow.ema_update(ema, accelerator.unwrap_model(model), ema_decay_at(cfg, state.step))
        state.step += 1
        n_rank = batch["image"].shape[0]
        n = n_rank * world
        state.images_seen += n
        tick_images += n
        if first_step_done is None:  # throughput excludes start-up and the first step
            first_step_done, first_images = time.perf_counter(), state.images_seen
        window = (window + [loss.item()])[-cfg.log_every :]

        if state.step % cfg.log_every == 0 and rank == 0:
            now = time.perf_counter()
            rate = tick_images / (now - tick)
            eta = (cfg.steps - state.step) * cfg.batch_size * world / max(rate, 1e-9)
            log.info(
                "%s: step %d/%d loss %.4f images/s %.1f ETA %.0fs",
                cfg.name,
                state.step,
                cfg.steps,
                sum(window) / len(window),
                rate,
                eta,
            )
            metrics.update(sum(window) / len(window), rate, state)
            tick, tick_images = now, 0
        if state.step % cfg.checkpoint_every == 0:
            _report(
                cfg,
                task,
                store,
                accelerator,
                model,
                ema,
                optimizer,
                state,
                window,
                rank,
                final=False,
            )
    throughput = None
    if first_step_done is not None and state.images_seen > first_images:
        throughput = (state.images_seen - first_images) / (time.perf_counter() - first_step_done)
    if state.step % cfg.checkpoint_every:  # so that training can later be continued from here
        _report(
            cfg, task, store, accelerator, model, ema, optimizer, state, window, rank, final=False
        )
    _report(
        cfg,
        task,
        store,
        accelerator,
        model,
        ema,
        optimizer,
        state,
        window,
        rank,
        final=True,
        throughput=throughput,
    )


def _report(
    cfg,
    task,
    store,
    accelerator,
    model,
    ema,
    optimizer,
    state,
    window,
    rank,
    final,
    throughput=None,
):
    """Rank 0 writes the checkpoint; every rank reports (Ray Train expects all to)."""
    import ray.train

    loss = sum(window) / len(window) if window else None
    metrics = {
        "step": state.step,
        "images_seen": state.images_seen,
        "loss": loss,
        "final": final,
        "images_per_s": throughput,
    }
    if rank != 0:
        ray.train.report(metrics)
        return
    prefix = save_training_checkpoint(
        cfg, task, store, accelerator.unwrap_model(model), ema, optimizer, state, loss, final
    )
    metrics["prefix"] = prefix
    with tempfile.TemporaryDirectory() as d:
        Path(d, "pointer.json").write_text(json.dumps({"prefix": prefix, "step": state.step}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    log.info(
        "%s: %s checkpoint at step %d -> %s",
        cfg.name,
        "final" if final else "resumable",
        state.step,
        store.url(prefix),
    )


class _TrainMetrics:
    """Progress for Prometheus through Ray's metrics exporter (names get a `ray_` prefix)."""

    def __init__(self, cfg: TrainConfig):
        from ray.util.metrics import Gauge

        tags = ("kind", "expert")
        self.tags = {"kind": cfg.kind, "expert": cfg.name}
        self.loss = Gauge("ddm_train_loss", "training loss (mean of the log window)", tags)
        self.rate = Gauge("ddm_train_images_per_second", "training throughput", tags)
        self.step = Gauge("ddm_train_step", "optimizer steps done", tags)
        self.total = Gauge("ddm_train_steps_total", "optimizer steps planned", tags)
        self.seen = Gauge("ddm_train_images_seen", "training images consumed", tags)
        self.total.set(cfg.steps, self.tags)

    def update(self, loss: float, rate: float, state: TrainState) -> None:
        self.loss.set(loss, self.tags)
        self.rate.set(rate, self.tags)
        self.step.set(state.step, self.tags)
        self.seen.set(state.images_seen, self.tags)


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
    if not cfg.restart and store.exists(f"{cfg.prefix}/manifest.json"):
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
    )
