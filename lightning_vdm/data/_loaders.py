"""Loader settings, argument checks and the seeded stratified split shared by the data modules."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = [
    "LoaderSettings",
    "TransformedSubset",
    "check_image_tree",
    "check_int",
    "stratified_split",
]


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """Check that ``value`` is an integer in ``[minimum, maximum]`` and return it.

    Args:
        name: Argument name used in the error message.
        value: Value received.
        minimum: Smallest accepted value.
        maximum: Largest accepted value, or ``None`` for no upper bound.

    Raises:
        TypeError: If ``value`` is not an ``int`` (``bool`` is rejected too).
        ValueError: If ``value`` lies outside the accepted range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer, got {value!r} of type {type(value).__name__}.")

    accepted = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"`{name}` must be an integer {accepted}, got {value}.")
    return int(value)


@dataclass(frozen=True)
class LoaderSettings:
    """DataLoader settings shared by the training, validation and test loaders of a data module.

    Args:
        batch_size: Samples per batch and per process.
        num_workers: Worker processes per loader, 0 loads in the main process.
        pin_memory: Page-locked host memory for faster copies to the GPU. ``None`` enables it
            exactly when CUDA is available.
        persistent_workers: Keep worker processes alive between epochs. Only used when
            ``num_workers > 0``.

    Raises:
        TypeError: If ``batch_size`` or ``num_workers`` is not an integer.
        ValueError: If ``batch_size < 1`` or ``num_workers < 0``.
    """

    batch_size: int
    num_workers: int
    pin_memory: bool | None = None
    persistent_workers: bool = True

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, 1)
        check_int("num_workers", self.num_workers, 0)

    def resolved_pin_memory(self) -> bool:
        """Return the effective ``pin_memory`` flag, resolving ``None`` from CUDA availability."""
        if self.pin_memory is None:
            return torch.cuda.is_available()
        return bool(self.pin_memory)

    def build(self, dataset: Dataset, *, shuffle: bool) -> DataLoader:
        """Build a DataLoader over ``dataset`` with these settings.

        Under distributed training Lightning replaces the sampler with a distributed one, so
        ``shuffle`` only states the intent for the training loader.
        """
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.resolved_pin_memory(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )


class TransformedSubset(Dataset):
    """Selected samples of an ``(image, label)`` dataset, with a transform applied to each image.

    Two subsets over one base dataset can use different transforms, so a part held out of the
    training set is evaluated without augmentation.

    Args:
        dataset: Base dataset returning ``(image, label)`` pairs without a transform of its own.
        indices: Indices of the selected samples, or ``None`` for all of them.
        transform: Transform applied to each image.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int] | np.ndarray | None, transform: Callable) -> None:
        self.dataset = dataset
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[int(self.indices[index])]
        return self.transform(image), label


def _largest_remainder(size: int, counts: np.ndarray) -> np.ndarray:
    """Share ``size`` items across classes in proportion to ``counts``, rounding by largest remainder.

    Integer arithmetic keeps the result exact. Ties in the remainder go to the lower class index.
    """
    total = int(counts.sum())
    base = size * counts // total
    remainders = size * counts % total
    missing = size - int(base.sum())
    order = np.argsort(-remainders, kind="stable")
    base[order[:missing]] += 1
    return base


def check_every_class_trains(
    labels: Sequence[int] | np.ndarray, num_classes: int, advice: str, names: Sequence[str] | None = None
) -> None:
    """Raise if some of the ``num_classes`` classes has no image among the training ``labels``.

    Args:
        labels: Class label of every training image in use.
        num_classes: Number of classes the model predicts.
        advice: What to change, appended to the error message.
        names: Class names to show in the message (for example folder names); the labels when omitted.

    Raises:
        ValueError: If a class has no training image.
    """
    present = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    missing = np.flatnonzero(present == 0)
    if missing.size:
        missing_names = [str(names[label]) if names is not None else str(int(label)) for label in missing[:10]]
        listed = ", ".join(missing_names) + (", ..." if missing.size > 10 else "")
        raise ValueError(
            f"{missing.size} of {num_classes} classes have no training image ({listed}), so the model could never "
            f"learn them. {advice}"
        )


def stratified_split(labels: Sequence[int] | np.ndarray, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Split sample indices into parts of the given sizes, keeping each class's share in every part.

    Each part receives from every class a number of samples proportional to the class frequency,
    rounded by the largest-remainder method, so part sizes are exact. Within each class the
    indices are shuffled by a ``numpy.random.Generator`` seeded with ``seed`` (no global random
    state), so the split is the same in every process and on every machine with the same NumPy
    release.

    Args:
        labels: Class label of every sample.
        sizes: Requested size of each part.
        seed: Seed of the shuffle.

    Returns:
        One sorted index array per requested part, followed by one with the remaining indices.

    Raises:
        ValueError: If the sizes are negative or a class has fewer samples than its parts need.
    """
    labels = np.asarray(labels, dtype=np.int64)
    for position, size in enumerate(sizes):
        check_int(f"sizes[{position}]", size, 0, len(labels))
    if sum(sizes) > len(labels):
        raise ValueError(f"The requested part sizes {list(sizes)} add up to more than the {len(labels)} samples.")

    classes, counts = np.unique(labels, return_counts=True)
    per_class = np.zeros((len(sizes), len(classes)), dtype=np.int64)
    for part, size in enumerate(sizes):
        per_class[part] = _largest_remainder(size, counts)
    short = per_class.sum(axis=0) > counts
    if short.any():
        bad = int(classes[np.argmax(short)])
        raise ValueError(
            f"Class {bad} has {int(counts[classes == bad][0])} sample(s), fewer than the "
            f"{int(per_class.sum(axis=0)[classes == bad][0])} that parts of sizes {list(sizes)} need."
        )

    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(sizes) + 1)]
    for class_position, label in enumerate(classes):
        members = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for part, take in enumerate(per_class[:, class_position]):
            parts[part].append(members[start : start + take])
            start += take
        parts[-1].append(members[start:])

    return [np.sort(np.concatenate(chunks)) for chunks in parts]


def check_image_tree(folder: Path, role: str, layout: str) -> list[str]:
    """Check that ``folder`` contains class sub-folders with images and return the sorted class names.

    Args:
        folder: Folder expected to contain one sub-folder per class.
        role: Name of the split for the error message, for example ``"training"``.
        layout: Expected directory layout, quoted in the error message.

    Raises:
        FileNotFoundError: If the folder is missing, has no class sub-folders, or a class
            sub-folder has no image file.
    """
    hint = f"Expected the layout {layout}."
    if not folder.is_dir():
        raise FileNotFoundError(f"The {role} folder {str(folder)!r} does not exist. {hint}")

    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"The {role} folder {str(folder)!r} contains no class sub-folders. {hint}")

    for name in classes:
        if not any(_is_image(path) for path in (folder / name).iterdir()):
            raise FileNotFoundError(
                f"The class folder {str(folder / name)!r} contains no image files "
                f"(accepted extensions: {', '.join(IMG_EXTENSIONS)}). {hint}"
            )
    return classes


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMG_EXTENSIONS
