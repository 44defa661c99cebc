"""DeformationMonitor and EffectiveLearningRateMonitor with real Trainer runs and real loggers."""

from __future__ import annotations

import csv
import math
import warnings
from collections import defaultdict

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_vdm import DeformationMonitor, EffectiveLearningRateMonitor, LogExp, VDMMixin, parse_deformation
from lightning_vdm.callbacks import AdaptiveOptimizerWarning
from tests.tiny import DeformedRegression, RegressionData, TinyRegression


def _fit(tmp_path, model, callbacks, logger=None, **kwargs) -> Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        logger=logger if logger is not None else CSVLogger(tmp_path, name="csv"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_epochs=2,
        log_every_n_steps=1,
    )
    defaults.update(kwargs)
    trainer = Trainer(**defaults)
    trainer.fit(model, RegressionData(batch_size=8))
    return trainer


def _read_csv(trainer: Trainer) -> dict[str, dict[int, float]]:
    """Return ``{column: {step: value}}`` from the CSVLogger's metrics.csv."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with open(f"{trainer.logger.log_dir}/metrics.csv", newline="") as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if key != "step" and value != "":
                    series[key][int(row["step"])] = float(value)
    return series


def test_step_values_match_independent_computation(tmp_path):
    deformation = LogExp(1, 0.9)
    model = DeformedRegression(deformation=deformation, lr=0.05)
    trainer = _fit(tmp_path, model, [DeformationMonitor(), EffectiveLearningRateMonitor()])
    logged = _read_csv(trainer)

    steps = sorted(logged["vdm/loss_raw"])
    assert steps == list(range(8))  # 4 batches × 2 epochs, logged every step
    for step in steps:
        raw = logged["vdm/loss_raw"][step]
        # The module logs the same raw loss itself; the monitor must agree with it.
        assert raw == pytest.approx(logged["train_loss"][step], rel=1e-6)
        assert logged["vdm/loss_deformed"][step] == pytest.approx(math.log(math.exp(raw) - 0.9), rel=1e-5)
        derivative = math.exp(raw) / (math.exp(raw) - 0.9)
        assert logged["vdm/derivative"][step] == pytest.approx(derivative, rel=1e-5)
        assert logged["lr-SGD"][step] == pytest.approx(0.05)
        assert logged["effective-lr-SGD"][step] == pytest.approx(0.05 * derivative, rel=1e-5)


def test_follows_log_every_n_steps(tmp_path):
    model = DeformedRegression(deformation="AP(2, 1, 2, 1)")
    trainer = _fit(tmp_path, model, [DeformationMonitor()], max_epochs=3, log_every_n_steps=5)
    logged = _read_csv(trainer)
    # Lightning logs at the steps where (step + 1) is a multiple of log_every_n_steps.
    assert sorted(logged["vdm/derivative"]) == [4, 9]
    assert sorted(logged["vdm/derivative"]) == sorted(logged["train_loss"])


def test_epoch_interval_logs_mean_min_max(tmp_path):
    deformation = parse_deformation("AP(18/pi, 1, 2, 1)")
    model = DeformedRegression(deformation=deformation)
    step_monitor = DeformationMonitor(logging_interval="step")
    epoch_monitor = DeformationMonitor(logging_interval="epoch")
    trainer = _fit(tmp_path, model, [step_monitor, epoch_monitor])
    logged = _read_csv(trainer)

    per_step = logged["vdm/derivative"]
    for epoch, steps in enumerate([range(0, 4), range(4, 8)]):
        values = [per_step[s] for s in steps]
        epoch_step = max(logged["vdm/derivative/mean"]) if epoch == 1 else min(logged["vdm/derivative/mean"])
        assert logged["vdm/derivative/mean"][epoch_step] == pytest.approx(sum(values) / 4, rel=1e-6)
        assert logged["vdm/derivative/min"][epoch_step] == pytest.approx(min(values), rel=1e-6)
        assert logged["vdm/derivative/max"][epoch_step] == pytest.approx(max(values), rel=1e-6)


def test_accumulation_logs_once_per_optimizer_step(tmp_path):
    model = DeformedRegression(deformation="LE(1, 0.5)")
    trainer = _fit(tmp_path, model, [DeformationMonitor()], accumulate_grad_batches=2, max_epochs=1)
    logged = _read_csv(trainer)
    # 4 micro-batches, 2 optimizer steps: one row per optimizer step, the mean over its two micro-batches.
    assert sorted(logged["vdm/loss_raw"]) == [0, 1]
    train_loss = _read_batch_losses(model, accumulate=2)
    assert logged["vdm/loss_raw"][0] == pytest.approx(sum(train_loss[:2]) / 2, rel=1e-6)


def _read_batch_losses(model: DeformedRegression, accumulate: int) -> list[float]:
    """Return the raw loss of each of the first ``2 * accumulate`` batches with the initial weights."""
    fresh = TinyRegression()
    batches = list(RegressionData(batch_size=8).train_dataloader())
    with torch.no_grad():
        return [fresh.compute_loss(batch).item() for batch in batches[:accumulate]]


def test_tensorboard_values_match(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = DeformedRegression(deformation="LE(1, 0.99)")
    csv_logger = CSVLogger(tmp_path, name="csv")
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _fit(tmp_path, model, [DeformationMonitor(), EffectiveLearningRateMonitor()], logger=[csv_logger, tb_logger])
    trainer.loggers[1].experiment.flush()

    events = EventAccumulator(tb_logger.log_dir)
    events.Reload()
    from_csv = defaultdict(dict)
    with open(f"{csv_logger.log_dir}/metrics.csv", newline="") as file:
        for row in csv.DictReader(file):
            for key in ("vdm/derivative", "effective-lr-SGD"):
                if row.get(key):
                    from_csv[key][int(row["step"])] = float(row[key])
    for key in ("vdm/derivative", "effective-lr-SGD"):
        from_tb = {event.step: event.value for event in events.Scalars(key)}
        assert from_tb.keys() == from_csv[key].keys()
        for step, value in from_tb.items():
            assert value == pytest.approx(from_csv[key][step], rel=1e-6)


def test_no_logger_raises(tmp_path):
    with pytest.raises(MisconfigurationException, match="`DeformationMonitor` callback with `Trainer` that has no logger"):
        _fit(tmp_path, DeformedRegression(deformation="LE(1, 0.9)"), [DeformationMonitor()], logger=False)


def test_model_without_mixin_raises(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"needs a LightningModule with VDMMixin.*class MyTinyRegression\(VDMMixin, TinyRegression\)"):
        _fit(tmp_path, TinyRegression(), [EffectiveLearningRateMonitor()])


def test_invalid_logging_interval_raises():
    with pytest.raises(MisconfigurationException, match=r"`logging_interval` must be one of \('step', 'epoch'\), got 'batch'"):
        DeformationMonitor(logging_interval="batch")


def test_lightning_lr_monitor_clash_raises(tmp_path):
    callbacks = [EffectiveLearningRateMonitor(), LearningRateMonitor()]

    with pytest.raises(MisconfigurationException, match=r"both log `lr-<Optimizer>`.*log_learning_rate=False"):
        _fit(tmp_path, DeformedRegression(deformation="LE(1, 0.9)"), callbacks)


def test_lightning_lr_monitor_beside_effective_only(tmp_path):
    callbacks = [EffectiveLearningRateMonitor(log_learning_rate=False), LearningRateMonitor(logging_interval="step")]
    model = DeformedRegression(deformation="LE(1, 0.9)", lr=0.05)

    logged = _read_csv(_fit(tmp_path, model, callbacks))

    # Lightning's monitor alone writes lr-SGD, once per step; this monitor writes only the effective rate.
    assert set(logged["lr-SGD"].values()) == {0.05}
    assert sorted(logged["lr-SGD"]) == list(range(8))
    assert sorted(logged["effective-lr-SGD"]) == list(range(8))
    assert all(value > 0.05 for value in logged["effective-lr-SGD"].values())


class _ScriptedLossBase(LightningModule):
    """A module whose loss is ``values[global_step]`` times a weight that a zero learning rate keeps at 1."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = values
        self.weight = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch, batch_idx):
        return self.weight * self.values[self.global_step]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _ScriptedLoss(VDMMixin, _ScriptedLossBase):
    pass


