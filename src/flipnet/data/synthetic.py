"""Seeded synthetic data with a learnable rule, of any shape and class count (for tests and demos)."""

from __future__ import annotations

import os
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from flipnet.data.base import DatasetBundle, register_dataset
from flipnet.errors import ConfigError

__all__ = ["load_synthetic"]


def _shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
        raise ConfigError(f"shape must be three positive ints (C, H, W), got {shape!r}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def _classification(
    n: int, shape: tuple[int, int, int], num_classes: int, noise: float, prototypes: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    clean = prototypes[y]  # {0, 1} patterns
    x = (1.0 - noise) * clean * 255.0 + noise * torch.rand((n, *shape), generator=g) * 255.0
    return x.round().clamp_(0, 255).to(torch.uint8), y


def _segmentation(
    n: int, shape: tuple[int, int, int], num_classes: int, noise: float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    c, h, w = shape
    low = torch.rand((n, 1, max(1, h // 4), max(1, w // 4)), generator=g)
    field = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[:, 0]  # smooth blobs in [0, 1]
    y = (field * num_classes).long().clamp_(0, num_classes - 1)
    # each class gets a band of intensities of width 1/num_classes; the noise stays inside the
    # band (|deviation| < noise / (2 * num_classes)), so larger noise only narrows the margin
    level = ((y.float() + 0.5) / num_classes).unsqueeze(1).expand(n, c, h, w)
    x = level + noise * (torch.rand((n, c, h, w), generator=g) - 0.5) / num_classes
    return (x * 255.0).round().clamp_(0, 255).to(torch.uint8), y


@register_dataset(
    "synthetic",
    "seeded random images with a learnable rule; any shape and class count",
    shape=lambda shape=(1, 8, 8), num_classes=10, **_: (_shape(shape), num_classes),
)
def load_synthetic(
    root: str | os.PathLike | None = None,
    *,
    num_train: int = 1024,
    num_test: int = 256,
    shape: Sequence[int] = (1, 8, 8),
    num_classes: int = 10,
    task: Literal["classification", "segmentation"] = "classification",
    noise: float = 0.5,
    seed: int = 0,
) -> DatasetBundle:
    """Make a seeded synthetic data set that a small model can fit.

    Classification: every class has a random binary prototype image; an example is its class's
    prototype mixed with uniform noise, ``x = (1 - noise) * 255 * prototype + noise * U(0, 255)``,
    so the nearest prototype (a linear rule) predicts the label. Classes are balanced.

    Segmentation: a smooth random field is cut into ``num_classes`` intensity bands (the mask);
    each pixel shows its band's centre grey level plus uniform noise that stays inside the band
    (``|noise| < noise / (2 * num_classes)`` of the range), so per-pixel thresholds predict the
    mask exactly and a higher ``noise`` narrows the margin.

    Args:
        root: unused (nothing is read); accepted so every loader has ``root=``.
        num_train, num_test: number of examples per split.
        shape: ``(C, H, W)`` of one image.
        num_classes: number of classes (>= 2).
        task: ``"classification"`` or ``"segmentation"``.
        noise: mixing weight of the noise in ``[0, 1)``; higher is harder.
        seed: the same seed gives the same data on every machine.
    """
    chw = _shape(shape)
    for label, v in (("num_train", num_train), ("num_test", num_test)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{label} must be a positive int, got {v!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not 0.0 <= float(noise) < 1.0:
        raise ConfigError(f"noise must lie in [0, 1), got {noise!r}")
    if task not in ("classification", "segmentation"):
        raise ConfigError(f"task must be 'classification' or 'segmentation', got {task!r}")
    g = torch.Generator().manual_seed(int(seed))
    if task == "classification":
        prototypes = (torch.rand((num_classes, *chw), generator=g) < 0.5).float()
        train_x, train_y = _classification(num_train, chw, num_classes, float(noise), prototypes, g)
        test_x, test_y = _classification(num_test, chw, num_classes, float(noise), prototypes, g)
    else:
        train_x, train_y = _segmentation(num_train, chw, num_classes, float(noise), g)
        test_x, test_y = _segmentation(num_test, chw, num_classes, float(noise), g)
    return DatasetBundle(
        name="synthetic",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=num_classes,
        task=task,
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        info={"seed": int(seed), "noise": float(noise)},
    )
