"""Tests of the flatness measurements against explicit float64 Hessians and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from lightning_vdm.landscape import (
    curve_sharpness,
    filter_normalized_direction,
    fixed_batches,
    hessian_top_eigenvalue,
    hessian_trace,
    load_curve_csv,
    loss_curve,
    save_curve_csv,
    symmetric_alphas,
)

SEED = 0


def tiny_mlp() -> nn.Module:
    """A 3-5-3 tanh MLP in float64 (38 parameters)."""
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def classification_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two batches of different sizes, so that the per-sample weighting matters."""
    generator = torch.Generator().manual_seed(SEED)
    sizes = (6, 3)
    return [
        (torch.randn(size, 3, generator=generator, dtype=torch.float64), torch.randint(0, 3, (size,), generator=generator))
        for size in sizes
    ]


def explicit_hessian(model: nn.Module, loss_fn, batches) -> torch.Tensor:
    """Hessian of the per-sample mean loss over the trainable parameters, by autograd on a flat vector."""
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    values = dict(model.named_parameters())
    flat = torch.cat([values[name].detach().flatten() for name in names])
    total = sum(len(targets) for _, targets in batches)

    def mean_loss(vector: torch.Tensor) -> torch.Tensor:
        parameters, offset = {}, 0
        for name in names:
            count = values[name].numel()
            parameters[name] = vector[offset : offset + count].view(values[name].shape)
            offset += count
        return sum(loss_fn(functional_call(model, parameters, (x,)), y) * len(y) / total for x, y in batches)

    return torch.autograd.functional.hessian(mean_loss, flat)


def largest_magnitude(eigenvalues: torch.Tensor) -> float:
    return eigenvalues[eigenvalues.abs().argmax()].item()


class Quadratic(nn.Module):
    """Linear least squares: with ``loss_fn=mse_loss`` the loss is a quadratic in ``theta``."""

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs @ self.theta


class QuadraticForm(nn.Module):
    """Returns 0.5·θᵀAθ whatever the input, so its Hessian is A."""

    def __init__(self, matrix: torch.Tensor, theta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)
        self.theta = nn.Parameter(theta.clone())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.theta @ self.matrix @ self.theta + 0 * inputs.sum()


def value_of(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return output


def conv_bn_model() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4 * 4 * 4, 3),
        nn.LayerNorm(3),
    )


def image_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(SEED)
    return [(torch.randn(4, 2, 6, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator)) for _ in range(2)]


# ---------------------------------------------------------------- Hessian


def test_top_eigenvalue_matches_explicit_hessian():
    model, batches = tiny_mlp(), classification_batches()
    expected = largest_magnitude(torch.linalg.eigvalsh(explicit_hessian(model, F.cross_entropy, batches)))

    result = hessian_top_eigenvalue(model, F.cross_entropy, batches, iters=1000, tol=1e-12, seed=SEED)

    # The Rayleigh quotient of a symmetric matrix converges quadratically, so tol=1e-12 leaves
    # a relative error far below 1e-8.
    assert result.eigenvalue == pytest.approx(expected, rel=1e-8)
    assert 1 < result.iterations < 1000


def test_top_eigenvalue_negative_sign_kept():
    matrix = torch.diag(torch.tensor([1.0, -3.0, 2.0], dtype=torch.float64))
    model = QuadraticForm(matrix, torch.ones(3, dtype=torch.float64))
    batches = [(torch.zeros(1), torch.zeros(1))]

    result = hessian_top_eigenvalue(model, value_of, batches, iters=500, tol=1e-12)

    assert result.eigenvalue == pytest.approx(-3.0, rel=1e-9)


def test_top_eigenvalue_not_converged_warns():
    model, batches = tiny_mlp(), classification_batches()

    with pytest.warns(RuntimeWarning, match="did not reach the relative tolerance"):
        result = hessian_top_eigenvalue(model, F.cross_entropy, batches, iters=2, tol=1e-15)

    assert result.iterations == 2


def test_top_eigenvalue_frozen_layer_excluded():
    model, batches = tiny_mlp(), classification_batches()
    model[0].weight.requires_grad_(False)
    expected = largest_magnitude(torch.linalg.eigvalsh(explicit_hessian(model, F.cross_entropy, batches)))

    result = hessian_top_eigenvalue(model, F.cross_entropy, batches, iters=1000, tol=1e-12)

    assert result.eigenvalue == pytest.approx(expected, rel=1e-8)
    assert model[0].weight.requires_grad is False


