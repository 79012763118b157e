"""experts.py: the v = expert(x_t, t, y) contract over the diffusers UNet and DiT."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding

from ddm_nodes import flow
from ddm_nodes.dataset_manifest import NULL_LABEL
from ddm_nodes.errors import DDMError
from ddm_nodes.experts import TIME_SCALE, Expert, ExpertSpec, build_denoiser
from ddm_nodes.presets import EXPERT_PRESETS, get_preset

FAST = ["unet-tiny", "dit-tiny"]
SIZE = 16


def _expert(preset: str, channels: int = 1, num_classes: int = 0, seed: int = 0) -> Expert:
    torch.manual_seed(seed)
    spec = ExpertSpec(preset=preset, image_size=SIZE, channels=channels, num_classes=num_classes)
    return Expert.create(spec).eval()


def _inputs(n: int, channels: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, SIZE, SIZE, generator=g), torch.rand(n, generator=g)


class _Spy:
    """Records the timestep and class labels of every call into a denoiser."""

    def __init__(self, denoiser: torch.nn.Module):
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.handle = denoiser.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        labels = kwargs.get("class_labels", args[2] if len(args) > 2 else None)
        self.calls.append((timestep.detach().clone(), None if labels is None else labels.clone()))

    @property
    def labels(self) -> torch.Tensor | None:
        return self.calls[-1][1]

    @property
    def timestep(self) -> torch.Tensor:
        return self.calls[-1][0]


# --- presets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,patch,width,depth",
    [("dit-tiny", 4, 128, 4), ("dit-s", 2, 384, 12), ("dit-b", 2, 768, 12)],
)
def test_dit_presets_have_the_documented_sizes(name, patch, width, depth):
    p = EXPERT_PRESETS[name]
    assert (p.arch, p.patch_size, p.width, p.depth) == ("dit", patch, width, depth)
    assert p.downsample == patch
    assert p.width % p.heads == 0


@pytest.mark.parametrize("name", ["unet-tiny", "unet-s"])
def test_unet_presets_exist_with_one_attention_flag_per_level(name):
    p = EXPERT_PRESETS[name]
    assert p.arch == "unet"
    assert len(p.attention) == len(p.block_channels)
    assert p.downsample == 2 ** (len(p.block_channels) - 1)
    assert all(c % p.norm_groups == 0 for c in p.block_channels)


def test_the_preset_set_is_the_documented_one():
    dits = {"dit-tiny", "dit-s", "dit-s-4", "dit-b", "dit-b-4", "dit-b-8", "dit-l", "dit-xl"}
    assert set(EXPERT_PRESETS) == {"unet-tiny", "unet-s"} | dits
    # DiT-S/B/L/XL as Peebles & Xie define them (width, depth, heads); dit-b is DiT-B/2
    sizes = {"dit-s": (384, 12, 6), "dit-b": (768, 12, 12), "dit-l": (1024, 24, 16)}
    sizes["dit-xl"] = (1152, 28, 16)
    for name, (width, depth, heads) in sizes.items():
        p = EXPERT_PRESETS[name]
        assert (p.width, p.depth, p.heads, p.patch_size) == (width, depth, heads, 2)


def test_dit_tiny_has_about_a_million_parameters():
    n = sum(p.numel() for p in _expert("dit-tiny", num_classes=10).parameters())
    assert 500_000 < n < 3_000_000


def test_unknown_preset_is_a_user_error_that_lists_the_presets():
    with pytest.raises(DDMError) as err:
        get_preset("dit-xxl")
    for name in EXPERT_PRESETS:
        assert name in str(err.value)
    with pytest.raises(DDMError, match="unknown preset"):
        Expert.create(ExpertSpec(preset="dit-xxl", image_size=SIZE, channels=1))


@pytest.mark.parametrize("preset,size", [("dit-tiny", 18), ("unet-tiny", 18), ("dit-tiny", 6)])
def test_image_size_not_divisible_is_a_user_error(preset, size):
    spec = ExpertSpec(preset=preset, image_size=size, channels=1)
    with pytest.raises(DDMError, match="not divisible"):
        Expert.create(spec)


# --- building ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset,cls", [("unet-tiny", UNet2DModel), ("dit-tiny", DiTTransformer2DModel)]
)
@pytest.mark.parametrize("num_classes", [0, 10])
def test_create_builds_the_preset_architecture(preset, cls, num_classes):
    e = _expert(preset, num_classes=num_classes)
    assert isinstance(e.denoiser, cls)
    assert e.is_dit == (cls is DiTTransformer2DModel)
    assert e.spec.conditional == (num_classes > 0)
    assert e.denoiser.config.sample_size == SIZE


def test_unet_label_table_has_one_null_row_past_the_classes():
    cond = _expert("unet-tiny", num_classes=10)
    assert cond.denoiser.class_embedding.num_embeddings == 11
    assert cond.null_index == 10
    assert _expert("unet-tiny").denoiser.class_embedding is None


@pytest.mark.parametrize("num_classes,null", [(10, 10), (0, 1)])
def test_dit_null_index_is_the_extra_row_of_its_label_table(num_classes, null):
    e = _expert("dit-tiny", num_classes=num_classes)
    assert e.null_index == null
    tables = [m for m in e.denoiser.modules() if isinstance(m, LabelEmbedding)]
    assert tables
    for m in tables:
        assert m.embedding_table.num_embeddings == null + 1


def test_wrapping_switches_off_the_dit_label_dropout():
    torch.manual_seed(0)
    raw = build_denoiser(ExpertSpec(preset="dit-tiny", image_size=SIZE, channels=1, num_classes=10))
    before = [m.dropout_prob for m in raw.modules() if isinstance(m, LabelEmbedding)]
    assert before and all(p > 0 for p in before)  # diffusers' default, so the wrapper matters
    e = Expert(raw, ExpertSpec(preset="dit-tiny", image_size=SIZE, channels=1, num_classes=10))
    after = [m.dropout_prob for m in e.denoiser.modules() if isinstance(m, LabelEmbedding)]
    assert after and all(p == 0.0 for p in after)


def test_dit_in_train_mode_never_drops_a_real_label():
    e = _expert("dit-tiny", num_classes=10).train()
    seen: list[torch.Tensor] = []
    tables = [m for m in e.denoiser.modules() if isinstance(m, LabelEmbedding)]
    for m in tables:
        m.embedding_table.register_forward_hook(lambda mod, a, out: seen.append(a[0].clone()))
    x, t = _inputs(20, 1)
    y = torch.arange(20) % 10
    e(x, t, y)
    assert seen
    for labels in seen:
        assert torch.equal(labels, y)


# --- forward ----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", FAST)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_output_shape_equals_input_shape(preset, channels, num_classes):
    e = _expert(preset, channels=channels, num_classes=num_classes)
    x, t = _inputs(2, channels)
    y = torch.tensor([1, NULL_LABEL]) if num_classes else None
    with torch.no_grad():
        v = e(x, t, y)
    assert v.shape == x.shape
    assert v.dtype == torch.float32
    assert torch.isfinite(v).all()


@pytest.mark.parametrize("preset", FAST)
def test_backward_reaches_the_denoiser_weights(preset):
    e = _expert(preset, num_classes=10).train()
    x, t = _inputs(2, 1)
    e(x, t, torch.tensor([2, 5])).pow(2).mean().backward()
    grads = [p.grad for p in e.parameters() if p.grad is not None]
    assert grads
    assert sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("preset", FAST)
def test_no_labels_and_all_null_labels_are_the_same_call(preset):
    e = _expert(preset, num_classes=10)
    x, t = _inputs(3, 1, seed=1)
    with torch.no_grad():
        a = e(x, t, None)
        b = e(x, t, torch.full((3,), NULL_LABEL))
    # bitwise: both become the same label tensor, then the same model runs on the same bytes
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("preset", FAST)
def test_null_label_is_mapped_to_the_null_row_and_real_labels_pass_through(preset):
    e = _expert(preset, num_classes=10)
    spy = _Spy(e.denoiser)
    x, t = _inputs(4, 1)
    with torch.no_grad():
        e(x, t, None)
        assert spy.labels is not None and spy.labels.dtype == torch.long
        assert spy.labels.tolist() == [10] * 4
        e(x, t, torch.tensor([NULL_LABEL, 3, 9, NULL_LABEL]))
        assert spy.labels.tolist() == [10, 3, 9, 10]


@pytest.mark.parametrize("preset", FAST)
def test_a_real_label_changes_the_output(preset):
    e = _expert(preset, num_classes=10)
    with torch.no_grad():  # make sure no row of the label table is zero (adaLN-zero style)
        for m in e.denoiser.modules():
            if isinstance(m, torch.nn.Embedding) and m.num_embeddings == 11:
                m.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    x, t = _inputs(2, 1)
    with torch.no_grad():
        null = e(x, t, None)
        real = e(x, t, torch.tensor([3, 3]))
    assert (null - real).abs().max().item() > 1e-4


def test_unconditional_unet_gets_no_labels_at_all():
    e = _expert("unet-tiny")
    spy = _Spy(e.denoiser)
    x, t = _inputs(2, 1)
    with torch.no_grad():
        a = e(x, t, None)
        b = e(x, t, torch.tensor([4, 7]))  # ignored: the model has no classes
    assert spy.labels is None
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # bitwise: the very same call twice


def test_unconditional_dit_always_uses_its_single_null_row():
    e = _expert("dit-tiny")
    spy = _Spy(e.denoiser)
    x, t = _inputs(2, 1)
    with torch.no_grad():
        a = e(x, t, None)
        assert spy.labels.tolist() == [1, 1]
        b = e(x, t, torch.tensor([0, 0]))  # labels of an unconditional expert are ignored
        assert spy.labels.tolist() == [1, 1]
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # bitwise: the very same call twice


@pytest.mark.parametrize("preset", FAST)
def test_t_is_scaled_to_the_diffusers_timestep_range(preset):
    assert TIME_SCALE == 1000.0
    e = _expert(preset, num_classes=10)
    spy = _Spy(e.denoiser)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x, _ = _inputs(4, 1)
    with torch.no_grad():
        e(x, t, None)
    assert spy.timestep.dtype == torch.float32
    assert spy.timestep.tolist() == [0.0, 250.0, 500.0, 1000.0]


@pytest.mark.parametrize("preset", FAST)
def test_a_single_t_is_broadcast_over_the_batch(preset):
    e = _expert(preset)
    spy = _Spy(e.denoiser)
    x, _ = _inputs(3, 1)
    with torch.no_grad():
        one = e(x, torch.tensor([0.3]))
        each = e(x, torch.full((3,), 0.3))
    assert spy.calls[0][0].shape == (3,)
    torch.testing.assert_close(spy.calls[0][0], torch.full((3,), 0.3 * 1000.0))
    # bitwise: t is expanded to (3,) before any arithmetic, so both calls run the same code on
    # the same bytes from there on
    torch.testing.assert_close(one, each, rtol=0, atol=0)


def test_time_matters():
    e = _expert("unet-tiny")
    x, _ = _inputs(2, 1)
    with torch.no_grad():
        early = e(x, torch.full((2,), 0.1))
        late = e(x, torch.full((2,), 0.9))
    assert (early - late).abs().max().item() > 1e-4


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_an_expert_of_another_prediction_type_answers_velocity(prediction):
    """forward() is the native output converted by flow.to_velocity; native=True is what
    training regresses."""
    spec = ExpertSpec(preset="dit-tiny", image_size=8, channels=1, prediction=prediction)
    expert = Expert.create(spec).eval()
    assert spec.arch == "dit"
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.9, 0.5, 0.1])
    with torch.no_grad():
        native = expert(x, t, native=True)
        v = expert(x, t)
    torch.testing.assert_close(v, flow.to_velocity(native, x, t, prediction))
    assert not torch.allclose(v, native)
