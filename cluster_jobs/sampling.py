"""`ddm sample`: in-process DDM sampling from a store's verified experts and router,
through the one sampler (router_service.sampler), to an image grid and raw arrays."""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import DDMError
from ddm_nodes.pixels import to_uint8
from ddm_nodes.store import LocalStore
from router_service.local_experts import LocalExperts
from router_service.policies import get_policy
from router_service.sampler import initial_noise, sample, time_grid


def resolve_label(manifest: DatasetManifest, label: str | None) -> int | None:
    """A class name (case-insensitive) or id -> id; None stays None (unconditional)."""
    if label is None:
        return None
    names = manifest.class_names
    if names is None:
        raise DDMError(f"--label {label!r}: the data set {manifest.source} has no labels")
    if label.lstrip("-").isdigit() and 0 <= int(label) < len(names):
        return int(label)
    by_name = {n.lower(): i for i, n in enumerate(names)}
    if label.strip().lower() in by_name:
        return by_name[label.strip().lower()]
    raise DDMError(f"--label {label!r} is unknown; use an id 0..{len(names) - 1} or one of {names}")


@dataclass
class SampleRun:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    expert_calls: list[int]
    experts_per_step: float
    seconds: float


def run_sample(
    experts: LocalExperts,
    strategy: str,
    n: int,
    steps: int,
    solver: str = "euler",
    seed: int = 0,
    label: str | None = None,
    guidance: float = 1.0,
    temperature: float | None = None,
) -> SampleRun:
    if not 1 <= n <= 4096:
        raise DDMError(f"--n {n} is out of range: use 1..4096")
    if not 1 <= steps <= 1000:
        raise DDMError(f"--steps {steps} is out of range: use 1..1000")
    try:
        policy = get_policy(strategy, temperature=temperature)
    except ValueError as e:
        raise DDMError(str(e)) from e
    label_id = resolve_label(experts.manifest, label)
    if guidance != 1.0 and label_id is None:
        raise DDMError("--guidance needs --label (classifier-free guidance is per class)")
    labels = None if label_id is None else torch.full((n,), label_id, dtype=torch.long)
    x_T = initial_noise(n, experts.image_shape, seed)
    start = time.perf_counter()
    result = sample(
        experts,
        experts.router,
        policy,
        x_T,
        time_grid(steps),
        solver,
        labels=labels,
        guidance=guidance,
        features=experts.features,
    )
    return SampleRun(
        result.images, result.expert_calls, result.experts_per_step, time.perf_counter() - start
    )


def grid_png(images: torch.Tensor, columns: int | None = None) -> bytes:
    """(N, C, H, W) in [-1, 1] -> one PNG grid, 2-pixel gaps."""
    pixels = to_uint8(images)  # (N, H, W, C)
    n, h, w, c = pixels.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = 2
    canvas = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i, im in enumerate(pixels):
        r, q = divmod(i, cols)
        canvas[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + q * (w + pad) : pad + q * (w + pad) + w,
        ] = im
    buf = io.BytesIO()
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(buf, format="PNG")
    return buf.getvalue()


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Through the store's atomic put (temp name, then rename): no reader sees half a file."""
    path = Path(path).expanduser().resolve()
    LocalStore(path.parent).put_bytes(path.name, data)


def npy_bytes(images: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, images.detach().cpu().numpy().astype(np.float32))
    return buf.getvalue()
