"""Precision modes (train.precision): which products are exact, which are rounded and by how much.

* fp32: the reference.
* int8: binary-by-binary forward products are int8 GEMMs with int32 sums -- equal to fp32 bit for
  bit, also for sums far above 256; the backward products round g and the result to bf16.
* bf16: a binary-by-binary output is stored in bf16, so sums above 256 are rounded (relative
  error at most 2**-8) while sums up to 256 stay exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flipnet.train.fast as fast
from flipnet.functional import conv_nd, conv_nd_int8, linear_int8
from flipnet.layers import BinaryConv1d, BinaryConv2d, BinaryLinear, binary_modules
from flipnet.models import create_model
from flipnet.train.fast import Precision, select_precision

BF16_REL = 2.0**-8  # unit roundoff of bf16 (8 significant bits): relative error of one rounding


def _signs(*shape: int, seed: int = 0, p_plus: float = 0.5) -> torch.Tensor:
    """±1 with probability ``p_plus`` of +1 (biased signs give sums far above 256)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < p_plus).float() * 2 - 1


# ----------------------------------------------------------------------------- int8 kernels
@pytest.mark.parametrize("pad_value", [0.0, 1.0, -1.0])
@pytest.mark.parametrize("padding, stride, dilation", [(1, 1, 1), ("same", 1, 1), (0, 2, 1), (2, 1, 2), ((1, 0), 1, 1)])
def test_int8_conv_equals_fp32_bit_for_bit(pad_value, padding, stride, dilation) -> None:
    x, w = _signs(2, 64, 7, 7, p_plus=0.9), _signs(5, 64, 3, 3, seed=1, p_plus=0.9)  # sums up to 576 > 256
    ref = conv_nd(x, w, stride=stride, padding=padding, dilation=dilation, pad_value=pad_value)
    got = conv_nd_int8(x, w, stride=stride, padding=padding, dilation=dilation, pad_value=pad_value)
    assert got.dtype == torch.float32 and torch.equal(got, ref)


def test_int8_conv1d_and_zero_one_inputs() -> None:
    x, w = _signs(3, 8, 11), _signs(4, 8, 3, seed=2)
    assert torch.equal(conv_nd_int8(x, w, padding=1, stride=2), conv_nd(x, w, padding=1, stride=2))
    x01 = (x > 0).float()  # ste_heaviside activations are 0/1: also exact
    assert torch.equal(conv_nd_int8(x01, w, padding=1), conv_nd(x01, w, padding=1))


def test_int8_linear_equals_fp32_where_bf16_rounds() -> None:
    x, w = _signs(8, 4000, p_plus=0.9), _signs(6, 4000, seed=3, p_plus=0.8)
    ref = F.linear(x, w)
    assert torch.equal(linear_int8(x, w), ref)
    bf = F.linear(x.bfloat16(), w.bfloat16()).float()
    # bf16 output: exact up to 256, rounded (by at most 2**-8 relative) above
    small = ref.abs() <= 256
    assert torch.equal(bf[small], ref[small])
    err = (bf - ref).abs()
    assert bool((err <= BF16_REL * ref.abs()).all())
    assert err.max() > 0 and ref.abs().max() > 256


def test_bf16_conv_rounds_large_binary_sums() -> None:
    x, w = _signs(2, 256, 5, 5, p_plus=0.9), _signs(8, 256, 3, 3, seed=4, p_plus=0.7)  # 2,304-term sums
    ref = conv_nd(x, w, padding=1)
    bf = conv_nd(x.bfloat16(), w.bfloat16(), padding=1).float()
    err = (bf - ref).abs()
    assert bool((err <= BF16_REL * ref.abs()).all())
    assert bool((err[ref.abs() <= 256] == 0).all())
    assert err.max() > 0  # some large sums are not representable in bf16
    assert torch.equal(conv_nd_int8(x, w, padding=1), ref)


