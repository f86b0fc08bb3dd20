r"""ReActNet-A (Liu et al. 2020): a binary MobileNet-V1 with RSign and RPReLU.

Reference: Zechun Liu, Zhiqiang Shen, Marios Savvides and Kwang-Ting Cheng, "ReActNet: Towards
Precise Binary Neural Network with Generalized Activation Functions", ECCV 2020; reference code
``liuzechun/ReActNet`` (``mobilenet/2_step2/reactnet.py``), which Quist et al. 2023 reuse for
their ImageNet experiments (``jorisquist/Understanding-WM-HP-in-BNNs``,
``imagenet/step2/reactnet.py``). The layout below follows those files; the code is flipnet's.

**Generalised activations.** ReActNet shifts the distribution before each sign and around each
PReLU with learnable per-channel constants:

.. math::

    \mathrm{RSign}(x_c) = \mathrm{sign}(x_c - \alpha_c), \qquad
    \mathrm{RPReLU}(x_c) = \mathrm{PReLU}_{\beta_c}(x_c - \gamma_c) + \zeta_c

with :math:`\alpha, \gamma, \zeta` initialised to 0 and the PReLU slope :math:`\beta` to 0.25
(``nn.PReLU``). In flipnet the shift of RSign is a :class:`LearnableBias` module (named
``move*``) placed right before the binary convolution, whose ``input_quantizer`` is the sign
itself: the binary convolution therefore sees ±1 inputs, counts as binary in
:func:`flipnet.compress.summary.summary` and can be replaced by a packed XNOR-popcount layer.
The sign's gradient is ``approx_sign`` (the reference's piecewise-quadratic ``BinaryActivation``).

**Block** (``ReActBlock``, ``C`` input and ``C'`` output channels, ``C' ∈ {C, 2C}``)::

    y1 = RPReLU1( bn1( conv3x3( RSign1(x) ) ) + shortcut(x) )      shortcut: 2×2 avg-pool if stride 2 (*)
    y2 = RPReLU2( bn2( conv1x1( RSign2(y1) ) ) + y1 )               C' = C
    y2 = RPReLU2( concat( bn2a(conv1x1a(RSign2(y1))) + y1,
                          bn2b(conv1x1b(RSign2(y1))) + y1 ) )       C' = 2C (channel duplication)

The 3×3 convolution is a full (not depthwise) binary convolution ``C → C``. (*) The pool rounds
up (``ceil_mode``, averaging the valid pixels of an edge window), so that any input size works; the
reference's pool rounds down and needs sides divisible by 32 (16 with ``small_input``), where the
two are identical.

**Network.** Stage widths ``[32, 64, 128, 128, 256, 256, 512 ×6, 1024, 1024]`` (scaled by
``base_width / 32``): a full-precision 3×3 stride-2 stem convolution + BatchNorm (no
activation), 13 blocks (stride 2 where the width grows, except 32 → 64), global average pooling,
``dropout``, and a full-precision ``fc``. With 1000 classes the model has 29,343,592 parameters,
28,253,184 of them binary weights — the same counts as the reference file (``tests/test_reactnet.py``
checks them). ``small_input=True`` makes the stem stride 1, for 32×32 images (CIFAR).

**Weights.** The reference binarises latent weights as :math:`\bar{|W_c|}\,\mathrm{sign}(W)`
(per-output-channel mean magnitude, detached) with a clipped straight-through gradient; the
closest flipnet setting is ``weight_quantizer="magnitude_aware_sign"`` (same forward; flipnet's
gradient is additionally scaled by :math:`\bar{|W_c|}`), or ``scale="xnor"``. With CEMA the
reference uses plain ±1 weights (``HardBinaryConv.LATENT_WEIGHTS = False``), i.e. flipnet's
``weight_mode="flip"`` with ``scale="none"``. The recipes ``imagenet_reactnet_*`` set these.

Modes: in ``bwn`` and ``float`` mode the signs become the spec's real activation (the shifts and
RPReLUs stay), so the float twin keeps parameter names and shapes.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .common import ModelSpec, check_image_input
from .registry import register_model

__all__ = [
    "LearnableBias",
    "RPReLU",
    "ReActBlock",
    "ReActNet",
    "reactnet_a",
    "REACTNET_A_WIDTHS",
    "convert_reference_state_dict",
]

#: Output widths of the stem (first entry) and of the 13 blocks of ReActNet-A.
REACTNET_A_WIDTHS: tuple[int, ...] = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)


class LearnableBias(nn.Module):
    r"""Adds a learnable per-channel constant: :math:`y_c = x_c + b_c` (``b`` starts at 0).

    ReActNet's "move" operation: the shift of RSign (the sign of :math:`x + b` is the sign of
    :math:`x - \alpha` with :math:`\alpha = -b`) and the two shifts of RPReLU.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.bias.shape[1]}"


