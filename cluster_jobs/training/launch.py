"""The launcher: one Ray Train `TorchTrainer` per job, `workers` data-parallel ranks of
`worker.train_loop`, each receiving the job's whole `TrainConfig` (its JSON), with its
number of loader workers decided here, where their CPUs are reserved."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass

from cluster_jobs.training.config import TrainConfig
from cluster_jobs.training.loader import loader_workers
from cluster_jobs.training.tasks import validate
from cluster_jobs.training.worker import loop_config, train_loop
from ddm_nodes.checkpoint import TRAINING_FILE, fetch_verified, has_checkpoint, read_manifest

log = logging.getLogger("ddm.train")


@dataclass
class TrainOutcome:
    name: str
    prefix: str
    step: int
    images_seen: int
    loss: float | None
    skipped: bool = False
    images_per_s: float | None = None
    evaluation: dict | None = None  # the final checkpoint's (featnet accuracy, VAE error)


def _evaluation(store, prefix: str) -> dict | None:
    """What the final checkpoint's training.json records of its held-out evaluation."""
    manifest = read_manifest(store, prefix)
    return json.loads(fetch_verified(store, prefix, manifest, TRAINING_FILE)).get("evaluation")


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
            return TrainOutcome(
                cfg.name,
                cfg.prefix,
                done.step,
                done.images_seen,
                done.loss,
                True,
                evaluation=_evaluation(store, cfg.prefix),
            )
    if cfg.restart:
        store.delete(store.list(cfg.prefix + "/"))

    ray.init(ignore_reinit_error=True, log_to_driver=True)
    workers = loader_workers(cfg, lambda: _rank_cpus(cfg))
    cfg = cfg.model_copy(update={"loader_workers": workers})  # what the ranks run with
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config(cfg),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.device == "cuda",
            # the rank's training threads and its data-loader processes
            resources_per_worker={"CPU": cfg.cpus_per_worker + cfg.loader_workers},
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
        evaluation=_evaluation(store, cfg.prefix) if has_checkpoint(store, cfg.prefix) else None,
    )


def _rank_cpus(cfg: TrainConfig) -> float:
    """The CPUs one rank can have on the node with the most per rank, as Ray counts them: a
    GPU node's CPUs are shared by the ranks its GPUs take."""
    import ray

    best = 0.0
    for node in ray.nodes():
        res = node["Resources"] if node["Alive"] else {}
        ranks = min(cfg.workers, int(res.get("GPU", 0))) if cfg.device == "cuda" else 1
        if ranks > 0:
            best = max(best, res.get("CPU", 0.0) / ranks)
    return best
