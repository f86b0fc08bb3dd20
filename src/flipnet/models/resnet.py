r"""Binary ResNets: ``resnet20`` (CIFAR) and ``resnet18`` (ImageNet, or 32×32 with ``small_input``).

Two block types, chosen by the mode (a float twin mirrors the mode given by ``twin_of``):

**Bi-Real blocks** (``mode="bnn"``; Liu et al. 2018, "Bi-Real Net: Enhancing the Performance of
1-bit CNNs with Improved Representational Capability and Advanced Training Algorithm"). Every
binary 3×3 convolution has its own real-valued shortcut::

    out = bn1(conv1(sign(x))) + downsample(x)
    out = bn2(conv2(sign(out))) + out

``downsample`` is the identity, or, where the shape changes, a 2×2 average pool, a
full-precision 1×1 convolution and a BatchNorm (``downsample="avgpool_conv"``). There is no
other activation: the sign at the input of each binary convolution is the only non-linearity.
The default sign is ``approx_sign`` (Bi-Real Net's piecewise-polynomial gradient), as in the
larq zoo's BiRealNet.

**Basic blocks** (``mode="bwn"``; He et al. 2016, "Deep Residual Learning for Image
Recognition"), with binary weights in the 3×3 convolutions and real activations, as in the sign
stability study of Sun & Yao::

    out = act(bn1(conv1(x)))
    out = act(bn2(conv2(out)) + downsample(x))

For ``resnet20`` the downsampling shortcut is He et al.'s option A (subsample and zero-pad
channels, no parameters: ``downsample="pad"``); for ``resnet18`` it is a full-precision
1×1 strided convolution and BatchNorm (option B, ``downsample="conv"``).

In every mode the stem convolution, the shortcut convolutions and the final classifier are full
precision (plain ``nn.Conv2d``/``nn.Linear``); ``dropout`` goes before the classifier.

Layouts: ``resnet20`` has a 3×3 stem with 16 channels and three stages of three blocks with 16,
32 and 64 channels; ``resnet18`` a 7×7 stride-2 stem with 64 channels and a 3×3 max-pool
(``small_input=True``: a 3×3 stride-1 stem and no max-pool) and four stages of two blocks with
64, 128, 256 and 512 channels.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .common import ModelSpec, add_stages, check_image_input
from .registry import register_model

__all__ = ["ResNet", "BiRealBlock", "BasicBlock", "PadShortcut", "resnet20", "resnet18"]

DOWNSAMPLES: tuple[str, ...] = ("avgpool_conv", "conv", "pad")


class PadShortcut(nn.Module):
    """He et al.'s option-A shortcut: subsample by ``stride`` and zero-pad the extra channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ConfigError("downsample='pad' cannot reduce the number of channels")
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            before = self.extra // 2
            x = F.pad(x, (0, 0, 0, 0, before, self.extra - before))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra}"


def _downsample(spec: ModelSpec, kind: str, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if kind == "pad":
        return PadShortcut(in_channels, out_channels, stride)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if kind == "avgpool_conv":
        if stride > 1:
            layers["pool"] = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
        layers["conv"] = nn.Conv2d(in_channels, out_channels, 1, bias=False)
    else:  # "conv"
        layers["conv"] = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
    layers["bn"] = spec.bn2d(out_channels)
    return nn.Sequential(layers)


class BiRealBlock(nn.Module):
    """Two binary 3×3 convolutions, each with its own real-valued shortcut (Bi-Real Net)."""

    def __init__(self, spec: ModelSpec, in_channels: int, out_channels: int, stride: int, downsample: str) -> None:
        super().__init__()
        self.conv1 = spec.conv(in_channels, out_channels, 3, stride, 1)
        self.bn1 = spec.bn2d(out_channels)
        self.downsample = _downsample(spec, downsample, in_channels, out_channels, stride)
        self.conv2 = spec.conv(out_channels, out_channels, 3, 1, 1)
        self.bn2 = spec.bn2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)) + self.downsample(x)
        return self.bn2(self.conv2(out)) + out


class BasicBlock(nn.Module):
    """He et al.'s basic block with binary-weight 3×3 convolutions and real activations."""

    def __init__(self, spec: ModelSpec, in_channels: int, out_channels: int, stride: int, downsample: str) -> None:
        super().__init__()
        self.conv1 = spec.conv(in_channels, out_channels, 3, stride, 1, quantize_input=False)
        self.bn1 = spec.bn2d(out_channels)
        self.act1 = spec.act()
        self.conv2 = spec.conv(out_channels, out_channels, 3, 1, 1, quantize_input=False)
        self.bn2 = spec.bn2d(out_channels)
        self.downsample = _downsample(spec, downsample, in_channels, out_channels, stride)
        self.act2 = spec.act()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.downsample(x))


