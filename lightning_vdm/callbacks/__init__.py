"""Monitors that log what the loss deformation does, and how flat the trained network is."""

from lightning_vdm.callbacks.deformation_monitor import DeformationMonitor
from lightning_vdm.callbacks.effective_lr_monitor import AdaptiveOptimizerWarning, EffectiveLearningRateMonitor
from lightning_vdm.callbacks.flatness import FlatnessMonitor, FlatnessResult

__all__ = [
    "AdaptiveOptimizerWarning",
    "DeformationMonitor",
    "EffectiveLearningRateMonitor",
    "FlatnessMonitor",
    "FlatnessResult",
]
