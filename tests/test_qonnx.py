"""QONNX export: QONNX's own executor reproduces flipnet's logits; 1-bit tensors are BipolarQuant nodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="the onnx package is not installed (pip install flipnet[onnx])")
pytest.importorskip("qonnx", reason="qonnx is not installed (pip install qonnx); QONNX export is checked with its executor")

from _onnx_helpers import MODELS, digits, logits, trained  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.core.onnx_exec import execute_onnx  # noqa: E402
from qonnx.transformation.infer_shapes import InferShapes  # noqa: E402

from flipnet.compress.onnx import QONNX_DOMAIN, export_onnx  # noqa: E402
from flipnet.models import create_model  # noqa: E402

TOL = 1e-4
BATCH = 32


def run_qonnx(proto, x: torch.Tensor) -> np.ndarray:
    model = ModelWrapper(proto)
    return execute_onnx(model, {"input": x.numpy()})["logits"]


@pytest.mark.parametrize("key", list(MODELS))
def test_qonnx_executor_matches_flipnet_on_digits(key: str) -> None:
    model, shape = trained(key)
    x, _ = digits("test", MODELS[key][2])
    x = x[:BATCH]
    ref = logits(model, x).numpy()
    proto = export_onnx(model, None, input_shape=shape, format="qonnx", batch_size=BATCH)
    got = run_qonnx(proto, x)
    np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


def test_bipolar_quant_on_weights_and_activations() -> None:
    model, shape = trained("binarynet")
    proto = export_onnx(model, None, input_shape=shape, format="qonnx")
    assert any(o.domain == QONNX_DOMAIN for o in proto.opset_import)
    quants = [n for n in proto.graph.node if n.op_type == "BipolarQuant"]
    assert all(n.domain == QONNX_DOMAIN for n in quants)
    wrapper = ModelWrapper(proto)
    # every Conv/Gemm weight comes from a BipolarQuant; every input but conv1's too (real image)
    for n in proto.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            producer = wrapper.find_producer(n.input[1])
            assert producer is not None and producer.op_type == "BipolarQuant"
    act_quants = [n for n in quants if wrapper.get_initializer(n.input[0]) is None]
    assert len(act_quants) == 8  # inputs of conv2..conv6, fc7..fc9
    assert len(quants) == 9 + 8
    # BatchNorm stays for FINN's streamlining, nothing folded
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == 9
    # QONNX's own shape inference accepts the graph; the batch is fixed (1 by default)
    inferred = wrapper.transform(InferShapes())
    assert inferred.get_tensor_shape("input") == [1, *shape]
    x, _ = digits("test", MODELS["binarynet"][2])
    np.testing.assert_allclose(execute_onnx(inferred, {"input": x[:1].numpy()})["logits"], logits(model, x[:1]).numpy(),
                               atol=TOL, rtol=0)


def test_magnitude_aware_weights_put_the_magnitude_in_the_quant_scale() -> None:
    torch.manual_seed(0)
    model = create_model("binary_mlp", input_size=8, hidden_sizes=(32,), weight_quantizer="magnitude_aware_sign").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.3, 0.3)
                m.bias.uniform_(-1, 1)
    proto = export_onnx(model, None, input_shape=(1, 8, 8), format="qonnx", batch_size=8)
    wrapper = ModelWrapper(proto)
    for n in proto.graph.node:
        if n.op_type == "BipolarQuant" and wrapper.get_initializer(n.input[0]) is not None:
            scale = wrapper.get_initializer(n.input[1])
            assert scale.shape[0] > 1 and np.all(scale > 0)  # one magnitude per output channel
    x, _ = digits("test", 1)
    np.testing.assert_allclose(run_qonnx(proto, x[:8]), logits(model, x[:8]).numpy(), atol=TOL, rtol=0)


def test_qonnx_cleanup_keeps_the_logits_and_types_quant_outputs_bipolar() -> None:
    """What FINN runs first on a QONNX file: QONNX's cleanup (shape and constant folding, renaming)
    and datatype inference; the 1-bit tensors must come out as BIPOLAR."""
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.util.cleanup import cleanup_model

    model, shape = trained("resnet20")
    x, _ = digits("test", MODELS["resnet20"][2])
    w = cleanup_model(ModelWrapper(export_onnx(model, None, input_shape=shape, format="qonnx"))).transform(InferDataTypes())
    got = execute_onnx(w, {w.graph.input[0].name: x[:1].numpy()})[w.graph.output[0].name]
    np.testing.assert_allclose(got, logits(model, x[:1]).numpy(), atol=TOL, rtol=0)
    quant_outputs = [n.output[0] for n in w.graph.node if n.op_type == "BipolarQuant"]
    assert len(quant_outputs) == 36  # 18 binary convolutions: weights and inputs
    assert {str(w.get_tensor_datatype(t)) for t in quant_outputs} == {"BIPOLAR"}


def test_integer_input_quant_is_exact_for_8bit_images() -> None:
    from flipnet.compress.onnx import IMAGE_INPUT_QUANT

    model, shape = trained("binarynet")
    x, _ = digits("test", MODELS["binarynet"][2])  # 8-bit pixels u as u/127.5 - 1, as the loaders feed them
    x = x[:BATCH]
    proto = export_onnx(model, None, input_shape=shape, format="qonnx", batch_size=BATCH, input_quant=IMAGE_INPUT_QUANT)
    first = proto.graph.node[0]
    assert first.op_type == "Quant" and first.domain == QONNX_DOMAIN and first.input[0] == "input"
    wrapper = ModelWrapper(proto)
    ints = execute_onnx(wrapper, {"input": x.numpy()}, return_full_exec_context=True)[first.output[0]] * 255
    k = np.round(ints)
    assert np.abs(ints - k).max() < 1e-4 and np.all(k % 2 == 1)  # the odd integers 2u - 255
    assert k.min() >= -255 and k.max() <= 255
    np.testing.assert_allclose(run_qonnx(proto, x), logits(model, x).numpy(), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="input_quant needs format='qonnx'"):
        export_onnx(model, None, input_shape=shape, input_quant=IMAGE_INPUT_QUANT)
    with pytest.raises(ValueError, match="input_quant must be"):
        export_onnx(model, None, input_shape=shape, format="qonnx", input_quant=(0.0, 8))
