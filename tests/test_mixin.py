"""VDMMixin: what training_step returns, the gradient it produces, hyperparameters and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_vdm import ArctanPower, LogExp, Power, VDMMixin, VerticalDeformation, parse_deformation
from tests.tiny import DeformedRegression, RegressionData, ScaledSquareRoot, TinyRegression, regression_data


def _trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_steps=1,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


def _expected_sgd_step(model: TinyRegression, deformation, lr: float, batches: list[tuple]) -> torch.Tensor:
    """Return the weights after one plain-SGD step on δ(ℓ) averaged over ``batches``, computed in float64."""
    reference = TinyRegression(**{k: v for k, v in model.hparams.items() if k in TinyRegression.__init__.__code__.co_varnames})
    reference.load_state_dict({k: v for k, v in model.state_dict().items()})
    reference = reference.double()
    total = [torch.zeros_like(p) for p in reference.parameters()]
    for inputs, targets in batches:
        loss = reference.compute_loss((inputs.double(), targets.double()))
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        slope = 1.0 if deformation is None else float(deformation.closed_form_derivative(loss.detach()))
        for acc, grad in zip(total, grads):
            acc += slope * grad / len(batches)
    return torch.cat([(p - lr * g).flatten() for p, g in zip(reference.parameters(), total)]).detach()


# Every coefficient set of the paper's Tables 1-3 that keeps this regression loss (mse + 1) in its domain.
PAPER_DEFORMATIONS = [
    "LE(1, 0.6)", "LE(1, 0.7)", "LE(1, 0.9)", "LE(1, 0.99)", "LE(1, 0.8)", "LE(1, 0.3)", "LE(1, 0.5)",
    "AP(5, 1, 2, 1)", "AP(18/pi, 1, 2, 1)", "AP(6, 1, 2, 1)", "AP(10, 1, 2, 1)", "AP(2, 1, 2, 1)",
    "AP(10, 1, 1, 1)", "AP(1.5, 0.7, 1, 0)", "Power(0.5, 2)", "Identity()",
]  # fmt: skip


@pytest.mark.parametrize("notation", PAPER_DEFORMATIONS)
def test_gradient_is_derivative_times_gradient(tmp_path, notation):
    deformation = parse_deformation(notation)
    model = DeformedRegression(deformation=deformation, lr=0.05)
    data = RegressionData(batch_size=8)
    batch = next(iter(data.train_dataloader()))
    expected = _expected_sgd_step(model, deformation, 0.05, [batch])

    _trainer(tmp_path).fit(model, data)

    actual = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_gradient_exact_in_float64(tmp_path):
    deformation = LogExp(1, 0.99)
    model = DeformedRegression(deformation=deformation, lr=0.05, offset=0.02)
    data = RegressionData(batch_size=8, dtype="float64")
    batch = next(iter(data.train_dataloader()))
    expected = _expected_sgd_step(model, deformation, 0.05, [batch])

    _trainer(tmp_path, precision="64-true").fit(model, data)

    actual = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_gradient_accumulation_deforms_each_micro_batch(tmp_path):
    deformation = ArctanPower(18 / math.pi, 1, 2, 1)
    model = DeformedRegression(deformation=deformation, lr=0.05)
    data = RegressionData(batch_size=8)
    batches = list(data.train_dataloader())[:3]
    expected = _expected_sgd_step(model, deformation, 0.05, batches)
    with torch.no_grad():
        last_raw = model.compute_loss(batches[2]).item()

    _trainer(tmp_path, accumulate_grad_batches=3, limit_train_batches=3).fit(model, data)

    actual = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    # The records keep the raw loss of the last micro-batch, before Lightning divides it by 3.
    assert model.vdm_records[0].raw.item() == pytest.approx(last_raw, rel=1e-6)


def test_gradient_clipping_sees_deformed_gradient(tmp_path):
    deformation = LogExp(1, 0.99)  # δ' > 1 everywhere: clipping must act on the scaled gradient.
    clip = 1e-3
    model = DeformedRegression(deformation=deformation, lr=1.0, offset=0.05)
    data = RegressionData(batch_size=8)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])

    _trainer(tmp_path, gradient_clip_val=clip, gradient_clip_algorithm="norm").fit(model, data)

    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    # One SGD step with lr 1 moves the weights by exactly the clipped gradient, whose norm is the clip value.
    assert torch.linalg.vector_norm(after - before).item() == pytest.approx(clip, rel=1e-4)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_mixed_precision_step_is_finite(tmp_path, precision):
    deformation = LogExp(1, 0.9)
    model = DeformedRegression(deformation=deformation, lr=0.05)
    data = RegressionData(batch_size=8)
    batch = next(iter(data.train_dataloader()))
    expected = _expected_sgd_step(model, deformation, 0.05, [batch])

    _trainer(tmp_path, precision=precision).fit(model, data)

    actual = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    assert torch.isfinite(actual).all()
    tolerance = 1e-5 if precision == "32-true" else 5e-2
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)
    assert model.vdm_records[0].deformed.dtype == torch.float32


def test_tensor_output_is_deformed():
    model = DeformedRegression(deformation="LE(1, 0.9)")
    batch = regression_data(8)
    raw = model.compute_loss(batch)
    deformed = model.training_step(batch, 0)
    expected = math.log(math.exp(raw.item()) - 0.9)
    assert deformed.item() == pytest.approx(expected, rel=1e-6)
    assert deformed.requires_grad


def test_dict_output_keeps_other_keys():
    model = DeformedRegression(deformation=Power(0.5, 2), output="dict")
    batch = regression_data(8)
    raw = model.compute_loss(batch).item()
    output = model.training_step(batch, 0)
    assert set(output) == {"loss", "extra"}
    assert output["extra"].item() == 7.0
    assert output["loss"].item() == pytest.approx(0.5 * raw**2, rel=1e-6)


def test_none_output_passes_through():
    model = DeformedRegression(deformation="LE(1, 0.9)", output="none")
    assert model.training_step(regression_data(8), 0) is None
    assert model.vdm_records == []


def test_dict_without_loss_raises():
    model = DeformedRegression(deformation="LE(1, 0.9)", output="dict_no_loss")
    with pytest.raises(KeyError, match="no 'loss' key"):
        model.training_step(regression_data(8), 0)


def test_none_deformation_returns_loss_unchanged():
    model = DeformedRegression(deformation=None)
    batch = regression_data(8)
    assert model.training_step(batch, 0).item() == model.compute_loss(batch).item()
    record = model.vdm_records[0]
    assert record.raw.item() == record.deformed.item()
    assert model.vdm_derivative(record.derivative_at).item() == 1.0


def test_records_are_detached():
    model = DeformedRegression(deformation="AP(2, 1, 2, 1)")
    model.training_step(regression_data(8), 0)
    record = model.vdm_records[0]
    assert not record.raw.requires_grad
    assert not record.deformed.requires_grad
    assert record.deformed.item() == pytest.approx(ArctanPower(2, 1, 2, 1)(record.raw).item(), rel=1e-6)


def test_wrong_base_order_raises():
    with pytest.raises(TypeError, match=r"Put VDMMixin first in the bases: `class WrongOrder\(VDMMixin, TinyRegression\)`"):

        class WrongOrder(TinyRegression, VDMMixin):
            pass


def test_override_without_super_raises_before_backward(tmp_path):
    class Overrides(DeformedRegression):
        def training_step(self, batch, batch_idx):
            return self.compute_loss(batch)

    model = Overrides(deformation="LE(1, 0.9)")
    with pytest.raises(RuntimeError, match="must call `super\\(\\).training_step"):
        _trainer(tmp_path).fit(model, RegressionData())


def test_override_with_super_is_deformed(tmp_path):
    class CallsSuper(DeformedRegression):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)

    model = CallsSuper(deformation="LE(1, 0.9)")
    _trainer(tmp_path).fit(model, RegressionData())
    record = model.vdm_records[0]
    assert record.deformed.item() == pytest.approx(LogExp(1, 0.9)(record.raw).item(), rel=1e-6)


@pytest.mark.parametrize(
    ("argument", "value", "match"),
    [
        ("nonfinite_loss", "ignore", r"`nonfinite_loss` must be one of \('error', 'skip'\), got 'ignore'"),
        ("derivative_at", "median", r"`derivative_at` must be one of \('local', 'global_mean'\), got 'median'"),
        ("deformation", "XY(1)", "AP\\(a1, a2, a3, a4\\)"),
        ("deformation", "LE(1, -1)", "e2"),
    ],
    ids=["nonfinite", "derivative-at", "unknown-family", "bad-coefficient"],
)
def test_invalid_arguments_raise(argument, value, match):
    with pytest.raises(ValueError, match=match):
        DeformedRegression(**{argument: value})


def test_hyperparameters_keep_exact_notation():
    model = DeformedRegression(deformation=ArctanPower(18 / math.pi, 1, 2, 1), lr=0.2)
    assert model.hparams.deformation == "AP(5.729577951308232, 1, 2, 1)"
    assert model.hparams.lr == 0.2
    assert parse_deformation(model.hparams.deformation) == model.deformation


def test_checkpoint_restores_deformation(tmp_path):
    model = DeformedRegression(deformation="AP(18/pi, 1, 2, 1)", lr=0.07)
    trainer = _trainer(tmp_path, enable_checkpointing=True)
    trainer.fit(model, RegressionData())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    restored = DeformedRegression.load_from_checkpoint(path)

    assert restored.deformation == ArctanPower(18 / math.pi, 1, 2, 1)
    assert restored.hparams.lr == 0.07
    assert restored.nonfinite_loss == "error"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_loss_stops_with_step(tmp_path, bad):
    class Breaks(DeformedRegression):
        def training_step(self, batch, batch_idx):
            self.hparams.offset = bad if self.global_step == 2 else 1.0
            return super().training_step(batch, batch_idx)

    model = Breaks(deformation="LE(1, 0.9)")
    with pytest.raises(FloatingPointError, match=rf"is {bad} \(global step 2, epoch 0, batch 2\)"):
        _trainer(tmp_path, max_steps=4).fit(model, RegressionData())


class _TensorPathLE(LogExp):
    """LE without host formulas, so the mixin keeps CPU losses and checks them in batches, as on a GPU."""

    def value_and_derivative(self, loss):
        return None


@pytest.mark.parametrize("deformation", [LogExp(1, 0.9), _TensorPathLE(1, 0.9)], ids=["host", "batched"])
def test_nonfinite_loss_names_batch_accumulating(tmp_path, deformation):
    # Eight batches per epoch and three per optimizer step: batch 4 belongs to global step 1.
    class Breaks(DeformedRegression):
        def training_step(self, batch, batch_idx):
            self.hparams.offset = float("nan") if batch_idx == 4 else 1.0
            return super().training_step(batch, batch_idx)

    model = Breaks(deformation=deformation)
    with pytest.raises(FloatingPointError, match=r"is nan \(global step 1, epoch 0, batch 4\)"):
        _trainer(tmp_path, max_steps=2, accumulate_grad_batches=3).fit(model, RegressionData(batch_size=4))


def test_nonfinite_loss_skip_counts_steps(tmp_path):
    class Breaks(DeformedRegression):
        def training_step(self, batch, batch_idx):
            if batch_idx in (1, 2):
                return super().training_step((batch[0] * float("nan"), batch[1]), batch_idx)
            return super().training_step(batch, batch_idx)

    model = Breaks(deformation="LE(1, 0.9)", nonfinite_loss="skip")
    _trainer(tmp_path, max_steps=4, max_epochs=1).fit(model, RegressionData())
    assert model.vdm_skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_loss_outside_domain_raises(tmp_path):
    # LE(1, 1.9) needs ℓ > ln 1.9 ≈ 0.642; this loss is mse + 0.01, which falls below it as training proceeds.
    model = DeformedRegression(deformation="LE(1, 1.9)", offset=0.01, lr=0.1)
    with pytest.raises(ValueError, match=r"outside the domain of LE\(1, 1.9\) \(loss > ln\(e2\)"):
        _trainer(tmp_path, max_steps=200, max_epochs=100).fit(model, RegressionData())


class _Manual(VDMMixin, LightningModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.inner = TinyRegression(lr=0.05)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = self.inner.compute_loss(batch)
        self.manual_backward(loss)
        optimizer.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_manual_optimization_deforms_in_manual_backward(tmp_path):
    deformation = LogExp(1, 0.7)
    model = _Manual(deformation=deformation)
    data = RegressionData(batch_size=8)
    batch = next(iter(data.train_dataloader()))
    expected = _expected_sgd_step(model.inner, deformation, 0.05, [batch])

    _trainer(tmp_path).fit(model, data)

    actual = torch.cat([p.detach().flatten() for p in model.inner.parameters()]).double()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert len(model.vdm_records) == 1


@pytest.mark.parametrize("deformation", ["LE(1, 0.99)", LogExp(1, 0.99)], ids=["notation", "instance"])
def test_positional_deformation_raises(deformation):
    with pytest.raises(TypeError, match=r"got the deformation .* as a positional argument.*keyword-only: pass `deformation="):
        DeformedRegression(deformation)


def test_positional_arguments_pass_through():
    # Positional arguments that are not deformations go to the module's own arguments as usual.
    model = DeformedRegression(5, 0.2, 0.0, 1.0, "dict", deformation="LE(1, 0.99)")

    assert model.hparams.features == 5
    assert model.hparams.output == "dict"
    assert model.deformation == LogExp(1, 0.99)



def _quadratic_loss(weights: torch.Tensor) -> torch.Tensor:
    return (weights * torch.tensor([1.0, 0.5, 2.0], dtype=weights.dtype)).square().sum() + 0.7


@pytest.mark.parametrize("notation", PAPER_DEFORMATIONS + ["AP(2, 3, 0.5, 0.25)", "LE(2.5, 0.01)"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cpu_loss_value_and_gradient(notation, dtype):
    # A CPU loss is deformed with the family's float64 formulas: the value is δ(ℓ), the gradient δ'(ℓ)·∇ℓ.
    deformation = parse_deformation(notation)
    model = DeformedRegression(deformation=deformation)
    weights = torch.tensor([0.3, -1.2, 0.8], dtype=dtype, requires_grad=True)
    loss = _quadratic_loss(weights)

    deformed = model._vdm_deform(loss)
    (gradient,) = torch.autograd.grad(deformed, weights)

    working = torch.float64 if dtype == torch.float64 else torch.float32
    assert deformed.dtype == working
    point = torch.tensor(loss.item(), dtype=torch.float64)
    # δ(ℓ) rounded once to the working dtype.
    assert deformed.item() == pytest.approx(deformation.forward(point).item(), rel=torch.finfo(working).eps, abs=0)
    assert model.vdm_records[0].deformed.item() == deformed.item()

    # Independent float64 reference: autograd's ∇ℓ at the same weights, times the closed-form δ'(ℓ).
    reference = weights.detach().double().requires_grad_(True)
    (loss_gradient,) = torch.autograd.grad(_quadratic_loss(reference), reference)
    expected = deformation.closed_form_derivative(point) * loss_gradient
    tolerance = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(gradient.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_value_rounded_once_one_node(dtype):
    # The CPU path multiplies the loss by δ'(ℓ) and overwrites the product's value with δ(ℓ).
    deformation = LogExp(1, 0.99)
    weights = torch.tensor([0.3, -1.2, 0.8], dtype=dtype, requires_grad=True)
    loss = _quadratic_loss(weights)
    deformed = DeformedRegression(deformation=deformation)._vdm_deform(loss)

    point = torch.tensor(loss.item(), dtype=torch.float64, requires_grad=True)
    reference = deformation.forward(point)
    (slope,) = torch.autograd.grad(reference, point)
    assert deformed.item() == reference.to(dtype).item()
    assert deformed.grad_fn.name() == "MulBackward0"
    assert deformed.grad_fn.next_functions[0][0] is loss.grad_fn

    # An operation after the mixin that saves the deformed loss for backward gets δ(ℓ), not the product.
    (gradient,) = torch.autograd.grad(deformed.square(), weights)
    reference_weights = weights.detach().double().requires_grad_(True)
    (loss_gradient,) = torch.autograd.grad(_quadratic_loss(reference_weights), reference_weights)
    expected = 2 * reference.detach() * slope * loss_gradient
    tolerance = {torch.float64: 1e-13, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(gradient.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("on_host", [True, False], ids=["host", "autograd"])
def test_second_derivative_with_host_switch(on_host):
    # The Hessian of δ(ℓ(w)) is δ''(ℓ)·∇ℓ∇ℓᵀ + δ'(ℓ)·∇²ℓ. The host path's δ' is a constant, so it lacks the first term.
    deformation = LogExp(1, 0.99)
    model = DeformedRegression(deformation=deformation)
    model.vdm_deform_on_host = on_host
    weights = torch.tensor([0.3, -1.2, 0.8], dtype=torch.float64, requires_grad=True)

    (gradient,) = torch.autograd.grad(model._vdm_deform(_quadratic_loss(weights)), weights, create_graph=True)
    hessian = torch.stack([torch.autograd.grad(component, weights, retain_graph=True)[0] for component in gradient])

    full = torch.autograd.functional.hessian(lambda w: deformation.forward(_quadratic_loss(w)), weights.detach())
    loss = _quadratic_loss(weights.detach())
    slope = deformation.closed_form_derivative(loss)
    constant_slope = slope * torch.autograd.functional.hessian(_quadratic_loss, weights.detach())
    torch.testing.assert_close(hessian, constant_slope if on_host else full, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(full, constant_slope)


class _SquareRootWithMath(VerticalDeformation):
    """δ(ℓ) = √ℓ with host formulas written with :mod:`math`, which raise for ℓ < 0 instead of returning NaN."""

    def forward(self, loss):
        return torch.sqrt(loss)

    def value_and_derivative(self, loss):
        root = math.sqrt(loss)
        return root, 0.5 / root


def test_raising_host_formulas_name_step(tmp_path):
    class Negative(DeformedRegression):
        def training_step(self, batch, batch_idx):
            self.hparams.offset = -1e6 if self.global_step == 2 else 1.0
            return super().training_step(batch, batch_idx)

    model = Negative(deformation=_SquareRootWithMath())
    with pytest.raises(FloatingPointError, match=r"δ\(ℓ\) is nan at the training loss -\d.*\(global step 2, epoch 0, batch 2\)"):
        _trainer(tmp_path, max_steps=4).fit(model, RegressionData())


def test_custom_deformation_uses_autograd():
    # ScaledSquareRoot defines only `forward`, so the mixin differentiates it with autograd, sqrt node included.
    model = DeformedRegression(deformation=ScaledSquareRoot(3.0))
    weights = torch.tensor([0.3, -1.2, 0.8], requires_grad=True)
    loss = _quadratic_loss(weights)
    deformed = model._vdm_deform(loss)
    assert deformed.grad_fn.next_functions[0][0].name() == "SqrtBackward0"
    (gradient,) = torch.autograd.grad(deformed, weights)
    (loss_gradient,) = torch.autograd.grad(_quadratic_loss(weights), weights)
    assert deformed.item() == pytest.approx(3.0 * math.sqrt(loss.item() + 1.0), rel=1e-6)
    torch.testing.assert_close(gradient, 1.5 / math.sqrt(loss.item() + 1.0) * loss_gradient)


@pytest.mark.parametrize(
    "loss", [torch.tensor(1e200, dtype=torch.float64), torch.tensor(1e13)], ids=["float64", "float32"]
)
def test_cpu_overflow_inside_domain_raises(loss):
    # ℓ³ overflows at these losses, inside Power's domain: training would go on with an Inf loss.
    model = DeformedRegression(deformation=Power(1, 3))
    with pytest.raises(FloatingPointError, match=r"δ\(ℓ\) is inf at the training loss [\d.]+e\+\d+ .*inside the domain of Power"):
        model._vdm_deform(loss.requires_grad_(True))


class _LogShift(VerticalDeformation):
    """δ(ℓ) = ln(ℓ + 0.5), written without its domain ℓ > −0.5."""

    def forward(self, loss):
        return torch.log(loss + 0.5)


class _LogShiftOnHost(_LogShift):
    def value_and_derivative(self, loss):
        if not loss > -0.5:
            return math.nan, math.nan
        return math.log(loss + 0.5), 1.0 / (loss + 0.5)


@pytest.mark.parametrize("deformation", [_LogShift(), _LogShiftOnHost()], ids=["forward", "host"])
def test_undefined_delta_raises(tmp_path, deformation):
    # Neither class overrides `in_domain`, so the loss counts as inside. δ is NaN there, which must still stop training.
    model = DeformedRegression(deformation=deformation, offset=-30.0)
    name = type(deformation).__name__
    with pytest.raises(FloatingPointError, match=rf"δ\(ℓ\) is nan at the training loss -\d+\.\d+ \(global step 0, epoch 0, batch 0\).*{name}"):
        _trainer(tmp_path, max_steps=3, log_every_n_steps=1).fit(model, RegressionData())


def test_cpu_domain_error_at_bad_step(tmp_path):
    # On the CPU the mixin reads the loss anyway, so the error comes at the bad step, not at the next batched check.
    steps = []

    class Breaks(DeformedRegression):
        def training_step(self, batch, batch_idx):
            steps.append(self.global_step)
            self.hparams.offset = -100.0 if self.global_step == 3 else 1.0
            return super().training_step(batch, batch_idx)

    model = Breaks(deformation="LE(1, 1.9)")
    with pytest.raises(ValueError, match=r"loss -9\d\.\d+ \(global step 3, epoch 0, batch 3\) lies outside the domain of LE\(1, 1\.9\)"):
        _trainer(tmp_path, max_steps=20, max_epochs=20, log_every_n_steps=50).fit(model, RegressionData())
    assert steps == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "notation, loss, expected",
    [
        # δ'(ℓ)·ℓ is far larger than δ(ℓ) here, so δ'(ℓ)·ℓ + (δ(ℓ) − δ'(ℓ)·ℓ) in float32 would lose every digit.
        ("LE(1, 2)", 0.69314718, -19.3858),
        ("LE(1, 1e30)", 69.077553, None),
        ("Power(1, 50)", 3.0, 3.0**50),
    ],
)
def test_cpu_value_exact_for_large_slope(notation, loss, expected):
    deformation = parse_deformation(notation)
    model = DeformedRegression(deformation=deformation)
    loss32 = torch.tensor(loss, requires_grad=True)
    exact = deformation.forward(torch.tensor(loss32.item(), dtype=torch.float64)).item()
    if expected is not None:
        assert exact == pytest.approx(expected, rel=1e-5)
    assert model._vdm_deform(loss32).item() == pytest.approx(exact, rel=torch.finfo(torch.float32).eps)


def test_logged_slope_at_float32_bound():
    # 0.69314718 rounds to the float32 next to ln 2 from above: float64 puts it inside LE(1, 2)'s domain.
    deformation = LogExp(1, 2)
    model = DeformedRegression(deformation=deformation)
    loss = torch.tensor(0.69314718, requires_grad=True)
    model._vdm_deform(loss).backward()
    logged = model.vdm_derivative(model.vdm_records[0].derivative_at).item()
    assert logged == pytest.approx(deformation.value_and_derivative(loss.item())[1], rel=1e-12)
    assert loss.grad.item() == pytest.approx(logged, rel=1e-7)
    assert logged > 1e8


@pytest.mark.parametrize(
    "notation, loss, dtype",
    [("Power(1, 2)", 1e154, torch.float64), ("Power(1, 0.1)", 1.4e-45, torch.float32)],
    ids=["float64_product", "float32_slope"],
)
def test_cpu_extreme_losses_keep_finite_value(notation, loss, dtype):
    # δ is finite at these losses, although δ'(ℓ)·ℓ overflows float64 or δ'(ℓ) overflows float32.
    deformation = parse_deformation(notation)
    model = DeformedRegression(deformation=deformation)
    loss_tensor = torch.tensor(loss, dtype=dtype, requires_grad=True)
    expected = deformation.forward(torch.tensor(loss_tensor.item(), dtype=torch.float64)).item()
    assert model._vdm_deform(loss_tensor).item() == pytest.approx(expected, rel=torch.finfo(dtype).eps)


class _DoubledLE(LogExp):
    def forward(self, loss):
        return 2 * super().forward(loss)

    def closed_form_derivative(self, loss):
        return 2 * super().closed_form_derivative(loss)


class _CappedLE(LogExp):
    def in_domain(self, loss):
        return super().in_domain(loss) & (loss <= 10)


def _deform_and_differentiate(deformation, loss: float) -> tuple[torch.Tensor, float]:
    """Return what the mixin makes of a float32 CPU loss, and the gradient of that with respect to the loss."""
    leaf = torch.tensor(loss, requires_grad=True)
    deformed = DeformedRegression(deformation=deformation)._vdm_deform(leaf)
    deformed.backward()
    return deformed, leaf.grad.item()


def test_subclass_changing_delta_skips_host_formulas():
    # The inherited LE formulas would describe another δ than the subclass's `forward`.
    deformed, gradient = _deform_and_differentiate(_DoubledLE(1, 0.99), 1.5)
    value, slope = LogExp(1, 0.99).value_and_derivative(1.5)
    assert deformed.item() == pytest.approx(2 * value, rel=1e-6)
    assert gradient == pytest.approx(2 * slope, rel=1e-6)


def test_subclass_domain_check_kept(tmp_path):
    model = DeformedRegression(deformation=_CappedLE(1, 0.99), offset=50.0)
    with pytest.raises(ValueError, match=r"\(global step 0, epoch 0, batch 0\) lies outside the domain of _CappedLE\(1, 0.99\) \(the losses that _CappedLE.in_domain accepts\)"):
        _trainer(tmp_path, max_steps=2, log_every_n_steps=1).fit(model, RegressionData())


class _ReturnsText(LogExp):
    def value_and_derivative(self, loss):
        return "δ", "δ'"


class _ReturnsThree(LogExp):
    def value_and_derivative(self, loss):
        return 1.0, 2.0, 3.0


class _ReturnsNumpy(LogExp):
    def value_and_derivative(self, loss):
        value, slope = super().value_and_derivative(loss)
        return np.float32(value), torch.tensor(slope, dtype=torch.float64)


@pytest.mark.parametrize("deformation", [_ReturnsText(1, 0.5), _ReturnsThree(1, 0.5)], ids=["text", "three"])
def test_host_formulas_bad_return_raises(deformation):
    model = DeformedRegression(deformation=deformation)
    name = type(deformation).__name__
    with pytest.raises(TypeError, match=rf"{name}.value_and_derivative\(1.5\) must return two real numbers"):
        model._vdm_deform(torch.tensor(1.5, requires_grad=True))


def test_host_formulas_accept_numpy_tensors():
    deformed, gradient = _deform_and_differentiate(_ReturnsNumpy(1, 0.5), 1.5)
    value, slope = LogExp(1, 0.5).value_and_derivative(1.5)
    assert deformed.shape == ()
    assert deformed.item() == pytest.approx(value, rel=1e-6)
    assert gradient == pytest.approx(slope, rel=1e-7)
