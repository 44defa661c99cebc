"""Shared logging schedule of the VDM monitors.

A monitor collects the records that ``VDMMixin`` keeps for each training batch, without reading them on the host.
In ``"step"`` mode it logs the mean over the micro-batches of one optimizer step, on the steps where Lightning's own
``self.log`` would log (every ``log_every_n_steps``). In ``"epoch"`` mode it logs the mean, minimum and maximum over
the epoch's batches at the end of the epoch. Only those logging points read values on the host and reduce them across
processes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_vdm.deformations import stack_scalars
from lightning_vdm.mixin import VDMMixin, VDMRecord

log = logging.getLogger(__name__)

_LOGGING_INTERVALS = ("step", "epoch")


class _Sample:
    """The records of one training batch and any host-side values a monitor snapshots with them."""

    __slots__ = ("records", "extra")

    def __init__(self, records: list[VDMRecord], extra: Any) -> None:
        self.records = records
        self.extra = extra


class _VDMMonitor(Callback):
    """Base class: collects per-batch samples and logs them at the logging interval."""

    def __init__(self, logging_interval: Literal["step", "epoch"] = "step") -> None:
        if logging_interval not in _LOGGING_INTERVALS:
            raise MisconfigurationException(
                f"{type(self).__name__}: `logging_interval` must be one of {_LOGGING_INTERVALS}, "
                f"got {logging_interval!r}."
            )
        self.logging_interval = logging_interval
        self._window: list[_Sample] = []
        self._epoch: list[_Sample] = []
        self._epoch_index: int | None = -1
        self._pending_extra: Any = None
        self._state_key: str | None = None

    # ------------------------------------------------------------------------------------------------------------
    # For subclasses

    def _snapshot(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        """Return host-side values to keep with the batch's records (read before the optimizer step)."""
        return None

    def _values(self, pl_module: VDMMixin, samples: list[_Sample]) -> dict[str, Tensor]:
        """Return, per metric name, a 1-D tensor with one value per sample."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------------------
    # Lightning hooks

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.loggers:
            raise MisconfigurationException(
                f"Cannot use `{type(self).__name__}` callback with `Trainer` that has no logger. "
                "Pass a logger such as CSVLogger or TensorBoardLogger to the Trainer."
            )
        if not isinstance(pl_module, VDMMixin):
            raise MisconfigurationException(
                f"`{type(self).__name__}` needs a LightningModule with VDMMixin in its bases, got "
                f"`{type(pl_module).__name__}`. Define `class My{type(pl_module).__name__}(VDMMixin, "
                f"{type(pl_module).__name__})` and train that."
            )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._pending_extra = self._snapshot(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        records = pl_module.vdm_records
        if records:
            sample = _Sample(list(records), self._pending_extra)
            if self.logging_interval == "epoch":
                self._drop_samples_of_other_epoch(trainer.current_epoch)
                self._epoch.append(sample)
                return
            self._window.append(sample)
        if self.logging_interval == "epoch":
            return
        # `_should_accumulate` costs microseconds on every step, and without accumulation it is always False.
        accumulating = trainer.accumulate_grad_batches > 1 and pl_module.automatic_optimization
        if accumulating and trainer.fit_loop._should_accumulate():
            return

        window, self._window = self._window, []
        if window and trainer._logger_connector.should_update_logs:
            # Reading the values synchronises anyway: check the pending losses first, so that a loss outside the
            # domain stops training with the mixin's error instead of reaching the logs as a NaN or negative δ'.
            pl_module.vdm_check_losses()
            values = self._values(pl_module, window)
            self._log(trainer, {name: series.mean() for name, series in values.items()})

    def _drop_samples_of_other_epoch(self, epoch: int) -> None:
        # A checkpoint written after the last batch of an epoch, but before the epoch's end, keeps that epoch's
        # samples. A run resumed from it starts the next epoch without calling `on_train_epoch_start` (Lightning
        # 2.6), so the check runs here. An index of None comes from a checkpoint that did not store it.
        if self._epoch and self._epoch_index is not None and self._epoch_index != epoch:
            log.debug(
                "%s: dropped %d samples of epoch %d restored from a checkpoint; training resumed at epoch %d.",
                type(self).__name__, len(self._epoch), self._epoch_index, epoch,
            )
            self._epoch = []
        self._epoch_index = epoch

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.logging_interval != "epoch" or not self._epoch:
            return
        samples, self._epoch = self._epoch, []
        pl_module.vdm_check_losses()
        metrics = {}
        for name, series in self._values(pl_module, samples).items():
            metrics[f"{name}/mean"] = series.mean()
            metrics[f"{name}/min"] = series.min()
            metrics[f"{name}/max"] = series.max()
        self._log(trainer, metrics, reductions={"/min": "min", "/max": "max"})

    # ------------------------------------------------------------------------------------------------------------
    # Logging

    def _log(self, trainer: Trainer, metrics: dict[str, Tensor], reductions: dict[str, str] | None = None) -> None:
        """Reduce ``metrics`` over processes and send them to every logger at the trainer's step."""
        names = list(metrics)
        local = torch.stack([metrics[name].detach().float().reshape(()) for name in names])
        if trainer.world_size > 1:
            # One collective for all metrics: each is the mean of the processes' values, except the /min and /max
            # series, which take the minimum and maximum over processes.
            gathered = trainer.strategy.all_gather(local).reshape(trainer.world_size, len(names))
            reduced = gathered.mean(dim=0)
            for index, name in enumerate(names):
                for suffix, reduction in (reductions or {}).items():
                    if name.endswith(suffix):
                        column = gathered[:, index]
                        reduced[index] = column.min() if reduction == "min" else column.max()
            local = reduced
        values = local.tolist()

        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        scalars = dict(zip(names, values))
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in scalars.items()})

    # ------------------------------------------------------------------------------------------------------------
    # Checkpointing

    @property
    def state_key(self) -> str:
        # One step monitor and one epoch monitor of the same class can run side by side. Lightning reads the key
        # for every hook call, so it is built once.
        if self._state_key is None:
            self._state_key = self._generate_state_key(logging_interval=self.logging_interval)
        return self._state_key

    def state_dict(self) -> dict[str, Any]:
        return {
            "logging_interval": self.logging_interval,
            "window": [_sample_to_state(sample) for sample in self._window],
            "epoch": [_sample_to_state(sample) for sample in self._epoch],
            "epoch_index": self._epoch_index,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._window = [_sample_from_state(state) for state in state_dict.get("window", [])]
        self._epoch = [_sample_from_state(state) for state in state_dict.get("epoch", [])]
        self._epoch_index = state_dict.get("epoch_index")


def _sample_to_state(sample: _Sample) -> dict[str, Any]:
    return {"records": [[float(value) for value in record] for record in sample.records], "extra": sample.extra}


def _sample_from_state(state: dict[str, Any]) -> _Sample:
    records = [VDMRecord(*(torch.tensor(value) for value in record)) for record in state["records"]]
    return _Sample(records, state["extra"])


def per_sample(samples: list[_Sample], field: str, transform: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Return one value per sample: the mean over the sample's records of ``transform(record.field)``."""
    flat = stack_scalars([getattr(record, field) for sample in samples for record in sample.records])
    if transform is not None:
        flat = transform(flat)
    counts = [len(sample.records) for sample in samples]
    if max(counts) == 1:
        return flat
    # Several records per batch (manual optimization with several backward calls): average within each batch.
    index = torch.repeat_interleave(torch.arange(len(counts), device=flat.device), torch.tensor(counts, device=flat.device))
    sums = torch.zeros(len(counts), dtype=flat.dtype, device=flat.device).index_add_(0, index, flat)
    return sums / torch.tensor(counts, dtype=flat.dtype, device=flat.device)
