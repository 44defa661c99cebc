"""Flatness measurements around a model's current weights.

The functions here need only PyTorch. They measure the training loss near the current weights θ:

* :func:`filter_normalized_direction` draws a random direction d scaled filter by filter to the
  weights, as in Li et al., "Visualizing the Loss Landscape of Neural Nets" (NeurIPS 2018).
  :func:`loss_curve` evaluates L(θ + α·d) along it, and :func:`curve_sharpness` reduces the curve
  to one number.
* :func:`hessian_top_eigenvalue` runs power iteration on the Hessian of L, and :func:`hessian_trace`
  estimates its trace with Hutchinson's estimator. Both use Hessian-vector products computed by
  double backward, so the Hessian is never formed.

Every function evaluates the same objective on a fixed list of ``(inputs, targets)`` batches:
L(θ) = Σ_b n_b·ℓ_b(θ) / Σ_b n_b, where ℓ_b = ``loss_fn(model(inputs_b), targets_b)`` and n_b is the
number of targets in batch b. When ``loss_fn`` averages over its batch, as
:func:`torch.nn.functional.cross_entropy` does by default, L is the mean loss per sample of the
whole subset. :func:`fixed_batches` draws such a subset from a dataset with a seed, so repeated
measurements see the same samples.

The model runs in eval mode by default: BatchNorm uses its running statistics and dropout is off.
With ``train_mode=True`` the model runs in train mode instead. The buffers, such as BatchNorm's
running statistics, are then restored afterwards. Every function restores the weights and the
train/eval flag of every submodule on exit, also when it raises. The functions run in the
parameters' dtype and never enter an autocast region.

PyHessian (PyPI release 0.1 of 2021) offers the same two Hessian estimates. It is not used here.
It is licensed under GPL-3.0 while this project is Apache-2.0. Its random vectors come from the
global RNG without a seed argument, it writes into the parameters' ``.grad`` and leaves the model in
eval mode, and it takes a ``cuda`` flag in place of following the model's device.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

__all__ = [
    "CURVE_CSV_HEADER",
    "HessianTraceEstimate",
    "TopEigenvalue",
    "curve_sharpness",
    "filter_normalized_direction",
    "fixed_batches",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "load_curve_csv",
    "loss_curve",
    "save_curve_csv",
    "symmetric_alphas",
]

log = logging.getLogger(__name__)

LossFunction = Callable[[Tensor, Tensor], Tensor]
Batch = Sequence[Any]

CURVE_CSV_HEADER = ("alpha", "loss")
_IGNORE_CHOICES = ("biasbn", "none")
# Relative tolerance for "α = 0" and "the range is symmetric" in curve_sharpness. A float32
# torch.linspace(-1, 1, 21) puts its middle point at -1.5e-8, which must still count as zero.
_ALPHA_RELATIVE_TOLERANCE = 1e-6


class TopEigenvalue(NamedTuple):
    """Result of :func:`hessian_top_eigenvalue`."""

    eigenvalue: float
    """Signed Hessian eigenvalue of largest magnitude, as the final Rayleigh quotient vᵀHv."""
    iterations: int
    """Number of Hessian-vector products computed."""


class HessianTraceEstimate(NamedTuple):
    """Result of :func:`hessian_trace`."""

    trace: float
    """Mean of zᵀHz over the Rademacher samples z."""
    standard_error: float
    """Sample standard deviation of zᵀHz divided by √samples, or NaN for a single sample."""
    samples: int
    """Number of Rademacher vectors used."""


def fixed_batches(
    data: DataLoader | Dataset,
    num_batches: int,
    batch_size: int | None = None,
    seed: int = 0,
) -> list[Any]:
    """Draw a seeded random subset of a map-style dataset and collate it into batches.

    The samples are the first ``num_batches * batch_size`` entries of a permutation of the dataset
    drawn from a ``torch.Generator`` seeded with ``seed``, so the same seed gives the same samples.
    The dataset's items are read under a forked CPU RNG seeded with ``seed``. Random transforms that
    draw from ``torch``'s global generator are therefore repeatable and leave that generator as it
    was. Transforms that draw from NumPy or Python's ``random`` still advance those generators. A
    DataLoader is never iterated, so its sampler and workers are untouched.

    Args:
        data: A DataLoader, whose ``dataset``, ``collate_fn`` and ``batch_size`` are used, or a
            map-style dataset, collated with :func:`torch.utils.data.default_collate`.
        num_batches: Number of batches, at least 1.
        batch_size: Samples per batch, at least 1. ``None`` takes the DataLoader's ``batch_size``
            and is invalid for a bare dataset.
        seed: Seed of the permutation and of the RNG used while reading items.

    Returns:
        The collated batches, on the device where the dataset puts them (usually the CPU). When
        the dataset has fewer samples than requested, all of them are used, the last batch may be
        smaller, and a ``UserWarning`` is issued.

    Raises:
        TypeError: If ``data`` is an iterable-style dataset or has no ``__len__``.
        ValueError: If an argument is out of range or ``batch_size`` cannot be resolved.
    """
    _check_int("num_batches", num_batches, minimum=1)
    _check_int("seed", seed, minimum=None)
    dataset, collate_fn, batch_size = _resolve_dataset(data, batch_size)

    size = len(dataset)
    if size == 0:
        raise ValueError("Expected a non-empty dataset, but `data` has 0 samples.")
    requested = num_batches * batch_size
    if requested > size:
        warnings.warn(
            f"Requested {num_batches} batches of {batch_size} samples ({requested} samples), but the dataset "
            f"has only {size}, so all {size} samples are used.",
            UserWarning,
            stacklevel=2,
        )

    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(size, generator=generator)[:requested].tolist()

    batches = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(indices), batch_size):
            items = [dataset[index] for index in indices[start : start + batch_size]]
            batches.append(collate_fn(items))
    return batches


def _resolve_dataset(data: DataLoader | Dataset, batch_size: int | None) -> tuple[Dataset, Callable, int]:
    if isinstance(data, DataLoader):
        dataset, collate_fn = data.dataset, data.collate_fn
        if batch_size is None:
            batch_size = data.batch_size
            if batch_size is None:
                raise ValueError(
                    "The DataLoader has no `batch_size` because it uses a custom batch_sampler. Pass `batch_size` explicitly."
                )
    else:
        dataset, collate_fn = data, default_collate
        if batch_size is None:
            raise ValueError("Expected an int `batch_size` >= 1 for a dataset, but got None.")

    _check_int("batch_size", batch_size, minimum=1)
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise TypeError(
            f"Expected a map-style dataset with `__len__` and `__getitem__`, but got {type(dataset).__name__}. "
            "A seeded subset needs random access to the samples."
        )
    return dataset, collate_fn, batch_size


def filter_normalized_direction(
    model: nn.Module,
    seed: int,
    ignore: Literal["biasbn", "none"] = "biasbn",
) -> list[Tensor]:
    """Draw a random Gaussian direction scaled filter by filter to the model's weights.

    This is the filter normalisation of Li et al., "Visualizing the Loss Landscape of Neural Nets"
    (NeurIPS 2018). A standard normal tensor g is drawn for every parameter w, in the order of
    ``model.parameters()``, from one CPU ``torch.Generator`` seeded with ``seed``. Each g is drawn
    in float32 whatever the parameter's dtype, so a model of the same architecture gets the same
    draw in float32 and float64. The direction entry d for w is then:

    * A parameter with 2 or more dimensions: each slice along dimension 0, ``g[i]``, is rescaled
      to ``g[i] * ‖w[i]‖ / ‖g[i]‖``, so ``‖d[i]‖ = ‖w[i]‖``. Dimension 0 is the output filter of a
      convolution weight and the output neuron (row) of a linear weight. For a transposed
      convolution, whose weight is ``(in, out, ...)``, it is the input channel. A filter whose
      weights are zero gets a zero direction.
    * A parameter with 0 or 1 dimension (biases, BatchNorm and LayerNorm weights and biases):
      with ``ignore="biasbn"`` d is zero, as with ``ignore='biasbn'`` in the reference code of Li
      et al. With ``ignore="none"`` the whole tensor is one filter, ``d = g * ‖w‖ / ‖g‖``. (That
      reference code copies w itself into d in this case.)
    * A parameter with ``requires_grad=False``: d is zero, because training does not move it.

    The norms are computed in float64 for float64 parameters and in float32 otherwise. The result
    is cast to each parameter's dtype and device.

    Args:
        model: Model whose parameters set the scale of the direction.
        seed: Seed of the Gaussian draw. The same seed and architecture give the same direction.
        ignore: ``"biasbn"`` to zero the 0-D and 1-D parameters, ``"none"`` to scale them as one
            filter each.

    Returns:
        One tensor per entry of ``model.parameters()``, with its shape, dtype and device.

    Raises:
        ValueError: If ``ignore`` is not one of ``"biasbn"`` and ``"none"``, or ``seed`` is not an int.
    """
    _check_int("seed", seed, minimum=None)
    if ignore not in _IGNORE_CHOICES:
        raise ValueError(f"Expected `ignore` to be one of {_IGNORE_CHOICES}, but got {ignore!r}.")

    generator = torch.Generator().manual_seed(seed)
    direction = []
    with torch.no_grad():
        for parameter in model.parameters():
            # Draw for every parameter, also those set to zero below, so that the entry for a given
            # weight does not depend on `ignore` or on which parameters are frozen.
            gaussian = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            work_dtype = torch.float64 if parameter.dtype == torch.float64 else torch.float32
            weights = parameter.detach().to(device="cpu", dtype=work_dtype)
            entry = _normalize_entry(gaussian.to(work_dtype), weights, ignore, parameter.requires_grad)
            direction.append(entry.to(device=parameter.device, dtype=parameter.dtype))
    return direction


def _normalize_entry(gaussian: Tensor, weights: Tensor, ignore: str, trainable: bool) -> Tensor:
    if not trainable:
        return torch.zeros_like(gaussian)
    if weights.dim() <= 1:
        if ignore == "biasbn":
            return torch.zeros_like(gaussian)
        return gaussian * (weights.norm() / gaussian.norm().clamp_min(torch.finfo(gaussian.dtype).tiny))

    filter_dims = tuple(range(1, weights.dim()))
    weight_norms = torch.linalg.vector_norm(weights, dim=filter_dims, keepdim=True)
    gaussian_norms = torch.linalg.vector_norm(gaussian, dim=filter_dims, keepdim=True)
    return gaussian * (weight_norms / gaussian_norms.clamp_min(torch.finfo(gaussian.dtype).tiny))


def symmetric_alphas(radius: float, points: int) -> Tensor:
    """Return ``points`` evenly spaced step sizes from ``-radius`` to ``radius`` as float64.

    The grid is ``radius * k / m`` for ``k = -m, ..., m`` with ``m = (points - 1) / 2``, so the middle
    point is exactly 0 and the ends are exactly ``±radius``.

    Args:
        radius: Largest step size, finite and > 0.
        points: Odd number of points, at least 3.

    Raises:
        ValueError: If ``radius`` or ``points`` is out of range.
    """
    _check_positive_float("radius", radius)
    _check_int("points", points, minimum=3)
    if points % 2 == 0:
        raise ValueError(f"Expected an odd `points` so that the grid contains 0, but got {points}.")

    half = (points - 1) // 2
    return radius * torch.arange(-half, half + 1, dtype=torch.float64) / half


def loss_curve(
    model: nn.Module,
    loss_fn: LossFunction,
    batches: Sequence[Batch],
    direction: Sequence[Tensor],
    alphas: Sequence[float] | Tensor,
    *,
    train_mode: bool = False,
) -> tuple[Tensor, Tensor]:
    """Evaluate the loss L(θ + α·d) at each step size α along a direction d.

    The weights are set to ``θ + α·d`` in place for each α and copied back from a saved clone at the
    end, so on return they are bitwise equal to the weights before the call. At α = 0 the weights
    are θ exactly, so the loss equals the plain loss on the same batches.

    Args:
        model: Model to evaluate at its parameters θ.
        loss_fn: Called as ``loss_fn(model(inputs), targets)``. It must return the batch mean as a scalar.
        batches: Fixed list of ``(inputs, targets)`` pairs, for example from :func:`fixed_batches`.
            Tensors are moved to the device of the model's first parameter.
        direction: One tensor per entry of ``model.parameters()`` with the same shape, for example
            from :func:`filter_normalized_direction`.
        alphas: Step sizes, at least one, all finite.
        train_mode: ``False`` (the default) evaluates in eval mode, so BatchNorm uses its running
            statistics and dropout is off. ``True`` evaluates in train mode and restores the buffers
            afterwards. Dropout then draws from the global RNG.

    Returns:
        ``(alphas, losses)``: both 1-D float64 CPU tensors of the same length, in the order given.

    Raises:
        ValueError: If ``direction`` does not match the parameters, ``alphas`` is empty or not
            finite, ``batches`` is empty or malformed, or ``loss_fn`` does not return a scalar.
    """
    parameters = list(model.parameters())
    direction = _check_direction(parameters, direction)
    alphas = _check_alphas(alphas)
    batches = _check_batches(batches)

    originals = [parameter.detach().clone() for parameter in parameters]
    losses = torch.empty_like(alphas)
    try:
        with _evaluation_state(model, train_mode), torch.no_grad():
            for index, alpha in enumerate(alphas.tolist()):
                for parameter, original, step in zip(parameters, originals, direction):
                    parameter.copy_(torch.add(original, step, alpha=alpha))
                losses[index] = _mean_loss(model, loss_fn, batches).item()
    finally:
        with torch.no_grad():
            for parameter, original in zip(parameters, originals):
                parameter.copy_(original)
    return alphas, losses


def curve_sharpness(alphas: Sequence[float] | Tensor, losses: Sequence[float] | Tensor) -> float:
    """Return the mean loss increase at the two ends of a symmetric loss curve.

    sharpness = (L(-r) + L(r)) / 2 - L(0), where r is the largest step size. For a quadratic
    L(θ + α·d) = L(0) + c·α² this equals c·r², half the curvature along d times r². A larger value
    means a sharper minimum along d.

    Args:
        alphas: Step sizes from -r to r that include 0. Zero and the symmetry ``min = -max`` are
            checked to a relative tolerance of 1e-6 of r.
        losses: Losses at ``alphas``, same length.

    Raises:
        ValueError: If the lengths differ, there are fewer than 3 points, or the grid is not
            symmetric or does not contain 0.
    """
    alphas = torch.as_tensor(alphas, dtype=torch.float64).flatten()
    losses = torch.as_tensor(losses, dtype=torch.float64).flatten()
    if alphas.numel() != losses.numel() or alphas.numel() < 3:
        raise ValueError(
            f"Expected `alphas` and `losses` of the same length >= 3, but got {alphas.numel()} and {losses.numel()}."
        )

    radius = alphas.abs().max().item()
    lowest, highest = alphas.argmin().item(), alphas.argmax().item()
    center = alphas.abs().argmin().item()
    tolerance = _ALPHA_RELATIVE_TOLERANCE * radius
    if abs(alphas[lowest].item() + alphas[highest].item()) > tolerance or abs(alphas[center].item()) > tolerance:
        raise ValueError(
            "Expected `alphas` symmetric around 0 and containing 0, but got range "
            f"[{alphas[lowest].item()}, {alphas[highest].item()}] with the point nearest 0 at {alphas[center].item()}."
        )
    return ((losses[lowest] + losses[highest]) / 2 - losses[center]).item()


def hessian_top_eigenvalue(
    model: nn.Module,
    loss_fn: LossFunction,
    batches: Sequence[Batch],
    *,
    iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    train_mode: bool = False,
) -> TopEigenvalue:
    """Estimate the Hessian eigenvalue of largest magnitude by power iteration.

    The Hessian H is that of L with respect to the parameters with ``requires_grad=True``, and the
    other parameters are constants. The start vector is standard normal, drawn in float32 from a CPU generator seeded
    with ``seed``. Each iteration computes w = Hv by double backward, takes the Rayleigh quotient
    λ = vᵀw of the unit vector v, and sets v = w / ‖w‖. It stops when two successive λ differ by at
    most ``tol * max(|λ_k|, |λ_(k-1)|)``, or after ``iters`` products.

    Power iteration converges to the eigenvalue of largest absolute value, whatever its sign. A
    negative result means the most curved direction is one of negative curvature (the weights are
    not at a minimum), and it is returned with its sign. When the largest positive and negative
    eigenvalues have the same magnitude, the iteration does not separate them and the result lies
    between the two. Convergence slows as the second largest magnitude approaches the first.

    Args:
        model: Model whose parameters define H.
        loss_fn: Called as ``loss_fn(model(inputs), targets)``. It must return the batch mean as a scalar.
        batches: Fixed list of ``(inputs, targets)`` pairs.
        iters: Maximum number of Hessian-vector products, at least 1.
        tol: Relative tolerance on successive eigenvalue estimates, > 0.
        seed: Seed of the start vector.
        train_mode: Evaluate in train mode instead of eval mode (see :func:`loss_curve`).

    Returns:
        The eigenvalue estimate and the number of Hessian-vector products. A ``RuntimeWarning`` is
        issued when the tolerance was not reached within ``iters``.

    Raises:
        ValueError: If an argument is out of range, the model has no trainable parameters, or
            ``loss_fn`` does not return a scalar.
        RuntimeError: If called under ``torch.inference_mode``, where no graph can be built.
    """
    _check_int("iters", iters, minimum=1)
    _check_positive_float("tol", tol)
    _check_int("seed", seed, minimum=None)
    parameters = _trainable_parameters(model)
    batches = _check_batches(batches)
    _check_autograd_available()

    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) for p in parameters]
    vector = _scale(vector, 1.0 / _norm(vector))

    eigenvalue, previous, converged = 0.0, None, False
    iteration = 0
    with _evaluation_state(model, train_mode), torch.enable_grad():
        for iteration in range(1, iters + 1):
            product = _hessian_vector_product(model, loss_fn, batches, parameters, vector)
            eigenvalue = _dot(vector, product)
            norm = _norm(product)
            if norm == 0.0:
                # A random start vector is orthogonal to no eigenvector almost surely, so Hv = 0
                # means H = 0 up to rounding.
                converged = True
                break
            vector = _scale(product, 1.0 / norm)
            if previous is not None and abs(eigenvalue - previous) <= tol * max(abs(eigenvalue), abs(previous)):
                converged = True
                break
            previous = eigenvalue

    if not converged:
        warnings.warn(
            f"Power iteration did not reach the relative tolerance {tol} in {iters} iterations. "
            f"The last estimate is {eigenvalue}. Increase `iters` or `tol`.",
            RuntimeWarning,
            stacklevel=2,
        )
    log.debug("Top Hessian eigenvalue %s after %d iterations", eigenvalue, iteration)
    return TopEigenvalue(eigenvalue=eigenvalue, iterations=iteration)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFunction,
    batches: Sequence[Batch],
    *,
    samples: int = 100,
    seed: int = 0,
    train_mode: bool = False,
) -> HessianTraceEstimate:
    """Estimate the trace of the Hessian with Hutchinson's estimator.

    For Rademacher vectors z (entries ±1 with equal probability), E[zᵀHz] = tr(H). The estimate is
    the mean of zᵀHz over ``samples`` vectors drawn from a CPU generator seeded with ``seed``. Its
    variance per sample is 2·Σ_(i≠j) H_ij², so the estimate is exact for a diagonal Hessian. H is
    taken with respect to the parameters with ``requires_grad=True``.

    Args:
        model: Model whose parameters define H.
        loss_fn: Called as ``loss_fn(model(inputs), targets)``. It must return the batch mean as a scalar.
        batches: Fixed list of ``(inputs, targets)`` pairs.
        samples: Number of Rademacher vectors, at least 1.
        seed: Seed of the Rademacher vectors.
        train_mode: Evaluate in train mode instead of eval mode (see :func:`loss_curve`).

    Returns:
        The trace estimate with its standard error.

    Raises:
        ValueError: If an argument is out of range, the model has no trainable parameters, or
            ``loss_fn`` does not return a scalar.
        RuntimeError: If called under ``torch.inference_mode``.
    """
    _check_int("samples", samples, minimum=1)
    _check_int("seed", seed, minimum=None)
    parameters = _trainable_parameters(model)
    batches = _check_batches(batches)
    _check_autograd_available()

    generator = torch.Generator().manual_seed(seed)
    quadratic_forms = []
    with _evaluation_state(model, train_mode), torch.enable_grad():
        for _ in range(samples):
            vector = [_rademacher(p, generator) for p in parameters]
            product = _hessian_vector_product(model, loss_fn, batches, parameters, vector)
            quadratic_forms.append(_dot(vector, product))

    values = torch.tensor(quadratic_forms, dtype=torch.float64)
    standard_error = (values.std() / math.sqrt(samples)).item() if samples > 1 else math.nan
    return HessianTraceEstimate(trace=values.mean().item(), standard_error=standard_error, samples=samples)


def _rademacher(parameter: Tensor, generator: torch.Generator) -> Tensor:
    signs = torch.randint(0, 2, parameter.shape, generator=generator, dtype=torch.float32) * 2 - 1
    return signs.to(parameter)


def save_curve_csv(path: str | os.PathLike, alphas: Sequence[float] | Tensor, losses: Sequence[float] | Tensor) -> None:
    """Write a loss curve as a CSV file with the header ``alpha,loss``, one row per point.

    Values are written with Python's shortest round-trip ``repr``, so :func:`load_curve_csv` reads
    back the same float64 values. Parent directories are created.

    Raises:
        ValueError: If ``alphas`` and ``losses`` differ in length.
    """
    alphas = torch.as_tensor(alphas, dtype=torch.float64).flatten().tolist()
    losses = torch.as_tensor(losses, dtype=torch.float64).flatten().tolist()
    if len(alphas) != len(losses):
        raise ValueError(f"Expected `alphas` and `losses` of the same length, but got {len(alphas)} and {len(losses)}.")

    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CURVE_CSV_HEADER)
        writer.writerows((repr(alpha), repr(loss)) for alpha, loss in zip(alphas, losses))


def load_curve_csv(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Read a loss curve written by :func:`save_curve_csv` as two float64 tensors ``(alphas, losses)``.

    Raises:
        ValueError: If the header is not ``alpha,loss`` or a row does not hold two numbers.
    """
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or tuple(rows[0]) != CURVE_CSV_HEADER:
        header = rows[0] if rows else None
        raise ValueError(f"Expected the header {','.join(CURVE_CSV_HEADER)} in {os.fspath(path)!r}, but got {header}.")

    alphas, losses = [], []
    for line_number, row in enumerate(rows[1:], start=2):
        try:
            alpha, loss = (float(value) for value in row)
        except ValueError as error:
            raise ValueError(f"Invalid row {row} on line {line_number} of {os.fspath(path)!r}: {error}.") from error
        alphas.append(alpha)
        losses.append(loss)
    return torch.tensor(alphas, dtype=torch.float64), torch.tensor(losses, dtype=torch.float64)


