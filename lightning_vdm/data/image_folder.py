"""A data module over any ``train/<class>/…`` and ``test/<class>/…`` tree of image files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from lightning_vdm.data._loaders import (
    LoaderSettings,
    TransformedSubset,
    check_every_class_trains,
    check_image_tree,
    check_int,
    stratified_split,
)
from lightning_vdm.data.cifar import CIFAR10_MEAN, CIFAR10_STD, cifar_eval_transform, cifar_train_transform

__all__ = ["ImageFolderDataModule"]

log = logging.getLogger(__name__)

FOLDER_LAYOUT = "'<root>/train/<class>/<image>' and '<root>/test/<class>/<image>'"


class ImageFolderDataModule(LightningDataModule):
    """Data module over a folder tree of images with one sub-folder per class.

    The tree must contain ``<root>/train/<class>/<image>`` and ``<root>/test/<class>/<image>``
    with the same class folders. Classes sorted alphabetically give labels ``0 … C-1``, as in
    ``torchvision.datasets.ImageFolder``, and images are converted to RGB. Every image is resized
    so its shorter side is ``image_size`` and centre-cropped to ``image_size × image_size``, which
    leaves images of that size unchanged. With ``augment`` training images then get a random crop
    from the image zero-padded by ``image_size // 8`` pixels and a random horizontal flip, the
    CIFAR recipe (4 pixels for 32×32 images).

    By default (``val_split=0``) the validation loader serves the **test split**, as in the
    deformation paper's CIFAR experiments, so validation metrics are test metrics. Set
    ``val_split`` to hold out a seeded, stratified part of the training images instead.

    Args:
        root: Folder that contains ``train`` and ``test``.
        image_size: Side of the square images fed to the model, in pixels.
        batch_size: Samples per batch and per process. Under DDP each process loads this many,
            so the effective batch is ``batch_size × world_size``.
        mean: Per-channel mean subtracted after scaling pixels to ``[0, 1]``. The default is the
            CIFAR-10 training mean.
        std: Per-channel standard deviation divided by. The default is the CIFAR-10 training std.
        augment: Apply the random padded crop and the horizontal flip to training images.
        val_split: Number of training images held out for validation, stratified by class and
            seeded by ``split_seed``. 0 validates on the test split.
        train_subset: Use only this many training images (before holding out ``val_split``),
            stratified by class and seeded by ``split_seed``, for quick runs. ``None`` uses all.
        test_subset: Use only this many test images, stratified and seeded likewise. ``None``
            uses all.
        split_seed: Seed of the subsets and the held-out split.
        num_workers: Worker processes per loader, each decoding images.
        pin_memory: Page-locked host memory for faster GPU copies. ``None`` enables it exactly
            when CUDA is available.
        persistent_workers: Keep workers alive between epochs, only used when ``num_workers > 0``.

    Raises:
        FileNotFoundError: If ``root/train`` or ``root/test`` is missing, has no class
            sub-folders, or has a class folder without images.
        ValueError: If the class folders of ``train`` and ``test`` differ, or a size, ``mean`` or
            ``std`` is invalid.
        TypeError: If an integer argument is not an integer.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        batch_size: int = 128,
        mean: tuple[float, float, float] = CIFAR10_MEAN,
        std: tuple[float, float, float] = CIFAR10_STD,
        augment: bool = True,
        val_split: int = 0,
        train_subset: int | None = None,
        test_subset: int | None = None,
        split_seed: int = 0,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.image_size = check_int("image_size", image_size, 1)
        self.mean = _check_channels("mean", mean, positive=False)
        self.std = _check_channels("std", std, positive=True)
        self.augment = bool(augment)
        self.val_split = check_int("val_split", val_split, 0)
        self.train_subset = None if train_subset is None else check_int("train_subset", train_subset, 1)
        self.test_subset = None if test_subset is None else check_int("test_subset", test_subset, 1)
        self.split_seed = check_int("split_seed", split_seed, 0)
        self.loader = LoaderSettings(batch_size, num_workers, pin_memory, persistent_workers)
        self.save_hyperparameters()

        self.classes = check_image_tree(self.root / "train", "training", FOLDER_LAYOUT)
        test_classes = check_image_tree(self.root / "test", "test", FOLDER_LAYOUT)
        if test_classes != self.classes:
            raise ValueError(
                f"The class folders of {str(self.root / 'train')!r} and {str(self.root / 'test')!r} differ "
                f"(only in train: {sorted(set(self.classes) - set(test_classes))}, "
                f"only in test: {sorted(set(test_classes) - set(self.classes))}); labels would not match."
            )
        self.num_classes: int = len(self.classes)
        self.image_shape: tuple[int, int, int] = (3, self.image_size, self.image_size)

        resize = [v2.Resize(self.image_size), v2.CenterCrop(self.image_size)]
        train_steps = cifar_train_transform(self.mean, self.std, size=self.image_size, augment=self.augment)
        self.train_transform = v2.Compose([*resize, *train_steps.transforms])
        self.eval_transform = v2.Compose([*resize, *cifar_eval_transform(self.mean, self.std).transforms])
        self.train_set: TransformedSubset | None = None
        self.val_set: TransformedSubset | None = None
        self.test_set: TransformedSubset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Index the image files (once per process), draw the subsets and hold out validation images.

        Raises:
            ValueError: If a subset or ``val_split`` is larger than the images available, or
                leaves a class without training images.
        """
        if self.train_set is not None:
            return

        train_base = datasets.ImageFolder(str(self.root / "train"))
        test_base = datasets.ImageFolder(str(self.root / "test"))
        train_indices = self._subset("train_subset", self.train_subset, train_base.targets)
        test_indices = self._subset("test_subset", self.test_subset, test_base.targets)

        if self.val_split == 0:
            val_base, val_indices = test_base, test_indices
        else:
            if self.val_split >= len(train_indices):
                raise ValueError(
                    f"`val_split` must be less than the {len(train_indices)} training images in use, "
                    f"got {self.val_split}."
                )
            train_labels = np.asarray(train_base.targets)[train_indices]
            val_positions, train_positions = stratified_split(train_labels, [self.val_split], seed=self.split_seed)
            val_base, val_indices = train_base, train_indices[val_positions]
            train_indices = train_indices[train_positions]

        check_every_class_trains(
            np.asarray(train_base.targets)[train_indices],
            len(train_base.classes),
            f"Raise `train_subset` (now {self.train_subset}) or lower `val_split` (now {self.val_split}) so that "
            "every class keeps at least one training image.",
            names=train_base.classes,
        )
        self.train_set = TransformedSubset(train_base, train_indices, self.train_transform)
        self.val_set = TransformedSubset(val_base, val_indices, self.eval_transform)
        self.test_set = TransformedSubset(test_base, test_indices, self.eval_transform)
        log.info(
            "Image folder %s: %d classes, %d training, %d validation and %d test images.",
            self.root, self.num_classes, len(self.train_set), len(self.val_set), len(self.test_set),
        )

    def _subset(self, name: str, size: int | None, targets: list[int]) -> np.ndarray:
        if size is None:
            return np.arange(len(targets))
        if size > len(targets):
            raise ValueError(f"`{name}` must be at most the {len(targets)} images available, got {size}.")
        subset, _ = stratified_split(targets, [size], seed=self.split_seed)
        return subset

    def train_dataloader(self) -> DataLoader:
        """Return the shuffled training loader."""
        self.setup()
        return self.loader.build(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Return the validation loader: the test split when ``val_split=0``, else the held-out images."""
        self.setup()
        return self.loader.build(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Return the test loader, in a fixed order."""
        self.setup()
        return self.loader.build(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Return a loader over the test images (with labels), in a fixed order."""
        return self.test_dataloader()


def _check_channels(name: str, values: tuple[float, float, float], positive: bool) -> tuple[float, float, float]:
    """Check that ``values`` has three finite numbers, all positive if ``positive``, and return them."""
    numbers = tuple(float(value) for value in values)
    if len(numbers) != 3 or not all(np.isfinite(numbers)) or (positive and min(numbers) <= 0):
        accepted = "three positive finite numbers" if positive else "three finite numbers"
        raise ValueError(f"`{name}` must be {accepted} (one per RGB channel), got {tuple(values)}.")
    return numbers
