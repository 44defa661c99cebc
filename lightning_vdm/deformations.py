"""Vertical deformation mappings (VDMs) of a scalar training loss.

A VDM is a non-decreasing scalar function δ applied to the mini-batch loss ℓ before the backward pass,
so the parameter gradient becomes δ'(ℓ)·∇ℓ. The families come from Chen et al., "Deforming the Loss
Surface to Affect the Behaviour of the Optimizer" (AAAI 2021), Section 3.1: the arctan-power family
AP(a1, a2, a3, a4), the log-exp family LE(e1, e2), and the counter-example δ(ℓ) = 0.5·ℓ² of its Table 1.

Numeric policy:

* δ and δ' are computed in at least float32 whatever the loss dtype. The checked entry points
  (``deformation(loss)`` and :meth:`VerticalDeformation.derivative`) promote float16, bfloat16, integer
  and bool losses to float32 and keep float32 and float64 losses as they are (:func:`promote_loss`).
* The checked entry points raise :class:`DeformationDomainError` for a loss outside the deformation's
  domain, for a NaN or infinite loss, and for a result that overflows to ±inf although the loss is
  inside the domain. They never return NaN or Inf silently. They synchronise with the host once per
  call, because the decision to raise needs the value on the host.
* :meth:`VerticalDeformation.forward` and :meth:`VerticalDeformation.closed_form_derivative` neither
  promote nor check. They are for callers that check the domain themselves, for example by masking
  with :meth:`VerticalDeformation.in_domain`, which builds a boolean tensor without a host
  synchronisation.

Example:
    >>> import torch
    >>> deformation = parse_deformation("LE(1, 0.9)")
    >>> loss = torch.tensor(12.0, dtype=torch.float16)
    >>> deformation(loss).dtype
    torch.float32
    >>> round(float(deformation.derivative(loss)), 4)
    1.0
"""

from __future__ import annotations

import abc
import functools
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ArctanPower",
    "DeformationDomainError",
    "Identity",
    "LogExp",
    "Power",
    "VerticalDeformation",
    "as_deformation",
    "host_formulas_apply",
    "parse_deformation",
    "promote_loss",
    "stack_scalars",
]

_ACCEPTED_FORMS = "AP(a1, a2, a3, a4), LE(e1, e2), Power(scale, exponent), Identity()"


class DeformationDomainError(ValueError):
    """Raised when a deformation is evaluated at a loss outside its domain or its result is not finite."""


def promote_loss(loss: Tensor) -> Tensor:
    """Promote a loss tensor to a floating dtype of at least float32 precision.

    float16, bfloat16, integer and bool tensors become float32; float32 and float64 tensors are
    returned unchanged (the same object).

    Args:
        loss: Loss tensor of any shape.

    Raises:
        TypeError: If ``loss`` is not a tensor or has a complex dtype.
    """
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__}: {loss!r}")
    if loss.dtype in (torch.float32, torch.float64):
        return loss
    if loss.is_complex():
        raise TypeError(f"loss must have a real dtype, got {loss.dtype}")
    return loss.to(torch.float32)