class RPReLU(nn.Module):
    r"""ReActNet's RPReLU: :math:`y_c = \mathrm{PReLU}_{\beta_c}(x_c + b^{in}_c) + b^{out}_c`.

    ``move_in`` and ``move_out`` are :class:`LearnableBias` shifts (zero at start), ``prelu`` a
    per-channel ``nn.PReLU`` (slope 0.25 at start). At initialisation it is a plain PReLU.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.move_in = LearnableBias(channels)
        self.prelu = nn.PReLU(channels)
        self.move_out = LearnableBias(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.move_out(self.prelu(self.move_in(x)))


class ReActBlock(nn.Module):
    """One ReActNet-A block: binary 3×3 conv and binary 1×1 conv(s), each with a real shortcut.

    Attributes: ``move1`` (RSign shift), ``conv3x3``, ``bn1``, ``pool`` (2×2 average pool of the
    shortcut when ``stride == 2``, else identity), ``act1`` (RPReLU), ``move2``; then ``conv1x1``
    + ``bn2`` when the width stays, or ``conv1x1a``/``bn2a`` and ``conv1x1b``/``bn2b`` (two
    ``C → C`` halves concatenated) when it doubles; ``act2`` (RPReLU).
    """

    def __init__(self, spec: ModelSpec, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels not in (in_channels, 2 * in_channels):
            raise ConfigError(
                f"a ReActNet block keeps or doubles its width; got {in_channels} -> {out_channels} channels"
            )
        if stride not in (1, 2):
            raise ConfigError(f"a ReActNet block has stride 1 or 2, got {stride}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.move1 = LearnableBias(in_channels)
        self.conv3x3 = spec.conv(in_channels, in_channels, 3, stride, 1)
        self.bn1 = spec.bn2d(in_channels)
        # ceil_mode: an odd side gives ceil(H/2) like the stride-2 convolution (the reference's
        # floor would not match it); for even sides it is the reference's plain 2x2 average
        self.pool: nn.Module = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) if stride == 2 else nn.Identity()
        self.act1 = RPReLU(in_channels)
        self.move2 = LearnableBias(in_channels)
        self.duplicate = out_channels != in_channels
        if self.duplicate:
            self.conv1x1a = spec.conv(in_channels, in_channels, 1)
            self.bn2a = spec.bn2d(in_channels)
            self.conv1x1b = spec.conv(in_channels, in_channels, 1)
            self.bn2b = spec.bn2d(in_channels)
        else:
            self.conv1x1 = spec.conv(in_channels, out_channels, 1)
            self.bn2 = spec.bn2d(out_channels)
        self.act2 = RPReLU(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        y1 = self.bn1(self.conv3x3(self.move1(x))) + self.pool(x)
        y1 = self.act1(y1)
        z = self.move2(y1)
        if self.duplicate:
            y2 = torch.cat([self.bn2a(self.conv1x1a(z)) + y1, self.bn2b(self.conv1x1b(z)) + y1], dim=1)
        else:
            y2 = self.bn2(self.conv1x1(z)) + y1
        return self.act2(y2)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, stride={self.stride}"


class ReActNet(nn.Module):
    """ReActNet-A: full-precision stem, :class:`ReActBlock` stages, pooling, full-precision ``fc``.

    Attributes: ``stem`` (``conv``, ``bn``), ``blocks`` (``nn.Sequential`` of 13 blocks),
    ``pool``, ``dropout``, ``fc``, ``input_shape`` (nominal ``(C, H, W)``).
    """

    def __init__(self, spec: ModelSpec, *, widths: tuple[int, ...], small_input: bool, name: str = "reactnet_a") -> None:
        super().__init__()
        self._name = name
        self.in_channels = spec.in_channels
        self.num_classes = spec.num_classes
        size = 32 if small_input else 224
        self.input_shape = (spec.in_channels, size, size)
        stem: OrderedDict[str, nn.Module] = OrderedDict()
        stem["conv"] = nn.Conv2d(spec.in_channels, widths[0], 3, 1 if small_input else 2, 1, bias=False)
        stem["bn"] = spec.bn2d(widths[0])
        self.stem = nn.Sequential(stem)
        blocks = []
        for i in range(1, len(widths)):
            c_in, c_out = widths[i - 1], widths[i]
            # the width grows with stride 2, except for the first block (32 -> 64, stride 1)
            stride = 2 if (c_out != c_in and i > 1) else 1
            blocks.append(ReActBlock(spec, c_in, c_out, stride))
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = spec.dropout_layer() or nn.Identity()
        self.fc = nn.Linear(widths[-1], spec.num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last block's feature map."""
        check_image_input(x, self.in_channels, self._name, min_size=16)
        return self.blocks(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.forward_features(x)).flatten(1)
        return self.fc(self.dropout(x))


