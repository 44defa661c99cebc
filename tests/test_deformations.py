"""Tests of the vertical deformation mappings, their checks and the notation parser."""

import math
import re

import pytest
import torch

import lightning_vdm.deformations as deformations_module
from lightning_vdm.deformations import (
    ArctanPower,
    DeformationDomainError,
    Identity,
    LogExp,
    Power,
    VerticalDeformation,
    as_deformation,
    parse_deformation,
    promote_loss,
    stack_scalars,
)

# Every coefficient set of Tables 1 to 3 and Fig. 1 of "Deforming the Loss Surface to Affect the
# Behaviour of the Optimizer" (AAAI 2021), plus the identity baseline.
PAPER_DEFORMATIONS = [
    LogExp(1, 0.6),
    LogExp(1, 0.7),
    LogExp(1, 0.9),
    LogExp(1, 0.99),
    LogExp(1, 0.8),
    LogExp(1, 0.3),
    LogExp(1, 1.9),
    LogExp(1, 0.5),
    ArctanPower(5, 1, 2, 1),
    ArctanPower(18 / math.pi, 1, 2, 1),
    ArctanPower(6, 1, 2, 1),
    ArctanPower(10, 1, 2, 1),
    ArctanPower(2, 1, 2, 1),
    ArctanPower(10, 1, 1, 1),
    ArctanPower(1.5, 0.7, 1, 0),
    Power(0.5, 2),
    Identity(),
]

# Coefficient sets outside the paper that reach the other branches: a3 < 1, a3 > 2, exponent < 1,
# exponent = 1, e1 != 1 and e2 far from 1.
EXTRA_DEFORMATIONS = [
    ArctanPower(2, 3, 0.5, 0.25),
    ArctanPower(0.3, 0.2, 3.5, 0),
    Power(2, 0.5),
    Power(3, 1),
    Power(0.1, 3.7),
    LogExp(2.5, 0.01),
    LogExp(0.4, 20),
]

ALL_DEFORMATIONS = PAPER_DEFORMATIONS + EXTRA_DEFORMATIONS

STANDARD_LOSSES = [0.0, 1e-4, 1e-2, 0.1, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0]
LE_OFFSETS = [1e-6, 1e-4, 1e-2, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0]


def _lower_bound(deformation):
    """Return the domain's lower bound and whether it is inclusive (None for the identity)."""
    if isinstance(deformation, LogExp):
        return math.log(deformation.e2), False
    if isinstance(deformation, ArctanPower):
        return 0.0, deformation.a3 >= 1
    if isinstance(deformation, Power):
        return 0.0, deformation.exponent >= 1
    return None


def _loss_grid(deformation):
    """Build a sorted float64 grid of losses inside the domain."""
    bound = _lower_bound(deformation)
    if bound is None:
        values = {-10.0, -1.0, -1e-3} | set(STANDARD_LOSSES)
    else:
        lower, inclusive = bound
        values = {loss for loss in STANDARD_LOSSES if loss > lower or (inclusive and loss == lower)}
        values |= {lower + offset for offset in LE_OFFSETS} if isinstance(deformation, LogExp) else set()
    return torch.tensor(sorted(values), dtype=torch.float64)


def _textbook_value(deformation, loss):
    """Evaluate δ with the formula as printed in the paper, in float64 Python math."""
    if isinstance(deformation, ArctanPower):
        a1, a2, a3, a4 = deformation.coefficients
        return a1 * math.atan(a2 * loss) ** a3 + a4 * loss
    if isinstance(deformation, LogExp):
        e1, e2 = deformation.coefficients
        return e1 * math.log(math.exp(loss) - e2)
    if isinstance(deformation, Power):
        scale, exponent = deformation.coefficients
        return scale * loss**exponent
    return loss


def _textbook_torch(deformation, loss):
    """Evaluate δ with the printed formula in torch, so autograd gives an independent δ'."""
    if isinstance(deformation, ArctanPower):
        a1, a2, a3, a4 = deformation.coefficients
        return a1 * torch.atan(a2 * loss) ** a3 + a4 * loss
    if isinstance(deformation, LogExp):
        e1, e2 = deformation.coefficients
        return e1 * torch.log(torch.exp(loss) - e2)
    if isinstance(deformation, Power):
        scale, exponent = deformation.coefficients
        return scale * loss**exponent
    return loss * 1.0


def _autograd_derivative(function, loss):
    leaf = loss.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(function(leaf).sum(), leaf)
    return gradient


@pytest.mark.parametrize("deformation", ALL_DEFORMATIONS, ids=repr)
def test_derivative_matches_autograd(deformation):
    losses = _loss_grid(deformation)

    closed_form = deformation.derivative(losses)
    through_forward = _autograd_derivative(deformation.forward, losses)

    assert closed_form.dtype == torch.float64
    torch.testing.assert_close(closed_form, through_forward, rtol=1e-10, atol=0.0)


@pytest.mark.parametrize("deformation", ALL_DEFORMATIONS, ids=repr)
def test_derivative_matches_textbook_autograd(deformation):
    losses = _loss_grid(deformation)

    closed_form = deformation.derivative(losses)
    textbook = _autograd_derivative(lambda loss: _textbook_torch(deformation, loss), losses)

    # The printed LE formula loses digits to cancellation in exp(ℓ) − e2 next to the bound.
    torch.testing.assert_close(closed_form, textbook, rtol=1e-7, atol=0.0)