@contextlib.contextmanager
def _evaluation_state(model: nn.Module, train_mode: bool) -> Iterator[None]:
    """Put the model in eval (or train) mode and restore every module's flag, and the buffers in train mode."""
    if not isinstance(train_mode, bool):
        raise ValueError(f"Expected `train_mode` to be a bool, but got {train_mode!r}.")

    modes = [(module, module.training) for module in model.modules()]
    saved_buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()] if train_mode else []
    model.train(train_mode)
    try:
        yield
    finally:
        # Set the flag per module, because calling `train(mode)` recurses and would overwrite
        # submodules whose flag differed from their parent's.
        for module, mode in modes:
            module.training = mode
        with torch.no_grad():
            for buffer, saved in saved_buffers:
                buffer.copy_(saved)


def _mean_loss(model: nn.Module, loss_fn: LossFunction, batches: Sequence[Batch]) -> Tensor:
    device = _model_device(model)
    total = sum(_batch_length(batch) for batch in batches)
    mean = None
    for batch in batches:
        loss, length = _batch_loss(model, loss_fn, batch, device)
        term = loss * (length / total)
        mean = term if mean is None else mean + term
    return mean


def _batch_loss(model: nn.Module, loss_fn: LossFunction, batch: Batch, device: torch.device) -> tuple[Tensor, int]:
    inputs, targets = _move_to_device(batch[0], device), _move_to_device(batch[1], device)
    loss = loss_fn(model(inputs), targets)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"Expected `loss_fn` to return a scalar tensor (a batch mean), but got {shape}.")
    return loss.reshape(()), _batch_length(batch)


