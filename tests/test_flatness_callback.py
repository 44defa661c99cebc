"""Tests of FlatnessMonitor with a real Trainer on a tiny synthetic classification set."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_vdm.callbacks.flatness import FlatnessMonitor
from lightning_vdm.landscape import (
    filter_normalized_direction,
    fixed_batches,
    hessian_top_eigenvalue,
    hessian_trace,
    load_curve_csv,
    loss_curve,
    symmetric_alphas,
)

SEED = 0


class NoisyBlobs(Dataset):
    """Three Gaussian blobs in 4-D. Each read adds noise from torch's global RNG, like an augmentation."""

    def __init__(self, size: int = 48) -> None:
        generator = torch.Generator().manual_seed(SEED)
        self.targets = torch.arange(size) % 3
        centers = torch.randn(3, 4, generator=generator) * 2
        self.inputs = centers[self.targets] + torch.randn(size, 4, generator=generator)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.inputs[index] + 0.1 * torch.randn(4), self.targets[index]


class BlobStream(IterableDataset):
    def __iter__(self):
        data = NoisyBlobs()
        return iter(data[index] for index in range(len(data)))


class TinyClassifier(LightningModule):
    def __init__(self, dataset: Dataset | None = None, batch_size: int = 8) -> None:
        super().__init__()
        self.dataset = NoisyBlobs() if dataset is None else dataset
        self.batch_size = batch_size
        self.net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return F.cross_entropy(self(inputs), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        shuffle = not isinstance(self.dataset, IterableDataset)
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=shuffle)


class StateProbe(Callback):
    """Records the module's weights, buffers, modes and requires_grad flags in ``on_train_end``."""

    def __init__(self) -> None:
        self.state = None

    def on_train_end(self, trainer, pl_module):
        self.state = (
            {name: tensor.clone() for name, tensor in pl_module.state_dict().items()},
            [module.training for module in pl_module.modules()],
            [parameter.requires_grad for parameter in pl_module.parameters()],
        )


def fit(tmp_path, callbacks, *, epochs: int = 2, model: LightningModule | None = None, logger=True):
    seed_everything(SEED, verbose=False)
    model = TinyClassifier() if model is None else model
    if logger is True:
        logger = CSVLogger(tmp_path, name="run")
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(model)
    return trainer, model


