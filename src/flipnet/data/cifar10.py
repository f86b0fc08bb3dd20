"""CIFAR-10: the standard ``cifar-10-batches-py`` pickles, an offline JPEG rebuild, and a lossless subset.

Three ways to get the data (see ``docs/data.md``):

1. A folder holding the standard pickles (``data_batch_1..5``, ``test_batch``, ``batches.meta``),
   as written by the official archive or ``torchvision.datasets.CIFAR10(download=True)``.
2. ``download=True``: torchvision downloads the official archive (needs internet).
3. An *offline folder* holding ``cifar10_jpgs.tar.gz`` (all 60,000 images as JPEG) and
   ``labels_51000.npy``: flipnet decodes the archive once (about 15 s) and writes the standard
   pickles into a cache folder, which later calls reuse. The pixels of this rebuild are lossy
   (JPEG quality 75, PSNR about 30 dB); ``cifar10_lossless_subset.npz`` in the same folder holds
   the original pixels of the first 4,000 training and 1,000 test images
   (:func:`load_lossless_subset`, data set ``cifar10_lossless``).

Pickles are read with a restricted unpickler that only rebuilds NumPy arrays, so a hostile file
cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flipnet.data.base import (
    DataFormatError,
    DatasetBundle,
    check_subset,
    default_root,
    not_found,
    AugmentPolicy,
    register_dataset,
    resolve_root,
    short_reason,
)
from flipnet.errors import DataNotFoundError
from flipnet.utils import atomic_path, atomic_write_text

__all__ = [
    "CIFAR10_CLASSES",
    "BATCHES_DIR",
    "build_from_offline",
    "decode_offline",
    "is_offline_folder",
    "load_cifar10",
    "load_cifar10_lossless",
    "load_lossless_subset",
    "read_cifar_batch",
    "read_cifar10_pickles",
    "write_cifar_batch",
]

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
BUILD_MARKER = "flipnet_build.json"

OFFLINE_ARCHIVE = "cifar10_jpgs.tar.gz"
OFFLINE_LABELS = "labels_51000.npy"
LOSSLESS_FILE = "cifar10_lossless_subset.npz"

# MD5 of the decoded NHWC arrays of the offline rebuild as published beside the archive
# (Pillow 13.0.0 / libjpeg-turbo 3.2.0); another JPEG decoder may differ in a few pixels.
REFERENCE_MD5 = {"x_train": "7c618da940c26da995ad1feaa1bac54c", "x_test": "ce9821aad58a062022e2879299758a56"}

_N_TRAIN, _N_TEST, _N_CLASSES = 50_000, 10_000, 10
_HOW_TO_GET = (
    "Pass root= a folder that holds cifar-10-batches-py (or that folder itself), "
    f"root= an offline CIFAR-10 folder with {OFFLINE_ARCHIVE} and {OFFLINE_LABELS} "
    "(flipnet builds the pickles from it once), or download=True when online."
)


# ---------------------------------------------------------------------------------------------
# the pickle format


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds NumPy arrays, dtypes and scalars (no arbitrary callables)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of the CIFAR format")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except (
        pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
        LookupError, OverflowError, MemoryError,  # corrupt opcodes, encodings or lengths
    ) as e:
        raise DataFormatError(
            f"{path} is not a readable CIFAR pickle ({short_reason(e)}); "
            "delete it and rebuild or re-download the data set"
        ) from e


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch pickle (``data_batch_N`` or ``test_batch``).

    Returns:
        ``(x, y)``: ``x`` uint8 ``(N, 3, 32, 32)`` (the R, G, B planes of each 3,072-byte row),
        ``y`` int64 ``(N,)`` in ``0..9``.

    Raises:
        DataFormatError: truncated or corrupt file, or not a CIFAR-10 batch.
    """
    path = Path(path)
    batch = _unpickle(path)
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DataFormatError(f"{path} is not a CIFAR-10 batch (expected keys 'data' and 'labels', got {keys})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataFormatError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    labels = np.asarray(batch["labels"])
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DataFormatError(f"{path}: 'labels' must be {data.shape[0]} integers, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= _N_CLASSES):
        raise DataFormatError(f"{path}: labels must lie in 0..9, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def write_cifar_batch(path: str | os.PathLike, x: np.ndarray, y: np.ndarray, batch_label: str) -> None:
    """Write one batch in the ``cifar-10-batches-py`` layout (atomically).

    ``x`` is uint8 ``(N, 3, 32, 32)``, ``y`` integer ``(N,)``. Pickle protocol 4 keeps the files
    at their raw size; ``pickle.load(f, encoding="latin1")`` reads them like the official ones.
    """
    x = np.ascontiguousarray(x, dtype=np.uint8)
    if x.ndim != 4 or x.shape[1:] != (3, 32, 32):
        raise ValueError(f"x must be uint8 (N, 3, 32, 32), got {x.shape}")
    y = np.asarray(y)
    names = [f"{CIFAR10_CLASSES[int(v)]}_{i:05d}.png" for i, v in enumerate(y)]
    batch = {
        "batch_label": batch_label,
        "labels": [int(v) for v in y],
        "data": x.reshape(len(x), 3072),
        "filenames": names,
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(batch, f, protocol=4)


def _write_meta(path: Path) -> None:
    meta = {"num_cases_per_batch": 10_000, "label_names": list(CIFAR10_CLASSES), "num_vis": 3072}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(meta, f, protocol=4)


def _has_pickles(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (*TRAIN_FILES, TEST_FILE))


def read_cifar10_pickles(
    folder: str | os.PathLike, *, subset: int | None = None, test_subset: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read ``x_train, y_train, x_test, y_test`` (NCHW uint8, int64) from a ``cifar-10-batches-py`` folder.

    ``subset``/``test_subset`` keep the first N images (only the batch files needed are read).
    """
    folder = Path(folder)
    missing = [n for n in (*TRAIN_FILES, TEST_FILE) if not (folder / n).is_file()]
    if missing:
        raise DataNotFoundError(f"{folder} lacks {', '.join(missing)}. {_HOW_TO_GET}")
    xs, ys, have = [], [], 0
    for name in TRAIN_FILES:
        if subset is not None and have >= subset:
            break
        x, y = read_cifar_batch(folder / name)
        xs.append(x)
        ys.append(y)
        have += len(x)
    x_train, y_train = np.concatenate(xs)[:subset], np.concatenate(ys)[:subset]
    x_test, y_test = read_cifar_batch(folder / TEST_FILE)
    return x_train, y_train, x_test[:test_subset], y_test[:test_subset]


# ---------------------------------------------------------------------------------------------
# the offline JPEG folder


def is_offline_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds the offline CIFAR-10 files (``cifar10_jpgs.tar.gz`` and ``labels_51000.npy``)."""
    path = Path(path)
    return (path / OFFLINE_ARCHIVE).is_file() and (path / OFFLINE_LABELS).is_file()


def _offline_labels(offline_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Train labels (original order) and test labels (first 1,000 original, 9,000 in the seeded order)."""
    path = offline_dir / OFFLINE_LABELS
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataFormatError(f"{path} is not a readable .npy file ({e}); copy the offline folder again") from e
    if labels.shape != (_N_TRAIN + 1000,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataFormatError(f"{path}: expected 51,000 integer labels, got {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= _N_CLASSES:
        raise DataFormatError(f"{path}: labels must lie in 0..9")
    y_train, first_test = labels[:_N_TRAIN], labels[_N_TRAIN:]
    # The 9,000 test images after the first 1,000 follow a fixed order: the remaining labels of
    # every class (1,000 per class in total), grouped by class and shuffled by RandomState(0).
    counts = np.bincount(first_test, minlength=_N_CLASSES)
    rest = np.repeat(np.arange(_N_CLASSES), 1000 - counts)
    np.random.RandomState(0).shuffle(rest)
    return y_train, np.concatenate([first_test, rest])


def decode_offline(
    offline_dir: str | os.PathLike, *, subset: int | None = None, test_subset: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Decode the offline JPEG archive into ``x_train, y_train, x_test, y_test`` (NCHW uint8, int64).

    The archive holds ``{train,test}/<class>/NNNN.jpg`` where ``NNNN`` is the rank of the image among
    the images of its class in data set order; the labels file fixes where each class's images go.
    ``subset``/``test_subset`` decode only the first N images of each split (the archive is read
    until they are all found).
    """
    offline_dir = Path(offline_dir)
    if not is_offline_folder(offline_dir):
        looked = [offline_dir / OFFLINE_ARCHIVE, offline_dir / OFFLINE_LABELS]
        raise not_found("offline CIFAR-10 files", looked, _HOW_TO_GET)
    y_train, y_test = _offline_labels(offline_dir)
    y_train, y_test = y_train[:subset], y_test[:test_subset]
    wanted = {"train": np.bincount(y_train, minlength=_N_CLASSES), "test": np.bincount(y_test, minlength=_N_CLASSES)}
    per_class = {(s, c): np.empty((int(wanted[s][c]), 32, 32, 3), np.uint8) for s in wanted for c in range(_N_CLASSES)}
    seen = {key: np.zeros(len(buf), bool) for key, buf in per_class.items()}
    remaining = int(sum(len(b) for b in per_class.values()))
    class_index = {name: i for i, name in enumerate(CIFAR10_CLASSES)}
    archive = offline_dir / OFFLINE_ARCHIVE
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if remaining == 0:
                    break
                parts = member.name.split("/")
                if not member.isfile() or len(parts) != 3 or not parts[2].endswith(".jpg"):
                    continue
                split, cls, stem = parts
                if split not in wanted or cls not in class_index or not stem[:-4].isdigit():
                    continue
                key, rank = (split, class_index[cls]), int(stem[:-4])
                if rank >= len(per_class[key]) or seen[key][rank]:
                    continue
                fh = tar.extractfile(member)
                if fh is None:
                    continue
                with fh, Image.open(io.BytesIO(fh.read())) as img:
                    pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
                if pixels.shape != (32, 32, 3):
                    raise DataFormatError(f"{archive}: {member.name} is {pixels.shape}, expected a 32x32 RGB image")
                per_class[key][rank] = pixels
                seen[key][rank] = True
                remaining -= 1
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataFormatError(f"{archive} is truncated or corrupt ({short_reason(e)}); copy it again") from e
    if remaining:
        (split, c), flags = next((k, v) for k, v in seen.items() if not v.all())
        raise DataFormatError(
            f"{archive} lacks {split}/{CIFAR10_CLASSES[c]}/{int(np.argmin(flags)):04d}.jpg "
            f"and {remaining - 1} other image(s); copy the offline folder again"
        )
    out = []
    for split, y in (("train", y_train), ("test", y_test)):
        x = np.empty((len(y), 32, 32, 3), np.uint8)
        for c in range(_N_CLASSES):
            x[y == c] = per_class[(split, c)]
        out.append((np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y))
    (x_train, y_train), (x_test, y_test) = out
    return x_train, y_train, x_test, y_test



def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """Where an offline build keeps ``cifar-10-batches-py``: ``cache_dir`` or ``<data root>/cifar10``."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_root() / "cifar10"


def build_from_offline(offline_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Decode the offline archive once and write ``<cache_dir>/cifar-10-batches-py`` (about 180 MB).

    Reuses a complete earlier build. ``cache_dir`` defaults to ``<FLIPNET_DATA or ./data>/cifar10``.
    Each file is written atomically and a ``flipnet_build.json`` marker is written last, so an
    interrupted build is redone. Returns the ``cifar-10-batches-py`` folder.
    """
    offline_dir = Path(offline_dir)
    out = _cache_root(cache_dir)
    batches = out / BATCHES_DIR
    if (batches / BUILD_MARKER).is_file() and _has_pickles(batches):
        return batches
    start = time.perf_counter()
    log.info("building CIFAR-10 pickles from %s into %s (once, about 15 s)", offline_dir, batches)
    x_train, y_train, x_test, y_test = decode_offline(offline_dir)
    decode_s = time.perf_counter() - start
    md5 = {
        "x_train": hashlib.md5(np.ascontiguousarray(x_train.transpose(0, 2, 3, 1)).tobytes()).hexdigest(),
        "x_test": hashlib.md5(np.ascontiguousarray(x_test.transpose(0, 2, 3, 1)).tobytes()).hexdigest(),
    }
    try:
        batches.mkdir(parents=True, exist_ok=True)
        for b, name in enumerate(TRAIN_FILES):
            sl = slice(b * 10_000, (b + 1) * 10_000)
            write_cifar_batch(batches / name, x_train[sl], y_train[sl], f"training batch {b + 1} of 5")
        write_cifar_batch(batches / TEST_FILE, x_test, y_test, "testing batch 1 of 1")
        _write_meta(batches / META_FILE)
        marker = {
            "source": "jpeg-rebuild",
            "offline_dir": str(offline_dir.resolve()),
            "md5": md5,
            "md5_matches_reference": md5 == REFERENCE_MD5,
            "decode_seconds": round(decode_s, 2),
            "build_seconds": round(time.perf_counter() - start, 2),
        }
        atomic_write_text(batches / BUILD_MARKER, json.dumps(marker, indent=2) + "\n")
    except OSError as e:
        raise DataNotFoundError(
            f"cannot write the CIFAR-10 cache into {batches} ({e}); pass cache_dir= a writable folder"
        ) from e
    log.info("built %s in %.1f s (decoded pixels %s the reference)", batches, time.perf_counter() - start,
             "match" if md5 == REFERENCE_MD5 else "differ slightly from")
    return batches


# ---------------------------------------------------------------------------------------------
# the lossless subset


def _nhwc_to_tensor(arr: np.ndarray, path: Path, key: str) -> torch.Tensor:
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (32, 32, 3):
        raise DataFormatError(f"{path}: {key} must be uint8 (N, 32, 32, 3), got {arr.dtype} {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


def load_lossless_subset(path: str | os.PathLike) -> DatasetBundle:
    """The original (lossless) pixels of CIFAR-10 train[0:4000] and test[0:1000].

    Args:
        path: ``cifar10_lossless_subset.npz`` or the offline folder that holds it.

    Returns:
        A :class:`DatasetBundle` named ``cifar10_lossless``: 4,000 training and 1,000 test images
        (NCHW uint8) with their labels, in the original CIFAR-10 order.
    """
    path = Path(path).expanduser()
    file = path / LOSSLESS_FILE if path.is_dir() else path
    if not file.is_file():
        raise not_found(
            "CIFAR-10 lossless subset", [file],
            f"Pass the offline CIFAR-10 folder (with {LOSSLESS_FILE}) or the .npz file itself.",
        )
    keys = ("x_train_first4000", "y_train_first4000", "x_test_first1000", "y_test_first1000")
    try:
        with np.load(file, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataFormatError(f"{file} lacks {', '.join(missing)}; it is not the CIFAR-10 lossless subset")
            arrays = {k: z[k] for k in keys}
    except (ValueError, OSError, EOFError) as e:
        if isinstance(e, DataFormatError):
            raise
        raise DataFormatError(f"{file} is not a readable .npz file ({e}); copy the offline folder again") from e
    tensors = []
    for xk, yk in ((keys[0], keys[1]), (keys[2], keys[3])):
        x = _nhwc_to_tensor(arrays[xk], file, xk)
        y = arrays[yk]
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (y.size and y.max() >= _N_CLASSES):
            raise DataFormatError(f"{file}: {yk} must be {len(x)} labels in 0..9, got {y.dtype} {y.shape}")
        tensors += [x, torch.from_numpy(y.astype(np.int64))]
    return DatasetBundle(
        name="cifar10_lossless",
        train_x=tensors[0],
        train_y=tensors[1],
        test_x=tensors[2],
        test_y=tensors[3],
        num_classes=10,
        class_names=CIFAR10_CLASSES,
        info={"source": "original pixels", "file": str(file)},
    )


# ---------------------------------------------------------------------------------------------
# registered data sets


def _candidates(root: Path, explicit: bool) -> list[Path]:
    """Folders that may be a ``cifar-10-batches-py`` folder, in search order."""
    found = [root / BATCHES_DIR, root]
    if not explicit:  # the default root also holds the offline build's cache
        found.insert(1, root / "cifar10" / BATCHES_DIR)
    return found


def _bundle(arrays: tuple[np.ndarray, ...], info: dict[str, Any]) -> DatasetBundle:
    x_train, y_train, x_test, y_test = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    return DatasetBundle(
        name="cifar10",
        train_x=x_train,
        train_y=y_train,
        test_x=x_test,
        test_y=y_test,
        num_classes=10,
        class_names=CIFAR10_CLASSES,
        info=info,
    )


@register_dataset(
    "cifar10",
    "CIFAR-10, 3x32x32, 10 classes, 50,000 train / 10,000 test (pickles, download or offline JPEG rebuild)",
    shape=((3, 32, 32), 10),
    val_size=0.1,
    augment=AugmentPolicy(("crop", "flip"), ("crop", "flip"), pad=4),
)
def load_cifar10(
    root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    subset: int | None = None,
    test_subset: int | None = None,
) -> DatasetBundle:
    """Load CIFAR-10.

    Args:
        root: a folder holding ``cifar-10-batches-py``, that folder itself, or an offline folder
            with ``cifar10_jpgs.tar.gz`` + ``labels_51000.npy``. ``None``: ``$FLIPNET_DATA`` or
            ``./data`` (where ``<root>/cifar-10-batches-py`` and the offline cache
            ``<root>/cifar10/cifar-10-batches-py`` are looked for).
        download: download the official archive with torchvision into ``root`` when no pickles
            are found (needs internet).
        cache_dir: where an offline build writes ``cifar-10-batches-py``; default
            ``<FLIPNET_DATA or ./data>/cifar10``.
        subset: keep the first N training images. With an offline folder whose cache is not
            built yet, only those images are decoded and nothing is cached (fast, for tests).
        test_subset: keep the first N test images (``None``: all 10,000). Like ``subset``, it
            limits what an offline subset load decodes.
    """
    subset = check_subset(subset)
    test_subset = check_subset(test_subset, "test_subset")
    explicit = root is not None
    base = resolve_root(root)
    info: dict[str, Any] = {}
    if is_offline_folder(base):
        out = _cache_root(cache_dir)
        batches = out / BATCHES_DIR
        info = {"source": "jpeg-rebuild", "offline_dir": str(base)}
        if not ((batches / BUILD_MARKER).is_file() and _has_pickles(batches)) and subset is not None:
            arrays = decode_offline(base, subset=subset, test_subset=test_subset)
            return _bundle(arrays, {**info, "decoded_subset": True})
        batches = build_from_offline(base, out)
        arrays = read_cifar10_pickles(batches, subset=subset, test_subset=test_subset)
        return _bundle(arrays, {**info, "folder": str(batches)})
    looked = _candidates(base, explicit)
    for folder in looked:
        if _has_pickles(folder):
            if (folder / BUILD_MARKER).is_file():
                info["source"] = "jpeg-rebuild"
            info["folder"] = str(folder)
            return _bundle(read_cifar10_pickles(folder, subset=subset, test_subset=test_subset), info)
    if download:
        _download(base)
        folder = base / BATCHES_DIR
        return _bundle(read_cifar10_pickles(folder, subset=subset, test_subset=test_subset), {"folder": str(folder)})
    raise not_found("CIFAR-10 pickles (data_batch_1..5, test_batch)", looked, _HOW_TO_GET)


def _download(root: Path) -> None:
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(str(root), train=True, download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise DataNotFoundError(
            f"downloading CIFAR-10 into {root} failed ({short_reason(e)}); without internet, "
            f"pass root= an offline CIFAR-10 folder with {OFFLINE_ARCHIVE} and {OFFLINE_LABELS}"
        ) from e


@register_dataset(
    "cifar10_lossless", "CIFAR-10 original pixels: train[0:4000] / test[0:1000] (offline folder)", shape=((3, 32, 32), 10),
    augment=AugmentPolicy(("crop", "flip"), ("crop", "flip"), pad=4),
)
def load_cifar10_lossless(
    root: str | os.PathLike | None = None,
    *,
    subset: int | None = None,
    test_subset: int | None = None,
) -> DatasetBundle:
    """The lossless CIFAR-10 subset as a data set: train = 4,000 originals, test = 1,000 originals.

    Args:
        root: the offline CIFAR-10 folder (or the ``.npz`` file); ``None`` looks in
            ``<FLIPNET_DATA or ./data>/cifar10`` and ``<FLIPNET_DATA or ./data>``.
        subset, test_subset: keep the first N training / test images.
    """
    subset = check_subset(subset)
    test_subset = check_subset(test_subset, "test_subset")
    if root is not None:
        bundle = load_lossless_subset(root)
    else:
        looked = [default_root() / "cifar10" / LOSSLESS_FILE, default_root() / LOSSLESS_FILE]
        file = next((p for p in looked if p.is_file()), None)
        if file is None:
            raise not_found(
                "CIFAR-10 lossless subset", looked,
                f"Pass root= the offline CIFAR-10 folder that holds {LOSSLESS_FILE}.",
            )
        bundle = load_lossless_subset(file)
    return bundle.subset(subset, test_subset) if subset or test_subset else bundle
