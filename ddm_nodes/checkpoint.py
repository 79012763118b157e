"""The one checkpoint format: a diffusers folder plus training.json and a sha256 manifest.

    <folder>/config.json                         diffusers config (`_class_name` says which model)
    <folder>/diffusion_pytorch_model.safetensors the weights to sample with (the EMA weights)
    <folder>/training.json                       typed model spec + training config
    <folder>/state.safetensors                   resumable state (raw weights, optimizer)
    <folder>/manifest.json                       sha256 of every file, step, images seen, loss...

The manifest is written last, so a folder without one is incomplete and is never loaded.
Loading verifies every file's sha256 before it is parsed and refuses a mismatch; only
safetensors and JSON are read, nothing is ever unpickled. Model classes come from a fixed
allow-list, never from the checkpoint.

A finished model is published, not overwritten: `publish_checkpoint` writes a new folder
`<prefix>/versions/<version>/`, reads every file of it back against its sha256, and only
then replaces the pointer `<prefix>/current.json` (one atomic put) and deletes versions
older than the one it replaced. A crash or a full disk at any point leaves the pointer on
a whole, verified model; a replica pinned to the previous version can still load it.
Readers go through `open_checkpoint`, which follows the pointer (or reads a folder that
holds its own manifest: a step checkpoint, or a store written before versions).

Every checkpoint records the sha256 of the `dataset.json` it was trained on, and
`check_dataset` refuses one trained on another clustering of the store.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
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
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import IntegrityError, ManifestError
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
POINTER_FILE = "current.json"  # <prefix>/current.json: which version is the model
VERSIONS_FOLDER = "versions"
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
    dataset_sha256: str | None = Field(
        None, description="sha256 of the dataset.json it trained on (None: written before 0.2)"
    )
    final: bool = Field(description="True for the finished model, False mid-training")
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")
    sha256: str = Field("", description="sha256 of the weights file")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    ddm_version: str = __version__


class VersionPointer(BaseModel):
    """`<prefix>/current.json`: the published version of a model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(pattern=r"^[A-Za-z0-9._-]{1,100}$")
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    step: int = Field(ge=0)
    published_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint as found: the folder its files are in, its manifest, and the sha256
    of the manifest's bytes (which pins every file's)."""

    folder: str
    manifest: CheckpointManifest
    manifest_sha256: str


@dataclass
class Loaded:
    model: torch.nn.Module
    training: dict[str, Any]
    manifest: CheckpointManifest
    checkpoint: Checkpoint


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


def publish_checkpoint(
    store: Store,
    prefix: str,
    model: Any,
    training: dict[str, Any],
    manifest: CheckpointManifest,
) -> Checkpoint:
    """Publish a finished model under `prefix` (see the module docstring); returns it."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    version = f"step-{manifest.step:06d}-{stamp}-{uuid.uuid4().hex[:8]}"
    folder = f"{prefix}/{VERSIONS_FOLDER}/{version}"
    save_checkpoint(store, folder, model, training, manifest)
    return _publish_folder(store, prefix, version)


def copy_checkpoint(source: Store, checkpoint: Checkpoint, store: Store, prefix: str) -> Checkpoint:
    """Publish `checkpoint` of `source` under `prefix` of `store`, byte for byte: every file
    is read verified against its manifest, and the manifest itself is copied unchanged (so
    the copy has the same manifest sha256, and still names the data it was trained on)."""
    version = f"copied-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    folder = f"{prefix}/{VERSIONS_FOLDER}/{version}"
    for name in sorted(checkpoint.manifest.files):
        store.put_bytes(f"{folder}/{name}", fetch_verified(source, checkpoint, name))
    manifest = source.get_verified(
        f"{checkpoint.folder}/{MANIFEST_FILE}", checkpoint.manifest_sha256
    )
    store.put_bytes(f"{folder}/{MANIFEST_FILE}", manifest)  # last: the folder is whole now
    return _publish_folder(store, prefix, version)


def _publish_folder(store: Store, prefix: str, version: str) -> Checkpoint:
    """Point `prefix` at its written `version` once every file of it reads back verified."""
    folder = f"{prefix}/{VERSIONS_FOLDER}/{version}"
    published = _read_folder(store, folder)
    for name in published.manifest.files:  # a version is published only once it reads back
        fetch_verified(store, published, name)
    before = _pointer(store, prefix)
    pointer = VersionPointer(
        version=version, manifest_sha256=published.manifest_sha256, step=published.manifest.step
    )
    store.put_bytes(f"{prefix}/{POINTER_FILE}", pointer.model_dump_json(indent=2).encode())
    keep = {version} | ({before.version} if before is not None else set())
    stale = [
        key for key in store.list(f"{prefix}/{VERSIONS_FOLDER}/") if key.split("/")[-2] not in keep
    ]
    # a model written before versions: its files sit in the prefix itself
    legacy = [f"{prefix}/{name}" for name in (*_MODEL_FILES, MANIFEST_FILE)]
    store.delete(stale + legacy)
    return published


_MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TRAINING_FILE, STATE_FILE)