def _hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFunction,
    batches: Sequence[Batch],
    parameters: list[Tensor],
    vector: list[Tensor],
) -> list[Tensor]:
    """Compute Hv for the weighted mean loss, one batch at a time so that only one graph is alive."""
    device = _model_device(model)
    total = sum(_batch_length(batch) for batch in batches)
    product = [torch.zeros_like(parameter) for parameter in parameters]
    for batch in batches:
        loss, length = _batch_loss(model, loss_fn, batch, device)
        gradients = torch.autograd.grad(loss, parameters, create_graph=True, allow_unused=True)
        terms = [(g * v).sum() for g, v in zip(gradients, vector) if g is not None and g.requires_grad]
        if not terms:
            # The gradient does not depend on the parameters, so this batch's Hessian is zero.
            continue
        second = torch.autograd.grad(sum(terms[1:], terms[0]), parameters, allow_unused=True)
        for accumulated, entry in zip(product, second):
            if entry is not None:
                accumulated.add_(entry.detach(), alpha=length / total)
    return product


def _dot(first: Sequence[Tensor], second: Sequence[Tensor]) -> float:
    # Accumulate in float64 with one host synchronisation. MPS has no float64, so it stays in float32.
    sums = [(a.to(_accumulation_dtype(a)) * b.to(_accumulation_dtype(a))).sum() for a, b in zip(first, second)]
    return torch.stack(sums).sum().item()


