"""Property tests of the deformation families over random coefficients and losses."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_vdm.deformations import ArctanPower, LogExp, Power, parse_deformation

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)


def _positive(low, high):
    return st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False)


arctan_powers = st.builds(ArctanPower, _positive(1e-2, 100.0), _positive(1e-2, 10.0), _positive(0.1, 5.0), st.one_of(st.just(0.0), _positive(1e-3, 10.0)))
log_exps = st.builds(LogExp, _positive(1e-2, 10.0), _positive(1e-2, 5.0))
powers = st.builds(Power, _positive(1e-2, 10.0), _positive(0.1, 4.0))
any_deformation = st.one_of(arctan_powers, log_exps, powers)


def _domain_start(deformation):
    """Return the lower end of the sampled loss range, just inside the domain."""
    if isinstance(deformation, LogExp):
        return math.log(deformation.e2)
    return 0.0


@st.composite
def deformation_and_losses(draw):
    """Draw a deformation and two losses inside its domain, at least 1e-3 above its lower end."""
    deformation = draw(any_deformation)
    start = _domain_start(deformation)
    offsets = draw(st.lists(_positive(1e-3, 50.0), min_size=2, max_size=2))
    return deformation, [start + offset for offset in sorted(offsets)]


@PROPERTY_SETTINGS
@given(deformation_and_losses())
def test_derivative_matches_autograd(case):
    deformation, losses = case
    leaf = torch.tensor(losses, dtype=torch.float64, requires_grad=True)

    (expected,) = torch.autograd.grad(deformation.forward(leaf).sum(), leaf)
    closed_form = deformation.derivative(leaf.detach())

    torch.testing.assert_close(closed_form, expected, rtol=1e-9, atol=0.0)


@PROPERTY_SETTINGS
@given(deformation_and_losses())
def test_monotone(case):
    deformation, losses = case
    loss = torch.tensor(losses, dtype=torch.float64)

    values = deformation(loss)

    assert float(values[0]) <= float(values[1])
    assert torch.all(deformation.derivative(loss) >= 0)


@PROPERTY_SETTINGS
@given(deformation_and_losses(), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_finite_inside_domain(case, dtype):
    deformation, losses = case
    loss = torch.tensor(losses, dtype=torch.float64).to(dtype)
    inside = deformation.in_domain(loss.float())

    values = deformation(loss[inside])
    slopes = deformation.derivative(loss[inside])

    assert values.dtype == torch.float32
    assert torch.all(torch.isfinite(values))
    assert torch.all(torch.isfinite(slopes))
    assert torch.all(slopes >= 0)


@PROPERTY_SETTINGS
@given(deformation_and_losses())
def test_float32_matches_float64(case):
    deformation, losses = case
    loss32 = torch.tensor(losses, dtype=torch.float32)

    slopes = deformation.derivative(loss32)
    reference = deformation.derivative(loss32.double())

    # LE loses up to about ulp(ln e2) / (ℓ − ln e2) relative precision next to its bound.
    torch.testing.assert_close(slopes.double(), reference, rtol=1e-3, atol=0.0)


def _wide(low):
    return st.floats(min_value=low, max_value=1e12, allow_nan=False, allow_infinity=False, exclude_min=low == 0.0)


@PROPERTY_SETTINGS
@given(
    st.one_of(
        st.builds(ArctanPower, _wide(0.0), _wide(0.0), _wide(0.0), st.one_of(st.just(0.0), _wide(0.0))),
        st.builds(LogExp, _wide(0.0), _wide(0.0)),
        st.builds(Power, _wide(0.0), _wide(0.0)),
    )
)
def test_notation_round_trip(deformation):
    parsed = parse_deformation(deformation.notation)

    assert parsed == deformation
    assert hash(parsed) == hash(deformation)
    assert parse_deformation(repr(deformation)).coefficients == pytest.approx(deformation.coefficients, rel=1e-5)