def _pointer(store: Store, prefix: str) -> VersionPointer | None:
    key = f"{prefix}/{POINTER_FILE}"
    if not store.exists(key):
        return None
    try:
        return VersionPointer.model_validate_json(store.get_bytes(key))
    except ValueError as e:
        raise ManifestError(
            f"{store.url(key)} is not a version pointer ({type(e).__name__}); train the model "
            "again (or restore the file)"
        ) from e


def has_checkpoint(store: Store, prefix: str) -> bool:
    """Whether a published model, or a checkpoint folder, exists under `prefix`."""
    return store.exists(f"{prefix}/{POINTER_FILE}") or store.exists(f"{prefix}/{MANIFEST_FILE}")


def open_checkpoint(store: Store, prefix: str) -> Checkpoint:
    """The checkpoint under `prefix`: the version its pointer names, else the folder itself."""
    pointer = _pointer(store, prefix)
    if pointer is None:
        return _read_folder(store, prefix)
    folder = f"{prefix}/{VERSIONS_FOLDER}/{pointer.version}"
    return open_pinned(store, folder, pointer.manifest_sha256)


def open_pinned(store: Store, folder: str, manifest_sha256: str) -> Checkpoint:
    """Exactly the checkpoint whose manifest has this sha256 (what a router advertised), or
    an IntegrityError: a replica never loads another model than the one it was deployed for."""
    if not store.exists(f"{folder}/{MANIFEST_FILE}"):
        raise IntegrityError(
            f"{store.url(folder)} is gone: the model was retrained and this version deleted "
            "since it was deployed; deploy again (`ddm serve`) to serve the current one"
        )
    found = _read_folder(store, folder)
    if found.manifest_sha256 != manifest_sha256:
        raise IntegrityError(
            f"{store.url(folder)}/{MANIFEST_FILE} has sha256 {found.manifest_sha256[:12]}..., "
            f"not the {manifest_sha256[:12]}... it was deployed with; deploy again"
        )
    return found


def _read_folder(store: Store, folder: str) -> Checkpoint:
    key = f"{folder}/{MANIFEST_FILE}"
    if not store.exists(key):
        raise ManifestError(f"no checkpoint at {store.url(folder)} (no {MANIFEST_FILE})")
    data = store.get_bytes(key)
    manifest = parse_versioned(
        CheckpointManifest,
        data,
        store.url(key),
        CHECKPOINT_FORMAT,
        "checkpoint manifest",
        "train it again (or restore the folder)",
    )
    return Checkpoint(folder, manifest, sha256_bytes(data))


def read_manifest(store: Store, prefix: str) -> CheckpointManifest:
    return open_checkpoint(store, prefix).manifest


def fetch_verified(store: Store, checkpoint: Checkpoint, name: str) -> bytes:
    if name not in checkpoint.manifest.files:
        raise ManifestError(f"checkpoint {store.url(checkpoint.folder)} has no {name}")
    return store.get_verified(f"{checkpoint.folder}/{name}", checkpoint.manifest.files[name])


def check_dataset(
    store: Store, checkpoint: Checkpoint, dataset: DatasetManifest, what: str, fix: str
) -> None:
    """ManifestError unless `checkpoint` was trained on this `dataset.json` (one recorded
    before hashes were kept passes: there is nothing to compare)."""
    trained_on = checkpoint.manifest.dataset_sha256
    if trained_on is not None and trained_on != dataset.sha256:
        raise ManifestError(
            f"{what} at {store.url(checkpoint.folder)} was trained on another clustering of "
            f"this store (dataset.json sha256 {trained_on[:12]}... then, "
            f"{dataset.sha256[:12]}... now: `ddm prepare --overwrite` replaced it); {fix}"
        )


def load_model(
    store: Store,
    prefix: str,
    kind: Kind | None = None,
    *,
    checkpoint: Checkpoint | None = None,
) -> Loaded:
    """The verified model under `prefix` (or of `checkpoint`), in eval mode on the CPU."""
    ckpt = checkpoint or open_checkpoint(store, prefix)
    manifest = ckpt.manifest
    if kind is not None and manifest.kind != kind:
        raise ManifestError(f"{store.url(ckpt.folder)} holds a {manifest.kind}, not a {kind}")
    config = json.loads(fetch_verified(store, ckpt, CONFIG_FILE))
    cls = MODEL_CLASSES.get(config.get("_class_name", ""))
    if cls is None:
        raise ManifestError(
            f"{store.url(ckpt.folder)} holds a {config.get('_class_name')!r}; ddm loads only "
            f"{sorted(MODEL_CLASSES)}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, CONFIG_FILE).write_text(json.dumps(config))
        Path(tmp, WEIGHTS_FILE).write_bytes(fetch_verified(store, ckpt, WEIGHTS_FILE))
        model = cls.from_pretrained(tmp, use_safetensors=True, low_cpu_mem_usage=False)
    training = json.loads(fetch_verified(store, ckpt, TRAINING_FILE))
    return Loaded(model.eval(), training, manifest, ckpt)


def load_state(
    store: Store, checkpoint: Checkpoint
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The resumable training state saved with a checkpoint: (tensors, metadata)."""
    data = fetch_verified(store, checkpoint, STATE_FILE)
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
