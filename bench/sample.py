"""Benchmark in-process sampling: images/s per policy at 50 Euler steps with dit-tiny
experts (fashion-mnist K=8, experts and router briefly trained: speed does not depend on
how well they are trained), and expert evaluations per image. Prints JSON.
    python bench/sample.py [--n 32] [--steps 50] [--train-steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile

import torch

POLICIES = ["full", "top-1", "top-2", "nearest-centroid", "nearest-centroid-2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--store", help="a store with K experts and a router already trained")
    args = ap.parse_args()

    from cluster_jobs.analysis.sampling import run_sample
    from cluster_jobs.data.prepare import PrepareConfig, prepare
    from cluster_jobs.training.config import TrainConfig
    from cluster_jobs.training.worker import train_local
    from router_service.local_experts import LocalExperts

    store = args.store
    if store is None:
        store = os.path.join(tempfile.mkdtemp(prefix="ddm-bench-sample-"), "store")
        prepare(PrepareConfig(dataset="fashion-mnist", clusters=8, store=store))
        common = dict(
            store=store,
            steps=args.train_steps,
            batch_size=32,
            checkpoint_every=args.train_steps,
            cpus_per_worker=os.cpu_count() or 1,
        )
        for k in range(8):
            train_local(TrainConfig(kind="expert", cluster=k, preset="dit-tiny", **common))
        train_local(TrainConfig(kind="router", **common))
    torch.set_num_threads(os.cpu_count() or 1)
    experts = LocalExperts(store)
    run_sample(experts, "top-1", n=4, steps=2)  # warm-up
    rows = {}
    for policy in POLICIES:
        run = run_sample(experts, policy, n=args.n, steps=args.steps)
        rows[policy] = {
            "images_per_s": round(args.n / run.seconds, 2),
            "seconds": round(run.seconds, 2),
            "expert_evaluations_per_image": round(run.experts_per_step * args.steps, 1),
            "expert_calls": sum(run.expert_calls),
        }
    base = rows["top-1"]["seconds"]
    for row in rows.values():
        row["latency_vs_top1"] = round(row["seconds"] / base, 2)
    print(
        json.dumps(
            {
                "benchmark": "sample",
                "experts": experts.num_experts,
                "preset": "dit-tiny",
                "n": args.n,
                "steps": args.steps,
                "solver": "euler",
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "policies": rows,
                "paper_reference": "Paris, 8 experts: top-2/top-1 latency 1.87x, full/top-1 7.1x",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
