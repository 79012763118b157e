"""Short-run learning-rate schedules for the demo's experts: held-out loss per schedule.

`make demo` trains each expert for only a few dozen steps. This trains one expert (cluster 0
of the store) per schedule through the same worker as a job (Accelerate, EMA), without Ray,
on one torch thread as a demo job gets, in a scratch store prepared as the demo's (the
training writes the store's expert-000); then measures its EMA weights' held-out
flow-matching loss on the same noise and t. Prints JSON, one row per schedule.
    python bench/schedules.py [--schedules 100:3e-4:100,50:2e-3:10]
A schedule is steps:lr:warmup_steps.
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
    ap.add_argument("--schedules", default="100:3e-4:100,70:2e-3:15,50:2e-3:10")
    ap.add_argument("--preset", default="unet-tiny")
    args = ap.parse_args()

    from cluster_jobs.data.prepare import PrepareConfig, prepare
    from cluster_jobs.training.config import TrainConfig
    from cluster_jobs.training.tasks import heldout_loss
    from cluster_jobs.training.worker import train_local
    from ddm_nodes.checkpoint import load_model
    from ddm_nodes.dataset_manifest import DatasetManifest
    from ddm_nodes.experts import Expert, ExpertSpec
    from ddm_nodes.store import open_store

    store_uri = os.path.join(tempfile.mkdtemp(prefix="ddm-schedules-"), "store")
    prepare(PrepareConfig(dataset="fashion-mnist", clusters=4, store=store_uri))
    store = open_store(store_uri)
    manifest = DatasetManifest.load(store)
    torch.set_num_threads(1)
    rows = []
    for schedule in args.schedules.split(","):
        steps, lr, warmup = schedule.split(":")
        cfg = TrainConfig(
            kind="expert",
            store=store_uri,
            cluster=0,
            preset=args.preset,
            steps=int(steps),
            lr=float(lr),
            warmup_steps=int(warmup),
            restart=True,
            checkpoint_every=10**6,
        )
        start = time.perf_counter()
        result = train_local(cfg)
        seconds = time.perf_counter() - start
        trained = load_model(store, cfg.prefix, kind="expert")
        expert = Expert(trained.model, ExpertSpec(**trained.training["model"]))
        rows.append(
            {
                "steps": cfg.steps,
                "lr": cfg.lr,
                "warmup_steps": cfg.warmup_steps,
                "train_seconds": round(seconds, 1),
                "images_per_s": round(result["images_per_s"], 1),
                "heldout_loss_ema": round(heldout_loss(expert.eval(), cfg, store, manifest), 4),
            }
        )
        store.delete(store.list(cfg.prefix + "/"))
    print(
        json.dumps(
            {
                "benchmark": "schedules",
                "preset": args.preset,
                "machine": {"cpus": os.cpu_count(), "threads": 1, "platform": platform.platform()},
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
