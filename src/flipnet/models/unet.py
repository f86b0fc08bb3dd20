r"""A binary U-Net for semantic segmentation (default: Oxford-IIIT Pet trimaps, 3 classes, 128×128).

The encoder–decoder of Ronneberger et al. 2015 ("U-Net: Convolutional Networks for Biomedical
Image Segmentation") built from binary units. A *unit* is::

    out = bn(conv3x3(sign(x)))  (+ x where the shapes match, a Bi-Real shortcut; Liu et al. 2018)

With widths :math:`w_i = 2^i \cdot` ``base_width`` (i = 0 … ``depth``)::

    stem     full-precision 3×3 conv (in_channels → w0) + BatchNorm
    enc0     unit(w0 → w0)
    enc i    2×2 max-pool, unit(w_{i-1} → w_i), unit(w_i → w_i)          i = 1 … depth
    dropout  (at the bottleneck, when dropout > 0)
    up i     2× nearest upsampling, unit(w_{i+1} → w_i)                     i = depth-1 … 0
    dec i    concat(up i, enc i), unit(2 w_i → w_i), unit(w_i → w_i)
    head     full-precision 1×1 conv (w0 → num_classes, with bias): per-pixel logits

The first and last convolutions are full precision; every other convolution is binary (binary
weights, and binary inputs in ``bnn`` mode). ``residual=False`` drops the unit shortcuts.
Input height and width must be multiples of ``2 ** depth``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .common import ModelSpec, check_image_input, pair
from .registry import register_model

__all__ = ["UNet", "BinaryUnit", "unet"]


class BinaryUnit(nn.Module):
    """A binary 3×3 convolution and BatchNorm, with an identity shortcut when shapes match."""

    def __init__(self, spec: ModelSpec, in_channels: int, out_channels: int, residual: bool) -> None:
        super().__init__()
        self.conv = spec.conv(in_channels, out_channels, 3, 1, 1)
        self.bn = spec.bn2d(out_channels)
        self.residual = residual and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.conv(x))
        return out + x if self.residual else out


class UNet(nn.Module):
    """Binary U-Net; see the module docstring. Output: ``(N, num_classes, H, W)`` logits."""

    def __init__(self, spec: ModelSpec, *, base_width: int, depth: int, residual: bool, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.in_channels = spec.in_channels
        self.num_classes = spec.num_classes
        self.depth = depth
        self.input_shape = (spec.in_channels, *input_size)
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(spec.in_channels, widths[0], 3, 1, 1, bias=False),
                bn=spec.bn2d(widths[0]),
            )
        )
        self.encoder = nn.ModuleList([nn.Sequential(BinaryUnit(spec, widths[0], widths[0], residual))])
        for i in range(1, depth + 1):
            self.encoder.append(
                nn.Sequential(
                    nn.MaxPool2d(2, 2),
                    BinaryUnit(spec, widths[i - 1], widths[i], residual),
                    BinaryUnit(spec, widths[i], widths[i], residual),
                )
            )
        self.dropout = spec.dropout_layer() or nn.Identity()
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in range(depth):  # index i works on width w_i; run from deep to shallow
            self.up.append(
                nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), BinaryUnit(spec, widths[i + 1], widths[i], residual))
            )
            self.decoder.append(
                nn.Sequential(
                    BinaryUnit(spec, 2 * widths[i], widths[i], residual),
                    BinaryUnit(spec, widths[i], widths[i], residual),
                )
            )
        self.head = nn.Conv2d(widths[0], spec.num_classes, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        check_image_input(x, self.in_channels, "unet", multiple_of=2**self.depth)
        x = self.stem(x)
        skips: list[Tensor] = []
        for enc in self.encoder:
            x = enc(x)
            skips.append(x)
        x = self.dropout(skips.pop())
        for i in reversed(range(self.depth)):
            x = self.decoder[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.head(x)


@register_model(num_classes=3)
def unet(
    spec: ModelSpec,
    *,
    base_width: int = 32,
    depth: int = 4,
    residual: bool = True,
    input_size: int | tuple[int, int] = 128,
) -> UNet:
    """Binary U-Net (Ronneberger et al. 2015) with Bi-Real unit shortcuts; full-precision stem and head.

    Args:
        spec: shared options (see :func:`flipnet.models.create_model`; ``num_classes`` defaults
            to 3, the Oxford-IIIT Pet trimap classes).
        base_width: channels at full resolution (doubled at each level).
        depth: number of 2× downsamplings.
        residual: identity shortcut around each binary unit whose shapes match.
        input_size: nominal input height and width (``model.input_shape``); any multiple of
            ``2 ** depth`` is accepted at run time.
    """
    for opt, value in (("base_width", base_width), ("depth", depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{opt} must be a positive int, got {value!r}")
    if not isinstance(residual, bool):
        raise ConfigError(f"residual must be true or false, got {residual!r}")
    size = pair(input_size, "input_size")
    if size[0] % 2**depth or size[1] % 2**depth:
        raise ConfigError(f"unet with depth={depth} needs input_size multiples of {2**depth}, got {size[0]}×{size[1]}")
    return UNet(spec, base_width=base_width, depth=depth, residual=residual, input_size=size)
