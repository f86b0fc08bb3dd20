"""flipnet.models._init: Keras-convention weight initialisation for recipes that reproduce Keras code."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flipnet.errors import ConfigError
from flipnet.layers import BinaryConv2d, BinaryLinear
from flipnet.models import create_model
from flipnet.models._init import init_weights, list_init_schemes

torch.set_num_threads(1)


def test_glorot_uniform_bounds_and_variance_on_binary_and_float_layers() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(BinaryConv2d(64, 128, 3), nn.Conv2d(3, 64, 3, bias=True), BinaryLinear(512, 1024))
    init_weights(net, "glorot_uniform")
    for layer, (fi, fo) in zip(net, [(64 * 9, 128 * 9), (3 * 9, 64 * 9), (512, 1024)]):
        limit = math.sqrt(6.0 / (fi + fo))
        w = layer.weight.detach()
        assert float(w.abs().max()) <= limit
        assert float(w.abs().max()) > 0.95 * limit
        assert float(w.var()) == pytest.approx(limit**2 / 3, rel=0.05)  # var of U(-l, l)
    assert torch.count_nonzero(net[1].bias) == 0


def test_truncated_normal_schemes_have_the_requested_variance() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(1000, 500)
    init_weights(lin, "glorot_normal")
    assert float(lin.weight.detach().var()) == pytest.approx(2.0 / 1500, rel=0.03)
    init_weights(lin, "he_normal")
    assert float(lin.weight.detach().var()) == pytest.approx(2.0 / 1000, rel=0.03)


def test_torch_and_none_change_nothing_and_unknown_names_are_refused() -> None:
    lin = nn.Linear(4, 3)
    before = lin.weight.clone()
    init_weights(lin, None)
    init_weights(lin, "torch")
    assert torch.equal(lin.weight, before)
    with pytest.raises(ConfigError, match="unknown model.init scheme 'glorot_unifrom'; did you mean 'glorot_uniform'"):
        init_weights(lin, "glorot_unifrom")
    assert "glorot_uniform" in list_init_schemes()


def test_seeded_and_clipped() -> None:
    def draw() -> torch.Tensor:
        torch.manual_seed(3)
        model = create_model("binary_mlp", num_classes=10, in_channels=1, input_size=8, hidden_sizes=[4], weight_clip=1e-3)
        return torch.cat([p.detach().flatten() for p in init_weights(model, "glorot_uniform").parameters()])

    a, b = draw(), draw()
    assert torch.equal(a, b)
    model = create_model("binary_mlp", num_classes=10, in_channels=1, input_size=8, hidden_sizes=[4], weight_clip=1e-3)
    init_weights(model, "glorot_uniform")
    from flipnet.layers import binary_modules

    for _, m in binary_modules(model):
        assert float(m.weight.detach().abs().max()) <= 1e-3 + 1e-9


def test_the_builder_applies_model_init() -> None:
    from flipnet.train.build import build_model
    from flipnet.train.config import load_config

    torch.manual_seed(0)
    default = build_model(load_config("digits_bop"), 10, (1, 8, 8))
    torch.manual_seed(0)
    glorot = build_model(load_config("digits_bop", ["model.init=glorot_uniform"]), 10, (1, 8, 8))
    first = [m for m in glorot.modules() if isinstance(m, BinaryLinear)][0]
    limit = math.sqrt(6.0 / (first.in_features + first.out_features))
    assert float(first.weight.detach().abs().max()) <= limit
    d_first = [m for m in default.modules() if isinstance(m, BinaryLinear)][0]
    assert not torch.equal(first.weight, d_first.weight)
