"""VDMMixin under manual optimization: exact gradients, several optimizers, a two-loss GAN step, bypass detection."""

from __future__ import annotations

import csv
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_vdm import DeformationMonitor, EffectiveLearningRateMonitor, VDMMixin, parse_deformation
from tests.tiny import RegressionData

SEED = 0


def _fit(tmp_path, model, max_steps=1, callbacks=(), **kwargs) -> Trainer:
    trainer = Trainer(
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="csv"),
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_steps=max_steps,
        log_every_n_steps=1,
        **kwargs,
    )
    trainer.fit(model, RegressionData(batch_size=8))
    return trainer


def _read_csv(trainer: Trainer) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with open(f"{trainer.logger.log_dir}/metrics.csv", newline="") as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if key != "step" and value != "":
                    series[key][int(row["step"])] = float(value)
    return series


def _first_batch():
    return next(iter(RegressionData(batch_size=8).train_dataloader()))


OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=0.01),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.05),
}


class _ManualRegression(VDMMixin, LightningModule):
    """Manual optimization of a linear regression; keeps every gradient seen before an optimizer step."""

    def __init__(self, optimizer: str = "sgd-momentum", **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.optimizer_name = optimizer
        torch.manual_seed(SEED)
        self.layer = nn.Linear(3, 1)
        self.seen_grads: list[torch.Tensor | None] = []

    def loss(self, batch) -> torch.Tensor:
        inputs, targets = batch
        return ((self.layer(inputs).squeeze(-1) - targets) ** 2).mean() + 1.0

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(self.loss(batch))
        optimizer.step()

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        grads = [p.grad for p in self.parameters()]
        # None marks a step whose backward was skipped: `zero_grad` left every gradient unset.
        self.seen_grads.append(None if any(g is None for g in grads) else torch.cat([g.flatten().clone() for g in grads]))

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer_name](self.parameters())


def _reference_step(model: _ManualRegression, deformation, batch, optimizer: str):
    """Return (gradient, weights after one step): δ'(ℓ)·∇ℓ by float64 autograd, then the optimizer in float64."""
    layer = nn.Linear(3, 1).double()
    layer.load_state_dict(model.layer.state_dict())
    inputs, targets = (t.double() for t in batch)
    loss = ((layer(inputs).squeeze(-1) - targets) ** 2).mean() + 1.0
    grads = torch.autograd.grad(loss, list(layer.parameters()))
    slope = deformation.closed_form_derivative(loss.detach())
    for parameter, grad in zip(layer.parameters(), grads):
        parameter.grad = slope * grad
    gradient = torch.cat([p.grad.flatten() for p in layer.parameters()])
    OPTIMIZERS[optimizer](list(layer.parameters())).step()
    return gradient, torch.cat([p.detach().flatten() for p in layer.parameters()])


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_manual_gradient_per_optimizer(tmp_path, optimizer):
    deformation = parse_deformation("LE(1, 0.9)")
    model = _ManualRegression(optimizer=optimizer, deformation=deformation)
    expected_grad, expected_weights = _reference_step(model, deformation, _first_batch(), optimizer)

    _fit(tmp_path, model)

    assert len(model.seen_grads) == 1
    torch.testing.assert_close(model.seen_grads[0].double(), expected_grad, rtol=1e-5, atol=1e-7)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)


class _TinyGAN(VDMMixin, LightningModule):
    """A generator and a discriminator, one optimizer each, two deformed losses per batch.

    The batch's inputs (3 features) are the real samples; their first two features are the generator's noise.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        torch.manual_seed(SEED)
        self.generator = nn.Linear(2, 3)
        self.discriminator = nn.Linear(3, 1)
        self.losses: list[float] = []

    @staticmethod
    def discriminator_loss(generator, discriminator, real):
        fake = generator(real[:, :2]).detach()
        real_logits, fake_logits = discriminator(real), discriminator(fake)
        return F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits)) + (
            F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        )

    @staticmethod
    def generator_loss(generator, discriminator, real):
        fake_logits = discriminator(generator(real[:, :2]))
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))

    def training_step(self, batch, batch_idx):
        real = batch[0]
        d_optimizer, g_optimizer = self.optimizers()

        d_optimizer.zero_grad()
        d_loss = self.discriminator_loss(self.generator, self.discriminator, real)
        self.manual_backward(d_loss)
        d_optimizer.step()

        g_optimizer.zero_grad()
        g_loss = self.generator_loss(self.generator, self.discriminator, real)
        self.manual_backward(g_loss)
        g_optimizer.step()
        self.losses += [d_loss.item(), g_loss.item()]

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.discriminator.parameters(), lr=0.1, momentum=0.5),
            torch.optim.Adam(self.generator.parameters(), lr=0.01),
        ]


def _reference_gan(model: _TinyGAN, deformation, batches):
    """Run the same alternating updates in float64 with δ'(ℓ)·∇ℓ from autograd; return the final weights."""
    generator = nn.Linear(2, 3).double()
    discriminator = nn.Linear(3, 1).double()
    generator.load_state_dict(model.generator.state_dict())
    discriminator.load_state_dict(model.discriminator.state_dict())
    d_optimizer = torch.optim.SGD(discriminator.parameters(), lr=0.1, momentum=0.5)
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=0.01)
    for real, _ in batches:
        real = real.double()
        for loss_fn, net, optimizer in (
            (_TinyGAN.discriminator_loss, discriminator, d_optimizer),
            (_TinyGAN.generator_loss, generator, g_optimizer),
        ):
            loss = loss_fn(generator, discriminator, real)
            grads = torch.autograd.grad(loss, list(net.parameters()))
            slope = deformation.closed_form_derivative(loss.detach())
            for parameter, grad in zip(net.parameters(), grads):
                parameter.grad = slope * grad
            optimizer.step()
    return torch.cat([p.detach().flatten() for p in (*generator.parameters(), *discriminator.parameters())])


