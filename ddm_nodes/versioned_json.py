"""Reading a versioned JSON manifest (dataset.json, a checkpoint's manifest.json): the
one place that turns bad JSON, a newer format and a schema mismatch into a ManifestError
that says what to do."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from ddm_nodes import __version__
from ddm_nodes.errors import ManifestError

M = TypeVar("M", bound=BaseModel)


def parse_versioned(
    cls: type[M], data: bytes | str, where: str, current: int, what: str, fix: str
) -> M:
    """`cls` from JSON `data`; `where` names the file, `what` the kind of manifest and
    `fix` how to regenerate it."""
    try:
        raw = json.loads(data)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where} is not valid JSON ({e}); {fix}") from e
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > current:
        raise ManifestError(
            f"{where} has format version {version}, newer than this ddm {__version__} "
            f"reads ({current}): upgrade ddm"
        )
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise ManifestError(
            f"{where} is not a valid {what} ({field}: {first['msg']}); {fix}"
        ) from e