def test_out_of_domain_loss_never_logged(tmp_path):
    # LE(1, 1.9) needs ℓ > ln(1.9) = 0.642. Four batches per epoch and logging every 3 steps: the monitors log at
    # steps 2, 5, 8, while the mixin's own batched check runs at step 2, at the end of epoch 0 and at step 6. The bad
    # loss at step 4 reaches the logging step 5 before the mixin's check.
    values = [1.0] * 4 + [0.5] + [1.0] * 7
    model = _ScriptedLoss(values=values, deformation="LE(1, 1.9)")
    callbacks = [DeformationMonitor(), EffectiveLearningRateMonitor()]

    with pytest.raises(ValueError, match=r"The training loss 0.5 \(global step 4, epoch 1, batch 0\) lies outside the domain of LE\(1, 1.9\)"):
        _fit(tmp_path, model, callbacks, max_epochs=3, log_every_n_steps=3)

    with open(tmp_path / "csv" / "version_0" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    logged_steps = [int(row["step"]) for row in rows if row["vdm/derivative"]]
    assert logged_steps == [2]
    derivative = [float(row["vdm/derivative"]) for row in rows if row["vdm/derivative"]]
    assert derivative[0] == pytest.approx(1 / (1 - 1.9 * math.exp(-1.0)), rel=1e-6)


def test_adaptive_optimizer_warns_once(tmp_path):
    model = DeformedRegression(deformation="LE(1, 0.9)", optimizer="adam", lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, model, [EffectiveLearningRateMonitor()])
    adaptive = [w for w in caught if issubclass(w.category, AdaptiveOptimizerWarning)]
    assert len(adaptive) == 1
    assert "Adam normalises the gradient's scale" in str(adaptive[0].message)


class _TwoGroups(VDMMixin, TinyRegression):
    def __init__(self, names: tuple, **kwargs) -> None:
        super().__init__(**kwargs)
        self.names = names

    def configure_optimizers(self):
        groups = [{"params": [self.layer.weight], "lr": 0.1}, {"params": [self.layer.bias], "lr": 0.01}]
        for group, name in zip(groups, self.names):
            if name is not None:
                group["name"] = name
        return torch.optim.SGD(groups, lr=0.1)


@pytest.mark.parametrize(
    ("names", "keys"),
    [((None, None), ["lr-SGD/pg1", "lr-SGD/pg2"]), (("weights", "biases"), ["lr-SGD/weights", "lr-SGD/biases"])],
    ids=["unnamed", "named"],
)
def test_parameter_groups_are_named(tmp_path, names, keys):
    model = _TwoGroups(names, deformation="LE(1, 0.9)")
    logged = _read_csv(_fit(tmp_path, model, [DeformationMonitor(), EffectiveLearningRateMonitor()], max_epochs=1))
    for key, lr in zip(keys, (0.1, 0.01)):
        assert logged[key][0] == pytest.approx(lr)
        expected = lr * logged["vdm/derivative"][0]
        assert logged["effective-" + key][0] == pytest.approx(expected, rel=1e-5)


class _TwoOptimizers(VDMMixin, LightningModule):
    """GAN-style module: two SGD optimizers, manual optimization, two deformed losses per batch."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.first = TinyRegression()
        self.second = TinyRegression(offset=2.0)

    def training_step(self, batch, batch_idx):
        for optimizer, net in zip(self.optimizers(), (self.first, self.second)):
            optimizer.zero_grad()
            self.manual_backward(net.compute_loss(batch))
            optimizer.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.first.parameters(), lr=0.1), torch.optim.SGD(self.second.parameters(), lr=0.02)]


def test_two_optimizers_manual(tmp_path):
    model = _TwoOptimizers(deformation="LE(1, 0.9)")
    logged = _read_csv(_fit(tmp_path, model, [DeformationMonitor(), EffectiveLearningRateMonitor()], max_epochs=1))
    assert logged["lr-SGD"][0] == pytest.approx(0.1)
    assert logged["lr-SGD-1"][0] == pytest.approx(0.02)
    # Each logged value is the mean over the batch's two deformed losses.
    assert len(model.vdm_records) == 2
    assert logged["effective-lr-SGD-1"][0] == pytest.approx(0.02 * logged["vdm/derivative"][0], rel=1e-5)


def test_skipped_steps_logged(tmp_path):
    class Breaks(DeformedRegression):
        def training_step(self, batch, batch_idx):
            self.hparams.offset = float("nan") if batch_idx == 1 else 1.0
            return super().training_step(batch, batch_idx)

    model = Breaks(deformation="LE(1, 0.9)", nonfinite_loss="skip")
    logged = _read_csv(_fit(tmp_path, model, [DeformationMonitor()], max_epochs=1))
    assert logged["vdm/skipped_steps"][max(logged["vdm/skipped_steps"])] == 1.0


def test_state_dict_round_trip():
    monitor = EffectiveLearningRateMonitor(logging_interval="epoch")
    from lightning_vdm.callbacks._monitor_base import _Sample
    from lightning_vdm.mixin import VDMRecord

    monitor._epoch = [_Sample([VDMRecord(torch.tensor(1.5), torch.tensor(1.2), torch.tensor(1.5))], [0.1])]
    monitor._names = [["lr-SGD"]]
    restored = EffectiveLearningRateMonitor(logging_interval="epoch")
    restored.load_state_dict(monitor.state_dict())
    assert restored._names == [["lr-SGD"]]
    assert restored._epoch[0].extra == [0.1]
    assert [float(v) for v in restored._epoch[0].records[0]] == pytest.approx([1.5, 1.2, 1.5])


def test_resume_mid_epoch_keeps_epoch_statistics(tmp_path):
    """The epoch statistics after a mid-epoch resume cover the batches before and after the checkpoint."""

    def run(max_steps, ckpt_path=None):
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
        model = DeformedRegression(deformation="AP(18/pi, 1, 2, 1)", lr=0.05)
        trainer = Trainer(
            default_root_dir=tmp_path,
            logger=CSVLogger(tmp_path, name="csv"),
            callbacks=[DeformationMonitor(logging_interval="epoch"), DeformationMonitor(), checkpoint],
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            max_epochs=2,
            max_steps=max_steps,
            log_every_n_steps=1,
        )
        trainer.fit(model, RegressionData(batch_size=8), ckpt_path=ckpt_path)
        return trainer

    before = _read_csv(run(6))  # stops after 2 of the 4 batches of the second epoch
    after = _read_csv(run(-1, ckpt_path=tmp_path / "ckpt" / "last.ckpt"))

    per_step = {**before["vdm/derivative"], **after["vdm/derivative"]}
    second_epoch = [per_step[step] for step in range(4, 8)]
    assert sorted(after["vdm/derivative"]) == [6, 7]
    final_step = max(after["vdm/derivative/mean"])
    assert after["vdm/derivative/mean"][final_step] == pytest.approx(sum(second_epoch) / 4, rel=1e-6)
    assert after["vdm/derivative/min"][final_step] == pytest.approx(min(second_epoch), rel=1e-6)
    assert after["vdm/derivative/max"][final_step] == pytest.approx(max(second_epoch), rel=1e-6)
