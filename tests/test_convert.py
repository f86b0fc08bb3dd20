"""binarize(): which layers are converted, what they compute, copies, reports and errors."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flipnet.convert import ConversionReport, binarize
from flipnet.layers import BinaryConv1d, BinaryConv2d, BinaryLayer, BinaryLinear, binary_parameters
from flipnet.quantizers import SteSign, sign

torch.set_num_threads(1)


class Net(nn.Module):
    """stem conv, two blocks, a 1-D branch and a head: 5 convertible layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh())
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8))
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.block1(self.stem(x)))
        h = self.seq(h.flatten(2)).mean(-1)
        return self.head(h)


def _convertible(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}


def test_default_keeps_first_and_last_and_copies() -> None:
    torch.manual_seed(0)
    net = Net()
    out, report = binarize(net, return_report=True)
    assert out is not net
    assert _convertible(net) == {"stem": nn.Conv2d, "block1.0": nn.Conv2d, "block2.0": nn.Conv2d,
                                 "seq": nn.Conv1d, "head": nn.Linear}  # the original is untouched
    assert _convertible(out) == {"stem": nn.Conv2d, "block1.0": BinaryConv2d, "block2.0": BinaryConv2d,
                                 "seq": BinaryConv1d, "head": nn.Linear}
    assert report.converted == ["block1.0", "block2.0", "seq"]
    assert report.kept == {"stem": "keep_first", "head": "keep_last"}
    assert report.real_inputs == [] and report.unmatched_patterns == []
    assert out(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_weights_and_biases_are_copied_and_layer_computes_on_signs() -> None:
    torch.manual_seed(1)
    net = Net()
    out = binarize(net)
    new, old = out.block2[0], net.block2[0]
    assert torch.equal(new.weight, old.weight) and torch.equal(new.bias, old.bias)
    assert (new.stride, new.padding, new.dilation, new.groups) == (old.stride, old.padding, old.dilation, old.groups)
    assert new.weight_mode == "latent" and isinstance(new.input_quantizer, SteSign)
    x = torch.randn(2, 8, 6, 6)
    expected = F.conv2d(sign(x), sign(old.weight), old.bias, stride=2, padding=1)
    assert torch.allclose(new(x), expected, atol=1e-5)


def test_inplace_modifies_and_returns_the_model() -> None:
    net = Net()
    out = binarize(net, inplace=True)
    assert out is net and isinstance(net.block1[0], BinaryConv2d)


def test_converting_everything_gives_first_layer_real_inputs() -> None:
    net = Net()
    out, report = binarize(net, keep_first=False, keep_last=False, return_report=True)
    assert report.converted == ["stem", "block1.0", "block2.0", "seq", "head"]
    assert report.real_inputs == ["stem"]
    assert not out.stem.binary_inputs and out.block1[0].binary_inputs
    assert isinstance(out.head, BinaryLinear) and out.head.binary_inputs
    assert "(real inputs)" in str(report)


def test_keep_patterns_match_names_and_containers() -> None:
    net = Net()
    out, report = binarize(net, keep=["block1", "se?"], return_report=True)
    assert report.converted == ["block2.0"]
    assert report.kept["block1.0"] == "keep pattern 'block1'"
    assert report.kept["seq"] == "keep pattern 'se?'"
    assert type(out.block1[0]) is nn.Conv2d
    out2 = binarize(net, keep="block2.*")  # a single string is one pattern
    assert type(out2.block2[0]) is nn.Conv2d and isinstance(out2.block1[0], BinaryConv2d)


def test_unmatched_pattern_warns() -> None:
    with pytest.warns(UserWarning, match="'blok1' matches no module"):
        _, report = binarize(Net(), keep=["blok1"], return_report=True)
    assert report.unmatched_patterns == ["blok1"]


def test_options_reach_every_converted_layer() -> None:
    torch.manual_seed(2)
    net = Net()
    quantizer = SteSign(clip_value=0.5)
    out = binarize(net, input_quantizer=quantizer, weight_quantizer="approx_sign", scale="xnor",
                   pad_value=-1.0, weight_clip=0.01)
    layers = [m for m in out.modules() if isinstance(m, BinaryLayer)]
    assert len(layers) == 3
    for m in layers:
        assert m.scale_mode == "xnor" and m.weight_clip == 0.01 and m.pad_value == -1.0
        assert m.weight.abs().max() <= 0.01  # clipped once on conversion
        assert m.input_quantizer is not quantizer and m.input_quantizer.clip_value == 0.5
        assert type(m.weight_quantizer).__name__ == "ApproxSign"
    assert layers[0].input_quantizer is not layers[1].input_quantizer  # never shared


def test_pad_value_only_for_binary_inputs() -> None:
    out = binarize(Net(), keep_first=False, pad_value=1.0)
    assert out.stem.pad_value == 0.0  # real image inputs: zero padding kept
    assert out.block1[0].pad_value == 1.0


def test_pad_value_skips_non_zero_padding_modes() -> None:
    net = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), nn.Conv2d(2, 2, 1))
    out = binarize(net, pad_value=-1.0)
    assert out[1].padding_mode == "circular" and out[1].pad_value == 0.0
    x = torch.randn(1, 2, 5, 5)
    ref = nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")
    ref.weight.data, ref.bias.data = sign(net[1].weight.detach()), net[1].bias.detach()
    assert torch.allclose(out[1](x), ref(sign(x)), atol=1e-5)