def read_metrics(trainer) -> list[dict[str, str]]:
    with open(f"{trainer.logger.log_dir}/metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def flatness_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [row for row in rows if row.get("flatness/hessian_top_eigenvalue")]


def test_monitor_logs_match_direct_calls(tmp_path):
    monitor = FlatnessMonitor(num_batches=2, batch_size=8, trace_samples=10, curve_points=7, curve_range=0.5)

    trainer, model = fit(tmp_path, [monitor])

    rows = flatness_rows(read_metrics(trainer))
    assert len(rows) == 1
    row = rows[0]
    assert int(row["step"]) == trainer.global_step == 12

    batches = fixed_batches(trainer.train_dataloader, num_batches=2, batch_size=8, seed=SEED)
    top = hessian_top_eigenvalue(model, F.cross_entropy, batches, seed=SEED)
    trace = hessian_trace(model, F.cross_entropy, batches, samples=10, seed=SEED)
    direction = filter_normalized_direction(model, SEED)
    alphas, losses = loss_curve(model, F.cross_entropy, batches, direction, symmetric_alphas(0.5, 7))

    assert float(row["flatness/hessian_top_eigenvalue"]) == pytest.approx(top.eigenvalue, rel=1e-9)
    assert float(row["flatness/hessian_trace"]) == pytest.approx(trace.trace, rel=1e-9)
    assert float(row["flatness/hessian_trace_standard_error"]) == pytest.approx(trace.standard_error, rel=1e-9)
    assert int(float(row["flatness/hessian_iterations"])) == top.iterations
    assert float(row["flatness/subset_loss"]) == pytest.approx(losses[3].item(), rel=1e-9)
    sharpness = (losses[0] + losses[6]).item() / 2 - losses[3].item()
    assert float(row["flatness/curve_sharpness"]) == pytest.approx(sharpness, rel=1e-9)

    curve_alphas, curve_losses = load_curve_csv(f"{trainer.logger.log_dir}/flatness_curve.csv")
    assert curve_alphas.tolist() == [-0.5, -1 / 3, -1 / 6, 0.0, 1 / 6, 1 / 3, 0.5]
    torch.testing.assert_close(curve_losses, losses, rtol=1e-12, atol=0)

    assert monitor.results.curve_path == f"{trainer.logger.log_dir}/flatness_curve.csv"
    assert monitor.results.hessian_top_eigenvalue == top.eigenvalue
    assert trainer.callback_metrics["flatness/hessian_top_eigenvalue"].item() == pytest.approx(top.eigenvalue)


def test_monitor_eigenvalue_matches_explicit_hessian(tmp_path):
    monitor = FlatnessMonitor(num_batches=2, batch_size=8, hessian_iters=500, hessian_tol=1e-8)

    trainer, model = fit(tmp_path, [monitor])

    batches = [(x.double(), y) for x, y in fixed_batches(trainer.train_dataloader, 2, 8, SEED)]
    reference = model.double().eval()
    names = [name for name, _ in reference.named_parameters()]
    shapes = [parameter.shape for parameter in reference.parameters()]
    flat = torch.cat([parameter.detach().flatten() for parameter in reference.parameters()])

    def mean_loss(vector):
        parameters, offset = {}, 0
        for name, shape in zip(names, shapes):
            parameters[name] = vector[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return sum(
            F.cross_entropy(torch.func.functional_call(reference, parameters, (x,)), y) * len(y) / 16 for x, y in batches
        )

    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(mean_loss, flat))
    expected = eigenvalues[eigenvalues.abs().argmax()].item()
    # The monitor measured the float32 model, so its Hessian-vector products differ from the float64
    # Hessian by rounding, which rel=1e-4 allows for.
    assert monitor.results.hessian_top_eigenvalue == pytest.approx(expected, rel=1e-4)


def test_monitor_every_n_epochs(tmp_path):
    monitor = FlatnessMonitor(num_batches=1, batch_size=8, every_n_epochs=1, curve_points=3, hessian_iters=20)

    trainer, _ = fit(tmp_path, [monitor], epochs=3)

    rows = flatness_rows(read_metrics(trainer))
    assert [int(row["step"]) for row in rows] == [6, 12, 18]
    for step in (6, 12, 18):
        alphas, _ = load_curve_csv(f"{trainer.logger.log_dir}/flatness_curve_step={step}.csv")
        assert alphas.tolist() == [-1.0, 0.0, 1.0]
    final_alphas, final_losses = load_curve_csv(f"{trainer.logger.log_dir}/flatness_curve.csv")
    _, last_losses = load_curve_csv(f"{trainer.logger.log_dir}/flatness_curve_step=18.csv")
    assert torch.equal(final_losses, last_losses)
    assert monitor.results.global_step == 18


@pytest.mark.filterwarnings("ignore:Power iteration did not reach:RuntimeWarning")
@pytest.mark.parametrize("every_n_epochs", [None, 1], ids=["end-only", "every-epoch"])
def test_monitor_training_unchanged(tmp_path, every_n_epochs):
    monitor = FlatnessMonitor(num_batches=2, batch_size=8, every_n_epochs=every_n_epochs, hessian_iters=10)

    _, plain = fit(tmp_path / "plain", [])
    _, monitored = fit(tmp_path / "monitored", [monitor])

    assert monitor.results is not None
    for (name, expected), actual in zip(plain.state_dict().items(), monitored.state_dict().values()):
        assert torch.equal(actual, expected), name


@pytest.mark.filterwarnings("ignore:Power iteration did not reach:RuntimeWarning")
def test_monitor_restores_model(tmp_path):
    model = TinyClassifier()
    model.net[0].bias.requires_grad_(False)
    before, after = StateProbe(), StateProbe()
    monitor = FlatnessMonitor(num_batches=2, batch_size=8, trace_samples=2, hessian_iters=5, train_mode=True)

    fit(tmp_path, [before, monitor, after], model=model)

    weights, modes, flags = before.state
    restored_weights, restored_modes, restored_flags = after.state
    for name, tensor in weights.items():
        assert torch.equal(restored_weights[name], tensor), name
    assert restored_modes == modes
    assert restored_flags == flags
    assert flags[1] is False


def test_monitor_without_logger_raises(tmp_path):
    with pytest.raises(MisconfigurationException, match="Cannot use `FlatnessMonitor` callback with `Trainer` that has no logger"):
        fit(tmp_path, [FlatnessMonitor()], logger=False)


def test_monitor_iterable_dataset_raises(tmp_path):
    model = TinyClassifier(dataset=BlobStream())

    with pytest.raises(MisconfigurationException, match="map-style dataset"):
        fit(tmp_path, [FlatnessMonitor(batch_size=8)], model=model)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"loss_fn": "cross_entropy"}, r"`loss_fn` to be callable", id="loss-fn"),
        pytest.param({"num_batches": 0}, r"`num_batches` to be an int >= 1, but got 0", id="num-batches"),
        pytest.param({"batch_size": 0}, r"`batch_size` to be an int >= 1, but got 0", id="batch-size"),
        pytest.param({"seed": "0"}, r"`seed` to be an int, but got '0'", id="seed"),
        pytest.param({"every_n_epochs": 0}, r"`every_n_epochs` to be an int >= 1", id="every-n-epochs"),
        pytest.param({"hessian_iters": 0}, r"`hessian_iters` to be an int >= 1", id="hessian-iters"),
        pytest.param({"hessian_tol": -1.0}, r"`hessian_tol` to be a finite number > 0, but got -1.0", id="hessian-tol"),
        pytest.param({"trace_samples": -1}, r"`trace_samples` to be an int >= 0", id="trace-samples"),
        pytest.param({"curve_points": 1}, r"`curve_points` to be an int >= 3", id="curve-points-small"),
        pytest.param({"curve_points": 10}, r"odd `curve_points`", id="curve-points-even"),
        pytest.param({"curve_range": math.inf}, r"`curve_range` to be a finite number > 0", id="curve-range"),
        pytest.param({"ignore": "bn"}, r"`ignore` to be one of \('biasbn', 'none'\), but got 'bn'", id="ignore"),
        pytest.param({"train_mode": 1}, r"`train_mode` to be a bool, but got 1", id="train-mode"),
    ],
)
def test_monitor_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlatnessMonitor(**kwargs)