def _interior_grid(deformation):
    """Return float64 losses strictly inside the domain and away from the bound, where δ'' is finite."""
    losses = _loss_grid(deformation)
    bound = _lower_bound(deformation)
    if bound is not None:
        losses = losses[losses > bound[0] + 1e-3]
    return losses[losses < 50.0]


@pytest.mark.parametrize("deformation", ALL_DEFORMATIONS, ids=repr)
def test_second_derivative_matches_textbook(deformation):
    losses = _interior_grid(deformation)

    second = _second_derivative(deformation.forward, losses)
    reference = _second_derivative(lambda loss: _textbook_torch(deformation, loss), losses)

    torch.testing.assert_close(second, reference, rtol=1e-6, atol=1e-12)


def _second_derivative(function, losses):
    """Return δ''(ℓ) by differentiating autograd's δ' again; zeros where δ' does not depend on ℓ."""
    leaf = losses.clone().requires_grad_(True)
    (first,) = torch.autograd.grad(function(leaf).sum(), leaf, create_graph=True)
    if not first.requires_grad:
        return torch.zeros_like(losses)
    (second,) = torch.autograd.grad(first.sum(), leaf, allow_unused=True)
    return torch.zeros_like(losses) if second is None else second


@pytest.mark.parametrize("deformation", ALL_DEFORMATIONS, ids=repr)
def test_value_matches_textbook_formula(deformation):
    losses = _loss_grid(deformation)

    values = deformation(losses)
    expected = torch.tensor([_textbook_value(deformation, float(loss)) for loss in losses], dtype=torch.float64)

    torch.testing.assert_close(values, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("deformation", ALL_DEFORMATIONS, ids=repr)
def test_monotone_on_fine_grid(deformation):
    bound = _lower_bound(deformation)
    lower = -5.0 if bound is None else bound[0] + 1e-3
    losses = torch.linspace(lower, lower + 60.0, 4001, dtype=torch.float64)

    values = deformation(losses)
    slopes = deformation.derivative(losses)

    assert torch.all(torch.diff(values) >= 0)
    assert torch.all(slopes >= 0)
    assert torch.all(torch.isfinite(slopes))


@pytest.mark.parametrize(
    ("deformation", "loss", "expected"),
    [
        (ArctanPower(10, 1, 1, 1), 0.0, 11.0),
        (ArctanPower(1.5, 0.7, 1, 0), 0.0, 1.05),
        (ArctanPower(5, 1, 2, 1), 0.0, 1.0),
        (ArctanPower(5, 1, 2, 1), 1.0, 5 * 2 * (math.pi / 4) / 2 + 1),
        (LogExp(1, 0.5), math.log(1.0), 2.0),
        (LogExp(2, 1.9), math.log(3.8), 4.0),
        (Power(0.5, 2), 3.0, 3.0),
        (Power(3, 1), 0.0, 3.0),
        (Identity(), -7.0, 1.0),
    ],
    ids=["AP-a3-1-at-0", "AP-a4-0-at-0", "AP-a3-2-at-0", "AP-a3-2-at-1", "LE-half", "LE-e1-2", "Power-square", "Power-linear-at-0", "Identity"],
)
def test_derivative_known_points(deformation, loss, expected):
    derivative = deformation.derivative(torch.tensor(loss, dtype=torch.float64))

    assert float(derivative) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("deformation", PAPER_DEFORMATIONS, ids=repr)
def test_half_precision_promoted(deformation, dtype):
    bound = _lower_bound(deformation)
    lower = -3.0 if bound is None else bound[0]
    candidates = torch.tensor([lower + offset for offset in (0.05, 0.2, 0.5, 1.0, 2.0, 4.0, 12.0, 40.0)])
    losses = candidates.to(dtype)
    exact_losses = losses.to(torch.float64)

    values = deformation(losses)
    slopes = deformation.derivative(losses)

    assert values.dtype == torch.float32
    assert slopes.dtype == torch.float32
    assert torch.all(torch.isfinite(values))
    assert torch.all(torch.isfinite(slopes))
    torch.testing.assert_close(values.double(), deformation(exact_losses), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(slopes.double(), deformation.derivative(exact_losses), rtol=2e-5, atol=0.0)


def test_logexp_float16_large_loss():
    deformation = LogExp(1, 0.9)
    loss = torch.tensor(12.0, dtype=torch.float16)

    value = deformation(loss)
    slope = deformation.derivative(loss)

    # The printed formula overflows in float16 because exp(12) > 65504.
    assert torch.isinf(torch.exp(loss))
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(12.0 + math.log(1 - 0.9 * math.exp(-12.0)), rel=1e-6)
    assert float(slope) == pytest.approx(1 / (1 - 0.9 * math.exp(-12.0)), rel=1e-6)


def test_logexp_float32_huge_loss():
    deformation = LogExp(1, 0.9)
    loss = torch.tensor([500.0, 1e6])

    assert torch.equal(deformation(loss), loss)
    assert torch.equal(deformation.derivative(loss), torch.ones(2))


def test_logexp_accurate_near_bound():
    deformation = LogExp(1, 0.99)
    offset = 1e-9
    loss = torch.tensor(math.log(0.99) + offset, dtype=torch.float64)

    # ln(exp(ℓ) − e2) = ln(e2·(exp(offset) − 1)) is exact for this form of the loss.
    expected = math.log(0.99) + math.log(math.expm1(offset))

    assert float(deformation(loss)) == pytest.approx(expected, rel=1e-6)
    assert float(deformation.derivative(loss)) == pytest.approx(1 / -math.expm1(-offset), rel=1e-6)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.int64, torch.float32),
        (torch.int32, torch.float32),
        (torch.bool, torch.float32),
    ],
    ids=["float16", "bfloat16", "float32", "float64", "int64", "int32", "bool"],
)
def test_promote_loss_dtype(dtype, expected):
    loss = torch.tensor([1, 2, 3]).to(dtype)

    promoted = promote_loss(loss)

    assert promoted.dtype == expected
    assert torch.equal(promoted, loss.to(expected))