def test_flip_mode_with_learnable_scale_keeps_output_magnitude() -> None:
    torch.manual_seed(3)
    net = Net()
    out = binarize(net, weight_mode="flip", scale="learnable")
    layer, old = out.block1[0], net.block1[0]
    assert layer.weight_mode == "flip"
    assert torch.equal(layer.weight, sign(old.weight.detach()))
    assert torch.allclose(layer.scale, old.weight.detach().abs().mean(dim=(1, 2, 3)))
    assert len(binary_parameters(out)) == 3


def test_requires_grad_and_training_flags_are_kept() -> None:
    net = Net()
    net.block1[0].weight.requires_grad_(False)
    net.block2[0].bias.requires_grad_(False)
    net.eval()
    out = binarize(net)
    assert not out.block1[0].weight.requires_grad and out.block2[0].weight.requires_grad
    assert not out.block2[0].bias.requires_grad
    assert not out.block1[0].training


def test_shared_layer_is_replaced_everywhere_once() -> None:
    shared = nn.Linear(4, 4)
    net = nn.Sequential(nn.Linear(4, 4), shared, nn.Hardtanh(), shared, nn.Linear(4, 2))
    out, report = binarize(net, return_report=True)
    assert report.converted == ["1"]
    assert isinstance(out[1], BinaryLinear) and out[1] is out[3]


def test_single_layer_model() -> None:
    out, report = binarize(nn.Linear(3, 2), keep_first=False, keep_last=False, return_report=True)
    assert isinstance(out, BinaryLinear) and report.converted == [""] and report.real_inputs == [""]


def test_subclasses_and_binary_layers_are_not_converted() -> None:
    class MyConv(nn.Conv2d):
        pass

    net = nn.Sequential(nn.Linear(2, 2), BinaryLinear(2, 2), nn.MultiheadAttention(2, 1), MyConv(2, 2, 1),
                        nn.Linear(2, 2), nn.Linear(2, 2))
    out, report = binarize(net, return_report=True)
    assert report.converted == ["4"]
    assert type(out[3]) is MyConv and type(out[2].out_proj) is not BinaryLinear


def test_report_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="flipnet.convert"):
        binarize(Net())
    assert "3 layer(s) converted" in caplog.text and "kept       stem  [keep_first]" in caplog.text


def test_report_str_lists_everything() -> None:
    report = ConversionReport(converted=["a"], kept={"b": "keep_first"}, unmatched_patterns=["z*"])
    assert str(report).splitlines() == [
        "binarize: 1 layer(s) converted, 1 kept in full precision",
        "  converted  a",
        "  kept       b  [keep_first]",
        "  pattern 'z*' matched no module",
    ]


