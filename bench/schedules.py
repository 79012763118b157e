"""Short-run learning-rate schedules for the demo's experts, measured on the demo's path.

`make demo` trains each expert for only a few dozen steps. This trains one expert (cluster 0
of a store prepared as the demo's) per schedule exactly as the demo does: `ddm submit`'s
plan from `DemoConfig.expert_options()`, one Ray job on a local Ray head (Ray Train +
Accelerate, one CPU per worker), the whole config handed to the job as JSON. It checks that
the job's training.json records the schedule it was given, then measures the EMA weights'
held-out flow-matching loss on the same noise and t. Prints JSON, one row per schedule.

    python bench/schedules.py [--schedules 50:2e-3:10,100:3e-4:100]

A schedule is steps:lr:warmup_steps. One job runs at a time (the demo runs one per CPU),
so `job_seconds` (submit to SUCCEEDED, Ray Train's start-up included) is an upper bound
only for a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--schedules", default="50:2e-3:100,50:2e-3:10,70:2e-3:15,100:3e-4:100")
    ap.add_argument("--preset", default="unet-tiny")
    args = ap.parse_args()

    from cluster_jobs import submit as jobs
    from cluster_jobs.data.prepare import PrepareConfig, prepare
    from cluster_jobs.ops import local_cluster
    from cluster_jobs.ops.demo import DemoConfig
    from cluster_jobs.training.tasks import heldout_loss
    from ddm_nodes.checkpoint import load_model
    from ddm_nodes.dataset_manifest import DatasetManifest
    from ddm_nodes.experts import Expert, ExpertSpec
    from ddm_nodes.store import open_store

    scratch = Path(tempfile.mkdtemp(prefix="ddm-schedules-"))
    os.environ["DDM_CLUSTER_DIR"] = str(scratch / "cluster")  # a head of its own
    store_uri = str(scratch / "store")
    demo = DemoConfig(preset=args.preset)
    prepare(PrepareConfig(dataset=demo.dataset, clusters=demo.clusters, store=store_uri))
    store = open_store(store_uri)
    manifest = DatasetManifest.load(store)
    ports = [local_cluster.free_port() for _ in range(3)]
    head = local_cluster.up(os.cpu_count() or 2, *ports)
    local_cluster.use_local_cluster_auth()  # its token, for the job API
    torch.set_num_threads(1)
    rows = []
    try:
        for schedule in args.schedules.split(","):
            steps, lr, warmup = schedule.split(":")
            demo = DemoConfig(
                preset=args.preset, expert_steps=int(steps), expert_lr=float(lr),
                warmup_steps=int(warmup),
            )  # fmt: skip
            (cfg,) = jobs.plan(store.uri, "0", demo.expert_options())
            start = time.perf_counter()
            (job,) = jobs.submit(head.dashboard_url, [cfg], force=True)
            (state,) = jobs.wait(head.dashboard_url, [job.submission_id]).values()
            seconds = time.perf_counter() - start
            if state != "SUCCEEDED":
                raise SystemExit(f"{job.submission_id} {state}: see `ray job logs`")
            log = jobs.logs(head.dashboard_url, job.submission_id).splitlines()
            outcome = json.loads(next(x for x in reversed(log) if x.startswith('{"name"')))
            trained = load_model(store, cfg.prefix, kind="expert")
            ran = trained.training["config"]  # what the job's worker ran with
            if (ran["steps"], ran["warmup_steps"]) != (cfg.steps, cfg.warmup_steps):
                raise SystemExit(f"the job ran {ran}, not the submitted {cfg}")
            expert = Expert(trained.model, ExpertSpec(**trained.training["model"])).eval()
            rows.append(
                {
                    "steps": ran["steps"],
                    "lr": ran["lr"],
                    "warmup_steps": ran["warmup_steps"],
                    "job_seconds": round(seconds, 1),
                    "images_per_s": round(outcome["images_per_s"], 1),
                    "heldout_loss_ema": round(heldout_loss(expert, cfg, store, manifest), 4),
                }
            )
    finally:
        local_cluster.down()
    print(
        json.dumps(
            {
                "benchmark": "schedules",
                "path": "ddm submit -> Ray job (Ray Train + Accelerate), one at a time",
                "preset": args.preset,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
