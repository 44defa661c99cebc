"""Monitors that log what the loss deformation does."""

from lightning_vdm.callbacks.deformation_monitor import DeformationMonitor
from lightning_vdm.callbacks.effective_lr_monitor import AdaptiveOptimizerWarning, EffectiveLearningRateMonitor

__all__ = ["AdaptiveOptimizerWarning", "DeformationMonitor", "EffectiveLearningRateMonitor"]
