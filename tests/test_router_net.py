"""router_net.py: p(cluster | x_t, t) as a small diffusers ModelMixin."""

from __future__ import annotations

import math

import pytest
import torch

from ddm_nodes.errors import DDMError
from ddm_nodes.experts import TIME_SCALE
from ddm_nodes.presets import ROUTER_PRESETS, get_router_preset
from ddm_nodes.router_net import RouterNet, timestep_embedding


def _router(preset: str = "router-tiny", channels: int = 1, k: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return RouterNet.from_preset(preset, channels, k).eval()


def _inputs(n: int, channels: int, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g), torch.rand(n, generator=g)


def test_the_documented_presets_exist():
    assert set(ROUTER_PRESETS) == {"router-tiny", "router-s"}
    assert ROUTER_PRESETS["router-tiny"].widths == (32, 64, 128)
    assert ROUTER_PRESETS["router-s"].time_dim == 256


@pytest.mark.parametrize("preset", sorted(ROUTER_PRESETS))
def test_from_preset_builds_the_preset(preset):
    p = ROUTER_PRESETS[preset]
    r = RouterNet.from_preset(preset, in_channels=3, num_clusters=5)
    assert r.config.in_channels == 3
    assert r.config.num_clusters == 5
    assert tuple(r.config.widths) == p.widths
    assert r.config.time_dim == p.time_dim
    assert len(r.blocks) == len(p.widths)
    assert r.out.out_features == 5


@pytest.mark.parametrize("preset", sorted(ROUTER_PRESETS))
@pytest.mark.parametrize("channels,k,n,size", [(1, 3, 2, 16), (3, 8, 4, 16), (1, 2, 1, 12)])
def test_logits_have_shape_n_by_k(preset, channels, k, n, size):
    r = _router(preset, channels, k)
    x, t = _inputs(n, channels, size)
    with torch.no_grad():
        logits = r(x, t)
    assert logits.shape == (n, k)
    assert torch.isfinite(logits).all()


def test_a_single_t_is_broadcast_over_the_batch():
    r = _router()
    x, _ = _inputs(3, 1)
    with torch.no_grad():
        one = r(x, torch.tensor([0.4]))
        each = r(x, torch.full((3,), 0.4))
    # bitwise: t is expanded to (3,) before any arithmetic, so both calls run the same code on
    # the same bytes from there on
    torch.testing.assert_close(one, each, rtol=0, atol=0)


def test_logits_depend_on_t():
    r = _router()
    x, _ = _inputs(2, 1)
    with torch.no_grad():
        early = r(x, torch.full((2,), 0.05))
        late = r(x, torch.full((2,), 0.95))
    assert (early - late).abs().max().item() > 1e-5


def test_unknown_preset_is_a_user_error_listing_the_presets():
    with pytest.raises(DDMError) as err:
        get_router_preset("router-xl")
    for name in ROUTER_PRESETS:
        assert name in str(err.value)
    with pytest.raises(DDMError, match="unknown router preset"):
        RouterNet.from_preset("unet-tiny", 1, 3)


@pytest.mark.parametrize("dim", [2, 16, 128, 256])
@pytest.mark.parametrize("n", [1, 5])
def test_timestep_embedding_is_cos_and_sin_of_scaled_t(dim, n):
    t = torch.rand(n, generator=torch.Generator().manual_seed(dim + n))
    emb = timestep_embedding(t, dim)
    assert emb.shape == (n, dim)
    half = dim // 2
    for row in range(n):
        for i in range(half):
            freq = 10_000.0 ** (-i / half)
            arg = float(t[row]) * 1000.0 * freq
            assert emb[row, i].item() == pytest.approx(math.cos(arg), abs=5e-4)
            assert emb[row, half + i].item() == pytest.approx(math.sin(arg), abs=5e-4)


@pytest.mark.parametrize("dim", [5, 129])
def test_an_odd_time_dim_still_gives_dim_features(dim):
    """The docstring promises (N,) -> (N, dim); RouterNet feeds it straight into a
    Linear(time_dim, time_dim), so an odd time_dim must work too."""
    t = torch.rand(3, generator=torch.Generator().manual_seed(0))
    assert timestep_embedding(t, dim).shape == (3, dim)
    r = RouterNet(in_channels=1, num_clusters=2, widths=(8,), time_dim=dim).eval()
    x, _ = _inputs(3, 1, size=8)
    with torch.no_grad():
        assert r(x, t).shape == (3, 2)


def test_timestep_embedding_uses_the_experts_time_scale():
    assert TIME_SCALE == 1000.0
    emb = timestep_embedding(torch.tensor([0.0, 1.0]), 4)
    # t = 0: cos 0 = 1, sin 0 = 0 at every frequency
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    # t = 1: the lowest frequency is 1, so the first feature is cos(1000)
    assert emb[1, 0].item() == pytest.approx(math.cos(1000.0), abs=5e-4)
    assert emb[1, 2].item() == pytest.approx(math.sin(1000.0), abs=5e-4)


@pytest.mark.parametrize("preset", sorted(ROUTER_PRESETS))
def test_save_and_load_pretrained_round_trip(preset, tmp_path):
    r = _router(preset, channels=3, k=4, seed=7)
    r.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "config.json").is_file()
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = RouterNet.from_pretrained(tmp_path).eval()
    assert tuple(loaded.config.widths) == ROUTER_PRESETS[preset].widths
    saved = r.state_dict()
    assert set(loaded.state_dict()) == set(saved)
    for k, v in loaded.state_dict().items():  # the bytes saved, read back: bitwise
        assert torch.equal(v, saved[k]), k
    # Outputs of two objects with those weights: another allocation may take another GEMM
    # path, so the logits (O(1)) may differ by float32 rounding through the layers, measured
    # ~1e-6; a router with other weights differs by ~0.5.
    close = dict(rtol=1e-5, atol=1e-5)
    x, t = _inputs(3, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), r(x, t), **close)
    fresh = _router(preset, channels=3, k=4, seed=8)
    with torch.no_grad():  # the comparison can tell them apart
        assert not torch.allclose(fresh(x, t), r(x, t), **close)


def test_router_trains():
    r = _router().train()
    x, t = _inputs(4, 1)
    target = torch.tensor([0, 1, 2, 0])
    torch.nn.functional.cross_entropy(r(x, t), target).backward()
    assert r.out.weight.grad is not None and r.out.weight.grad.abs().sum() > 0
    assert r.time_mlp[0].weight.grad is not None and r.time_mlp[0].weight.grad.abs().sum() > 0
