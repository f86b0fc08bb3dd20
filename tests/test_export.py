"""Export: one safetensors file, bit-packed weights, folded BatchNorm, same logits; bad files rejected."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

from flipnet.compress import export_model, load_exported, read_export_metadata, set_kernel_mode
from flipnet.compress.export import EXPORT_FORMAT
from flipnet.compress.packed import PackedBinaryConv2d, PackedBinaryLinear, ThresholdSign
from flipnet.errors import ExportFormatError
from flipnet.layers import BinaryConv2d, BinaryLinear, binary_modules
from flipnet.models import create_model


def randomize_bn(model: nn.Module, seed: int = 0, negative_gamma: bool = True) -> nn.Module:
    """Trained-looking BatchNorm statistics (and γ of both signs where the layer has γ)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 40)
                m.running_var.copy_(torch.rand(n, generator=g) * 60 + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(n, generator=g) * 2 - 1)
                if m.weight is not None:
                    lo = -2.0 if negative_gamma else 0.1
                    m.weight.copy_(torch.rand(n, generator=g) * (2.0 - lo) + lo)
    return model.eval()


def small_binarynet(**kw: Any) -> nn.Module:
    return create_model("binarynet", num_classes=10, in_channels=3, input_size=12, filters=8, dense_units=32, **kw)


def roundtrip(model: nn.Module, tmp_path: Path, x: torch.Tensor, name: str = "m") -> tuple[nn.Module, dict]:
    path = tmp_path / f"{name}.safetensors"
    doc = export_model(model, path, metadata={"model": {"name": name, "kwargs": {}}})
    loaded = load_exported(path)
    with torch.no_grad():
        ref, got = model(x), loaded(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(ref.argmax(1), got.argmax(1))
    return loaded, doc


@pytest.fixture(params=["c", "torch"])
def backend(request: pytest.FixtureRequest) -> Any:
    previous = set_kernel_mode("auto" if request.param == "c" else "torch")
    yield request.param
    set_kernel_mode(previous)


def test_binary_mlp_round_trip_with_folding(tmp_path: Path, backend: str) -> None:
    torch.manual_seed(0)
    model = randomize_bn(create_model("binary_mlp", num_classes=10, input_size=8, hidden_sizes=(96, 70)))
    loaded, doc = roundtrip(model, tmp_path, torch.rand(16, 1, 8, 8) * 2 - 1)
    assert doc["folds"] == [{"layer": "fc2", "batchnorm": "bn2", "threshold": 4}]
    assert sum(isinstance(m, PackedBinaryLinear) for m in loaded) == 2
    assert sum(isinstance(m, ThresholdSign) for m in loaded) == 1
    assert doc["model"] == {"name": "m", "kwargs": {}} and doc["input_shape"] == [1, 8, 8]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weight_mode": "flip", "pad_value": 1.0},
        {"scale": "learnable", "pad_value": -1.0},
        {"dropout": 0.3},
    ],
)
def test_binarynet_round_trip_with_folding(tmp_path: Path, backend: str, options: dict) -> None:
    torch.manual_seed(1)
    model = randomize_bn(small_binarynet(**options))
    if options.get("scale") == "learnable":  # scales of both signs: folding must stay exact (or be skipped)
        with torch.no_grad():
            for i, (_, m) in enumerate(binary_modules(model)):
                m.scale.uniform_(-1.5, 1.5) if i % 2 else m.scale.uniform_(0.2, 1.5)
    x = torch.rand(6, 3, 12, 12) * 2 - 1
    loaded, doc = roundtrip(model, tmp_path, x)
    assert len(doc["folds"]) >= 4
    assert sum(isinstance(m, PackedBinaryConv2d) for m in loaded) == 5
    # the float first layer and the logits BatchNorm stay in float
    assert doc["layers"][0]["type"] == "binary_conv" and doc["layers"][0]["input"] is None
    assert doc["layers"][-1]["type"] == "batchnorm"


