r"""ImageNet (and any image folder in its layout), streamed from disk with the standard augmentation.

Unlike the other data sets, ImageNet does not fit in memory as a uint8 tensor (1.28M images of
varying size), so :func:`load_imagenet` returns an :class:`ImageFolderData` that holds only the
file list and labels, and streams decoded, augmented batches through a
``torch.utils.data.DataLoader`` whose worker processes decode the JPEGs and augment them
(off the training process); batches are pinned and copied to the device asynchronously on CUDA.
See ``docs/data.md`` ("Streaming data sets: ImageNet").

Layout (torchvision ``ImageFolder``)::

    ROOT/train/<class>/<image>.JPEG      ROOT/val/<class>/<image>.JPEG

with the same class folders in both (sorted names = class indices, as ``ImageFolder`` does).
``ROOT`` is ``root/imagenet`` or ``root`` itself (``root`` defaults to ``$FLIPNET_DATA`` or
``./data``). flipnet's ``"test"`` split is the ``val`` folder (ImageNet's test labels are not
public); a validation split for model selection is held out of ``train`` with ``val_size``.

Transforms (the ones of the ReActNet and Quist et al. reference code, ``imagenet/step2/train.py``,
without the PCA lighting noise):

* training: ``RandomResizedCrop(image_size, scale=(0.08, 1))``, ``RandomHorizontalFlip()``;
* evaluation: ``Resize(round(image_size · 256 / 224))``, ``CenterCrop(image_size)``;
* both: to float in [0, 1], then ``Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224,
  0.225))`` (the torchvision convention, which pretrained teachers expect; not flipnet's [-1, 1]).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from flipnet.data.base import not_found, register_dataset, resolve_root, resolve_val_size, stratified_holdout
from flipnet.errors import ConfigError, DataFormatError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "ImageFolderData",
    "ImageFolderLoader",
    "find_image_folder",
    "load_imagenet",
    "train_transform",
    "eval_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: File extensions read as images (case-insensitive), as torchvision's ImageFolder.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def train_transform(
    image_size: int = 224, crop_scale: tuple[float, float] = (0.08, 1.0), augment: Sequence[str] = ("crop", "flip")
) -> Any:
    """The training augmentation: random-resized crop (``"crop"``), horizontal flip (``"flip"``),
    to tensor, normalise. Without ``"crop"`` the image is resized and center-cropped as in evaluation."""
    from torchvision import transforms as T

    steps: list[Any] = []
    if "crop" in augment:
        steps.append(T.RandomResizedCrop(image_size, scale=crop_scale))
    else:
        steps += [T.Resize(int(round(image_size * 256 / 224))), T.CenterCrop(image_size)]
    if "flip" in augment:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(image_size: int = 224) -> Any:
    """The evaluation transform: resize the short side to ``image_size·256/224``, center crop, normalise."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(int(round(image_size * 256 / 224))),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# ---------------------------------------------------------------------------------------------
# the file list


def _scan(split_dir: Path, classes: Sequence[str]) -> tuple[list[str], list[int]]:
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for idx, cls in enumerate(classes):
        folder = split_dir / cls
        if not folder.is_dir():
            raise DataFormatError(f"{split_dir} has no class folder {cls!r} (it is in the train folder); the splits must share their classes")
        before = len(paths)
        for dirpath, _dirs, files in sorted(os.walk(folder, followlinks=True)):
            for name in sorted(files):
                # hidden files (macOS "._x.JPEG" resource forks, editor droppings) are not images
                if name.lower().endswith(IMG_EXTENSIONS) and not name.startswith("."):
                    paths.append(os.path.join(dirpath, name))
                    labels.append(idx)
        if len(paths) == before:
            empty.append(cls)
    if empty and len(empty) < len(classes):  # every class empty: the caller says "holds no image files"
        more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
        raise DataFormatError(
            f"{split_dir} has class folder(s) without image files: {', '.join(map(repr, empty[:3]))}{more} "
            f"(a class needs at least one {'/'.join(IMG_EXTENSIONS[:2])}... file in every split)"
        )
    return paths, labels


