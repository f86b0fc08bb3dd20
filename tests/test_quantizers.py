"""Quantizers: forward values, surrogate gradients, module forms, alias resolution, errors."""

from __future__ import annotations

import copy
import functools
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flipnet import quantizers as q

torch.set_num_threads(1)

FLOATS = st.floats(min_value=-10.0, max_value=10.0, allow_nan=False, allow_infinity=False, width=32)
VECTORS = st.lists(FLOATS, min_size=1, max_size=64)

SIGN_FUNCTIONS = [q.ste_sign, q.approx_sign, q.swish_sign]


def _grad(fn, x: torch.Tensor, upstream: torch.Tensor | None = None) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    y.backward(torch.ones_like(y) if upstream is None else upstream)
    assert x.grad is not None
    return x.grad


def _numeric_derivative(f, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central differences of an elementwise float64 function."""
    return (f(x + h) - f(x - h)) / (2 * h)


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("fn", SIGN_FUNCTIONS + [q.sign])
def test_sign_of_zero_is_plus_one(fn) -> None:
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    assert fn(x).tolist() == [1.0, 1.0, 1.0, -1.0]


@given(VECTORS)
@settings(max_examples=60, deadline=None)
def test_sign_functions_output_exactly_pm1(values: list[float]) -> None:
    x = torch.tensor(values)
    expected = torch.tensor([1.0 if v >= 0 else -1.0 for v in values])
    for fn in SIGN_FUNCTIONS:
        out = fn(x)
        assert out.dtype == x.dtype
        assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_sign_keeps_dtype(dtype: torch.dtype) -> None:
    x = torch.tensor([-2.0, 0.0, 3.0], dtype=dtype)
    for fn in SIGN_FUNCTIONS + [q.ste_heaviside, q.magnitude_aware_sign]:
        assert fn(x).dtype == dtype


@given(VECTORS)
@settings(max_examples=40, deadline=None)
def test_ste_heaviside_is_zero_one(values: list[float]) -> None:
    x = torch.tensor(values)
    assert torch.equal(q.ste_heaviside(x), (x > 0).float())


def test_ste_heaviside_of_zero_is_zero() -> None:
    assert q.ste_heaviside(torch.tensor([0.0])).item() == 0.0


def test_magnitude_aware_sign_forward_per_output_channel() -> None:
    w = torch.tensor([[[1.0, -3.0]], [[0.5, 0.5]]])  # (out=2, in=1, k=2)
    out = q.magnitude_aware_sign(w)
    assert torch.equal(out, torch.tensor([[[2.0, -2.0]], [[0.5, 0.5]]]))


def test_magnitude_aware_sign_1d_uses_one_scalar() -> None:
    w = torch.tensor([1.0, -2.0, 0.0])
    assert torch.allclose(q.magnitude_aware_sign(w), torch.tensor([1.0, -1.0, 1.0]))


def test_identity_returns_input() -> None:
    x = torch.randn(5)
    assert q.identity(x) is x
    assert torch.equal(_grad(q.identity, x), torch.ones(5))


# --------------------------------------------------------------------------- backward
@given(VECTORS, st.floats(min_value=0.1, max_value=5.0))
@settings(max_examples=60, deadline=None)
def test_ste_sign_gradient_is_clipped_identity(values: list[float], clip: float) -> None:
    x = torch.tensor(values)
    g = torch.linspace(-1, 1, len(values))
    expected = g * (x.abs() <= clip).float()
    assert torch.equal(_grad(lambda t: q.ste_sign(t, clip), x, g), expected)


def test_ste_sign_default_clip_is_one_and_inclusive() -> None:
    x = torch.tensor([-1.5, -1.0, -0.3, 0.0, 1.0, 1.0001])
    assert _grad(q.ste_sign, x).tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_ste_sign_without_clip_passes_gradient() -> None:
    x = torch.tensor([-100.0, 0.0, 7.0])
    g = torch.tensor([0.5, -2.0, 3.0])
    assert torch.equal(_grad(lambda t: q.ste_sign(t, None), x, g), g)


def _approx_sign_surrogate(x: torch.Tensor) -> torch.Tensor:
    """Bi-Real Net's piecewise polynomial F whose derivative approx_sign uses."""
    inner = torch.where(x < 0, 2 * x + x**2, 2 * x - x**2)
    return torch.where(x.abs() >= 1, torch.sign(x), inner)


def test_approx_sign_gradient_matches_numeric_derivative_of_surrogate() -> None:
    # away from the kinks at -1, 0, 1, where the numeric derivative is not defined
    x = torch.linspace(-1.8, 1.8, 181, dtype=torch.float64)
    x = x[(x.abs() - 1).abs() > 1e-3]
    x = x[x.abs() > 1e-3]
    numeric = _numeric_derivative(_approx_sign_surrogate, x)
    assert torch.allclose(_grad(q.approx_sign, x), numeric, atol=1e-6)


@given(VECTORS)
@settings(max_examples=40, deadline=None)
def test_approx_sign_gradient_formula(values: list[float]) -> None:
    x = torch.tensor(values)
    expected = torch.clamp(2 - 2 * x.abs(), min=0)
    assert torch.allclose(_grad(q.approx_sign, x), expected)


def _swish_sign_surrogate(x: torch.Tensor, beta: float) -> torch.Tensor:
    """BNN+'s SignSwish: 2 sigma(bx) (1 + bx (1 - sigma(bx))) - 1."""
    s = torch.sigmoid(beta * x)
    return 2 * s * (1 + beta * x * (1 - s)) - 1


@pytest.mark.parametrize("beta", [0.5, 5.0, 10.0])
def test_swish_sign_gradient_matches_surrogate(beta: float) -> None:
    x = torch.linspace(-3, 3, 121, dtype=torch.float64)
    ours = _grad(lambda t: q.swish_sign(t, beta), x)
    # exact derivative by autograd of the smooth surrogate ...
    xs = x.clone().requires_grad_(True)
    _swish_sign_surrogate(xs, beta).sum().backward()
    assert torch.allclose(ours, xs.grad, atol=1e-10)
    # ... and by finite differences
    numeric = _numeric_derivative(lambda t: _swish_sign_surrogate(t, beta), x)
    assert torch.allclose(ours, numeric, atol=1e-5)


def test_swish_sign_gradient_peaks_at_beta_and_stays_finite() -> None:
    assert _grad(q.swish_sign, torch.tensor([0.0])).item() == pytest.approx(5.0)
    g = _grad(q.swish_sign, torch.tensor([-1e4, 1e4, 50.0]))
    assert torch.isfinite(g).all() and g.abs().max() < 1e-6


def test_ste_heaviside_gradient() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.5])
    assert _grad(q.ste_heaviside, x).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert _grad(lambda t: q.ste_heaviside(t, None), x).tolist() == [1.0] * 5


