"""SVHN (cropped digits) from torchvision's ``.mat`` files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from flipnet.data.base import (
    DataFormatError,
    FLIP_CHANGES_DIGITS,
    AugmentPolicy,
    DatasetBundle,
    check_subset,
    not_found,
    register_dataset,
    resolve_root,
    short_reason,
)
from flipnet.errors import DataNotFoundError

__all__ = ["read_svhn_mat", "load_svhn"]

_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def read_svhn_mat(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one SVHN ``*_32x32.mat`` file.

    The file holds ``X`` (uint8, 32×32×3×N) and ``y`` (N×1, digits 1..10 where 10 stands for 0).

    Returns:
        ``(x, y)``: ``x`` uint8 ``(N, 3, 32, 32)``, ``y`` int64 ``(N,)`` in ``0..9`` (label 10 → 0).

    Raises:
        DataFormatError: not a readable MATLAB file, or ``X``/``y`` missing or malformed.
    """
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
    except (ValueError, OSError, TypeError, EOFError, NotImplementedError) as e:
        raise DataFormatError(f"{path} is not a readable MATLAB file ({short_reason(e)}); download it again") from e
    if "X" not in mat or "y" not in mat:
        raise DataFormatError(f"{path} lacks the variables X and y; it is not an SVHN *_32x32.mat file")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataFormatError(f"{path}: X must be uint8 32x32x3xN, got {x.dtype} {x.shape}")
    n = x.shape[3]
    y = y.reshape(-1)
    if y.shape != (n,) or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataFormatError(f"{path}: y must hold {n} labels, got {y.dtype} {mat['y'].shape}")
    y = y.astype(np.int64)
    if n and (y.min() < 0 or y.max() > 10):
        raise DataFormatError(f"{path}: labels must lie in 1..10 (10 means digit 0), found {y.min()}..{y.max()}")
    y[y == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


@register_dataset(
    "svhn", "SVHN cropped digits, 3x32x32, 10 classes, 73,257 train / 26,032 test (.mat files)", shape=((3, 32, 32), 10),
    val_size=0.1,
    augment=AugmentPolicy(("crop",), ("crop",), pad=4, reasons={"flip": FLIP_CHANGES_DIGITS}),
)
def load_svhn(
    root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    subset: int | None = None,
    test_subset: int | None = None,
) -> DatasetBundle:
    """Load SVHN from ``train_32x32.mat`` and ``test_32x32.mat`` (torchvision's files).

    Args:
        root: folder with the two ``.mat`` files, or a data root holding them in ``SVHN/`` or
            ``svhn/`` (``None``: ``$FLIPNET_DATA`` or ``./data``).
        download: fetch the files with torchvision into ``root`` when missing (needs internet).
        subset, test_subset: keep the first N training / test images.
    """
    subset = check_subset(subset)
    test_subset = check_subset(test_subset, "test_subset")
    base = resolve_root(root)
    looked = [base, base / "SVHN", base / "svhn"]
    folder = next((f for f in looked if all((f / n).is_file() for n in _FILES.values())), None)
    if folder is None and download:
        _download(base)
        folder = base
    if folder is None:
        raise not_found(
            f"SVHN files ({', '.join(_FILES.values())})", looked,
            "Pass root= the folder that holds them, or download=True when online.",
        )
    x_train, y_train = read_svhn_mat(folder / _FILES["train"])
    x_test, y_test = read_svhn_mat(folder / _FILES["test"])
    return DatasetBundle(
        name="svhn",
        train_x=_first(x_train, subset),
        train_y=_first(y_train, subset),
        test_x=_first(x_test, test_subset),
        test_y=_first(y_test, test_subset),
        num_classes=10,
        class_names=tuple(str(d) for d in range(10)),
        info={"folder": str(folder)},
    )


def _first(a: np.ndarray, n: int | None) -> torch.Tensor:
    """The first ``n`` rows as a tensor that does not keep the full array alive."""
    return torch.from_numpy(a if n is None else a[:n].copy())


def _download(root: Path) -> None:
    from torchvision.datasets import SVHN

    try:
        for split in ("train", "test"):
            SVHN(str(root), split=split, download=True)
    except (OSError, RuntimeError) as e:
        raise DataNotFoundError(
            f"downloading SVHN into {root} failed ({short_reason(e)}); copy "
            f"{', '.join(_FILES.values())} there by hand"
        ) from e
