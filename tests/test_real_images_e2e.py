"""A latent RGB DDM end to end on a real local Ray head: `shapes` 32x32 RGB, K=4, clustered
on tiny-DINOv2 features with tiny-VAE latents (both saved with save_pretrained: the real
loaders, small weights) -> `ddm submit` (expert 0 and the router as Ray jobs; experts 1-3
in-process with the same config, which saves two rounds of job start-up) -> `ddm
sample` in-process and `ddm serve` over HTTP (PNG answers, RGB, decoded once) -> `ddm
analyze --quick`; then a tampered pinned VAE refused with one line / HTTP 4xx."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import ddm_serving, free_port
from PIL import Image
from tiny_models import save_dinov2, save_vae

from cluster_jobs.training.config import TrainConfig
from cluster_jobs.training.worker import train_local
from ddm_nodes.checkpoint import load_model
from ddm_nodes.names import expert_prefix
from ddm_nodes.store import open_store

pytestmark = pytest.mark.integration
SIZE, K = 32, 4


@pytest.fixture(scope="module")
def trained(ray_head, tmp_path_factory, ddm) -> Path:
    root = tmp_path_factory.mktemp("real-e2e")
    dinov2, vae = save_dinov2(root / "dinov2", SIZE), save_vae(root / "vae")
    store = root / "store"
    prepared = ddm(
        "prepare",
        "--store",
        str(store),
        "--dataset",
        "shapes",
        "--count",
        "480",
        "--image-size",
        str(SIZE),
        "--clusters",
        str(K),
        "--features",
        f"dinov2:{dinov2}",
        "--latents",
        f"vae:{vae}",
        "--json",
    )
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    summary = json.loads(prepared.stdout)
    assert summary["image_shape"] == [SIZE, SIZE, 3] and summary["latents"]["shape"] == [16, 16, 4]
    assert summary["features"]["method"] == "dinov2" and summary["features"]["metric"] == "cosine"

    submitted = ddm(
        "submit",
        "--store",
        str(store),
        "--clusters",
        "0",
        "--router",
        "--steps",
        "12",
        "--checkpoint-every",
        "12",
        "--preset",
        "dit-tiny",
        "--batch-size",
        "16",
        "--wait",
        env=ray_head,
    )
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    expert = dict(store=str(store), steps=12, checkpoint_every=12, batch_size=16)
    for k in range(1, K):
        train_local(TrainConfig(kind="expert", cluster=k, preset="dit-tiny", **expert))
    # the analysis' feature network, in-process (it sees images, not latents)
    common = dict(store=str(store), steps=20, batch_size=32, checkpoint_every=20)
    train_local(TrainConfig(kind="featnet", **common))
    return store


def test_experts_and_router_trained_on_latents(trained):
    s = open_store(trained)
    for k in range(K):
        loaded = load_model(s, expert_prefix(k), kind="expert")
        assert loaded.training["model"]["channels"] == 4
        assert loaded.training["model"]["image_size"] == 16
        assert loaded.manifest.final and loaded.manifest.step == 12
    router = load_model(s, "router", kind="router")
    assert router.model.config.in_channels == 4 and router.model.config.num_clusters == K


def test_ddm_sample_decodes_to_rgb_pngs(trained, tmp_path, ddm):
    out, npy = tmp_path / "grid.png", tmp_path / "images.npy"
    done = ddm(
        "sample",
        "--store",
        str(trained),
        "--out",
        str(out),
        "--npy",
        str(npy),
        "--strategy",
        "nearest-centroid",
        "--n",
        "4",
        "--steps",
        "4",
        "--json",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert Image.open(out).mode == "RGB"
    import numpy as np

    images = np.load(npy)
    assert images.shape == (4, 3, SIZE, SIZE) and images.min() >= -1 and images.max() <= 1


def test_ddm_serve_answers_rgb_pngs_and_analyze_runs(trained, ray_head, tmp_path, ddm):
    with ddm_serving(trained, ray_head, tmp_path) as url:
        for strategy in ("top-2", "nearest-centroid"):
            body = {"n": 2, "steps": 3, "strategy": strategy, "seed": 1, "format": "png"}
            reply = httpx.post(f"{url}/v1/samples", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            assert reply.json()["shape"] == [2, 3, SIZE, SIZE]
            for b64 in reply.json()["images"]:
                image = Image.open(io.BytesIO(base64.b64decode(b64)))
                assert (image.mode, image.size) == ("RGB", (SIZE, SIZE))
        wrong = httpx.post(
            f"{url}/v1/images/generations", json={"prompt": "x", "size": "16x16"}, timeout=60
        )
        assert wrong.status_code == 422 and "32x32" in wrong.json()["error"]["message"]

    report = tmp_path / "report"
    done = ddm(
        "analyze",
        "--store",
        str(trained),
        "--out",
        str(report),
        "--strategies",
        "top-2,nearest-centroid",
        "--quick",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((report / "results.json").read_text())
    for row in results["strategies"].values():
        assert row["quality"]["fid"]["mean"] >= 0
        assert 1 <= row["alignment"]["selected_rank"] <= results["num_experts"]
    assert Image.open(report / "samples-top-2.png").mode == "RGB"


def test_a_tampered_pinned_vae_is_refused(trained, tmp_path, ddm, ray_head):
    copy = tmp_path / "store"
    shutil.copytree(trained, copy)
    weights = copy / "pretrained/vae/diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    done = ddm("sample", "--store", str(copy), "--out", str(tmp_path / "x.png"), "--n", "1")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is corrupted or was replaced" in lines[0], done.stderr
    assert not (tmp_path / "x.png").exists()
    # the service refuses before deploying anything
    served = ddm("serve", "--store", str(copy), "--port", str(free_port()), env=ray_head)
    assert served.returncode == 2, served.stderr[-2000:]
    lines = served.stderr.strip().splitlines()
    assert len(lines) == 1 and "pretrained/vae/diffusion_pytorch_model" in lines[0], lines
