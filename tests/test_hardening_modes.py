"""VDMMixin under mixed precision, non-finite losses with checkpoints, torch.compile and learning-rate schedules."""

from __future__ import annotations

import csv
from collections import defaultdict

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_vdm import DeformationMonitor, EffectiveLearningRateMonitor, parse_deformation
from tests.tiny import DeformedRegression, RegressionData

SEED = 0

# Every coefficient set of the paper's Tables 1-3 ("Deforming the Loss Surface to Affect the Behaviour of the
# Optimizer"); the regression loss here is mse + 1 >= 1, inside the domain of all of them, LE(1, 1.9) included.
PAPER_FAMILIES = [
    "AP(5, 1, 2, 1)", "AP(18/pi, 1, 2, 1)", "AP(6, 1, 2, 1)", "AP(10, 1, 2, 1)", "AP(2, 1, 2, 1)", "AP(10, 1, 1, 1)",
    "AP(1.5, 0.7, 1, 0)", "LE(1, 0.6)", "LE(1, 0.7)", "LE(1, 0.9)", "LE(1, 0.99)", "LE(1, 0.8)", "LE(1, 0.3)",
    "LE(1, 0.5)", "LE(1, 1.9)", "Power(0.5, 2)",
]  # fmt: skip


def _trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_steps=3,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


def _read_csv(path) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if key != "step" and value != "":
                    series[key][int(row["step"])] = float(value)
    return series


class _GradientProbe(Callback):
    """Record the value passed to backward and the gradient the optimizer receives, at every step."""

    def __init__(self) -> None:
        self.backward_values: list[float] = []
        self.scales: list[float] = []
        self.grads: list[torch.Tensor] = []

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.backward_values.append(loss.item())
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(1.0 if scaler is None else scaler.get_scale())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(torch.cat([p.grad.flatten().clone() for p in pl_module.parameters()]))


def _float64_gradient(model: DeformedRegression, deformation, batch) -> torch.Tensor:
    layer = nn.Linear(3, 1).double()
    layer.load_state_dict(model.layer.state_dict())
    inputs, targets = (t.double() for t in batch)
    loss = ((layer(inputs).squeeze(-1) - targets) ** 2).mean() + 1.0
    grads = torch.autograd.grad(loss, list(layer.parameters()))
    return deformation.closed_form_derivative(loss.detach()) * torch.cat([g.flatten() for g in grads])


INITIAL_SCALE = 2.0**8


def _fp16_plugin() -> MixedPrecision:
    # On the CPU, precision="16-mixed" alone means bfloat16; this plugin runs float16 autocast with a GradScaler.
    # The default initial scale 2**16 overflows this loss's float16 gradients, so the scaler would skip step 0.
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=INITIAL_SCALE))


@pytest.mark.parametrize("precision", ["fp16-scaler", "bf16-mixed"])
@pytest.mark.parametrize("notation", PAPER_FAMILIES)
def test_mixed_precision_stays_finite(tmp_path, notation, precision):
    seed_everything(SEED, verbose=False)
    model = DeformedRegression(deformation=notation, lr=0.01)
    settings = {"plugins": [_fp16_plugin()]} if precision == "fp16-scaler" else {"precision": "bf16-mixed"}

    _trainer(tmp_path, **settings).fit(model, RegressionData(batch_size=8))

    assert all(torch.isfinite(p).all() for p in model.parameters())
    record = model.vdm_records[0]
    assert torch.isfinite(record.deformed).item()
    assert record.deformed.item() == pytest.approx(parse_deformation(notation)(record.raw).item(), rel=1e-5)


@pytest.mark.parametrize("notation", ["LE(1, 0.99)", "AP(18/pi, 1, 2, 1)", "Power(0.5, 2)"])
def test_grad_scaler_scales_deformed_loss(tmp_path, notation):
    seed_everything(SEED, verbose=False)
    deformation = parse_deformation(notation)
    model = DeformedRegression(deformation=deformation, lr=0.01)
    batch = next(iter(RegressionData(batch_size=8).train_dataloader()))
    expected_grad = _float64_gradient(model, deformation, batch)
    probe = _GradientProbe()

    _trainer(tmp_path, plugins=[_fp16_plugin()], max_steps=1, callbacks=[probe]).fit(model, RegressionData(batch_size=8))

    record = model.vdm_records[0]
    # Backward receives scale × δ(ℓ), and the optimizer receives the unscaled gradient δ'(ℓ)·∇ℓ.
    assert probe.scales[0] == INITIAL_SCALE
    assert probe.backward_values[0] == pytest.approx(probe.scales[0] * deformation(record.raw).item(), rel=1e-6)
    torch.testing.assert_close(probe.grads[0].double(), expected_grad, rtol=1e-2, atol=1e-3)