def test_exported_binary_weights_are_32x_smaller(tmp_path: Path) -> None:
    model = randomize_bn(create_model("binarynet", num_classes=10, in_channels=3, input_size=32, filters=16, dense_units=64))
    path = tmp_path / "b.safetensors"
    export_model(model, path)
    from safetensors import safe_open

    n_binary = sum(m.weight.numel() for _, m in binary_modules(model))
    with safe_open(str(path), "pt") as f:
        bit_bytes = sum(f.get_tensor(k).numel() for k in f.keys() if k.endswith("weight_bits"))
        for k in f.keys():
            if k.endswith("weight_bits"):
                assert f.get_tensor(k).dtype == torch.uint8
    # one bit per weight, each output channel's row padded to whole bytes (conv1: 3*3*3 = 27 bits -> 4 bytes)
    expected = sum(m.weight.shape[0] * -(-m.weight[0].numel() // 8) for _, m in binary_modules(model))
    assert bit_bytes == expected
    assert n_binary * 4 / bit_bytes > 31.9
    assert path.stat().st_size < n_binary * 4 / 16  # the whole file, JSON metadata and thresholds included


def test_weight_bits_are_numpy_unpackbits_readable(tmp_path: Path) -> None:
    layer = BinaryConv2d(5, 3, 3, input_quantizer="ste_sign", weight_mode="flip")
    model = nn.Sequential(layer, nn.Flatten())
    path = tmp_path / "w.safetensors"
    doc = export_model(model, path)
    from safetensors.numpy import load_file

    arrays = load_file(str(path))
    bits = arrays[doc["layers"][0]["tensors"]["weight_bits"]]
    w = np.unpackbits(bits, axis=1, count=5 * 9).reshape(3, 5, 3, 3).astype(np.float32) * 2 - 1
    np.testing.assert_array_equal(w, layer.weight.detach().numpy())


def test_qbn_layers_export_as_indices_and_codebook(tmp_path: Path) -> None:
    from flipnet.compress.qbn import apply_qbn

    torch.manual_seed(2)
    model = randomize_bn(small_binarynet())
    apply_qbn(model, k=3)
    loaded, doc = roundtrip(model, tmp_path, torch.rand(4, 3, 12, 12) * 2 - 1)
    qbn = [layer for layer in doc["layers"] if layer.get("storage") == "qbn"]
    assert qbn and all(layer["qbn_k"] == 3 for layer in qbn)


def test_mixed_layers_and_activations_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        BinaryConv2d(8, 8, 3, padding="same", groups=2, input_quantizer="ste_sign"),
        nn.BatchNorm2d(8),
        nn.Hardtanh(),
        BinaryConv2d(8, 6, 3, padding=1, input_quantizer="ste_sign", bias=True, weight_quantizer="magnitude_aware_sign"),
        nn.BatchNorm2d(6),
        nn.AvgPool2d(2),
        BinaryConv2d(6, 4, 1, input_quantizer="ste_heaviside"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        BinaryLinear(4, 3, input_quantizer="ste_sign", bias=True),
        nn.LogSoftmax(dim=1),
    )
    randomize_bn(model)
    roundtrip(model, tmp_path, torch.randn(3, 3, 8, 8))


def test_unexportable_models_raise_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nn.Sequential"):
        export_model(nn.Linear(2, 2), tmp_path / "x.safetensors")
    class Residual(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + super().forward(x)

    with pytest.raises(ValueError, match="its own forward"):
        export_model(nn.Sequential(Residual(nn.ReLU())), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="cannot export a LSTM"):
        export_model(nn.Sequential(nn.LSTM(2, 2)), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="JSON"):
        export_model(nn.Sequential(nn.Flatten()), tmp_path / "x.safetensors", metadata={"bad": object()})


# ----------------------------------------------------------------------------- malformed files
def _write_with_header(path: Path, src: Path, edit: Callable[[dict], None]) -> None:
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _edit_doc(fn: Callable[[dict], None]) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        doc = json.loads(header["__metadata__"]["flipnet"])
        fn(doc)
        header["__metadata__"]["flipnet"] = json.dumps(doc)

    return edit


@pytest.fixture(scope="module")
def good_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(4)
    model = randomize_bn(create_model("binary_mlp", num_classes=10, input_size=8, hidden_sizes=(64, 64)))
    path = tmp_path_factory.mktemp("export") / "good.safetensors"
    export_model(model, path)
    return path


def _set_shape(doc: dict) -> None:
    doc["layers"][3]["weight_shape"] = [64, 128]


def _set_type(doc: dict) -> None:
    doc["layers"][1]["type"] = "transformer"


def _drop_tensor(doc: dict) -> None:
    doc["layers"][3]["tensors"].pop("weight_bits")


def _bad_threshold(doc: dict) -> None:
    doc["layers"][4]["channels"] = 65


def _bad_stride(doc: dict) -> None:
    doc["layers"][1]["weight_shape"] = "64x64"


def _real_with_tensor_list(doc: dict) -> None:
    doc["layers"][1].update(type="real_linear", order="bias_scale", tensors=["1.weight_bits"])


def _huge_eps(doc: dict) -> None:
    doc["layers"][2]["eps"] = 10**400


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p, g: None, "no export file"),
        (lambda p, g: p.write_bytes(b""), "too short"),
        (lambda p, g: p.write_bytes(g.read_bytes()[:-40]), "malformed"),
        (lambda p, g: p.write_bytes(g.read_bytes()[:200]), "truncated"),
        (lambda p, g: p.write_bytes(b"\xff" * 64), "truncated"),
        (lambda p, g: p.write_bytes(struct.pack("<Q", 4) + b"{{{{"), "not JSON"),
        (lambda p, g: _write_with_header(p, g, lambda h: h.pop("__metadata__")), "not a flipnet export"),
        (lambda p, g: _write_with_header(p, g, _edit_doc(lambda d: d.update(version=99))), "version 99"),
        (lambda p, g: _write_with_header(p, g, _edit_doc(lambda d: d.update(format="other"))), "does not describe"),
        (lambda p, g: _write_with_header(p, g, _edit_doc(_set_shape)), "shape"),
        (lambda p, g: _write_with_header(p, g, _edit_doc(_set_type)), "unknown layer type"),
        (lambda p, g: _write_with_header(p, g, _edit_doc(_drop_tensor)), "missing tensor 'weight_bits'"),
        (lambda p, g: _write_with_header(p, g, _edit_doc(_bad_threshold)), "shape"),
        (lambda p, g: _write_with_header(p, g, _edit_doc(_bad_stride)), "wrong type"),
        (lambda p, g: _write_with_header(p, g, lambda h: h["3.weight_bits"].update(shape=[64, 16])), "malformed"),
        # untrusted JSON of the wrong kind must give ExportFormatError, not AttributeError / OverflowError
        (lambda p, g: _write_with_header(p, g, _edit_doc(_real_with_tensor_list)), "corrupt"),
        (lambda p, g: _write_with_header(p, g, _edit_doc(_huge_eps)), "corrupt"),
    ],
)
def test_malformed_files_raise_export_format_error(tmp_path: Path, good_file: Path, make: Callable, message: str) -> None:
    bad = tmp_path / "bad.safetensors"
    make(bad, good_file)
    with pytest.raises(ExportFormatError, match=message):
        load_exported(bad)


