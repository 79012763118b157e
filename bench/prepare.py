"""Benchmark `ddm prepare`: fashion-mnist (70k) with K=8 into a local store and into a moto
S3 server on loopback. Prints JSON: images/s, phase seconds and peak memory per target.

Each run happens in a fresh subprocess so its peak RSS is its own.
    python bench/prepare.py [--dataset fashion-mnist] [--clusters 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid


def run_one(dataset: str, clusters: int, store: str) -> dict:
    from cluster_jobs.data.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(dataset=dataset, clusters=clusters, store=store, overwrite=True)
    start = time.perf_counter()
    result = prepare(cfg)
    seconds = time.perf_counter() - start
    peak_kb = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,  # shard-writing workers
    )
    return {
        "images": result.manifest.count,
        "seconds": round(seconds, 2),
        "images_per_s": round(result.manifest.count / seconds, 1),
        "phases_s": result.seconds,
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "shards": sum(len(c.shards) for c in result.manifest.train + result.manifest.heldout),
    }


def child(dataset: str, clusters: int, store: str, env: dict | None = None) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--one",
            store,
            "--dataset",
            dataset,
            "--clusters",
            str(clusters),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def moto_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--clusters", type=int, default=8)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one prepare, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.dataset, args.clusters, args.one)))
        return

    report = {
        "benchmark": "prepare",
        "dataset": args.dataset,
        "clusters": args.clusters,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        report["local"] = child(args.dataset, args.clusters, os.path.join(tmp, "store"))

    proc, endpoint = moto_server()
    try:
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        report["s3_moto"] = child(args.dataset, args.clusters, f"s3://{bucket}/prep", env)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    report["target_seconds"] = 60
    report["meets_target"] = all(report[k]["seconds"] < 60 for k in ("local", "s3_moto"))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