def _accumulation_dtype(tensor: Tensor) -> torch.dtype:
    return torch.float32 if tensor.device.type == "mps" else torch.float64


def _norm(vector: Sequence[Tensor]) -> float:
    return math.sqrt(_dot(vector, vector))


def _scale(vector: Sequence[Tensor], factor: float) -> list[Tensor]:
    return [entry * factor for entry in vector]


def _trainable_parameters(model: nn.Module) -> list[Tensor]:
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if not parameters:
        raise ValueError("Expected a model with at least one parameter with requires_grad=True, but found none.")
    return parameters


def _check_autograd_available() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "Hessian-vector products need autograd, but torch.inference_mode is enabled. Call outside of it."
        )


def _check_direction(parameters: list[Tensor], direction: Sequence[Tensor]) -> list[Tensor]:
    direction = list(direction)
    if len(direction) != len(parameters):
        raise ValueError(
            f"Expected one direction tensor per model parameter ({len(parameters)}), but got {len(direction)}."
        )
    checked = []
    for index, (parameter, entry) in enumerate(zip(parameters, direction)):
        if tuple(entry.shape) != tuple(parameter.shape):
            raise ValueError(
                f"Expected direction entry {index} of shape {tuple(parameter.shape)}, but got {tuple(entry.shape)}."
            )
        checked.append(entry.detach().to(device=parameter.device, dtype=parameter.dtype))
    return checked