@pytest.mark.parametrize(
    ("tensors", "expected_dtype"),
    [
        ([torch.tensor(0.1), torch.tensor(2.5), torch.tensor(-3.0)], torch.float32),
        ([torch.tensor([0.1]), torch.tensor([2.5])], torch.float32),
        ([torch.tensor(0.1), torch.tensor([2.5]), torch.tensor([[4.0]])], torch.float32),
        ([torch.tensor(0.1, dtype=torch.bfloat16), torch.tensor(2.5, dtype=torch.float16)], torch.float32),
        ([torch.tensor(0.1, dtype=torch.float16), torch.tensor(2.5, dtype=torch.float64)], torch.float64),
        ([torch.tensor(3), torch.tensor(True)], torch.float32),
        ([torch.tensor(70000), torch.tensor(2049), torch.tensor(1.0, dtype=torch.float16)], torch.float32),
        ([torch.tensor(257), torch.tensor(1.0, dtype=torch.bfloat16)], torch.float32),
    ],
    ids=["scalars", "shape-1", "mixed-shapes", "half-types", "half-and-double", "int-and-bool", "int-and-half",
         "int-and-bfloat16"],
)
def test_stack_scalars_matches_promotion(tensors, expected_dtype):
    stacked = stack_scalars(tensors)

    assert stacked.shape == (len(tensors),)
    assert stacked.dtype == expected_dtype
    expected = [promote_loss(tensor).to(torch.float64).item() for tensor in tensors]
    assert stacked.to(torch.float64).tolist() == expected


@pytest.mark.parametrize(
    "tensors",
    [
        [torch.ones(2), torch.ones(2)],
        [torch.ones(2), torch.ones(1)],
        [torch.ones(()), torch.ones(2, 1)],
        [torch.ones(2), torch.ones(0)],
    ],
    ids=["equal-shapes", "differing-shapes", "scalar-and-matrix", "two-and-empty"],
)
def test_stack_scalars_rejects_several_elements(tensors):
    with pytest.raises(ValueError, match=r"one element each, got shapes \[.*\(2"):
        stack_scalars(tensors)


def test_stack_scalars_rejects_empty():
    with pytest.raises(ValueError, match="at least one tensor, got none"):
        stack_scalars([])


def test_promote_loss_keeps_object():
    loss = torch.tensor([1.5], dtype=torch.float64)

    assert promote_loss(loss) is loss


@pytest.mark.parametrize(
    ("loss", "error", "match"),
    [
        (1.0, TypeError, "loss must be a torch.Tensor, got float"),
        (torch.tensor([1 + 1j]), TypeError, "loss must have a real dtype, got torch.complex64"),
    ],
    ids=["float", "complex"],
)
def test_promote_loss_rejects(loss, error, match):
    with pytest.raises(error, match=match):
        promote_loss(loss)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: ArctanPower(-1, 1, 2, 1), r"AP coefficient a1 must be a finite number > 0, got -1\.0"),
        (lambda: ArctanPower(0, 1, 2, 1), r"AP coefficient a1 must be a finite number > 0, got 0\.0"),
        (lambda: ArctanPower(1, 0, 2, 1), r"AP coefficient a2 must be a finite number > 0, got 0\.0"),
        (lambda: ArctanPower(1, 1, -2, 1), r"AP coefficient a3 must be a finite number > 0, got -2\.0"),
        (lambda: ArctanPower(1, 1, 2, -0.5), r"AP coefficient a4 must be a finite number >= 0, got -0\.5"),
        (lambda: ArctanPower(math.nan, 1, 2, 1), r"AP coefficient a1 must be a finite number > 0, got nan"),
        (lambda: ArctanPower(1, math.inf, 2, 1), r"AP coefficient a2 must be a finite number > 0, got inf"),
        (lambda: ArctanPower(1, 1, 2, math.inf), r"AP coefficient a4 must be a finite number >= 0, got inf"),
        (lambda: LogExp(0, 0.9), r"LE coefficient e1 must be a finite number > 0, got 0\.0"),
        (lambda: LogExp(-2, 0.9), r"LE coefficient e1 must be a finite number > 0, got -2\.0"),
        (lambda: LogExp(1, 0), r"LE coefficient e2 must be a finite number > 0, got 0\.0"),
        (lambda: LogExp(1, -0.5), r"LE coefficient e2 must be a finite number > 0, got -0\.5"),
        (lambda: LogExp(1, math.nan), r"LE coefficient e2 must be a finite number > 0, got nan"),
        (lambda: Power(0, 2), r"Power coefficient scale must be a finite number > 0, got 0\.0"),
        (lambda: Power(-1, 2), r"Power coefficient scale must be a finite number > 0, got -1\.0"),
        (lambda: Power(1, 0), r"Power coefficient exponent must be a finite number > 0, got 0\.0"),
        (lambda: Power(1, -math.inf), r"Power coefficient exponent must be a finite number > 0, got -inf"),
    ],
    ids=[
        "AP-a1-negative",
        "AP-a1-zero",
        "AP-a2-zero",
        "AP-a3-negative",
        "AP-a4-negative",
        "AP-a1-nan",
        "AP-a2-inf",
        "AP-a4-inf",
        "LE-e1-zero",
        "LE-e1-negative",
        "LE-e2-zero",
        "LE-e2-negative",
        "LE-e2-nan",
        "Power-scale-zero",
        "Power-scale-negative",
        "Power-exponent-zero",
        "Power-exponent-minus-inf",
    ],
)
def test_invalid_coefficient(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: ArctanPower("5", 1, 2, 1), r"AP coefficient a1 must be a real number > 0, got str: '5'"),
        (lambda: LogExp(1, True), r"LE coefficient e2 must be a real number > 0, got bool: True"),
        (lambda: Power(None, 2), r"Power coefficient scale must be a real number > 0, got NoneType: None"),
    ],
    ids=["AP-str", "LE-bool", "Power-none"],
)
def test_coefficient_wrong_type(factory, match):
    with pytest.raises(TypeError, match=match):
        factory()


