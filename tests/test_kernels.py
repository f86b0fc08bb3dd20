"""Kernel codes (flipnet.compress.codes), histograms and coverage (flipnet.analysis.kernels)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flipnet.analysis.kernels import (
    code_entropy,
    coverage_curve,
    kernel_codes,
    kernel_stats,
    plot_kernel_stats,
    popcount,
    write_kernel_csv,
)
from flipnet.compress.codes import canonical_codes, decode_kernels, encode_kernels, kernel_histogram, negate_codes
from flipnet.layers import BinaryConv2d, BinaryLinear

torch.set_num_threads(1)


def test_all_512_codes_round_trip() -> None:
    codes = torch.arange(512)
    kernels = decode_kernels(codes)
    assert kernels.shape == (512, 3, 3)
    assert set(kernels.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(encode_kernels(kernels), codes)
    # 512 distinct kernels: decode is injective
    assert len({tuple(k.flatten().tolist()) for k in kernels}) == 512


def test_documented_bit_order() -> None:
    k = -torch.ones(3, 3)
    k[0, 0] = 1  # top-left is bit 0
    assert int(encode_kernels(k)) == 1
    k = -torch.ones(3, 3)
    k[2, 2] = 1  # bottom-right is bit 8
    assert int(encode_kernels(k)) == 256
    k = -torch.ones(3, 3)
    k[0, 1] = 1  # row-major: (0, 1) is bit 1, (1, 0) is bit 3
    k[1, 0] = 1
    assert int(encode_kernels(k)) == 2 + 8
    assert int(encode_kernels(torch.ones(3, 3))) == 511
    assert int(encode_kernels(-torch.ones(3, 3))) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-2, 2, allow_nan=False), min_size=36, max_size=36))
def test_encode_real_weights_round_trips_signs(values: list[float]) -> None:
    w = torch.tensor(values, dtype=torch.float32).reshape(2, 2, 3, 3)
    codes = encode_kernels(w)
    assert codes.shape == (2, 2)
    # sign(0) = +1, as everywhere in flipnet
    expected = torch.where(w >= 0, 1.0, -1.0)
    assert torch.equal(decode_kernels(codes), expected)


def test_other_kernel_sizes_and_errors() -> None:
    k = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0]])  # 1×5 kernel
    code = encode_kernels(k)
    assert int(code) == 1 + 4 + 8
    assert torch.equal(decode_kernels(code, (1, 5)), k)
    with pytest.raises(ValueError, match="shape"):
        encode_kernels(torch.ones(9))
    with pytest.raises(ValueError, match="between 1 and 16"):
        encode_kernels(torch.ones(5, 5))
    with pytest.raises(ValueError, match=r"\[0, 511\]"):
        decode_kernels(torch.tensor([512]))
    with pytest.raises(ValueError, match=r"\[0, 511\]"):
        decode_kernels([-1])


def test_negation_and_canonical_codes() -> None:
    codes = torch.arange(512)
    neg = negate_codes(codes)
    assert torch.equal(decode_kernels(neg), -decode_kernels(codes))
    canon = canonical_codes(codes)
    assert int(canon.max()) < 256
    assert torch.equal(canon, canonical_codes(neg))
    assert torch.equal(popcount(codes) + popcount(neg), torch.full((512,), 9))


def test_histogram_coverage_entropy() -> None:
    codes = torch.tensor([5, 5, 5, 7, 7, 511 - 5, 0])
    h = kernel_histogram(codes)
    assert h.shape == (512,) and int(h.sum()) == 7
    assert int(h[5]) == 3 and int(h[7]) == 2 and int(h[506]) == 1 and int(h[0]) == 1
    merged = kernel_histogram(codes, merge_negation=True)
    assert int(merged[5]) == 4 and int(merged[506]) == 0 and int(merged[256:].sum()) == 0
    cov = coverage_curve(h)
    assert cov.shape == (512,)
    assert cov[0] == pytest.approx(3 / 7) and cov[1] == pytest.approx(5 / 7) and cov[3] == pytest.approx(1.0)
    assert np.all(np.diff(cov) >= 0) and cov[-1] == pytest.approx(1.0)
    p = np.array([3, 2, 1, 1]) / 7
    assert code_entropy(h) == pytest.approx(float(-(p * np.log2(p)).sum()))
    assert code_entropy(torch.ones(512)) == pytest.approx(9.0)
    with pytest.raises(ValueError, match="empty"):
        coverage_curve(np.zeros(512))
    with pytest.raises(ValueError, match=r"\[0, 511\]"):
        kernel_histogram(torch.tensor([600]))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),  # full precision: ignored
        BinaryConv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        BinaryConv2d(6, 6, 1),  # 1×1: ignored
        BinaryConv2d(6, 8, 3, weight_mode="flip"),
        nn.Flatten(),
        BinaryLinear(8, 3),
    )


def test_kernel_codes_of_model_layers() -> None:
    m = _model()
    codes = kernel_codes(m)
    assert list(codes) == ["1", "4"]
    assert codes["1"].shape == (24,) and codes["4"].shape == (48,)
    w = m[1].weight.detach()
    assert torch.equal(decode_kernels(codes["1"]).reshape(w.shape), torch.where(w >= 0, 1.0, -1.0))
    assert torch.equal(decode_kernels(codes["4"]).reshape(m[4].weight.shape), m[4].weight.detach())
    with pytest.raises(ValueError, match="no binary convolution"):
        kernel_codes(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_kernel_stats_csv_and_plots(tmp_path) -> None:
    m = _model()
    # make layer "4" very concentrated: every kernel the same pattern or its negation
    with torch.no_grad():
        pattern = decode_kernels(torch.tensor([0b101010101]))[0]
        m[4].weight.copy_(pattern.expand_as(m[4].weight))
        m[4].weight[0].neg_()
    stats = kernel_stats(m)
    assert [s.name for s in stats] == ["1", "4", "total"]
    s4 = stats[1]
    assert s4.n_kernels == 48 and s4.distinct == 2
    assert s4.top(2) == [(0b101010101, 42), (0b010101010, 6)]
    merged = kernel_stats(m, merge_negation=True)[1]
    assert merged.distinct == 1 and merged.coverage_at(1) == 1.0 and merged.entropy_bits == 0.0
    assert stats[-1].n_kernels == 24 + 48
    write_kernel_csv(stats, tmp_path / "k.csv", top=4)
    rows = list(csv.DictReader(open(tmp_path / "k.csv")))
    assert [r["layer"] for r in rows] == ["1", "4", "total"]
    assert rows[1]["top1_code"] == str(0b101010101) and float(rows[1]["top1_share"]) == pytest.approx(42 / 48, abs=1e-4)
    assert float(rows[1]["coverage_top2"]) == 1.0
    paths = plot_kernel_stats(stats, tmp_path / "plots", top=8)
    assert {p.name for p in paths} == {"kernel_coverage.png", "kernel_histogram.png", "kernel_top.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        s4.coverage_at(0)
    assert not math.isnan(s4.entropy_bits)


def test_kernel_codes_skip_binary_layers_with_real_weights() -> None:
    m = nn.Sequential(BinaryConv2d(1, 2, 3, weight_quantizer=None), BinaryConv2d(2, 3, 3))
    assert list(kernel_codes(m)) == ["1"]
    with pytest.raises(ValueError, match="no binary convolution"):
        kernel_codes(nn.Sequential(BinaryConv2d(1, 2, 3, weight_quantizer=None)))
