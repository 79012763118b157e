"""Benchmark training: one dit-tiny expert through Ray Train + Accelerate versus a bare
PyTorch loop on the same model, data, batch size and thread count, in the same run and with
the same local Ray instance up (so the ratio measures Ray Train and Accelerate, not the
head's processes sharing the cores); beside them the input pipeline alone (`batch_stream`
with no model, in-process and with 2 loader workers); then the wall time to train every
expert of fashion-mnist K=8 as Ray jobs (`ddm submit`).

Prints JSON. Throughput excludes start-up (worker group, loader workers, first step).
    python bench/train.py [--steps 150] [--threads 2] [--pipeline-batches 200] [--skip-all]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def bare_loop(cfg, steps: int, threads: int) -> float:
    """The same task, data stream and optimizer as a job, with no Ray and no Accelerate."""
    from cluster_jobs.training.tasks import batch_stream, lr_at, make_task
    from ddm_nodes.dataset_manifest import DatasetManifest
    from ddm_nodes.store import open_store

    torch.set_num_threads(threads)
    store = open_store(cfg.store)
    manifest = DatasetManifest.load(store)
    task = make_task(cfg, manifest)
    torch.manual_seed(cfg.seed)
    model = task.build()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    batches = batch_stream(cfg, store, manifest)
    start, images = None, 0
    for step in range(steps):
        batch = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss = task.loss(model, batch, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if start is None:
            start = time.perf_counter()  # after the first step, as the job measures
        else:
            images += batch["image"].shape[0]
    return images / (time.perf_counter() - start)


def pipeline_rate(cfg, batches: int) -> float:
    """Images/s of `batch_stream` alone: shards to collated batches, no model."""
    from cluster_jobs.training.tasks import batch_stream
    from ddm_nodes.dataset_manifest import DatasetManifest
    from ddm_nodes.store import open_store

    store = open_store(cfg.store)
    stream = batch_stream(cfg, store, DatasetManifest.load(store))
    next(stream)  # after the loader workers started, as the job measures
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += next(stream)["image"].shape[0]
    rate = images / (time.perf_counter() - start)
    stream.close()  # its loader workers stop
    return rate


def ray_job(cfg) -> float:
    from cluster_jobs.training.launch import launch

    outcome = launch(cfg)  # on the Ray instance already up
    if outcome.images_per_s is None:
        raise RuntimeError("the job reported no throughput")
    return outcome.images_per_s


def all_experts(store: str, steps: int, preset: str) -> dict:
    """`ddm cluster up`, `ddm submit --clusters all --wait`, `ddm cluster down`."""
    ddm = str(Path(sys.executable).with_name("ddm"))
    env = {**os.environ, "DDM_CLUSTER_DIR": tempfile.mkdtemp(prefix="ddm-bench-cluster-")}
    t0 = time.perf_counter()
    subprocess.run([ddm, "cluster", "up"], env=env, check=True, capture_output=True)
    t1 = time.perf_counter()
    try:
        done = subprocess.run(
            [
                ddm,
                "submit",
                "--store",
                store,
                "--clusters",
                "all",
                "--steps",
                str(steps),
                "--preset",
                preset,
                "--checkpoint-every",
                str(steps),
                "--wait",
            ],
            env=env,
            capture_output=True,
            text=True,
        )
    finally:
        subprocess.run([ddm, "cluster", "down"], env=env, capture_output=True)
    return {
        "experts": 8,
        "steps": steps,
        "preset": preset,
        "batch_size": 64,
        "succeeded": done.returncode == 0,
        "job_states": [line for line in done.stdout.splitlines() if line.strip()][-8:],
        "error": done.stderr.strip().splitlines()[-1:] if done.returncode else None,
        "head_start_s": round(t1 - t0, 1),
        "train_all_wall_s": round(time.perf_counter() - t1, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--pipeline-batches", type=int, default=200)
    ap.add_argument("--all-steps", type=int, default=40)
    ap.add_argument("--all-preset", default="unet-tiny")
    ap.add_argument("--skip-all", action="store_true")
    ap.add_argument("--only-all", action="store_true", help="skip the ratio part")
    args = ap.parse_args()

    from cluster_jobs.data.prepare import PrepareConfig, prepare
    from cluster_jobs.training.config import TrainConfig

    tmp = tempfile.mkdtemp(prefix="ddm-bench-train-")
    store = os.path.join(tmp, "store")
    prepare(PrepareConfig(dataset="fashion-mnist", clusters=8, store=store))
    cfg = TrainConfig(
        kind="expert",
        store=store,
        cluster=0,
        preset="dit-tiny",
        steps=args.steps,
        batch_size=args.batch_size,
        cpus_per_worker=args.threads,
        checkpoint_every=args.steps + 1,
    )
    report = {
        "benchmark": "train",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    if not args.only_all:
        import ray

        ray.init(address="local")  # a fresh instance for the job, up for every part
        try:
            pipeline = {}
            for n in (0, 2):
                loader = cfg.model_copy(update={"loader_workers": n})
                pipeline[f"loader_workers_{n}"] = round(
                    pipeline_rate(loader, args.pipeline_batches), 1
                )
            bare = bare_loop(cfg, args.steps, args.threads)
            served = ray_job(cfg)
        finally:
            ray.shutdown()  # the next part starts a head of its own
        report.update(
            {
                "model": "dit-tiny",
                "steps": args.steps,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "input_pipeline_images_per_s": pipeline,
                "pipeline_batches": args.pipeline_batches,
                "bare_pytorch_images_per_s": round(bare, 1),
                "ray_train_accelerate_images_per_s": round(served, 1),
                "ratio": round(served / bare, 3),
                "target_ratio": 0.95,
            }
        )
    if not args.skip_all:
        report["all_experts_fashion_mnist_k8"] = all_experts(store, args.all_steps, args.all_preset)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
