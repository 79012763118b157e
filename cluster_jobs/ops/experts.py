"""`ddm experts list|add|remove --store URI`: the DDM's members, by stable id
(ddm_nodes/registry.py).

`add --from URI_OF_A_TRAINED_EXPERT` (e.g. s3://other/store/experts/expert-002) takes an
expert trained elsewhere, on other data, into this DDM:
1. the source's published version is checked like any load (its manifest, trained on its
   store's current clustering, a spec that makes this store's states; a conditional expert
   needs the same class names, a latent one the same VAE);
2. its centroid in THIS store's feature space is the mean feature of its own training data,
   streamed from the source cluster's shards (at most `centroid_samples`, in batches), so
   nearest-centroid can route to it;
3. its files are copied byte for byte, each verified, and published under the next unused
   id; the copy is loaded once, as a replica would load it;
4. only then is experts.json written: a failure at any step leaves the registry as it was.

`remove` takes an expert out of the DDM and keeps its files (nothing is deleted; the id
stays taken). A running `ddm serve` picks either change up (cluster_jobs/ops/serving.py).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import torch

from cluster_jobs.data.shards import IMAGE, clusters_dataset
from ddm_nodes.checkpoint import (
    TRAINING_FILE,
    check_dataset,
    copy_checkpoint,
    fetch_verified,
    has_checkpoint,
    open_checkpoint,
)
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import DDMError, ManifestError
from ddm_nodes.experts import ExpertSpec
from ddm_nodes.features import FeatureSpace
from ddm_nodes.names import EXPERTS_FOLDER, expert_prefix, split_expert_uri
from ddm_nodes.registry import (
    REGISTRY_KEY,
    ExpertEntry,
    Provenance,
    Registry,
    load_registry,
    registry_sha256,
    save_registry,
)
from ddm_nodes.store import Store, open_store
from router_service.store_models import ExpertCard, expert_card, load_expert

DEFAULT_CENTROID_SAMPLES = 2048
CENTROID_BATCH = 256


def list_experts(store_uri: str) -> dict:
    """The registry with each expert's current card (version, architecture, prediction)."""
    store = open_store(store_uri)
    manifest = DatasetManifest.load(store)
    registry = load_registry(store, manifest)
    rows = []
    for entry in registry.experts:
        row = {"id": entry.id, "name": entry.name, "cluster": entry.cluster}
        if has_checkpoint(store, expert_prefix(entry.id)):
            card = expert_card(store, manifest, entry)
            row.update(
                sha256=card.sha256,
                step=card.step,
                preset=card.preset,
                arch=card.arch,
                prediction=card.prediction,
            )
        else:
            row["error"] = "no checkpoint"
        row["centroid"] = (
            f"cluster {entry.cluster}" if entry.centroid is None else f"{len(entry.centroid)}-d"
        )
        row["provenance"] = entry.provenance.model_dump(mode="json", exclude_none=True)
        rows.append(row)
    return {
        "store": store.uri,
        "registry": store.url(REGISTRY_KEY) if store.exists(REGISTRY_KEY) else "default",
        "sha256": registry_sha256(store) or "default",
        "experts": rows,
        "removed": [
            {"id": r.id, "name": r.expert.name, "removed_at": r.removed_at.isoformat()}
            for r in registry.removed
        ],
    }


def parse_expert_uri(uri: str) -> tuple[str, int]:
    """(source store URI, expert id) of STORE/experts/expert-NNN."""
    found = split_expert_uri(uri)
    if found is None:
        raise DDMError(
            f"--from {uri!r} is not an expert folder: give STORE/experts/expert-NNN, e.g. "
            "s3://bucket/other-store/experts/expert-002"
        )
    return found


def _source_checkpoint(source: Store, expert_id: int, uri: str):
    if not has_checkpoint(source, expert_prefix(expert_id)):
        raise DDMError(f"--from {uri}: there is no trained expert there")
    ckpt = open_checkpoint(source, expert_prefix(expert_id))
    if ckpt.manifest.kind != "expert" or ckpt.manifest.cluster is None:
        raise DDMError(f"--from {uri} holds a {ckpt.manifest.kind}, not an expert")
    return ckpt


def _check_compatible(
    spec: ExpertSpec, source: DatasetManifest, target: DatasetManifest, uri: str
) -> None:
    h, w, c = target.model_shape
    if (spec.image_size, spec.image_size, spec.channels) != (h, w, c):
        raise DDMError(
            f"--from {uri} makes {spec.channels}x{spec.image_size}x{spec.image_size} states, "
            f"this store's experts {c}x{h}x{w}: only an expert of the same state shape fits"
        )
    if source.image_shape != target.image_shape:
        raise DDMError(
            f"--from {uri} was trained on {source.image_shape} images, this store has "
            f"{target.image_shape}: its centroid could not be placed in this feature space"
        )
    if (source.latents is None) != (target.latents is None) or (
        source.latents is not None
        and source.latents.vae.weights_sha256 != target.latents.vae.weights_sha256
    ):
        raise DDMError(
            f"--from {uri} denoises another space (pixels or another VAE's latents) than "
            "this store's experts: train it on latents of the same VAE"
        )
    if spec.conditional and source.class_names != target.class_names:
        raise DDMError(
            f"--from {uri} is conditioned on classes {source.class_names}, this store's on "
            f"{target.class_names}: its labels would mean other classes"
        )