def test_coefficients_stored_as_float():
    deformation = ArctanPower(5, 1, 2)

    assert deformation.coefficients == (5.0, 1.0, 2.0, 0.0)
    assert all(type(value) is float for value in deformation.coefficients)
    assert (deformation.a1, deformation.a2, deformation.a3, deformation.a4) == (5.0, 1.0, 2.0, 0.0)
    assert (LogExp(2, 0.5).e1, LogExp(2, 0.5).e2) == (2.0, 0.5)
    assert (Power(0.5, 2).scale, Power(0.5, 2).exponent) == (0.5, 2.0)
    assert Identity().coefficients == ()


def test_negative_zero_normalised():
    deformation = ArctanPower(1, 1, 1, -0.0)

    assert math.copysign(1.0, deformation.a4) == 1.0
    assert repr(deformation) == "AP(1, 1, 1, 0)"


@pytest.mark.parametrize(
    ("deformation", "losses", "bad_text", "domain"),
    [
        (ArctanPower(5, 1, 2, 1), [0.5, -0.1, 1.0], "-0.1", "loss >= 0"),
        (ArctanPower(2, 3, 0.5, 0.25), [0.0], "0.0", "loss > 0"),
        (LogExp(1, 1.9), [1.0, 0.5], "0.5", "loss > ln(e2) = 0.641854"),
        (LogExp(1, 0.99), [-0.02], "-0.02", "loss > ln(e2) = -0.0100503"),
        (LogExp(1, 1.0), [0.0], "0.0", "loss > ln(e2) = 0"),
        (Power(0.5, 2), [[1.0, 2.0], [3.0, -1.0]], "-1.0", "loss >= 0"),
        (Power(2, 0.5), [0.0], "0.0", "loss > 0"),
    ],
    ids=["AP-negative", "AP-a3-below-1-at-0", "LE-below-bound", "LE-negative-bound", "LE-at-bound", "Power-negative", "Power-sqrt-at-0"],
)
def test_domain_violation(deformation, losses, bad_text, domain):
    loss = torch.tensor(losses, dtype=torch.float64)

    for entry_point in (deformation, deformation.derivative, deformation.check_domain):
        with pytest.raises(DeformationDomainError) as caught:
            entry_point(loss)
        message = str(caught.value)
        assert f"loss = {bad_text}" in message
        assert domain in message
        assert repr(deformation) in message


def test_domain_error_names_first_element():
    loss = torch.tensor([[1.0, 0.1], [0.2, 2.0]])

    with pytest.raises(DeformationDomainError, match=r"loss = 0\.1\d* \(element \(0, 1\), 2 of 4 elements invalid\)"):
        LogExp(1, 1.9)(loss)


def test_domain_error_is_value_error():
    assert issubclass(DeformationDomainError, ValueError)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "minus-inf"])
@pytest.mark.parametrize("deformation", [ArctanPower(5, 1, 2, 1), LogExp(1, 0.9), Power(0.5, 2), Identity()], ids=repr)
def test_non_finite_loss(deformation, bad):
    loss = torch.tensor([1.0, bad])

    with pytest.raises(DeformationDomainError, match=rf"loss = {bad!r}"):
        deformation(loss)
    with pytest.raises(DeformationDomainError, match=rf"loss = {bad!r}"):
        deformation.derivative(loss)
    assert deformation.in_domain(loss).tolist() == [True, False]


@pytest.mark.parametrize(
    ("deformation", "loss", "entry_point"),
    [
        (Power(1, 50), 1e3, "value"),
        (Power(1, 50), 1e3, "derivative"),
        (ArctanPower(1, 1, 0.001, 0), 1e-45, "derivative"),
    ],
    ids=["Power-value", "Power-derivative", "AP-small-a3-derivative"],
)
def test_overflow_raises(deformation, loss, entry_point):
    tensor = torch.tensor([loss], dtype=torch.float32)
    evaluate = deformation if entry_point == "value" else deformation.derivative

    assert bool(deformation.in_domain(tensor).all())
    with pytest.raises(DeformationDomainError, match=rf"^{re.escape(repr(deformation))} overflows: .* is not finite at loss = "):
        evaluate(tensor)