def test_other_safetensors_file_is_not_an_export(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ExportFormatError, match="not a flipnet export"):
        read_export_metadata(path)
    with pytest.raises(ExportFormatError, match="no export file"):
        read_export_metadata(path.parent / "missing.safetensors")


def test_metadata_is_readable_without_tensors(good_file: Path) -> None:
    doc = read_export_metadata(good_file)
    assert doc["format"] == EXPORT_FORMAT and doc["version"] == 1
    assert [layer["type"] for layer in doc["layers"]][:3] == ["flatten", "binary_linear", "batchnorm"]


# ----------------------------------------------------------------------------- CLI
def test_cli_export_of_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flipnet.cli import main
    from flipnet.train import load_config
    from flipnet.train.checkpoint import save_checkpoint
    from flipnet.train.config import config_to_dict

    torch.manual_seed(5)
    model = randomize_bn(create_model("binary_mlp", num_classes=10, in_channels=1, input_size=8, hidden_sizes=[256, 256]))
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last.pt", {
        "model": model.state_dict(), "config": config_to_dict(load_config("digits_bop")), "epoch": 1, "step": 1,
        "meta": {"num_classes": 10, "input_shape": [1, 8, 8]},
    })
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run), "--out", str(out), "--checkpoint", "last"]) == 0
    text = capsys.readouterr().out
    assert "folded" in text and "same predictions: True" in text
    doc = read_export_metadata(out)
    assert doc["model"]["name"] == "binary_mlp" and doc["extra"]["checkpoint"] == "last"
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out)(x), model(x))
    assert main(["export", str(tmp_path / "nothing")]) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["binarynet", "resnet20"])
