"""Tests of flipnet.metrics.FlipRatio: flips / (numel · steps) per layer and in total."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import flipnet
from flipnet.layers import BinaryLinear
from flipnet.metrics import FlipRatio
from flipnet.optim import Bop, create_optimizer
from flipnet.quantizers import sign

torch.set_num_threads(1)


def model(weight_mode: str = "flip") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        BinaryLinear(5, 8, weight_mode=weight_mode),
        nn.BatchNorm1d(8),
        nn.Sequential(BinaryLinear(8, 3, input_quantizer="ste_sign", weight_mode=weight_mode)),
    )


def train_and_count(net: nn.Module, opt, steps: int, seed: int) -> list[int]:
    """Train; return the sign changes per binary layer, counted independently of the optimizer."""
    gen = torch.Generator().manual_seed(seed)
    params = flipnet.binary_parameters(net)
    flips = [0] * len(params)
    for _ in range(steps):
        before = [sign(p.detach()) for p in params]
        x, y = torch.randn(12, 5, generator=gen), torch.randint(0, 3, (12,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        for i, (p, b) in enumerate(zip(params, before)):
            flips[i] += int((sign(p.detach()) != b).sum())
    return flips


@pytest.mark.parametrize("binary, kwargs", [("bop", {"gamma": 0.3, "threshold": 1e-4}), ("sgd", {"lr": 0.3})])
def test_ratio_is_flips_over_numel_times_steps(binary, kwargs):
    net = model("flip" if binary == "bop" else "latent")
    opt = create_optimizer(net, binary, kwargs, "adam", {"lr": 1e-2})
    ratio = FlipRatio(net, opt)
    assert ratio.layer_names == ["0", "2.0"]
    flips = train_and_count(net, opt, steps=5, seed=1)
    assert sum(flips) > 0
    out = ratio.compute()
    assert out["0"] == pytest.approx(flips[0] / (40 * 5))
    assert out["2.0"] == pytest.approx(flips[1] / (24 * 5))
    assert out["total"] == pytest.approx(sum(flips) / (64 * 5))
    ratio.reset()
    assert all(math.isnan(v) for v in ratio.compute().values())  # no steps since the reset
    flips = train_and_count(net, opt, steps=2, seed=2)
    assert ratio.compute()["total"] == pytest.approx(sum(flips) / (64 * 2))


def test_works_with_a_bare_flip_optimizer():
    net = model("flip")
    opt = Bop(flipnet.binary_parameters(net), gamma=1.0, threshold=0.0)
    ratio = FlipRatio(net, opt)
    flips = train_and_count(net, opt, steps=3, seed=0)
    assert ratio.compute()["total"] == pytest.approx(sum(flips) / (64 * 3))


def test_untracked_layers_are_left_out():
    net = model("flip")
    opt = Bop([net[0].weight], gamma=0.5)
    ratio = FlipRatio(net, opt)
    assert ratio.layer_names == ["0"]
    assert set(ratio.compute()) == {"0", "total"}


def test_compute_reads_counters_with_one_sync(monkeypatch):
    net = model("flip")
    opt = create_optimizer(net, "bop", {"gamma": 0.5})
    ratio = FlipRatio(net, opt)
    train_and_count(net, opt, steps=1, seed=0)
    calls = []
    original = torch.Tensor.tolist

    def counting_tolist(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() in compute"))
    ratio.compute()
    assert len(calls) == 1


def test_errors():
    net = model("flip")
    with pytest.raises(TypeError, match="needs an optimizer that counts flips"):
        FlipRatio(net, torch.optim.SGD(net.parameters(), lr=0.1))
    other = nn.Sequential(BinaryLinear(2, 2, weight_mode="flip"))
    with pytest.raises(ValueError, match="tracks none of the model's binary weights"):
        FlipRatio(net, Bop(other.parameters()))
