"""Resuming a deformed run: exact continuation, mid-epoch with a stateful loader, and the deformation's origin."""

from __future__ import annotations

import csv
import inspect
from collections import defaultdict

import lightning
import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from packaging.version import Version
from torch.utils.data import DataLoader, TensorDataset

from lightning_vdm import DeformationMismatchError, DeformationMonitor, EffectiveLearningRateMonitor, LogExp, parse_deformation
from tests.tiny import DeformedRegression, ScaledSquareRoot, regression_data

SEED = 0
DEFORMATION = "AP(18/pi, 1, 2, 1)"
BATCHES_PER_EPOCH = 4


class _Data(LightningDataModule):
    """32 regression samples in batches of 8.

    Args:
        loader: ``"sequential"`` (plain DataLoader, fixed order), ``"shuffled"`` (plain DataLoader, shuffled by a
            seeded generator) or ``"stateful"`` (torchdata's StatefulDataLoader, shuffled by a seeded generator).
    """

    def __init__(self, loader: str) -> None:
        super().__init__()
        self.dataset = TensorDataset(*regression_data(32))
        self.loader = loader

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(SEED)
        if self.loader == "stateful":
            from torchdata.stateful_dataloader import StatefulDataLoader

            return StatefulDataLoader(self.dataset, batch_size=8, shuffle=True, generator=generator)
        shuffle = self.loader == "shuffled"
        return DataLoader(self.dataset, batch_size=8, shuffle=shuffle, generator=generator if shuffle else None)


