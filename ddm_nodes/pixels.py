"""The one conversion between stored pixels and what models see.

Stored: uint8 (N, H, W, C) in [0, 255]. Models, features and samplers: float32
(N, C, H, W) in [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch


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