@pytest.mark.parametrize("grad_dtype, tol", [(torch.bfloat16, 4 * BF16_REL), (torch.float32, 1e-6)])
def test_int8_backward_is_rounded_by_grad_dtype_only(grad_dtype, tol) -> None:
    x = _signs(2, 16, 6, 6).requires_grad_()
    w = _signs(4, 16, 3, 3, seed=5).requires_grad_()
    g = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(6))
    out = conv_nd_int8(x, w, padding=1, pad_value=1.0, grad_dtype=grad_dtype)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    rx, rw = torch.autograd.grad(conv_nd(x, w, padding=1, pad_value=1.0), (x, w), g)
    # two bf16 roundings (g, result) of terms whose magnitudes sum to at most sum|g|
    for got, want, bound in ((gx, rx, conv_nd(g.abs(), w.abs().flip(2, 3).transpose(0, 1), padding=1)),
                             (gw, rw, torch.full_like(rw, g.abs().sum().item()))):
        assert got.dtype == want.dtype
        assert bool(((got - want).abs() <= tol * bound + 1e-6).all())


def test_int8_linear_backward() -> None:
    x, w = _signs(5, 32).requires_grad_(), _signs(3, 32, seed=7).requires_grad_()
    g = torch.randn(5, 3, generator=torch.Generator().manual_seed(8))
    gx, gw = torch.autograd.grad(linear_int8(x, w, grad_dtype=torch.float32), (x, w), g)
    assert torch.allclose(gx, g @ w.detach(), atol=1e-6) and torch.allclose(gw, g.t() @ x.detach(), atol=1e-6)


def test_int8_kernels_refuse_what_they_cannot_do_exactly() -> None:
    x, w = _signs(1, 2, 5, 5), _signs(3, 2, 3, 3)
    with pytest.raises(ValueError, match="pad_value"):
        conv_nd_int8(x, w, padding=1, pad_value=0.5)
    with pytest.raises(ValueError, match="batched input"):
        conv_nd_int8(x[0], w, padding=1)


# ----------------------------------------------------------------------------- layers
@pytest.mark.parametrize("weight_mode", ["flip", "latent"])
@pytest.mark.parametrize("pad_value", [0.0, 1.0])
def test_int8_layer_matches_the_float_layer(weight_mode: str, pad_value: float) -> None:
    torch.manual_seed(0)
    conv = BinaryConv2d(32, 8, 3, padding=1, input_quantizer="ste_sign", weight_mode=weight_mode,
                        pad_value=pad_value, scale="learnable", bias=True)
    lin = BinaryLinear(300, 7, input_quantizer="approx_sign", weight_mode=weight_mode)
    for layer, x in ((conv, torch.randn(3, 32, 5, 5)), (lin, torch.randn(4, 300))):
        x.requires_grad_()
        ref = layer(x)
        (rgx,) = torch.autograd.grad(ref.sum(), x)
        layer.int8_forward = True
        got = layer(x)
        (ggx,) = torch.autograd.grad(got.sum(), x)
        layer.int8_forward = False
        assert torch.equal(got, ref)
        torch.testing.assert_close(ggx, rgx, rtol=1e-2, atol=1e-2)  # bf16 backward


def test_int8_forward_is_used_only_where_exact(monkeypatch) -> None:
    calls = []
    import flipnet.layers as layers

    real = layers.conv_nd_int8
    monkeypatch.setattr(layers, "conv_nd_int8", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 4, 6, 6)
    cases = {
        "sign inputs": (BinaryConv2d(4, 4, 3, padding=1, input_quantizer="ste_sign"), True),
        "real inputs": (BinaryConv2d(4, 4, 3, padding=1), False),
        "magnitude-aware weights": (BinaryConv2d(4, 4, 3, input_quantizer="ste_sign",
                                                 weight_quantizer="magnitude_aware_sign"), False),
        "groups": (BinaryConv2d(4, 4, 3, groups=2, input_quantizer="ste_sign"), False),
        "pad 0.5": (BinaryConv2d(4, 4, 3, padding=1, input_quantizer="ste_sign", pad_value=0.5), False),
        "reflect": (BinaryConv2d(4, 4, 3, padding=1, padding_mode="reflect", input_quantizer="ste_sign"), False),
    }
    for name, (layer, expected) in cases.items():
        layer.int8_forward = True
        calls.clear()
        ref_layer_out = layer(x)
        assert bool(calls) == expected, name
        layer.int8_forward = False
        assert torch.equal(layer(x), ref_layer_out), name
    conv1d = BinaryConv1d(4, 3, 3, padding=1, input_quantizer="ste_sign")
    conv1d.int8_forward = True
    x1 = torch.randn(2, 4, 9)
    out = conv1d(x1)
    conv1d.int8_forward = False
    assert torch.equal(out, conv1d(x1))