def stack_scalars(tensors: Sequence[Tensor]) -> Tensor:
    """Stack single-element tensors into one 1-D tensor, each promoted as :func:`promote_loss` does.

    Tensors of one dtype and shape take a single ``torch.stack``. Otherwise each is promoted and reshaped first, so
    that an integer stacked with a float16 tensor does not become float16.

    Raises:
        ValueError: If ``tensors`` is empty or a tensor does not have exactly one element.
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack_scalars needs at least one tensor, got none.")
    dtype = tensors[0].dtype
    flat = None
    if all(tensor.dtype is dtype for tensor in tensors):
        try:
            # Stacking succeeds only for equal shapes, so every tensor has one element if the total count matches.
            flat = promote_loss(torch.stack(tensors).reshape(-1))
        except RuntimeError:  # shapes differ, such as () and (1,)
            pass
    if flat is None and all(tensor.numel() == 1 for tensor in tensors):
        flat = torch.cat([promote_loss(tensor).reshape(1) for tensor in tensors])
    if flat is None or flat.numel() != len(tensors):
        shapes = sorted({tuple(tensor.shape) for tensor in tensors})
        raise ValueError(f"stack_scalars needs tensors with one element each, got shapes {shapes}.")
    return flat


def _format_exact(value: float) -> str:
    """Format a coefficient so that parsing the text gives back the same float."""
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def _format_short(value: float) -> str:
    """Format a coefficient rounded to 6 significant digits."""
    return format(value, "g")


def _validate_coefficient(family: str, name: str, value: object, accepted: str, lower: float, inclusive: bool) -> float:
    """Convert a coefficient to float and check it is finite and above its lower bound.

    Args:
        family: Family symbol used in the message, e.g. ``"AP"``.
        name: Coefficient name used in the message, e.g. ``"a1"``.
        value: Value received.
        accepted: Human text of the accepted range, e.g. ``"> 0"``.
        lower: Lower bound of the accepted range.
        inclusive: Whether ``lower`` itself is accepted.

    Raises:
        TypeError: If ``value`` is not a real number (bool is rejected).
        ValueError: If ``value`` is not finite or is outside the accepted range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{family} coefficient {name} must be a real number {accepted}, got {type(value).__name__}: {value!r}")

    number = float(value)
    above = number >= lower if inclusive else number > lower
    if not math.isfinite(number) or not above:
        raise ValueError(f"{family} coefficient {name} must be a finite number {accepted}, got {number!r}")

    # Adding 0.0 turns -0.0 into 0.0, so equal deformations print and hash the same.
    return number + 0.0


_UNDEFINED = (math.nan, math.nan)
"""The pair :meth:`VerticalDeformation.value_and_derivative` returns outside the domain."""
_HOST_CONSISTENT_METHODS = ("forward", "closed_form_derivative", "in_domain")


