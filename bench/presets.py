"""Pilot for the CPU default expert preset: quality per CPU-minute.

Each preset trains one fashion-mnist expert (cluster 0 of K=8) for the same wall-clock
budget on this machine, through the same worker as a job (Accelerate, EMA), without Ray;
then its EMA weights' held-out flow-matching loss is measured on the same noise and t.
Prints JSON, one row per preset.
    python bench/presets.py [--budget-s 150] [--presets unet-tiny,dit-tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget-s", type=float, default=150)
    ap.add_argument("--presets", default="unet-tiny,dit-tiny")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--store", help="a prepared store (default: prepare fashion-mnist K=8)")
    args = ap.parse_args()

    from cluster_jobs.data.prepare import PrepareConfig, prepare
    from cluster_jobs.training.config import TrainConfig
    from cluster_jobs.training.tasks import batch_stream, heldout_loss, make_task
    from cluster_jobs.training.worker import train_local
    from ddm_nodes.checkpoint import load_model
    from ddm_nodes.dataset_manifest import DatasetManifest
    from ddm_nodes.experts import Expert, ExpertSpec
    from ddm_nodes.store import open_store

    store_uri = args.store
    if store_uri is None:
        store_uri = os.path.join(tempfile.mkdtemp(prefix="ddm-presets-"), "store")
        prepare(PrepareConfig(dataset="fashion-mnist", clusters=8, store=store_uri))
    store = open_store(store_uri)
    manifest = DatasetManifest.load(store)
    threads = os.cpu_count() or 1
    rows = []
    for preset in args.presets.split(","):
        cfg = TrainConfig(
            kind="expert",
            store=store_uri,
            cluster=0,
            preset=preset,
            batch_size=args.batch_size,
            cpus_per_worker=threads,
            restart=True,
            checkpoint_every=10**6,
        )
        # Throughput first, so that every preset gets the same budget (run on a quiet machine).
        torch.set_num_threads(threads)
        task = make_task(cfg, manifest)
        model = task.build()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        batches = batch_stream(cfg, store, manifest)
        gen = torch.Generator().manual_seed(0)
        for i in range(26):  # 20 timed steps after 6 of warm-up
            if i == 6:
                t0 = time.perf_counter()
            task.loss(model, next(batches), gen).backward()
            opt.step()
            opt.zero_grad()
        rate = 20 * args.batch_size / (time.perf_counter() - t0)
        steps = max(10, int(args.budget_s * rate / args.batch_size))
        store.delete(store.list(cfg.prefix + "/"))
        start = time.perf_counter()
        result = train_local(cfg.model_copy(update={"steps": steps}))
        seconds = time.perf_counter() - start
        trained = load_model(store, cfg.prefix, kind="expert")
        expert = Expert(trained.model, ExpertSpec(**trained.training["model"]))
        rows.append(
            {
                "preset": preset,
                "parameters_m": round(sum(p.numel() for p in expert.parameters()) / 1e6, 2),
                "steps": steps,
                "train_seconds": round(seconds, 1),
                "images_per_s": round(result["images_per_s"], 1),
                "heldout_loss_ema": round(heldout_loss(expert.eval(), cfg, store, manifest), 4),
            }
        )
    print(
        json.dumps(
            {
                "benchmark": "presets",
                "budget_s": args.budget_s,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