def test_overflow_avoided_in_float64():
    deformation = Power(1, 50)

    assert float(deformation(torch.tensor(1e3, dtype=torch.float64))) == pytest.approx(1e150)


@pytest.mark.parametrize(
    ("deformation", "losses", "expected"),
    [
        (ArctanPower(5, 1, 2, 1), [-1.0, 0.0, 2.0, math.inf], [False, True, True, False]),
        (ArctanPower(2, 3, 0.5, 0.25), [0.0, 1e-30, math.nan], [False, True, False]),
        (LogExp(1, 1.9), [0.5, 0.642, 0.7, math.nan], [False, True, True, False]),
        (Power(2, 0.5), [0.0, 0.1], [False, True]),
        (Power(0.5, 2), [-1e-9, 0.0], [False, True]),
        (Identity(), [-1e30, 0.0, math.inf, math.nan], [True, True, False, False]),
    ],
    ids=["AP", "AP-a3-below-1", "LE", "Power-sqrt", "Power-square", "Identity"],
)
def test_in_domain_mask(deformation, losses, expected):
    mask = deformation.in_domain(torch.tensor(losses, dtype=torch.float64))

    assert mask.dtype == torch.bool
    assert mask.tolist() == expected


@pytest.mark.parametrize(
    ("deformation", "domain"),
    [
        (ArctanPower(5, 1, 2, 1), "loss >= 0"),
        (ArctanPower(1, 1, 0.5, 1), "loss > 0"),
        (LogExp(1, 0.99), "loss > ln(e2) = -0.0100503"),
        (Power(0.5, 2), "loss >= 0"),
        (Power(1, 0.5), "loss > 0"),
        (Identity(), "any finite loss"),
    ],
    ids=["AP", "AP-a3-below-1", "LE", "Power", "Power-sqrt", "Identity"],
)
def test_domain_text(deformation, domain):
    assert deformation.domain == domain


def test_logexp_lower_bound():
    assert LogExp(1, 1.9).lower_bound == pytest.approx(math.log(1.9), rel=1e-15)


def test_checked_call_keeps_autograd():
    deformation = LogExp(1, 0.9)
    loss = torch.tensor(2.0, requires_grad=True)

    deformation(loss).backward()

    torch.testing.assert_close(loss.grad, deformation.derivative(torch.tensor(2.0)))


def test_closed_form_without_autograd():
    with torch.inference_mode():
        losses = torch.tensor([0.7, 1.0, 2.0])
        slopes = [deformation.derivative(losses) for deformation in PAPER_DEFORMATIONS]

    assert all(not slope.requires_grad for slope in slopes)
    assert all(torch.all(torch.isfinite(slope)) for slope in slopes)


def test_unchecked_forward_keeps_dtype():
    loss = torch.tensor([1.0, 2.0], dtype=torch.float16)

    assert LogExp(1, 0.5).forward(loss).dtype == torch.float16
    assert ArctanPower(5, 1, 2, 1).closed_form_derivative(loss).dtype == torch.float16


class LogOnePlus(VerticalDeformation):
    """δ(ℓ) = ln(1 + ℓ), defined by ``forward`` only."""

    def forward(self, loss):
        return torch.log1p(loss)


class ShiftedLog(VerticalDeformation):
    """δ(ℓ) = scale·ln(ℓ − shift), with its own domain and coefficients."""

    def __init__(self, scale: float, shift: float) -> None:
        self._coefficients = (float(scale), float(shift))

    @property
    def coefficients(self):
        return self._coefficients

    @property
    def domain(self):
        return f"loss > {self._coefficients[1]:g}"

    def in_domain(self, loss):
        return torch.isfinite(loss) & (loss > self._coefficients[1])

    def forward(self, loss):
        return self._coefficients[0] * torch.log(loss - self._coefficients[1])


def test_custom_derivative_by_autograd():
    deformation = LogOnePlus()
    losses = torch.tensor([0.0, 0.5, 3.0, 100.0], requires_grad=True)

    slopes = deformation.derivative(losses)

    torch.testing.assert_close(slopes, 1 / (1 + losses.detach()))
    assert not slopes.requires_grad
    assert losses.grad is None


def test_custom_derivative_in_no_grad():
    with torch.no_grad():
        slopes = LogOnePlus().derivative(torch.tensor([1.0, 3.0], dtype=torch.float16))

    assert slopes.dtype == torch.float32
    torch.testing.assert_close(slopes, torch.tensor([0.5, 0.25]))


def test_custom_subclass_defaults():
    deformation = LogOnePlus()

    assert LogOnePlus.symbol == "LogOnePlus"
    assert deformation.coefficients == ()
    assert repr(deformation) == "LogOnePlus()"
    assert deformation.notation == "LogOnePlus()"
    assert deformation.domain == "any finite loss"
    assert deformation == LogOnePlus()
    assert deformation != Identity()
    with pytest.raises(DeformationDomainError, match=r"LogOnePlus\(\) is undefined at loss = nan"):
        deformation(torch.tensor([math.nan]))
    assert deformation.value_and_derivative(0.5) is None