class VerticalDeformation(abc.ABC):
    """Base class of a vertical deformation mapping δ applied elementwise to a loss tensor.

    A subclass only has to implement :meth:`forward`. The base class then provides the derivative
    through autograd, the checked entry points, equality, hashing, ``repr`` and :attr:`notation`.
    A subclass whose domain is narrower than "any finite loss" overrides :meth:`in_domain` and
    :attr:`domain` together. The built-in families also override :meth:`closed_form_derivative`
    with their closed form.

    Numeric policy: the checked entry points ``deformation(loss)`` and :meth:`derivative` promote
    float16, bfloat16, integer and bool losses to float32 (float32 and float64 are kept), and raise
    :class:`DeformationDomainError` for a loss outside the domain, a NaN or infinite loss, or a result
    that overflows, instead of returning NaN or Inf. They synchronise with the host once per call.
    :meth:`forward` and :meth:`closed_form_derivative` neither promote nor check.

    Attributes:
        symbol: Name of the family in the paper's notation, e.g. ``"AP"``. A subclass that does not
            set it gets its class name.
    """

    symbol: ClassVar[str] = "VerticalDeformation"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "symbol" not in cls.__dict__:
            cls.symbol = cls.__name__

    @property
    def coefficients(self) -> tuple[float, ...]:
        """Coefficients in the order of the paper's notation (empty by default)."""
        return ()

    @property
    def domain(self) -> str:
        """Human-readable text of the domain, e.g. ``"loss >= 0"``."""
        return "any finite loss"

    @property
    def notation(self) -> str:
        """Exact notation with full-precision coefficients, e.g. ``"AP(5.729577951308232, 1, 2, 1)"``.

        For the built-in families, :func:`parse_deformation` of this text returns an equal deformation.
        """
        return f"{self.symbol}({self._arguments_text(_format_exact)})"

    def _settings(self) -> dict[str, bool | int | float | str]:
        """Return the public attributes of plain types, where a subclass without ``coefficients`` keeps its settings."""
        if self.coefficients:
            return {}
        return {
            name: value
            for name, value in vars(self).items()
            if not name.startswith("_") and isinstance(value, (bool, int, float, str))
        }

    def _arguments_text(self, format_number: Callable[[float], str]) -> str:
        if self.coefficients:
            return ", ".join(format_number(value) for value in self.coefficients)
        settings = self._settings().items()
        return ", ".join(
            f"{name}={format_number(value) if isinstance(value, float) else repr(value)}" for name, value in settings
        )

    @abc.abstractmethod
    def forward(self, loss: Tensor) -> Tensor:
        """Compute δ(ℓ) elementwise, differentiably, without promotion or domain checks.

        Args:
            loss: Floating-point loss tensor. Values outside the domain give undefined results.
        """

    def closed_form_derivative(self, loss: Tensor) -> Tensor:
        """Compute δ'(ℓ) elementwise without promotion or domain checks.

        The base class differentiates :meth:`forward` with autograd, which is correct only when
        :meth:`forward` acts elementwise. It works under ``torch.no_grad`` and ``torch.inference_mode``
        too, and the returned tensor carries no autograd graph.

        Args:
            loss: Floating-point loss tensor. Values outside the domain give undefined results.
        """
        # Cloning outside inference mode turns an inference tensor into one autograd can track.
        with torch.inference_mode(False), torch.enable_grad():
            leaf = loss.detach().clone().requires_grad_(True)
            deformed = self.forward(leaf)
            (gradient,) = torch.autograd.grad(deformed, leaf, grad_outputs=torch.ones_like(deformed), allow_unused=True)

        if gradient is None:
            return torch.zeros_like(leaf).detach()
        return gradient

    def value_and_derivative(self, loss: float) -> tuple[float, float] | None:
        """Return δ(ℓ) and δ'(ℓ) of one Python float, computed in float64 on the host, or ``None``.

        ``VDMMixin`` uses this for a loss on the CPU, where reading it costs no synchronisation: two host floats and
        one scalar multiplication replace the operations and autograd nodes of :meth:`forward`. The built-in
        families implement it with :mod:`math`. The base class returns ``None``, and the mixin then differentiates
        :meth:`forward`. A subclass that implements it must return NaN for both values outside the domain, and the
        domain is decided in float64 here, so a float32 loss within one rounding of the bound may pass here and fail
        :meth:`in_domain`.

        The mixin ignores it when a subclass overrides :meth:`forward`, :meth:`closed_form_derivative` or
        :meth:`in_domain` below the class that defines it (see :func:`host_formulas_apply`), so a subclass of a
        built-in family that changes δ trains through :meth:`forward` until it defines this method too.

        Args:
            loss: The loss value.
        """
        return None

    def in_domain(self, loss: Tensor) -> Tensor:
        """Return a boolean tensor that is True where the loss is finite and inside the domain.

        The comparison runs on the loss's device and does not synchronise with the host.

        Args:
            loss: Loss tensor of any shape.
        """
        return torch.isfinite(loss)

    def check_domain(self, loss: Tensor) -> None:
        """Raise if any element of ``loss`` is non-finite or outside the domain.

        This synchronises with the host once.

        Args:
            loss: Loss tensor of any shape.

        Raises:
            DeformationDomainError: If an element is NaN, infinite or outside the domain. The message
                names the first offending value, the deformation and its domain.
        """
        inside = self.in_domain(loss)
        if bool(inside.all()):
            return
        raise DeformationDomainError(
            f"{self!r} is undefined at loss = {self._describe_first_invalid(loss, inside)}. "
            f"Its domain is {self.domain}. Check the loss for NaN or Inf, or choose coefficients "
            "whose domain contains every loss value."
        )

    def __call__(self, loss: Tensor) -> Tensor:
        """Compute δ(ℓ) after promoting the loss and checking its domain.

        Args:
            loss: Loss tensor of any shape.

        Raises:
            TypeError: If ``loss`` is not a real tensor.
            DeformationDomainError: If an element is outside the domain or non-finite, or δ overflows.
        """
        return self._evaluate_checked(loss, self.forward, "δ")

    def derivative(self, loss: Tensor) -> Tensor:
        """Compute δ'(ℓ) after promoting the loss and checking its domain.

        Args:
            loss: Loss tensor of any shape.

        Raises:
            TypeError: If ``loss`` is not a real tensor.
            DeformationDomainError: If an element is outside the domain or non-finite, or δ' overflows.
        """
        return self._evaluate_checked(loss, self.closed_form_derivative, "δ'")

    def _evaluate_checked(self, loss: Tensor, evaluate: Callable[[Tensor], Tensor], name: str) -> Tensor:
        """Promote, evaluate and check both the input domain and the result with one host synchronisation."""
        loss = promote_loss(loss)
        inside = self.in_domain(loss)

        # Evaluating before the check costs nothing on valid input and lets one synchronisation
        # cover both conditions. Values computed at invalid points are discarded by the raise.
        result = evaluate(loss)
        valid = inside & torch.isfinite(result)
        if bool(valid.all()):
            return result

        self.check_domain(loss)
        raise DeformationDomainError(
            f"{self!r} overflows: {name}(loss) is not finite at loss = {self._describe_first_invalid(loss, valid)} "
            f"although the loss is inside the domain {self.domain}. Compute the loss in float64 or choose "
            "coefficients that keep the result finite."
        )

    @staticmethod
    def _describe_first_invalid(loss: Tensor, valid: Tensor) -> str:
        """Describe the first element where ``valid`` is False: its value, index and the invalid count."""
        flat_valid = valid.detach().reshape(-1).cpu()
        flat_loss = loss.detach().reshape(-1).cpu()
        invalid_positions = torch.nonzero(~flat_valid).reshape(-1)
        first = int(invalid_positions[0])
        value = float(flat_loss[first])

        location = ""
        if loss.dim() > 0:
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), loss.shape))
            location = f" (element {index}, {invalid_positions.numel()} of {flat_loss.numel()} elements invalid)"

        return f"{value!r}{location}"

    def __repr__(self) -> str:
        return f"{self.symbol}({self._arguments_text(_format_short)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VerticalDeformation):
            return NotImplemented
        return (
            type(self) is type(other)
            and self.coefficients == other.coefficients
            and self._settings() == other._settings()
        )

    def __hash__(self) -> int:
        return hash((type(self), self.coefficients))


