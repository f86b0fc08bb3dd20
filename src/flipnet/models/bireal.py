r"""Bi-Real Net ResNet-18 and ResNet-34 (Liu et al. 2018), optionally with ReActNet's RPReLU.

Reference: Zechun Liu, Baoyuan Wu, Wenhan Luo, Xin Yang, Wei Liu and Kwang-Ting Cheng, "Bi-Real
Net: Enhancing the Performance of 1-bit CNNs with Improved Representational Capability and
Advanced Training Algorithm", ECCV 2018 (code ``liuzechun/Bi-Real-net``); the ResNet variant of
ReActNet (``liuzechun/ReActNet``, ``resnet/2_step2/birealnet.py``) adds RSign/RPReLU to it.

**Unit.** Every binary 3×3 convolution has its own real-valued shortcut (the "bi-real" path)::

    y = bn(conv3x3(sign(x))) + shortcut(x)

``shortcut`` is the identity, or, where the shape changes, a 2×2 average pool (stride 2) then a
full-precision 1×1 convolution and a BatchNorm. The sign is ``approx_sign`` (Bi-Real Net's
piecewise-polynomial gradient). ``rprelu=True`` gives ReActNet's Bi-Real variant: an RSign shift
(:class:`~flipnet.models.reactnet.LearnableBias`) before the sign and an
:class:`~flipnet.models.reactnet.RPReLU` after the addition.

**Network.** ResNet layout: a full-precision 7×7 stride-2 stem convolution with 64 channels,
BatchNorm, a 3×3 stride-2 max-pool (no activation); four stages of units with 64, 128, 256 and
512 channels (stride 2 at the first unit of stages 2–4); global average pooling, ``dropout`` and
a full-precision ``fc``. ``birealnet18`` has 4 units per stage (two per ResNet basic block), 16
binary convolutions; ``birealnet34`` has 6, 8, 12, 6 units (ResNet-34's 3, 4, 6, 3 blocks), 32.
With 1000 classes: 11,689,512 parameters for Bi-Real-18 (10,985,472 binary; the same as the
ReActNet reference file with its RSign/RPReLU parameters removed, and as torchvision's
ResNet-18), 21,797,672 for Bi-Real-34 (21,086,208 binary); with ``rprelu=True`` 11,704,424 and
21,827,432, the reference file's counts. ``small_input=True``: 3×3 stride-1 stem, no max-pool,
for 32×32 images.

Bi-Real Net is a binary-activation architecture: ``mode="bwn"`` is refused (use ``resnet18``
for binary weights with real activations); ``mode="float"`` builds the same layout with real
convolutions (its activation is the spec's, ``relu`` by default, or ``sign``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import Tensor, nn

from ..errors import ConfigError
from .common import ModelSpec, add_stages, check_image_input
from .reactnet import LearnableBias, RPReLU
from .registry import register_model

__all__ = ["BiRealUnit", "BiRealNet", "birealnet18", "birealnet34"]


class BiRealUnit(nn.Module):
    """One binary 3×3 convolution with its real-valued shortcut (and optional RSign/RPReLU).

    Attributes: ``move`` (RSign shift, ``rprelu`` only), ``conv``, ``bn``, ``shortcut``
    (identity, or ``pool`` + ``conv`` + ``bn``), ``act`` (RPReLU, or identity).
    """

    def __init__(self, spec: ModelSpec, in_channels: int, out_channels: int, stride: int, rprelu: bool) -> None:
        super().__init__()
        self.move: nn.Module = LearnableBias(in_channels) if rprelu else nn.Identity()
        self.conv = spec.conv(in_channels, out_channels, 3, stride, 1)
        self.bn = spec.bn2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            if stride > 1:
                layers["pool"] = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
            layers["conv"] = nn.Conv2d(in_channels, out_channels, 1, bias=False)
            layers["bn"] = spec.bn2d(out_channels)
            self.shortcut = nn.Sequential(layers)
        self.act: nn.Module = RPReLU(out_channels) if rprelu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(self.move(x))) + self.shortcut(x))


class BiRealNet(nn.Module):
    """Bi-Real Net: stem, four stages of :class:`BiRealUnit`, pooling, full-precision ``fc``.

    Attributes: ``stem``, ``layer1`` … ``layer4``, ``pool``, ``dropout``, ``fc``, ``input_shape``.
    """

    def __init__(
        self, spec: ModelSpec, *, name: str, units: Sequence[int], base_width: int, small_input: bool, rprelu: bool
    ) -> None:
        super().__init__()
        if spec.arch == "bwn":
            raise ConfigError(
                f"{name} has binary activations by design; mode='bwn' is not available "
                "(use resnet18 for binary weights with real activations)"
            )
        self._name = name
        self.in_channels = spec.in_channels
        self.num_classes = spec.num_classes
        size = 32 if small_input else 224
        self.input_shape = (spec.in_channels, size, size)
        widths = [base_width * 2**i for i in range(4)]
        stem: OrderedDict[str, nn.Module] = OrderedDict()
        if small_input:
            stem["conv"] = nn.Conv2d(spec.in_channels, widths[0], 3, 1, 1, bias=False)
            stem["bn"] = spec.bn2d(widths[0])
        else:
            stem["conv"] = nn.Conv2d(spec.in_channels, widths[0], 7, 2, 3, bias=False)
            stem["bn"] = spec.bn2d(widths[0])
            stem["pool"] = nn.MaxPool2d(3, 2, 1)
        self.stem = nn.Sequential(stem)
        c_in = add_stages(self, units, widths, widths[0], lambda ci, co, stride: BiRealUnit(spec, ci, co, stride, rprelu))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = spec.dropout_layer() or nn.Identity()
        self.fc = nn.Linear(c_in, spec.num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's feature map."""
        check_image_input(x, self.in_channels, self._name, min_size=8)
        x = self.stem(x)
        for name in self.stages:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.forward_features(x)).flatten(1)
        return self.fc(self.dropout(x))