def _trainer(root, max_steps, version, at_epoch_end=False) -> tuple[Trainer, ModelCheckpoint]:
    if at_epoch_end:
        checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_epochs=1, save_on_train_epoch_end=True)
    else:
        checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = Trainer(
        default_root_dir=root,
        logger=CSVLogger(root, name="csv", version=version),
        callbacks=[DeformationMonitor(), DeformationMonitor(logging_interval="epoch"), EffectiveLearningRateMonitor(),
                   checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_epochs=2,
        max_steps=max_steps,
        log_every_n_steps=1,
        deterministic=True,
    )
    return trainer, checkpoint


def _model(deformation=DEFORMATION) -> DeformedRegression:
    seed_everything(SEED, verbose=False)
    return DeformedRegression(deformation=deformation, lr=0.05, momentum=0.9)


def _read_csv(trainer: Trainer) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with open(f"{trainer.logger.log_dir}/metrics.csv", newline="") as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if key not in ("step", "epoch") and value != "":
                    series[key][int(row["step"])] = float(value)
    return series


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _straight_and_resumed(tmp_path, stop_at: int, loader: str, at_epoch_end: bool = False):
    """Train 8 steps in one run, and ``stop_at`` steps then resume to 8; return both trainers and models.

    The first part writes a checkpoint after every step, or with ``at_epoch_end`` at the end of every epoch.
    """
    straight_model = _model()
    straight, _ = _trainer(tmp_path / "straight", max_steps=8, version=0)
    straight.fit(straight_model, _Data(loader))

    first_model = _model()
    first, checkpoint = _trainer(tmp_path / "resumed", max_steps=stop_at, version=0, at_epoch_end=at_epoch_end)
    first.fit(first_model, _Data(loader))
    resumed_model = _model()
    # Lightning 2.6.6 resumes a checkpoint written at `on_train_epoch_end` for only one more step when `max_steps`
    # is set, with or without VDMMixin, so that resumed run stops by `max_epochs` alone.
    resumed, _ = _trainer(tmp_path / "resumed", max_steps=-1 if at_epoch_end else 8, version=1)
    resumed.fit(resumed_model, _Data(loader), ckpt_path=checkpoint.last_model_path)
    return straight, straight_model, (first, resumed), resumed_model


def _merged(trainers) -> dict[str, dict[int, float]]:
    merged: dict[str, dict[int, float]] = defaultdict(dict)
    for trainer in trainers:
        for key, series in _read_csv(trainer).items():
            merged[key].update(series)
    return merged


@pytest.mark.parametrize(
    ("loader", "at_epoch_end"),
    [("sequential", False), ("sequential", True)],
    ids=["last-batch", "epoch-end"],
)
def test_resume_at_epoch_end_is_exact(tmp_path, loader, at_epoch_end):
    straight, straight_model, parts, resumed_model = _straight_and_resumed(
        tmp_path, BATCHES_PER_EPOCH, loader, at_epoch_end
    )

    assert parts[1].global_step == straight.global_step == 8
    assert torch.equal(_weights(resumed_model), _weights(straight_model))
    expected, actual = _read_csv(straight), _merged(parts)
    for key in ("vdm/derivative", "vdm/loss_raw", "effective-lr-SGD", "vdm/derivative/mean", "vdm/derivative/max"):
        assert actual[key] == expected[key], key
    assert sorted(expected["vdm/derivative"]) == list(range(8))


@pytest.mark.xfail(
    strict=True,
    reason="torchdata 0.11 with Lightning 2.6.6 (and torchdata 0.8 with Lightning 2.5.0): a StatefulDataLoader checkpointed after the last batch of an epoch, "
    "but before the epoch's end, is restored as exhausted, so the resumed run's next epoch has no batches",
)
def test_resume_stateful_last_batch_checkpoint(tmp_path):
    pytest.importorskip("torchdata.stateful_dataloader")
    straight, _, parts, _ = _straight_and_resumed(tmp_path, BATCHES_PER_EPOCH, "stateful", at_epoch_end=False)
    assert parts[1].global_step == straight.global_step


@pytest.mark.parametrize(
    ("loader", "at_epoch_end"), [("shuffled", False), ("stateful", True)], ids=["plain-last-batch", "stateful-epoch-end"]
)
def test_resume_at_epoch_end_reshuffles(tmp_path, loader, at_epoch_end):
    if loader == "stateful":
        pytest.importorskip("torchdata.stateful_dataloader")
    straight, straight_model, parts, resumed_model = _straight_and_resumed(
        tmp_path, BATCHES_PER_EPOCH, loader, at_epoch_end
    )

    # Neither a plain DataLoader nor a StatefulDataLoader restored after its epoch ended (torchdata 0.11) carries
    # the sampler's generator into the next epoch, so the resumed second epoch draws the first epoch's permutation
    # again. The step count and the first epoch agree, and the second epoch's batches do not.
    assert parts[1].global_step == straight.global_step == 8
    expected, actual = _read_csv(straight), _merged(parts)
    assert all(actual["vdm/derivative"][step] == expected["vdm/derivative"][step] for step in range(4))
    if loader == "stateful" and _resumed_epoch_draws_second_permutation():
        assert actual["vdm/derivative"] == expected["vdm/derivative"]
        assert torch.equal(_weights(resumed_model), _weights(straight_model))
        return
    assert actual["vdm/derivative"][4] != expected["vdm/derivative"][4]
    assert not torch.equal(_weights(resumed_model), _weights(straight_model))


def _resumed_epoch_draws_second_permutation() -> bool:
    """Return whether a run resumed at an epoch's end draws the straight run's second permutation by accident.

    Lightning before 2.5.3 calls ``iter()`` on the train loader twice when it resumes at an epoch boundary, in
    ``FitLoop.setup_data`` and in ``TrainingEpochLoop.on_run_start``. torchdata 0.11's RandomSampler iterator draws
    its permutation when it is created, so the discarded first iterator takes the first epoch's permutation from
    the freshly seeded generator.
    """
    torchdata = pytest.importorskip("torchdata")
    return Version(lightning.__version__) < Version("2.5.3") and Version(torchdata.__version__) >= Version("0.11")


def test_resume_mid_epoch_stateful_loader_is_exact(tmp_path):
    pytest.importorskip("torchdata.stateful_dataloader")
    straight, straight_model, parts, resumed_model = _straight_and_resumed(tmp_path, 6, "stateful")

    assert parts[1].global_step == straight.global_step == 8
    assert torch.equal(_weights(resumed_model), _weights(straight_model))
    expected, actual = _read_csv(straight), _merged(parts)
    for key in ("vdm/derivative", "vdm/loss_raw", "effective-lr-SGD"):
        assert actual[key] == expected[key], key

    # Lightning ends the interrupted epoch when max_steps stops the first run, so that run logs statistics of the
    # partial epoch (steps 4 and 5) at step 6. The checkpoint was written before that, so the resumed run's
    # statistics of epoch 2 still cover all four of its batches and equal the straight run's.
    partial = actual["vdm/derivative/mean"].pop(6)
    assert partial == pytest.approx((expected["vdm/derivative"][4] + expected["vdm/derivative"][5]) / 2, rel=1e-6)
    assert actual["vdm/derivative/mean"] == expected["vdm/derivative/mean"]


def test_resume_mid_epoch_plain_loader_replays_batches(tmp_path):
    straight, straight_model, parts, resumed_model = _straight_and_resumed(tmp_path, 6, "sequential")

    # Global step, logged steps and the first six steps agree. The plain DataLoader restarts the epoch's iterator,
    # so steps 6 and 7 train on the epoch's first two batches again and the weights differ.
    assert parts[1].global_step == straight.global_step == 8
    expected, actual = _read_csv(straight), _merged(parts)
    assert sorted(actual["vdm/derivative"]) == sorted(expected["vdm/derivative"])
    assert all(actual["vdm/derivative"][step] == expected["vdm/derivative"][step] for step in range(6))
    assert actual["vdm/derivative"][6] != expected["vdm/derivative"][6]
    assert not torch.equal(_weights(resumed_model), _weights(straight_model))


def test_resume_with_other_deformation_raises(tmp_path):
    first, checkpoint = _trainer(tmp_path, max_steps=2, version=0)
    first.fit(_model(), _Data("sequential"))
    resumed, _ = _trainer(tmp_path, max_steps=4, version=1)
    expected = r"trained with deformation='AP\(5.729577951308232, 1, 2, 1\)'.*uses deformation='LE\(1, 0.9\)'"
    with pytest.raises(ValueError, match=expected):
        resumed.fit(_model("LE(1, 0.9)"), _Data("sequential"), ckpt_path=checkpoint.last_model_path)


def test_resume_with_other_deformation_opt_out(tmp_path):
    first, checkpoint = _trainer(tmp_path, max_steps=2, version=0)
    first.fit(_model(), _Data("sequential"))
    model = _model("LE(1, 0.9)")
    model.vdm_check_resumed_deformation = False
    resumed, _ = _trainer(tmp_path, max_steps=4, version=1)
    resumed.fit(model, _Data("sequential"), ckpt_path=checkpoint.last_model_path)

    assert resumed.global_step == 4
    record = model.vdm_records[0]
    # The running model's deformation trained the resumed steps.
    assert record.deformed.item() == pytest.approx(LogExp(1, 0.9)(record.raw).item(), rel=1e-6)


def test_load_from_checkpoint_restores_deformation(tmp_path):
    first, checkpoint = _trainer(tmp_path, max_steps=2, version=0)
    first.fit(_model(), _Data("sequential"))

    restored = DeformedRegression.load_from_checkpoint(checkpoint.last_model_path)
    overridden = DeformedRegression.load_from_checkpoint(checkpoint.last_model_path, deformation="LE(1, 0.9)")

    assert restored.deformation == parse_deformation(DEFORMATION)
    assert overridden.deformation == LogExp(1, 0.9)
    # The checkpoint's own entry keeps the notation the weights were trained with.
    stored = torch.load(checkpoint.last_model_path, weights_only=False)["vdm"]
    assert stored == {"skipped_steps": 0, "deformation": "AP(5.729577951308232, 1, 2, 1)", "derivative_at": "local"}


def test_resume_old_checkpoint_uses_hparams(tmp_path):
    first, checkpoint = _trainer(tmp_path, max_steps=2, version=0)
    first.fit(_model(), _Data("sequential"))
    # A checkpoint from before the mixin stored its deformation has only the hyperparameters.
    state = torch.load(checkpoint.last_model_path, weights_only=False)
    state["vdm"] = {"skipped_steps": 0}
    old_path = tmp_path / "old.ckpt"
    torch.save(state, old_path)

    resumed, _ = _trainer(tmp_path, max_steps=4, version=1)
    with pytest.raises(ValueError, match=r"uses deformation='LE\(1, 0.5\)'"):
        resumed.fit(_model("LE(1, 0.5)"), _Data("sequential"), ckpt_path=old_path)


class _ListScaledSquareRoot(ScaledSquareRoot):
    """A deformation that keeps its setting in a list, which the notation does not show."""

    def __init__(self, k: float) -> None:
        self.settings = [k]

    def forward(self, loss):
        return self.settings[0] * torch.sqrt(loss + 1.0)


@pytest.mark.parametrize(
    ("deformation", "written"),
    [
        (ScaledSquareRoot, r"ScaledSquareRoot\(k=3\)'.*uses deformation='ScaledSquareRoot\(k=5\)'"),
        (_ListScaledSquareRoot, r"_ListScaledSquareRoot\(\)'.*differ in `settings`: \[3.0\] in the checkpoint, \[5.0\] now"),
    ],
    ids=["plain-attribute", "list-attribute"],
)
def test_resume_custom_deformation_compares_attributes(tmp_path, deformation, written):
    first, checkpoint = _trainer(tmp_path, max_steps=2, version=0)
    first.fit(DeformedRegression(deformation=deformation(3.0)), _Data("sequential"))
    # A plain attribute appears in the notation. A list does not, so only the pickled attributes tell 3 from 5.
    resumed, _ = _trainer(tmp_path, max_steps=4, version=1)
    load = {"weights_only": False} if "weights_only" in inspect.signature(Trainer.fit).parameters else {}

    with pytest.raises(DeformationMismatchError, match=rf"trained with deformation='{written}"):
        resumed.fit(DeformedRegression(deformation=deformation(5.0)), _Data("sequential"), ckpt_path=checkpoint.last_model_path, **load)

    same, _ = _trainer(tmp_path, max_steps=4, version=2)
    same.fit(DeformedRegression(deformation=deformation(3.0)), _Data("sequential"), ckpt_path=checkpoint.last_model_path, **load)
    assert same.global_step == 4


def test_validate_accepts_other_deformation(tmp_path):
    first, checkpoint = _trainer(tmp_path, max_steps=2, version=0)
    first.fit(_model(), _Data("sequential"))
    evaluator, _ = _trainer(tmp_path, max_steps=4, version=1)

    evaluator.validate(_model("LE(1, 0.9)"), _Data("sequential"), ckpt_path=checkpoint.last_model_path)

    assert evaluator.state.finished