def host_formulas_apply(deformation: VerticalDeformation) -> bool:
    """Return whether ``deformation.value_and_derivative`` describes the same δ as its :meth:`forward`.

    True when the class that defines ``value_and_derivative`` is not the base class and is, or derives from, every
    class that defines ``forward``, ``closed_form_derivative`` and ``in_domain``.

    Args:
        deformation: The deformation to check.
    """
    return _host_formulas_apply(type(deformation))


def _defining_class(cls: type, name: str) -> type:
    """Return the first class in ``cls``'s method resolution order that defines the attribute ``name`` itself."""
    return next(base for base in cls.__mro__ if name in vars(base))


@functools.cache
def _host_formulas_apply(cls: type[VerticalDeformation]) -> bool:
    host = _defining_class(cls, "value_and_derivative")
    if host is VerticalDeformation:
        return False
    return all(issubclass(host, _defining_class(cls, name)) for name in _HOST_CONSISTENT_METHODS)


class ArctanPower(VerticalDeformation):
    r"""Arctan-power deformation AP(a1, a2, a3, a4).

    .. math::
        \delta(\ell) = a_1 \arctan(a_2 \ell)^{a_3} + a_4 \ell, \qquad
        \delta'(\ell) = \frac{a_1 a_3 a_2 \arctan(a_2 \ell)^{a_3 - 1}}{1 + (a_2 \ell)^2} + a_4

    Source: Chen et al., "Deforming the Loss Surface to Affect the Behaviour of the Optimizer"
    (AAAI 2021), Section 3.1. The text there requires all four coefficients to be > 0, but its Table 2
    uses AP(1.5, 0.7, 1, 0), so a4 = 0 is accepted. The domain is ℓ >= 0, or ℓ > 0 when a3 < 1
    because δ'(0) is then infinite. For a3 < 1 the derivative still grows without bound as ℓ → 0
    and overflows float32 for very small positive losses; the checked entry points raise there.

    Args:
        a1: Scale of the arctan term, > 0.
        a2: Loss scale inside the arctan, > 0.
        a3: Power of the arctan term, > 0.
        a4: Slope of the linear term, >= 0.

    Raises:
        TypeError: If a coefficient is not a real number.
        ValueError: If a coefficient is not finite or outside its range.
    """

    symbol: ClassVar[str] = "AP"

    def __init__(self, a1: float, a2: float, a3: float, a4: float = 0.0) -> None:
        self._coefficients = (
            _validate_coefficient("AP", "a1", a1, "> 0", 0.0, inclusive=False),
            _validate_coefficient("AP", "a2", a2, "> 0", 0.0, inclusive=False),
            _validate_coefficient("AP", "a3", a3, "> 0", 0.0, inclusive=False),
            _validate_coefficient("AP", "a4", a4, ">= 0", 0.0, inclusive=True),
        )

    @property
    def coefficients(self) -> tuple[float, ...]:
        """Coefficients ``(a1, a2, a3, a4)``."""
        return self._coefficients

    @property
    def a1(self) -> float:
        """Scale of the arctan term."""
        return self._coefficients[0]

    @property
    def a2(self) -> float:
        """Loss scale inside the arctan."""
        return self._coefficients[1]

    @property
    def a3(self) -> float:
        """Power of the arctan term."""
        return self._coefficients[2]

    @property
    def a4(self) -> float:
        """Slope of the linear term."""
        return self._coefficients[3]

    @property
    def domain(self) -> str:
        """Human-readable text of the domain."""
        return "loss > 0" if self.a3 < 1 else "loss >= 0"

    def in_domain(self, loss: Tensor) -> Tensor:
        """Return a boolean tensor that is True where the loss is finite and inside the domain."""
        above = loss > 0 if self.a3 < 1 else loss >= 0
        return torch.isfinite(loss) & above

    def forward(self, loss: Tensor) -> Tensor:
        """Compute a1·arctan(a2·ℓ)^a3 + a4·ℓ without checks."""
        return self.a1 * torch.atan(self.a2 * loss).pow(self.a3) + self.a4 * loss

    def value_and_derivative(self, loss: float) -> tuple[float, float]:
        """Return δ(ℓ) and δ'(ℓ) in float64, or NaN for both outside the domain (see the base class)."""
        if not math.isfinite(loss) or (loss <= 0.0 if self.a3 < 1 else loss < 0.0):
            return _UNDEFINED
        scaled = self.a2 * loss
        angle = math.atan(scaled)
        try:
            value = self.a1 * angle**self.a3 + self.a4 * loss
            slope = (self.a1 * self.a3 * self.a2) / (1.0 + scaled * scaled)
            if self.a3 != 1.0:
                slope *= angle ** (self.a3 - 1.0)
        except OverflowError:
            return math.inf, math.inf
        return value, slope + self.a4

    def closed_form_derivative(self, loss: Tensor) -> Tensor:
        """Compute a1·a3·a2·arctan(a2·ℓ)^(a3−1) / (1 + (a2·ℓ)²) + a4 without checks."""
        scaled = self.a2 * loss
        slope = (self.a1 * self.a3 * self.a2) / (1.0 + scaled * scaled)

        # For a3 = 1 the power is skipped, so ℓ = 0 does not depend on how pow evaluates 0^0.
        if self.a3 != 1.0:
            slope = slope * torch.atan(scaled).pow(self.a3 - 1.0)
        return slope + self.a4


