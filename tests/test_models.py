"""Tests of flipnet.models: registry, architectures, modes, float twins."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from flipnet.errors import ConfigError
from flipnet.layers import BinaryConv2d, BinaryLayer, BinaryLinear, binary_modules, binary_parameters
from flipnet.models import (
    SequentialModel,
    count_parameters,
    create_model,
    float_twin,
    list_models,
    model_options,
    register_model,
)
from flipnet.models import registry as registry_module
from flipnet.models.common import BatchNorm1d, BatchNorm2d, FloatConv2d, FloatLinear
from flipnet.models.resnet import BasicBlock, BiRealBlock, PadShortcut
from flipnet.quantizers import ApproxSign, Quantizer, SteSign

torch.set_num_threads(1)

MODES = ("bnn", "bwn", "float")

# Small but complete configurations of every model, to keep the tests fast on a CPU.
SMALL: dict[str, dict[str, Any]] = {
    "binarynet": dict(filters=8, dense_units=16),
    "binary_mlp": dict(input_size=8, hidden_sizes=(16, 12)),
    "resnet20": dict(base_width=4),
    "resnet18": dict(small_input=True, base_width=4),
    "unet": dict(base_width=4, depth=2, input_size=16),
}


def small(name: str, **kwargs: Any) -> nn.Module:
    return create_model(name, **{**SMALL[name], **kwargs})


def batch(model: nn.Module, n: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn((n,) + tuple(model.input_shape))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)


# ----------------------------------------------------------------------------- registry
def test_list_models() -> None:
    assert list_models() == ["binary_mlp", "binarynet", "birealnet18", "birealnet34", "reactnet_a", "resnet18", "resnet20", "unet"]
    assert list_models("resnet*") == ["resnet18", "resnet20"]


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="unknown model 'vgg'.*binarynet.*unet"):
        create_model("vgg")


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(ConfigError, match=r"unknown option\(s\) 'width'.*own options: input_size, filters, dense_units"):
        create_model("binarynet", width=3)


def test_misspelt_model_name_and_option_get_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'resnet21'; did you mean 'resnet20'\?"):
        create_model("resnet21")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) 'hidden' for model 'binary_mlp'; did you mean 'hidden_sizes'\?"):
        create_model("binary_mlp", hidden=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="binary"), "mode must be one of"),
        (dict(weight_mode="signs"), "weight_mode must be one of"),
        (dict(scale="abs"), "scale must be one of"),
        (dict(dropout=1.0), "dropout must be a probability"),
        (dict(num_classes=0), "num_classes must be a positive int"),
        (dict(activation="relu"), "mode='bnn' binarises activations"),
        (dict(mode="bwn", activation="ste_sign"), "mode='bwn' keeps activations real"),
        (dict(twin_of="bwn"), "twin_of is an option of mode='float' only"),
        (dict(mode="float", weight_mode="flip"), "mode='float' has no binary weights"),
        (dict(mode="float", scale="xnor"), "mode='float' has no binary weights"),
        (dict(weight_mode="flip", scale="xnor"), "scale='xnor' needs latent weights"),
        (dict(weight_quantizer="round"), "unknown weight_quantizer"),
        (dict(weight_quantizer="identity"), "1-bit quantizers"),
        (dict(input_size=8), "at least 10"),
        (dict(filters=0), "filters must be a positive int"),
        (dict(pad_value="one"), "pad_value must be a finite number"),
        (dict(weight_clip="1"), "weight_clip must be a positive number"),
        (dict(bn_momentum=0.99 + 1), "bn_momentum must be in"),
    ],
)
def test_invalid_options_raise_one_clear_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_model("binarynet", **kwargs)


def test_model_options_lists_shared_and_own_defaults() -> None:
    opts = model_options("binarynet")
    assert opts["bn_momentum"] == 0.01 and opts["bn_eps"] == 1e-3 and opts["input_size"] == 32
    assert model_options("unet")["num_classes"] == 3
    assert model_options("binary_mlp")["in_channels"] == 1
    assert model_options("resnet18")["num_classes"] == 1000


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("mode", MODES)
def test_model_config_rebuilds_the_same_model(name: str, mode: str) -> None:
    model = small(name, mode=mode, dropout=0.1)
    config = dict(model.model_config)
    rebuilt = create_model(config.pop("name"), **config)
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(getattr(a[k], "shape", None) == getattr(b[k], "shape", None) for k in a)
    assert rebuilt.model_config == model.model_config


def test_register_model_custom_builder_and_duplicates() -> None:
    @register_model(num_classes=4)
    def _tiny_test_model(spec, *, hidden: int = 5) -> nn.Module:  # type: ignore[no-untyped-def]
        """A tiny model for the registry test."""
        return SequentialModel(
            {"flatten": nn.Flatten(), "fc1": spec.linear(spec.in_channels * 4, hidden, quantize_input=False),
             "bn1": spec.bn1d(hidden), "fc2": spec.linear(hidden, spec.num_classes)},
            input_shape=(spec.in_channels, 2, 2), name="_tiny_test_model",
        )

    try:
        assert "_tiny_test_model" in list_models()
        assert registry_module.model_entry("_tiny_test_model").description == "A tiny model for the registry test."
        m = create_model("_tiny_test_model", hidden=7, in_channels=1)
        assert m(torch.randn(3, 1, 2, 2)).shape == (3, 4)
        assert len(binary_parameters(m)) == 2
        with pytest.raises(ValueError, match="already registered"):
            register_model(name="_tiny_test_model")(lambda spec: nn.Identity())
        with pytest.raises(TypeError, match="keyword-only with a default"):
            register_model(name="_bad_test_model")(lambda spec, width: nn.Identity())
        with pytest.raises(TypeError, match="is a shared option"):
            register_model(name="_bad_test_model2")(lambda spec, *, dropout=0.0: nn.Identity())
    finally:
        registry_module._REGISTRY.pop("_tiny_test_model", None)


# ----------------------------------------------------------------------------- shapes per mode
EXPECTED_OUT = {
    "binarynet": (2, 10),
    "binary_mlp": (2, 10),
    "resnet20": (2, 10),
    "resnet18": (2, 1000),
    "unet": (2, 3, 16, 16),
}


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("mode", MODES)
def test_output_shape_every_model_and_mode(name: str, mode: str) -> None:
    model = small(name, mode=mode)
    out = model(batch(model))
    assert out.shape == EXPECTED_OUT[name]
    assert torch.isfinite(out).all()
    model.eval()
    assert model(batch(model)).shape == EXPECTED_OUT[name]


def test_default_sizes_forward() -> None:
    """The default (paper) configurations run on their nominal input sizes."""
    assert create_model("binarynet").input_shape == (3, 32, 32)
    m = create_model("resnet18", mode="float", base_width=8)
    assert m.input_shape == (3, 224, 224)
    assert m.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    u = create_model("unet", base_width=4)
    assert u.input_shape == (3, 128, 128)
    assert u(torch.randn(1, 3, 128, 128)).shape == (1, 3, 128, 128)
    r = create_model("resnet20", num_classes=100)
    assert r(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_wrong_input_size_says_what_is_expected() -> None:
    net = small("binarynet")
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 3, 32, 32\), got \(2, 3, 28, 28\)"):
        net(torch.randn(2, 3, 28, 28))
    mlp = small("binary_mlp")
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        mlp(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"resnet20 expects input of shape \(N, 3, H, W\)"):
        small("resnet20")(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        small("unet")(torch.randn(1, 3, 18, 18))
    with pytest.raises(ConfigError, match="multiples of 16"):
        create_model("unet", input_size=100)


# ----------------------------------------------------------------------------- BinaryNet
def test_binarynet_parameter_count_matches_hand_count() -> None:
    model = create_model("binarynet")
    k = 3 * 3
    convs = [(3, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)]
    dense = [(512 * 3 * 3, 1024), (1024, 1024), (1024, 10)]
    binary = sum(i * o * k for i, o in convs) + sum(i * o for i, o in dense)
    shifts = sum(o for _, o in convs) + sum(o for _, o in dense)  # BatchNorm β only
    counts = count_parameters(model)
    print(f"binarynet: {counts['binary']:,} binary weights, {counts['real']:,} real parameters")
    assert binary == 10_352_000 and shifts == 3_850
    assert counts == {"binary": binary, "real": shifts, "total": binary + shifts}


def test_binarynet_is_the_flat_reference_sequence() -> None:
    model = create_model("binarynet")
    assert isinstance(model, nn.Sequential)
    kinds = []
    for name, layer in model.named_children():
        assert all(isinstance(c, Quantizer) for c in layer.children()), name  # no nested layers
        kinds.append(type(layer).__name__)
    conv, pool, bn2, bn1, lin, flat = "BinaryConv2d", "MaxPool2d", "BatchNorm2d", "BatchNorm1d", "BinaryLinear", "Flatten"
    assert kinds == [
        conv, bn2, conv, pool, bn2, conv, bn2, conv, pool, bn2, conv, bn2, conv, pool, bn2,
        flat, lin, bn1, lin, bn1, lin, bn1,
    ]
    convs = [m for m in model if isinstance(m, BinaryConv2d)]
    assert [c.out_channels for c in convs] == [128, 128, 256, 256, 512, 512]
    assert convs[0].padding == (0, 0) and all(c.padding == "same" for c in convs[1:])
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert not convs[0].binary_inputs and all(c.binary_inputs for c in convs[1:])
    linears = [m for m in model if isinstance(m, BinaryLinear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(4608, 1024), (1024, 1024), (1024, 10)]
    assert all(l.binary_inputs and l.bias is None for l in linears)


def test_binarynet_batchnorm_has_shift_but_no_scale_and_keras_statistics() -> None:
    model = create_model("binarynet")
    bns = [m for m in model if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 9
    for bn in bns:
        assert isinstance(bn, (BatchNorm1d, BatchNorm2d))
        assert bn.weight is None and isinstance(bn.bias, nn.Parameter)
        assert bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-3)
    assert not any(k.endswith("bn1.weight") for k in model.state_dict())
    assert "bn1.bias" in model.state_dict()


def test_sequential_models_slice_and_copy() -> None:
    model = create_model("binarynet", filters=8, dense_units=16)
    head = model[:3]  # exporters walk and slice the sequence
    assert isinstance(head, SequentialModel) and head.input_shape is None
    assert head(torch.randn(1, 3, 32, 32)).shape == (1, 8, 30, 30)
    clone = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(clone.eval()(x), model.eval()(x))


def test_binarynet_input_size_sets_flatten_size() -> None:
    model = create_model("binarynet", input_size=64, filters=8, dense_units=16)
    assert model.fc7.in_features == 32 * 7 * 7  # 64 → 62 (unpadded) → 31 → 15 → 7
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    rect = create_model("binarynet", input_size=(32, 48), filters=8, dense_units=16)
    assert rect.fc7.in_features == 32 * 3 * 5


def test_binarynet_dropout_after_every_hidden_layer_keeps_parameter_names() -> None:
    plain = create_model("binarynet", filters=8, dense_units=16)
    dropped = create_model("binarynet", filters=8, dense_units=16, dropout=0.25)
    drops = [m for m in dropped if isinstance(m, nn.Dropout)]
    assert len(drops) == 8 and all(d.p == 0.25 for d in drops)
    names = [n for n, _ in dropped.named_children()]
    for i in range(1, 9):  # right after each hidden BatchNorm
        assert names[names.index(f"bn{i}") + 1] == f"drop{i}"
    assert names[-1] == "bn9"
    assert list(plain.state_dict()) == list(dropped.state_dict())


def test_binarynet_forward_backward_batch_of_two() -> None:
    model = create_model("binarynet")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = nn.functional.cross_entropy(model(x), torch.tensor([3, 7]))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for p in binary_parameters(model):
        assert p.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- binary coverage
def _binary_layer_names(model: nn.Module) -> list[str]:
    return [name for name, _ in binary_modules(model)]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_binary_parameters_coverage_per_mode(name: str) -> None:
    bnn, bwn, flt = (small(name, mode=m) for m in MODES)
    n_binary = {"binarynet": 9, "binary_mlp": 3, "resnet20": 18, "resnet18": 16, "unet": 1 + 2 * 2 + 3 * 2}[name]
    assert len(binary_parameters(bnn)) == n_binary
    assert len(binary_parameters(bwn)) == n_binary
    assert binary_parameters(flt) == []
    assert _binary_layer_names(bnn) == _binary_layer_names(bwn)
    # bnn: every binary layer but the first of the sequential models has binary inputs
    first_real = name in ("binarynet", "binary_mlp")
    flags = [m.binary_inputs for _, m in binary_modules(bnn)]
    assert flags == [not (first_real and i == 0) for i in range(n_binary)]
    assert not any(m.binary_inputs for _, m in binary_modules(bwn))
    # float twin: float layers exactly where the binary ones are
    float_layers = [n for n, m in flt.named_modules() if isinstance(m, (FloatConv2d, FloatLinear))]
    if name not in ("resnet20", "resnet18"):  # the ResNets' float default mirrors bnn, not bwn
        assert float_layers == _binary_layer_names(bwn)
    assert float_layers == _binary_layer_names(bnn)


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "unet"])
def test_first_and_last_layers_full_precision(name: str) -> None:
    for mode in ("bnn", "bwn"):
        model = small(name, mode=mode)
        binary = {id(p) for p in binary_parameters(model)}
        first = model.stem.conv
        last = model.fc if name != "unet" else model.head
        assert type(first) is nn.Conv2d and type(last) in (nn.Linear, nn.Conv2d)
        assert id(first.weight) not in binary and id(last.weight) not in binary


def test_resnet20_blocks_per_mode() -> None:
    bnn = create_model("resnet20")
    blocks = [m for m in bnn.modules() if isinstance(m, (BiRealBlock, BasicBlock))]
    assert len(blocks) == 9 and all(isinstance(b, BiRealBlock) for b in blocks)
    down = bnn.layer2[0].downsample
    assert isinstance(down[0], nn.AvgPool2d) and type(down[1]) is nn.Conv2d and isinstance(down[2], nn.BatchNorm2d)
    assert down[1].kernel_size == (1, 1)
    assert isinstance(bnn.layer1[0].conv1.input_quantizer, ApproxSign)
    assert [bnn.stem.conv.out_channels, bnn.layer2[0].conv1.out_channels, bnn.layer3[0].conv1.out_channels] == [16, 32, 64]

    bwn = create_model("resnet20", mode="bwn")
    blocks = [m for m in bwn.modules() if isinstance(m, (BiRealBlock, BasicBlock))]
    assert len(blocks) == 9 and all(isinstance(b, BasicBlock) for b in blocks)
    assert isinstance(bwn.layer2[0].downsample, PadShortcut)
    assert isinstance(bwn.layer1[0].act1, nn.ReLU) and isinstance(bwn.stem.act, nn.ReLU)
    # the standard CIFAR ResNet-20 has 0.27M parameters (He et al. 2016, table 6)
    assert count_parameters(bwn) == {"binary": 267_264, "real": 2_458, "total": 269_722}
    conv = create_model("resnet20", mode="bwn", downsample="conv").layer3[0].downsample
    assert type(conv[0]) is nn.Conv2d and conv[0].stride == (2, 2)


def test_resnet18_matches_bireal_net_parameter_count() -> None:
    """Bi-Real Net 18 in the larq zoo: 11,699,112 parameters, BatchNorm statistics included."""
    model = create_model("resnet18")
    stats = sum(b.numel() for n, b in model.named_buffers() if "running" in n)
    counts = count_parameters(model)
    assert counts["binary"] == 10_985_472
    assert counts["total"] + stats == 11_699_112
    assert model.stem.conv.kernel_size == (7, 7) and isinstance(model.stem.pool, nn.MaxPool2d)
    small_in = create_model("resnet18", small_input=True)
    assert small_in.stem.conv.kernel_size == (3, 3) and not hasattr(small_in.stem, "pool")


def test_block_forward_follows_the_documented_formulas() -> None:
    torch.manual_seed(0)
    bireal = create_model("resnet20", base_width=4).eval()
    randomize_batchnorm(bireal)
    block = bireal.layer2[0]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out1 = block.bn1(block.conv1(x)) + block.downsample(x)
        torch.testing.assert_close(block(x), block.bn2(block.conv2(out1)) + out1)
        assert block(x).shape == (2, 8, 4, 4)
    basic = create_model("resnet20", base_width=4, mode="bwn").eval()
    randomize_batchnorm(basic)
    block = basic.layer2[0]
    with torch.no_grad():
        expect = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))) + block.downsample(x))
        torch.testing.assert_close(block(x), expect)
        shortcut = block.downsample(x)  # option A: subsample, zero-pad 2 channels on each side
        assert torch.equal(shortcut[:, 2:6], x[:, :, ::2, ::2]) and not shortcut[:, :2].any() and not shortcut[:, 6:].any()
    unit = create_model("unet", base_width=4, depth=2).eval().encoder[0][0]
    y = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(unit(y), unit.bn(unit.conv(y)) + y)


def test_unet_structure() -> None:
    model = create_model("unet")
    assert len(model.encoder) == 5 and len(model.decoder) == 4
    assert model.encoder[4][1].conv.out_channels == 512
    assert model.head.out_channels == 3 and model.head.bias is not None
    assert create_model("unet", residual=False).encoder[0][0].residual is False
    assert model.encoder[0][0].residual is True and model.encoder[1][1].residual is False


# ----------------------------------------------------------------------------- options reach the layers
def test_shared_options_reach_every_binary_layer() -> None:
    model = small("resnet20", weight_mode="latent", scale="learnable", weight_clip=1.3,
                  weight_quantizer="magnitude_aware_sign", activation="ste_sign", pad_value=1.0)
    layers = [m for _, m in binary_modules(model)]
    assert layers
    for layer in layers:
        assert layer.weight_mode == "latent" and layer.scale_mode == "learnable" and layer.weight_clip == 1.3
        assert type(layer.input_quantizer) is SteSign and layer.pad_value == 1.0
        assert layer.weight.abs().max() <= 1.3
    mlp = small("binary_mlp", bn_momentum=0.2, bn_eps=1e-4)
    assert all(bn.momentum == 0.2 and bn.eps == 1e-4 for bn in mlp if isinstance(bn, nn.BatchNorm1d))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_flip_mode_gives_pm1_weights(name: str) -> None:
    model = small(name, weight_mode="flip")
    params = binary_parameters(model)
    assert params
    for p in params:
        assert torch.equal(p.abs(), torch.ones_like(p))
    assert all(m.weight_mode == "flip" for _, m in binary_modules(model))
    model(batch(model))


# ----------------------------------------------------------------------------- float twins
@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("mode", ["bnn", "bwn"])
def test_float_twin_state_dict_loads_both_ways(name: str, mode: str) -> None:
    binary = small(name, mode=mode, scale="learnable")
    twin = small(name, mode="float", twin_of=mode, scale="learnable")
    b_state, t_state = binary.state_dict(), twin.state_dict()
    assert [(k, getattr(v, "shape", None)) for k, v in b_state.items()] == [
        (k, getattr(v, "shape", None)) for k, v in t_state.items()
    ]
    assert twin.load_state_dict(b_state) is not None  # strict
    for k, v in b_state.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(twin.state_dict()[k], v), k
    fresh = small(name, mode=mode, scale="learnable")
    fresh.load_state_dict(t_state)  # strict, float → binary (latent)
    flip = small(name, mode=mode, weight_mode="flip")
    with pytest.raises(ValueError, match="flip"):
        flip.load_state_dict(small(name, mode="float", twin_of=mode).state_dict())


def test_float_twin_with_sign_activations_reproduces_bnn_binarynet() -> None:
    """The documented manual route: float model, sign activations, sign(weights)."""
    bnn = create_model("binarynet", filters=16, dense_units=32)
    randomize_batchnorm(bnn)
    twin = create_model("binarynet", filters=16, dense_units=32, mode="float", activation="sign")
    state = bnn.state_dict()
    for name, layer in binary_modules(bnn):
        state[f"{name}.weight"] = torch.sign(layer.weight.detach()) + (layer.weight.detach() == 0).float()
    twin.load_state_dict(state)
    assert isinstance(twin.conv2, nn.Conv2d) and not isinstance(twin.conv2, BinaryLayer)
    bnn.eval(), twin.eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(twin(x), bnn(x))
    relu_twin = create_model("binarynet", filters=16, dense_units=32, mode="float")
    relu_twin.load_state_dict(state)
    assert not torch.allclose(relu_twin.eval()(x), bnn(x))  # the check can fail


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="bnn"),
        dict(mode="bwn"),
        dict(mode="bnn", weight_mode="flip", scale="learnable", pad_value=1.0),
        dict(mode="bnn", scale="xnor", weight_quantizer="magnitude_aware_sign"),
    ],
    ids=["bnn", "bwn", "flip-learnable-pad", "xnor-magnitude"],
)
def test_exact_float_twin_computes_the_same_function(name: str, kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = small(name, **kwargs)
    randomize_batchnorm(model)
    for _, layer in binary_modules(model):
        if layer.scale is not None:
            with torch.no_grad():
                layer.scale.uniform_(0.5, 1.5)
    model.eval()
    twin = float_twin(model, exact=True)
    assert binary_parameters(twin) == [] and not twin.training
    x = batch(model, 3)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))


def test_float_twin_default_copies_weights_and_uses_relu() -> None:
    model = small("resnet20")
    twin = float_twin(model)
    assert twin.model_config["mode"] == "float" and twin.model_config["twin_of"] == "bnn"
    assert isinstance(twin.layer1[0].conv1.input_quantizer, nn.ReLU)
    torch.testing.assert_close(twin.layer1[0].conv1.weight, model.layer1[0].conv1.weight)
    bwn_twin = float_twin(small("resnet20", mode="bwn"))
    assert any(isinstance(m, BasicBlock) for m in bwn_twin.modules())
    with pytest.raises(ValueError, match="already a float model"):
        float_twin(bwn_twin)
    with pytest.raises(ValueError, match="built by flipnet.models.create_model"):
        float_twin(nn.Linear(2, 2))
