"""The launcher: one Ray Train `TorchTrainer` per job, `workers` data-parallel ranks of
`worker.train_loop`, each receiving the job's whole `TrainConfig` (its JSON), with its
number of loader workers decided here, where their CPUs are reserved.

Ray Train's run storage (its run state and the checkpoint pointers the ranks report) lives
in the store, under `ray-train/` (`run_storage`): on a cluster with no shared disk a
worker group restarted on another node finds it there, as it finds the weights."""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from cluster_jobs.training.checkpoints import RUN_STORAGE, discard_progress, find_resume_point
from cluster_jobs.training.config import TrainConfig
from cluster_jobs.training.loader import loader_workers
from cluster_jobs.training.tasks import validate
from cluster_jobs.training.worker import loop_config, train_loop
from cluster_jobs.training.writer_lock import writer_lock
from ddm_nodes.checkpoint import (
    TRAINING_FILE,
    check_dataset,
    fetch_verified,
    has_checkpoint,
    open_checkpoint,
)
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.store import S3Store, Store

log = logging.getLogger("ddm.train")
RETRAIN = "retrain it with --restart (`ddm submit --force`)"


def run_storage(store: Store) -> tuple[str, Any]:
    """Ray Train's (storage_path, storage_filesystem) inside `store`: `<dir>/ray-train`, or
    `bucket/prefix/ray-train` on a `pyarrow.fs.S3FileSystem` that reaches the same S3
    endpoint as boto3 does (AWS_ENDPOINT_URL). Ray would otherwise build its own
    filesystem from the URI, which ignores AWS_ENDPOINT_URL. Credentials are not put in the
    filesystem: every node resolves them from its own environment, as boto3 does."""
    if not isinstance(store, S3Store):
        return os.path.join(str(store.root), RUN_STORAGE), None
    from pyarrow.fs import S3FileSystem

    options: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)  # boto3 refuses one without a scheme before this
        options |= {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    path = "/".join(p for p in (store.bucket, store.prefix, RUN_STORAGE) if p)
    return path, S3FileSystem(**options)


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
    ckpt = open_checkpoint(store, prefix)
    return json.loads(fetch_verified(store, ckpt, TRAINING_FILE)).get("evaluation")


def already_trained(cfg: TrainConfig, store: Store) -> TrainOutcome | None:
    """The outcome of a published model that already satisfies `cfg`, else None. A model or
    resumable checkpoint trained on another clustering of the store is refused (a
    DDMError): it is not "done", and resuming it would continue another data set's run."""
    if cfg.restart:
        return None
    dataset = DatasetManifest.load(store)
    resume = find_resume_point(cfg, store)
    if resume is not None:
        check_dataset(store, open_checkpoint(store, resume), dataset, cfg.name, RETRAIN)
    if not has_checkpoint(store, cfg.prefix):
        return None
    ckpt = open_checkpoint(store, cfg.prefix)
    check_dataset(store, ckpt, dataset, cfg.name, RETRAIN)
    done = ckpt.manifest
    if not (done.final and done.step >= cfg.steps):
        return None
    log.info("%s: already trained to step %d; nothing to do", cfg.name, done.step)
    evaluation = json.loads(fetch_verified(store, ckpt, TRAINING_FILE)).get("evaluation")
    return TrainOutcome(
        cfg.name, cfg.prefix, done.step, done.images_seen, done.loss, True, evaluation=evaluation
    )


def _exit_on_sigterm() -> None:
    """`ray job stop` sends SIGTERM: unwind (releasing the writer lock) instead of dying."""

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def launch(cfg: TrainConfig) -> TrainOutcome:
    """Train one model with a Ray Train TorchTrainer (connects to the job's Ray cluster)."""
    store, _ = validate(cfg)
    done = already_trained(cfg, store)
    if done is not None:
        return done
    _exit_on_sigterm()
    with writer_lock(cfg, store):
        return _fit(cfg, store)


def _fit(cfg: TrainConfig, store: Store) -> TrainOutcome:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_name = f"ddm-{cfg.name}-{cfg.config_hash()}"
    if cfg.restart:  # Ray's run of the same name would hand the ranks its old pointer
        discard_progress(cfg, store, run_name)

    ray.init(ignore_reinit_error=True, log_to_driver=True)
    storage_path, storage_filesystem = run_storage(store)
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
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
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