class LogExp(VerticalDeformation):
    r"""Log-exp deformation LE(e1, e2).

    .. math::
        \delta(\ell) = e_1 \ln(\exp(\ell) - e_2), \qquad
        \delta'(\ell) = \frac{e_1 \exp(\ell)}{\exp(\ell) - e_2}

    Source: Chen et al., "Deforming the Loss Surface to Affect the Behaviour of the Optimizer"
    (AAAI 2021), Section 3.1. The domain is ℓ > ln(e2); for e2 >= 1 this excludes small losses
    (LE(1, 1.9), used for ImageNet in the paper's Table 3, needs ℓ > 0.642). The implementation
    uses δ = e1·(ℓ + ln(−expm1(ln e2 − ℓ))) and δ' = e1 / (−expm1(ln e2 − ℓ)), which never
    evaluates exp(ℓ) and so cannot overflow, and stays accurate next to the bound.

    Args:
        e1: Scale, > 0.
        e2: Shift inside the logarithm, > 0.

    Raises:
        TypeError: If a coefficient is not a real number.
        ValueError: If a coefficient is not finite or not > 0.
    """

    symbol: ClassVar[str] = "LE"

    def __init__(self, e1: float, e2: float) -> None:
        self._coefficients = (
            _validate_coefficient("LE", "e1", e1, "> 0", 0.0, inclusive=False),
            _validate_coefficient("LE", "e2", e2, "> 0", 0.0, inclusive=False),
        )
        self._log_e2 = math.log(self._coefficients[1])

    @property
    def coefficients(self) -> tuple[float, ...]:
        """Coefficients ``(e1, e2)``."""
        return self._coefficients

    @property
    def e1(self) -> float:
        """Scale."""
        return self._coefficients[0]

    @property
    def e2(self) -> float:
        """Shift inside the logarithm."""
        return self._coefficients[1]

    @property
    def lower_bound(self) -> float:
        """Exclusive lower bound ln(e2) of the domain."""
        return self._log_e2

    @property
    def domain(self) -> str:
        """Human-readable text of the domain."""
        return f"loss > ln(e2) = {_format_short(self._log_e2)}"

    def in_domain(self, loss: Tensor) -> Tensor:
        """Return a boolean tensor that is True where the loss is finite and above ln(e2)."""
        return torch.isfinite(loss) & (loss > self._log_e2)

    def _one_minus_shift(self, loss: Tensor) -> Tensor:
        """Compute 1 − e2·exp(−ℓ) as −expm1(ln e2 − ℓ), exact near the bound and free of overflow."""
        return -torch.expm1(self._log_e2 - loss)

    def forward(self, loss: Tensor) -> Tensor:
        """Compute e1·ln(exp(ℓ) − e2) without checks."""
        # ln(exp(ℓ) − e2) = ℓ + ln(1 − e2·exp(−ℓ)). The paper's settings have e1 = 1, where the product is skipped.
        value = loss + torch.log(self._one_minus_shift(loss))
        return value if self.e1 == 1.0 else self.e1 * value

    def value_and_derivative(self, loss: float) -> tuple[float, float]:
        """Return δ(ℓ) and δ'(ℓ) in float64, or NaN for both outside the domain (see the base class)."""
        if not (math.isfinite(loss) and loss > self._log_e2):
            return _UNDEFINED
        one_minus_shift = -math.expm1(self._log_e2 - loss)
        return self.e1 * (loss + math.log(one_minus_shift)), self.e1 / one_minus_shift

    def closed_form_derivative(self, loss: Tensor) -> Tensor:
        """Compute e1·exp(ℓ) / (exp(ℓ) − e2) without checks."""
        return self.e1 / self._one_minus_shift(loss)


