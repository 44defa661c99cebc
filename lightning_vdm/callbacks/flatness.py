"""Measure the flatness of the training loss around the weights at the end of fit.

The measurements come from :mod:`lightning_vdm.landscape`: the top Hessian eigenvalue by power
iteration, optionally the Hessian trace by Hutchinson's estimator, and the 1-D loss curve along a
filter-normalised random direction (Li et al., "Visualizing the Loss Landscape of Neural Nets",
NeurIPS 2018). The loss curve is the measurement shown in Fig. 5 of "Deforming the Loss Surface to
Affect the Behaviour of the Optimizer" (AAAI 2021).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_vdm.landscape import (
    _check_int,
    _check_positive_float,
    curve_sharpness,
    filter_normalized_direction,
    fixed_batches,
    hessian_top_eigenvalue,
    hessian_trace,
    loss_curve,
    save_curve_csv,
    symmetric_alphas,
)

__all__ = ["FlatnessMonitor", "FlatnessResult"]

log = logging.getLogger(__name__)

_IGNORE_CHOICES = ("biasbn", "none")
_SHARDING_STRATEGIES = (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy)
FINAL_CURVE_FILENAME = "flatness_curve.csv"


@dataclass(frozen=True)
class FlatnessResult:
    """One flatness measurement.

    Attributes:
        epoch: ``trainer.current_epoch`` when measured.
        global_step: ``trainer.global_step`` when measured, and the step of the logged values.
        subset_loss: Mean loss per sample on the fixed subset at the current weights (α = 0).
        hessian_top_eigenvalue: Signed Hessian eigenvalue of largest magnitude.
        hessian_iterations: Hessian-vector products used by power iteration.
        hessian_trace: Hutchinson estimate of the Hessian trace, or ``None`` when it is off.
        hessian_trace_standard_error: Standard error of that estimate, or ``None`` when it is off.
        alphas: Step sizes of the loss curve, float64.
        losses: Losses at ``alphas``, float64.
        curve_sharpness: (L(-r) + L(r)) / 2 - L(0) for ``r = curve_range``.
        curve_path: CSV file the curve was written to.
    """

    epoch: int
    global_step: int
    subset_loss: float
    hessian_top_eigenvalue: float
    hessian_iterations: int
    hessian_trace: float | None
    hessian_trace_standard_error: float | None
    alphas: Tensor
    losses: Tensor
    curve_sharpness: float
    curve_path: str

    def metrics(self) -> dict[str, float]:
        """Return the values logged under the ``flatness/`` prefix."""
        metrics = {
            "flatness/hessian_top_eigenvalue": self.hessian_top_eigenvalue,
            "flatness/hessian_iterations": float(self.hessian_iterations),
            "flatness/curve_sharpness": self.curve_sharpness,
            "flatness/subset_loss": self.subset_loss,
        }
        if self.hessian_trace is not None:
            metrics["flatness/hessian_trace"] = self.hessian_trace
            metrics["flatness/hessian_trace_standard_error"] = self.hessian_trace_standard_error
        return metrics


class FlatnessMonitor(Callback):
    r"""Log the Hessian spectrum and a filter-normalised loss curve of the training loss.

    A measurement runs in ``on_train_end``, and also after every ``every_n_epochs`` training epochs when
    that is set. ``on_train_end`` is used rather than ``on_fit_end`` because in Lightning 2.6 the
    strategy teardown between the two moves the model to the CPU. The loggers are still open in
    ``on_train_end``, because they are finalised only after ``on_fit_end``.

    **Data.** All measurements use one fixed subset of the training set: ``num_batches`` batches of
    ``batch_size`` samples, drawn with ``seed`` by :func:`~lightning_vdm.landscape.fixed_batches`
    from the dataset of ``trainer.train_dataloader``, collated by that loader's ``collate_fn``. The
    subset is drawn once in ``on_train_start`` and kept on the CPU. The loader itself is never
    iterated, and the draw runs under :func:`~lightning.pytorch.utilities.seed.isolate_rng`, so the
    training run's random state is the same with and without this callback. The dataset must be
    map-style (indexable, with ``__len__``) and its batches ``(inputs, targets)`` pairs.

    **Objective.** L(θ) is the mean of ``loss_fn(pl_module(inputs), targets)`` over the subset,
    weighted by batch size. The module runs in eval mode unless ``train_mode=True``. Every
    measurement restores the weights bitwise, each submodule's train/eval flag and, in train
    mode, the buffers. It never changes ``requires_grad``. Random draws use their own seeded
    generators under ``isolate_rng``, so a measurement during training does not change the run.

    **Logged values**, through every logger in ``trainer.loggers`` at ``trainer.global_step``, and
    copied to ``trainer.callback_metrics``:

    * ``flatness/hessian_top_eigenvalue``: the signed eigenvalue of largest magnitude.
    * ``flatness/hessian_iterations``: the Hessian-vector products that power iteration used.
    * ``flatness/hessian_trace`` and ``flatness/hessian_trace_standard_error``: only when
      ``trace_samples > 0``.
    * ``flatness/curve_sharpness``: (L(θ - r·d) + L(θ + r·d)) / 2 - L(θ) with ``r = curve_range``
      and d the filter-normalised direction drawn with ``seed``.
    * ``flatness/subset_loss``: L(θ).

    The curve is written as a CSV file with the columns ``alpha,loss`` to the first logger's
    ``log_dir`` (``trainer.default_root_dir`` when that logger has none). The end-of-fit curve is
    ``flatness_curve.csv``, and a curve measured at the end of an epoch is
    ``flatness_curve_step={global_step}.csv``. The latest measurement is kept in :attr:`results`.

    **Distributed training.** Only global rank zero measures, logs and writes files, on its full
    copy of the module. The other ranks wait at a barrier. Strategies that shard parameters
    (FSDP, DeepSpeed, model parallel) are rejected at setup.

    Args:
        loss_fn: Called as ``loss_fn(logits, targets)``, must return the batch mean as a scalar.
        num_batches: Number of batches in the fixed subset, at least 1.
        batch_size: Samples per batch, at least 1. ``None`` uses the training DataLoader's ``batch_size``.
        seed: Seed of the subset, of the direction and of the Hessian's random vectors.
        every_n_epochs: Also measure after every this many training epochs, at least 1. ``None``
            measures only at the end of fit.
        hessian_iters: Maximum power-iteration steps (Hessian-vector products), at least 1.
        hessian_tol: Relative tolerance that stops power iteration, > 0.
        trace_samples: Rademacher vectors for the Hessian trace. ``0`` turns the trace off.
        curve_points: Odd number of points of the loss curve, at least 3. The grid is symmetric and
            contains α = 0 exactly.
        curve_range: Largest step size r of the loss curve, > 0. The direction has the norm of the
            weights filter by filter, so α = 1 moves each filter by its own norm.
        ignore: ``"biasbn"`` gives biases and normalisation parameters (all 0-D and 1-D parameters)
            a zero direction. ``"none"`` scales each of them as one filter.
        train_mode: Evaluate in train mode (BatchNorm uses batch statistics) instead of eval mode.

    Raises:
        ValueError: If an argument is out of range.
        MisconfigurationException: At setup, if the Trainer has no logger or shards the parameters.
            At train start, if the training DataLoader cannot give a fixed subset.

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.loggers import CSVLogger
        from lightning_vdm.callbacks.flatness import FlatnessMonitor

        monitor = FlatnessMonitor(num_batches=8, batch_size=128, trace_samples=50)
        trainer = Trainer(callbacks=[monitor], logger=CSVLogger("logs"))
        trainer.fit(model, datamodule=datamodule)
        print(monitor.results.hessian_top_eigenvalue, monitor.results.curve_path)
    """

    def __init__(
        self,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        num_batches: int = 4,
        batch_size: int | None = None,
        seed: int = 0,
        every_n_epochs: int | None = None,
        hessian_iters: int = 100,
        hessian_tol: float = 1e-4,
        trace_samples: int = 0,
        curve_points: int = 21,
        curve_range: float = 1.0,
        ignore: Literal["biasbn", "none"] = "biasbn",
        train_mode: bool = False,
    ) -> None:
        if not callable(loss_fn):
            raise ValueError(f"Expected `loss_fn` to be callable, but got {loss_fn!r}.")
        _check_int("num_batches", num_batches, minimum=1)
        if batch_size is not None:
            _check_int("batch_size", batch_size, minimum=1)
        _check_int("seed", seed, minimum=None)
        if every_n_epochs is not None:
            _check_int("every_n_epochs", every_n_epochs, minimum=1)
        _check_int("hessian_iters", hessian_iters, minimum=1)
        _check_positive_float("hessian_tol", hessian_tol)
        _check_int("trace_samples", trace_samples, minimum=0)
        _check_int("curve_points", curve_points, minimum=3)
        if curve_points % 2 == 0:
            raise ValueError(f"Expected an odd `curve_points` so that the curve contains α = 0, but got {curve_points}.")
        _check_positive_float("curve_range", curve_range)
        if ignore not in _IGNORE_CHOICES:
            raise ValueError(f"Expected `ignore` to be one of {_IGNORE_CHOICES}, but got {ignore!r}.")
        if not isinstance(train_mode, bool):
            raise ValueError(f"Expected `train_mode` to be a bool, but got {train_mode!r}.")

        self.loss_fn = loss_fn
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.seed = seed
        self.every_n_epochs = every_n_epochs
        self.hessian_iters = hessian_iters
        self.hessian_tol = hessian_tol
        self.trace_samples = trace_samples
        self.curve_points = curve_points
        self.curve_range = float(curve_range)
        self.ignore = ignore
        self.train_mode = train_mode

        self.results: FlatnessResult | None = None
        """The latest measurement, or ``None`` before the first one (and on ranks other than zero)."""
        self._batches: list[Any] | None = None

    # ------------------------------------------------------------------------------------------------
    # Lightning hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use `FlatnessMonitor` callback with `Trainer` that has no logger. "
                "Pass a logger such as CSVLogger or TensorBoardLogger to the Trainer."
            )
        if isinstance(trainer.strategy, _SHARDING_STRATEGIES):
            raise MisconfigurationException(
                f"`FlatnessMonitor` needs the full model on global rank zero, but the strategy "
                f"`{type(trainer.strategy).__name__}` shards the parameters. Use a single device or DDP."
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.train_mode and trainer.world_size > 1 and _has_sync_batch_norm(pl_module):
            # In train mode SyncBatchNorm all-reduces its statistics, which would wait forever for
            # the ranks that do not measure.
            raise MisconfigurationException(
                "`FlatnessMonitor(train_mode=True)` cannot run on one rank of a model with SyncBatchNorm. "
                "Use train_mode=False or Trainer(sync_batchnorm=False)."
            )
        if trainer.is_global_zero:
            self._batches = self._draw_batches(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs is None or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        filename = f"flatness_curve_step={trainer.global_step}.csv"
        self._measure_on_rank_zero(trainer, pl_module, filename)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._measure_on_rank_zero(trainer, pl_module, FINAL_CURVE_FILENAME)

    # ------------------------------------------------------------------------------------------------
    # Measurement

    def _draw_batches(self, trainer: Trainer) -> list[Any]:
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise MisconfigurationException(
                "`FlatnessMonitor` draws its subset from a single training DataLoader, but "
                f"`trainer.train_dataloader` is {type(loader).__name__}."
            )
        try:
            with isolate_rng():
                batches = fixed_batches(loader, self.num_batches, self.batch_size, self.seed)
        except (TypeError, ValueError) as error:
            raise MisconfigurationException(f"`FlatnessMonitor` cannot draw a fixed training subset: {error}") from error

        for index, batch in enumerate(batches):
            if not isinstance(batch, Sequence) or isinstance(batch, str) or len(batch) != 2:
                raise MisconfigurationException(
                    f"`FlatnessMonitor` expects (inputs, targets) training batches, but batch {index} of the "
                    f"subset is {type(batch).__name__}."
                )
        log.info(
            "FlatnessMonitor drew %d batches (%d samples) with seed %d",
            len(batches),
            sum(len(batch[1]) for batch in batches),
            self.seed,
        )
        return batches

    def _measure_on_rank_zero(self, trainer: Trainer, pl_module: LightningModule, filename: str) -> None:
        if trainer.is_global_zero:
            self._measure_and_log(trainer, pl_module, filename)
        trainer.strategy.barrier("FlatnessMonitor")

    def _measure_and_log(self, trainer: Trainer, pl_module: LightningModule, filename: str) -> None:
        path = os.path.join(_log_dir(trainer), filename)
        previous = self.results
        if previous is not None and previous.global_step == trainer.global_step:
            # The end of fit follows an epoch-end measurement of the same weights: write the final
            # file from it instead of measuring and logging the same step twice.
            save_curve_csv(path, previous.alphas, previous.losses)
            self.results = replace(previous, curve_path=path)
            return

        if self._batches is None:
            self._batches = self._draw_batches(trainer)
        batches = move_data_to_device(self._batches, pl_module.device)
        with isolate_rng():
            result = self._measure(pl_module, batches, trainer.current_epoch, trainer.global_step, path)

        save_curve_csv(path, result.alphas, result.losses)
        metrics = result.metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update(
            {name: torch.tensor(value, device=trainer.strategy.root_device) for name, value in metrics.items()}
        )
        self.results = result
        log.info("FlatnessMonitor at step %d: %s, curve written to %s", trainer.global_step, metrics, path)

    def _measure(self, model: nn.Module, batches: list[Any], epoch: int, step: int, path: str) -> FlatnessResult:
        direction = filter_normalized_direction(model, self.seed, ignore=self.ignore)
        alphas, losses = loss_curve(
            model, self.loss_fn, batches, direction, symmetric_alphas(self.curve_range, self.curve_points),
            train_mode=self.train_mode,
        )
        del direction

        top = hessian_top_eigenvalue(
            model, self.loss_fn, batches, iters=self.hessian_iters, tol=self.hessian_tol, seed=self.seed,
            train_mode=self.train_mode,
        )
        trace = None
        if self.trace_samples > 0:
            trace = hessian_trace(
                model, self.loss_fn, batches, samples=self.trace_samples, seed=self.seed, train_mode=self.train_mode
            )

        return FlatnessResult(
            epoch=epoch,
            global_step=step,
            subset_loss=losses[self.curve_points // 2].item(),
            hessian_top_eigenvalue=top.eigenvalue,
            hessian_iterations=top.iterations,
            hessian_trace=None if trace is None else trace.trace,
            hessian_trace_standard_error=None if trace is None else trace.standard_error,
            alphas=alphas,
            losses=losses,
            curve_sharpness=curve_sharpness(alphas, losses),
            curve_path=path,
        )


def _log_dir(trainer: Trainer) -> str:
    # `trainer.log_dir` is not used: it broadcasts across ranks, and only rank zero gets here.
    log_dir = getattr(trainer.loggers[0], "log_dir", None)
    return os.fspath(log_dir) if log_dir is not None else os.fspath(trainer.default_root_dir)


def _has_sync_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(submodule, nn.SyncBatchNorm) for submodule in module.modules())

