"""Training checkpoints in the store (checkpoint.py's format).

Every `checkpoint_every` steps rank 0 writes `<prefix>/checkpoints/step-NNNNNN/` (weights,
EMA, optimizer state) and then the atomic pointer `<prefix>/checkpoints/latest.json`; the
finished model is published as a new version behind `<prefix>/current.json`
(checkpoint.publish_checkpoint), so the model being served stays whole until its successor
has been written and read back. A job resumes from the newest of the store's pointer and
Ray Train's own checkpoint, so at most `checkpoint_every` steps are redone. Only the job
holding the prefix's writer lock (writer_lock.py) writes any of it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from safetensors.torch import load as load_safetensors

from cluster_jobs.training.config import TrainConfig
from ddm_nodes.checkpoint import (
    TRAINING_FILE,
    WEIGHTS_FILE,
    CheckpointManifest,
    check_dataset,
    fetch_verified,
    has_checkpoint,
    load_state,
    open_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    publish_checkpoint,
    save_checkpoint,
)
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import DDMError
from ddm_nodes.store import Store

log = logging.getLogger("ddm.train")
LATEST = "checkpoints/latest.json"
RUN_STORAGE = "ray-train"  # the store's folder for Ray Train's run storage


@dataclass
class TrainState:
    step: int = 0
    images_seen: int = 0


def _step_prefix(cfg: TrainConfig, step: int) -> str:
    return f"{cfg.prefix}/checkpoints/step-{step:06d}"


def discard_progress(cfg: TrainConfig, store: Store, run_name: str | None = None) -> None:
    """What `--restart` discards before training: the resumable checkpoints (and Ray Train's
    run of `run_name`), never the published model, which stays servable until the new one
    is published over it."""
    keys = store.list(f"{cfg.prefix}/checkpoints/")
    if run_name is not None:
        keys += store.list(f"{RUN_STORAGE}/{run_name}/")
    store.delete(keys)


def find_resume_point(
    cfg: TrainConfig, store: Store, framework_pointer: dict | None = None
) -> str | None:
    """The newest checkpoint to resume from: the framework's (Ray Train restarting a worker
    group, or restoring a run of the same name) or the store's latest.json (a job submitted
    again). Both can exist and disagree, since Ray only knows the checkpoints reported to
    it, so the higher step wins."""
    candidates = [framework_pointer] if framework_pointer else []
    if framework_pointer and not has_checkpoint(store, framework_pointer["prefix"]):
        # Ray Train's run storage outlives the store: a store prepared again under the
        # same path leaves Ray a pointer to a checkpoint that is gone. Start from the store.
        log.warning(
            "%s: Ray Train's checkpoint points at %s, which the store no longer has; ignored",
            cfg.name,
            store.url(framework_pointer["prefix"]),
        )
        candidates = []
    key = f"{cfg.prefix}/{LATEST}"
    if store.exists(key):
        candidates.append(json.loads(store.get_bytes(key)))
    return max(candidates, key=lambda c: c["step"])["prefix"] if candidates else None


def save_training_checkpoint(
    cfg: TrainConfig,
    task,
    store: Store,
    model,
    ema,
    optimizer,
    state: TrainState,
    loss: float | None,
    *,
    final: bool,
    node: dict | None = None,
    dataset: DatasetManifest,
) -> str:
    """Rank 0 only. Returns the prefix written (a final model: `cfg.prefix`, where its
    pointer is); `node`: the Ray node rank 0 runs on; `dataset`: what it trained on."""
    prefix = cfg.prefix if final else _step_prefix(cfg, state.step)
    training = {
        "config": cfg.model_dump(),
        "model": task.spec_json(),
        "kind": cfg.kind,
        "config_hash": cfg.config_hash(),
        "node": node,
    }
    if final and hasattr(task, "evaluate"):  # e.g. the featnet's held-out accuracy
        training["evaluation"] = task.evaluate(task.weights_module(ema), store, dataset)
    manifest = CheckpointManifest(
        kind=cfg.kind,
        cluster=cfg.cluster,
        step=state.step,
        images_seen=state.images_seen,
        loss=loss,
        data_store=store.uri,
        dataset_sha256=dataset.sha256,
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
    if final:
        publish_checkpoint(store, prefix, task.weights_module(ema), training, manifest)
        return prefix
    save_checkpoint(store, prefix, task.weights_module(ema), training, manifest, tensors, meta)
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


def restore(
    cfg: TrainConfig,
    task,
    store: Store,
    prefix: str,
    model,
    ema,
    optimizer,
    dataset: DatasetManifest,
) -> TrainState:
    ckpt = open_checkpoint(store, prefix)
    check_dataset(store, ckpt, dataset, cfg.name, "pass --restart (`ddm submit --force`)")
    tensors, meta = load_state(store, ckpt)
    saved = json.loads(fetch_verified(store, ckpt, TRAINING_FILE))
    if saved["model"] != task.spec_json():
        raise DDMError(
            f"{cfg.name}: checkpoint {store.url(prefix)} was trained with {saved['model']}, "
            f"not {task.spec_json()}; pass --restart to discard it"
        )
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema_weights = load_safetensors(fetch_verified(store, ckpt, WEIGHTS_FILE))
    task.weights_module(ema).load_state_dict(ema_weights)
    optimizer.load_state_dict(optimizer_from_tensors(tensors, meta["optimizer"]))
    return TrainState(step=meta["step"], images_seen=meta["images_seen"])