class Power(VerticalDeformation):
    r"""Power deformation δ(ℓ) = scale·ℓ^exponent.

    .. math::
        \delta(\ell) = s \, \ell^{p}, \qquad \delta'(\ell) = s \, p \, \ell^{p - 1}

    Chen et al., "Deforming the Loss Surface to Affect the Behaviour of the Optimizer" (AAAI 2021),
    Table 1, uses Power(0.5, 2) as a counter-example that steers the optimizer into sharper minima.
    The domain is ℓ >= 0, or ℓ > 0 when exponent < 1 because δ'(0) is then infinite.

    Args:
        scale: Multiplier s, > 0.
        exponent: Exponent p, > 0.

    Raises:
        TypeError: If a coefficient is not a real number.
        ValueError: If a coefficient is not finite or not > 0.
    """

    symbol: ClassVar[str] = "Power"

    def __init__(self, scale: float, exponent: float) -> None:
        self._coefficients = (
            _validate_coefficient("Power", "scale", scale, "> 0", 0.0, inclusive=False),
            _validate_coefficient("Power", "exponent", exponent, "> 0", 0.0, inclusive=False),
        )

    @property
    def coefficients(self) -> tuple[float, ...]:
        """Coefficients ``(scale, exponent)``."""
        return self._coefficients

    @property
    def scale(self) -> float:
        """Multiplier."""
        return self._coefficients[0]

    @property
    def exponent(self) -> float:
        """Exponent."""
        return self._coefficients[1]

    @property
    def domain(self) -> str:
        """Human-readable text of the domain."""
        return "loss > 0" if self.exponent < 1 else "loss >= 0"

    def in_domain(self, loss: Tensor) -> Tensor:
        """Return a boolean tensor that is True where the loss is finite and inside the domain."""
        above = loss > 0 if self.exponent < 1 else loss >= 0
        return torch.isfinite(loss) & above

    def forward(self, loss: Tensor) -> Tensor:
        """Compute scale·ℓ^exponent without checks."""
        return self.scale * loss.pow(self.exponent)

    def value_and_derivative(self, loss: float) -> tuple[float, float]:
        """Return δ(ℓ) and δ'(ℓ) in float64, or NaN for both outside the domain (see the base class)."""
        if not math.isfinite(loss) or (loss <= 0.0 if self.exponent < 1 else loss < 0.0):
            return _UNDEFINED
        try:
            value = self.scale * loss**self.exponent
            slope = self.scale if self.exponent == 1.0 else self.scale * self.exponent * loss ** (self.exponent - 1.0)
        except OverflowError:
            return math.inf, math.inf
        return value, slope

    def closed_form_derivative(self, loss: Tensor) -> Tensor:
        """Compute scale·exponent·ℓ^(exponent−1) without checks."""
        if self.exponent == 1.0:
            return torch.full_like(loss, self.scale)
        return (self.scale * self.exponent) * loss.pow(self.exponent - 1.0)