@register_model(num_classes=1000, binary_activation="approx_sign")
def reactnet_a(spec: ModelSpec, *, small_input: bool = False, base_width: int = 32) -> ReActNet:
    """ReActNet-A (Liu et al. 2020): binary MobileNet-V1 with RSign and RPReLU, for 224×224 ImageNet or 32×32 with small_input.

    Args:
        spec: shared options (see :func:`flipnet.models.create_model`; ``num_classes`` defaults
            to 1000; the default sign is ``approx_sign``).
        small_input: stride-1 stem for 32×32 images (CIFAR); the default stride-2 stem is for
            224×224 ImageNet images.
        base_width: width of the stem (32 in ReActNet-A); every stage width scales with it
            (``base_width=8`` gives a CPU-sized model with a quarter of the channels).
    """
    if not isinstance(small_input, bool):
        raise ConfigError(f"small_input must be true or false, got {small_input!r}")
    if isinstance(base_width, bool) or not isinstance(base_width, int) or base_width <= 0:
        raise ConfigError(f"base_width must be a positive int, got {base_width!r}")
    widths = tuple(r // 32 * base_width for r in REACTNET_A_WIDTHS)  # every reference width is a multiple of 32
    return ReActNet(spec, widths=widths, small_input=small_input)


# ---------------------------------------------------------------------------------------------
# checkpoints of the reference code

#: Module names inside a block of the reference code (``feature.<i>.<name>``) -> flipnet's.
_REFERENCE_BLOCK_NAMES = {
    "move11": "move1",
    "binary_3x3": "conv3x3",
    "bn1": "bn1",
    "move12": "act1.move_in",
    "prelu1": "act1.prelu",
    "move13": "act1.move_out",
    "move21": "move2",
    "binary_pw": "conv1x1",
    "bn2": "bn2",
    "binary_pw_down1": "conv1x1a",
    "binary_pw_down2": "conv1x1b",
    "bn2_1": "bn2a",
    "bn2_2": "bn2b",
    "move22": "act2.move_in",
    "prelu2": "act2.prelu",
    "move23": "act2.move_out",
}


def convert_reference_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a state dict of the reference ReActNet-A (``liuzechun/ReActNet``
    ``mobilenet/*/reactnet.py``, also ``jorisquist/Understanding-WM-HP-in-BNNs``) to flipnet's names.

    ``feature.0.conv1``/``bn1`` become ``stem.conv``/``stem.bn``, ``feature.<i>.<name>`` becomes
    ``blocks.<i-1>.<flipnet name>``, ``fc`` stays; a ``module.`` prefix (DataParallel) is removed.
    Load the result into ``create_model("reactnet_a", weight_quantizer="magnitude_aware_sign")``
    (the reference's scaled sign) for step-2 checkpoints, or into the float twin
    (``mode="float", activation="approx_sign"``) for step-1 checkpoints. An unknown key raises
    ``ValueError`` naming it.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        parts = k.split(".")
        if parts[0] == "fc":
            out[k] = value
            continue
        if parts[0] != "feature" or len(parts) < 4 or not parts[1].isdigit():
            raise ValueError(f"{key!r} is not a key of the reference ReActNet-A (expected feature.<i>.<module>.<tensor> or fc.*)")
        i = int(parts[1])
        if i == 0:
            stem = {"conv1": "conv", "bn1": "bn"}.get(parts[2])
            if stem is None:
                raise ValueError(f"{key!r}: the reference stem has conv1 and bn1 only")
            out[".".join(["stem", stem, *parts[3:]])] = value
            continue
        name = _REFERENCE_BLOCK_NAMES.get(parts[2])
        if name is None:
            raise ValueError(f"{key!r}: unknown module {parts[2]!r} in a reference ReActNet block")
        out[".".join(["blocks", str(i - 1), name, *parts[3:]])] = value
    return out