def _check(small_input: bool, base_width: int, rprelu: bool) -> None:
    for name, value in (("small_input", small_input), ("rprelu", rprelu)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
    if isinstance(base_width, bool) or not isinstance(base_width, int) or base_width <= 0:
        raise ConfigError(f"base_width must be a positive int, got {base_width!r}")


@register_model(num_classes=1000, binary_activation="approx_sign")
def birealnet18(spec: ModelSpec, *, small_input: bool = False, base_width: int = 64, rprelu: bool = False) -> BiRealNet:
    """Bi-Real Net 18 (Liu et al. 2018): a real shortcut around every binary 3×3 conv; rprelu adds ReActNet's RSign/RPReLU.

    Args:
        spec: shared options (``num_classes`` defaults to 1000; the default sign is ``approx_sign``).
        small_input: 3×3 stride-1 stem without max-pool, for 32×32 images.
        base_width: channels of the first stage (64; then 2×, 4×, 8×).
        rprelu: ReActNet's variant (learnable shift before each sign, RPReLU after each unit).
    """
    _check(small_input, base_width, rprelu)
    return BiRealNet(spec, name="birealnet18", units=(4, 4, 4, 4), base_width=base_width,
                     small_input=small_input, rprelu=rprelu)


@register_model(num_classes=1000, binary_activation="approx_sign")
def birealnet34(spec: ModelSpec, *, small_input: bool = False, base_width: int = 64, rprelu: bool = False) -> BiRealNet:
    """Bi-Real Net 34 (Liu et al. 2018): ResNet-34 layout with a real shortcut around every binary 3×3 conv.

    Args: as :func:`birealnet18`.
    """
    _check(small_input, base_width, rprelu)
    return BiRealNet(spec, name="birealnet34", units=(6, 8, 12, 6), base_width=base_width,
                     small_input=small_input, rprelu=rprelu)
