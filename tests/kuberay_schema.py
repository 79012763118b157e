"""KubeRay manifests checked the way a Kubernetes API server with KubeRay's CRDs installed
checks them: JSON-schema validation against the stored version's openAPIV3Schema
(infra/kuberay/schemas/, KubeRay's own CRD files), plus every field the schema does not
declare, which Kubernetes would prune silently (a misspelt field would otherwise pass).

NetworkPolicy is a built-in kind whose schema is not vendored: `network_policy_errors` checks
its networking.k8s.io/v1 shape by hand, every field and enum of the parts we use."""

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


# networking.k8s.io/v1 NetworkPolicy, as far as ingress/egress rules go (Kubernetes API
# reference); a key outside these is a typo that the API server would reject.
_NP_SPEC = {"podSelector", "policyTypes", "ingress", "egress"}
_NP_RULE = {"ingress": {"from", "ports"}, "egress": {"to", "ports"}}
_NP_PEER = {"podSelector", "namespaceSelector", "ipBlock"}
_NP_PORT = {"port", "protocol", "endPort"}
_SELECTOR = {"matchLabels", "matchExpressions"}
_EXPRESSION = {"key", "operator", "values"}
_OPERATORS = {"In", "NotIn", "Exists", "DoesNotExist"}
_PROTOCOLS = {"TCP", "UDP", "SCTP"}


def network_policy_errors(doc: dict[str, Any]) -> list[str]:
    """What the API server would refuse in a NetworkPolicy, by path."""
    errors: list[str] = []
    if doc.get("apiVersion") != "networking.k8s.io/v1" or doc.get("kind") != "NetworkPolicy":
        return [
            f"{doc.get('apiVersion')}/{doc.get('kind')} is not networking.k8s.io/v1 NetworkPolicy"
        ]
    if not (doc.get("metadata") or {}).get("name"):
        errors.append("NetworkPolicy.metadata.name: required")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return [*errors, "NetworkPolicy.spec: required"]
    _keys(spec, _NP_SPEC, "NetworkPolicy.spec", errors)
    if not isinstance(spec.get("podSelector"), dict):
        errors.append("NetworkPolicy.spec.podSelector: required (an empty {} selects every pod)")
    else:
        _selector(spec["podSelector"], "NetworkPolicy.spec.podSelector", errors)
    types = spec.get("policyTypes")
    if not isinstance(types, list) or not types or not set(types) <= {"Ingress", "Egress"}:
        errors.append(f"NetworkPolicy.spec.policyTypes: {types!r}: a list of Ingress, Egress")
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        for i, rule in enumerate(spec.get(direction) or []):
            path = f"NetworkPolicy.spec.{direction}[{i}]"
            _keys(rule, _NP_RULE[direction], path, errors)
            for j, peer in enumerate(rule.get(peers_key) or []):
                _peer(peer, f"{path}.{peers_key}[{j}]", errors)
            for j, port in enumerate(rule.get("ports") or []):
                _port(port, f"{path}.ports[{j}]", errors)
    return errors


def _keys(value: Any, allowed: set[str], path: str, errors: list[str]) -> None:
    if not isinstance(value, dict):
        errors.append(f"{path}: {value!r} is not an object")
        return
    errors.extend(f"{path}.{k}: no such field" for k in value if k not in allowed)


def _selector(selector: Any, path: str, errors: list[str]) -> None:
    _keys(selector, _SELECTOR, path, errors)
    if not isinstance(selector, dict):
        return
    labels = selector.get("matchLabels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        errors.append(f"{path}.matchLabels: {labels!r}: a map of strings")
    for i, e in enumerate(selector.get("matchExpressions", [])):
        where = f"{path}.matchExpressions[{i}]"
        _keys(e, _EXPRESSION, where, errors)
        op = e.get("operator")
        if op not in _OPERATORS:
            errors.append(f"{where}.operator: {op!r}: one of {sorted(_OPERATORS)}")
        elif (op in {"In", "NotIn"}) != bool(e.get("values")):
            errors.append(f"{where}.values: In and NotIn need values, Exists and DoesNotExist none")


def _peer(peer: Any, path: str, errors: list[str]) -> None:
    _keys(peer, _NP_PEER, path, errors)
    if not isinstance(peer, dict):
        return
    if not peer:
        errors.append(f"{path}: empty peer")
    if "ipBlock" in peer and len(peer) > 1:
        errors.append(f"{path}: ipBlock cannot be combined with a selector")
    for key in ("podSelector", "namespaceSelector"):
        if key in peer:
            _selector(peer[key], f"{path}.{key}", errors)


def _port(port: Any, path: str, errors: list[str]) -> None:
    _keys(port, _NP_PORT, path, errors)
    if not isinstance(port, dict):
        return
    if port.get("protocol", "TCP") not in _PROTOCOLS:
        errors.append(f"{path}.protocol: {port['protocol']!r}: one of {sorted(_PROTOCOLS)}")
    number = port.get("port")  # none: every port of the protocol
    if number is not None and not (
        isinstance(number, str) or (isinstance(number, int) and 1 <= number <= 65535)
    ):
        errors.append(f"{path}.port: {number!r}: a port number or a named port")
