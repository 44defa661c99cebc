"""VDMMixin in a real two-process DDP run on the CPU (gloo over loopback).

Each worker writes its batch, raw loss and the averaged gradient to a file; the parent checks them against a
float64 computation on one process. The workers are forked (``DDPStrategy(start_method="fork")``, Lightning's
``ddp_fork``), which skips re-importing torch in every child and keeps each run to a few seconds.
"""

from __future__ import annotations

import csv
import socket

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy

from lightning_vdm import DeformationMonitor, parse_deformation
from tests.tiny import DeformedRegression, RegressionData, TinyRegression

SEED = 0
DEFORMATION = "LE(1, 0.9)"

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")


class _Recorder(Callback):
    """Write, per process, the first batch, its raw loss and the gradient the optimizer receives."""

    def __init__(self, directory) -> None:
        self.directory = directory
        self.batch = None
        self.grads = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.batch is None:
            self.batch = [t.clone() for t in batch]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is None:
            self.grads = torch.cat([p.grad.flatten().clone() for p in pl_module.parameters()])

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(
            {"batch": self.batch, "grads": self.grads, "raw": pl_module.vdm_records[0].raw.clone()},
            self.directory / f"rank{trainer.global_rank}.pt",
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fit_ddp(tmp_path, monkeypatch, model, callbacks) -> Trainer:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo", start_method="fork"),
        logger=CSVLogger(tmp_path, name="csv", version=0),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_steps=1,
        log_every_n_steps=1,
    )
    trainer.fit(model, RegressionData(batch_size=8))
    return trainer


def _local_gradient(initial: TinyRegression, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (raw loss, ∇ℓ) of one process's batch in float64."""
    reference = TinyRegression().double()
    reference.load_state_dict(initial.state_dict())
    loss = reference.compute_loss([t.double() for t in batch])
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    return loss.detach(), torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("derivative_at", ["local", "global_mean"])
def test_ddp_gradient_and_logged_derivative(tmp_path, monkeypatch, derivative_at):
    deformation = parse_deformation(DEFORMATION)
    model = DeformedRegression(deformation=deformation, lr=0.05, derivative_at=derivative_at)
    initial = TinyRegression()
    initial.load_state_dict(model.state_dict())

    _fit_ddp(tmp_path, monkeypatch, model, [DeformationMonitor(), _Recorder(tmp_path)])

    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    losses, grads = zip(*(_local_gradient(initial, result["batch"]) for result in results))
    # DistributedSampler gives the two processes different samples.
    assert not torch.equal(results[0]["batch"][0], results[1]["batch"][0])
    for result, loss in zip(results, losses):
        assert result["raw"].item() == pytest.approx(loss.item(), rel=1e-6)

    if derivative_at == "local":
        expected = sum(deformation.closed_form_derivative(l) * g for l, g in zip(losses, grads)) / 2
        expected_logged = sum(deformation.closed_form_derivative(l) for l in losses) / 2
    else:
        mean_loss = sum(losses) / 2
        expected = deformation.closed_form_derivative(mean_loss) * sum(grads) / 2
        expected_logged = deformation.closed_form_derivative(mean_loss)
    for result in results:
        # DDP all-reduces the gradient during backward, so both processes hold the same average.
        torch.testing.assert_close(result["grads"].double(), expected, rtol=1e-5, atol=1e-7)

    with open(tmp_path / "csv" / "version_0" / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("vdm/derivative")]
    assert len(rows) == 1
    assert float(rows[0]["vdm/derivative"]) == pytest.approx(expected_logged.item(), rel=1e-5)
    assert float(rows[0]["vdm/loss_raw"]) == pytest.approx((sum(losses) / 2).item(), rel=1e-5)


def test_ddp_skip_policy_raises(tmp_path, monkeypatch):
    model = DeformedRegression(deformation=DEFORMATION, nonfinite_loss="skip")
    with pytest.raises(Exception, match=r"`nonfinite_loss='skip'` cannot be used with 2 processes"):
        _fit_ddp(tmp_path, monkeypatch, model, [])
