"""Export → load_exported → packed inference reproduces the eval-mode logits, model by model.

Every registered model that export supports, in each mode it builds (bnn, bwn, float twin), with
binary (+1) and zero padding, odd channel counts (not multiples of 8/32/64), batch 1, and
BatchNorm statistics that hit the threshold-folding edge cases: negative γ (the comparison flips),
γ = 0 (a constant output) and zero running variance. Plus BatchNorm/activation configurations
whose export used to give wrong numbers or unreadable files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from flipnet.compress import export_model, load_exported, set_kernel_mode
from flipnet.compress.export import codecs
from flipnet.compress.packed import PackedBinaryConv2d, ThresholdSign
from flipnet.errors import ConfigError, ExportFormatError
from flipnet.layers import BinaryConv2d, binary_modules
from flipnet.models import create_model, list_models
from flipnet.models.reactnet import LearnableBias

#: model -> (small options with odd widths, per-sample input shape)
CASES: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "binary_mlp": ({"input_size": 6, "hidden_sizes": (13, 9)}, (1, 6, 6)),
    "binarynet": ({"input_size": 12, "filters": 5, "dense_units": 11}, (3, 12, 12)),
    "resnet20": ({"base_width": 5}, (3, 16, 16)),
    "resnet18": ({"base_width": 3, "small_input": True}, (3, 16, 16)),
    "birealnet18": ({"base_width": 3, "small_input": True}, (3, 16, 16)),
    "birealnet34": ({"base_width": 3, "rprelu": True}, (3, 40, 40)),
    "reactnet_a": ({"base_width": 3, "small_input": True}, (3, 32, 32)),
}
#: registered models that export refuses (with one sentence), and why
NOT_EXPORTABLE = {"unet": {"base_width": 4, "depth": 1, "input_size": 16}}  # skip connections across resolutions
#: (model, mode) pairs the model refuses to build
NO_MODE = {("birealnet18", "bwn"), ("birealnet34", "bwn")}


def trained_looking(model: nn.Module, seed: int, zero_var: bool) -> nn.Module:
    """BatchNorm statistics and shifts as after training, with folding edge cases in channels 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 10)
                m.running_var.copy_(torch.rand(n, generator=g) * 20 + 0.5)
                if zero_var:
                    m.running_var[0] = 0.0  # var + eps = eps: still an exact fold
                if m.bias is not None:
                    m.bias.copy_(torch.rand(n, generator=g) * 2 - 1)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) * 4 - 2)  # gamma of both signs
                    if n > 2:
                        m.weight[1] = 0.0  # gamma == 0: the sign is a constant
            elif isinstance(m, LearnableBias):
                m.bias.uniform_(-0.5, 0.5, generator=g)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(-0.5, 1.0, generator=g)
            if isinstance(getattr(m, "scale", None), nn.Parameter):
                m.scale.uniform_(-1.5, 1.5, generator=g)  # learnable scales of both signs
    return model.eval()


def assert_same_logits(model: nn.Module, x: torch.Tensor, path: Path) -> nn.Module:
    export_model(model, path)
    loaded = load_exported(path)
    with torch.no_grad():
        ref, got = model(x), loaded(x)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    return loaded


def test_every_registered_model_is_covered_or_refused(tmp_path: Path) -> None:
    assert set(CASES) | set(NOT_EXPORTABLE) == set(list_models()), "add the new model to CASES or NOT_EXPORTABLE"
    for name, kw in NOT_EXPORTABLE.items():
        with pytest.raises(ValueError, match="export"):
            export_model(create_model(name, **kw).eval(), tmp_path / f"{name}.safetensors")


