"""Oxford-IIIT Pet: foreground segmentation from trimaps (or 37-breed classification).

Layout (torchvision's ``OxfordIIITPet``)::

    <root>/oxford-iiit-pet/images/<image_id>.jpg
    <root>/oxford-iiit-pet/annotations/trimaps/<image_id>.png     # 1 pet, 2 background, 3 border
    <root>/oxford-iiit-pet/annotations/trainval.txt, test.txt     # "<image_id> <breed 1..37> <species 1..2> <breed id>"

Images are resized to a fixed size (bilinear, antialiased), masks with nearest neighbour. Mask
class ids: 0 = pet (trimap 1), 1 = background (trimap 2), 2 = border (trimap 3). Decoding the
full set takes a while, so the resized tensors are cached (``flipnet-cache/`` inside the data
folder) and reused.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from flipnet.data.base import (
    DataFormatError,
    DatasetBundle,
    check_subset,
    not_found,
    register_dataset,
    resolve_root,
    short_reason,
)
from flipnet.errors import ConfigError, DataNotFoundError
from flipnet.utils import atomic_torch_save

__all__ = ["PET_MASK_CLASSES", "TRIMAP_TO_CLASS", "load_oxford_pets"]

log = logging.getLogger(__name__)

PET_MASK_CLASSES = ("pet", "background", "border")
TRIMAP_TO_CLASS = {1: 0, 2: 1, 3: 2}
"""Trimap pixel value → mask class id."""
_CACHE_VERSION = 1


def _image_size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(isinstance(v, int) for v in image_size):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise ConfigError(f"image_size must be an int or (height, width), got {image_size!r}")
    if min(size) < 1:
        raise ConfigError(f"image_size must be positive, got {image_size!r}")
    return size


def _read_split(path: Path) -> list[tuple[str, int]]:
    """``(image_id, breed index 0..36)`` for each line of ``trainval.txt`` / ``test.txt``."""
    entries = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) < 1:
            raise DataFormatError(f"{path}:{lineno}: expected '<image_id> <class 1..37> ...', got {line!r}")
        entries.append((parts[0], int(parts[1]) - 1))
    return entries


def _load_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    try:
        with Image.open(path) as img:
            img.draft("RGB", (w, h))  # JPEG: decode at the smallest DCT scale that is still >= the target
            rgb = img.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataFormatError(f"{path} is not a readable image ({e}); download the data set again") from e
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def _load_trimap(path: Path, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise DataFormatError(f"{path}: a trimap must be a single-channel image, got mode {img.mode}")
            trimap = np.asarray(img.resize((w, h), Image.Resampling.NEAREST))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        if isinstance(e, DataFormatError):
            raise
        raise DataFormatError(f"{path} is not a readable trimap ({e}); download the data set again") from e
    values = trimap.astype(np.int64)
    mask = np.full(values.shape, -1, dtype=np.int64)
    for value, cls in TRIMAP_TO_CLASS.items():
        mask[values == value] = cls
    if (mask < 0).any():
        bad = sorted(set(np.unique(values).tolist()) - set(TRIMAP_TO_CLASS))
        raise DataFormatError(f"{path}: trimap values must be 1, 2 or 3, found {bad}")
    return mask


def _breed_names(entries: list[tuple[str, int]]) -> tuple[str, ...]:
    names: dict[int, str] = {}
    for image_id, label in entries:
        names.setdefault(label, " ".join(p.title() for p in image_id.rsplit("_", 1)[0].split("_")))
    n = max(names) + 1 if names else 0
    return tuple(names.get(i, f"class {i}") for i in range(n))


def _decode(
    folder: Path, entries: list[tuple[str, int]], size: tuple[int, int], segmentation: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = size
    x = np.empty((len(entries), 3, h, w), np.uint8)
    y = np.empty((len(entries), h, w) if segmentation else (len(entries),), np.int64)
    for i, (image_id, label) in enumerate(entries):
        img_path = folder / "images" / f"{image_id}.jpg"
        if not img_path.is_file():
            raise DataNotFoundError(f"{img_path} is listed in the split files but missing; download the data set again")
        x[i] = _load_image(img_path, size)
        if segmentation:
            tri_path = folder / "annotations" / "trimaps" / f"{image_id}.png"
            if not tri_path.is_file():
                raise DataNotFoundError(f"{tri_path} is missing; download the data set again (annotations.tar.gz)")
            y[i] = _load_trimap(tri_path, size)
        else:
            y[i] = label
    return torch.from_numpy(x), torch.from_numpy(y)


def _pets_shape(image_size: Any = 128, task: str = "segmentation", **_: Any) -> tuple[tuple[int, int, int], int]:
    h, w = _image_size(image_size)
    return (3, h, w), len(PET_MASK_CLASSES) if task == "segmentation" else 37


@register_dataset(
    "oxford_pets",
    "Oxford-IIIT Pet trimap segmentation (3 classes) or 37 breeds, resized (default 128x128)",
    shape=_pets_shape,
)
def load_oxford_pets(
    root: str | os.PathLike | None = None,
    *,
    image_size: int | tuple[int, int] = 128,
    task: Literal["segmentation", "classification"] = "segmentation",
    download: bool = False,
    cache: bool = True,
    subset: int | None = None,
    test_subset: int | None = None,
) -> DatasetBundle:
    """Load Oxford-IIIT Pet (``trainval`` → train, 3,680 images; ``test`` → test, 3,669 images).

    Args:
        root: data root holding ``oxford-iiit-pet/`` (or that folder itself); ``None``:
            ``$FLIPNET_DATA`` or ``./data``.
        image_size: output ``(height, width)`` or one int for a square (default 128).
        task: ``"segmentation"`` (masks with ids 0 pet, 1 background, 2 border) or
            ``"classification"`` (37 breeds).
        download: fetch the two archives with torchvision when missing (needs internet).
        cache: store the resized tensors in ``oxford-iiit-pet/flipnet-cache/`` and reuse them
            (skipped quietly when the folder is not writable, and for subset loads).
        subset, test_subset: keep the first N training / test examples (decodes only those).
    """
    size = _image_size(image_size)
    if task not in ("segmentation", "classification"):
        raise ConfigError(f"task must be 'segmentation' or 'classification', got {task!r}")
    subset = check_subset(subset)
    test_subset = check_subset(test_subset, "test_subset")
    base = resolve_root(root)
    looked = [base / "oxford-iiit-pet", base]
    split_files = ("annotations/trainval.txt", "annotations/test.txt")
    folder = next((f for f in looked if (f / "images").is_dir() and all((f / s).is_file() for s in split_files)), None)
    if folder is None and download:
        _download(base)
        folder = base / "oxford-iiit-pet"
    if folder is None:
        raise not_found(
            "Oxford-IIIT Pet (images/, annotations/trainval.txt, annotations/test.txt, annotations/trimaps/)",
            looked,
            "Extract images.tar.gz and annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/ "
            "into <root>/oxford-iiit-pet, or pass download=True when online.",
        )
    train_entries = _read_split(folder / split_files[0])
    test_entries = _read_split(folder / split_files[1])
    names = _breed_names(train_entries + test_entries)
    segmentation = task == "segmentation"
    info: dict[str, Any] = {
        "folder": str(folder),
        "image_size": size,
        "mask_mapping": "trimap 1->0 pet, 2->1 background, 3->2 border",
    }

    fingerprint = hashlib.sha256(
        repr((_CACHE_VERSION, task, size, train_entries, test_entries)).encode()
    ).hexdigest()[:16]
    cache_file = folder / "flipnet-cache" / f"{task}_{size[0]}x{size[1]}_{fingerprint}.pt"
    tensors: dict[str, torch.Tensor] | None = None
    if cache and cache_file.is_file():
        try:
            tensors = torch.load(cache_file, map_location="cpu", weights_only=True)
            info["cache"] = str(cache_file)
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            log.warning("ignoring unreadable cache %s (%s)", cache_file, e)
            tensors = None
    if tensors is None:
        train_x, train_y = _decode(folder, train_entries[:subset], size, segmentation)
        test_x, test_y = _decode(folder, test_entries[:test_subset], size, segmentation)
        tensors = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
        if cache and subset is None and test_subset is None:
            try:
                atomic_torch_save(tensors, cache_file)
                info["cache"] = str(cache_file)
            except OSError as e:
                log.info("not caching Oxford-IIIT Pet tensors in %s (%s)", cache_file, e)
    bundle = DatasetBundle(
        name="oxford_pets",
        train_x=tensors["train_x"][:subset],
        train_y=tensors["train_y"][:subset],
        test_x=tensors["test_x"][:test_subset],
        test_y=tensors["test_y"][:test_subset],
        num_classes=len(PET_MASK_CLASSES) if segmentation else len(names),
        task=task,
        class_names=PET_MASK_CLASSES if segmentation else names,
        info=info,
    )
    return bundle


def _download(root: Path) -> None:
    from torchvision.datasets import OxfordIIITPet

    try:
        OxfordIIITPet(str(root), split="trainval", target_types="segmentation", download=True)
    except (OSError, RuntimeError) as e:
        raise DataNotFoundError(
            f"downloading Oxford-IIIT Pet into {root} failed ({short_reason(e)}); extract images.tar.gz "
            "and annotations.tar.gz into <root>/oxford-iiit-pet by hand"
        ) from e