def test_trace_matches_explicit_hessian():
    model, batches = tiny_mlp(), classification_batches()
    expected = explicit_hessian(model, F.cross_entropy, batches).trace().item()

    estimate = hessian_trace(model, F.cross_entropy, batches, samples=1000, seed=SEED)

    # Hutchinson's estimate is unbiased, so it lies within 4 standard errors except with
    # probability below 1e-4. The bound on the standard error checks that the estimate is not degenerate.
    assert abs(estimate.trace - expected) <= 4 * estimate.standard_error
    assert 0 < estimate.standard_error < 0.1 * abs(expected)
    assert estimate.samples == 1000


def test_trace_exact_for_diagonal_hessian():
    diagonal = torch.tensor([2.0, -0.5, 4.0, 1.5], dtype=torch.float64)
    model = QuadraticForm(torch.diag(diagonal), torch.randn(4, dtype=torch.float64))
    batches = [(torch.zeros(1), torch.zeros(1))]

    estimate = hessian_trace(model, value_of, batches, samples=5, seed=SEED)

    assert estimate.trace == pytest.approx(diagonal.sum().item(), abs=1e-12)
    assert estimate.standard_error == pytest.approx(0.0, abs=1e-12)


def test_trace_single_sample_error_nan():
    estimate = hessian_trace(tiny_mlp(), F.cross_entropy, classification_batches(), samples=1)

    assert math.isnan(estimate.standard_error)


def test_hessian_estimates_seeded():
    model, batches = tiny_mlp(), classification_batches()

    first = hessian_trace(model, F.cross_entropy, batches, samples=20, seed=3)
    second = hessian_trace(model, F.cross_entropy, batches, samples=20, seed=3)
    other = hessian_trace(model, F.cross_entropy, batches, samples=20, seed=4)

    assert first == second
    assert first.trace != other.trace
    assert hessian_top_eigenvalue(model, F.cross_entropy, batches, seed=3) == hessian_top_eigenvalue(
        model, F.cross_entropy, batches, seed=3
    )


def test_hessian_restores_model_state():
    model, batches = conv_bn_model(), image_batches()
    model.train()
    model[4].eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modes = [module.training for module in model.modules()]

    hessian_top_eigenvalue(model, F.cross_entropy, batches, iters=3, tol=0.5, train_mode=True)
    hessian_trace(model, F.cross_entropy, batches, samples=2, train_mode=True)

    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert [module.training for module in model.modules()] == modes
    assert all(parameter.grad is None for parameter in model.parameters())


def test_hessian_inference_mode_rejected():
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        hessian_top_eigenvalue(tiny_mlp(), F.cross_entropy, classification_batches())


def test_hessian_all_frozen_rejected():
    model = tiny_mlp().requires_grad_(False)

    with pytest.raises(ValueError, match="requires_grad=True"):
        hessian_trace(model, F.cross_entropy, classification_batches())


# ---------------------------------------------------------------- filter normalisation


def test_direction_filter_norms_match_weights():
    model = conv_bn_model()

    direction = filter_normalized_direction(model, seed=SEED)

    for (name, parameter), entry in zip(model.named_parameters(), direction):
        assert entry.shape == parameter.shape, name
        if parameter.dim() >= 2:
            dims = tuple(range(1, parameter.dim()))
            torch.testing.assert_close(torch.linalg.vector_norm(entry, dim=dims), torch.linalg.vector_norm(parameter.detach(), dim=dims), rtol=1e-6, atol=0)
        else:
            assert torch.count_nonzero(entry) == 0, name


def test_direction_biasbn_included_as_one_filter():
    model = conv_bn_model()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.uniform_(0.1, 1.0)

    direction = filter_normalized_direction(model, seed=SEED, ignore="none")
    default = filter_normalized_direction(model, seed=SEED)

    for (name, parameter), entry, default_entry in zip(model.named_parameters(), direction, default):
        if parameter.dim() == 1:
            assert entry.norm().item() == pytest.approx(parameter.detach().norm().item(), rel=1e-6), name
            assert torch.count_nonzero(entry) == entry.numel(), name
        else:
            assert torch.equal(entry, default_entry), name