def _check_alphas(alphas: Sequence[float] | Tensor) -> Tensor:
    alphas = torch.as_tensor(alphas, dtype=torch.float64).detach().cpu().flatten().clone()
    if alphas.numel() == 0 or not torch.isfinite(alphas).all():
        raise ValueError(f"Expected a non-empty sequence of finite `alphas`, but got {alphas.tolist()}.")
    return alphas


def _check_batches(batches: Sequence[Batch]) -> list[Batch]:
    batches = list(batches)
    if not batches:
        raise ValueError("Expected at least one batch in `batches`, but got none.")
    for index, batch in enumerate(batches):
        if isinstance(batch, Mapping) or not isinstance(batch, Sequence) or len(batch) != 2:
            raise ValueError(f"Expected batch {index} to be an (inputs, targets) pair, but got {type(batch).__name__}.")
        if _batch_length(batch) == 0:
            raise ValueError(f"Expected batch {index} to contain at least one target, but it has none.")
    return batches


def _batch_length(batch: Batch) -> int:
    targets = batch[1]
    if isinstance(targets, Tensor):
        return targets.shape[0] if targets.dim() > 0 else 1
    return len(targets)


def _move_to_device(data: Any, device: torch.device) -> Any:
    if isinstance(data, Tensor):
        return data.to(device)
    if isinstance(data, Mapping):
        return {key: _move_to_device(value, device) for key, value in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(_move_to_device(value, device) for value in data))
    if isinstance(data, (list, tuple)):
        return type(data)(_move_to_device(value, device) for value in data)
    return data


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _check_int(name: str, value: object, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        accepted = "an int" if minimum is None else f"an int >= {minimum}"
        raise ValueError(f"Expected `{name}` to be {accepted}, but got {value!r}.")


def _check_positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Expected `{name}` to be a finite number > 0, but got {value!r}.")