def test_gan_two_losses_match_float64(tmp_path):
    deformation = parse_deformation("AP(18/pi, 1, 2, 1)")
    model = _TinyGAN(deformation=deformation)
    batches = list(RegressionData(batch_size=8).train_dataloader())[:3]
    expected = _reference_gan(model, deformation, batches)

    trainer = _fit(tmp_path, model, max_steps=6, callbacks=[DeformationMonitor(), EffectiveLearningRateMonitor()])

    # Lightning counts one global step per optimizer step, so 3 batches with 2 optimizers make 6.
    assert trainer.global_step == 6
    actual = torch.cat([p.detach().flatten() for p in (*model.generator.parameters(), *model.discriminator.parameters())])
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)

    logged = _read_csv(trainer)
    assert len(logged["vdm/derivative"]) == 3
    for batch_index, step in enumerate(sorted(logged["vdm/derivative"])):
        d_loss, g_loss = model.losses[2 * batch_index : 2 * batch_index + 2]
        mean_slope = (deformation.closed_form_derivative(torch.tensor(d_loss, dtype=torch.float64))
                      + deformation.closed_form_derivative(torch.tensor(g_loss, dtype=torch.float64))) / 2
        assert logged["vdm/loss_raw"][step] == pytest.approx((d_loss + g_loss) / 2, rel=1e-6)
        assert logged["vdm/derivative"][step] == pytest.approx(mean_slope.item(), rel=1e-5)
        assert logged["effective-lr-SGD"][step] == pytest.approx(0.1 * mean_slope.item(), rel=1e-5)
        assert logged["effective-lr-Adam"][step] == pytest.approx(0.01 * mean_slope.item(), rel=1e-5)


class _BypassesManualBackward(_ManualRegression):
    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.loss(batch).backward()
        optimizer.step()


def test_direct_backward_raises(tmp_path):
    model = _BypassesManualBackward(deformation="LE(1, 0.9)")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"optimizer stepped at global step 0 .* call `self.manual_backward\(loss\)`"):
        _fit(tmp_path, model)
    # The check runs before the optimizer step, so no undeformed update reached the weights.
    for old, new in zip(before, model.parameters()):
        assert torch.equal(old, new.detach())


class _SkipsNonFinite(_ManualRegression):
    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        if batch_idx == 1:
            inputs = inputs * float("nan")
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(self.loss((inputs, targets)))
        optimizer.step()


def test_manual_skip_is_not_bypass(tmp_path):
    model = _SkipsNonFinite(deformation="LE(1, 0.9)", nonfinite_loss="skip", optimizer="sgd-momentum")
    _fit(tmp_path, model, max_steps=3)
    assert model.vdm_skipped_steps == 1
    assert [grad is None for grad in model.seen_grads] == [False, True, False]
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _SecondOrderStep(VDMMixin, LightningModule):
    """A manual step that takes one gradient with ``create_graph=True`` and keeps it with its graph."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.weights = nn.Parameter(torch.tensor([0.3, -1.2, 0.8], dtype=torch.float64))
        self.gradient_with_graph = None

    def loss_at(self, weights):
        return (weights * torch.tensor([1.0, 0.5, 2.0], dtype=weights.dtype)).square().sum() + 0.7

    def training_step(self, batch, batch_idx):
        self.manual_backward(self.loss_at(self.weights), create_graph=True)
        self.gradient_with_graph = self.weights.grad
        self.weights.grad = None
        self.optimizers().step()  # Lightning counts a global step per optimizer step, and max_steps ends the fit

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_create_graph_takes_autograd_path(tmp_path):
    # The Hessian of δ(ℓ(w)) includes δ''(ℓ)·∇ℓ∇ℓᵀ, which a constant δ' would drop.
    deformation = parse_deformation("LE(1, 0.99)")
    model = _SecondOrderStep(deformation=deformation)
    start = model.weights.detach().clone()

    _fit(tmp_path, model)

    direction = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (product,) = torch.autograd.grad((model.gradient_with_graph * direction).sum(), model.weights)
    full = torch.autograd.functional.hessian(lambda w: deformation.forward(model.loss_at(w)), start)
    torch.testing.assert_close(product, full @ direction, rtol=1e-10, atol=1e-12)
