"""Latent space: a diffusers `AutoencoderKL` between images and what latent DDMs model.

    z = (mean(E(x)) - shift) * scale        x = D(z / scale + shift)

as Stable Diffusion's VAE is used by Paris (256x256x3 -> 32x32x4). `ddm prepare --latents
vae:REF` encodes every image once with the posterior MEAN (deterministic, so the same data
and seed give the same shards; SD's posterior std is tiny next to the scaled latents' unit
spread) and stores z in the shards; experts, router and monolith train on z; sampling ends
with ONE decode. The VAE is pinned in the store (pretrained.py) and loaded from there,
verified, by everything that decodes.

Images are (N, C, H, W) in [-1, 1], the range the VAE was trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddm_nodes.checkpoint import CONFIG_FILE, WEIGHTS_FILE, has_checkpoint, open_checkpoint
from ddm_nodes.dataset_manifest import LatentSpec
from ddm_nodes.errors import DDMError
from ddm_nodes.names import PRETRAINED_FOLDER, VAE_PREFIX
from ddm_nodes.pretrained import (
    PinnedModel,
    copy_pinned,
    load_pretrained,
    materialized,
    pin,
    resolved,
)
from ddm_nodes.store import Store

VAE_PREFIX_IN_STORE = f"{PRETRAINED_FOLDER}/vae"
CODEC_BATCH = 64


class LatentCodec:
    """encode: images -> scaled latents; decode: scaled latents -> images in [-1, 1]."""

    def __init__(
        self,
        vae: torch.nn.Module,
        scaling_factor: float,
        shift_factor: float = 0.0,
        device: str | torch.device = "cpu",
        batch_size: int = CODEC_BATCH,
    ):
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.batch_size = batch_size
        # where the weights came from, for `pin`: a local folder and its REF, or store files
        self.source: tuple[Path, str] | PinnedModel | None = None

    @classmethod
    def from_ref(
        cls, ref: str, device: str | torch.device = "cpu", batch_size: int = CODEC_BATCH
    ) -> LatentCodec:
        """The VAE REF names (a folder or hub id); DDMError naming REF when it cannot."""
        with resolved(ref, "VAE") as folder:
            codec = cls.from_folder(folder, ref, device, batch_size)
        codec.source = (folder, ref)
        return codec

    @classmethod
    def from_store_vae(
        cls, store: Store, device: str | torch.device = "cpu", batch_size: int = CODEC_BATCH
    ) -> LatentCodec:
        """The VAE `ddm train vae` trained on this store (its final checkpoint, verified)."""
        if not has_checkpoint(store, VAE_PREFIX):
            raise DDMError(
                f"store {store.uri} has no trained VAE for --latents vae:store: run "
                f"`ddm train vae --store {store.uri}` first"
            )
        ckpt = open_checkpoint(store, VAE_PREFIX)
        files = {name: ckpt.manifest.files[name] for name in (CONFIG_FILE, WEIGHTS_FILE)}
        pinned = PinnedModel(ref="store", prefix=ckpt.folder, files=files)
        with materialized(store, pinned, "the store's VAE") as folder:
            codec = cls.from_folder(folder, "store", device, batch_size)
        codec.source = pinned
        return codec

    def pin(self, store: Store, latent_shape: tuple[int, int, int]) -> LatentSpec:
        """Copy the VAE into the store's pretrained/vae/; the manifest's LatentSpec."""
        if isinstance(self.source, PinnedModel):
            pinned = copy_pinned(store, self.source, VAE_PREFIX_IN_STORE)
        elif self.source is not None:
            folder, ref = self.source
            pinned = pin(store, VAE_PREFIX_IN_STORE, folder, ref)
        else:
            raise ValueError("this codec was loaded from a dataset's pinned VAE already")
        return LatentSpec(
            vae=pinned,
            shape=latent_shape,
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor,
        )

    @classmethod
    def from_folder(
        cls, folder: Path, ref: str, device: str | torch.device = "cpu", batch_size: int = 64
    ) -> LatentCodec:
        """A VAE folder as save_pretrained writes it; its config gives scale and shift."""
        from diffusers import AutoencoderKL

        vae = load_pretrained(AutoencoderKL.from_pretrained, folder, ref, "VAE")
        return cls(
            vae,
            vae.config.scaling_factor or 1.0,
            vae.config.shift_factor or 0.0,
            device,
            batch_size,
        )

    @classmethod
    def load(
        cls, store: Store, spec: LatentSpec, device: str | torch.device = "cpu"
    ) -> LatentCodec:
        """The dataset's pinned VAE, every file verified, with the manifest's scale and shift."""
        with materialized(store, spec.vae, f"VAE {spec.vae.ref!r}") as folder:
            codec = cls.from_folder(folder, spec.vae.ref, device)
        return cls(codec.vae, spec.scaling_factor, spec.shift_factor, device)

    @property
    def in_channels(self) -> int:
        return int(self.vae.config.in_channels)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(h, w, c) of the latent of an (H, W, C) image (the VAE's actual downsampling)."""
        h, w, c = image_shape
        if c != self.in_channels:
            raise DDMError(
                f"the VAE takes {self.in_channels}-channel images but the data has {c}; "
                f"use a VAE for {c}-channel images (`ddm train vae` trains one on the store)"
            )
        z = self.encode(torch.zeros(1, c, h, w))
        return (int(z.shape[2]), int(z.shape[3]), int(z.shape[1]))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = images[i : i + self.batch_size].to(self.device, torch.float32)
            mean = self.vae.encode(x).latent_dist.mean
            out.append(((mean - self.shift_factor) * self.scaling_factor).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(latents), self.batch_size):
            z = latents[i : i + self.batch_size].to(self.device, torch.float32)
            x = self.vae.decode(z / self.scaling_factor + self.shift_factor).sample
            out.append(x.float().clamp(-1, 1).to(latents.device))
        return torch.cat(out)


class DecodedFeatures:
    """A feature space of images, seen from latent states: decode, then embed. What
    nearest-centroid routing and the alignment analysis use in a latent DDM."""

    def __init__(self, space, codec: LatentCodec):
        self.space, self.codec = space, codec

    @property
    def centroids(self) -> torch.Tensor:
        return self.space.centroids

    def embed(self, latents: torch.Tensor) -> torch.Tensor:
        return self.space.embed(self.codec.decode(latents))

    def distances(self, latents: torch.Tensor) -> torch.Tensor:
        return self.space.distances(self.codec.decode(latents))
