"""CIFAR-10 and CIFAR-100 data modules over the torchvision datasets, with the usual crop-and-flip recipe."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from lightning_vdm.data._loaders import (
    LoaderSettings,
    TransformedSubset,
    check_every_class_trains,
    check_int,
    stratified_split,
)

__all__ = [
    "CIFAR100DataModule",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10DataModule",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "cifar_eval_transform",
    "cifar_train_transform",
]

log = logging.getLogger(__name__)

# Per-channel mean and population std of the 50,000 CIFAR-10 training images with pixels scaled
# to [0, 1], as widely published. Recomputed from a JPEG re-encoding of those images they come out
# as mean (0.4913, 0.4821, 0.4465) and std (0.2452, 0.2428, 0.2606). The std is slightly lower
# there, as expected from JPEG compression smoothing the pixels.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# The same statistics for the 50,000 CIFAR-100 training images, as widely published.
# NOTE: taken as published and not checked against the CIFAR-100 pixels.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def cifar_train_transform(
    mean: Sequence[float], std: Sequence[float], size: int = 32, augment: bool = True
) -> v2.Compose:
    """Build the training transform: random crop with zero padding ``size // 8``, horizontal flip, normalisation.

    With ``size=32`` this is the random crop of 32 with 4 pixels of padding and the random
    horizontal flip that the deformation paper uses on CIFAR (its experiments section lists only
    these two augmentations).

    Args:
        mean: Per-channel mean subtracted after scaling pixels to ``[0, 1]``.
        std: Per-channel standard deviation divided by.
        size: Side of the square input images in pixels.
        augment: Apply the crop and the flip. When ``False`` only normalisation is applied.
    """
    steps: list = []
    if augment:
        steps += [v2.RandomCrop(size, padding=size // 8, fill=0), v2.RandomHorizontalFlip()]
    return v2.Compose([*steps, *_to_normalised_tensor(mean, std)])


def cifar_eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Build the evaluation transform: conversion to a ``float32`` tensor in ``[0, 1]`` and normalisation."""
    return v2.Compose(_to_normalised_tensor(mean, std))


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


