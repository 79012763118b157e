"""GPU check: expert training on CUDA with mixed precision through Accelerate (the job's
own worker, without Ray), the trained expert's forward throughput at sampling batch sizes,
and the training input pipeline's own images/s (`batch_stream` alone, with 0 and 8 loader
workers). Prints JSON (and writes it to $OUT/gpu_check.json when OUT is set).
    python bench/gpu_check.py --store STORE                  # pixel presets
    python bench/gpu_check.py --store LATENT_STORE --runs latent
A latent store for the paper's setting (DiT-B/2 on 32x32x4): 256 px `shapes` through an
SD-VAE-shaped AutoencoderKL (tests/tiny_models.py `save_vae(..., sd_shape=True)`):
    ddm prepare --dataset shapes --count 8000 --image-size 256 --clusters 4 \
        --latents vae:/tmp/sd-vae --device cuda --store /tmp/latent
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

RUNS = {  # preset, mixed precision, batch size, steps
    "pixel": [
        ("dit-tiny", "bf16", 256, 300),
        ("dit-tiny", "no", 256, 200),
        ("unet-tiny", "bf16", 256, 300),
        ("unet-tiny", "fp16", 256, 200),
        ("dit-s", "bf16", 256, 150),
        ("dit-b", "bf16", 128, 100),
    ],
    "latent": [("dit-b", "bf16", 256, 100), ("dit-s", "bf16", 256, 150)],
}
PIPELINE_BATCHES = 100


def pipeline_rate(store: str, batch: int, loader_workers: int) -> float:
    """Images/s of an expert's batch stream alone (fetch, verify, decode, collate)."""
    from cluster_jobs.training.config import TrainConfig
    from cluster_jobs.training.tasks import batch_stream
    from ddm_nodes.dataset_manifest import DatasetManifest
    from ddm_nodes.store import open_store

    cfg = TrainConfig(
        kind="expert", store=store, cluster=0, batch_size=batch, loader_workers=loader_workers
    )
    s = open_store(store)
    batches = batch_stream(cfg, s, DatasetManifest.load(s))
    next(batches)  # workers started, first shards fetched
    start = time.perf_counter()
    for _ in range(PIPELINE_BATCHES):
        next(batches)
    return PIPELINE_BATCHES * batch / (time.perf_counter() - start)


@torch.no_grad()
def forward_rate(expert, channels: int, size: int, batch: int, precision: str) -> float:
    """Expert evaluations per second (one sampling step of one image = one evaluation)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    x = torch.randn(batch, channels, size, size, device="cuda")
    t = torch.full((batch,), 0.5, device="cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        for _ in range(3):
            expert(x, t)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            expert(x, t)
        torch.cuda.synchronize()
    return 20 * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--store", required=True)
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    ap.add_argument("--quick", action="store_true", help="3 steps of dit-tiny")
    ap.add_argument("--runs", choices=sorted(RUNS), default="pixel")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: PRESET,PRECISION,BATCH,STEPS
    args = ap.parse_args()
    if args.one is None:
        # Accelerate's state is per process (mixed precision cannot change inside one), as
        # in a real job: one process per run.
        runs = [("dit-tiny", "no", 8, 3)] if args.quick else RUNS[args.runs]
        pipeline = {
            f"loader_workers_{n}": round(pipeline_rate(args.store, 256, n), 1) for n in (0, 8)
        }
        print(json.dumps({"input_pipeline_images_per_s": pipeline}), flush=True)
        rows = []
        for run in runs:
            cmd = [
                sys.executable,
                __file__,
                "--store",
                args.store,
                "--device",
                args.device,
                "--one",
                ",".join(map(str, run)),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                rows.append({"run": run, "error": out.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
        text = json.dumps(
            {
                "device": name,
                "torch": torch.__version__,
                "input_pipeline_images_per_s": pipeline,
                "runs": rows,
            },
            indent=2,
        )
        print(text)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
                f.write(text)
        return
    p, mp, b, n = args.one.split(",")
    runs = [(p, mp, int(b), int(n))]

    from cluster_jobs.training.config import TrainConfig
    from cluster_jobs.training.tasks import heldout_loss
    from cluster_jobs.training.worker import train_local
    from ddm_nodes.checkpoint import load_model
    from ddm_nodes.dataset_manifest import DatasetManifest
    from ddm_nodes.experts import Expert, ExpertSpec
    from ddm_nodes.store import open_store

    store = open_store(args.store)
    manifest = DatasetManifest.load(store)
    h, _, c = manifest.model_shape  # latents in a latent store
    for preset, precision, batch, steps in runs:
        cfg = TrainConfig(
            kind="expert",
            store=args.store,
            cluster=0,
            preset=preset,
            batch_size=batch,
            steps=steps,
            device=args.device,
            mixed_precision=precision,
            checkpoint_every=10**6,
            restart=True,
        )
        store.delete(store.list(cfg.prefix + "/"))
        start = time.perf_counter()
        result = train_local(cfg)
        wall = time.perf_counter() - start
        trained = load_model(store, cfg.prefix, kind="expert")
        expert = Expert(trained.model, ExpertSpec(**trained.training["model"]))
        expert = expert.to(args.device).eval()
        row = {
            "preset": preset,
            "mixed_precision": precision,
            "batch_size": batch,
            "steps": steps,
            "wall_s": round(wall, 1),
            "train_images_per_s": round(result["images_per_s"], 1),
            "final_train_loss": round(result["loss"], 4),
            "heldout_loss_ema": round(heldout_loss(expert, cfg, store, manifest), 4),
        }
        if args.device == "cuda":
            row["forward_evals_per_s"] = round(forward_rate(expert, c, h, 512, precision), 1)
            row["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