def _round_robin(labels: Sequence[int] | torch.Tensor, n: int | None) -> list[int]:
    """Indices of ``n`` files spread over the classes: the first file of every class, then the
    second of every class, ... (file order kept within a class; the result is in file order)."""
    y = torch.as_tensor(labels, dtype=torch.int64)
    if n is None or n >= len(y):
        return list(range(len(y)))
    # rank of each file within its class (files of a class are contiguous and in order)
    order = torch.argsort(y, stable=True)
    rank = torch.empty_like(y)
    counts = torch.bincount(y)
    starts = torch.cumsum(counts, 0) - counts
    rank[order] = torch.arange(len(y)) - starts[y[order]]
    key = rank * (int(y.max()) + 1) + y  # by rank, then by class
    chosen = torch.argsort(key, stable=True)[:n]
    return sorted(chosen.tolist())


def find_image_folder(root: str | os.PathLike | None) -> Path:
    """The folder holding ``train/`` and ``val/`` under ``root`` (``root/imagenet`` or ``root``).

    Raises:
        DataNotFoundError: neither place has both folders (the message lists where it looked).
    """
    base = resolve_root(root)
    looked = [base / "imagenet", base]
    for cand in looked:
        if (cand / "train").is_dir() and (cand / "val").is_dir():
            return cand
    raise not_found(
        "ImageNet data",
        looked,
        "Put the ImageNet ILSVRC-2012 images in the ImageFolder layout ROOT/train/<class>/*.JPEG and "
        "ROOT/val/<class>/*.JPEG (the validation images sorted into class folders, e.g. with the "
        "widely used valprep.sh) and pass ROOT (or its parent) as root; flipnet cannot download ImageNet.",
    )


