"""Tests of the data modules and their shared loader helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_vdm.data._loaders import LoaderSettings, check_int, stratified_split
from lightning_vdm.data.digits import DigitsDataModule

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
        ({"val_size": 900, "test_size": 897}, r"`val_size \+ test_size` must be less than the 1797 .* 900 \+ 897 = 1797"),
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
