"""ONNX export: ONNX Runtime reproduces flipnet's predictions and logits on a real test set.

Models are trained briefly on scikit-learn digits (see ``_onnx_helpers``); the whole digits test
split (360 images) is compared, with BatchNorm folded into thresholds and without.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx", reason="the onnx package is not installed (pip install flipnet[onnx])")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install flipnet[onnx])")

from _onnx_helpers import MODELS, digits, logits, trained  # noqa: E402

from flipnet.compress.onnx import DEFAULT_OPSET, export_onnx  # noqa: E402
from flipnet.layers import BinaryConv2d, BinaryLinear  # noqa: E402
from flipnet.models import create_model  # noqa: E402

TOL = 1e-4


def run_ort(proto, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def ops(proto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "batchnorm"])
@pytest.mark.parametrize("key", list(MODELS))
def test_onnxruntime_matches_flipnet_on_digits(key: str, fold: bool, tmp_path: Path) -> None:
    model, shape = trained(key)
    x, y = digits("test", MODELS[key][2])
    ref = logits(model, x).numpy()
    assert (ref.argmax(1) == y.numpy()).mean() > 0.4  # trained, not a constant predictor
    path = tmp_path / f"{key}.onnx"
    proto = export_onnx(model, path, input_shape=shape, fold_batchnorm=fold)
    assert path.is_file() and path.stat().st_size > 0
    got = run_ort(onnx.load(str(path)), x)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)
    assert "Sign" not in ops(proto)  # ONNX Sign maps 0 to 0; flipnet's sign(0) is +1
    assert proto.opset_import[0].version == DEFAULT_OPSET


def test_binary_layers_use_pm1_weights_and_folded_thresholds() -> None:
    model, shape = trained("binarynet")
    proto = export_onnx(model, None, input_shape=shape)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(convs) == 9
    for n in convs:  # every BinaryNet layer has binary weights, the first and last included
        w = inits[n.input[1]]
        assert set(np.unique(w)) <= {-1.0, 1.0}
    # bn2..bn8 fold into thresholds; bn1 (after the real-input conv1) and bn9 (the logits) stay
    assert ops(proto).count("BatchNormalization") == 2
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["flipnet"])
    assert [f["batchnorm"] for f in meta["folds"]] == [f"bn{i}" for i in range(2, 9)]
    # thresholds are integers (the binary layers' pre-activations are)
    thr = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "GreaterOrEqual" and n.input[1] in inits
           and inits[n.input[1]].size > 1]
    assert thr and all(np.array_equal(t, np.round(t)) for t in thr)


def test_bit_packed_weights_give_the_same_outputs_in_a_smaller_file() -> None:
    model, shape = trained("binarynet")
    x, _ = digits("test", MODELS["binarynet"][2])
    plain = export_onnx(model, None, input_shape=shape)
    packed = export_onnx(model, None, input_shape=shape, weight_storage="bits")
    assert "BitShift" in ops(packed) and "BitShift" not in ops(plain)
    np.testing.assert_array_equal(run_ort(packed, x), run_ort(plain, x))
    assert len(packed.SerializeToString()) * 5 < len(plain.SerializeToString())
    with pytest.raises(ValueError, match="weight_storage"):
        export_onnx(model, None, input_shape=shape, format="qonnx", weight_storage="bits")


def test_dynamic_batch_and_fixed_batch() -> None:
    model, shape = trained("binary_mlp")
    x, _ = digits("test", 1)
    proto = export_onnx(model, None, input_shape=shape)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for n in (1, 64):
        np.testing.assert_allclose(run_ort(proto, x[:n]), logits(model, x[:n]).numpy(), atol=TOL, rtol=0)
    fixed = export_onnx(model, None, input_shape=shape, batch_size=8)
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 8
    np.testing.assert_allclose(run_ort(fixed, x[:8]), logits(model, x[:8]).numpy(), atol=TOL, rtol=0)


def test_sign_of_zero_is_plus_one_and_padding_is_plus_one() -> None:
    torch.manual_seed(0)
    lin = BinaryLinear(4, 3, input_quantizer="ste_sign").eval()
    x = torch.tensor([[0.0, -0.0, 1.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(run_ort(export_onnx(lin, None, input_shape=(4,)), x), logits(lin, x).numpy())
    # an all-zero input under a sign is all +1: each output is the row sum of the ±1 weights
    np.testing.assert_array_equal(logits(lin, x)[1].numpy(), torch.sign(lin.weight.detach()).sum(1).numpy())
    for pad_value in (1.0, -1.0, 0.0):
        conv = BinaryConv2d(2, 4, 3, padding=1, input_quantizer="ste_sign", pad_value=pad_value).eval()
        x = torch.randn(2, 2, 5, 5)
        proto = export_onnx(conv, None, input_shape=(2, 5, 5))
        assert ("Pad" in ops(proto)) == (pad_value != 0.0)
        np.testing.assert_array_equal(run_ort(proto, x), logits(conv, x).numpy())
    same = BinaryConv2d(2, 4, 4, padding="same", input_quantizer="ste_sign", pad_value=1.0).eval()  # odd pixel right/bottom
    x = torch.randn(1, 2, 6, 7)
    np.testing.assert_array_equal(run_ort(export_onnx(same, None, input_shape=(2, 6, 7)), x), logits(same, x).numpy())


def _random_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.2 + 0.01)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
                if m.weight is not None:  # negative γ flips the threshold comparison
                    m.weight.copy_(torch.rand(m.num_features, generator=g) * 3 - 1.5)
    return model.eval()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight_quantizer": "magnitude_aware_sign"},
        {"scale": "learnable", "pad_value": -1.0},
        {"weight_mode": "flip", "scale": "learnable", "dropout": 0.2},
        {"scale": "xnor"},
    ],
    ids=["magnitude", "learnable", "flip-dropout", "xnor"],
)
def test_scales_magnitudes_and_weight_modes(kwargs: dict) -> None:
    torch.manual_seed(0)
    model = _random_bn(create_model("binarynet", input_size=16, filters=8, dense_units=32, **kwargs))
    if kwargs.get("scale") == "learnable":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".scale"):
                    p.copy_(torch.rand(p.shape) + 0.1)
    x = torch.rand(16, 3, 16, 16) * 2 - 1
    ref = logits(model, x).numpy()
    for fold in (True, False):
        got = run_ort(export_onnx(model, None, input_shape=(3, 16, 16), fold_batchnorm=fold), x)
        np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


def test_resnet_variants() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    for kwargs in ({"base_width": 4}, {"base_width": 4, "mode": "bwn"}, {"base_width": 4, "mode": "bwn", "downsample": "conv"},
                   {"base_width": 4, "mode": "float"}):
        model = create_model("resnet20", **kwargs).eval()
        got = run_ort(export_onnx(model, None, input_shape=(3, 16, 16)), x)
        ref = logits(model, x).numpy()
        np.testing.assert_allclose(got, ref, atol=TOL * max(1.0, float(np.abs(ref).max())), rtol=0)


@pytest.mark.parametrize("opset", [17, DEFAULT_OPSET, 20])
def test_layer_coverage(opset: int) -> None:
    from flipnet.layers import BinaryConv1d
    from flipnet.quantizers import SteHeaviside

    torch.manual_seed(0)
    gelu = nn.GELU(approximate="tanh") if opset >= 20 else nn.GELU()
    cases = [
        (nn.Sequential(BinaryConv1d(2, 4, 3, padding=1, input_quantizer="ste_sign", pad_value=1.0), nn.BatchNorm1d(4),
                       nn.Flatten(), BinaryLinear(28, 5, input_quantizer="approx_sign")), (2, 7)),
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Hardtanh(), nn.AvgPool2d(2), nn.SiLU(), nn.AdaptiveAvgPool2d(2),
                       gelu, nn.Flatten(), nn.Linear(16, 5), nn.Softmax(dim=1)), (3, 8, 8)),
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.MaxPool2d(3, 2, 1), nn.Sigmoid(), nn.Flatten(),
                       nn.Linear(64, 3), nn.LogSoftmax(dim=1)), (3, 8, 8)),
        (nn.Sequential(SteHeaviside(), BinaryConv2d(3, 4, 3, padding="same", bias=True, dilation=2), nn.ReLU()), (3, 8, 8)),
        (nn.Sequential(BinaryConv2d(4, 4, 3, padding=1, groups=2, stride=2, input_quantizer="swish_sign", pad_value=-1.0),
                       nn.BatchNorm2d(4), BinaryConv2d(4, 2, 1, input_quantizer="ste_sign")), (4, 9, 9)),
    ]
    for model, shape in cases:
        model.eval()
        x = torch.randn(3, *shape)
        got = run_ort(export_onnx(model, None, input_shape=shape, opset=opset), x)
        np.testing.assert_allclose(got, logits(model, x).numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,kwargs", [("reactnet_a", {}), ("birealnet18", {}), ("birealnet18", {"rprelu": True})],
                         ids=["reactnet_a", "birealnet18", "birealnet18-rprelu"])
def test_reactnet_and_bireal_net(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = create_model(name, small_input=True, base_width=8, num_classes=10, **kwargs)
    with torch.no_grad():  # move RSign/RPReLU shifts and slopes away from their initial values
        for pname, p in model.named_parameters():
            if "move" in pname or "prelu" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    _random_bn(model)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    ref = logits(model, x).numpy()
    proto = export_onnx(model, None, input_shape=(3, 32, 32))
    assert "PRelu" in ops(proto) or not (kwargs or name == "reactnet_a")
    np.testing.assert_allclose(run_ort(proto, x), ref, atol=TOL * max(1.0, float(np.abs(ref).max())), rtol=0)


def test_unet() -> None:
    torch.manual_seed(0)
    model = _random_bn(create_model("unet", num_classes=3, base_width=4, depth=2, input_size=32))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ref = logits(model, x).numpy()
    proto = export_onnx(model, None, input_shape=(3, 32, 32))
    assert {"Resize", "Concat"} <= set(ops(proto))
    got = run_ort(proto, x)
    assert got.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(got, ref, atol=TOL * max(1.0, float(np.abs(ref).max())), rtol=0)


def test_model_state_is_unchanged(tmp_path: Path) -> None:
    model = create_model("binary_mlp", input_size=8, hidden_sizes=(16,)).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 8, 8), metadata={"run": "x"})
    assert model.training
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k
    meta = json.loads({p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}["flipnet"])
    assert meta["run"] == "x" and meta["input_shape"] == [1, 8, 8] and meta["format"] == "onnx"


def test_errors(tmp_path: Path) -> None:
    model = create_model("binary_mlp", input_size=8, hidden_sizes=(16,)).eval()
    with pytest.raises(ValueError, match="format must be one of onnx, qonnx"):
        export_onnx(model, None, input_shape=(1, 8, 8), format="tflite")
    with pytest.raises(ValueError, match="opset must be an int from 13"):
        export_onnx(model, None, input_shape=(1, 8, 8), opset=7)
    with pytest.raises(ValueError, match="does not accept inputs of shape"):
        export_onnx(model, None, input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="input_shape must be"):
        export_onnx(model, None, input_shape=(0, 8))
    weird = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.LayerNorm(4)).eval()
    with pytest.raises(ValueError, match=r"layer '2': cannot export a LayerNorm"):
        export_onnx(weird, tmp_path / "w.onnx", input_shape=(1, 8, 8))
    assert not (tmp_path / "w.onnx").exists()
    circ = BinaryConv2d(2, 2, 3, padding=1, padding_mode="circular").eval()
    with pytest.raises(ValueError, match="circular padding needs opset >= 19"):
        export_onnx(circ, None, input_shape=(2, 5, 5), opset=17)
    x = torch.randn(2, 2, 5, 5)
    np.testing.assert_allclose(run_ort(export_onnx(circ, None, input_shape=(2, 5, 5)), x), logits(circ, x).numpy(), atol=1e-5)


cifar = Path("/work/shared/data/cifar10/cifar10_lossless_subset.npz")


@pytest.mark.slow
@pytest.mark.skipif(not cifar.is_file(), reason="the CIFAR-10 lossless subset is not on this machine")
def test_binarynet_on_cifar_images() -> None:
    """Real CIFAR-10 images: non-dyadic inputs, so the real-input first layer rounds differently in
    the two runtimes; predictions and logits still agree."""
    from flipnet.data import load_lossless_subset, scale_images

    bundle = load_lossless_subset(cifar)
    torch.manual_seed(0)
    model = create_model("binarynet", filters=16, dense_units=64, pad_value=1.0)
    xtr, ytr = scale_images(bundle.train_x[:1024]), bundle.train_y[:1024]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(0, 1024, 64):
        loss = nn.functional.cross_entropy(model(xtr[i : i + 64]), ytr[i : i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = scale_images(bundle.test_x[:256])
    ref = logits(model, x).numpy()
    got = run_ort(export_onnx(model, None, input_shape=(3, 32, 32)), x)
    np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


def test_cli_export_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flipnet.cli import main

    assert main(["train", "digits_bop", "train.epochs=1", "model.kwargs.hidden_sizes=[32]", "--out", str(tmp_path)]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    capsys.readouterr()
    assert main(["export", str(run), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "same predictions: True" in out and (run / "export.onnx").is_file()
    assert not (run / "export.safetensors").exists()  # the default format is only written when asked for
    x, _ = digits("test", 1)
    from flipnet.train import load_run

    _, model = load_run(run, "best", map_location="cpu")
    got = run_ort(onnx.load(str(run / "export.onnx")), x)
    np.testing.assert_allclose(got, logits(model.eval(), x).numpy(), atol=TOL, rtol=0)
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--no-verify"]) == 0
    assert (tmp_path / "m.onnx").is_file()
    assert main(["export", str(run)]) == 0 and (run / "export.safetensors").is_file()