class _BreaksAtStep(DeformedRegression):
    """Returns a NaN loss from global step ``break_at`` on."""

    def __init__(self, break_at: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.break_at = break_at

    def training_step(self, batch, batch_idx):
        self.hparams.offset = float("nan") if self.global_step >= self.break_at else 1.0
        return super().training_step(batch, batch_idx)


def test_nonfinite_keeps_earlier_checkpoints(tmp_path):
    model = _BreaksAtStep(deformation="LE(1, 0.9)", break_at=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = _trainer(
        tmp_path,
        max_steps=6,
        logger=CSVLogger(tmp_path, name="csv", version=0),
        callbacks=[checkpoint, DeformationMonitor()],
        enable_checkpointing=True,
        log_every_n_steps=1,
    )
    with pytest.raises(FloatingPointError, match=r"The training loss is nan \(global step 3, epoch 0, batch 3\)"):
        trainer.fit(model, RegressionData(batch_size=8))

    # Steps 0-2 completed; the checkpoint after each is loadable and finite, and none exists after the bad step.
    names = sorted(path.name for path in (tmp_path / "ckpt").iterdir())
    assert names == ["step=1.ckpt", "step=2.ckpt", "step=3.ckpt"]
    restored = _BreaksAtStep.load_from_checkpoint(tmp_path / "ckpt" / "step=3.ckpt")
    assert all(torch.isfinite(p).all() for p in restored.parameters())
    assert torch.equal(restored.layer.weight, model.layer.weight)
    # The CSV logger was flushed on the error, so it contains the monitor's rows of the three good steps.
    logged = _read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert sorted(logged["vdm/derivative"]) == [0, 1, 2]


class _TinyCNN(DeformedRegression):
    """A small convolutional classifier for the compile test; images are the regression inputs reshaped."""

    def __init__(self, compiled: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        torch.manual_seed(SEED)
        network = nn.Sequential(nn.Conv2d(1, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
        # aot_eager traces with TorchDynamo and AOTAutograd, as inductor does, but skips code generation, which
        # takes about 40 s on a two-core CPU.
        self.network = torch.compile(network, backend="aot_eager") if compiled else network

    def compute_loss(self, batch):
        inputs, targets = batch
        images = inputs.repeat(1, 6)[:, :16].reshape(-1, 1, 4, 4)
        labels = (targets > 0).long()
        return nn.functional.cross_entropy(self.network(images), labels) + 1.0


def test_compiled_matches_eager(tmp_path):
    weights = {}
    initial = torch.cat([p.detach().flatten() for p in _TinyCNN(False).network.parameters()])
    for compiled in (False, True):
        model = _TinyCNN(compiled, deformation="LE(1, 0.99)", lr=0.1)
        _trainer(tmp_path, max_steps=3).fit(model, RegressionData(batch_size=8))
        weights[compiled] = torch.cat([p.detach().flatten() for p in model.network.parameters()])
        record = model.vdm_records[0]
        assert record.deformed.item() == pytest.approx(parse_deformation("LE(1, 0.99)")(record.raw).item(), rel=1e-6)

    assert not torch.equal(weights[True], initial)
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-6, atol=1e-7)


class _Scheduled(DeformedRegression):
    """SGD with a learning rate that halves every step or every epoch."""

    def __init__(self, interval: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.interval = interval

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.08)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval}}


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_effective_lr_uses_step_lr(tmp_path, interval):
    model = _Scheduled(interval, deformation="LE(1, 0.9)")
    trainer = _trainer(
        tmp_path,
        max_steps=8,
        logger=CSVLogger(tmp_path, name="csv", version=0),
        callbacks=[DeformationMonitor(), EffectiveLearningRateMonitor()],
        log_every_n_steps=1,
    )
    trainer.fit(model, RegressionData(batch_size=8))

    logged = _read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    for step in range(8):
        # 4 batches per epoch: the epoch schedule halves the rate once, after step 3.
        exponent = step if interval == "step" else step // 4
        assert logged["lr-SGD"][step] == pytest.approx(0.08 * 0.5**exponent)
        expected = 0.08 * 0.5**exponent * logged["vdm/derivative"][step]
        assert logged["effective-lr-SGD"][step] == pytest.approx(expected, rel=1e-6)


def test_accumulation_with_clipping_and_schedule(tmp_path):
    model = _Scheduled("step", deformation="LE(1, 0.99)")
    probe = _GradientProbe()
    trainer = _trainer(
        tmp_path,
        max_steps=2,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        logger=CSVLogger(tmp_path, name="csv", version=0),
        callbacks=[DeformationMonitor(), EffectiveLearningRateMonitor(), probe],
        log_every_n_steps=1,
    )
    trainer.fit(model, RegressionData(batch_size=8))

    logged = _read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert sorted(logged["lr-SGD"]) == [0, 1]
    assert logged["lr-SGD"][1] == pytest.approx(0.04)
    # Lightning clips after on_before_optimizer_step, so the probe records the unclipped sum over the two
    # micro-batches of δ'(ℓ)·∇ℓ / 2. Every logged value is the mean over those micro-batches.
    assert len(probe.grads) == 2
    assert len(probe.backward_values) == 4
    assert logged["effective-lr-SGD"][1] == pytest.approx(0.04 * logged["vdm/derivative"][1], rel=1e-6)
