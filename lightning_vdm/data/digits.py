"""The 8×8 handwritten digits shipped with scikit-learn, as a small data module for quick CPU runs."""

from __future__ import annotations

import logging

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from lightning_vdm.data._loaders import LoaderSettings, check_int, stratified_split

__all__ = ["DigitsDataModule"]

log = logging.getLogger(__name__)

NUM_DIGITS_SAMPLES = 1797
DIGITS_PIXEL_MAX = 16.0


class _DigitsSplit(Dataset):
    """Digits images normalised with the training statistics, optionally shifted by one pixel at random."""

    def __init__(self, images: Tensor, labels: Tensor, mean: float, std: float, augment: bool) -> None:
        self.labels = labels
        self.mean = mean
        self.std = std
        self.augment = augment
        if augment:
            # Padding with 0 (the blank background of the raw scans) happens before normalisation.
            self.images = images
            self.shift = v2.RandomCrop(size=images.shape[-1], padding=1, fill=0.0)
        else:
            self.images = (images - mean) / std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.augment:
            image = (self.shift(image) - self.mean) / self.std
        return image, self.labels[index]


class DigitsDataModule(LightningDataModule):
    """Data module over scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes).

    The images come with scikit-learn (``sklearn.datasets.load_digits``), so nothing is
    downloaded. Pixel values 0..16 are scaled to ``[0, 1]`` and then normalised with the mean and
    standard deviation of all training pixels, so batches are ``float32`` tensors of shape
    ``(batch, 1, 8, 8)`` and labels are ``int64``.

    The split is stratified: every class contributes to the validation and test parts in
    proportion to its frequency (largest-remainder rounding), and the indices within each class
    are shuffled by a NumPy generator seeded with ``split_seed``. With the defaults this gives
    1,257 training, 180 validation and 360 test images, the same in every process and on every
    machine with the same NumPy release.

    Args:
        batch_size: Samples per batch and per process. Under DDP each process loads this many,
            so the effective batch is ``batch_size × world_size``.
        val_size: Number of validation images, at least 1.
        test_size: Number of test images, at least 1. ``val_size + test_size`` must stay below
            1,797 so that training images remain.
        split_seed: Seed of the stratified split.
        augment: Shift training images at random by up to one pixel in each direction, filling
            with blank background. Off by default; validation and test images are never shifted.
        num_workers: Worker processes per loader. The default 0 loads in the main process, which
            is fastest for this small in-memory dataset.
        pin_memory: Page-locked host memory for faster GPU copies. ``None`` enables it exactly
            when CUDA is available.
        persistent_workers: Keep workers alive between epochs, only used when ``num_workers > 0``.

    Raises:
        TypeError: If an integer argument is not an integer.
        ValueError: If ``batch_size < 1``, ``num_workers < 0``, ``val_size`` or ``test_size`` is
            below 1, or ``val_size + test_size`` leaves no training images.
    """

    num_classes: int = 10
    image_shape: tuple[int, int, int] = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        val_size: int = 180,
        test_size: int = 360,
        split_seed: int = 0,
        augment: bool = False,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        self.loader = LoaderSettings(batch_size, num_workers, pin_memory, persistent_workers)
        self.val_size = check_int("val_size", val_size, 1, NUM_DIGITS_SAMPLES - 1)
        self.test_size = check_int("test_size", test_size, 1, NUM_DIGITS_SAMPLES - 1)
        if val_size + test_size >= NUM_DIGITS_SAMPLES:
            raise ValueError(
                f"`val_size + test_size` must be less than the {NUM_DIGITS_SAMPLES} digits images so that "
                f"training images remain, got {val_size} + {test_size} = {val_size + test_size}."
            )
        self.split_seed = check_int("split_seed", split_seed, 0)
        self.augment = bool(augment)
        self.save_hyperparameters()

        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None
        self.test_indices: np.ndarray | None = None
        self.mean: float | None = None
        self.std: float | None = None
        self._splits: dict[str, _DigitsSplit] = {}

    def setup(self, stage: str | None = None) -> None:
        """Load the digits, split them and compute the training statistics (once per process).

        Raises:
            ValueError: If the split leaves a class without training images.
        """
        if self._splits:
            return

        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images / DIGITS_PIXEL_MAX).to(torch.float32).unsqueeze(1)
        labels = torch.from_numpy(digits.target).to(torch.int64)

        val_indices, test_indices, train_indices = stratified_split(
            digits.target, [self.val_size, self.test_size], seed=self.split_seed
        )
        missing = np.setdiff1d(np.arange(self.num_classes), digits.target[train_indices])
        if missing.size:
            raise ValueError(
                f"`val_size={self.val_size}` and `test_size={self.test_size}` leave no training images "
                f"for classes {missing.tolist()}; choose smaller sizes."
            )

        # Statistics in float64 over every training pixel. The std is the population std, so the
        # normalised training split has mean 0 and std 1.
        train_pixels = digits.images[train_indices] / DIGITS_PIXEL_MAX
        self.mean = float(train_pixels.mean())
        self.std = float(train_pixels.std())

        self.train_indices, self.val_indices, self.test_indices = train_indices, val_indices, test_indices
        for name, indices, augment in (
            ("train", train_indices, self.augment),
            ("val", val_indices, False),
            ("test", test_indices, False),
        ):
            index = torch.from_numpy(indices)
            self._splits[name] = _DigitsSplit(images[index], labels[index], self.mean, self.std, augment)
        log.info(
            "Digits split with seed %d: %d train, %d validation, %d test images; mean %.4f, std %.4f.",
            self.split_seed, len(train_indices), len(val_indices), len(test_indices), self.mean, self.std,
        )

    def _split(self, name: str) -> _DigitsSplit:
        if not self._splits:
            self.setup()
        return self._splits[name]

    def train_dataloader(self) -> DataLoader:
        """Return the shuffled training loader."""
        return self.loader.build(self._split("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Return the validation loader, in a fixed order."""
        return self.loader.build(self._split("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Return the test loader, in a fixed order."""
        return self.loader.build(self._split("test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Return a loader over the test images (with labels), in a fixed order."""
        return self.test_dataloader()
