"""``EffectiveLearningRateMonitor``: log the learning rate and lr × δ'(ℓ) for every parameter group."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_vdm.callbacks._monitor_base import _Sample, _VDMMonitor, per_sample
from lightning_vdm.mixin import VDMMixin

__all__ = ["AdaptiveOptimizerWarning", "EffectiveLearningRateMonitor"]

# Optimizers that divide the gradient by a running estimate of its scale, so multiplying the gradient by δ'(ℓ) does not
# multiply their step by δ'(ℓ).
_ADAPTIVE_OPTIMIZERS = tuple(
    getattr(torch.optim, name)
    for name in ("Adadelta", "Adafactor", "Adagrad", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSprop", "SparseAdam")
    if hasattr(torch.optim, name)
)


class AdaptiveOptimizerWarning(UserWarning):
    """lr × δ'(ℓ) is not the step size of an optimizer that normalises the gradient's scale."""


class EffectiveLearningRateMonitor(_VDMMonitor):
    r"""Log the learning rate and the effective learning rate lr × δ'(ℓ) of every optimizer and parameter group.

    With plain or momentum SGD, deforming the loss by δ multiplies the gradient, and so the step, by δ'(ℓ): the
    optimizer behaves as if its learning rate were lr × δ'(ℓ). Keys follow Lightning's ``LearningRateMonitor``:
    ``lr-<Optimizer>`` and ``effective-lr-<Optimizer>``. A second optimizer of the same class gets ``-1``, ``-2``, ….
    An optimizer with several parameter groups gets ``/pg1``, ``/pg2``, … or ``/<name>`` for a group that has a
    ``"name"`` entry. The learning rate is the one the step used, read before the optimizer step and its scheduler.

    .. warning:: Adaptive optimizers (Adam, AdamW, RMSprop, Adagrad, …) divide the gradient by a running estimate of
        its scale, so δ'(ℓ) is largely cancelled and lr × δ'(ℓ) is not their step size. The monitor still logs it and
        warns once with :class:`AdaptiveOptimizerWarning`.

    Logging schedule, epoch suffixes and the reduction across processes are those of
    :class:`~lightning_vdm.callbacks.DeformationMonitor`.

    Args:
        logging_interval: ``"step"`` or ``"epoch"``.
        log_learning_rate: Also log ``lr-<Optimizer>``. Set it to ``False`` to run Lightning's
            ``LearningRateMonitor`` beside this monitor, which writes the same keys.

    Raises:
        MisconfigurationException: If ``logging_interval`` is invalid, if one optimizer has two parameter groups with
            the same name, or at train start when the trainer has no logger, the model has no ``VDMMixin``, or a
            ``LearningRateMonitor`` would write the same keys.
    """

    def __init__(self, logging_interval: Literal["step", "epoch"] = "step", log_learning_rate: bool = True) -> None:
        super().__init__(logging_interval)
        self.log_learning_rate = log_learning_rate
        self._names: list[list[str]] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.log_learning_rate and any(isinstance(callback, LearningRateMonitor) for callback in trainer.callbacks):
            raise MisconfigurationException(
                "EffectiveLearningRateMonitor and Lightning's LearningRateMonitor both log `lr-<Optimizer>`, so one "
                "series would mix the values of both. Remove LearningRateMonitor (this monitor logs the learning "
                "rate too), or keep it and pass `log_learning_rate=False` to EffectiveLearningRateMonitor."
            )
        self._names = _group_names(trainer.optimizers)
        adaptive = sorted({type(o).__name__ for o in _unwrap(trainer.optimizers) if isinstance(o, _ADAPTIVE_OPTIMIZERS)})
        if adaptive:
            rank_zero_warn(
                f"{', '.join(adaptive)} normalises the gradient's scale, so the logged effective learning rate "
                "lr × δ'(ℓ) is not its step size; with these optimizers a loss deformation mostly changes the "
                "direction of the average of gradients, not the step length.",
                category=AdaptiveOptimizerWarning,
            )

    def _snapshot(self, trainer: Trainer, pl_module: LightningModule) -> list[float]:
        return [group["lr"] for optimizer in _unwrap(trainer.optimizers) for group in optimizer.param_groups]

    def _values(self, pl_module: VDMMixin, samples: list[_Sample]) -> dict[str, Tensor]:
        derivative = per_sample(samples, "derivative_at", pl_module.vdm_derivative)
        lrs = torch.tensor([_as_floats(sample.extra) for sample in samples], dtype=derivative.dtype)
        lrs = lrs.to(derivative.device)
        values = {}
        names = [name for names in self._names for name in names]
        for column, name in enumerate(names):
            if self.log_learning_rate:
                values[name] = lrs[:, column]
            values["effective-" + name] = lrs[:, column] * derivative
        return values

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "names": self._names}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._names = state_dict.get("names", [])


def _unwrap(optimizers: list[Any]) -> list[Optimizer]:
    # DeepSpeed and other wrappers keep the real optimizer in `.optimizer`.
    return [getattr(optimizer, "optimizer", optimizer) for optimizer in optimizers]


def _as_floats(lrs: list[Any]) -> list[float]:
    # A tensor learning rate (for example with `capturable=True`) is read here, at a logging point only.
    return [float(lr) for lr in lrs]


def _group_names(optimizers: list[Any]) -> list[list[str]]:
    """Return ``lr-<Optimizer>[-k][/pgN | /name]`` for every parameter group, named as LearningRateMonitor does."""
    seen: Counter[type] = Counter()
    names = []
    for optimizer in _unwrap(optimizers):
        cls = type(optimizer)
        seen[cls] += 1
        base = f"lr-{cls.__name__}" if seen[cls] == 1 else f"lr-{cls.__name__}-{seen[cls] - 1}"
        groups = optimizer.param_groups
        group_names = [group.get("name") for group in groups if group.get("name") is not None]
        duplicates = sorted({name for name in group_names if group_names.count(name) > 1})
        if duplicates:
            raise MisconfigurationException(
                f"{base} has several parameter groups named {duplicates}; give each group a distinct `name`."
            )
        if len(groups) == 1:
            names.append([base])
            continue
        names.append([f"{base}/{group['name']}" if "name" in group else f"{base}/pg{i + 1}" for i, group in enumerate(groups)])
    return names
