"""What a job learns and from which data: the flow-matching, router, featnet and VAE tasks,
the checks a config passes against the store before any worker starts, the batch stream
(where expert isolation is enforced), the schedules, and the held-out loss.

In a latent dataset (`ddm prepare --latents`) the experts, monolith and router train on the
shards' VAE latents; the featnet and the VAE itself always see images (`input_field`)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import torch

from cluster_jobs.data.shards import clusters_dataset
from cluster_jobs.training.config import TrainConfig
from cluster_jobs.training.loader import batched, loader_batches
from cluster_jobs.training.router_data import RouterData, router_data
from ddm_nodes import flow
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import DDMError
from ddm_nodes.experts import NULL_LABEL, Expert, ExpertSpec, get_preset
from ddm_nodes.presets import get_vae_preset
from ddm_nodes.router_net import RouterNet, get_router_preset
from ddm_nodes.store import Store, open_store


class _VaeObjective(torch.nn.Module):
    """(reconstruction, KL per latent element) = f(x, eps): the VAE's training pass as ONE
    forward, so that Accelerate's DDP wrapper sees it (encode and decode called on the
    wrapped model would bypass gradient synchronisation)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.mean + posterior.std * eps).sample
        return recon, posterior.kl().mean() / posterior.mean[0].numel()


def input_field(kind: str, manifest: DatasetManifest) -> str:
    """The sample field a model of `kind` trains on: "latent" or "image"."""
    latent = manifest.latents is not None and kind in ("expert", "monolith", "router")
    return "latent" if latent else "image"


