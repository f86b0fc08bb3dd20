"""MNIST and Fashion-MNIST from IDX files (torchvision's ``raw`` layout, gzipped or not)."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from flipnet.data.base import (
    DataFormatError,
    DatasetBundle,
    check_subset,
    not_found,
    FLIP_CHANGES_DIGITS,
    AugmentPolicy,
    register_dataset,
    resolve_root,
    short_reason,
)
from flipnet.errors import DataNotFoundError

__all__ = ["read_idx", "write_idx", "load_mnist", "load_fashion_mnist", "FASHION_MNIST_CLASSES", "DEBIAN_FASHION_MNIST"]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the four ``.gz`` files."""

_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzip-compressed.

    Header: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, then each
    dimension as a big-endian int32; the data follows in C order.

    Raises:
        DataFormatError: bad magic number, unknown type code, or a size that does not match the
            header (a truncated file).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path} is not readable ({short_reason(e)}); download it again") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFormatError(f"{path} is not an IDX file (bad magic number); download it again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path} is truncated (incomplete IDX header); download it again")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[raw[2]]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataFormatError(
            f"{path} holds {len(raw) - header} data bytes but its header {shape} needs {expected}; "
            "the file is truncated or corrupt, download it again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool = False) -> None:
    """Write ``array`` (uint8) as an IDX file, gzip-compressed when ``compress`` (used to make fixtures)."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx writes uint8 arrays, got {array.dtype}")
    data = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes() + array.tobytes()
    Path(path).write_bytes(gzip.compress(data, mtime=0) if compress else data)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_idx_set(
    name: str,
    folder_name: str,
    root: str | os.PathLike | None,
    *,
    download: bool,
    subset: int | None,
    test_subset: int | None,
    class_names: tuple[str, ...],
    extra: tuple[Path, ...] = (),
) -> DatasetBundle:
    subset = check_subset(subset)
    test_subset = check_subset(test_subset, "test_subset")
    base = resolve_root(root)
    looked = [base / folder_name / "raw", base]
    if root is None:
        looked += list(extra)
    folder = next((f for f in looked if all(_find(f, s) for s in _FILES.values())), None)
    if folder is None and download:
        _download(name, base)
        folder = base / folder_name / "raw"
    if folder is None:
        how = (
            f"Pass root= the folder that holds {folder_name}/raw (or the four *-ubyte[.gz] files), "
            "or download=True when online"
        )
        if name == "fashion_mnist":
            how += f"; offline, `apt-get install dataset-fashion-mnist` puts them in {DEBIAN_FASHION_MNIST}"
        raise not_found(f"{name} IDX files ({', '.join(_FILES.values())}, optionally .gz)", looked, how + ".")
    arrays = {}
    for key, stem in _FILES.items():
        path = _find(folder, stem)
        if path is None:
            raise DataNotFoundError(f"{folder / stem} vanished while reading; download it again")
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or x.dtype != np.uint8:
            file = _FILES[split + "_x"]
            raise DataFormatError(f"{folder}: {file} must hold uint8 images (N, H, W), got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise DataFormatError(f"{folder}: {len(y)} labels for {len(x)} images in the {split} split")
        if y.size and y.max() >= len(class_names):
            raise DataFormatError(f"{folder}: {split} labels must lie in 0..{len(class_names) - 1}")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    bundle = DatasetBundle(
        name=name,
        train_x=tensors["train_x"].unsqueeze(1)[:subset],
        train_y=tensors["train_y"].long()[:subset],
        test_x=tensors["test_x"].unsqueeze(1)[:test_subset],
        test_y=tensors["test_y"].long()[:test_subset],
        num_classes=len(class_names),
        class_names=class_names,
        info={"folder": str(folder)},
    )
    return bundle


def _download(name: str, root: Path) -> None:
    from torchvision.datasets import MNIST, FashionMNIST

    cls = MNIST if name == "mnist" else FashionMNIST
    try:
        cls(str(root), train=True, download=True)
    except (OSError, RuntimeError) as e:
        hint = f" or install Debian's dataset-fashion-mnist ({DEBIAN_FASHION_MNIST})" if name == "fashion_mnist" else ""
        raise DataNotFoundError(
            f"downloading {name} into {root} failed ({short_reason(e)}); copy the IDX files there by hand{hint}"
        ) from e


@register_dataset(
    "mnist", "MNIST handwritten digits, 1x28x28, 10 classes, 60,000 train / 10,000 test (IDX files)", shape=((1, 28, 28), 10),
    augment=AugmentPolicy(("crop",), ("crop",), pad=2, reasons={"flip": FLIP_CHANGES_DIGITS}),
)
def load_mnist(
    root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    subset: int | None = None,
    test_subset: int | None = None,
) -> DatasetBundle:
    """Load MNIST from ``<root>/MNIST/raw/*-ubyte[.gz]`` (torchvision's layout) or from ``root`` itself.

    Args:
        root: data root (``None``: ``$FLIPNET_DATA`` or ``./data``).
        download: fetch the files with torchvision when they are missing (needs internet).
        subset, test_subset: keep the first N training / test images.
    """
    return _load_idx_set(
        "mnist", "MNIST", root, download=download, subset=subset, test_subset=test_subset,
        class_names=tuple(str(d) for d in range(10)),
    )


@register_dataset(
    "fashion_mnist", "Fashion-MNIST, 1x28x28, 10 classes, 60,000 train / 10,000 test (IDX files)", shape=((1, 28, 28), 10),
    augment=AugmentPolicy(("crop", "flip"), ("crop", "flip"), pad=2),
)
def load_fashion_mnist(
    root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    subset: int | None = None,
    test_subset: int | None = None,
) -> DatasetBundle:
    """Load Fashion-MNIST from ``<root>/FashionMNIST/raw/*-ubyte[.gz]`` or from ``root`` itself.

    With ``root=None`` it also looks in ``/usr/share/datasets/fashion-mnist``, where Debian's
    ``dataset-fashion-mnist`` package installs the files.

    Args:
        root: data root (``None``: ``$FLIPNET_DATA`` or ``./data``, then the Debian folder).
        download: fetch the files with torchvision when they are missing (needs internet).
        subset, test_subset: keep the first N training / test images.
    """
    return _load_idx_set(
        "fashion_mnist", "FashionMNIST", root, download=download, subset=subset, test_subset=test_subset,
        class_names=FASHION_MNIST_CLASSES, extra=(DEBIAN_FASHION_MNIST,),
    )
