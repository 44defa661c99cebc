"""Data modules: scikit-learn digits (shipped, no download), CIFAR-10/100, ImageNet and any image folder."""

from lightning_vdm.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_vdm.data.digits import DigitsDataModule
from lightning_vdm.data.image_folder import ImageFolderDataModule
from lightning_vdm.data.imagenet import ImageNetDataModule

__all__ = [
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
]
