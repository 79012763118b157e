"""flow.py: the rectified-flow maths, checked against the formulas written out here."""

from __future__ import annotations

import copy

import pytest
import torch

from ddm_nodes import flow

SHAPES = [(1, 1, 4, 4), (3, 1, 16, 16), (2, 3, 8, 8), (5, 3, 16, 16)]


def _draw(shape: tuple[int, ...], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    t = torch.rand(shape[0], generator=g)
    return x0, noise, t


@pytest.mark.parametrize("shape", SHAPES)
def test_interpolate_matches_the_straight_path_formula(shape):
    x0, noise, t = _draw(shape)
    path = flow.interpolate(x0, noise, t)
    expected = torch.empty(shape)
    for i in range(shape[0]):  # one sample at a time, t as a Python float
        ti = float(t[i])
        expected[i] = (1.0 - ti) * x0[i] + ti * noise[i]
    assert path.x_t.shape == shape
    torch.testing.assert_close(path.x_t, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(path.t, t)


@pytest.mark.parametrize("shape", SHAPES)
def test_interpolate_endpoints_are_data_and_noise(shape):
    x0, noise, _ = _draw(shape, seed=1)
    at_data = flow.interpolate(x0, noise, torch.zeros(shape[0]))
    at_noise = flow.interpolate(x0, noise, torch.ones(shape[0]))
    # bitwise: times 1, times 0 and plus 0 are exact in IEEE arithmetic, on any CPU
    torch.testing.assert_close(at_data.x_t, x0, rtol=0, atol=0)
    torch.testing.assert_close(at_noise.x_t, noise, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_velocity_is_noise_minus_data(shape):
    x0, noise, t = _draw(shape, seed=2)
    path = flow.interpolate(x0, noise, t)
    # bitwise: the same single subtraction of the same bytes
    torch.testing.assert_close(path.velocity, noise - x0, rtol=0, atol=0)
    # and it is the time derivative of x_t: a finite difference along t agrees
    h = 1e-2
    ahead = flow.interpolate(x0.double(), noise.double(), t.double() + h).x_t
    behind = flow.interpolate(x0.double(), noise.double(), t.double() - h).x_t
    torch.testing.assert_close(((ahead - behind) / (2 * h)).float(), path.velocity)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_denoised_with_the_true_velocity_recovers_the_data(shape, seed):
    x0, noise, t = _draw(shape, seed=seed)
    x_t = torch.stack(
        [(1 - float(ti)) * a + float(ti) * b for ti, a, b in zip(t, x0, noise, strict=True)]
    )
    recovered = flow.denoised(x_t, t, noise - x0)
    torch.testing.assert_close(recovered, x0, rtol=1e-5, atol=1e-5)


def test_denoised_is_x_t_minus_t_times_velocity():
    x_t = torch.full((2, 1, 2, 2), 3.0)
    v = torch.full((2, 1, 2, 2), 2.0)
    out = flow.denoised(x_t, torch.tensor([0.25, 0.5]), v)
    # exact: every value and intermediate is a short binary fraction
    assert torch.all(out[0] == 3.0 - 0.25 * 2.0)
    assert torch.all(out[1] == 3.0 - 0.5 * 2.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_loss_is_the_mean_squared_velocity_error(shape):
    x0, noise, t = _draw(shape, seed=3)
    path = flow.interpolate(x0, noise, t)
    predicted = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    diffs = (predicted - (noise - x0)).flatten().tolist()
    expected = sum(d * d for d in diffs) / len(diffs)
    got = flow.loss(predicted, path)
    assert got.ndim == 0
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert flow.loss(path.velocity, path).item() == 0.0  # x - x is exactly 0


def test_loss_is_computed_in_float32_for_half_predictions():
    x0, noise, t = _draw((2, 1, 4, 4), seed=4)
    path = flow.interpolate(x0, noise, t)
    got = flow.loss(path.velocity.to(torch.bfloat16), path)
    assert got.dtype == torch.float32


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (1.0, 0.5), (-2.0, 2.0)])
def test_logit_normal_t_lies_strictly_inside_the_unit_interval(mean, std):
    t = flow.logit_normal_t(4000, mean, std, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4000,)
    assert torch.all(t > 0) and torch.all(t < 1)


def test_logit_normal_t_is_sigmoid_of_a_scaled_shifted_normal():
    mean, std = 0.3, 1.7
    t = flow.logit_normal_t(64, mean, std, generator=torch.Generator().manual_seed(5))
    z = torch.randn(64, generator=torch.Generator().manual_seed(5))
    expected = 1.0 / (1.0 + torch.exp(-(mean + std * z)))
    torch.testing.assert_close(t, expected)


def test_logit_normal_t_is_deterministic_with_a_seeded_generator():
    a = flow.logit_normal_t(100, generator=torch.Generator().manual_seed(123))
    b = flow.logit_normal_t(100, generator=torch.Generator().manual_seed(123))
    c = flow.logit_normal_t(100, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_logit_normal_t_median_is_one_half_for_mean_zero():
    t = flow.logit_normal_t(20_000, 0.0, 1.0, generator=torch.Generator().manual_seed(0))
    assert abs(t.median().item() - 0.5) < 0.02
    # and a positive mean moves it to sigmoid(mean)
    t = flow.logit_normal_t(20_000, 1.0, 1.0, generator=torch.Generator().manual_seed(0))
    assert abs(t.median().item() - 1 / (1 + torch.exp(torch.tensor(-1.0)).item())) < 0.02


class _WithBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.conv = torch.nn.Conv2d(2, 2, 3)
        self.register_buffer("count", torch.zeros(2))


def _pair(seed: int):
    torch.manual_seed(seed)
    model = _WithBuffer()
    ema = _WithBuffer()  # different random weights
    model.count.fill_(7.0)
    return ema, model


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999, 0.25])
def test_ema_update_is_decay_times_ema_plus_one_minus_decay_times_model(decay):
    ema, model = _pair(0)
    before = {k: v.clone().double() for k, v in ema.state_dict().items()}
    flow.ema_update(ema, model, decay)
    for name, p in model.named_parameters():
        expected = decay * before[name] + (1 - decay) * p.detach().double()
        torch.testing.assert_close(
            dict(ema.named_parameters())[name].double(), expected, rtol=1e-6, atol=1e-7
        )
    assert torch.equal(ema.count, model.count)  # buffers are copied, not averaged


def test_ema_update_with_decay_zero_copies_the_model():
    ema, model = _pair(1)
    flow.ema_update(ema, model, 0.0)
    # bitwise: lerp with weight 1 computes end - (end - start) * 0, exactly end
    for (name, e), p in zip(ema.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(e, p), name


def test_ema_update_leaves_the_model_alone_and_needs_no_grad():
    ema, model = _pair(2)
    snapshot = copy.deepcopy(model.state_dict())
    flow.ema_update(ema, model, 0.9)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k])
    assert all(p.grad is None for p in ema.parameters())