class CIFAR10DataModule(LightningDataModule):
    """Data module for CIFAR-10 over ``torchvision.datasets.CIFAR10``.

    Training images get a random 32×32 crop from the image padded by 4 zero pixels on each side
    and a random horizontal flip, then per-channel normalisation with :data:`CIFAR10_MEAN` and
    :data:`CIFAR10_STD`. Validation and test images are only normalised.

    The deformation paper trains on all 50,000 training images and reports accuracy on the
    10,000 test images. By default (``val_split=0``) the validation loader therefore serves the
    **test split**, so validation metrics are test metrics and must not be used to tune
    hyperparameters. Set ``val_split`` to hold out a seeded, stratified part of the training set
    instead.

    Files are downloaded only in :meth:`prepare_data`, which Lightning calls on one process per
    node under DDP, and never in :meth:`setup`.

    Args:
        data_dir: Folder that contains (or receives) torchvision's extracted
            ``cifar-10-batches-py`` folder. CIFAR-100 uses ``cifar-100-python`` in the same
            folder, so one ``data_dir`` can serve both.
        batch_size: Samples per batch and per process. Under DDP each process loads this many,
            so the effective batch is ``batch_size × world_size``. The deformation paper uses 128
            without distributed training (its Table 4).
        download: Download and extract the archive in :meth:`prepare_data` when the files are
            missing or fail torchvision's MD5 check. Needs internet access.
        val_split: Number of training images held out for validation, stratified by class and
            seeded by ``split_seed``. 0 keeps all training images and validates on the test split.
        split_seed: Seed of the held-out split.
        augment: Apply the random crop and flip to training images.
        num_workers: Worker processes per loader.
        pin_memory: Page-locked host memory for faster GPU copies. ``None`` enables it exactly
            when CUDA is available.
        persistent_workers: Keep workers alive between epochs, only used when ``num_workers > 0``.

    Raises:
        TypeError: If an integer argument is not an integer.
        ValueError: If ``batch_size < 1``, ``num_workers < 0``, ``val_split < 0`` or
            ``split_seed < 0``.
    """

    dataset_class: type[datasets.CIFAR10] = datasets.CIFAR10
    dataset_name: str = "CIFAR-10"
    num_classes: int = 10
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    image_shape: tuple[int, int, int] = (3, 32, 32)

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        download: bool = False,
        val_split: int = 0,
        split_seed: int = 0,
        augment: bool = True,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.download = bool(download)
        self.val_split = check_int("val_split", val_split, 0)
        self.split_seed = check_int("split_seed", split_seed, 0)
        self.augment = bool(augment)
        self.loader = LoaderSettings(batch_size, num_workers, pin_memory, persistent_workers)
        self.save_hyperparameters()

        self.train_transform = cifar_train_transform(self.mean, self.std, augment=self.augment)
        self.eval_transform = cifar_eval_transform(self.mean, self.std)
        self.train_set: TransformedSubset | None = None
        self.val_set: TransformedSubset | None = None
        self.test_set: TransformedSubset | None = None

    @property
    def files_folder(self) -> Path:
        """Folder with the extracted batch files, ``data_dir / base_folder`` of the torchvision dataset."""
        return self.data_dir / self.dataset_class.base_folder

    def prepare_data(self) -> None:
        """Download and extract the dataset when ``download`` is set and the files are missing or corrupted."""
        if not self.download:
            return
        log.info("Checking %s files in %s, downloading them if needed.", self.dataset_name, self.data_dir)
        for train in (True, False):
            self.dataset_class(str(self.data_dir), train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Load the training and test splits (once per process) and hold out validation images if requested.

        Raises:
            FileNotFoundError: If the batch files are not in :attr:`files_folder`.
            RuntimeError: If the files are present but fail torchvision's MD5 check.
            ValueError: If ``val_split`` leaves no training image for some class.
        """
        if self.train_set is not None:
            return

        self._check_files_present()
        train_base = self._load(train=True)
        test_base = self._load(train=False)

        if self.val_split == 0:
            self.train_set = TransformedSubset(train_base, None, self.train_transform)
            self.val_set = TransformedSubset(test_base, None, self.eval_transform)
        else:
            if self.val_split >= len(train_base):
                raise ValueError(
                    f"`val_split` must be less than the {len(train_base)} training images, got {self.val_split}."
                )
            val_indices, train_indices = stratified_split(train_base.targets, [self.val_split], seed=self.split_seed)
            check_every_class_trains(
                np.asarray(train_base.targets)[train_indices],
                len(train_base.classes),
                f"Lower `val_split` (now {self.val_split}) so that every class keeps at least one training image.",
            )
            self.train_set = TransformedSubset(train_base, train_indices, self.train_transform)
            self.val_set = TransformedSubset(train_base, val_indices, self.eval_transform)
        self.test_set = TransformedSubset(test_base, None, self.eval_transform)

        validation = "the test split" if self.val_split == 0 else f"{self.val_split} held-out training images"
        log.info(
            "%s: %d training and %d test images, validating on %s.",
            self.dataset_name, len(self.train_set), len(self.test_set), validation,
        )

    def _expected_files(self) -> list[str]:
        dataset = self.dataset_class
        return [name for name, _ in dataset.train_list + dataset.test_list] + [dataset.meta["filename"]]

    def _check_files_present(self) -> None:
        missing = [name for name in self._expected_files() if not (self.files_folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.dataset_name} files not found in {str(self.files_folder)!r} (missing: {', '.join(missing)}). "
                f"Set `download: true` on a machine with internet access, or copy the extracted "
                f"{self.dataset_class.base_folder!r} folder into {str(self.data_dir)!r}."
            )

    def _load(self, train: bool) -> datasets.CIFAR10:
        try:
            return self.dataset_class(str(self.data_dir), train=train, download=False)
        except RuntimeError as error:
            raise RuntimeError(
                f"{self.dataset_name} files in {str(self.files_folder)!r} failed torchvision's MD5 check. "
                f"Delete the folder and set `download: true`, or copy an intact "
                f"{self.dataset_class.base_folder!r} folder there."
            ) from error

    def train_dataloader(self) -> DataLoader:
        """Return the shuffled, augmented training loader."""
        self.setup()
        return self.loader.build(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Return the validation loader: the test split when ``val_split=0``, else the held-out images."""
        self.setup()
        return self.loader.build(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Return the test loader over the 10,000 test images."""
        self.setup()
        return self.loader.build(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Return a loader over the test images (with labels), in a fixed order."""
        return self.test_dataloader()


class CIFAR100DataModule(CIFAR10DataModule):
    """Data module for CIFAR-100 over ``torchvision.datasets.CIFAR100``.

    Identical to :class:`CIFAR10DataModule` (same arguments, transforms and validation rule)
    except for the 100 fine labels, the ``cifar-100-python`` folder and the normalisation
    statistics :data:`CIFAR100_MEAN` and :data:`CIFAR100_STD`.
    """

    dataset_class: type[datasets.CIFAR10] = datasets.CIFAR100
    dataset_name: str = "CIFAR-100"
    num_classes: int = 100
    mean: tuple[float, float, float] = CIFAR100_MEAN
    std: tuple[float, float, float] = CIFAR100_STD