class FlowTask:
    """Flow matching at a logit-normal t: regress the velocity ε - x_0, or the noise ε or
    the data x_0 for an expert of another prediction type (converted when it samples)."""

    def __init__(self, cfg: TrainConfig, manifest: DatasetManifest):
        self.field = input_field(cfg.kind, manifest)
        h, w, c = manifest.model_shape
        if h != w:
            raise DDMError(f"experts need square inputs, the store has {h}x{w}")
        get_preset(cfg.preset)
        classes = 0 if cfg.unconditional or not manifest.labelled else len(manifest.class_names)
        self.spec = ExpertSpec(
            preset=cfg.preset,
            image_size=h,
            channels=c,
            num_classes=classes,
            prediction=cfg.prediction,
        )
        self.cfg = cfg

    def build(self) -> torch.nn.Module:
        return Expert.create(self.spec)

    def weights_module(self, model: torch.nn.Module) -> Any:
        return model.denoiser  # the diffusers model that save_pretrained writes

    def loss(self, model, batch, gen: torch.Generator) -> torch.Tensor:
        x0, y = batch[self.field], batch["label"]
        n = x0.shape[0]
        if not self.spec.conditional:
            y = torch.full_like(y, NULL_LABEL)
        elif self.cfg.label_dropout > 0:
            drop = torch.rand(n, generator=gen) < self.cfg.label_dropout
            y = torch.where(drop, NULL_LABEL, y)
        t = flow.logit_normal_t(n, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        path = flow.interpolate(x0, noise, t)
        dev = _device_of(model)
        # the network's own output against its type's target: ε, x_0 or v (flow.py)
        pred = model(path.x_t.to(dev), t.to(dev), y.to(dev), native=True)
        return flow.loss(pred, path.to(dev), self.spec.prediction)

    def spec_json(self) -> dict[str, Any]:
        return self.spec.model_dump()


class RouterTask:
    """Cross-entropy on the cluster of x_0, at t uniform in [0, 1] (routing runs at every t);
    over a changed expert registry, on the id of the expert whose data x_0 is
    (router_data.py)."""

    def __init__(self, cfg: TrainConfig, manifest: DatasetManifest):
        self.field = input_field(cfg.kind, manifest)
        self.preset = get_router_preset(cfg.preset)
        self.channels = manifest.model_shape[2] if self.field == "latent" else manifest.channels
        self.num_clusters = manifest.num_clusters
        self.data: RouterData | None = None
        if cfg.kind == "router":
            self.data = router_data(open_store(cfg.store), manifest)
            if self.data is not None:
                self.num_clusters = self.data.registry.width

    def build(self) -> torch.nn.Module:
        return RouterNet.from_preset(self.preset.name, self.channels, self.num_clusters)

    def weights_module(self, model: torch.nn.Module) -> Any:
        return model

    def loss(self, model, batch, gen: torch.Generator) -> torch.Tensor:
        x0 = batch[self.field]
        t = torch.rand(x0.shape[0], generator=gen)
        path = flow.interpolate(x0, torch.randn(x0.shape, generator=gen), t)
        dev = _device_of(model)
        logits = model(path.x_t.to(dev), t.to(dev))
        return torch.nn.functional.cross_entropy(logits.float(), batch["cluster"].to(dev))

    def spec_json(self) -> dict[str, Any]:
        spec = {
            "preset": self.preset.name,
            "channels": self.channels,
            "num_clusters": self.num_clusters,
        }
        if self.data is not None:  # the ids it routes to (default: every cluster)
            spec["experts"] = self.data.experts
        return spec


class FeatnetTask(RouterTask):
    """Cross-entropy on clean images (t = 0) for the class label, or the cluster when the
    data set has no labels; its final checkpoint records the held-out accuracy."""

    def __init__(self, cfg: TrainConfig, manifest: DatasetManifest):
        super().__init__(cfg, manifest)
        self.target = "label" if manifest.labelled else "cluster"
        self.num_clusters = len(manifest.class_names) if manifest.labelled else self.num_clusters

    def loss(self, model, batch, gen: torch.Generator) -> torch.Tensor:
        x0 = batch["image"]
        dev = _device_of(model)
        logits = model(x0.to(dev), torch.zeros(x0.shape[0], device=dev))
        return torch.nn.functional.cross_entropy(logits.float(), batch[self.target].to(dev))

    def spec_json(self) -> dict[str, Any]:
        return {**super().spec_json(), "target": self.target}

    def evaluate(self, model, store: Store, manifest: DatasetManifest) -> dict[str, Any]:
        """Held-out accuracy of the (EMA) classifier."""
        right = total = 0
        model.eval()
        with torch.no_grad():
            clusters = range(manifest.num_clusters)
            heldout = clusters_dataset(store, clusters, "heldout", manifest=manifest)
            for batch in batched(heldout, 256):
                x0 = batch["image"].to(_device_of(model))
                logits = model(x0, torch.zeros(x0.shape[0], device=x0.device))
                right += int((logits.argmax(-1).cpu() == batch[self.target]).sum())
                total += x0.shape[0]
        return {"heldout_accuracy": right / max(total, 1), "heldout_images": total}


class VaeTask:
    """A small AutoencoderKL on every cluster's images: reconstruction MSE plus a light KL
    to the standard normal. Its final checkpoint records the held-out reconstruction error
    and the latents' mean and std, which become the config's shift and scaling factor (so
    the latents the experts model have unit spread, as SD's 0.18215 does for its VAE)."""

    field = "image"

    def __init__(self, cfg: TrainConfig, manifest: DatasetManifest):
        self.preset = get_vae_preset(cfg.preset)
        h, w, c = manifest.image_shape
        if h % self.preset.downsample or w % self.preset.downsample:
            raise DDMError(
                f"images of {h}x{w} are not divisible by the {self.preset.downsample}x "
                f"downsampling of VAE preset {self.preset.name}; pick another --preset"
            )
        self.channels, self.image_size = c, h

    def build(self) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        p, levels = self.preset, len(self.preset.block_channels)
        return _VaeObjective(
            AutoencoderKL(
                in_channels=self.channels,
                out_channels=self.channels,
                down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=p.block_channels,
                layers_per_block=p.layers_per_block,
                latent_channels=p.latent_channels,
                norm_num_groups=p.norm_groups,
                sample_size=self.image_size,
                mid_block_add_attention=p.mid_attention,
                scaling_factor=1.0,
            )
        )

    def weights_module(self, model: torch.nn.Module) -> Any:
        return model.vae

    def loss(self, model, batch, gen: torch.Generator) -> torch.Tensor:
        dev = _device_of(model)
        x = batch["image"].to(dev)
        size = (
            x.shape[0],
            self.preset.latent_channels,
            *(s // self.preset.downsample for s in x.shape[2:]),
        )
        recon, kl = model(x, torch.randn(size, generator=gen).to(dev))
        return torch.nn.functional.mse_loss(recon.float(), x) + self.preset.kl_weight * kl

    def spec_json(self) -> dict[str, Any]:
        return {"preset": self.preset.name, "channels": self.channels, "size": self.image_size}

    @torch.no_grad()
    def evaluate(self, model, store: Store, manifest: DatasetManifest) -> dict[str, Any]:
        """Held-out reconstruction error (of the posterior mean) and latent statistics; sets
        the model config's shift_factor and scaling_factor from the latter."""
        model.eval()
        dev = _device_of(model)
        sq_err, pixels, latents = 0.0, 0, []
        heldout = clusters_dataset(
            store, range(manifest.num_clusters), "heldout", manifest=manifest
        )
        for batch in batched(heldout, 128):
            x = batch["image"].to(dev)
            mean = model.encode(x).latent_dist.mean
            sq_err += float(((model.decode(mean).sample.clamp(-1, 1) - x) ** 2).sum())
            pixels += x.numel()
            latents.append(mean.float().cpu())
            if pixels >= 2048 * x[0].numel():
                break
        if not latents:
            raise DDMError("the held-out split is empty; prepare with --heldout > 0")
        z = torch.cat(latents)
        shift, std = float(z.mean()), float(z.std())
        model.register_to_config(shift_factor=shift, scaling_factor=1.0 / max(std, 1e-6))
        mse = sq_err / pixels  # in [-1, 1] units; PSNR on the [0, 1] scale
        return {
            "heldout_reconstruction_mse": mse,
            "heldout_psnr_db": 10 * math.log10(4 / max(mse, 1e-12)),
            "heldout_images": len(z),
            "latent_mean": shift,
            "latent_std": std,
            "latent_shape": [int(z.shape[2]), int(z.shape[3]), int(z.shape[1])],
        }


def validate(cfg: TrainConfig) -> tuple[Store, DatasetManifest]:
    """Everything that can be checked before a worker group starts (which takes ~17 s)."""
    store = open_store(cfg.store)
    manifest = DatasetManifest.load(store)
    task = make_task(cfg, manifest)
    if isinstance(task, FlowTask):
        Expert.create(task.spec)  # image size vs patch / downsampling
    sources = [(store, manifest, k) for k in training_clusters(cfg, manifest)]
    if isinstance(task, RouterTask) and task.data is not None:
        sources = [(store, manifest, k) for k in task.data.own]
        sources += [(d.store, d.manifest, d.cluster) for d in task.data.copied]
    for where, m, k in sources:
        for shard in m.shards("train", k):
            if not where.exists(shard.key):
                raise DDMError(
                    f"shard {where.url(shard.key)} of cluster {k} is missing; re-run "
                    "`ddm prepare --overwrite`"
                )
    return store, manifest


def make_task(cfg: TrainConfig, manifest: DatasetManifest) -> FlowTask | RouterTask | VaeTask:
    if cfg.kind == "expert" and not 0 <= cfg.cluster < manifest.num_clusters:
        raise DDMError(
            f"--cluster {cfg.cluster} is out of range: the store has clusters "
            f"0..{manifest.num_clusters - 1}"
        )
    if cfg.kind == "featnet":
        return FeatnetTask(cfg, manifest)
    if cfg.kind == "vae":
        return VaeTask(cfg, manifest)
    return RouterTask(cfg, manifest) if cfg.kind == "router" else FlowTask(cfg, manifest)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- data -----------------------------------------------------------------------------


def training_clusters(cfg: TrainConfig, manifest: DatasetManifest) -> list[int]:
    """Isolation lives here: an expert sees its own cluster and nothing else."""
    return [cfg.cluster] if cfg.kind == "expert" else list(range(manifest.num_clusters))


def batch_stream(
    cfg: TrainConfig,
    store: Store,
    manifest: DatasetManifest,
    rank: int = 0,
    world: int = 1,
    split: Literal["train", "heldout"] = "train",
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches {image, label, cluster}, reshuffled every epoch, decoded in
    `loader_workers` processes (loader.py)."""
    clusters = training_clusters(cfg, manifest)
    fields = frozenset({input_field(cfg.kind, manifest)})
    mixed = router_data(store, manifest) if cfg.kind == "router" else None
    yield from loader_batches(cfg, store, manifest, clusters, rank, world, split, fields, mixed)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant (EMA does the averaging)."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def ema_decay_at(cfg: TrainConfig, step: int) -> float:
    """EMA warm-up (as diffusers' EMAModel): short runs are not dominated by the init."""
    return min(cfg.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    cfg: TrainConfig,
    store: Store,
    manifest: DatasetManifest,
    max_images: int = 512,
    seed: int = 0,
) -> float:
    """Mean flow-matching loss on the held-out split of the model's clusters, with noise, t
    and (null) labels drawn from `seed`, so two models are compared on identical draws."""
    eval_cfg = cfg.model_copy(update={"shuffle_buffer": 0, "label_dropout": 0.0})
    task = make_task(eval_cfg, manifest)
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    fields = frozenset({input_field(cfg.kind, manifest)})
    for k in training_clusters(cfg, manifest):
        heldout = clusters_dataset(store, [k], "heldout", manifest=manifest, fields=fields)
        for sample_batch in batched(heldout, eval_cfg.batch_size):
            total += task.loss(model, sample_batch, gen).item() * len(sample_batch["label"])
            count += len(sample_batch["label"])
            if count >= max_images:
                return total / count
    if count == 0:
        raise DDMError(f"{cfg.name}: the held-out split is empty; prepare with --heldout > 0")
    return total / count