def test_direction_frozen_and_zero_filters():
    model = tiny_mlp()
    with torch.no_grad():
        model[0].weight[2].zero_()
    model[2].weight.requires_grad_(False)

    direction = filter_normalized_direction(model, seed=SEED)

    assert torch.count_nonzero(direction[0][2]) == 0
    assert torch.count_nonzero(direction[0][1]) == 3
    assert torch.count_nonzero(direction[2]) == 0


def test_direction_seeded():
    model = conv_bn_model()

    first = filter_normalized_direction(model, seed=7)
    second = filter_normalized_direction(model, seed=7)
    other = filter_normalized_direction(model, seed=8)

    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], other[0])


def test_direction_same_draw_float32_float64():
    single = tiny_mlp().float()
    double = tiny_mlp()

    entries32 = filter_normalized_direction(single, seed=SEED)
    entries64 = filter_normalized_direction(double, seed=SEED)

    for entry32, entry64 in zip(entries32, entries64):
        assert entry32.dtype == torch.float32
        assert entry64.dtype == torch.float64
        torch.testing.assert_close(entry32.double(), entry64, rtol=1e-5, atol=1e-7)


def test_direction_bad_ignore_rejected():
    with pytest.raises(ValueError, match=r"`ignore` to be one of \('biasbn', 'none'\), but got 'bn'"):
        filter_normalized_direction(tiny_mlp(), seed=SEED, ignore="bn")


# ---------------------------------------------------------------- loss curve


def test_curve_at_zero_equals_plain_loss():
    model, batches = conv_bn_model(), image_batches()
    model.eval()
    with torch.no_grad():
        plain = sum(F.cross_entropy(model(x), y) * len(y) for x, y in batches).item() / 8
    model.train()

    alphas, losses = loss_curve(
        model, F.cross_entropy, batches, filter_normalized_direction(model, SEED), symmetric_alphas(0.5, 5)
    )

    assert alphas[2].item() == 0.0
    assert losses[2].item() == pytest.approx(plain, rel=1e-6)
    assert losses[0].item() != pytest.approx(plain, rel=1e-3)


def test_curve_restores_weights_and_modes():
    model, batches = conv_bn_model(), image_batches()
    model.train()
    model[1].eval()
    model[5].bias.requires_grad_(False)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modes = [module.training for module in model.modules()]
    flags = [parameter.requires_grad for parameter in model.parameters()]

    loss_curve(model, F.cross_entropy, batches, filter_normalized_direction(model, SEED), [-1.0, 0.3, 2.0], train_mode=True)

    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert [module.training for module in model.modules()] == modes
    assert [parameter.requires_grad for parameter in model.parameters()] == flags


def test_curve_restores_weights_after_error():
    model, batches = tiny_mlp(), classification_batches()
    before = [parameter.detach().clone() for parameter in model.parameters()]
    calls = []

    def failing_loss(logits, targets):
        calls.append(1)
        if len(calls) == 3:
            raise FloatingPointError("loss overflow")
        return F.cross_entropy(logits, targets)

    with pytest.raises(FloatingPointError, match="loss overflow"):
        loss_curve(model, failing_loss, batches, filter_normalized_direction(model, SEED), [0.5, 1.0])

    assert all(torch.equal(parameter, saved) for parameter, saved in zip(model.parameters(), before))


def test_curve_quadratic_closed_form():
    generator = torch.Generator().manual_seed(SEED)
    inputs = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    targets = torch.randn(7, generator=generator, dtype=torch.float64)
    theta = torch.randn(4, generator=generator, dtype=torch.float64)
    step = torch.randn(4, generator=generator, dtype=torch.float64)
    model = Quadratic(theta)
    alphas = torch.linspace(-2, 2, 9, dtype=torch.float64)

    _, losses = loss_curve(model, F.mse_loss, [(inputs[:3], targets[:3]), (inputs[3:], targets[3:])], [step], alphas)

    residual, slope = inputs @ theta - targets, inputs @ step
    constant, linear, quadratic = (residual**2).mean(), 2 * (residual * slope).mean(), (slope**2).mean()
    expected = constant + linear * alphas + quadratic * alphas**2
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    assert curve_sharpness(alphas, losses) == pytest.approx((quadratic * 4).item(), rel=1e-10)


def test_curve_direction_mismatch_rejected():
    model = tiny_mlp()

    with pytest.raises(ValueError, match="one direction tensor per model parameter"):
        loss_curve(model, F.cross_entropy, classification_batches(), [torch.zeros(5, 3)], [0.0])


