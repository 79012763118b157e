"""The one conversion between stored pixels and what models see.

Stored: uint8 (N, H, W, C) in [0, 255]. Models, features and samplers: float32
(N, C, H, W) in [-1, 1].
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) or (H, W, C) -> float32 (N, C, H, W) / (C, H, W) in [-1, 1]."""
    if images.dtype not in (np.uint8, torch.uint8):
        raise TypeError(f"expected uint8 pixels, got {images.dtype}")
    # Converting in numpy first also copies read-only arrays (PIL, np.frombuffer).
    x = torch.from_numpy(images.astype(np.float32)) if isinstance(images, np.ndarray) else images
    return x.movedim(-1, -3).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), clipping what overshoots."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


# --- file encodings of model-range images: one PNG each, or one .npy array ----------------


def png_bytes(pixels: np.ndarray, compress_level: int = 6) -> bytes:
    """uint8 (H, W, C) -> PNG (grey when C == 1); shards use level 1 (docs/decisions.md)."""
    buf = io.BytesIO()
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def pngs(images: torch.Tensor) -> list[bytes]:
    """float (N, C, H, W) in [-1, 1] -> one PNG per image."""
    return [png_bytes(im) for im in to_uint8(images)]


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
    return png_bytes(canvas)


def npy_bytes(images: torch.Tensor) -> bytes:
    """float (N, C, H, W) -> .npy float32, exactly the values (no clipping, no rounding)."""
    buf = io.BytesIO()
    np.save(buf, images.detach().cpu().numpy().astype(np.float32))
    return buf.getvalue()


def from_npy(data: bytes) -> torch.Tensor:
    """.npy bytes -> tensor; object arrays are refused (nothing is unpickled)."""
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
