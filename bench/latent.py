"""A latent DDM end to end on this CPU, with no downloaded weights: RGB `shapes` ->
`ddm train vae` (a small AutoencoderKL on the store's images) -> `ddm prepare --latents
vae:store` -> K experts and the router trained on the latents -> samples decoded once.

Prints JSON (the VAE's held-out reconstruction error, each phase's seconds and images/s)
and writes PNG grids to --out: real images, their VAE reconstructions, and top-2 samples.
Training runs in this process through the jobs' own worker (`train_local`: the same
Worker, task and data stream a Ray job runs); tests/test_real_images_e2e.py runs the Ray
path.
    python bench/latent.py [--count 4000] [--vae-steps 600] [--expert-steps 400] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=4000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--expert-steps", type=int, default=400)
    ap.add_argument("--router-steps", type=int, default=200)
    ap.add_argument("--preset", default="unet-tiny")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from cluster_jobs.analysis.sampling import run_sample
    from cluster_jobs.data.prepare import PrepareConfig, prepare
    from cluster_jobs.data.shards import clusters_dataset
    from cluster_jobs.training.config import TrainConfig
    from cluster_jobs.training.worker import train_local
    from ddm_nodes.checkpoint import load_model
    from ddm_nodes.latents import LatentCodec
    from ddm_nodes.pixels import grid_png
    from ddm_nodes.store import open_store
    from router_service.local_experts import LocalExperts

    out = Path(args.out or tempfile.mkdtemp(prefix="ddm-bench-latent-"))
    out.mkdir(parents=True, exist_ok=True)
    store = str(out / "store")
    data = dict(dataset="shapes", count=args.count, image_size=args.size, clusters=args.clusters)
    report: dict = {
        "benchmark": "latent",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": vars(args),
        "seconds": {},
    }
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report["seconds"][name] = round(now - clock, 1)
        clock = now

    prepare(PrepareConfig(store=store, overwrite=True, **data))
    lap("prepare_pixels")
    common = dict(store=store, cpus_per_worker=args.threads, warmup_steps=20)
    vae = TrainConfig(kind="vae", steps=args.vae_steps, batch_size=32, **common)
    done = train_local(vae.model_copy(update={"checkpoint_every": args.vae_steps}))
    lap("train_vae")
    evaluation = load_model(open_store(store), "vae", kind="vae").training["evaluation"]
    report["vae"] = {"images_per_s": round(done["images_per_s"] or 0, 1), **evaluation}

    manifest = prepare(PrepareConfig(store=store, overwrite=True, latents="vae:store", **data))
    manifest = manifest.manifest
    report["latent_shape"] = list(manifest.latents.shape)
    lap("prepare_latents")

    steps = args.expert_steps
    rates = []
    for k in range(args.clusters):
        cfg = TrainConfig(
            kind="expert",
            cluster=k,
            preset=args.preset,
            steps=steps,
            batch_size=64,
            lr=2e-3,
            checkpoint_every=steps,
            **common,
        )
        rates.append(train_local(cfg)["images_per_s"] or 0)
    report["expert_images_per_s"] = round(sum(rates) / len(rates), 1)
    lap("train_experts")
    router = TrainConfig(kind="router", steps=args.router_steps, batch_size=64, **common)
    train_local(router.model_copy(update={"checkpoint_every": args.router_steps}))
    lap("train_router")

    experts = LocalExperts(store)
    run = run_sample(experts, "top-2", n=64, steps=30)
    report["sample_seconds_64_images_30_steps"] = round(run.seconds, 1)
    (out / "samples-top-2.png").write_bytes(grid_png(run.images))
    heldout = clusters_dataset(
        store, range(args.clusters), "heldout", manifest=manifest, shuffle=64
    )
    real = torch.stack([s["image"] for s in itertools.islice(heldout, 64)])
    codec = LatentCodec.load(open_store(store), manifest.latents)
    (out / "real.png").write_bytes(grid_png(real))
    (out / "reconstructed.png").write_bytes(grid_png(codec.decode(codec.encode(real))))
    lap("sample_and_grids")
    report["grids"] = [str(out / n) for n in ("real.png", "reconstructed.png", "samples-top-2.png")]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