class Identity(VerticalDeformation):
    """Identity deformation δ(ℓ) = ℓ, the undeformed baseline, defined for any finite loss."""

    symbol: ClassVar[str] = "Identity"

    def forward(self, loss: Tensor) -> Tensor:
        """Return the loss unchanged."""
        return loss

    def value_and_derivative(self, loss: float) -> tuple[float, float]:
        """Return ℓ and 1, or NaN for both when the loss is not finite."""
        return (loss, 1.0) if math.isfinite(loss) else _UNDEFINED

    def closed_form_derivative(self, loss: Tensor) -> Tensor:
        """Return ones shaped like the loss."""
        return torch.ones_like(loss)


_FAMILIES: dict[str, tuple[type[VerticalDeformation], tuple[str, ...]]] = {
    "ap": (ArctanPower, ("a1", "a2", "a3", "a4")),
    "arctanpower": (ArctanPower, ("a1", "a2", "a3", "a4")),
    "le": (LogExp, ("e1", "e2")),
    "logexp": (LogExp, ("e1", "e2")),
    "power": (Power, ("scale", "exponent")),
    "identity": (Identity, ()),
}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_TOKEN_PATTERN = re.compile(
    r"(?P<space>\s+)"
    r"|(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<symbol>[-+*/(),])"
)


class _Token(NamedTuple):
    kind: str
    text: str
    position: int


def _parse_error(text: str, problem: str) -> ValueError:
    return ValueError(
        f"Invalid deformation {text!r}: {problem}. Accepted forms: {_ACCEPTED_FORMS} "
        "(long names ArctanPower and LogExp are accepted too, family names are case-insensitive, and "
        "coefficients may use numbers, + - * /, parentheses and the constants pi and e)."
    )


def _tokenize(text: str) -> list[_Token]:
    """Split deformation notation into tokens, ending with an ``end`` token."""
    tokens = []
    position = 0
    while position < len(text):
        match = _TOKEN_PATTERN.match(text, position)
        if match is None:
            raise _parse_error(text, f"unknown character {text[position]!r} at position {position}")
        if match.lastgroup != "space":
            tokens.append(_Token(match.lastgroup, match.group(), position))
        position = match.end()

    tokens.append(_Token("end", "", len(text)))
    return tokens


