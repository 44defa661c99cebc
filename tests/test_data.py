"""Tests of the data modules and their shared loader helpers."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision import datasets

from lightning_vdm.data._loaders import LoaderSettings, check_int, stratified_split
from lightning_vdm.data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100DataModule,
    CIFAR10DataModule,
    cifar_train_transform,
)
from lightning_vdm.data.digits import DigitsDataModule
from lightning_vdm.data.image_folder import ImageFolderDataModule
from lightning_vdm.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, ImageNetDataModule

SEED = 0


# --- shared helpers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0, "num_workers": 0}, ValueError, r"`batch_size` must be an integer >= 1, got 0"),
        ({"batch_size": 8, "num_workers": -1}, ValueError, r"`num_workers` must be an integer >= 0, got -1"),
        ({"batch_size": 2.5, "num_workers": 0}, TypeError, r"`batch_size` must be an integer, got 2.5"),
        ({"batch_size": True, "num_workers": 0}, TypeError, r"`batch_size` must be an integer"),
    ],
    ids=["batch-zero", "workers-negative", "batch-float", "batch-bool"],
)
def test_loader_settings_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoaderSettings(**kwargs)


def test_loader_settings_flags():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))

    in_process = LoaderSettings(batch_size=4, num_workers=0, pin_memory=None).build(dataset, shuffle=False)
    assert in_process.pin_memory is torch.cuda.is_available()
    assert in_process.persistent_workers is False

    workers = LoaderSettings(batch_size=4, num_workers=2, pin_memory=False).build(dataset, shuffle=True)
    assert workers.pin_memory is False
    assert workers.persistent_workers is True
    assert workers.batch_size == 4


def test_check_int_range_message():
    with pytest.raises(ValueError, match=r"`size` must be an integer in \[1, 5\], got 7"):
        check_int("size", 7, 1, 5)


def test_stratified_split_exact_shares():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    first, second, rest = stratified_split(labels, [10, 25], seed=SEED)

    assert (len(first), len(second), len(rest)) == (10, 25, 65)
    # 10 shared 50:30:20 is exactly 5, 3, 2. For 25 the quotas 12.5, 7.5, 5 leave one image, and
    # the tie between the two halves goes to the lower class index.
    assert np.bincount(labels[first], minlength=3).tolist() == [5, 3, 2]
    assert np.bincount(labels[second], minlength=3).tolist() == [13, 7, 5]
    assert np.union1d(np.union1d(first, second), rest).tolist() == list(range(100))


def test_stratified_split_class_too_small():
    # Each part of size 1 goes to class 0 by the tie rule, but class 0 has only one sample.
    labels = np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"Class 0 has 1 sample\(s\), fewer than the 2"):
        stratified_split(labels, [1, 1], seed=SEED)


# --- digits --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    module = DigitsDataModule(split_seed=SEED)
    module.setup("fit")
    return module


@pytest.fixture(scope="module")
def digit_labels():
    return load_digits().target


def test_digits_split_sizes(digits):
    assert len(digits.train_indices) == 1257
    assert len(digits.val_indices) == 180
    assert len(digits.test_indices) == 360
    assert len(digits.train_dataloader().dataset) == 1257


def test_digits_split_disjoint(digits):
    train, val, test = set(digits.train_indices), set(digits.val_indices), set(digits.test_indices)

    assert not train & val
    assert not train & test
    assert not val & test
    assert train | val | test == set(range(1797))


@pytest.mark.parametrize(("split", "size"), [("val", 180), ("test", 360)], ids=["val", "test"])
def test_digits_split_stratified(digits, digit_labels, split, size):
    indices = getattr(digits, f"{split}_indices")
    counts = np.bincount(digit_labels[indices], minlength=10)
    expected = size * np.bincount(digit_labels) / len(digit_labels)

    assert counts.min() > 0
    # Largest-remainder rounding keeps every class within one image of its exact share.
    assert np.abs(counts - expected).max() < 1.0


def test_digits_split_deterministic(digits):
    again = DigitsDataModule(split_seed=SEED)
    again.setup("fit")
    other_seed = DigitsDataModule(split_seed=SEED + 1)
    other_seed.setup("fit")

    assert np.array_equal(again.train_indices, digits.train_indices)
    assert np.array_equal(again.val_indices, digits.val_indices)
    assert np.array_equal(again.test_indices, digits.test_indices)
    assert not np.array_equal(other_seed.val_indices, digits.val_indices)


def test_digits_normalisation(digits):
    images = digits.train_dataloader().dataset.images.to(torch.float64)

    assert images.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert images.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)

    # Independent check of the statistics from the raw pixels 0..16.
    raw = load_digits().images[digits.train_indices] / 16.0
    assert digits.mean == pytest.approx(raw.mean(), rel=1e-12)
    assert digits.std == pytest.approx(raw.std(), rel=1e-12)


def test_digits_batch(digits):
    images, labels = next(iter(digits.train_dataloader()))

    assert images.shape == (64, 1, 8, 8)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert labels.min() >= 0
    assert labels.max() <= 9
    assert digits.num_classes == 10
    assert digits.image_shape == (1, 8, 8)


def test_digits_eval_order_and_values(digits):
    images, labels = next(iter(digits.test_dataloader()))
    raw = load_digits()
    first = digits.test_indices[:64]

    expected = (torch.from_numpy(raw.images[first] / 16.0).unsqueeze(1) - digits.mean) / digits.std
    assert torch.allclose(images.to(torch.float64), expected, atol=1e-6)
    assert labels.tolist() == raw.target[first].tolist()


def test_digits_augment_shifts(digits):
    torch.manual_seed(SEED)
    augmented = DigitsDataModule(split_seed=SEED, augment=True)
    augmented.setup("fit")
    plain = digits.train_dataloader().dataset
    shifted = augmented.train_dataloader().dataset
    background = -digits.mean / digits.std

    image, label = shifted[0]
    original = plain[0][0]
    assert label == plain[0][1]

    # Every output equals the original translated by (dy, dx) in {-1, 0, 1}², padded with background.
    padded = torch.nn.functional.pad(original, (1, 1, 1, 1), value=background)
    candidates = [padded[:, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
    assert any(torch.allclose(image, candidate, atol=1e-6) for candidate in candidates)

    # Over many draws, more than one translation occurs.
    seen = {tuple(shifted[0][0].flatten().tolist()) for _ in range(40)}
    assert len(seen) > 1

    # Validation images are never shifted.
    assert torch.equal(augmented.val_dataloader().dataset[0][0], digits.val_dataloader().dataset[0][0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"val_size": 900, "test_size": 897},
            r"`val_size \+ test_size` must be less than the 1797 .* 900 \+ 897 = 1797",
        ),
        ({"val_size": 0}, r"`val_size` must be an integer in \[1, 1796\], got 0"),
        ({"test_size": 1797}, r"`test_size` must be an integer in \[1, 1796\], got 1797"),
        ({"batch_size": 0}, r"`batch_size` must be an integer >= 1, got 0"),
    ],
    ids=["sizes-sum", "val-zero", "test-too-large", "batch-zero"],
)
def test_digits_rejects_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_digits_no_training_left():
    module = DigitsDataModule(val_size=1000, test_size=790)
    with pytest.raises(ValueError, match=r"leave no training images for classes \[4, 6, 7\]"):
        module.setup("fit")


def test_digits_from_class_path():
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    config = parser.parse_object(
        {"data": {"class_path": "lightning_vdm.data.digits.DigitsDataModule", "init_args": {"batch_size": 32}}}
    )
    module = _instantiate(parser, config).data

    assert isinstance(module, DigitsDataModule)
    assert module.loader.batch_size == 32
    assert module.val_size == 180


# --- CIFAR ---------------------------------------------------------------------------------

CIFAR_FORMATS = {
    "cifar10": {
        "module": CIFAR10DataModule,
        "dataset": datasets.CIFAR10,
        "train_files": [f"data_batch_{number}" for number in range(1, 6)],
        "test_files": ["test_batch"],
        "meta": ("batches.meta", "label_names"),
        "label_key": "labels",
        "per_file": 20,
    },
    "cifar100": {
        "module": CIFAR100DataModule,
        "dataset": datasets.CIFAR100,
        "train_files": ["train"],
        "test_files": ["test"],
        "meta": ("meta", "fine_label_names"),
        "label_key": "fine_labels",
        "per_file": 200,
    },
}


def write_fake_cifar(root: Path, name: str) -> tuple[type, dict[str, np.ndarray]]:
    """Write a small CIFAR tree in torchvision's pickled format and return a data module class for it.

    The generated files cannot match torchvision's published MD5 sums, so the returned module uses
    a torchvision dataset subclass whose public ``train_list``, ``test_list`` and ``meta`` carry the
    MD5 sums of the generated files. torchvision's own integrity check and loading code then run
    unchanged.
    """
    spec = CIFAR_FORMATS[name]
    base = spec["dataset"]
    num_classes = spec["module"].num_classes
    folder = root / base.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    pixels = {}

    def dump(file_name: str, content: dict) -> list[str]:
        path = folder / file_name
        path.write_bytes(pickle.dumps(content))
        pixels[file_name] = content.get("data")
        return [file_name, hashlib.md5(path.read_bytes()).hexdigest()]

    def batch(count: int) -> dict:
        return {
            "data": rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8),
            spec["label_key"]: [index % num_classes for index in range(count)],
        }

    train_list = [dump(file_name, batch(spec["per_file"])) for file_name in spec["train_files"]]
    test_list = [dump(file_name, batch(spec["per_file"])) for file_name in spec["test_files"]]
    meta_file, meta_key = spec["meta"]
    meta_md5 = dump(meta_file, {meta_key: [f"class_{index}" for index in range(num_classes)]})[1]

    checksums = {
        "train_list": train_list,
        "test_list": test_list,
        "meta": {"filename": meta_file, "key": meta_key, "md5": meta_md5},
    }
    fake_dataset = type(f"Fake{base.__name__}", (base,), checksums)
    module_class = type(f"Fake{spec['module'].__name__}", (spec["module"],), {"dataset_class": fake_dataset})
    return module_class, pixels


def as_chw(flat: np.ndarray) -> torch.Tensor:
    """Turn a CIFAR row of 3072 bytes into a float64 (3, 32, 32) tensor in [0, 1]."""
    return torch.from_numpy(flat.reshape(3, 32, 32).astype(np.float64) / 255.0)


def normalise(image: torch.Tensor, mean, std) -> torch.Tensor:
    return (image - torch.tensor(mean, dtype=torch.float64)[:, None, None]) / torch.tensor(
        std, dtype=torch.float64
    )[:, None, None]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_batches(tmp_path, name):
    module_class, _ = write_fake_cifar(tmp_path, name)
    module = module_class(data_dir=str(tmp_path), batch_size=16, num_workers=0)
    module.setup("fit")
    spec = CIFAR_FORMATS[name]
    train_count = spec["per_file"] * len(spec["train_files"])

    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (16, 3, 32, 32)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert labels.min() >= 0
    assert labels.max() < module.num_classes
    assert module.image_shape == (3, 32, 32)
    assert len(module.train_set) == train_count
    # With val_split=0 the validation loader serves the test split.
    assert module.val_set.dataset is module.test_set.dataset
    assert len(module.val_dataloader().dataset) == spec["per_file"]


def test_cifar_test_transform_exact(tmp_path):
    module_class, pixels = write_fake_cifar(tmp_path, "cifar10")
    module = module_class(data_dir=str(tmp_path), num_workers=0)
    module.setup("test")

    image, label = module.test_set[3]
    expected = normalise(as_chw(pixels["test_batch"][3]), CIFAR10_MEAN, CIFAR10_STD)
    assert label == 3
    assert torch.allclose(image.to(torch.float64), expected, atol=1e-6)


def test_cifar_holdout_split(tmp_path):
    module_class, pixels = write_fake_cifar(tmp_path, "cifar10")
    module = module_class(data_dir=str(tmp_path), val_split=20, split_seed=SEED, num_workers=0)
    module.setup("fit")

    train_indices, val_indices = module.train_set.indices, module.val_set.indices
    assert len(train_indices) == 80
    assert len(val_indices) == 20
    assert not set(train_indices) & set(val_indices)
    val_labels = [module.val_set[position][1] for position in range(20)]
    assert np.bincount(val_labels, minlength=10).tolist() == [2] * 10

    # Held-out images use the test transform: normalisation only, no crop or flip.
    first = int(val_indices[0])
    expected = normalise(as_chw(pixels[f"data_batch_{first // 20 + 1}"][first % 20]), CIFAR10_MEAN, CIFAR10_STD)
    assert torch.allclose(module.val_set[0][0].to(torch.float64), expected, atol=1e-6)


def test_cifar_train_augmentation():
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    raw = rng.integers(1, 256, size=(32, 32, 3), dtype=np.uint8)
    transform = cifar_train_transform(CIFAR10_MEAN, CIFAR10_STD)

    source = torch.from_numpy(raw).permute(2, 0, 1).to(torch.float64) / 255.0
    padded = torch.nn.functional.pad(source, (4, 4, 4, 4), value=0.0)
    candidates = {}
    for dy in range(9):
        for dx in range(9):
            crop = padded[:, dy : dy + 32, dx : dx + 32]
            candidates[(dy - 4, dx - 4, False)] = normalise(crop, CIFAR10_MEAN, CIFAR10_STD)
            candidates[(dy - 4, dx - 4, True)] = normalise(crop.flip(-1), CIFAR10_MEAN, CIFAR10_STD)

    seen = set()
    for _ in range(60):
        output = transform(Image.fromarray(raw)).to(torch.float64)
        matches = [key for key, candidate in candidates.items() if torch.allclose(output, candidate, atol=1e-6)]
        # The random pixels make every (shift, flip) distinct, so exactly one candidate matches.
        assert len(matches) == 1
        seen.add(matches[0])

    assert {flipped for _, _, flipped in seen} == {False, True}
    assert max(max(abs(dy), abs(dx)) for dy, dx, _ in seen) > 0
    assert max(max(abs(dy), abs(dx)) for dy, dx, _ in seen) <= 4


def test_cifar_missing_files(tmp_path):
    module = CIFAR10DataModule(data_dir=str(tmp_path), num_workers=0)

    module.prepare_data()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*missing: data_batch_1.*`download: true`"):
        module.setup("fit")


def test_cifar_corrupted_file(tmp_path):
    module_class, _ = write_fake_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"damaged")

    with pytest.raises(RuntimeError, match=r"failed torchvision's MD5 check"):
        module_class(data_dir=str(tmp_path), num_workers=0).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"val_split": -1}, ValueError, r"`val_split` must be an integer >= 0, got -1"),
        ({"batch_size": 0}, ValueError, r"`batch_size` must be an integer >= 1, got 0"),
        ({"num_workers": 1.5}, TypeError, r"`num_workers` must be an integer, got 1.5"),
    ],
    ids=["val-negative", "batch-zero", "workers-float"],
)
def test_cifar_rejects_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        CIFAR10DataModule(**kwargs)


def test_cifar_holdout_too_large(tmp_path):
    module_class, _ = write_fake_cifar(tmp_path, "cifar10")
    with pytest.raises(ValueError, match=r"`val_split` must be less than the 100 training images, got 100"):
        module_class(data_dir=str(tmp_path), val_split=100, num_workers=0).setup("fit")


def test_cifar_holdout_leaves_class_empty(tmp_path):
    module_class, _ = write_fake_cifar(tmp_path, "cifar10")  # 10 training images per class
    module = module_class(data_dir=str(tmp_path), val_split=95, num_workers=0)

    with pytest.raises(ValueError, match=r"of 10 classes have no training image.*Lower `val_split` \(now 95\)"):
        module.setup("fit")


# --- image folders -------------------------------------------------------------------------


def write_jpeg_tree(root: Path, splits: dict[str, int], classes=("cat", "ant", "bee"), size=(20, 16)) -> None:
    """Write ``count`` random JPEG images of ``size`` (width, height) per class for each split."""
    rng = np.random.default_rng(SEED)
    width, height = size
    for split, count in splits.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for number in range(count):
                pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{number:03d}.jpg", quality=95)


def test_image_folder_batches(tmp_path):
    write_jpeg_tree(tmp_path, {"train": 6, "test": 2})
    module = ImageFolderDataModule(root=str(tmp_path), image_size=16, batch_size=4, num_workers=0)
    module.setup("fit")

    assert module.classes == ["ant", "bee", "cat"]
    assert module.num_classes == 3
    assert module.image_shape == (3, 16, 16)
    assert len(module.train_set) == 18
    assert len(module.val_set) == 6

    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (4, 3, 16, 16)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64


def test_image_folder_eval_exact(tmp_path):
    write_jpeg_tree(tmp_path, {"train": 2, "test": 2})
    module = ImageFolderDataModule(root=str(tmp_path), image_size=16, num_workers=0)
    module.setup("test")

    image, label = module.test_set[5]
    # Sorted order: ant/000, ant/001, bee/000, bee/001, cat/000, cat/001, so position 5 is cat/001.
    pixels = np.asarray(Image.open(tmp_path / "test" / "cat" / "001.jpg").convert("RGB"))
    # A 20×16 image already has shorter side 16, so only the centre crop drops 2 columns per side.
    source = torch.from_numpy(pixels[:, 2:18].astype(np.float64) / 255.0).permute(2, 0, 1)
    assert label == 2
    assert torch.allclose(image.to(torch.float64), normalise(source, CIFAR10_MEAN, CIFAR10_STD), atol=1e-6)


def test_image_folder_subsets(tmp_path):
    write_jpeg_tree(tmp_path, {"train": 6, "test": 4})
    module = ImageFolderDataModule(
        root=str(tmp_path), image_size=16, train_subset=12, test_subset=6, val_split=3, num_workers=0
    )
    module.setup("fit")
    train_labels = [module.train_set.dataset.targets[index] for index in module.train_set.indices]
    val_labels = [module.val_set.dataset.targets[index] for index in module.val_set.indices]
    test_labels = [module.test_set.dataset.targets[index] for index in module.test_set.indices]

    assert np.bincount(train_labels).tolist() == [3, 3, 3]
    assert np.bincount(val_labels).tolist() == [1, 1, 1]
    assert np.bincount(test_labels).tolist() == [2, 2, 2]
    assert module.val_set.dataset is module.train_set.dataset
    assert not set(module.train_set.indices) & set(module.val_set.indices)


def test_image_folder_subset_misses_class(tmp_path):
    write_jpeg_tree(tmp_path, {"train": 2, "test": 1})
    module = ImageFolderDataModule(root=str(tmp_path), image_size=16, train_subset=2, num_workers=0)

    with pytest.raises(ValueError, match=r"1 of 3 classes have no training image \((ant|bee|cat)\).*Raise `train_subset` \(now 2\)"):
        module.setup("fit")


def test_image_folder_worker_loader(tmp_path):
    write_jpeg_tree(tmp_path, {"train": 2, "test": 2})
    module = ImageFolderDataModule(root=str(tmp_path), image_size=16, batch_size=6, num_workers=1)

    loader = module.test_dataloader()
    images, labels = next(iter(loader))
    assert loader.persistent_workers is True
    assert images.shape == (6, 3, 16, 16)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    ("splits", "match"),
    [
        ({"train": 1}, r"The test folder '.*test' does not exist\. Expected the layout '<root>/train/<class>"),
        ({}, r"The training folder '.*train' does not exist"),
    ],
    ids=["test-missing", "train-missing"],
)
def test_image_folder_missing(tmp_path, splits, match):
    write_jpeg_tree(tmp_path, splits)
    with pytest.raises(FileNotFoundError, match=match):
        ImageFolderDataModule(root=str(tmp_path))


def test_image_folder_empty_class(tmp_path):
    write_jpeg_tree(tmp_path, {"train": 1, "test": 1})
    (tmp_path / "test" / "dog").mkdir()
    with pytest.raises(FileNotFoundError, match=r"The class folder '.*dog' contains no image files"):
        ImageFolderDataModule(root=str(tmp_path))


def test_image_folder_class_mismatch(tmp_path):
    write_jpeg_tree(tmp_path, {"train": 1})
    write_jpeg_tree(tmp_path, {"test": 1}, classes=("ant", "bee"))
    with pytest.raises(ValueError, match=r"only in train: \['cat'\]"):
        ImageFolderDataModule(root=str(tmp_path))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"std": (0.2, 0.0, 0.2)}, ValueError, r"`std` must be three positive finite numbers"),
        ({"mean": (0.5, 0.5)}, ValueError, r"`mean` must be three finite numbers .* got \(0.5, 0.5\)"),
        ({"image_size": 0}, ValueError, r"`image_size` must be an integer >= 1, got 0"),
        ({"train_subset": 100}, ValueError, r"`train_subset` must be at most the 3 images available, got 100"),
    ],
    ids=["std-zero", "mean-short", "size-zero", "subset-too-large"],
)
def test_image_folder_rejects(tmp_path, kwargs, error, match):
    write_jpeg_tree(tmp_path, {"train": 1, "test": 1})
    with pytest.raises(error, match=match):
        ImageFolderDataModule(root=str(tmp_path), num_workers=0, **kwargs).setup("fit")


# --- ImageNet ------------------------------------------------------------------------------


@pytest.fixture
def imagenet_tree(tmp_path):
    classes = ("n01440764", "n01443537", "n01484850")
    write_jpeg_tree(tmp_path, {"train": 4, "val": 2}, classes=classes, size=(300, 260))
    return tmp_path


@pytest.mark.parametrize("train_crop", ["random_resized", "random"])
def test_imagenet_shapes(imagenet_tree, train_crop):
    torch.manual_seed(SEED)
    module = ImageNetDataModule(data_dir=str(imagenet_tree), batch_size=4, train_crop=train_crop, num_workers=0)

    train_images, train_labels = next(iter(module.train_dataloader()))
    val_images, val_labels = next(iter(module.val_dataloader()))
    assert module.num_classes == 3
    assert module.image_shape == (3, 224, 224)
    assert train_images.shape == (4, 3, 224, 224)
    assert val_images.shape == (4, 3, 224, 224)
    assert train_labels.dtype == torch.int64
    assert val_labels.tolist() == [0, 0, 1, 1]
    assert len(module.test_dataloader().dataset) == 6


def test_imagenet_val_centre_crop(imagenet_tree):
    module = ImageNetDataModule(data_dir=str(imagenet_tree), num_workers=0)
    module.setup("validate")
    image, label = module.val_set[0]

    # Independent reference: PIL bilinear resize of the 300×260 image to shorter side 256, then the
    # central 224×224 window. torchvision resizes PIL images with PIL's bilinear filter.
    source = Image.open(imagenet_tree / "val" / "n01440764" / "000.jpg").convert("RGB")
    width = int(300 * 256 / 260)
    resized = np.asarray(source.resize((width, 256), Image.BILINEAR)).astype(np.float64) / 255.0
    left, top = int(round((width - 224) / 2.0)), int(round((256 - 224) / 2.0))
    window = torch.from_numpy(resized[top : top + 224, left : left + 224]).permute(2, 0, 1)
    assert label == 0
    assert torch.allclose(image.to(torch.float64), normalise(window, IMAGENET_MEAN, IMAGENET_STD), atol=1e-6)


def test_imagenet_missing_val(tmp_path):
    write_jpeg_tree(tmp_path, {"train": 1}, classes=("n01440764",))
    with pytest.raises(FileNotFoundError, match=r"The validation folder '.*val' does not exist\. .*<wnid>"):
        ImageNetDataModule(data_dir=str(tmp_path))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_crop": "center"}, r"`train_crop` must be one of \('random_resized', 'random'\), got 'center'"),
        ({"crop_size": 300}, r"`crop_size` \(300\) must not exceed `resize_size` \(256\)"),
        ({"batch_size": 0}, r"`batch_size` must be an integer >= 1, got 0"),
    ],
    ids=["crop-unknown", "crop-too-large", "batch-zero"],
)
def test_imagenet_rejects(imagenet_tree, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageNetDataModule(data_dir=str(imagenet_tree), **kwargs)


def test_digits_trainer_fit(tmp_path):
    import lightning.pytorch as pl

    class SoftmaxRegression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(64, 10)

        def forward(self, images):
            return self.linear(images.flatten(1))

        def training_step(self, batch, batch_index):
            images, labels = batch
            return torch.nn.functional.cross_entropy(self(images), labels)

        def validation_step(self, batch, batch_index):
            images, labels = batch
            accuracy = (self(images).argmax(dim=1) == labels).float().mean()
            self.log("val_accuracy", accuracy, batch_size=len(labels))

        def test_step(self, batch, batch_index):
            images, labels = batch
            accuracy = (self(images).argmax(dim=1) == labels).float().mean()
            self.log("test_accuracy", accuracy, batch_size=len(labels))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    pl.seed_everything(SEED, verbose=False)
    trainer = pl.Trainer(
        max_epochs=5,
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = DigitsDataModule(split_seed=SEED)
    model = SoftmaxRegression()
    trainer.fit(model, datamodule=data)
    val_accuracy = trainer.callback_metrics["val_accuracy"].item()
    result = trainer.test(model, datamodule=data, verbose=False)

    # Softmax regression on the normalised 8×8 digits is a well-separated problem: after five
    # epochs it classifies well over 90 % of the 360 test images.
    assert val_accuracy > 0.9
    assert result[0]["test_accuracy"] > 0.9


def _instantiate(parser, config):
    # jsonargparse 4.49 renamed `instantiate_classes` to `instantiate`; the older name still works there, with a warning.
    return parser.instantiate(config) if hasattr(parser, "instantiate") else parser.instantiate_classes(config)