def source_centroid(
    source: Store,
    manifest: DatasetManifest,
    cluster: int,
    space: FeatureSpace,
    samples: int = DEFAULT_CENTROID_SAMPLES,
) -> tuple[list[float], int]:
    """The mean feature, in `space`, of up to `samples` images of the source cluster's
    training shards (streamed in batches), and how many were used."""
    total, seen = None, 0
    batch: list[torch.Tensor] = []

    def flush() -> None:
        nonlocal total
        z = space.embed(torch.stack(batch)).double().sum(0)
        total = z if total is None else total + z
        batch.clear()

    for item in clusters_dataset(source, [cluster], "train", manifest=manifest, fields=IMAGE):
        batch.append(item["image"])
        seen += 1
        if len(batch) == CENTROID_BATCH:
            flush()
        if seen >= samples:
            break
    if batch:
        flush()
    if total is None:
        raise DDMError(f"the source store has no training images of cluster {cluster}")
    return (total / seen).float().tolist(), seen


def _unused_id(store: Store, registry: Registry) -> int:
    """The registry's next id, past any expert folder already in the store (an add that
    stopped before writing the registry, a cluster beyond the registry's)."""
    taken = [
        int(m[1])
        for key in store.list(f"{EXPERTS_FOLDER}/")
        if (m := re.match(rf"{EXPERTS_FOLDER}/expert-([0-9]{{3}})/", key))
    ]
    return max([registry.next_id, *(k + 1 for k in taken)])


def add_from(
    store_uri: str, uri: str, centroid_samples: int = DEFAULT_CENTROID_SAMPLES
) -> tuple[ExpertCard, int]:
    """Copy the expert at `uri` into the store's DDM (see the module docstring); its card
    and the images its centroid came from."""
    store = open_store(store_uri)
    manifest = DatasetManifest.load(store)
    registry = load_registry(store, manifest)
    source_uri, source_id = parse_expert_uri(uri)
    source = open_store(source_uri)
    source_manifest = DatasetManifest.load(source)
    ckpt = _source_checkpoint(source, source_id, uri)
    check_dataset(
        source,
        ckpt,
        source_manifest,
        f"--from {uri}",
        "its cluster's shards are no longer its data: retrain it there first",
    )
    spec = ExpertSpec(**json.loads(fetch_verified(source, ckpt, TRAINING_FILE))["model"])
    _check_compatible(spec, source_manifest, manifest, uri)
    space = FeatureSpace.load(store, manifest)
    centroid, used = source_centroid(
        source, source_manifest, ckpt.manifest.cluster, space, centroid_samples
    )
    new_id = _unused_id(store, registry)
    copied = copy_checkpoint(source, ckpt, store, expert_prefix(new_id))
    entry = ExpertEntry(
        id=new_id,
        cluster=ckpt.manifest.cluster,
        centroid=centroid,
        provenance=Provenance(
            source="copied",
            uri=source.url(expert_prefix(source_id)),
            dataset_sha256=ckpt.manifest.dataset_sha256 or source_manifest.sha256,
            manifest_sha256=copied.manifest_sha256,
            added_at=datetime.now(UTC),
        ),
    )
    if copied.manifest_sha256 != ckpt.manifest_sha256:
        raise ManifestError(f"the copy of {uri} does not match its manifest; try again")
    card = expert_card(store, manifest, entry)
    load_expert(store, manifest, card)  # as a replica will: every weight, strictly
    save_registry(store, registry.adding(entry))
    return card, used


def remove(store_uri: str, expert: str) -> ExpertEntry:
    """Take `expert` (expert-NNN or its id) out of the DDM; its files stay."""
    store = open_store(store_uri)
    manifest = DatasetManifest.load(store)
    registry = load_registry(store, manifest)
    m = re.fullmatch(r"(?:expert-)?([0-9]{1,3})", expert.strip())
    if m is None or int(m[1]) not in registry.ids:
        names = ", ".join(e.name for e in registry.experts)
        raise DDMError(f"{expert!r} is not an expert of this DDM; it has {names}")
    entry = registry.entry(int(m[1]))
    try:
        updated = registry.removing(entry.id)
    except ValueError as e:
        raise DDMError(str(e)) from None
    save_registry(store, updated)
    return entry
