"""Benchmark the Serve router service against the in-process engine, in one run on one
machine: images/s for top-2 and full at 50 Euler steps, at concurrency 1 and 8, the
per-step router overhead, the mean rows per expert call of the router's step batcher and
the mean `@serve.batch` size. Prints JSON.

    python bench/serve.py [--store STORE] [--n 8] [--steps 50] [--requests 2] [--device cuda]

Without --store it builds fashion-mnist K=8 with 8 dit-tiny experts and a router trained
a few steps (speed does not depend on how well they are trained), as bench/sample.py does.
It starts its own Ray head (`ddm cluster up` on free loopback ports) and `ddm serve`
(access log off), and stops both at the end.

in-process at concurrency c: the same c * requests * n images sampled by the engine in
one process, as batches of c * n (the engine batches what concurrent clients would send
separately; the best it can do). Router overhead per step, two ways: a served request's
per-step time at concurrency 1 minus the in-process per-step time of the same batch
(everything serving adds: HTTP, handles, transport, batching waits), and the router's own
time per evaluation (the evaluation minus the longest expert call it awaited: routing,
grouping, merging), p50/p95 over evaluations, median over requests. Rows per expert call:
the samples (doubled under guidance) the router's step batcher put into each expert call,
over every request in flight; evaluations per tick: how many requests' evaluations a tick
gathered.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_store(train_steps: int) -> str:
    from cluster_jobs.data.prepare import PrepareConfig, prepare
    from cluster_jobs.training.config import TrainConfig
    from cluster_jobs.training.worker import train_local

    store = os.path.join(tempfile.mkdtemp(prefix="ddm-bench-serve-"), "store")
    prepare(PrepareConfig(dataset="fashion-mnist", clusters=8, store=store))
    common = dict(
        store=store,
        steps=train_steps,
        batch_size=32,
        checkpoint_every=train_steps,
        cpus_per_worker=2,
    )
    for k in range(8):
        train_local(TrainConfig(kind="expert", cluster=k, preset="dit-tiny", **common))
    train_local(TrainConfig(kind="router", **common))
    return store


# exact counters (Ray rebuilds a histogram's _sum from bucket midpoints)
COUNTERS = (
    "ticks",
    "tick_gathered_evaluations",
    "tick_expert_calls",
    "tick_expert_rows",
    "batch_forwards",
    "batch_forward_samples",
)


def counters(metrics_url: str) -> dict[str, float]:
    """ray_ddm_serve_<COUNTERS>_total summed over every replica and expert."""
    text = httpx.get(metrics_url, timeout=10).text
    out = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        if m := re.match(r"ray_ddm_serve_([a-z_]+)_total(\{.*\})? ([0-9.e+]+)", line):
            if m.group(1) in out:
                out[m.group(1)] += float(m.group(3))
    return out


def ratio_between(before: dict, after: dict, num: str, den: str) -> float | None:
    count = after[den] - before[den]
    return round((after[num] - before[num]) / count, 2) if count else None


def served_run(url: str, strategy: str, clients: int, requests: int, n: int, steps: int):
    def client(c: int) -> list[dict]:
        out = []
        with httpx.Client(timeout=600) as http:
            for r in range(requests):
                body = {"n": n, "steps": steps, "strategy": strategy, "seed": 1000 * c + r}
                reply = http.post(f"{url}/v1/samples", json=body)
                reply.raise_for_status()
                out.append(reply.json()["timing"])
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        timings = [t for ts in pool.map(client, range(clients)) for t in ts]
    seconds = time.perf_counter() - start
    return clients * requests * n / seconds, timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--store")
    ap.add_argument("--n", type=int, default=8, help="images per request")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--strategies", default="top-2,full")
    ap.add_argument("--batch-wait", type=float, default=None, help="batch_wait_timeout_s")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where experts run")
    args = ap.parse_args()

    from cluster_jobs.analysis.sampling import run_sample
    from router_service.app_config import BatchConfig
    from router_service.local_experts import LocalExperts

    store = args.store or build_store(args.train_steps)
    torch.set_num_threads(os.cpu_count() or 1)
    experts = LocalExperts(store, device=args.device)
    run_sample(experts, "top-1", n=4, steps=2)  # warm-up

    cluster_dir = tempfile.mkdtemp(prefix="ddm-bench-cluster-")
    env = {**os.environ, "DDM_CLUSTER_DIR": cluster_dir}
    metrics_port, http_port = free_port(), free_port()
    up = [
        str(BIN / "ddm"), "cluster", "up", "--port", str(free_port()),
        "--dashboard-port", str(free_port()), "--metrics-export-port", str(metrics_port),
    ]  # fmt: skip
    subprocess.run(up, env=env, check=True, capture_output=True)
    log = open(os.path.join(cluster_dir, "serve.log"), "w")
    serve_cmd = [str(BIN / "ddm"), "serve", "--store", store, "--port", str(http_port)]
    serve_cmd += ["--no-access-log", "--device", args.device]
    if args.batch_wait is not None:
        config = Path(cluster_dir) / "app.json"
        config.write_text(json.dumps({"batch_wait_timeout_s": args.batch_wait}))
        serve_cmd += ["--config", str(config)]
    serve = subprocess.Popen(
        serve_cmd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{http_port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    rows: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + 600
        while f"serving {store}" not in Path(log.name).read_text():
            if serve.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(Path(log.name).read_text()[-3000:])
            time.sleep(1)
        served_run(url, "top-2", 1, 1, 2, 4)  # warm-up
        for strategy in args.strategies.split(","):
            row: dict = {}
            for clients in (1, 8):
                images = clients * args.requests * args.n
                local = [
                    run_sample(experts, strategy, n=clients * args.n, steps=args.steps)
                    for _ in range(args.requests)
                ]
                local_rate = images / sum(r.seconds for r in local)
                time.sleep(12)  # Ray exports worker metrics every few seconds
                before = counters(metrics_url)
                rate, timings = served_run(
                    url, strategy, clients, args.requests, args.n, args.steps
                )
                time.sleep(12)
                after = counters(metrics_url)
                row[f"c{clients}"] = {
                    "served_images_per_s": round(rate, 2),
                    "in_process_images_per_s": round(local_rate, 2),
                    "ratio": round(rate / local_rate, 3),
                    "mean_rows_per_expert_call": ratio_between(
                        before, after, "tick_expert_rows", "tick_expert_calls"
                    ),
                    "mean_evaluations_per_tick": ratio_between(
                        before, after, "tick_gathered_evaluations", "ticks"
                    ),
                    "mean_batch_samples": ratio_between(
                        before, after, "batch_forward_samples", "batch_forwards"
                    ),
                    "served_step_ms_p50": round(
                        statistics.median(t["per_step_ms"] for t in timings), 2
                    ),
                    # inside the router: an evaluation minus the longest expert call
                    "router_ms_p50": round(
                        statistics.median(t["router_ms_p50"] for t in timings), 3
                    ),
                    "router_ms_p95": round(
                        statistics.median(t["router_ms_p95"] for t in timings), 3
                    ),
                }
                if clients == 1:
                    local_ms = 1000 * sum(r.seconds for r in local) / len(local) / args.steps
                    row["in_process_step_ms_c1"] = round(local_ms, 2)
                    over = sorted(t["per_step_ms"] - local_ms for t in timings)
                    row["router_overhead_step_ms_p50"] = round(statistics.median(over), 2)
                    row["router_overhead_step_ms_p95"] = round(
                        over[min(len(over) - 1, int(0.95 * len(over)))], 2
                    )
            rows[strategy] = row
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
        subprocess.run([str(BIN / "ddm"), "cluster", "down"], env=env, capture_output=True)
    print(
        json.dumps(
            {
                "benchmark": "serve",
                "experts": experts.num_experts,
                "preset": "dit-tiny",
                "n_per_request": args.n,
                "requests_per_client": args.requests,
                "steps": args.steps,
                "replicas_per_expert": 1,
                "batch_wait_timeout_s": args.batch_wait or BatchConfig().batch_wait_timeout_s,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "strategies": rows,
                "device": args.device,
                "target": "served >= 0.9x in-process at concurrency 8 (top-2 and full); "
                "router_ms_p50 <= 10 at concurrency 1",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
