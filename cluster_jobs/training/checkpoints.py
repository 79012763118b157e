"""Training checkpoints in the store (checkpoint.py's format).

Every `checkpoint_every` steps rank 0 writes `<prefix>/checkpoints/step-NNNNNN/` (weights,
EMA, optimizer state) and then the atomic pointer `<prefix>/checkpoints/latest.json`; the
finished model goes to `<prefix>/` itself. A job resumes from the newest of the store's
pointer and Ray Train's own checkpoint, so at most `checkpoint_every` steps are redone.
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
    fetch_verified,
    has_checkpoint,
    load_state,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_manifest,
    save_checkpoint,
)
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import DDMError
from ddm_nodes.store import Store

log = logging.getLogger("ddm.train")
LATEST = "checkpoints/latest.json"


@dataclass
class TrainState:
    step: int = 0
    images_seen: int = 0


def _step_prefix(cfg: TrainConfig, step: int) -> str:
    return f"{cfg.prefix}/checkpoints/step-{step:06d}"


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
) -> str:
    """Rank 0 only. Returns the prefix written; `node`: the Ray node rank 0 runs on."""
    prefix = cfg.prefix if final else _step_prefix(cfg, state.step)
    training = {
        "config": cfg.model_dump(),
        "model": task.spec_json(),
        "kind": cfg.kind,
        "config_hash": cfg.config_hash(),
        "node": node,
    }
    if final and hasattr(task, "evaluate"):  # e.g. the featnet's held-out accuracy
        training["evaluation"] = task.evaluate(
            task.weights_module(ema), store, DatasetManifest.load(store)
        )
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