@pytest.mark.parametrize(
    ("alphas", "match"),
    [
        pytest.param([0.0, 1.0], "same length >= 3", id="too-short"),
        pytest.param([-1.0, 0.0, 2.0], "symmetric around 0", id="asymmetric"),
        pytest.param([-1.0, -0.5, 0.5, 1.0], "containing 0", id="no-zero"),
    ],
)
def test_sharpness_bad_grid_rejected(alphas, match):
    with pytest.raises(ValueError, match=match):
        curve_sharpness(alphas, [1.0] * len(alphas))


def test_sharpness_float32_linspace_accepted():
    alphas = torch.linspace(-1, 1, 21)

    assert curve_sharpness(alphas, 3 * alphas.double() ** 2 + 1) == pytest.approx(3.0)


def test_symmetric_alphas_exact_ends():
    alphas = symmetric_alphas(0.3, 7)

    assert alphas.tolist()[3] == 0.0
    assert alphas[0].item() == -0.3
    assert alphas[-1].item() == 0.3
    with pytest.raises(ValueError, match="odd `points`"):
        symmetric_alphas(1.0, 4)


# ---------------------------------------------------------------- fixed subset


class NoisyDataset(Dataset):
    """A dataset whose items draw noise from torch's global RNG, like a random augmentation."""

    def __len__(self) -> int:
        return 50

    def __getitem__(self, index: int):
        return torch.tensor([float(index)]) + 0.01 * torch.randn(1), index % 3


class CountingStream(IterableDataset):
    def __iter__(self):
        return iter(range(3))


def test_fixed_batches_seeded_and_isolated():
    torch.manual_seed(123)
    state = torch.get_rng_state()

    first = fixed_batches(NoisyDataset(), num_batches=3, batch_size=4, seed=SEED)
    second = fixed_batches(DataLoader(NoisyDataset(), batch_size=4, shuffle=True), num_batches=3, seed=SEED)
    other = fixed_batches(NoisyDataset(), num_batches=3, batch_size=4, seed=SEED + 1)

    assert torch.equal(torch.get_rng_state(), state)
    assert len(first) == 3
    assert [inputs.shape for inputs, _ in first] == [torch.Size([4, 1])] * 3
    for (inputs, targets), (inputs_again, targets_again) in zip(first, second):
        assert torch.equal(inputs, inputs_again)
        assert torch.equal(targets, targets_again)
    assert not torch.equal(first[0][0], other[0][0])
    indices = torch.cat([inputs.round().flatten() for inputs, _ in first])
    assert len(set(indices.tolist())) == 12


def test_fixed_batches_small_dataset_warns():
    dataset = TensorDataset(torch.arange(5.0), torch.arange(5))

    with pytest.warns(UserWarning, match="all 5 samples are used"):
        batches = fixed_batches(dataset, num_batches=2, batch_size=4, seed=SEED)

    assert [len(targets) for _, targets in batches] == [4, 1]
    assert sorted(torch.cat([targets for _, targets in batches]).tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"data": CountingStream(), "batch_size": 2}, TypeError, "map-style dataset", id="iterable"),
        pytest.param({"data": TensorDataset(torch.zeros(4))}, ValueError, "`batch_size` >= 1 for a dataset", id="no-size"),
        pytest.param({"data": TensorDataset(torch.zeros(4)), "batch_size": 0}, ValueError, "`batch_size`", id="zero-size"),
        pytest.param({"data": TensorDataset(torch.zeros(4)), "batch_size": 2, "num_batches": 0}, ValueError, "`num_batches`", id="zero-batches"),
    ],
)
def test_fixed_batches_bad_arguments(kwargs, error, match):
    arguments = {"num_batches": 1, **kwargs}

    with pytest.raises(error, match=match):
        fixed_batches(**arguments)


# ---------------------------------------------------------------- arguments and files


@pytest.mark.parametrize(
    ("function", "kwargs", "match"),
    [
        pytest.param(hessian_top_eigenvalue, {"iters": 0}, r"`iters` to be an int >= 1, but got 0", id="iters-zero"),
        pytest.param(hessian_top_eigenvalue, {"tol": 0.0}, r"`tol` to be a finite number > 0", id="tol-zero"),
        pytest.param(hessian_top_eigenvalue, {"tol": math.nan}, r"`tol` to be a finite number > 0", id="tol-nan"),
        pytest.param(hessian_top_eigenvalue, {"seed": 1.5}, r"`seed` to be an int, but got 1.5", id="seed-float"),
        pytest.param(hessian_trace, {"samples": 0}, r"`samples` to be an int >= 1", id="samples-zero"),
        pytest.param(hessian_trace, {"samples": True}, r"`samples` to be an int >= 1", id="samples-bool"),
        pytest.param(hessian_trace, {"train_mode": "yes"}, r"`train_mode` to be a bool", id="train-mode-str"),
    ],
)
def test_hessian_bad_arguments(function, kwargs, match):
    with pytest.raises(ValueError, match=match):
        function(tiny_mlp(), F.cross_entropy, classification_batches(), **kwargs)