@dataclass(frozen=True, eq=False)
class ImageFolderData:
    """A classification data set of image files, streamed from disk (see the module docstring).

    It answers what the trainer asks a :class:`~flipnet.data.base.DatasetBundle` (``name``,
    ``task``, ``num_classes``, ``class_names``, ``input_shape``, ``train_y``/``val_y``/``test_y``,
    ``splits``, ``subset``, ``info``) but holds file paths instead of pixels: ``split()`` refuses,
    and batches come from :meth:`make_loader`.
    """

    name: str
    root: Path
    classes: tuple[str, ...]
    train_files: tuple[str, ...]
    train_y: torch.Tensor
    test_files: tuple[str, ...]
    test_y: torch.Tensor
    image_size: int = 224
    val_files: tuple[str, ...] | None = None
    val_y: torch.Tensor | None = None
    num_workers: int | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    info: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"

    @property
    def num_classes(self) -> int:
        """Number of class folders."""
        return len(self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class folder names, in label order."""
        return self.classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(3, image_size, image_size)``: every batch has this shape."""
        return (3, self.image_size, self.image_size)

    @property
    def in_channels(self) -> int:
        """3 (images are converted to RGB)."""
        return 3

    @property
    def splits(self) -> tuple[str, ...]:
        """``("train", "test")``, or ``("train", "val", "test")`` with a validation split."""
        return ("train", "val", "test") if self.val_files is not None else ("train", "test")

    def files(self, split: str) -> tuple[tuple[str, ...], torch.Tensor]:
        """``(paths, labels)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if split == "train":
            return self.train_files, self.train_y
        if split == "test":
            return self.test_files, self.test_y
        if split == "val":
            if self.val_files is None or self.val_y is None:
                raise ValueError(f"{self.name} has no validation split; set data.val_size")
            return self.val_files, self.val_y
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Not available: the images stay on disk. Use :meth:`make_loader` (or :meth:`files`)."""
        raise TypeError(
            f"{self.name} is streamed from disk and holds no image tensors; use its make_loader(...) "
            "or flipnet.data.make_loader, which dispatches to it"
        )

    def subset(self, train: int | None = None, test: int | None = None) -> "ImageFolderData":
        """``train`` training and ``test`` test files spread over the classes (``None``: all).

        The files are sorted class by class, so "the first N" would be the first few classes
        only; instead the first file of every class is taken, then the second of every class,
        and so on (name order within a class), so every class is represented when
        ``N >= num_classes``. Deterministic (no seed).
        """
        for label, n in (("train", train), ("test", test)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ConfigError(f"{label} subset size must be a positive integer, got {n!r}")
        info = dict(self.info)
        info["subset"] = {"train": train, "test": test}
        tr, te = _round_robin(self.train_y, train), _round_robin(self.test_y, test)
        return replace(
            self, train_files=tuple(self.train_files[i] for i in tr), train_y=self.train_y[tr],
            test_files=tuple(self.test_files[i] for i in te), test_y=self.test_y[te], info=info,
        )

    def split_validation(self, val_size: int | float | str | None, *, seed: int = 0) -> "ImageFolderData":
        """Hold ``val_size`` training files out as the ``"val"`` split (stratified, seeded, in file order).

        ``val_size`` as in :func:`flipnet.data.base.resolve_val_size`; 0/``None`` returns ``self``.
        """
        n = len(self.train_files)
        k = resolve_val_size(val_size, n, self.name)
        if k == 0:
            return self
        if self.val_files is not None:
            raise ConfigError(f"{self.name} already has a validation split of {len(self.val_files)} files")
        chosen = stratified_holdout(self.train_y, k, self.num_classes, seed)
        keep = torch.nonzero(~chosen).flatten().tolist()
        held = torch.nonzero(chosen).flatten().tolist()
        return replace(
            self,
            train_files=tuple(self.train_files[i] for i in keep), train_y=self.train_y[keep],
            val_files=tuple(self.train_files[i] for i in held), val_y=self.train_y[held],
            info={**self.info, "val_size": k},
        )

    def make_loader(
        self,
        split: str,
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str | None = None,
        augment: bool | Sequence[str] = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int | None = None,
        **_ignored: Any,
    ) -> "ImageFolderLoader":
        """A sized loader of ``(x, y)`` batches of ``split`` on ``device``.

        ``train`` shuffles (seeded by ``seed`` and the epoch, :meth:`ImageFolderLoader.set_epoch`)
        and applies the training augmentation when ``augment`` is true (or the listed ones of
        ``"crop"``, ``"flip"``); otherwise files come in
        order with the evaluation transform. Decoding processes: the data set's ``num_workers``
        option when set (0 decodes in the training process), else ``num_workers`` when positive,
        else ``min(8, CPUs - 1)``. Options of the in-memory loaders
        (``pad``, ``resident``, ...) do not apply and are ignored.
        """
        files, labels = self.files(split)
        # The data set's own option (data.options.num_workers in a recipe) is what the user set and
        # wins; flipnet.data.make_loader passes its generic default 0, which means "not set" here.
        workers = self.num_workers if self.num_workers is not None else (num_workers or None)
        if workers is None:
            workers = max(0, min(8, (os.cpu_count() or 1) - 1))
        if isinstance(augment, bool):
            augs: tuple[str, ...] = ("crop", "flip") if augment else ()
        elif isinstance(augment, str):  # "flip" or "crop,flip", as in a recipe (not its letters)
            augs = tuple(a.strip() for a in augment.split(",") if a.strip())
        else:
            augs = tuple(augment)
            bad = [a for a in augs if a not in ("crop", "flip")]
            if bad:
                raise ConfigError(f"{self.name} augmentations are 'crop' (random-resized crop) and 'flip'; got {bad[0]!r}")
        transform = train_transform(self.image_size, self.crop_scale, augs) if (train and augs) else eval_transform(self.image_size)
        return ImageFolderLoader(
            files, labels, batch_size, transform=transform, shuffle=train, drop_lone_last=train, device=device,
            seed=seed, rank=rank, world_size=world_size, num_workers=int(workers),
        )

    def __repr__(self) -> str:
        val = f", val={len(self.val_files)}" if self.val_files is not None else ""
        return (
            f"ImageFolderData(name={self.name!r}, root={str(self.root)!r}, num_classes={self.num_classes}, "
            f"image_size={self.image_size}, train={len(self.train_files)}{val}, test={len(self.test_files)})"
        )


# ---------------------------------------------------------------------------------------------
# the loader


class _Files(Dataset):
    """``(transform(image), label)`` per file. With ``seed`` set, sample ``i`` of epoch ``e`` is
    transformed under its own RNG seed (a function of ``seed``, ``e`` and ``i``), inside
    :func:`torch.random.fork_rng`: the augmentation of an image does not depend on the number of
    workers or on which worker decodes it, and the caller's RNG is untouched."""

    def __init__(self, files: Sequence[str], labels: torch.Tensor, transform: Any, seed: int | None) -> None:
        # One NumPy byte array instead of a list of str: worker processes read it without touching
        # a reference count per path, so forked workers do not copy the 1.28M-path list page by page.
        self.files = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)
        self.labels, self.transform, self.seed = labels, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path = os.fsdecode(bytes(self.files[i]))
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        # PIL raises OSError (truncated), UnidentifiedImageError, SyntaxError/ValueError (some
        # malformed headers) or DecompressionBombError (absurd sizes) for a bad file
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataFormatError(f"cannot decode image {path} ({type(e).__name__}: {e})") from None
        if self.seed is None:
            return self.transform(img), int(self.labels[i])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i) % (2**63))
            return self.transform(img), int(self.labels[i])