@pytest.mark.parametrize("pad_value", [0.0, 1.0])
@pytest.mark.parametrize("mode", ["bnn", "bwn", "float"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_exported_logits_equal_the_eval_model(tmp_path: Path, name: str, mode: str, pad_value: float) -> None:
    kw, shape = CASES[name]
    torch.manual_seed(3)
    if (name, mode) in NO_MODE:
        with pytest.raises(ConfigError, match="not available"):
            create_model(name, num_classes=7, mode=mode, pad_value=pad_value, **kw)
        return
    model = create_model(name, num_classes=7, mode=mode, pad_value=pad_value, **kw)
    # zero variance only where every BatchNorm feeds a sign: with real activations 1/sqrt(eps)
    # gains compound through the depth and the float reference itself overflows
    trained_looking(model, seed=len(name), zero_var=mode == "bnn")
    x = torch.rand(1, *shape) * 2 - 1  # batch 1
    loaded = assert_same_logits(model, x, tmp_path / "m.safetensors")
    if mode == "bnn":
        binary_in = sum(isinstance(m, BinaryConv2d) and type(m.input_quantizer).__name__ != "Identity"
                        for m in model.modules())
        assert sum(isinstance(m, PackedBinaryConv2d) for m in loaded.modules()) == binary_in


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("options", [
    {"scale": "learnable", "weight_mode": "flip"},
    {"scale": "xnor"},
    {"weight_quantizer": "magnitude_aware_sign"},
])
@pytest.mark.parametrize("name,downsample", [("resnet20", "pad"), ("resnet20", "conv"), ("resnet18", "avgpool_conv"),
                                             ("binarynet", None), ("reactnet_a", None)])
def test_scales_shortcuts_and_backends(tmp_path: Path, name: str, downsample: str | None, options: dict, backend: str) -> None:
    kw, shape = CASES[name]
    kw = dict(kw, **({"downsample": downsample} if downsample else {}))
    previous = set_kernel_mode(backend)
    try:
        for mode in ("bnn", "bwn"):
            torch.manual_seed(5)
            model = trained_looking(create_model(name, num_classes=5, mode=mode, **kw, **options), 11, mode == "bnn")
            assert_same_logits(model, torch.rand(2, *shape) * 2 - 1, tmp_path / f"{mode}.safetensors")
    finally:
        set_kernel_mode(previous)


def test_strides_dilations_groups_biases_and_pad_values(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)

    def bn(n: int, dims: int = 2) -> nn.Module:
        b = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(n)
        with torch.no_grad():
            b.running_mean.uniform_(-8, 8, generator=g)
            b.running_var.uniform_(0.0, 9, generator=g)
            b.weight.uniform_(-2, 2, generator=g)
            b.weight[1] = 0.0
            b.bias.uniform_(-1, 1, generator=g)
        return b

    from flipnet.layers import BinaryLinear

    for stride, dilation, groups, pad_value, padding in [(2, 1, 1, 1.0, 1), (1, 2, 3, 0.0, 2), (1, 1, 1, -1.0, "same"),
                                                         (2, 2, 1, 0.0, 0), (1, 1, 3, 1.0, "same")]:
        model = nn.Sequential(
            BinaryConv2d(3, 9, 3, padding=1, bias=True),  # real input (first layer)
            bn(9), nn.Hardtanh(),
            BinaryConv2d(9, 15, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=True,
                         input_quantizer="ste_sign", pad_value=pad_value),
            nn.MaxPool2d(2, ceil_mode=True), bn(15),
            BinaryConv2d(15, 7, 1, input_quantizer="ste_sign", bias=True), bn(7),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            BinaryLinear(7, 5, input_quantizer="ste_sign", bias=True), bn(5, 1),
        )
        with torch.no_grad():
            for _, m in binary_modules(model):
                m.bias.uniform_(-3, 3, generator=g)
        model.eval()
        assert_same_logits(model, torch.rand(1, 3, 11, 11, generator=g) * 2 - 1, tmp_path / "s.safetensors")


def test_batchnorm_with_buffers_but_tracking_off_uses_its_running_statistics(tmp_path: Path) -> None:
    # eval mode normalises with the buffers whenever they exist; the export used to drop them
    # (and the loaded model then normalised with the statistics of each batch)
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-3, 3)
        bn.running_var.uniform_(0.1, 4)
    bn.track_running_stats = False
    model = nn.Sequential(nn.Conv2d(3, 6, 3), bn).eval()
    assert_same_logits(model, torch.randn(2, 3, 7, 7), tmp_path / "bn.safetensors")
    # and it still folds into thresholds in front of a sign
    model = nn.Sequential(BinaryConv2d(3, 6, 3, input_quantizer="ste_sign"), bn,
                          BinaryConv2d(6, 4, 1, input_quantizer="ste_sign")).eval()
    loaded = assert_same_logits(model, torch.randn(2, 3, 7, 7), tmp_path / "fold.safetensors")
    assert any(isinstance(m, ThresholdSign) for m in loaded)


def test_batchnorm_without_statistics_or_affine_round_trips(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, affine=False, track_running_stats=False)).eval()
    assert_same_logits(model, torch.randn(3, 3, 7, 7), tmp_path / "b.safetensors")


def test_softmax_without_dim_is_refused_at_export_not_at_load(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Softmax()).eval()
    with pytest.raises(ValueError, match="explicit integer dim"):
        export_model(model, tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()
    assert_same_logits(nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.LogSoftmax(dim=1)).eval(),
                       torch.randn(2, 3, 2, 2), tmp_path / "l.safetensors")


def test_channel_counts_from_the_file_are_checked_before_allocating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a hostile file naming 2^40 channels must be refused from its tensor table, not by trying
    # to allocate them
    import json

    from safetensors.torch import save_file

    def doc(layer: dict) -> str:
        return json.dumps({"format": "flipnet-export", "version": 2, "model": None, "input_shape": None,
                           "layers": [layer], "folds": [], "extra": {}})

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a layer was built before its tensors were checked")

    monkeypatch.setattr(codecs, "LearnableBias", forbidden)
    monkeypatch.setattr(codecs.nn, "PReLU", forbidden)
    for layer, role in [({"type": "bias_add", "name": "b", "channels": 2**40, "tensors": {"bias": "0.bias"}}, "0.bias"),
                        ({"type": "prelu", "name": "p", "num_parameters": 2**40, "tensors": {"weight": "0.weight"}}, "0.weight")]:
        path = tmp_path / "hostile.safetensors"
        save_file({role: torch.zeros(3)}, str(path), metadata={"format": "flipnet-export", "flipnet": doc(layer)})
        with pytest.raises(ExportFormatError, match="shape"):
            load_exported(path)
    path = tmp_path / "bn.safetensors"
    save_file({"0.running_mean": torch.zeros(3)}, str(path), metadata={"format": "flipnet-export", "flipnet": doc(
        {"type": "batchnorm", "name": "bn", "num_features": 3, "eps": 1e-5, "dims": 2,
         "tensors": {"running_mean": "0.running_mean"}})})
    with pytest.raises(ExportFormatError, match="running_var"):
        load_exported(path)
