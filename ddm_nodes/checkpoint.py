"""The one checkpoint format: a diffusers folder plus training.json and a sha256 manifest.

    <prefix>/config.json                         diffusers config (`_class_name` says which model)
    <prefix>/diffusion_pytorch_model.safetensors the weights to sample with (the EMA weights)
    <prefix>/training.json                       typed model spec + training config
    <prefix>/state.safetensors                   resumable state (raw weights, optimizer)
    <prefix>/manifest.json                       sha256 of every file, step, images seen, loss...

The manifest is written last, so a folder without one is incomplete and is never loaded.
Loading verifies every file's sha256 before it is parsed and refuses a mismatch; only
safetensors and JSON are read, nothing is ever unpickled. Model classes come from a fixed
allow-list, never from the checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from ddm_nodes import __version__
from ddm_nodes.errors import ManifestError
from ddm_nodes.experts import DENOISER_CLASSES
from ddm_nodes.features import safetensors_metadata
from ddm_nodes.names import Kind
from ddm_nodes.router_net import RouterNet
from ddm_nodes.store import Store, sha256_bytes
from ddm_nodes.versioned_json import parse_versioned

CHECKPOINT_FORMAT = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
TRAINING_FILE = "training.json"
STATE_FILE = "state.safetensors"
MANIFEST_FILE = "manifest.json"
MODEL_CLASSES: dict[str, type] = {
    **DENOISER_CLASSES,
    RouterNet.__name__: RouterNet,
    AutoencoderKL.__name__: AutoencoderKL,  # `ddm train vae`
}


class CheckpointManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(CHECKPOINT_FORMAT, strict=True, ge=1, le=CHECKPOINT_FORMAT)
    kind: Kind
    cluster: int | None = Field(None, description="the data cluster an expert saw")
    step: int = Field(ge=0)
    images_seen: int = Field(ge=0)
    loss: float | None = Field(None, description="mean training loss near this step")
    data_store: str = Field(description="store URI of the data it trained on")
    final: bool = Field(description="True for the finished model, False mid-training")
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")
    sha256: str = Field("", description="sha256 of the weights file")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    ddm_version: str = __version__


@dataclass
class Loaded:
    model: torch.nn.Module
    training: dict[str, Any]
    manifest: CheckpointManifest


def save_checkpoint(
    store: Store,
    prefix: str,
    model: Any,
    training: dict[str, Any],
    manifest: CheckpointManifest,
    state: dict[str, torch.Tensor] | None = None,
    state_meta: dict[str, Any] | None = None,
) -> CheckpointManifest:
    """Write a checkpoint folder under `prefix`; the manifest goes last."""
    store.delete([f"{prefix}/{MANIFEST_FILE}"])  # the folder is incomplete until it returns
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        Path(tmp, TRAINING_FILE).write_text(json.dumps(training, indent=2, default=str))
        if state is not None:
            meta = {"meta": json.dumps(state_meta or {})}
            save_file({k: v.contiguous() for k, v in state.items()}, Path(tmp, STATE_FILE), meta)
        files = {}
        for name in sorted(os.listdir(tmp)):
            data = Path(tmp, name).read_bytes()
            store.put_bytes(f"{prefix}/{name}", data)
            files[name] = sha256_bytes(data)
    done = manifest.model_copy(update={"files": files, "sha256": files[WEIGHTS_FILE]})
    store.put_bytes(f"{prefix}/{MANIFEST_FILE}", done.model_dump_json(indent=2).encode())
    return done


def has_checkpoint(store: Store, prefix: str) -> bool:
    """Whether a checkpoint (its manifest) exists under `prefix`."""
    return store.exists(f"{prefix}/{MANIFEST_FILE}")


def read_manifest(store: Store, prefix: str) -> CheckpointManifest:
    key = f"{prefix}/{MANIFEST_FILE}"
    if not store.exists(key):
        raise ManifestError(f"no checkpoint at {store.url(prefix)} (no {MANIFEST_FILE})")
    return parse_versioned(
        CheckpointManifest,
        store.get_bytes(key),
        store.url(key),
        CHECKPOINT_FORMAT,
        "checkpoint manifest",
        "train it again (or restore the folder)",
    )


def fetch_verified(store: Store, prefix: str, manifest: CheckpointManifest, name: str) -> bytes:
    if name not in manifest.files:
        raise ManifestError(f"checkpoint {store.url(prefix)} has no {name}")
    return store.get_verified(f"{prefix}/{name}", manifest.files[name])


def load_model(store: Store, prefix: str, kind: Kind | None = None) -> Loaded:
    """The verified model of a checkpoint folder, in eval mode on the CPU."""
    manifest = read_manifest(store, prefix)
    if kind is not None and manifest.kind != kind:
        raise ManifestError(f"{store.url(prefix)} holds a {manifest.kind}, not a {kind}")
    config = json.loads(fetch_verified(store, prefix, manifest, CONFIG_FILE))
    cls = MODEL_CLASSES.get(config.get("_class_name", ""))
    if cls is None:
        raise ManifestError(
            f"{store.url(prefix)} holds a {config.get('_class_name')!r}; ddm loads only "
            f"{sorted(MODEL_CLASSES)}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, CONFIG_FILE).write_text(json.dumps(config))
        Path(tmp, WEIGHTS_FILE).write_bytes(fetch_verified(store, prefix, manifest, WEIGHTS_FILE))
        model = cls.from_pretrained(tmp, use_safetensors=True, low_cpu_mem_usage=False)
    training = json.loads(fetch_verified(store, prefix, manifest, TRAINING_FILE))
    return Loaded(model.eval(), training, manifest)


def load_state(
    store: Store, prefix: str, manifest: CheckpointManifest
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The resumable training state saved with a checkpoint: (tensors, metadata)."""
    data = fetch_verified(store, prefix, manifest, STATE_FILE)
    meta = safetensors_metadata(data)
    return load_safetensors(data), json.loads(meta.get("meta", "{}"))


def optimizer_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into safetensors-able tensors and JSON metadata."""
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
