"""flipnet.functional: the shared convolution with a padding value and the per-channel mean |W|."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flipnet.functional import PADDING_MODES, channel_mean_abs, conv_nd, explicit_padding


def test_explicit_padding_pads_same_like_larq() -> None:
    assert explicit_padding("same", (3, 3)) == [1, 1, 1, 1]
    assert explicit_padding("same", (2, 4), (1, 1), (1, 1)) == [1, 2, 0, 1]  # odd pixel on the right
    assert explicit_padding("same", (3,), 2) == [2, 2]  # dilation widens the kernel
    assert explicit_padding("valid", (3,)) == [0, 0]
    assert explicit_padding((1, 2), (3, 3)) == [2, 2, 1, 1]  # last dimension first
    assert explicit_padding(1, (3, 3)) == [1, 1, 1, 1]


@pytest.mark.parametrize("bad", ["full", (1, 2, 3)])
def test_explicit_padding_refuses_bad_padding(bad) -> None:
    with pytest.raises(ValueError, match="padding"):
        explicit_padding(bad, (3, 3))


@settings(max_examples=25, deadline=None)
@given(
    dim=st.sampled_from([1, 2]),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    groups=st.sampled_from([1, 2]),
    pad_value=st.sampled_from([0.0, 1.0, -1.0, 0.5]),
    bias=st.booleans(),
)
def test_conv_nd_equals_padding_by_hand(dim, kernel, stride, dilation, padding, groups, pad_value, bias) -> None:
    torch.manual_seed(0)
    size = 9
    x = torch.randn((2, 4) + (size,) * dim, dtype=torch.float64)
    w = torch.randn((6, 4 // groups) + (kernel,) * dim, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64) if bias else None
    conv = F.conv1d if dim == 1 else F.conv2d
    want = conv(F.pad(x, [padding] * 2 * dim, value=pad_value), w, b, stride, 0, dilation, groups)
    got = conv_nd(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups, pad_value=pad_value)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_conv_nd_pad_value_shows_only_at_the_border() -> None:
    x = torch.zeros(1, 1, 3, 3)
    w = torch.ones(1, 1, 3, 3)
    out = conv_nd(x, w, padding=1, pad_value=1.0)[0, 0]
    # corner sees 5 padded taps, edge 3, centre none
    assert out.tolist() == [[5.0, 3.0, 5.0], [3.0, 0.0, 3.0], [5.0, 3.0, 5.0]]


@pytest.mark.parametrize("mode", [m for m in PADDING_MODES if m != "zeros"])
@pytest.mark.parametrize("padding", [1, "same"])
def test_conv_nd_padding_modes_match_nn_conv(mode: str, padding) -> None:
    torch.manual_seed(1)
    ref = nn.Conv2d(3, 5, 3, padding=padding, padding_mode=mode, bias=True)
    x = torch.randn(2, 3, 6, 6)
    got = conv_nd(x, ref.weight, ref.bias, padding=padding, padding_mode=mode)
    torch.testing.assert_close(got, ref(x))


def test_conv_nd_same_with_an_even_kernel_matches_torch() -> None:
    torch.manual_seed(2)
    x = torch.randn(1, 2, 7, 7)
    w = torch.randn(3, 2, 2, 4)
    with warnings.catch_warnings():  # torch notes that it copies the input for an even kernel
        warnings.simplefilter("ignore", UserWarning)
        want = F.conv2d(x, w, padding="same")
    torch.testing.assert_close(conv_nd(x, w, padding="same"), want)
    # with a padding value the odd pixel is also on the right/bottom: pad 0 by hand is the same
    torch.testing.assert_close(
        conv_nd(x, w, padding="same", pad_value=0.0), F.conv2d(F.pad(x, [1, 2, 0, 1]), w)
    )
    torch.testing.assert_close(
        conv_nd(x, w, padding="same", pad_value=-1.0), F.conv2d(F.pad(x, [1, 2, 0, 1], value=-1.0), w)
    )


def test_conv_nd_errors() -> None:
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        conv_nd(x, torch.randn(3, 2))
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        conv_nd(x, torch.randn(3, 2, 3, 3), padding=1, padding_mode="mirror")
    with pytest.raises(ValueError, match="needs padding_mode='zeros'"):
        conv_nd(x, torch.randn(3, 2, 3, 3), padding=1, padding_mode="reflect", pad_value=1.0)


def test_channel_mean_abs_is_per_output_channel() -> None:
    w = torch.tensor([[[[1.0, -3.0]]], [[[-2.0, 0.0]]]])  # (2, 1, 1, 2)
    assert channel_mean_abs(w).tolist() == [2.0, 1.0]
    assert channel_mean_abs(torch.tensor([[1.0, -1.0, 4.0]])).tolist() == [2.0]  # dense (out, in)
    assert channel_mean_abs(torch.tensor([-1.5, 2.0])).tolist() == [1.5, 2.0]  # 1-D: its magnitudes
    with pytest.raises(ValueError, match="0-d"):
        channel_mean_abs(torch.tensor(1.0))


def test_channel_mean_abs_passes_the_xnor_gradient() -> None:
    w = torch.tensor([[2.0, -1.0, 0.5, -4.0]], requires_grad=True)
    channel_mean_abs(w).sum().backward()
    assert w.grad.tolist() == [[0.25, -0.25, 0.25, -0.25]]  # sign(W) / n


def test_public_surface_is_pinned() -> None:
    import flipnet.functional as fn

    assert sorted(fn.__all__) == ["PADDING_MODES", "channel_mean_abs", "conv_nd", "conv_nd_int8", "explicit_padding", "linear_int8"]