def test_custom_subclass_with_domain():
    deformation = ShiftedLog(2, 1)
    losses = torch.tensor([1.5, 2.0, 5.0], dtype=torch.float64)

    assert repr(deformation) == "ShiftedLog(2, 1)"
    torch.testing.assert_close(deformation.derivative(losses), 2 / (losses - 1))
    with pytest.raises(DeformationDomainError, match=r"ShiftedLog\(2, 1\) is undefined at loss = 0\.5\. Its domain is loss > 1"):
        deformation(torch.tensor(0.5))


def test_custom_subclass_inherits_symbol_by_name():
    class TunedArctanPower(ArctanPower):
        pass

    deformation = TunedArctanPower(5, 1, 2, 1)

    assert TunedArctanPower.symbol == "TunedArctanPower"
    assert ArctanPower.symbol == "AP"
    assert repr(deformation) == "TunedArctanPower(5, 1, 2, 1)"
    assert deformation != ArctanPower(5, 1, 2, 1)


def test_base_class_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        VerticalDeformation()


@pytest.mark.parametrize(
    ("deformation", "expected"),
    [
        (parse_deformation("AP(18/pi, 1, 2, 1)"), "AP(5.72958, 1, 2, 1)"),
        (LogExp(1, 0.99), "LE(1, 0.99)"),
        (ArctanPower(1.5, 0.7, 1, 0), "AP(1.5, 0.7, 1, 0)"),
        (Power(0.5, 2), "Power(0.5, 2)"),
        (Power(1e20, 1 / 3), "Power(1e+20, 0.333333)"),
        (Identity(), "Identity()"),
    ],
    ids=["AP-18-over-pi", "LE", "AP-a4-zero", "Power", "Power-large", "Identity"],
)
def test_repr(deformation, expected):
    assert repr(deformation) == expected


@pytest.mark.parametrize(
    ("deformation", "expected"),
    [
        (ArctanPower(18 / math.pi, 1, 2, 1), "AP(5.729577951308232, 1, 2, 1)"),
        (LogExp(1, 0.1 + 0.2), "LE(1, 0.30000000000000004)"),
        (Power(1e20, 1e-300), "Power(1e+20, 1e-300)"),
        (Power(123456789012345, 2.5), "Power(123456789012345, 2.5)"),
        (Identity(), "Identity()"),
    ],
    ids=["AP-18-over-pi", "LE-float-sum", "Power-extreme", "Power-long-integer", "Identity"],
)
def test_notation_round_trip(deformation, expected):
    assert deformation.notation == expected
    assert parse_deformation(deformation.notation) == deformation


