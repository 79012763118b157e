"""Benchmark `ddm prepare`: fashion-mnist (70k) with K=8 into a local store and into a moto
S3 server on loopback; then RGB 64x64 `shapes` clustered on DINOv2 features with VAE latents
(tiny randomly initialised models saved with save_pretrained: the real loaders and the real
data path, small weights; a real DINOv2-S or SD-VAE costs far more per image). Prints JSON:
images/s overall and per phase, phase seconds and peak memory per run.

Each run happens in a fresh subprocess (its PrepareConfig as JSON) so its peak RSS is its own.
    python bench/prepare.py [--dataset fashion-mnist] [--clusters 8] [--rgb-count 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from cluster_jobs.ops.s3_server import moto_server

ROOT = Path(__file__).resolve().parent.parent


def run_one(config_json: str) -> dict:
    from cluster_jobs.data.prepare import PrepareConfig, prepare

    cfg = PrepareConfig.model_validate_json(config_json)
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
        "phase_images_per_s": {
            phase: round(result.manifest.count / max(sec, 1e-9), 1)
            for phase, sec in result.seconds.items()
            if phase not in ("total", "manifest")
        },
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "shards": sum(len(c.shards) for c in result.manifest.train + result.manifest.heldout),
    }


def child(env: dict | None = None, **config) -> dict:
    from cluster_jobs.data.prepare import PrepareConfig

    cfg = PrepareConfig(overwrite=True, **config)
    out = subprocess.run(
        [sys.executable, __file__, "--one", cfg.model_dump_json()],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def rgb_latents(count: int, tmp: str) -> dict:
    """shapes RGB 64x64, K=8, tiny-DINOv2 features (cosine), tiny-VAE latents (32x32x4)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_dinov2, save_vae

    dinov2 = save_dinov2(Path(tmp, "dinov2"), image_size=64)
    vae = save_vae(Path(tmp, "vae"))
    return {
        "dataset": f"shapes, {count} images, 64x64 RGB",
        "features": "dinov2 (tiny: 2 layers, hidden 32, patch 8)",
        "latents": "AutoencoderKL (tiny: 2 levels, 16/32 channels) -> 32x32x4",
        **child(
            dataset="shapes",
            count=count,
            image_size=64,
            clusters=8,
            features=f"dinov2:{dinov2}",
            latents=f"vae:{vae}",
            store=os.path.join(tmp, "rgb-store"),
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--clusters", type=int, default=8)
    ap.add_argument("--rgb-count", type=int, default=10_000)
    ap.add_argument("--skip-gray", action="store_true", help="only the RGB latent run")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one PrepareConfig JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return

    report = {
        "benchmark": "prepare",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        report["rgb_64_dinov2_vae_latents"] = rgb_latents(args.rgb_count, tmp)
    if args.skip_gray:
        print(json.dumps(report, indent=2))
        return
    gray = dict(dataset=args.dataset, clusters=args.clusters)
    report.update(gray)  # what the local and S3 runs below prepare
    with tempfile.TemporaryDirectory() as tmp:
        report["local"] = child(store=os.path.join(tmp, "store"), **gray)

    with (
        tempfile.TemporaryDirectory() as logs,
        moto_server(Path(logs) / "moto.log") as (
            _,
            endpoint,
        ),
    ):
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
        report["s3_moto"] = child(env, store=f"s3://{bucket}/prep", **gray)
    report["target_seconds"] = 60
    report["meets_target"] = all(report[k]["seconds"] < 60 for k in ("local", "s3_moto"))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
