"""KubeRay manifests checked the way a Kubernetes API server with KubeRay's CRDs installed
checks them: JSON-schema validation against the stored version's openAPIV3Schema
(infra/kuberay/schemas/, KubeRay's own CRD files), plus every field the schema does not
declare, which Kubernetes would prune silently (a misspelt field would otherwise pass)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMAS = Path(__file__).resolve().parents[1] / "infra" / "kuberay" / "schemas"
FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
PRESERVE = "x-kubernetes-preserve-unknown-fields"


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of the CRD's stored version (v1)."""
    crd = yaml.load((SCHEMAS / FILES[kind]).read_text(), Loader=yaml.CSafeLoader)
    assert crd["spec"]["names"]["kind"] == kind
    (stored,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return stored["schema"]["openAPIV3Schema"]


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Every problem the API server would report, or silently prune, by path."""
    kind = doc.get("kind")
    if kind not in FILES:
        return [f"kind {kind!r} is none of {sorted(FILES)}"]
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion {doc.get('apiVersion')!r}: the stored version is ray.io/v1"]
    schema = crd_schema(kind)
    validator = jsonschema.Draft4Validator(schema)
    errors = [
        f"{_path(kind, e.absolute_path)}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]
    _unknown(doc, schema, kind, errors, top=True)
    return errors


def _path(kind: str, parts) -> str:
    out = kind
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _unknown(value: Any, schema: dict, path: str, errors: list[str], top: bool = False) -> None:
    """Fields of `value` that `schema` does not declare (Kubernetes' pruning)."""
    if schema.get(PRESERVE):
        return
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                _unknown(item, props[key], f"{path}.{key}", errors)
            elif isinstance(extra, dict):
                _unknown(item, extra, f"{path}.{key}", errors)
            elif extra is True or (top and key == "metadata"):
                continue  # free-form map, or ObjectMeta (the API server's own schema)
            elif props is None and path.endswith(".metadata"):
                continue  # embedded ObjectMeta (labels, annotations): kept by Kubernetes
            else:
                errors.append(f"{path}.{key}: the CRD has no such field (Kubernetes prunes it)")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _unknown(item, schema["items"], f"{path}[{i}]", errors)