def test_binarized_model_trains() -> None:
    torch.manual_seed(4)
    out = binarize(Net())
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    before = out.block1[0].weight.detach().clone()
    F.cross_entropy(out(x), y).backward()
    opt.step()
    assert not torch.equal(out.block1[0].weight, before)


# ----------------------------------------------------------------------------- errors
def test_nothing_to_convert() -> None:
    with pytest.raises(ValueError, match="nothing to convert: Sequential has no nn.Conv1d"):
        binarize(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="all 2 convertible layer\\(s\\) are kept.*keep_first=False"):
        binarize(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="are kept"):
        binarize(Net(), keep=["*"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(weight_mode="ternary"), ValueError, "weight_mode"),
        (dict(scale="mean"), ValueError, "scale"),
        (dict(scale="xnor", weight_mode="flip"), ValueError, "xnor"),
        (dict(weight_mode="flip", weight_quantizer=None), ValueError, "1-bit"),
        (dict(input_quantizer="sing"), ValueError, "unknown quantizer"),
        (dict(weight_clip=-1), ValueError, "weight_clip"),
        (dict(weight_clip=float("inf")), ValueError, "weight_clip"),
        (dict(pad_value=float("nan")), ValueError, "pad_value"),
        (dict(pad_value="1"), ValueError, "pad_value"),
        (dict(keep=[""]), ValueError, "keep"),
        (dict(keep=[3]), ValueError, "keep"),
    ],
)
def test_bad_options_fail_before_touching_the_model(kwargs: dict, error: type, match: str) -> None:
    net = Net()
    with pytest.raises(error, match=match):
        binarize(net, inplace=True, **kwargs)
    assert type(net.block1[0]) is nn.Conv2d


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        binarize([nn.Linear(2, 2)])  # type: ignore[arg-type]


def test_relu_before_sign_warns() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.warns(UserWarning, match="ReLU.*always \\+1.*ste_heaviside"):
        binarize(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        binarize(net, input_quantizer="ste_heaviside")
        binarize(net, input_quantizer=None)  # binary weights only: no sign of the activations


def test_a_config_gives_the_same_model_as_keywords() -> None:
    from flipnet.convert import BinarizeConfig

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    config = BinarizeConfig(scale="learnable", pad_value=1.0, keep="0")
    assert config.keep == ("0",)
    a = binarize(net, config)
    b = binarize(net, scale="learnable", pad_value=1.0, keep="0")
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(a(x), b(x))
    with pytest.raises(ValueError, match="either in config or as keywords, not both \\(got scale\\)"):
        binarize(net, config, scale="xnor")
    with pytest.raises(ValueError, match="scale must be one of"):
        BinarizeConfig(scale="big")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be a BinarizeConfig"):
        binarize(net, {"scale": "xnor"})  # type: ignore[arg-type]


def test_a_registered_handler_converts_a_new_layer_type(monkeypatch) -> None:
    from flipnet import convert
    from flipnet.layers import BinaryLinear

    monkeypatch.setattr(convert, "_HANDLERS", dict(convert._HANDLERS))

    class Dense(nn.Linear):  # a subclass: not converted unless registered
        pass

    net = nn.Sequential(nn.Linear(4, 4), Dense(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="nothing to convert: all 2 convertible layer"):
        binarize(net)

    @convert.register_binarize_handler(Dense)
    def dense(old, config, input_quantizer):
        return BinaryLinear(old.in_features, old.out_features, bias=old.bias is not None,
                            input_quantizer=input_quantizer, weight_quantizer=config.weight_quantizer)

    out, report = binarize(net, return_report=True)
    assert report.converted == ["1"] and isinstance(out[1], BinaryLinear)
    assert torch.equal(out[1].weight, net[1].weight) and torch.equal(out[1].bias, net[1].bias)
    with pytest.raises(ValueError, match="Dense already has a binarize handler"):
        convert.register_binarize_handler(Dense)(dense)