class ResNet(nn.Module):
    """A ResNet of :class:`BiRealBlock` (``bnn``) or :class:`BasicBlock` (``bwn``) stages.

    Attributes: ``stem`` (full-precision conv, BatchNorm, activation in basic-block networks,
    optional max-pool), ``layer1`` … ``layerN`` (stages), ``pool``, ``dropout``, ``fc``
    (full-precision classifier), ``input_shape`` (nominal ``(C, H, W)``).
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        name: str,
        blocks: Sequence[int],
        widths: Sequence[int],
        stem_kernel: int,
        stem_stride: int,
        stem_pool: bool,
        downsample: str | None,
        default_downsample: str,
        input_size: int,
    ) -> None:
        super().__init__()
        basic = spec.arch == "bwn"
        kind = downsample if downsample is not None else ("avgpool_conv" if not basic else default_downsample)
        if kind not in DOWNSAMPLES:
            raise ConfigError(f"downsample must be one of {', '.join(DOWNSAMPLES)} or None, got {downsample!r}")
        self._name = name
        self.in_channels = spec.in_channels
        self.num_classes = spec.num_classes
        self.input_shape = (spec.in_channels, input_size, input_size)
        stem: OrderedDict[str, nn.Module] = OrderedDict()
        stem["conv"] = nn.Conv2d(
            spec.in_channels, widths[0], stem_kernel, stem_stride, stem_kernel // 2, bias=False
        )
        stem["bn"] = spec.bn2d(widths[0])
        if basic:
            stem["act"] = spec.act()
        if stem_pool:
            stem["pool"] = nn.MaxPool2d(3, 2, 1)
        self.stem = nn.Sequential(stem)
        block_cls = BasicBlock if basic else BiRealBlock
        c_in = add_stages(self, blocks, widths, widths[0], lambda ci, co, stride: block_cls(spec, ci, co, stride, kind))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = spec.dropout_layer() or nn.Identity()
        self.fc = nn.Linear(c_in, spec.num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's feature map."""
        check_image_input(x, self.in_channels, self._name)
        x = self.stem(x)
        for name in self.stages:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.forward_features(x)).flatten(1)
        return self.fc(self.dropout(x))


def _check_width(base_width: int) -> None:
    if isinstance(base_width, bool) or not isinstance(base_width, int) or base_width <= 0:
        raise ConfigError(f"base_width must be a positive int, got {base_width!r}")


@register_model(binary_activation="approx_sign")
def resnet20(spec: ModelSpec, *, base_width: int = 16, downsample: str | None = None) -> ResNet:
    """ResNet-20 for CIFAR (He et al. 2016): Bi-Real blocks in bnn mode, binary-weight basic blocks in bwn mode.

    Args:
        spec: shared options (see :func:`flipnet.models.create_model`).
        base_width: channels of the first stage (16; then 2× and 4×).
        downsample: shortcut where the shape changes: ``"avgpool_conv"`` (Bi-Real, default in
            bnn mode), ``"pad"`` (He et al. option A, default in bwn mode) or ``"conv"``.
    """
    _check_width(base_width)
    w = base_width
    return ResNet(
        spec, name="resnet20", blocks=(3, 3, 3), widths=(w, 2 * w, 4 * w), stem_kernel=3, stem_stride=1,
        stem_pool=False, downsample=downsample, default_downsample="pad", input_size=32,
    )


@register_model(num_classes=1000, binary_activation="approx_sign")
def resnet18(
    spec: ModelSpec, *, small_input: bool = False, base_width: int = 64, downsample: str | None = None
) -> ResNet:
    """ResNet-18 (Bi-Real Net 18 in bnn mode; Liu et al. 2018) for 224×224 ImageNet input, or 32×32 with small_input.

    Args:
        spec: shared options (see :func:`flipnet.models.create_model`; ``num_classes`` defaults to 1000).
        small_input: 3×3 stride-1 stem without max-pool, for 32×32 images.
        base_width: channels of the first stage (64; then 2×, 4×, 8×).
        downsample: ``"avgpool_conv"`` (Bi-Real, default in bnn mode), ``"conv"`` (default in bwn
            mode) or ``"pad"``.
    """
    _check_width(base_width)
    if not isinstance(small_input, bool):
        raise ConfigError(f"small_input must be true or false, got {small_input!r}")
    w = base_width
    return ResNet(
        spec, name="resnet18", blocks=(2, 2, 2, 2), widths=(w, 2 * w, 4 * w, 8 * w),
        stem_kernel=3 if small_input else 7, stem_stride=1 if small_input else 2, stem_pool=not small_input,
        downsample=downsample, default_downsample="conv", input_size=32 if small_input else 224,
    )
