"""A tiny ImageNet-layout folder of generated JPEGs (shared by the ImageNet data and recipe tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("n01440764", "n01443537", "n01484850")


def make_image_folder(root: Path, *, train_per_class: int = 6, val_per_class: int = 2, size: tuple[int, int] = (40, 30),
                      classes: tuple[str, ...] = CLASSES, seed: int = 0) -> Path:
    """Write ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG`` and return ``root``.

    Each class has its own mean colour plus noise, so a model can learn the classes; sizes vary
    a little (``size`` ± 4 pixels) as real photos do; one grayscale image per split tests the RGB
    conversion.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.zeros(3)
            base[c % 3] = 200
            for i in range(n):
                w, h = size[0] + int(rng.integers(-4, 5)), size[1] + int(rng.integers(-4, 5))
                pix = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(pix)
                if i == 0 and c == 0:
                    img = img.convert("L")
                img.save(folder / f"{name}_{i:04d}.JPEG", format="JPEG", quality=90)
    return root