class _EpochSampler(Sampler[int]):
    """This rank's indices of one epoch: a seeded permutation (or the file order), sharded by rank.

    Each rank gets ``ceil(n / world_size)`` indices (the tail wraps around, as
    ``DistributedSampler`` does), so the ranks stay in step.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.epoch = 0
        self.per_rank = math.ceil(n / world_size) if n else 0

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        order = (order * (total // max(self.n, 1) + 1))[:total]
        return iter(order[self.rank :: self.world_size])


def _worker_sentence(message: str) -> str:
    """The error sentence of a :class:`DataFormatError` that a ``DataLoader`` worker raised.

    ``DataLoader`` re-raises a worker's exception with the worker's traceback as its message;
    its last line is ``<module>.DataFormatError: <sentence>``. A message without that form is
    returned unchanged.
    """
    marker = "DataFormatError: "
    lines = [ln for ln in message.strip().splitlines() if marker in ln]
    return lines[-1].split(marker, 1)[1].strip() if lines else message


class ImageFolderLoader:
    """Batches of decoded, transformed image files on a device; ``len()`` is the number of batches.

    Decoding and transforms run in ``num_workers`` ``DataLoader`` worker processes (started for
    each epoch, so they see its seed); the order and every image's augmentation are functions of
    ``seed``, the epoch and the image index only, so a run is reproducible whatever the worker
    count, and a resumed epoch repeats the same batches. In training mode a last batch of a
    single image is left out (BatchNorm cannot train on it).
    """

    def __init__(
        self,
        files: Sequence[str],
        labels: torch.Tensor,
        batch_size: int,
        *,
        transform: Any,
        shuffle: bool,
        drop_lone_last: bool = False,
        device: torch.device | str | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size, self.shuffle, self.seed, self.num_workers = batch_size, shuffle, seed, num_workers
        self.dataset_size = len(files)
        self.sampler = _EpochSampler(len(files), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
        per_rank = len(self.sampler)
        self._drop_lone = drop_lone_last and per_rank % batch_size == 1 and per_rank > 1
        self._dataset = _Files(files, labels.to(torch.int64).cpu(), transform, seed if shuffle else None)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle and augmentation randomness of ``epoch``."""
        self.sampler.epoch = int(epoch)
        self._dataset.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.sampler) - (1 if self._drop_lone else 0)
        return math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cuda = self.device.type == "cuda"
        loader = DataLoader(
            self._dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=self.num_workers,
            pin_memory=cuda, drop_last=False, prefetch_factor=4 if self.num_workers else None,
            generator=torch.Generator().manual_seed(0),  # worker base seeds; the global RNG stays untouched
        )
        n_batches = len(self)
        batches = iter(loader)
        for i in range(n_batches):
            try:
                x, y = next(batches)
            except DataFormatError as e:
                # re-raised from a worker, the message holds the worker's whole traceback: keep its sentence
                raise DataFormatError(_worker_sentence(str(e))) from None
            except StopIteration:
                return
            yield x.to(self.device, non_blocking=cuda), y.to(self.device, non_blocking=cuda)

    def __repr__(self) -> str:
        return (
            f"ImageFolderLoader(n={self.dataset_size}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, device={self.device}, rank={self.sampler.rank}/{self.sampler.world_size}, "
            f"num_workers={self.num_workers})"
        )


