"""ReActNet-A and Bi-Real Net: layouts and parameter counts against the reference files,
shapes, modes, summary, packed inference of their binary convolutions, and a few training steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flipnet
from flipnet.errors import ConfigError
from flipnet.layers import BinaryConv2d, binary_modules
from flipnet.models import count_parameters, create_model, float_twin
from flipnet.models.reactnet import LearnableBias, ReActBlock, RPReLU
from flipnet.optim import create_optimizer

# Counts of the reference architectures (nn.Module.parameters() of the reference files, all
# parameters, 1000 classes): liuzechun/ReActNet mobilenet/2_step2/reactnet.py and
# jorisquist/Understanding-WM-HP-in-BNNs imagenet/step2/reactnet.py (identical layout):
# 29,343,592 parameters of which 28,253,184 in HardBinaryConv; liuzechun/ReActNet
# resnet/2_step2/birealnet.py (Bi-Real with RSign/RPReLU): birealnet18 11,704,424 (binary
# 10,985,472), birealnet34 21,827,432 (binary 21,086,208). Without RSign/RPReLU, Bi-Real-18 has
# ResNet-18's 11,689,512 parameters (torchvision resnet18) and Bi-Real-34 ResNet-34's 21,797,672.
REFERENCE_COUNTS = [
    ("reactnet_a", {}, 29_343_592, 28_253_184),
    ("birealnet18", {}, 11_689_512, 10_985_472),
    ("birealnet34", {}, 21_797_672, 21_086_208),
    ("birealnet18", {"rprelu": True}, 11_704_424, 10_985_472),
    ("birealnet34", {"rprelu": True}, 21_827_432, 21_086_208),
]


@pytest.mark.parametrize(("name", "kwargs", "total", "binary"), REFERENCE_COUNTS)
def test_parameter_counts_match_the_references(name: str, kwargs: dict, total: int, binary: int) -> None:
    counts = count_parameters(create_model(name, **kwargs))
    assert counts["total"] == total
    assert counts["binary"] == binary


def test_reactnet_a_layout() -> None:
    model = create_model("reactnet_a")
    blocks = list(model.blocks)
    assert len(blocks) == 13
    assert [(b.in_channels, b.out_channels, b.stride) for b in blocks] == [
        (32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
        (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
        (512, 1024, 2), (1024, 1024, 1),
    ]
    # first conv and classifier are full precision; every other conv is binary with binary inputs
    assert type(model.stem.conv) is nn.Conv2d and model.stem.conv.stride == (2, 2)
    assert type(model.fc) is nn.Linear
    convs = [m for _, m in binary_modules(model)]
    assert len(convs) == 13 * 2 + 5  # 3x3 + 1x1 per block, two 1x1 halves in the 5 widening blocks
    assert all(isinstance(m, BinaryConv2d) and m.binary_inputs for m in convs)
    assert flipnet.quantizers.quantizer_name(convs[0].input_quantizer) == "approx_sign"
    # the widening blocks concatenate two C -> C halves (channel duplication)
    b = blocks[1]
    assert b.duplicate and b.conv1x1a.weight.shape == (64, 64, 1, 1) and b.conv1x1b.weight.shape == (64, 64, 1, 1)
    assert isinstance(b.pool, nn.AvgPool2d) and isinstance(blocks[0].pool, nn.Identity)


def test_reactnet_imagenet_shape() -> None:
    model = create_model("reactnet_a").eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 224, 224))
    assert feats.shape == (1, 1024, 7, 7)
    assert model.input_shape == (3, 224, 224)


@pytest.mark.parametrize("name", ["reactnet_a", "birealnet18", "birealnet34"])
def test_cifar_shapes(name: str) -> None:
    width = {"reactnet_a": 8}.get(name, 8)
    model = create_model(name, num_classes=10, small_input=True, base_width=width)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert model.input_shape == (3, 32, 32)


def test_bireal_imagenet_shape() -> None:
    model = create_model("birealnet18", base_width=8, num_classes=7).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 64, 7, 7)
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)


def test_rsign_and_rprelu_math() -> None:
    x = torch.randn(2, 3, 4, 4)
    move = LearnableBias(3)
    with torch.no_grad():
        move.bias.copy_(torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1))
    assert torch.equal(move(x), x + move.bias)
    act = RPReLU(3)
    with torch.no_grad():
        act.move_in.bias.fill_(0.2)
        act.move_out.bias.fill_(-0.3)
        act.prelu.weight.copy_(torch.tensor([0.1, 0.25, 0.5]))
    z = x + 0.2
    slope = act.prelu.weight.view(1, 3, 1, 1)
    expected = torch.where(z >= 0, z, slope * z) - 0.3
    torch.testing.assert_close(act(x), expected)


def test_block_forward_matches_hand_computation() -> None:
    torch.manual_seed(0)
    model = create_model("reactnet_a", num_classes=10, small_input=True, base_width=4)
    block: ReActBlock = model.blocks[1]  # 8 -> 16 channels, stride 2
    block.eval()
    x = torch.randn(2, 8, 8, 8)
    sgn = lambda t: torch.where(t >= 0, 1.0, -1.0)  # noqa: E731
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 4 and p.shape[1] == 1:  # LearnableBias
                p.normal_()
        c3 = nn.functional.conv2d(sgn(x + block.move1.bias), sgn(block.conv3x3.weight), stride=2, padding=1)
        y1 = block.act1(block.bn1(c3) + nn.functional.avg_pool2d(x, 2))
        z = sgn(y1 + block.move2.bias)
        ya = block.bn2a(nn.functional.conv2d(z, sgn(block.conv1x1a.weight))) + y1
        yb = block.bn2b(nn.functional.conv2d(z, sgn(block.conv1x1b.weight))) + y1
        expected = block.act2(torch.cat([ya, yb], 1))
        torch.testing.assert_close(block(x), expected)


def test_modes_and_float_twin() -> None:
    model = create_model("reactnet_a", num_classes=10, small_input=True, base_width=4)
    twin = float_twin(model, exact=True)
    model.eval(), twin.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-4, atol=1e-4)
    bwn = create_model("reactnet_a", num_classes=10, small_input=True, base_width=4, mode="bwn")
    assert not any(m.binary_inputs for _, m in binary_modules(bwn))
    assert set(bwn.state_dict()) == set(model.state_dict())
    with pytest.raises(ConfigError, match="bwn"):
        create_model("birealnet18", mode="bwn")
    bi_twin = float_twin(create_model("birealnet18", num_classes=10, small_input=True, base_width=8))
    assert not list(binary_modules(bi_twin))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"base_width": 0}, "base_width"), ({"small_input": "yes"}, "small_input"), ({"widths": 3}, "widths")],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_model("reactnet_a", **kwargs)


def test_wrong_input_shape_is_one_sentence() -> None:
    model = create_model("reactnet_a", num_classes=10, small_input=True, base_width=4)
    with pytest.raises(ValueError, match=r"reactnet_a expects input of shape \(N, 3, H, W\)"):
        model(torch.randn(2, 1, 32, 32))


def test_summary_counts_binary_macs() -> None:
    from flipnet.compress import summary

    model = create_model("reactnet_a", num_classes=10, small_input=True, base_width=4)
    s = summary(model, input_size=(1, 3, 32, 32))
    counts = count_parameters(model)
    stats = sum(b.numel() for n, b in model.named_buffers() if "running" in n)
    assert s.params_by_bits[1] == counts["binary"]
    assert s.params_by_bits[32] == counts["real"] + stats  # BatchNorm statistics count at 32 bits
    assert sum(row.macs_binary for row in s.layers) > 0


def _swap_packed(model: nn.Module) -> int:
    from flipnet.compress.packed import PackedBinaryConv2d

    n = 0
    for name, m in list(binary_modules(model)):
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        packed = PackedBinaryConv2d.from_binary(m)
        setattr(parent, name.rsplit(".", 1)[-1], nn.Sequential(m.input_quantizer, packed))
        n += 1
    return n


@pytest.mark.parametrize("name", ["reactnet_a", "birealnet18"])
def test_binary_convs_run_packed(name: str) -> None:
    """Every binary convolution of both networks has binary inputs and can run as XNOR-popcount.

    RSign shifts, RPReLU, BatchNorm and the real shortcuts stay float modules around them.
    """
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, small_input=True, base_width=8, weight_mode="flip")
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(x)  # non-trivial BatchNorm statistics
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4 and p.shape[0] == 1:
                p.normal_(0, 0.1)
        ref = model(x)
        assert _swap_packed(model) > 0
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_export_round_trip_runs_every_binary_conv_packed(tmp_path) -> None:
    from flipnet.compress import PackedBinaryConv2d, export_model, load_exported

    model = create_model("reactnet_a", num_classes=10, small_input=True, base_width=4, weight_mode="flip").eval()
    export_model(model, tmp_path / "r.safetensors")
    loaded = load_exported(tmp_path / "r.safetensors")
    binary = sum(isinstance(m, BinaryConv2d) for m in model.modules())
    assert binary == 31 and sum(isinstance(m, PackedBinaryConv2d) for m in loaded.modules()) == binary
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "binary", "kwargs", "model_kwargs"),
    [
        ("reactnet_a", "adam", {"lr": 1e-3}, {"weight_quantizer": "magnitude_aware_sign"}),
        ("reactnet_a", "cema", {"alpha": 1e-2, "gamma": 0.5}, {}),
        ("birealnet18", "adam", {"lr": 1e-3}, {"rprelu": True}),
        ("birealnet34", "bop", {"gamma": 1e-2, "threshold": 1e-9}, {}),
    ],
)
def test_trains_a_few_steps_on_cpu(name: str, binary: str, kwargs: dict, model_kwargs: dict) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, small_input=True, base_width=4 if name == "reactnet_a" else 8, **model_kwargs)
    if binary in ("cema", "bop"):
        flipnet.set_weight_mode(model, "flip")
    opt = create_optimizer(model, binary=binary, binary_kwargs=kwargs, real="adam", real_kwargs={"lr": 1e-2})
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(".move" in n for n in changed) or name == "birealnet34"
    assert any("conv" in n and n in dict(flipnet.named_binary_parameters(model)) for n in changed)
    if binary in ("cema", "bop"):
        assert all(bool((p.abs() == 1).all()) for p in flipnet.binary_parameters(model))


def test_reference_checkpoint_names_convert() -> None:
    """Key names of the reference ReActNet-A (feature.<i>.<module>) map onto flipnet's modules.

    Offline, the converted weights of a randomly initialised reference model gave the same logits
    as the reference forward pass (max |difference| 5e-4 on logits of magnitude 33, float32, two
    224x224 images; docs/models.md); here the names are checked.
    """
    from flipnet.models.reactnet import convert_reference_state_dict

    model = create_model("reactnet_a", weight_quantizer="magnitude_aware_sign")
    own = model.state_dict()
    reference_keys = [
        "feature.0.conv1.weight", "feature.0.bn1.running_var", "fc.weight", "fc.bias",
        # block 1 (32 -> 64, the two 1x1 halves) and block 3 (128 -> 128)
        "feature.1.move11.bias", "feature.1.binary_3x3.weight", "feature.1.bn1.weight", "feature.1.move12.bias",
        "feature.1.prelu1.weight", "feature.1.move13.bias", "feature.1.move21.bias", "feature.1.binary_pw_down1.weight",
        "feature.1.binary_pw_down2.weight", "feature.1.bn2_1.bias", "feature.1.bn2_2.num_batches_tracked",
        "feature.1.move22.bias", "feature.1.prelu2.weight", "feature.1.move23.bias",
        "feature.3.binary_pw.weight", "feature.3.bn2.running_mean",
    ]
    fake = {f"module.{k}": torch.zeros(1) for k in reference_keys}
    converted = convert_reference_state_dict(fake)
    assert set(converted) <= set(own)
    assert converted.keys() >= {"stem.conv.weight", "blocks.0.conv1x1a.weight", "blocks.2.conv1x1.weight", "blocks.0.act1.move_in.bias"}
    # every tensor of the model has a reference name: invert and convert back, then load strictly
    from flipnet.models.reactnet import _REFERENCE_BLOCK_NAMES

    inverse = {v: k for k, v in _REFERENCE_BLOCK_NAMES.items()}
    ref_state = {}
    for k, v in own.items():
        if k.endswith("_extra_state"):  # flipnet's weight-mode record; the reference has none
            continue
        parts = k.split(".")
        if parts[0] == "stem":
            ref_state[".".join(["feature.0", {"conv": "conv1", "bn": "bn1"}[parts[1]], *parts[2:]])] = v
        elif parts[0] == "blocks":
            name = ".".join(parts[2:-1])
            ref_state[".".join(["feature", str(int(parts[1]) + 1), inverse[name], parts[-1]])] = v
        else:
            ref_state[k] = v
    assert len(ref_state) == 298  # the reference state dict's length
    model.load_state_dict(convert_reference_state_dict(ref_state), strict=True)
    with pytest.raises(ValueError, match="unknown module 'move99'"):
        convert_reference_state_dict({"feature.2.move99.bias": torch.zeros(1)})


@pytest.mark.parametrize("small_input", [False, True])
def test_reactnet_takes_sides_that_are_not_multiples_of_32(small_input: bool) -> None:
    # the stride-2 convolution gives ceil(H/2); the shortcut pool must too (the reference's floor
    # crashed with a shape mismatch for e.g. 50x50 or 40x40 inputs)
    model = create_model("reactnet_a", num_classes=5, base_width=2, small_input=small_input).eval()
    for h, w in ((50, 50), (40, 41), (16, 17), (225, 223) if not small_input else (33, 35)):
        assert model(torch.randn(1, 3, h, w)).shape == (1, 5)


def test_reactnet_shortcut_pool_is_the_plain_average_on_even_sides() -> None:
    block = ReActBlock(flipnet.models.common.ModelSpec.create(num_classes=2, in_channels=3), 4, 8, 2)
    x = torch.randn(2, 4, 6, 8)
    torch.testing.assert_close(block.pool(x), nn.functional.avg_pool2d(x, 2, 2))
    odd = torch.randn(1, 4, 5, 5)
    pooled = block.pool(odd)
    assert pooled.shape == (1, 4, 3, 3)
    torch.testing.assert_close(pooled[..., 2, 2], odd[..., 4, 4])  # an edge window averages its valid pixel only
