"""What bf16 autocast does to a binary layer (the statement in docs/results.md and docs/recipes.md).

A binary-by-binary dot product is a sum of K terms ±1: an integer s with |s| <= K and the parity
of K. The products and their accumulation are exact (the accumulator is fp32), but a bf16
*output* keeps 8 significant bits: every integer up to 256 is exact, above 256 only every 2nd
(256..512), 4th (512..1024), ... integer is representable, so |s| > 256 is rounded to the
nearest one: an error of up to half that spacing, a relative error of at most 2^-8 (bf16's unit
roundoff; 257 -> 256 is 1/257).
"""

from __future__ import annotations

import pytest
import torch

from flipnet.layers import BinaryLinear

torch.set_num_threads(1)


def _agreeing(k: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """±1 inputs ``(n, k)`` and one ±1 weight row whose dot products cover -k..k."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 2, (1, k), generator=g).float() * 2 - 1
    flips = torch.linspace(0, k, n).round().long()  # input i disagrees with w in flips[i] places
    x = w.repeat(n, 1)
    for i, d in enumerate(flips.tolist()):
        x[i, torch.randperm(k, generator=g)[:d]] *= -1
    return x, w


@pytest.mark.parametrize("k", [255, 256, 1023, 4607])
def test_bf16_output_rounds_binary_sums_above_256(k: int) -> None:
    x, w = _agreeing(k, 2001)
    exact = x @ w.T  # fp32: exact for |s| < 2^24
    assert torch.equal(exact, exact.round())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = x @ w.T
    assert y.dtype == torch.bfloat16
    err = (y.float() - exact).abs()
    small = exact.abs() <= 256
    assert torch.all(err[small] == 0), "sums up to 256 are exact in bf16"
    big = ~small
    if k <= 256:
        assert not big.any()
        return
    # above 256 the error is at most half the bf16 spacing 2^(floor(log2|s|) - 7) ...
    spacing = torch.exp2(torch.floor(torch.log2(exact[big].abs())) - 7)
    assert torch.all(err[big] <= spacing / 2)
    # ... and it happens: odd K gives odd sums, none of which is representable above 256
    wrong = (err[big] > 0).float().mean().item()
    assert wrong == 1.0, f"{wrong:.2%} of the sums above 256 were rounded"
    assert torch.all(err[big] / exact[big].abs() <= 2.0**-8)
    assert (err[big] / exact[big].abs()).max() > 2.0**-9  # 2^-9 would be too optimistic a bound


def test_a_binary_layer_under_bf16_autocast_rounds_its_output_too() -> None:
    k = 1023
    x, w = _agreeing(k, 501, seed=1)
    layer = BinaryLinear(k, 1)
    with torch.no_grad():
        layer.weight.copy_(w)
    exact = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    big = exact.abs() > 256
    assert big.any() and torch.all((y.float() - exact)[big] != 0)
    assert torch.equal(y.float()[~big], exact[~big])


def test_fp32_keeps_binary_sums_exact() -> None:
    x, w = _agreeing(4607, 301, seed=2)
    y = x @ w.T
    assert torch.equal(y, y.round())
    assert torch.equal(y, (x * w).sum(1, keepdim=True, dtype=torch.float64).float())