def test_hessian_non_scalar_loss_rejected():
    def per_sample_loss(logits, targets):
        return F.cross_entropy(logits, targets, reduction="none")

    with pytest.raises(ValueError, match="scalar tensor"):
        hessian_trace(tiny_mlp(), per_sample_loss, classification_batches(), samples=1)


def test_curve_csv_round_trip(tmp_path):
    alphas = symmetric_alphas(1.0, 5)
    losses = torch.tensor([2.5, 1.25, 1 / 3, 0.1 + 0.2, 7.0], dtype=torch.float64)
    path = tmp_path / "curves" / "curve.csv"

    save_curve_csv(path, alphas, losses)
    loaded_alphas, loaded_losses = load_curve_csv(path)

    assert path.read_text().splitlines()[0] == "alpha,loss"
    assert torch.equal(loaded_alphas, alphas)
    assert torch.equal(loaded_losses, losses)


def test_curve_csv_bad_header_rejected(tmp_path):
    path = tmp_path / "curve.csv"
    path.write_text("step,value\n0,1\n")

    with pytest.raises(ValueError, match="Expected the header alpha,loss"):
        load_curve_csv(path)


# ---------------------------------------------------------------- plots


def test_plot_curves_data_equals_input(tmp_path):
    from lightning_vdm.plotting.landscape import plot_loss_curves

    baseline = (symmetric_alphas(1.0, 5), torch.tensor([3.0, 1.5, 1.0, 1.6, 3.2], dtype=torch.float64))
    deformed = ([-1.0, 0.0, 1.0], [1.4, 1.1, 1.5])
    path = tmp_path / "figures" / "curves.png"

    figure = plot_loss_curves({"baseline": baseline, "LE(1, 0.99)": deformed}, path, title="ResNet-20")

    axes = figure.axes[0]
    lines = [line for line in axes.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == ["baseline", "LE(1, 0.99)"]
    assert lines[0].get_xdata().tolist() == baseline[0].tolist()
    assert lines[0].get_ydata().tolist() == baseline[1].tolist()
    assert lines[1].get_xdata().tolist() == deformed[0]
    assert lines[1].get_ydata().tolist() == deformed[1]
    assert axes.get_title() == "ResNet-20"
    assert path.read_bytes().startswith(b"\x89PNG")


def test_plot_curves_from_csv(tmp_path):
    from lightning_vdm.plotting.landscape import plot_loss_curves_from_csv

    alphas = symmetric_alphas(0.5, 3)
    save_curve_csv(tmp_path / "a.csv", alphas, [2.0, 1.0 / 3, 2.5])
    save_curve_csv(tmp_path / "b.csv", alphas, [1.25, 1.0, 1.5])

    figure = plot_loss_curves_from_csv({"baseline": tmp_path / "a.csv", "AP(5.73, 1, 2, 1)": tmp_path / "b.csv"})

    lines = [line for line in figure.axes[0].get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == ["baseline", "AP(5.73, 1, 2, 1)"]
    assert lines[0].get_xdata().tolist() == [-0.5, 0.0, 0.5]
    assert lines[0].get_ydata().tolist() == [2.0, 1.0 / 3, 2.5]
    assert lines[1].get_ydata().tolist() == [1.25, 1.0, 1.5]


@pytest.mark.parametrize(
    ("curves", "match"),
    [
        pytest.param({}, "at least one curve", id="empty"),
        pytest.param({"run": ([0.0, 1.0], [1.0])}, "2 step sizes and 1 losses", id="length"),
        pytest.param({"run": ([0.0, math.inf], [1.0, 2.0])}, "finite step sizes", id="infinite"),
    ],
)
def test_plot_curves_bad_input(curves, match):
    from lightning_vdm.plotting.landscape import plot_loss_curves

    with pytest.raises(ValueError, match=match):
        plot_loss_curves(curves)