def test_exported_model_runs_on_cuda(tmp_path: Path, name: str) -> None:
    torch.manual_seed(6)
    if name == "binarynet":
        model = randomize_bn(small_binarynet())
    else:
        model = randomize_bn(create_model("resnet20", num_classes=10, in_channels=3, base_width=4))
    path = tmp_path / "g.safetensors"
    export_model(model, path)
    x = torch.rand(4, 3, 12, 12) * 2 - 1
    with torch.no_grad():
        ref = model(x)
        got = load_exported(path, device="cuda")(x.cuda()).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_cli_summary_of_a_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    from flipnet.cli import main

    assert main(["summary", "digits_bop"]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "BinaryLinear" in out
    assert main(["summary", "digits_bop", "--input-size", "2", "1", "8", "8", "--num-classes", "4"]) == 0
    assert "2x4" in capsys.readouterr().out.replace(" ", "")
    assert main(["summary", "digits_bop", "--input-size", "0", "1"]) == 2


def test_cli_summary_of_a_recipe_shows_the_model_it_trains(capsys: pytest.CaptureFixture[str]) -> None:
    # Regression: the summary of digits_bop used the model's default 1x28x28 input (784 inputs,
    # ~270k parameters) instead of the 8x8 digits the recipe trains on (85,002 parameters).
    from flipnet.cli import main
    from flipnet.train import load_config
    from flipnet.train.build import recipe_model

    model = recipe_model(load_config("digits_bop"))
    assert sum(p.numel() for p in model.parameters()) == 85_002
    assert main(["summary", "digits_bop"]) == 0
    out = capsys.readouterr().out
    assert "input: 1x1x8x8" in out
    assert re.search(r"Trainable params\s+85,002\b", out)


def test_real_conv_with_same_padding_and_reflect_mode_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"), nn.ReLU()).eval()
    path = tmp_path / "same.safetensors"
    export_model(model, path)
    x = torch.randn(2, 3, 5, 6)
    torch.testing.assert_close(load_exported(path)(x), model(x))


def test_qbn_layer_with_oversized_kernels_is_refused(tmp_path: Path) -> None:
    """Codebook storage expands: a small file must not decode into an arbitrarily large weight."""
    from safetensors.torch import save_file

    layer = {"type": "binary_conv", "name": "c", "input": {"op": "sign"}, "weight_shape": [1, 1, 1, 4096],
             "storage": "qbn", "qbn_k": 1, "stride": [1, 1], "padding": [0, 0], "pads": [0, 0, 0, 0],
             "dilation": [1, 1], "groups": 1, "padding_mode": "zeros", "pad_value": 0.0,
             "tensors": {"qbn_indices": "0.qbn_indices", "qbn_codebook_bits": "0.qbn_codebook_bits"}}
    doc = {"format": EXPORT_FORMAT, "version": 1, "model": None, "input_shape": None, "layers": [layer],
           "folds": [], "extra": {}}
    path = tmp_path / "big.safetensors"
    save_file({"0.qbn_indices": torch.zeros(1, dtype=torch.uint8),
               "0.qbn_codebook_bits": torch.zeros(2, 512, dtype=torch.uint8)},
              str(path), metadata={"format": EXPORT_FORMAT, "flipnet": json.dumps(doc)})
    with pytest.raises(ExportFormatError, match="too large"):
        load_exported(path)
    # load_qbn reads the same entries and refuses them the same way (it leaked a ValueError)
    from flipnet.compress.export import load_qbn

    with pytest.raises(ExportFormatError, match="too large"):
        load_qbn(path)
    layer["weight_shape"] = [1, 1, 5, 5]
    save_file({"0.qbn_indices": torch.zeros(1, dtype=torch.uint8), "0.qbn_codebook_bits": torch.zeros(2, 4, dtype=torch.uint8)},
              str(path), metadata={"format": EXPORT_FORMAT, "flipnet": json.dumps(doc)})
    for read in (load_exported, load_qbn):
        with pytest.raises(ExportFormatError, match="too large"):
            read(path)


# ----------------------------------------------------------------------------- ResNets (residual graphs)
@pytest.mark.parametrize(
    "name,kwargs,size",
    [
        ("resnet20", {"mode": "bnn", "base_width": 4}, 16),  # Bi-Real blocks, avgpool+conv shortcuts
        ("resnet20", {"mode": "bwn", "base_width": 4}, 16),  # basic blocks, zero-pad (option A) shortcuts
        ("resnet20", {"mode": "bnn", "base_width": 4, "weight_mode": "flip", "downsample": "conv"}, 16),
        ("resnet18", {"mode": "bnn", "base_width": 4, "small_input": True}, 16),
        ("resnet18", {"mode": "bwn", "base_width": 4}, 40),  # 7x7 stride-2 stem and max-pool
    ],
)
def test_resnet_round_trip_gives_the_trained_logits(tmp_path: Path, backend: str, name: str, kwargs: dict, size: int) -> None:
    torch.manual_seed(7)
    model = randomize_bn(create_model(name, num_classes=10, in_channels=3, **kwargs))
    x = torch.rand(3, 3, size, size) * 2 - 1
    loaded, doc = roundtrip(model, tmp_path, x, name)
    assert doc["version"] == 2
    residuals = [e for e in doc["layers"] if e["type"] == "residual"]
    blocks = sum(len(getattr(model, s)) for s in model.stages)
    assert len(residuals) == (2 * blocks if kwargs["mode"] == "bnn" else blocks)
    packed = sum(isinstance(m, PackedBinaryConv2d) for m in loaded.modules())
    assert packed == (2 * blocks if kwargs["mode"] == "bnn" else 0)  # bwn: real inputs, ±1 float weights
    names = {e["name"] for r in residuals for e in r["children"]["body"]}
    assert {n for n, _ in binary_modules(model)} <= names  # every binary layer is in a residual body


def test_resnet_tensor_names_follow_the_graph(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = randomize_bn(create_model("resnet20", num_classes=10, in_channels=3, base_width=4))
    path = tmp_path / "r.safetensors"
    doc = export_model(model, path)
    first = next(i for i, e in enumerate(doc["layers"]) if e["type"] == "residual")
    body = doc["layers"][first]["children"]["body"]
    assert body[0]["tensors"]["weight_bits"] == f"{first}.body.0.weight_bits"
    with safe_open(str(path), "pt") as f:
        assert f"{first}.body.0.weight_bits" in set(f.keys())


def test_subclasses_with_their_own_forward_are_refused(tmp_path: Path) -> None:
    from flipnet.models.resnet import PadShortcut

    class MyPad(PadShortcut):  # what the pad_shortcut entry describes is PadShortcut's forward, not this one
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    with pytest.raises(ValueError, match="cannot export a MyPad"):
        export_model(nn.Sequential(MyPad(2, 4, 2)), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="cannot export a ReLU6"):
        export_model(nn.Sequential(nn.ReLU6()), tmp_path / "x.safetensors")


def test_cli_export_of_a_resnet20_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flipnet.cli import main
    from flipnet.train import load_config
    from flipnet.train.checkpoint import save_checkpoint
    from flipnet.train.config import config_to_dict

    config = load_config("sun_yao_digits_bwn", ["model.kwargs.base_width=4"])
    torch.manual_seed(8)
    model = randomize_bn(create_model("resnet20", num_classes=10, in_channels=1, mode="bwn", base_width=4))
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last.pt", {
        "model": model.state_dict(), "config": config_to_dict(config), "epoch": 1, "step": 1,
        "meta": {"num_classes": 10, "input_shape": [1, 8, 8]},
    })
    out = tmp_path / "resnet.safetensors"
    assert main(["export", str(run), "--out", str(out), "--checkpoint", "last"]) == 0
    assert "same predictions: True" in capsys.readouterr().out
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out)(x), model(x), rtol=1e-5, atol=1e-5)