# ----------------------------------------------------------------------------- select_precision
def test_explicit_settings() -> None:
    assert select_precision("cpu", "fp32") == Precision("fp32", None)
    assert select_precision("cpu", False).name == "fp32" and select_precision("cpu", None).name == "fp32"
    assert select_precision("cpu", "tf32").amp_dtype is None
    bf = select_precision("cpu", True)
    assert bf.name == "bf16" and bf.amp_dtype is torch.bfloat16 and not bf.int8
    i8 = select_precision("cpu", "int8")
    assert i8.int8 and i8.amp_dtype is torch.bfloat16
    with pytest.raises(ValueError, match="fp32, tf32, bf16, int8, auto"):
        select_precision("cpu", "fp16")
    with pytest.raises(ValueError, match="CPU only"):
        select_precision("cuda", "int8")


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx512_bf16", "avx512_vnni"}, "bf16"),  # int8 is opt-in: not faster than bf16 (docs)
        ({"amx_bf16", "amx_int8"}, "bf16"),
        ({"avx2", "avx512_vnni"}, "fp32"),  # no native bf16: emulated bf16 would be slower
        (set(), "fp32"),
    ],
)
def test_auto_on_cpu_follows_the_hardware(monkeypatch, flags, expected) -> None:
    monkeypatch.setattr(fast, "cpu_features", lambda: frozenset(flags))
    model = create_model("binarynet", num_classes=10, in_channels=3, filters=64, dense_units=16)
    p = select_precision("cpu", "auto", model)
    assert p.name == expected and p.reason.startswith("auto") and not p.int8


def test_apply_switches_every_binary_layer() -> None:
    model = create_model("binarynet", num_classes=10, in_channels=3, filters=4, dense_units=8)
    select_precision("cpu", "int8").apply(model)
    assert all(layer.int8_forward for _, layer in binary_modules(model))
    select_precision("cpu", "bf16").apply(model)
    assert not any(layer.int8_forward for _, layer in binary_modules(model))


def test_int8_training_step_matches_fp32_forward_of_binary_layers() -> None:
    """A tiny BinaryNet: with int8 on, every binary-input layer's forward output equals fp32's."""
    torch.manual_seed(0)
    model = create_model("binarynet", num_classes=10, in_channels=3, filters=8, dense_units=16)
    model.eval()
    outs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: outs.setdefault(n, []).append(o.detach().float()))
             for n, m in binary_modules(model) if m.binary_inputs]
    x = torch.randn(2, 3, 32, 32)
    model(x)
    select_precision("cpu", "int8").apply(model)
    model(x)
    for h in hooks:
        h.remove()
    assert len(outs) == 8
    for name, (ref, got) in outs.items():
        assert torch.equal(ref, got), name


@pytest.mark.slow
def test_int8_layers_compile_with_inductor() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        BinaryConv2d(4, 8, 3, padding=1, input_quantizer="ste_sign", weight_mode="flip", pad_value=1.0),
        torch.nn.Flatten(), BinaryLinear(8 * 6 * 6, 5, input_quantizer="ste_sign"),
    )
    x = torch.randn(4, 4, 6, 6, requires_grad=True)
    ref = model(x)
    (ref_gx,) = torch.autograd.grad(ref.sum(), x)
    select_precision("cpu", "int8").apply(model)
    compiled = torch.compile(model)
    out = compiled(x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out, ref)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-2, atol=1e-2)