def test_magnitude_aware_sign_gradient_is_scaled_ste() -> None:
    w = torch.tensor([[0.5, -3.0, 0.25, -0.25], [0.1, 0.1, -0.1, 0.1]], dtype=torch.float64)
    alpha = w.abs().mean(dim=1, keepdim=True)
    g = torch.arange(8, dtype=torch.float64).reshape(2, 4)
    expected = g * alpha * (w.abs() <= 1).double()
    assert torch.allclose(_grad(q.magnitude_aware_sign, w, g), expected)


# --------------------------------------------------------------------------- modules and aliases
@pytest.mark.parametrize(
    ("alias", "cls", "fn"),
    [
        ("ste_sign", q.SteSign, q.ste_sign),
        ("approx_sign", q.ApproxSign, q.approx_sign),
        ("swish_sign", q.SwishSign, q.swish_sign),
        ("ste_heaviside", q.SteHeaviside, q.ste_heaviside),
        ("magnitude_aware_sign", q.MagnitudeAwareSign, q.magnitude_aware_sign),
        ("identity", q.Identity, q.identity),
    ],
)
def test_alias_module_and_function_agree(alias: str, cls: type, fn) -> None:
    module = q.get_quantizer(alias)
    assert type(module) is cls and q.QUANTIZERS[alias] is cls
    assert q.quantizer_name(module) == alias
    assert type(q.get_quantizer(fn)) is cls
    assert type(q.get_quantizer(cls.__name__)) is cls
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(module(x), fn(x))
    assert torch.equal(_grad(module, x), _grad(fn, x))
    assert q.is_binary_quantizer(module) == (alias != "identity")