def test_cli_export_never_overwrites_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flipnet.cli import main
    from flipnet.train import load_config
    from flipnet.train.checkpoint import save_checkpoint
    from flipnet.train.config import config_to_dict

    model = randomize_bn(create_model("binary_mlp", num_classes=10, in_channels=1, input_size=8, hidden_sizes=[32, 32]))
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    save_checkpoint(last, {"model": model.state_dict(), "config": config_to_dict(load_config("digits_bop", [
        "model.kwargs.hidden_sizes=[32,32]"])), "epoch": 1, "step": 1, "meta": {"num_classes": 10, "input_shape": [1, 8, 8]}})
    before = last.read_bytes()
    # a checkpoint is never the output, --force or not, whichever checkpoint is exported
    for extra in ([], ["--force"], ["--checkpoint", "best", "--force"]):
        args = ["export", str(run), "--out", str(last), *extra]
        assert main(args if "best" in extra else [*args, "--checkpoint", "last"]) == 2
        assert "would replace a checkpoint" in capsys.readouterr().err
    assert main(["export", str(run), "--checkpoint", "last", "--out", str(tmp_path / "new.pt")]) == 2
    capsys.readouterr()
    assert last.read_bytes() == before and not (tmp_path / "new.pt").exists()
    assert main(["export", str(last)]) == 0  # a checkpoint file: the export goes next to it
    assert (run / "checkpoints" / "last.safetensors").is_file() and last.read_bytes() == before
    out = run / "export.safetensors"
    assert main(["export", str(run), "--checkpoint", "last"]) == 0
    out.write_bytes(b"precious")
    assert main(["export", str(run), "--checkpoint", "last"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(["export", str(run), "--checkpoint", "last", "--force"]) == 0
    assert read_export_metadata(out)["extra"]["checkpoint"] == "last"
    # checkpoint suffixes in any case (one file with last.pt where names ignore case), --force or not
    for name in ("LAST.PT", "other.Pth"):
        assert main(["export", str(run), "--checkpoint", "last", "--force", "--out", str(run / "checkpoints" / name)]) == 2
        assert "would replace a checkpoint" in capsys.readouterr().err
        assert not (run / "checkpoints" / name).exists()
    # an unwritable location is one sentence, not a traceback
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["export", str(run), "--checkpoint", "last", "--out", str(blocker / "sub" / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_summary_refuses_export_files_and_wrong_input_sizes(tmp_path: Path, good_file: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from flipnet.cli import main

    assert main(["summary", str(good_file)]) == 2
    err = capsys.readouterr().err
    assert "is a flipnet export" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(good_file.read_bytes()[:100])
    assert main(["summary", str(broken)]) == 2
    assert "truncated" in capsys.readouterr().err
    assert main(["summary", "digits_bop", "--input-size", "1", "1"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and len(err.strip().splitlines()) == 1
    # a size whose layers cannot even be allocated: one sentence, not an allocator traceback
    assert main(["summary", "digits_bop", "--input-size", "1", "1", "100000", "100000"]) == 2
    err = capsys.readouterr().err
    assert "cannot build the model" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_version_is_the_lowest_that_describes_the_file(tmp_path: Path) -> None:
    from flipnet.models.resnet import PadShortcut

    path = tmp_path / "v.safetensors"
    assert export_model(nn.Sequential(nn.Flatten(), nn.ReLU()), path)["version"] == 1
    doc = export_model(nn.Sequential(PadShortcut(2, 4, 2)), path)  # a type version 1 does not have
    assert doc["version"] == 2
    x = torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(load_exported(path)(x), PadShortcut(2, 4, 2)(x))


def test_batchnorm_and_dropout_subclasses_with_their_own_forward_are_refused(tmp_path: Path) -> None:
    class Noisy(nn.Dropout):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1

    class Centred(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x - x.mean()

    for layer in (Noisy(), Centred(3)):
        with pytest.raises(ValueError, match="has its own forward"):
            export_model(nn.Sequential(layer), tmp_path / "x.safetensors")
    class Doubled(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    with pytest.raises(ValueError, match="has its own forward"):
        export_model(nn.Sequential(Doubled(2, 2, 1)), tmp_path / "x.safetensors")


def test_the_codec_example_in_docs_deployment_md_runs(tmp_path: Path) -> None:
    import subprocess
    import sys

    page = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    start = page.index("**Adding a layer type is one registration.**")
    code = page[start:].split("```python\n", 1)[1].split("```", 1)[0]
    # a fresh process: the example registers a codec in the process-wide registry
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert read_export_metadata(tmp_path / "shuffle.safetensors")["layers"][-1] == {
        "type": "channel_shuffle", "name": "1", "groups": 2, "tensors": {}}



@pytest.mark.parametrize(
    "name,kwargs,size",
    [
        ("birealnet18", {"small_input": True, "base_width": 4}, 16),
        ("birealnet18", {"small_input": True, "base_width": 4, "rprelu": True}, 16),  # RSign shifts and RPReLU
        ("birealnet34", {"base_width": 4, "rprelu": True, "weight_mode": "flip"}, 40),
        ("reactnet_a", {"small_input": True, "base_width": 4, "weight_quantizer": "magnitude_aware_sign"}, 32),
        ("reactnet_a", {"base_width": 4, "weight_mode": "flip"}, 48),  # stride-2 stem
    ],
)
def test_bireal_and_reactnet_round_trip_gives_the_trained_logits(tmp_path: Path, backend: str, name: str, kwargs: dict,
                                                       size: int) -> None:
    from flipnet.models.reactnet import LearnableBias

    torch.manual_seed(9)
    model = randomize_bn(create_model(name, num_classes=10, in_channels=3, **kwargs))
    with torch.no_grad():  # trained-looking shifts and slopes (they start at 0 and 0.25)
        for m in model.modules():
            if isinstance(m, LearnableBias):
                m.bias.uniform_(-0.5, 0.5)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(-0.5, 1.0)
    loaded, doc = roundtrip(model, tmp_path, torch.rand(2, 3, size, size) * 2 - 1, name)
    assert doc["version"] == 2
    binary = sum(isinstance(m, BinaryConv2d) for m in model.modules())
    assert sum(isinstance(m, PackedBinaryConv2d) for m in loaded.modules()) == binary  # every binary conv packed
    if name == "reactnet_a":  # widening blocks: two 1x1 halves concatenated
        assert sum(e["type"] == "concat" for e in doc["layers"]) == sum(b.duplicate for b in model.blocks)