@pytest.mark.parametrize("deformation", PAPER_DEFORMATIONS, ids=repr)
def test_paper_notation_round_trip(deformation):
    assert parse_deformation(deformation.notation) == deformation
    assert parse_deformation(repr(deformation)).coefficients == pytest.approx(deformation.coefficients, rel=1e-5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("AP(18/pi, 1, 2, 1)", ArctanPower(18 / math.pi, 1, 2, 1)),
        ("  ap ( 5 , 1 , 2 , 1 )  ", ArctanPower(5, 1, 2, 1)),
        ("ArctanPower(1.5, 0.7, 1, 0)", ArctanPower(1.5, 0.7, 1, 0)),
        ("ARCTANPOWER(10,1,1,1)", ArctanPower(10, 1, 1, 1)),
        ("LE(1, 0.99)", LogExp(1, 0.99)),
        ("logexp(1,1.9)", LogExp(1, 1.9)),
        ("LogExp(2*e, 1 - 0.5)", LogExp(2 * math.e, 0.5)),
        ("LE(1, 9e-1)", LogExp(1, 0.9)),
        ("LE(1.0E0, .5)", LogExp(1, 0.5)),
        ("Power(0.5, 2)", Power(0.5, 2)),
        ("POWER(1/2, 2.)", Power(0.5, 2)),
        ("Identity()", Identity()),
        ("identity( )", Identity()),
        ("AP(1+2*3, (1+2)*3, 8/2/2, 1-1-0)", ArctanPower(7, 9, 2, 0)),
        ("AP(-(-2)*3, +1, --1, -2*-1)", ArctanPower(6, 1, 1, 2)),
        ("AP(pi/(2*pi)*4, 1e+1/10, 2, 0)", ArctanPower(2, 1, 2, 0)),
        ("LE(\t1,\n0.5)", LogExp(1, 0.5)),
    ],
    ids=[
        "AP-pi",
        "AP-spaces",
        "ArctanPower",
        "ArctanPower-upper",
        "LE",
        "LogExp-lower",
        "LogExp-constant-e",
        "LE-scientific",
        "LE-leading-dot",
        "Power",
        "Power-trailing-dot",
        "Identity",
        "Identity-space",
        "AP-precedence",
        "AP-unary-signs",
        "AP-parentheses",
        "LE-tab-newline",
    ],
)
def test_parse_valid(text, expected):
    parsed = parse_deformation(text)

    assert parsed == expected
    assert type(parsed) is type(expected)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"the text is empty"),
        ("   ", r"the text is empty"),
        ("Foo(1, 2)", r"unknown family 'Foo' at position 0"),
        ("__import__", r"unknown family '__import__' at position 0"),
        ("__import__('os')", r"unknown character \"'\" at position 11"),
        ("os.system('ls')", r"unknown character '\.' at position 2"),
        ("AP(1**2, 1, 2, 1)", r"found token '\*' at position 5"),
        ("AP(1, 1, 2, 1", r"expected '\)' but found end of text at position 13"),
        ("AP((1, 1, 2, 1)", r"expected '\)' but found token ',' at position 5"),
        ("AP(1, 1, 2, 1))", r"unexpected trailing text '\)' at position 14"),
        ("AP(1, 1, 2, 1) extra", r"unexpected trailing text 'extra' at position 15"),
        ("AP 1, 1, 2, 1", r"expected '\(' but found token '1' at position 3"),
        ("(1, 2)", r"expected a family name but found token '\(' at position 0"),
        ("AP(1, 1, 2)", r"AP takes 4 coefficients as in AP\(a1, a2, a3, a4\), got 3"),
        ("LE(1)", r"LE takes 2 coefficients as in LE\(e1, e2\), got 1"),
        ("LE(1, 2, 3)", r"LE takes 2 coefficients as in LE\(e1, e2\), got 3"),
        ("Power(2)", r"Power takes 2 coefficients as in Power\(scale, exponent\), got 1"),
        ("Identity(1)", r"Identity takes 0 coefficients as in Identity\(\), got 1"),
        ("LE(1, 0.5/0)", r"division by zero at position 9"),
        ("LE(1, 1/(2-2))", r"division by zero at position 7"),
        ("LE(1, tau)", r"unknown name 'tau' at position 6"),
        ("LE(1, PI)", r"unknown name 'PI' at position 6"),
        ("LE(1, 2pi)", r"found token 'pi' at position 7"),
        ("LE(1, 1.5.2)", r"found token '\.2' at position 9"),
        ("LE(1, )", r"expected a number, pi, e or '\(' but found token '\)' at position 6"),
        ("LE(1, 0.5,)", r"found token '\)' at position 10"),
        ("LE(1; 0.5)", r"unknown character ';' at position 4"),
        ("LE(1, 0.5) # comment", r"unknown character '#' at position 11"),
    ],
    ids=[
        "empty",
        "blank",
        "unknown-family",
        "dunder-name",
        "dunder-call",
        "attribute",
        "double-star",
        "unclosed",
        "unbalanced-open",
        "unbalanced-close",
        "trailing-word",
        "missing-parenthesis",
        "no-family",
        "AP-three",
        "LE-one",
        "LE-three",
        "Power-one",
        "Identity-one",
        "divide-by-zero",
        "divide-by-expression-zero",
        "unknown-constant",
        "constant-upper-case",
        "implicit-product",
        "two-dots",
        "missing-coefficient",
        "trailing-comma",
        "semicolon",
        "comment",
    ],
)
def test_parse_invalid(text, match):
    with pytest.raises(ValueError, match=match) as caught:
        parse_deformation(text)

    message = str(caught.value)
    assert "AP(a1, a2, a3, a4), LE(e1, e2), Power(scale, exponent), Identity()" in message
    assert not isinstance(caught.value, DeformationDomainError)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("AP(-1, 1, 2, 1)", r"AP coefficient a1 must be a finite number > 0, got -1\.0"),
        ("LE(1, 1 - 1)", r"LE coefficient e2 must be a finite number > 0, got 0\.0"),
        ("Power(1e999, 2)", r"the number 1e999 at position 6 is outside the float64 range"),
    ],
    ids=["AP-negative", "LE-zero", "Power-overflow"],
)
def test_parse_coefficient_error_passes_through(text, match):
    with pytest.raises(ValueError, match=match):
        parse_deformation(text)


def test_parse_rejects_non_string():
    with pytest.raises(TypeError, match=r"deformation notation must be a str, got bytes"):
        parse_deformation(b"LE(1, 0.5)")


def test_as_deformation_accepts():
    instance = LogExp(1, 0.9)

    assert as_deformation(instance) is instance
    assert as_deformation("AP(18/pi, 1, 2, 1)") == ArctanPower(18 / math.pi, 1, 2, 1)
    assert as_deformation(None) is None


@pytest.mark.parametrize("value", [3.0, ["LE(1, 0.9)"], LogExp], ids=["float", "list", "class"])
def test_as_deformation_rejects(value):
    with pytest.raises(TypeError, match=rf"got {type(value).__name__}: .*VerticalDeformation|VerticalDeformation.*got {type(value).__name__}"):
        as_deformation(value)


def test_as_deformation_float_message():
    with pytest.raises(TypeError, match=r"deformation must be a VerticalDeformation, a str in the notation .*, or None; got float: 3\.0"):
        as_deformation(3.0)


def test_equality_and_hash():
    assert ArctanPower(5, 1, 2, 1) == ArctanPower(5.0, 1.0, 2.0, 1.0)
    assert hash(ArctanPower(5, 1, 2, 1)) == hash(ArctanPower(5.0, 1.0, 2.0, 1.0))
    assert ArctanPower(5, 1, 2, 1) != ArctanPower(5, 1, 2, 1.5)
    assert LogExp(1, 0.5) != Power(1, 0.5)
    assert Power(1, 1) != Identity()
    assert Identity() == Identity()
    assert ArctanPower(5, 1, 2, 1) != "AP(5, 1, 2, 1)"
    assert len({LogExp(1, 0.9), LogExp(1.0, 0.9), parse_deformation("LE(1, 9/10)"), Identity(), Identity()}) == 2