# --- prediction types: eps and x0 converted to velocity ----------------------------------

MU, S = 0.7, 0.5  # data x_0 ~ N(MU, S^2) per coordinate: every optimal prediction is closed form


def _gaussian_optimum(x_t: torch.Tensor, t: torch.Tensor):
    """E[x_0 | x_t], E[ε | x_t] and the exact velocity field for x_0 ~ N(MU, S^2)."""
    tb = t.reshape(-1, *[1] * (x_t.ndim - 1)).double()
    x = x_t.double()
    var = (1 - tb) ** 2 * S**2 + tb**2  # Var(x_t)
    centred = x - (1 - tb) * MU
    x0 = MU + (1 - tb) * S**2 / var * centred
    eps = tb / var * centred
    return x0, eps, eps - x0


def test_targets_of_each_prediction_type_are_velocity_noise_and_data():
    x0, noise, t = _draw((4, 1, 4, 4), seed=5)
    path = flow.interpolate(x0, noise, t)
    assert torch.equal(flow.target(path, "v"), noise - x0)
    assert torch.equal(flow.target(path, "eps"), noise)
    assert torch.equal(flow.target(path, "x0"), x0)
    with pytest.raises(ValueError, match="prediction type"):
        flow.target(path, "score")


@pytest.mark.parametrize("t_value", [0.06, 0.2, 0.5, 0.8, 0.94])
def test_optimal_eps_and_x0_predictions_convert_to_the_exact_velocity(t_value):
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(64, 1, 4, 4, generator=g, dtype=torch.float64) * 1.3
    t = torch.full((64,), t_value, dtype=torch.float64)
    x0, eps, v = _gaussian_optimum(x_t, t)
    torch.testing.assert_close(flow.to_velocity(eps, x_t, t, "eps").double(), v)
    torch.testing.assert_close(flow.to_velocity(x0, x_t, t, "x0").double(), v)
    assert torch.equal(flow.to_velocity(v, x_t, t, "v"), v)


def test_the_singular_ends_are_clamped_to_finite_velocities():
    x_t = torch.randn(8, 1, 2, 2)
    ones, zeros = torch.ones(8), torch.zeros(8)
    eps_at_noise = flow.to_velocity(x_t + 0.01, x_t, ones, "eps")
    torch.testing.assert_close(eps_at_noise, torch.full_like(x_t, 0.01 / flow.MIN_DENOMINATOR))
    x0_at_data = flow.to_velocity(x_t - 0.01, x_t, zeros, "x0")
    torch.testing.assert_close(x0_at_data, torch.full_like(x_t, 0.01 / flow.MIN_DENOMINATOR))


@pytest.mark.parametrize("prediction", ["v", "eps", "x0"])
def test_sampling_with_optimal_predictors_of_any_type_reaches_the_data_distribution(prediction):
    """Euler on the converted field from N(0, I) at t = 1 to t = 0 lands on N(MU, S^2):
    the clamp near t = 1 (eps) costs no more than the grid's own error."""
    x = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0)).double()
    grid = torch.linspace(1, 0, 101, dtype=torch.float64)
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        tt = torch.full((len(x),), float(t), dtype=torch.float64)
        x0, eps, v = _gaussian_optimum(x, tt)
        out = {"v": v, "eps": eps, "x0": x0}[prediction]
        x = x + (t_next - t) * flow.to_velocity(out, x, tt, prediction)
    assert abs(float(x.mean()) - MU) < 0.03, float(x.mean())
    assert abs(float(x.std()) - S) < 0.03, float(x.std())
