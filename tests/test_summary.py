"""Model summary: hand-counted parameters, packed memory and MACs on small models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from flipnet.compress._summary import LayerSummary, Summary, summary
from flipnet.layers import BinaryConv2d, BinaryLinear

torch.set_num_threads(1)


def _bnn() -> nn.Sequential:
    return nn.Sequential(
        BinaryConv2d(3, 8, 3, padding=1),  # binary weights, real inputs
        nn.BatchNorm2d(8),
        BinaryConv2d(8, 16, 3, stride=2, padding=1, input_quantizer="ste_sign"),
        nn.BatchNorm2d(16),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def test_hand_counted_bnn() -> None:
    s = summary(_bnn(), (1, 3, 8, 8))
    rows = {r.name: r for r in s.layers}
    assert list(rows) == ["0", "1", "2", "3", "4", "5"]

    r0 = rows["0"]
    assert (r0.type, r0.input_bits, r0.weight_bits, r0.output_shape) == ("BinaryConv2d", 32, 1, (1, 8, 8, 8))
    assert r0.params_by_bits == {1: 8 * 3 * 9}
    assert (r0.macs_binary, r0.macs_float, r0.macs_binary_weight) == (0, 8 * 8 * 8 * 27, 8 * 8 * 8 * 27)
    assert r0.memory_bits == 216

    bn = rows["1"]  # gamma, beta, running mean, running var; not num_batches_tracked
    assert bn.params_by_bits == {32: 4 * 8} and bn.trainable == 16 and bn.macs_float == 0
    assert bn.input_bits is None and bn.weight_bits == 32

    r2 = rows["2"]
    assert (r2.input_bits, r2.weight_bits, r2.output_shape) == (1, 1, (1, 16, 4, 4))
    assert r2.params_by_bits == {1: 16 * 8 * 9}
    assert (r2.macs_binary, r2.macs_float) == (16 * 4 * 4 * 72, 0)

    assert rows["4"].params_by_bits == {} and rows["4"].output_shape == (1, 256)
    assert rows["5"].params_by_bits == {32: 2570} and rows["5"].macs_float == 2560

    assert s.params_by_bits == {1: 1368, 32: 32 + 64 + 2570}
    assert s.total_params == 4034 and s.trainable_params == 4034 - 48
    assert s.memory_bits == 1368 + 32 * 2666 and s.memory_bytes == 10835.0
    assert s.float32_bytes == 4 * 4034
    assert s.compression_ratio == pytest.approx(16136 / 10835)
    assert (s.macs_binary, s.macs_float, s.macs_binary_weight) == (18432, 13824 + 2560, 13824)
    assert s.binary_mac_share == pytest.approx(18432 / 34816)


def test_macs_are_per_example() -> None:
    one = summary(_bnn(), (1, 3, 8, 8))
    four = summary(_bnn(), example_input=torch.randn(4, 3, 8, 8))
    assert (one.macs_binary, one.macs_float) == (four.macs_binary, four.macs_float)
    assert four.layers[0].output_shape == (4, 8, 8, 8) and four.input_shape == (4, 3, 8, 8)


def test_float_model_has_ratio_one_and_no_binary_macs() -> None:
    s = summary(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2, padding=1), nn.ReLU()), (1, 2, 5, 5))
    assert s.macs_float == 4 * 25 * (1 * 9) and s.macs_binary == 0 and s.binary_mac_share == 0.0
    assert s.params_by_bits == {32: 4 * 9 + 4} and s.compression_ratio == 1.0


def test_conv_transpose_and_3d_linear_macs() -> None:
    s = summary(nn.ConvTranspose2d(2, 3, 2, stride=2), (1, 2, 4, 4))
    assert s.macs_float == (2 * 4 * 4) * (3 * 2 * 2)  # = outputs (3*8*8) x fan-in 2
    s = summary(nn.Linear(4, 3), (2, 5, 4))
    assert s.macs_float == 5 * 4 * 3 and s.layers[0].output_shape == (2, 5, 3)


def test_scales_and_magnitude_aware_weights_add_per_channel_floats() -> None:
    s = summary(BinaryLinear(10, 4, scale="xnor", input_quantizer="ste_sign"), (1, 10))
    row = s.layers[0]
    assert row.params_by_bits == {1: 40} and row.extra_floats == 4 and row.memory_bits == 40 + 4 * 32
    assert s.float32_bytes == 4 * 44 and s.macs_binary == 40
    s = summary(BinaryLinear(10, 4, weight_quantizer="magnitude_aware_sign"), (1, 10))
    assert s.layers[0].extra_floats == 4
    s = summary(BinaryLinear(10, 4, scale="learnable", bias=True, weight_mode="flip"), (1, 10))
    assert s.layers[0].params_by_bits == {1: 40, 32: 8} and s.layers[0].extra_floats == 0


def test_real_weight_binary_layer_counts_as_float() -> None:
    s = summary(BinaryLinear(6, 2, input_quantizer="ste_sign", weight_quantizer=None), (1, 6))
    row = s.layers[0]
    assert (row.input_bits, row.weight_bits) == (1, 32)
    assert row.params_by_bits == {32: 12} and row.macs_float == 12 and row.macs_binary_weight == 0


def test_shared_module_counts_parameters_once_and_every_call() -> None:
    shared = BinaryLinear(4, 4, input_quantizer="ste_sign")
    s = summary(nn.Sequential(shared, nn.ReLU(), shared), (1, 4))
    rows = [r for r in s.layers if r.type == "BinaryLinear"]
    assert len(rows) == 1 and rows[0].calls == 2
    assert rows[0].params_by_bits == {1: 16} and rows[0].macs_binary == 32


def test_module_with_its_own_parameters_and_children() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))
            self.fc = nn.Linear(3, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.gain

    s = summary(Block(), (2, 3))
    assert [(r.name, r.params) for r in s.layers] == [("", 3), ("fc", 9)]
    assert s.total_params == sum(p.numel() for p in Block().parameters())


def test_unused_module_with_parameters_still_counts() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(2, 2)
            self.unused = nn.Linear(2, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    s = summary(Net(), (1, 2))
    unused = [r for r in s.layers if r.name == "unused"][0]
    assert unused.calls == 0 and unused.output_shape is None and unused.params == 15
    assert "unused" in s.table()


def test_model_state_is_untouched() -> None:
    model = _bnn().train()
    model[3].eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    summary(model, example_input=torch.randn(2, 3, 8, 8))
    assert model.training and model[0].training and not model[3].training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks for m in model.modules())


def test_multiple_inputs() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.fc(a + b)

    s = summary(Two(), example_input=(torch.randn(1, 3), torch.randn(1, 3)))
    assert s.macs_float == 6 and s.input_shape == (1, 3)


def test_table_and_str() -> None:
    s = summary(_bnn(), (1, 3, 8, 8))
    text = s.table()
    assert str(s) == text
    lines = text.splitlines()
    assert lines[0] == "Model: Sequential   input: 1x3x8x8"
    assert lines[2].split()[:5] == ["Layer", "Type", "In", "bits", "W"]
    row = [line for line in lines if line.startswith("2 ")][0].split()
    assert row == ["2", "BinaryConv2d", "1", "1", "1x16x4x4", "1,152", "0", "0.14", "18,432", "0", "0"]
    total = [line for line in lines if line.startswith("Total ") and "params" not in line][0].split()
    assert total == ["Total", "1,368", "2,666", "10.58", "18,432", "16,384", "13,824"]
    assert "Model size (packed)         10.58 KiB (10,835 B)" in lines
    assert "Compression ratio           1.49x" in lines
    assert "Binary share of MACs        52.94 %" in lines


def test_to_dict_is_json_ready() -> None:
    s = summary(_bnn(), (1, 3, 8, 8))
    d = json.loads(json.dumps(s.to_dict()))
    assert d["model"] == "Sequential" and d["input_shape"] == [1, 3, 8, 8]
    assert d["totals"]["params_by_bits"] == {"1": 1368, "32": 2666}
    assert d["totals"]["memory_bytes"] == 10835.0 and d["totals"]["macs_binary"] == 18432
    assert d["layers"][2]["output_shape"] == [1, 16, 4, 4] and d["layers"][2]["params"] == 1152


def test_model_without_parameters() -> None:
    s = summary(nn.ReLU(), (1, 3))
    assert math.isnan(s.compression_ratio) and math.isnan(s.binary_mac_share)
    assert s.to_dict()["totals"]["compression_ratio"] is None
    assert "Compression ratio           -" in s.table()


def test_layer_summary_properties() -> None:
    row = LayerSummary(name="x", type="T", params_by_bits={1: 16, 32: 2}, memory_bits=80)
    assert row.params == 18 and row.memory_bytes == 10.0
    assert Summary("M", (1,), [row]).total_params == 18


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((), {}, "exactly one of input_size"),
        (((1, 3),), {"example_input": torch.zeros(1, 3)}, "exactly one of input_size"),
        (((1, 0, 3),), {}, "positive ints"),
        ((3,), {}, "positive ints"),
        (((),), {}, "positive ints"),
        (((1.5, 3),), {}, "positive ints"),
        ((2.0,), {}, "positive ints"),
        (("13",), {}, "positive ints"),
        ((), {"example_input": ()}, "example_input"),
    ],
)
def test_bad_arguments(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        summary(nn.Linear(3, 2), *args, **kwargs)


def test_failing_forward_names_the_input_shape() -> None:
    model = _bnn()
    with pytest.raises(RuntimeError, match=r"failed on an input of shape \(1, 3, 9, 9\).*input_size"):
        summary(model, (1, 3, 9, 9))
    assert all(not m._forward_hooks for m in model.modules()) and model.training


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        summary("model", (1, 3))  # type: ignore[arg-type]


def test_non_persistent_buffers_are_not_counted() -> None:
    layer = nn.Linear(2, 2, bias=False)
    layer.register_buffer("cache", torch.zeros(5), persistent=False)
    layer.register_buffer("stored", torch.zeros(3))
    assert summary(layer, (1, 2)).params_by_bits == {32: 4 + 3}


def test_the_example_in_docs_summary_md_prints_what_the_page_shows(capsys: pytest.CaptureFixture[str]) -> None:
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "summary.md").read_text()
    code, shown = re.search(r"```python\n(.*?)```\s*\nprints\s*\n\n```\n(.*?)```", page, re.S).groups()  # type: ignore[union-attr]
    exec(compile(code, "docs/summary.md", "exec"), {})
    assert capsys.readouterr().out.strip() == shown.strip()