class _Scaled(VerticalDeformation):
    """A deformation of one's own that keeps its settings in attributes, not in ``coefficients``."""

    def __init__(self, scale: float = 2.0, mode: str = "linear") -> None:
        self.scale = scale
        self.mode = mode
        self._weights = torch.ones(2)

    def forward(self, loss):
        return self.scale * loss


def test_custom_settings_shown_and_compared():
    assert repr(_Scaled()) == "_Scaled(scale=2, mode='linear')"
    assert repr(_Scaled(1 / 3)) == "_Scaled(scale=0.333333, mode='linear')"
    assert _Scaled(1 / 3).notation == "_Scaled(scale=0.3333333333333333, mode='linear')"
    assert _Scaled() == _Scaled()
    assert hash(_Scaled()) == hash(_Scaled())
    assert _Scaled(2.0) != _Scaled(3.0)
    assert _Scaled(mode="linear") != _Scaled(mode="square")


def test_symbols():
    assert [family.symbol for family in (ArctanPower, LogExp, Power, Identity)] == ["AP", "LE", "Power", "Identity"]


def test_all_sorted():
    assert deformations_module.__all__ == sorted(deformations_module.__all__)
    assert all(hasattr(deformations_module, name) for name in deformations_module.__all__)


@pytest.mark.parametrize("text", ["LE(1e-400, 0.5)", "LE(1, 1e999)", "AP(5, 1, 2, 2.5e-350)"])
def test_parse_number_outside_float64(text):
    number = re.search(r"\d[\d.]*e-?\d+", text).group(0)
    with pytest.raises(ValueError, match=rf"the number {re.escape(number)} at position \d+ is outside the float64 range"):
        parse_deformation(text)


def test_parse_zero_written_with_exponent_is_zero():
    assert parse_deformation("AP(5, 1, 2, 0.00e-999)") == ArctanPower(5, 1, 2, 0)


@pytest.mark.parametrize("deformation", ALL_DEFORMATIONS, ids=repr)
def test_host_formulas_match_tensors(deformation):
    for loss in _loss_grid(deformation).tolist():
        value, slope = deformation.value_and_derivative(loss)
        point = torch.tensor(loss, dtype=torch.float64)
        assert value == pytest.approx(deformation.forward(point).item(), rel=1e-13, abs=1e-300), loss
        assert slope == pytest.approx(deformation.closed_form_derivative(point).item(), rel=1e-13), loss


@pytest.mark.parametrize("deformation", PAPER_DEFORMATIONS, ids=repr)
def test_host_formulas_match_textbook(deformation):
    # Away from the LE bound, where the printed formula loses digits to cancellation.
    bound = _lower_bound(deformation)
    for loss in [0.05, 0.3, 1.0, 2.3, 7.0]:
        if bound is not None and loss <= bound[0] + 0.01:
            continue
        value, slope = deformation.value_and_derivative(loss)
        point = torch.tensor(loss, dtype=torch.float64)
        assert value == pytest.approx(_textbook_value(deformation, loss), rel=1e-11)
        assert slope == pytest.approx(_autograd_derivative(lambda x: _textbook_torch(deformation, x), point).item(), rel=1e-11)


@pytest.mark.parametrize(
    "deformation, outside",
    [
        (LogExp(1, 0.99), [math.log(0.99), -1.0]),
        (LogExp(1, 1.9), [0.5, math.log(1.9)]),
        (ArctanPower(2, 1, 2, 1), [-1e-9]),
        (ArctanPower(2, 3, 0.5, 0.25), [0.0, -1.0]),
        (Power(0.5, 2), [-0.1]),
        (Power(2, 0.5), [0.0]),
        (Identity(), []),
    ],
    ids=repr,
)
def test_host_formulas_nan_outside_domain(deformation, outside):
    for loss in outside + [math.nan, math.inf, -math.inf]:
        value, slope = deformation.value_and_derivative(loss)
        assert math.isnan(value), loss
        assert math.isnan(slope), loss


@pytest.mark.parametrize(
    "deformation, loss", [(ArctanPower(1, 1, 2000, 0), 1e3), (Power(1, 3), 1e200)], ids=["AP", "Power"]
)
def test_host_formulas_overflow_infinite(deformation, loss):
    # Python's ** raises OverflowError where torch gives inf; the method gives inf too.
    assert deformation.value_and_derivative(loss) == (math.inf, math.inf)
    assert torch.isinf(deformation.forward(torch.tensor(loss, dtype=torch.float64)))


class _LogOnePlusOnHost(LogOnePlus):
    def value_and_derivative(self, loss):
        return math.log1p(loss), 1.0 / (1.0 + loss)


class _ShiftedLE(LogExp):
    def forward(self, loss):
        return super().forward(loss) + 1.0


def test_host_formulas_apply():
    for deformation in PAPER_DEFORMATIONS:
        assert deformations_module.host_formulas_apply(deformation), deformation
    # Without host formulas, with host formulas beside their own forward, and with LE's formulas under another forward.
    assert not deformations_module.host_formulas_apply(LogOnePlus())
    assert deformations_module.host_formulas_apply(_LogOnePlusOnHost())
    assert not deformations_module.host_formulas_apply(_ShiftedLE(1, 0.5))