def test_alias_spelling_is_forgiving() -> None:
    assert isinstance(q.get_quantizer("  STE-Sign "), q.SteSign)


def test_none_is_identity() -> None:
    module = q.get_quantizer(None)
    assert isinstance(module, q.Identity) and not q.is_binary_quantizer(module)


def test_unknown_alias_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown quantizer 'ste_sgn'.*approx_sign.*ste_sign"):
        q.get_quantizer("ste_sgn")


def test_non_callable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="alias string"):
        q.get_quantizer(3)  # type: ignore[arg-type]


def test_module_is_returned_unchanged() -> None:
    m = q.SwishSign(beta=2.0)
    assert q.get_quantizer(m) is m


def test_partial_of_known_function_keeps_arguments() -> None:
    m = q.get_quantizer(functools.partial(q.ste_sign, clip_value=0.5))
    assert isinstance(m, q.SteSign) and m.clip_value == 0.5
    m = q.get_quantizer(functools.partial(q.swish_sign, beta=2.0))
    assert isinstance(m, q.SwishSign) and m.beta == 2.0


def test_custom_callable_counts_as_full_precision_unless_declared() -> None:
    wrapped = q.get_quantizer(torch.tanh)
    assert q.quantizer_name(wrapped) == "custom" and not q.is_binary_quantizer(wrapped)
    x = torch.randn(4)
    assert torch.equal(wrapped(x), torch.tanh(x))

    def my_sign(t: torch.Tensor) -> torch.Tensor:
        return q.ste_sign(t, 0.5)

    my_sign.precision = 1  # type: ignore[attr-defined]
    assert q.is_binary_quantizer(q.get_quantizer(my_sign))


def test_foreign_module_counts_as_full_precision() -> None:
    assert not q.is_binary_quantizer(torch.nn.Hardtanh())


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, "1", True])
def test_bad_clip_value(bad) -> None:
    with pytest.raises(ValueError, match="clip_value"):
        q.ste_sign(torch.zeros(1), bad)
    with pytest.raises(ValueError, match="clip_value"):
        q.SteHeaviside(bad)
    with pytest.raises(ValueError, match="clip_value"):
        q.MagnitudeAwareSign(bad)


@pytest.mark.parametrize("bad", [0, -2.0, math.inf, math.nan])
def test_bad_beta(bad) -> None:
    with pytest.raises(ValueError, match="beta"):
        q.swish_sign(torch.zeros(1), bad)
    with pytest.raises(ValueError, match="beta"):
        q.SwishSign(bad)


@pytest.mark.parametrize("alias", sorted(q.QUANTIZERS))
def test_modules_pickle_and_deepcopy(alias: str) -> None:
    m = q.get_quantizer(alias)
    x = torch.randn(2, 3)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone) is type(m) and torch.equal(clone(x), m(x))
        assert repr(clone) == repr(m)


def test_extra_repr_shows_arguments() -> None:
    assert repr(q.SteSign(0.5)) == "SteSign(clip_value=0.5)"
    assert repr(q.SwishSign()) == "SwishSign(beta=5.0)"


def test_public_surface_is_pinned() -> None:
    assert sorted(q.__all__) == sorted([
        "Quantizer", "SteSign", "ApproxSign", "SwishSign", "SteHeaviside", "MagnitudeAwareSign", "Identity",
        "QUANTIZERS", "get_quantizer", "sign", "ste_sign", "approx_sign", "swish_sign", "ste_heaviside",
        "magnitude_aware_sign",
    ])
    assert all(hasattr(q, name) for name in q.__all__)
