"""Pretrained Hugging Face models a dataset depends on (a feature extractor, a VAE), pinned
into the store.

`ddm prepare --features dinov2:REF` or `--latents vae:REF` resolves REF (a local folder as
`save_pretrained` writes it, or a hub id for users who are online), then copies the model's
files into the store under `pretrained/<role>/` and records each file's sha256 in the
dataset manifest. Everything that later embeds or decodes with that model (nearest-centroid
routing, the Serve router, the analysis) loads the store's copy, verified, so it uses the
very weights the data was prepared with, on any machine that can read the store; a missing
or changed file is refused with a message naming the fix.

Only JSON and safetensors files are pinned and loaded: nothing is ever unpickled.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ddm_nodes.errors import DDMError, ManifestError
from ddm_nodes.store import Store, sha256_bytes

PINNED_SUFFIXES = (".json", ".safetensors")
M = TypeVar("M")


class PinnedModel(BaseModel):
    """A pretrained model copied into the store: where from, where to, and every file's hash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: str = Field(description="what the user passed: a folder, a hub id, or 'store'")
    prefix: str = Field(description="its folder in the store")
    files: dict[str, str] = Field(description="file name -> sha256")

    @property
    def weights_sha256(self) -> str:
        """sha256 of the weights file (of the sorted 'name sha256' lines when sharded)."""
        weights = sorted(n for n in self.files if n.endswith(".safetensors"))
        if len(weights) == 1:
            return self.files[weights[0]]
        return sha256_bytes("".join(f"{n} {self.files[n]}\n" for n in weights).encode())


@contextmanager
def resolved(ref: str, what: str) -> Iterator[Path]:
    """A local folder holding REF's files: REF itself when it is a folder, else a hub
    snapshot (JSON and safetensors only). DDMError naming REF when neither works."""
    path = Path(ref).expanduser()
    if path.is_dir():
        yield path
        return
    if ref.startswith(("/", ".", "~")) or path.exists() or not ref.strip():
        raise DDMError(
            f"cannot load {what} {ref!r}: no such folder; pass a folder written by "
            "save_pretrained or a Hugging Face hub id"
        )
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(ref, allow_patterns=[f"*{s}" for s in PINNED_SUFFIXES])
    except Exception as e:  # offline, unknown repo, gated: all the user's to fix
        raise DDMError(
            f"cannot load {what} {ref!r}: it is not a folder here and the Hugging Face hub "
            f"did not provide it ({type(e).__name__}); pass a local folder written by "
            "save_pretrained"
        ) from None
    yield Path(folder)


def load_pretrained(load: Callable[[Path], M], folder: Path, ref: str, what: str) -> M:
    """`load(folder)` (a `from_pretrained`), any failure a DDMError naming REF."""
    if not any(p.suffix == ".safetensors" for p in folder.iterdir()):
        raise DDMError(
            f"cannot load {what} {ref!r}: {folder} holds no .safetensors weights (ddm never "
            "unpickles .bin files); re-save it with save_pretrained(safe_serialization=True)"
        )
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load on stderr says nothing useful
        return load(folder)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DDMError(f"cannot load {what} {ref!r}: {first}") from None


def _pinned_paths(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in PINNED_SUFFIXES]


def describe(folder: Path, ref: str) -> PinnedModel:
    """What `pin` would record for `folder` (no prefix yet), without writing anything."""
    files = {p.name: sha256_bytes(p.read_bytes()) for p in _pinned_paths(folder)}
    return PinnedModel(ref=ref, prefix="", files=files)


def pin(store: Store, prefix: str, folder: Path, ref: str) -> PinnedModel:
    """Copy the folder's JSON and safetensors files to `prefix` in the store."""
    store.delete(store.list(prefix + "/"))
    files = {}
    for path in _pinned_paths(folder):
        data = path.read_bytes()
        store.put_bytes(f"{prefix}/{path.name}", data)
        files[path.name] = sha256_bytes(data)
    return PinnedModel(ref=ref, prefix=prefix, files=files)


@contextmanager
def materialized(store: Store, pinned: PinnedModel, what: str) -> Iterator[Path]:
    """A temporary local folder with the pinned files, each verified against its sha256."""
    with tempfile.TemporaryDirectory(prefix="ddm-pretrained-") as tmp:
        for name, sha in sorted(pinned.files.items()):
            key = f"{pinned.prefix}/{name}"
            if not store.exists(key):
                raise ManifestError(
                    f"{store.url(key)} is missing: the dataset was prepared with {what} "
                    f"{pinned.ref!r} and needs it; re-run `ddm prepare --overwrite`"
                )
            Path(tmp, name).write_bytes(store.get_verified(key, sha))
        yield Path(tmp)


def verify_pinned(store: Store, pinned: PinnedModel, what: str) -> None:
    """Every pinned file present and unchanged (before a service deploys replicas that
    would each find out on their own)."""
    with materialized(store, pinned, what):
        pass


def copy_pinned(store: Store, pinned: PinnedModel, prefix: str) -> PinnedModel:
    """The pinned files, verified, copied to another prefix of the same store."""
    with materialized(store, pinned, pinned.ref) as folder:
        return pin(store, prefix, folder, pinned.ref)
