"""Binary layers against float PyTorch layers on sign(x), sign(w); weight modes; persistence."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import flipnet
from flipnet.layers import (
    BinaryConv1d,
    BinaryConv2d,
    BinaryLayer,
    BinaryLinear,
    apply_constraints,
    binary_modules,
    binary_parameters,
    named_binary_parameters,
    named_real_parameters,
    real_parameters,
    set_weight_mode,
)
from flipnet.quantizers import MagnitudeAwareSign, SteSign, sign

torch.set_num_threads(1)


def _same_pads(kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[int]:
    """F.pad list for padding='same' (PyTorch puts the odd extra element on the right)."""
    flat: list[int] = []
    for k, d in zip(reversed(kernel), reversed(dilation)):
        total = d * (k - 1)
        flat += [total // 2, total - total // 2]
    return flat


def _reference(layer: BinaryLayer, x: torch.Tensor, binary_inputs: bool = True) -> torch.Tensor:
    """What the layer must compute, from float ops on sign(x) and sign(w)."""
    xin = sign(x) if binary_inputs else x
    w = sign(layer.weight.detach())
    if isinstance(layer, BinaryLinear):
        out = F.linear(xin, w)
        view: tuple[int, ...] = (-1,)
    else:
        n = len(layer.kernel_size)
        conv = F.conv2d if n == 2 else F.conv1d
        if isinstance(layer.padding, str):
            pads = _same_pads(layer.kernel_size, layer.dilation) if layer.padding == "same" else [0] * (2 * n)
        else:
            pads = [p for p in reversed(layer.padding) for _ in range(2)]
        xin = F.pad(xin, pads, value=layer.pad_value)
        out = conv(xin, w, None, layer.stride, 0, layer.dilation, layer.groups)
        view = (-1,) + (1,) * n
    if layer.scale_mode == "xnor":
        out = out * layer.weight.detach().abs().flatten(1).mean(1).view(view)
    elif layer.scale_mode == "learnable":
        out = out * layer.scale.detach().view(view)
    if layer.bias is not None:
        out = out + layer.bias.detach().view(view)
    return out


# ----------------------------------------------------------------------------- equivalence
CONV2D_VARIANTS = [
    dict(),
    dict(stride=2),
    dict(padding=1),
    dict(padding=(2, 1), stride=(1, 2)),
    dict(dilation=2, padding=2),
    dict(groups=2, padding=1),
    dict(padding="same"),
    dict(padding="same", dilation=(1, 2)),
    dict(padding="valid"),
]


@pytest.mark.parametrize("kwargs", CONV2D_VARIANTS)
@pytest.mark.parametrize("scale", ["none", "xnor", "learnable"])
@pytest.mark.parametrize("bias", [False, True])
def test_conv2d_matches_float_conv_on_signs(kwargs: dict, scale: str, bias: bool) -> None:
    torch.manual_seed(0)
    layer = BinaryConv2d(4, 6, 3, bias=bias, input_quantizer="ste_sign", scale=scale, **kwargs)
    if scale == "learnable":
        with torch.no_grad():
            layer.scale.uniform_(0.5, 2.0)
    x = torch.randn(2, 4, 9, 8)
    expected = _reference(layer, x)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    if scale == "none" and not bias:
        # the same numbers through nn.Conv2d itself
        ref = nn.Conv2d(4, 6, 3, bias=False, **kwargs)
        ref.weight.data = sign(layer.weight.detach())
        assert torch.allclose(layer(x), ref(sign(x)), atol=1e-5)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("kwargs", [dict(), dict(stride=2, padding=1), dict(dilation=3, padding="same"), dict(groups=3)])
@pytest.mark.parametrize("bias", [False, True])
def test_conv1d_matches_float_conv_on_signs(kwargs: dict, bias: bool) -> None:
    torch.manual_seed(1)
    layer = BinaryConv1d(3, 6, 4, bias=bias, input_quantizer="ste_sign", **kwargs)
    ref = nn.Conv1d(3, 6, 4, bias=bias, **kwargs)
    ref.weight.data = sign(layer.weight.detach())
    if bias:
        ref.bias.data = layer.bias.detach().clone()
    x = torch.randn(2, 3, 17)
    assert torch.allclose(layer(x), ref(sign(x)), atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale", ["none", "xnor", "learnable"])
def test_linear_matches_float_linear_on_signs(bias: bool, scale: str) -> None:
    torch.manual_seed(2)
    layer = BinaryLinear(7, 5, bias=bias, input_quantizer="ste_sign", scale=scale)
    x = torch.randn(3, 7)
    assert torch.allclose(layer(x), _reference(layer, x), atol=1e-5)
    if scale == "none":
        ref = nn.Linear(7, 5, bias=bias)
        ref.weight.data = sign(layer.weight.detach())
        if bias:
            ref.bias.data = layer.bias.detach().clone()
        assert torch.allclose(layer(x), ref(sign(x)), atol=1e-5)


@pytest.mark.parametrize("scale", ["xnor", "learnable"])
def test_linear_scale_and_bias_follow_the_last_dimension(scale: str) -> None:
    torch.manual_seed(3)
    layer = BinaryLinear(4, 6, bias=True, input_quantizer="ste_sign", scale=scale)
    x = torch.randn(2, 5, 4)  # (batch, tokens, features)
    out = layer(x)
    assert out.shape == (2, 5, 6)
    assert torch.allclose(out, _reference(layer, x), atol=1e-5)
    assert torch.allclose(layer(x[0, 0]), out[0, 0], atol=1e-5)  # 1-D input


@pytest.mark.parametrize("cls", [BinaryConv2d, BinaryConv1d])
def test_unbatched_conv_input(cls) -> None:
    torch.manual_seed(4)
    layer = cls(3, 4, 3, padding=1, bias=True, scale="learnable", input_quantizer="ste_sign", pad_value=-1)
    shape = (2, 3, 6, 5) if cls is BinaryConv2d else (2, 3, 7)
    x = torch.randn(shape)
    assert torch.allclose(layer(x[1]), layer(x)[1], atol=1e-5)


def test_real_inputs_by_default() -> None:
    torch.manual_seed(5)
    layer = BinaryConv2d(2, 3, 3, padding=1)
    assert not layer.binary_inputs
    x = torch.randn(1, 2, 5, 5)
    assert torch.allclose(layer(x), _reference(layer, x, binary_inputs=False), atol=1e-5)


@given(
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    groups=st.sampled_from([1, 2]),
    kernel=st.sampled_from([1, 2, 3]),
    pad_value=st.sampled_from([-1.0, 0.0, 1.0]),
    size=st.integers(5, 9),
)
@settings(max_examples=30, deadline=None)
def test_conv2d_property_against_reference(stride, dilation, padding, groups, kernel, pad_value, size) -> None:
    torch.manual_seed(size)
    layer = BinaryConv2d(
        4, 4, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
        input_quantizer="ste_sign", pad_value=pad_value,
    )
    x = torch.randn(1, 4, size, size + 1)
    assert torch.allclose(layer(x), _reference(layer, x), atol=1e-5)


# ----------------------------------------------------------------------------- pad_value
@pytest.mark.parametrize("pad_value", [-1.0, 1.0])
@pytest.mark.parametrize("padding", [1, (2, 0), "same"])
def test_pad_value_equals_manual_pad(pad_value: float, padding) -> None:
    torch.manual_seed(6)
    layer = BinaryConv2d(3, 5, (3, 4), padding=padding, input_quantizer="ste_sign", pad_value=pad_value)
    x = torch.randn(2, 3, 6, 7)
    if padding == "same":
        pads = _same_pads((3, 4), (1, 1))
    else:
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        pads = [pw, pw, ph, ph]
    manual = F.conv2d(F.pad(sign(x), pads, value=pad_value), sign(layer.weight.detach()))
    out = layer(x)
    assert torch.equal(out, manual)
    zero_padded = BinaryConv2d(3, 5, (3, 4), padding=padding, input_quantizer="ste_sign")
    zero_padded.load_state_dict(layer.state_dict())
    assert zero_padded(x).shape == out.shape
    assert not torch.equal(zero_padded(x), out)  # the border differs, so the pad value is used


def test_pad_value_keeps_inputs_binary_at_the_border() -> None:
    layer = BinaryConv1d(1, 1, 3, padding=1, input_quantizer="ste_sign", pad_value=1.0)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    out = layer(torch.full((1, 1, 4), -5.0))
    assert out.flatten().tolist() == [-1.0, -3.0, -3.0, -1.0]  # (+1 -1 -1), (-1 -1 -1), ...


def test_padding_mode_reflect_matches_nn_conv() -> None:
    torch.manual_seed(7)
    layer = BinaryConv2d(2, 3, 3, padding=1, padding_mode="reflect", input_quantizer="ste_sign")
    ref = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False)
    ref.weight.data = sign(layer.weight.detach())
    x = torch.randn(1, 2, 5, 5)
    assert torch.allclose(layer(x), ref(sign(x)), atol=1e-5)


# ----------------------------------------------------------------------------- gradients
def test_latent_weight_and_input_gradients_are_clipped_ste() -> None:
    torch.manual_seed(8)
    layer = BinaryLinear(6, 4, input_quantizer="ste_sign")
    with torch.no_grad():
        layer.weight.mul_(8)  # some latent weights beyond the clip value 1
    x = (torch.randn(3, 6) * 2).requires_grad_(True)
    g = torch.randn(3, 4)
    layer(x).backward(g)
    w = layer.weight.detach()
    grad_wb = g.t() @ sign(x.detach())  # dL/d sign(W)
    assert torch.allclose(layer.weight.grad, grad_wb * (w.abs() <= 1).float(), atol=1e-5)
    grad_xb = g @ sign(w)
    assert torch.allclose(x.grad, grad_xb * (x.detach().abs() <= 1).float(), atol=1e-5)


def test_xnor_scale_passes_gradient_to_weights() -> None:
    torch.manual_seed(9)
    layer = BinaryLinear(5, 3, scale="xnor", weight_quantizer=SteSign(clip_value=None))
    x = torch.randn(4, 5)
    layer(x).sum().backward()
    w = layer.weight.detach()
    alpha = w.abs().mean(1, keepdim=True)
    xb_sum = x.sum(0, keepdim=True)  # d(sum)/d(sign W) before scaling
    ste_part = alpha * xb_sum.expand_as(w)
    scale_part = (sign(w) * xb_sum).sum(1, keepdim=True) * sign(w) / w.shape[1]
    assert torch.allclose(layer.weight.grad, ste_part + scale_part, atol=1e-5)


def test_learnable_scale_is_trained() -> None:
    layer = BinaryConv2d(2, 3, 3, scale="learnable", input_quantizer="ste_sign")
    layer(torch.randn(2, 2, 5, 5)).pow(2).sum().backward()
    assert layer.scale.grad is not None and layer.scale.grad.abs().sum() > 0


def test_magnitude_aware_weight_quantizer() -> None:
    torch.manual_seed(10)
    layer = BinaryConv2d(2, 3, 3, weight_quantizer="magnitude_aware_sign", input_quantizer="ste_sign")
    x = torch.randn(1, 2, 5, 5)
    alpha = layer.weight.detach().abs().mean(dim=(1, 2, 3))
    expected = F.conv2d(sign(x), sign(layer.weight.detach())) * alpha.view(-1, 1, 1)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert isinstance(layer.weight_quantizer, MagnitudeAwareSign)


# ----------------------------------------------------------------------------- weight modes
@pytest.mark.parametrize("cls,args", [(BinaryConv2d, (3, 4, 3)), (BinaryConv1d, (3, 4, 3)), (BinaryLinear, (5, 4))])
def test_flip_mode_holds_pm1_and_uses_it_as_is(cls, args) -> None:
    torch.manual_seed(11)
    layer = cls(*args, weight_mode="flip", input_quantizer="ste_sign")
    assert layer.weight_mode == "flip"
    assert torch.equal(layer.weight.abs(), torch.ones_like(layer.weight))
    x = torch.randn(2, args[0], 6) if cls is BinaryConv1d else torch.randn(2, args[0], 6, 6)
    if cls is BinaryLinear:
        x = torch.randn(2, args[0])
    out = layer(x)
    assert torch.allclose(out, _reference(layer, x), atol=1e-5)
    out.sum().backward()
    assert layer.weight.grad is not None  # the flip optimizer's input
    with torch.no_grad():
        layer.weight[0].neg_()  # one flipped output channel
    assert torch.allclose(layer(x)[:, 0], -out[:, 0].detach(), atol=1e-5)


def test_flip_mode_gradient_is_unclipped() -> None:
    layer = BinaryLinear(3, 2, weight_mode="flip")
    x = torch.tensor([[5.0, -4.0, 0.5]])
    layer(x).sum().backward()
    assert torch.allclose(layer.weight.grad, x.expand(2, 3))


def test_flip_mode_learnable_scale_starts_at_one() -> None:
    layer = BinaryConv2d(2, 3, 3, weight_mode="flip", scale="learnable")
    assert torch.equal(layer.scale.detach(), torch.ones(3))


def test_latent_learnable_scale_starts_at_mean_abs_weight() -> None:
    layer = BinaryConv2d(2, 3, 3, scale="learnable")
    assert torch.allclose(layer.scale.detach(), layer.weight.detach().abs().mean(dim=(1, 2, 3)))
    w = torch.full_like(layer.weight, -0.25)
    layer.reset_scale(w)
    assert torch.allclose(layer.scale.detach(), torch.full((3,), 0.25))


def test_set_weight_mode_round_trip() -> None:
    torch.manual_seed(12)
    layer = BinaryConv2d(2, 3, 3, input_quantizer="ste_sign")
    x = torch.randn(1, 2, 5, 5)
    before = layer(x).detach()
    layer.set_weight_mode("flip")
    assert layer.weight_mode == "flip" and torch.equal(layer.weight.abs(), torch.ones_like(layer.weight))
    assert torch.equal(layer(x), before)  # same signs, same output
    layer.set_weight_mode("latent")
    assert layer.weight_mode == "latent" and torch.equal(layer(x), before)


def test_model_level_set_weight_mode_skips_real_weight_layers() -> None:
    model = nn.Sequential(
        BinaryConv2d(2, 4, 3, input_quantizer="ste_sign"),
        BinaryConv2d(4, 4, 3, input_quantizer="ste_sign", weight_quantizer=None),
        nn.Conv2d(4, 2, 1),
    )
    real_weight = model[1].weight.detach().clone()
    assert set_weight_mode(model, "flip") is model
    assert model[0].weight_mode == "flip" and model[1].weight_mode == "latent"
    assert torch.equal(model[1].weight, real_weight)
    with pytest.raises(ValueError, match="real weights"):
        model[1].set_weight_mode("flip")


def test_set_weight_mode_errors() -> None:
    layer = BinaryLinear(3, 2, scale="xnor")
    with pytest.raises(ValueError, match="xnor"):
        layer.set_weight_mode("flip")
    with pytest.raises(ValueError, match="xnor"):
        set_weight_mode(nn.Sequential(BinaryLinear(3, 3), layer), "flip")
    with pytest.raises(ValueError, match="weight_mode must be one of"):
        layer.set_weight_mode("binary")
    with pytest.raises(ValueError, match="weight_mode must be one of"):
        set_weight_mode(nn.Sequential(layer), "binary")


def test_latent_weight_clip() -> None:
    torch.manual_seed(13)
    layer = BinaryConv2d(2, 3, 3, weight_clip=0.05)
    assert layer.weight.abs().max() <= 0.05
    with torch.no_grad():
        layer.weight.mul_(100)
    model = nn.Sequential(layer, nn.Sequential(BinaryLinear(2, 2, weight_clip=0.5)))
    with torch.no_grad():
        model[1][0].weight.fill_(3.0)
    apply_constraints(model)
    assert layer.weight.abs().max().item() == pytest.approx(0.05)
    assert torch.equal(model[1][0].weight, torch.full((2, 2), 0.5))


def test_weight_clip_is_ignored_in_flip_mode() -> None:
    layer = BinaryLinear(3, 2, weight_mode="flip", weight_clip=0.5)
    layer.apply_constraint()
    assert torch.equal(layer.weight.abs(), torch.ones(2, 3))


# ----------------------------------------------------------------------------- persistence
def _model() -> nn.Module:
    return nn.Sequential(
        BinaryConv2d(2, 4, 3, padding=1, input_quantizer="ste_sign", pad_value=1.0, scale="learnable", bias=True),
        nn.BatchNorm2d(4),
        BinaryConv1d(4, 4, 2, input_quantizer="approx_sign", weight_mode="flip"),
        nn.Flatten(),
        BinaryLinear(4 * 4, 3, input_quantizer="swish_sign", scale="xnor", weight_clip=1.5),
    )


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = model[1](model[0](x))
    h = model[2](h.flatten(2)[:, :, :5])
    return model[4](model[3](h))


def test_deepcopy_pickle_and_state_dict_round_trip() -> None:
    torch.manual_seed(14)
    model = _model().eval()
    x = torch.randn(2, 2, 3, 3)
    out = _run(model, x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(_run(clone, x), out)
        assert [m.weight_mode for _, m in binary_modules(clone)] == ["latent", "flip", "latent"]
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = _model().eval()
    fresh[2].set_weight_mode("latent")  # restored from the state dict
    fresh.load_state_dict(state)
    assert fresh[2].weight_mode == "flip"
    assert torch.equal(_run(fresh, x), out)


def test_flip_mode_refuses_non_binary_state_dict() -> None:
    layer = BinaryConv2d(2, 3, 3, weight_mode="flip")
    before = layer.weight.detach().clone()
    plain = nn.Conv2d(2, 3, 3, bias=False).state_dict()
    with pytest.raises(ValueError, match="flip mode.*±1.*weight_mode='latent'"):
        layer.load_state_dict(plain)
    assert torch.equal(layer.weight, before)  # nothing was copied
    bad = {"weight": torch.full((3, 2, 3, 3), 0.5), "_extra_state": {"weight_mode": "flip"}}
    latent = BinaryConv2d(2, 3, 3)
    with pytest.raises(ValueError, match="flip mode"):
        latent.load_state_dict(bad)


def test_flip_mode_accepts_binary_plain_state_dict() -> None:
    layer = BinaryConv2d(2, 3, 3, weight_mode="flip")
    signs = sign(torch.randn(3, 2, 3, 3))
    layer.load_state_dict({"weight": signs})  # strict, without the extra state
    assert layer.weight_mode == "flip" and torch.equal(layer.weight, signs)


def test_plain_float_state_dict_loads_strictly_into_latent_layer() -> None:
    conv = nn.Conv2d(2, 3, 3)
    layer = BinaryConv2d(2, 3, 3, bias=True)
    layer.load_state_dict(conv.state_dict())
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)


def test_state_dict_with_unknown_mode_is_refused() -> None:
    layer = BinaryLinear(2, 2)
    state = layer.state_dict()
    state["_extra_state"] = {"weight_mode": "ternary"}
    with pytest.raises(ValueError, match="unknown weight_mode"):
        layer.load_state_dict(state)


# ----------------------------------------------------------------------------- discovery
def test_binary_and_real_parameters_partition_the_model() -> None:
    model = _model()
    model.append(BinaryLinear(3, 3, input_quantizer="ste_sign", weight_quantizer=None))  # real weights
    binary = binary_parameters(model)
    real = real_parameters(model)
    assert {id(p) for p in binary}.isdisjoint({id(p) for p in real})
    assert {id(p) for p in binary} | {id(p) for p in real} == {id(p) for p in model.parameters()}
    assert [n for n, _ in named_binary_parameters(model)] == ["0.weight", "2.weight", "4.weight"]
    assert [n for n, _ in named_real_parameters(model)] == ["0.bias", "0.scale", "1.weight", "1.bias", "5.weight"]
    assert flipnet.binary_parameters is binary_parameters and flipnet.real_parameters is real_parameters


def test_shared_binary_weight_is_listed_once() -> None:
    layer = BinaryLinear(3, 3)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    assert len(binary_parameters(model)) == 1 and real_parameters(model) == []


def test_a_bare_layer_names_its_weight() -> None:
    assert [n for n, _ in named_binary_parameters(BinaryLinear(2, 2))] == ["weight"]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(weight_mode="binary"), "weight_mode must be one of"),
        (dict(scale="xnor2"), "scale must be one of"),
        (dict(weight_clip=0), "weight_clip"),
        (dict(weight_clip=-1.0), "weight_clip"),
        (dict(weight_clip="1"), "weight_clip"),
        (dict(scale="xnor", weight_mode="flip"), "xnor"),
        (dict(weight_mode="flip", weight_quantizer=None), "not 1-bit"),
        (dict(input_quantizer="sgn"), "unknown quantizer"),
        (dict(pad_value=float("nan")), "pad_value"),
        (dict(pad_value="1"), "pad_value"),
        (dict(pad_value=1.0, padding_mode="reflect"), "padding_mode='zeros'"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BinaryConv2d(2, 3, 3, padding=1, **kwargs)


def test_reset_scale_needs_a_learnable_scale() -> None:
    with pytest.raises(ValueError, match="scale='learnable'"):
        BinaryLinear(2, 2).reset_scale()
    with pytest.raises(ValueError, match="does not match"):
        BinaryLinear(2, 2, scale="learnable").reset_scale(torch.ones(3, 2))


def test_check_binary_reports_corrupted_flip_weights() -> None:
    layer = BinaryLinear(2, 2, weight_mode="flip")
    layer.check_binary()
    with torch.no_grad():
        layer.weight[0, 0] = 0.3
    with pytest.raises(ValueError, match="non-binary"):
        layer.check_binary()


def test_repr_names_the_binary_options() -> None:
    text = repr(BinaryConv2d(2, 3, 3, input_quantizer="ste_sign", scale="xnor", weight_clip=1.25, pad_value=-1))
    for part in ("input_quantizer=ste_sign", "weight_mode=latent", "weight_quantizer=ste_sign", "scale=xnor",
                 "weight_clip=1.25", "pad_value=-1"):
        assert part in text
    assert "weight_quantizer" not in repr(BinaryLinear(2, 2, weight_mode="flip")).split("\n")[0]


def test_float64_layers() -> None:
    layer = BinaryConv2d(2, 3, 3, padding=1, input_quantizer="ste_sign", pad_value=1.0, dtype=torch.float64)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    assert layer(x).dtype == torch.float64
    assert torch.allclose(layer(x), _reference(layer, x))


@pytest.mark.parametrize("cls,shape", [(BinaryConv2d, (2, 3, 5, 5)), (BinaryLinear, (2, 3))])
def test_gradcheck_real_inputs_scale_and_bias(cls, shape) -> None:
    """With real inputs the layer is smooth in x, the learnable scale and the bias."""
    torch.manual_seed(15)
    args = (3, 4, 3) if cls is BinaryConv2d else (3, 4)
    kwargs = dict(padding=1, pad_value=0.5) if cls is BinaryConv2d else {}
    layer = cls(*args, bias=True, scale="learnable", dtype=torch.float64, **kwargs)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    scale = layer.scale.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)

    def f(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {"scale": scale, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, scale, bias))


def test_public_surface_is_pinned() -> None:
    import flipnet.layers as layers

    assert sorted(layers.__all__) == sorted([
        "BinaryLayer", "BinaryConv1d", "BinaryConv2d", "BinaryLinear", "binary_modules", "binary_parameters",
        "named_binary_parameters", "real_parameters", "named_real_parameters", "apply_constraints",
        "set_weight_mode",
    ])
    assert all(hasattr(layers, name) for name in layers.__all__)
    assert not hasattr(layers, "_explicit_padding") and not hasattr(layers, "explicit_padding")
