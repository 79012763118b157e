"""`ddm sample` on a real tiny DDM (8 dit-tiny experts + a router trained a few steps):
the image grid and arrays, seeded reproducibility, sparse call counts, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_tiny_ddm
from PIL import Image

from cluster_jobs.analysis.sampling import run_sample
from ddm_nodes.pixels import grid_png
from router_service.local_experts import LocalExperts

K, SIZE = 8, 16


@pytest.fixture(scope="module")
def ddm_store(tmp_path_factory) -> str:
    return build_tiny_ddm(tmp_path_factory.mktemp("sample") / "store", K, SIZE)


def test_sample_writes_a_grid_and_arrays_reproducibly(ddm_store, tmp_path, ddm):
    args = [
        "sample",
        "--store",
        ddm_store,
        "--strategy",
        "top-2",
        "--n",
        "6",
        "--steps",
        "4",
        "--json",
    ]
    a = ddm(*args, "--out", str(tmp_path / "a.png"), "--npy", str(tmp_path / "a.npy"))
    assert a.returncode == 0, a.stderr
    summary = json.loads(a.stdout)
    assert len(summary["expert_calls"]) == K and summary["experts_per_step"] == 2.0
    with Image.open(tmp_path / "a.png") as grid:  # 3 columns x 2 rows of 16 px, 2 px gaps
        assert grid.size == (3 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)
    arr = np.load(tmp_path / "a.npy")
    assert arr.shape == (6, 1, SIZE, SIZE) and np.isfinite(arr).all()
    assert arr.min() >= -1 and arr.max() <= 1

    b = ddm(*args, "--out", str(tmp_path / "b.png"), "--npy", str(tmp_path / "b.npy"))
    assert b.returncode == 0, b.stderr
    # same seed, same images; but another process computed them, so equal up to float32
    # rounding: each of the 4 steps adds the networks' last-bit differences (~1e-6 on
    # velocities of O(1)) to images in [-1, 1]
    again = np.load(tmp_path / "b.npy")
    np.testing.assert_allclose(again, arr, rtol=0, atol=1e-5)
    # and each grid is exactly its own run's images (the same code on the same bytes)
    for name, images in (("a", arr), ("b", again)):
        assert (tmp_path / f"{name}.png").read_bytes() == grid_png(torch.from_numpy(images))


def test_top2_runs_experts_a_quarter_as_often_as_full(ddm_store):
    experts = LocalExperts(ddm_store)
    full = run_sample(experts, "full", n=8, steps=3)
    top2 = run_sample(experts, "top-2", n=8, steps=3)
    top1 = run_sample(experts, "top-1", n=8, steps=3)
    assert top2.experts_per_step == 2.0 and top1.experts_per_step == 1.0
    # full keeps every expert above 1e-6 of router probability: all 8 here
    assert full.experts_per_step == pytest.approx(K)
    assert top2.experts_per_step / full.experts_per_step == pytest.approx(2 / K)
    # one call per selected expert per step: full calls all K at each of the 3 steps
    assert full.expert_calls == [3] * K
    assert sum(top1.expert_calls) <= sum(top2.expert_calls) <= sum(full.expert_calls)


def test_same_seed_same_images_other_seed_other_images(ddm_store):
    experts = LocalExperts(ddm_store)
    a = run_sample(experts, "nearest-centroid-2", n=4, steps=3, seed=5)
    b = run_sample(experts, "nearest-centroid-2", n=4, steps=3, seed=5)
    c = run_sample(experts, "nearest-centroid-2", n=4, steps=3, seed=6)
    # bitwise: one process, the same code on the same bytes
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)


def test_labels_by_name_and_guidance(ddm_store):
    experts = LocalExperts(ddm_store)
    plain = run_sample(experts, "top-1", n=4, steps=3, label="7")
    guided = run_sample(experts, "top-1", n=4, steps=3, label="7", guidance=3.0)
    assert plain.images.shape == guided.images.shape == (4, 1, SIZE, SIZE)
    assert not torch.equal(plain.images, guided.images)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategy", "top-9"], "top-"),
        (["--strategy", "bogus"], "top-K"),
        (["--label", "sneaker"], "is not a class name"),
        (["--guidance", "3"], "--label"),
        (["--n", "0"], "--n"),
    ],
)
def test_bad_sampling_input_exits_2(ddm_store, tmp_path, ddm, args, message):
    out = ddm(
        "sample", "--store", ddm_store, "--out", str(tmp_path / "x.png"), "--steps", "2", *args
    )
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not (tmp_path / "x.png").exists()
