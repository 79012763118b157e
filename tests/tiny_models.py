"""Tiny randomly initialised pretrained models, saved as `save_pretrained` writes them: the
real loading code (transformers, diffusers) on small weights, with no download. Used by the
tests and by bench/prepare.py."""

from __future__ import annotations

from pathlib import Path

import torch

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _save_vision(folder, model, processor, image_size: int) -> Path:
    """A tiny vision tower and its image processor (crop = `image_size`)."""
    model.save_pretrained(folder, safe_serialization=True)
    processor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    ).save_pretrained(folder)
    return Path(folder)


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def save_dinov2(folder: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A 2-layer DINOv2 (hidden 32, patch 8) and its image processor."""
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(patch_size=8, image_size=image_size, **TINY))
    return _save_vision(folder, model, BitImageProcessorPil, image_size)


def save_clip(folder: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A 2-layer CLIP vision tower (hidden 32, patch 8) and its image processor."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(patch_size=8, image_size=image_size, **TINY))
    return _save_vision(folder, model, CLIPImageProcessorPil, image_size)


def save_vae(folder: Path, channels: int = 3, seed: int = 0, sd_shape: bool = False) -> Path:
    """A 2-level AutoencoderKL (32x32 -> 16x16x4), SD's scaling factor in its config; with
    `sd_shape`, Stable Diffusion's VAE architecture (256x256 -> 32x32x4, 84 M parameters,
    random weights: its compute, not its pictures) for benchmarks."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    size = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2}
    if not sd_shape:
        size = {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8}
        size["mid_block_add_attention"] = False
    levels = len(size["block_out_channels"])
    AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        **size,
    ).save_pretrained(folder, safe_serialization=True)
    return Path(folder)