class _NotationParser:
    """Recursive-descent parser of ``FAMILY(expr, ...)`` with arithmetic coefficient expressions.

    Grammar::

        deformation := NAME "(" [expr ("," expr)*] ")" END
        expr        := term (("+" | "-") term)*
        term        := unary (("*" | "/") unary)*
        unary       := ("+" | "-") unary | primary
        primary     := NUMBER | "pi" | "e" | "(" expr ")"
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._tokens = _tokenize(text)
        self._index = 0

    def _peek(self) -> _Token:
        return self._tokens[self._index]

    def _advance(self) -> _Token:
        token = self._tokens[self._index]
        self._index += 1
        return token

    def _unexpected(self, token: _Token, expected: str) -> ValueError:
        found = "end of text" if token.kind == "end" else f"token {token.text!r}"
        return _parse_error(self._text, f"expected {expected} but found {found} at position {token.position}")

    def _expect(self, text: str) -> _Token:
        token = self._advance()
        if token.text != text:
            raise self._unexpected(token, repr(text))
        return token

    def parse(self) -> VerticalDeformation:
        name = self._advance()
        if name.kind == "end":
            raise _parse_error(self._text, "the text is empty")
        if name.kind != "name":
            raise self._unexpected(name, "a family name")
        if name.text.lower() not in _FAMILIES:
            raise _parse_error(self._text, f"unknown family {name.text!r} at position {name.position}")
        family, coefficient_names = _FAMILIES[name.text.lower()]

        self._expect("(")
        values = []
        if self._peek().text != ")":
            values.append(self._expression())
            while self._peek().text == ",":
                self._advance()
                values.append(self._expression())
        self._expect(")")

        trailing = self._peek()
        if trailing.kind != "end":
            raise _parse_error(self._text, f"unexpected trailing text {self._text[trailing.position:]!r} at position {trailing.position}")

        if len(values) != len(coefficient_names):
            signature = f"{family.symbol}({', '.join(coefficient_names)})"
            raise _parse_error(
                self._text,
                f"{family.symbol} takes {len(coefficient_names)} coefficients as in {signature}, got {len(values)}",
            )
        return family(*values)

    def _expression(self) -> float:
        value = self._term()
        while self._peek().text in ("+", "-"):
            operator = self._advance().text
            operand = self._term()
            value = value + operand if operator == "+" else value - operand
        return value

    def _term(self) -> float:
        value = self._unary()
        while self._peek().text in ("*", "/"):
            operator = self._advance()
            operand = self._unary()
            if operator.text == "*":
                value = value * operand
            elif operand == 0.0:
                raise _parse_error(self._text, f"division by zero at position {operator.position}")
            else:
                value = value / operand
        return value

    def _unary(self) -> float:
        if self._peek().text in ("+", "-"):
            sign = -1.0 if self._advance().text == "-" else 1.0
            return sign * self._unary()
        return self._primary()

    def _primary(self) -> float:
        token = self._advance()
        if token.kind == "number":
            value = float(token.text)
            mantissa = token.text.lower().split("e")[0]
            if math.isinf(value) or (value == 0.0 and mantissa.strip("0.")):
                raise _parse_error(
                    self._text, f"the number {token.text} at position {token.position} is outside the float64 range"
                )
            return value
        if token.kind == "name":
            if token.text in _CONSTANTS:
                return _CONSTANTS[token.text]
            raise _parse_error(self._text, f"unknown name {token.text!r} at position {token.position} (the only constants are pi and e)")
        if token.text == "(":
            value = self._expression()
            self._expect(")")
            return value
        raise self._unexpected(token, "a number, pi, e or '('")


def parse_deformation(text: str) -> VerticalDeformation:
    """Build a deformation from the paper's notation.

    Examples of accepted text: ``"AP(18/pi, 1, 2, 1)"``, ``"ArctanPower(1.5, 0.7, 1, 0)"``,
    ``"LE(1, 0.99)"``, ``"logexp(1, 1.9)"``, ``"Power(0.5, 2)"``, ``"Identity()"``. Family names are
    case-insensitive and whitespace is ignored. Coefficients are arithmetic expressions of numbers
    (integers, decimals, scientific notation), ``+ - * /``, unary signs, parentheses and the
    constants ``pi`` and ``e``. The text is parsed by a small recursive-descent parser and never
    evaluated as Python.

    Args:
        text: Deformation notation.

    Raises:
        TypeError: If ``text`` is not a string, or a coefficient has the wrong type.
        ValueError: If the text does not parse (the message lists the accepted forms and, where it
            applies, the offending token and its position) or a coefficient is outside its range.
    """
    if not isinstance(text, str):
        raise TypeError(f"deformation notation must be a str, got {type(text).__name__}: {text!r}")
    return _NotationParser(text).parse()


def as_deformation(value: VerticalDeformation | str | None) -> VerticalDeformation | None:
    """Normalise a deformation argument: an instance is returned as is, a string is parsed, None stays None.

    Args:
        value: A deformation, its notation, or None.

    Raises:
        TypeError: If ``value`` has any other type.
        ValueError: If a string does not parse (see :func:`parse_deformation`).
    """
    if value is None or isinstance(value, VerticalDeformation):
        return value
    if isinstance(value, str):
        return parse_deformation(value)
    raise TypeError(
        f"deformation must be a VerticalDeformation, a str in the notation {_ACCEPTED_FORMS}, or None; "
        f"got {type(value).__name__}: {value!r}"
    )
