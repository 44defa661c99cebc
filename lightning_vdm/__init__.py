"""Vertical deformation mappings of the training loss for PyTorch Lightning.

A vertical deformation mapping δ is applied to the mini-batch loss before backward, so the gradient becomes
δ'(ℓ)·∇ℓ (Chen et al., "Deforming the Loss Surface to Affect the Behaviour of the Optimizer", AAAI 2021).
"""

from lightning_vdm.callbacks import DeformationMonitor, EffectiveLearningRateMonitor
from lightning_vdm.deformations import (
    ArctanPower,
    DeformationDomainError,
    Identity,
    LogExp,
    Power,
    VerticalDeformation,
    as_deformation,
    parse_deformation,
)
from lightning_vdm.mixin import DeformationMismatchError, VDMMixin

__all__ = [
    "ArctanPower",
    "DeformationDomainError",
    "DeformationMismatchError",
    "DeformationMonitor",
    "EffectiveLearningRateMonitor",
    "Identity",
    "LogExp",
    "Power",
    "VDMMixin",
    "VerticalDeformation",
    "as_deformation",
    "parse_deformation",
]

__version__ = "0.1.0"
