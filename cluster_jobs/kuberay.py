"""`ddm submit --emit kuberay --out DIR`: one KubeRay RayJob manifest per job, for
`kubectl apply -f DIR` instead of the Ray job API.

Each manifest is infra/kuberay/rayjob-expert.yaml with its `${PLACEHOLDER}`s filled in from the
job: the same entrypoint, submission id and metadata that `ddm submit` would use. The template
is parsed first and the values go into its string scalars, so a command with quotes, spaces or
colons cannot break the YAML. Each file holds the one RayJob; the NetworkPolicy of their
clusters is one for all of them (infra/kuberay/networkpolicy-rayjobs.yaml), applied once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from cluster_jobs import INFRA
from cluster_jobs.submit import AnalyzeJob, Job, entrypoint, submission_id
from ddm_nodes import __version__
from ddm_nodes.errors import DDMError
from ddm_nodes.store import write_atomic

TEMPLATE = INFRA / "kuberay/rayjob-expert.yaml"
# Built from infra/kuberay/Dockerfile. A tag, for `kind load docker-image`; a registry's
# image is best named by digest (`--image REGISTRY/ddm@sha256:...`), since a tag can move.
DEFAULT_IMAGE = f"ddm:{__version__}"
GPU_TAG_SUFFIX = "-gpu"  # the Dockerfile's CUDA build of a tag: ddm:0.1.0 -> ddm:0.1.0-gpu
# KubeRay names a RayJob's cluster `<name>-xxxxx` and that cluster's Services `...-serve-svc`,
# so it refuses RayJob names that are not DNS-1035 labels of at most 47 characters.
MAX_NAME_LENGTH = 47
_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_PLACEHOLDER = re.compile(r"\$\{([A-Z_]+)\}")
_HEADER = "# Rendered from infra/kuberay/rayjob-expert.yaml by `ddm submit --emit kuberay`.\n"


def render_rayjobs(
    jobs: Iterable[Job],
    out_dir: str | Path,
    image: str = DEFAULT_IMAGE,
    gpu_image: str | None = None,
) -> list[Path]:
    """Write `out_dir/rayjob-<name>.yaml` for each job; returns the paths in job order.
    `gpu_image` runs the GPU workers (default: `image`'s tag with -gpu). Every job is checked
    before any file is written."""
    template = yaml.safe_load(TEMPLATE.read_text())
    gpu_image = gpu_image or _gpu_image(image)
    values = [_values(job, image, gpu_image) for job in jobs]
    names = [v["DDM_NAME"] for v in values]
    if len(set(names)) != len(names):
        raise DDMError(f"two jobs share a name in {names}: each needs its own manifest")
    out = Path(out_dir).expanduser()
    paths = []
    for v in values:
        text = yaml.safe_dump(_fill(template, v), sort_keys=False, width=10_000)
        path = out / f"rayjob-{v['DDM_NAME']}.yaml"
        paths.append(write_atomic(path, (_HEADER + text).encode(), hint="check --out"))
    return paths


def _gpu_image(image: str) -> str:
    if "@" in image:
        raise DDMError(
            f"--image {image!r} is pinned by digest, which names that one build: the GPU "
            "workers need the CUDA build's own reference as well (gpu_image, `--gpu-image "
            "REGISTRY/ddm:0.1.0-gpu@sha256:...`)"
        )
    return image + GPU_TAG_SUFFIX


def _values(job: Job, image: str, gpu_image: str) -> dict[str, str]:
    command, store = entrypoint(job), job.store
    if isinstance(job, AnalyzeJob) and not job.config.out.startswith("s3://"):
        raise DDMError(
            f"analyze: --out {job.config.out!r}: the analysis writes inside a pod that goes "
            "away with its cluster; give --out s3://BUCKET/PREFIX"
        )
    if store is None or not store.startswith("s3://"):
        raise DDMError(
            f"{job.name}: store {store!r}: KubeRay pods cannot read a local path: prepare into "
            "an s3:// store (`ddm prepare --store s3://BUCKET/PREFIX ...`) and submit with it"
        )
    sid = submission_id(job)
    if len(sid) > MAX_NAME_LENGTH or not _DNS_1035.fullmatch(sid):
        raise DDMError(
            f"{sid!r} cannot name a RayJob: KubeRay needs a DNS-1035 label (lowercase letters, "
            f"digits and '-', starting with a letter) of at most {MAX_NAME_LENGTH} characters"
        )
    return {
        "NAME": sid,
        "SUBMISSION_ID": sid,
        "DDM_NAME": job.name,
        "KIND": job.kind,
        "CONFIG_HASH": job.config_hash(),
        "ENTRYPOINT": command,
        "STORE": store,
        "IMAGE": image,
        "GPU_IMAGE": gpu_image,
    }


def _fill(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _fill(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [_fill(item, values) for item in node]
    if isinstance(node, str):
        return _PLACEHOLDER.sub(lambda m: _lookup(values, m.group(1)), node)
    return node


def _lookup(values: dict[str, str], name: str) -> str:
    if name not in values:
        raise DDMError(
            f"{TEMPLATE}: unknown placeholder ${{{name}}}; expected one of {sorted(values)}"
        )
    return values[name]