# ---------------------------------------------------------------------------------------------
# registration


def _shape(image_size: int = 224, num_classes: int = 1000, **_: Any) -> tuple[tuple[int, int, int], int]:
    return (3, int(image_size), int(image_size)), int(num_classes)


@register_dataset("imagenet", "ImageNet (ILSVRC-2012) or any ImageFolder-layout tree, streamed from disk with DataLoader workers", shape=_shape)
def load_imagenet(
    root: str | os.PathLike | None = None,
    *,
    num_classes: int = 1000,
    image_size: int = 224,
    num_workers: int | None = None,
    crop_scale: tuple[float, float] | list[float] = (0.08, 1.0),
    subset: int | None = None,
    test_subset: int | None = None,
) -> ImageFolderData:
    """ImageNet in the ImageFolder layout, as an :class:`ImageFolderData` (streamed, not in memory).

    Args:
        root: the folder holding ``train/`` and ``val/``, or its parent holding ``imagenet/``.
        num_classes: the number of class folders expected (1000 for ImageNet-1k; a mismatch is an
            error, so that a half-copied tree is noticed).
        image_size: side of the square training crops and evaluation center crops (224).
        num_workers: decoding worker processes (default ``min(8, CPUs - 1)``).
        crop_scale: area range of ``RandomResizedCrop`` ((0.08, 1) as the references).
        subset, test_subset: keep N training / test files spread over the classes
            (:meth:`ImageFolderData.subset`).

    ``load_dataset("imagenet", val_size=...)`` holds a validation split out of the training files
    (:meth:`ImageFolderData.split_validation`).

    Raises:
        DataNotFoundError: no ``train/`` and ``val/`` folders (lists the places looked at).
        DataFormatError: the class folders differ from ``num_classes``, a split has no images, or
            a class folder of a split holds no image file.
    """
    for name, value in (("num_classes", num_classes), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    if image_size < 8:
        raise ConfigError(f"image_size must be at least 8, got {image_size}")
    values = list(crop_scale) if isinstance(crop_scale, (list, tuple)) else None
    if (values is None or len(values) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            or not 0 < float(values[0]) <= float(values[1]) <= 1):
        raise ConfigError(f"crop_scale must be two numbers 0 < lo <= hi <= 1, got {crop_scale!r}")
    scale = (float(values[0]), float(values[1]))
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0):
        raise ConfigError(f"num_workers must be a non-negative int or None, got {num_workers!r}")
    folder = find_image_folder(root)
    classes = tuple(sorted(e.name for e in os.scandir(folder / "train") if e.is_dir()))
    if len(classes) != num_classes:
        raise DataFormatError(
            f"{folder / 'train'} has {len(classes)} class folders but num_classes={num_classes}; "
            f"set data.options.num_classes={len(classes)} if that is intended"
        )
    train_files, train_labels = _scan(folder / "train", classes)
    test_files, test_labels = _scan(folder / "val", classes)
    for split, files in (("train", train_files), ("val", test_files)):
        if not files:
            raise DataFormatError(f"{folder / split} holds no image files ({', '.join(IMG_EXTENSIONS)})")
    data = ImageFolderData(
        name="imagenet", root=folder, classes=classes,
        train_files=tuple(train_files), train_y=torch.tensor(train_labels, dtype=torch.int64),
        test_files=tuple(test_files), test_y=torch.tensor(test_labels, dtype=torch.int64),
        image_size=image_size, num_workers=num_workers, crop_scale=(scale[0], scale[1]),
        info={"source": str(folder), "streamed": True, "test_split": "val folder"},
    )
    if subset is not None or test_subset is not None:
        data = data.subset(subset, test_subset)
    return data
