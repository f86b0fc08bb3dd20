"""The in-memory data set container, the data set registry and the shared helpers of the readers.

Every data set in flipnet is held as tensors (see ``docs/architecture.md``): images are ``uint8``
``(N, C, H, W)``; labels are ``int64`` ``(N,)`` for classification or ``(N, H, W)`` class-id masks
for segmentation. Loaders (:mod:`flipnet.data.loader`) scale to ``[-1, 1]`` and augment.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from flipnet.errors import ConfigError, DataFormatError, DataNotFoundError, did_you_mean

__all__ = [
    "DataFormatError",
    "DatasetBundle",
    "DatasetInfo",
    "Task",
    "dataset_options",
    "dataset_shape",
    "default_root",
    "list_datasets",
    "load_dataset",
    "register_dataset",
    "resolve_root",
]

Task = Literal["classification", "segmentation"]


def default_root() -> Path:
    """The default data root: ``$FLIPNET_DATA`` when set (and not empty), else ``./data``."""
    env = os.environ.get("FLIPNET_DATA", "").strip()
    return Path(env).expanduser() if env else Path("data")


def resolve_root(root: str | os.PathLike | None) -> Path:
    """``root`` as a :class:`~pathlib.Path` (``~`` expanded), or :func:`default_root` when ``None``."""
    return default_root() if root is None else Path(root).expanduser()


@dataclass(frozen=True, eq=False)
class DatasetBundle:
    """A data set held in memory as tensors, split into train and test.

    Attributes:
        name: registry name of the data set (e.g. ``"cifar10"``).
        train_x, test_x: ``uint8`` images ``(N, C, H, W)``.
        train_y, test_y: ``int64`` labels ``(N,)``, or ``(N, H, W)`` masks when ``task`` is
            ``"segmentation"``.
        num_classes: number of classes (segmentation: number of mask classes).
        task: ``"classification"`` or ``"segmentation"``.
        class_names: one name per class, when known.
        info: free-form provenance notes (source folder, "JPEG rebuild", split rule, ...).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    task: Task = "classification"
    class_names: tuple[str, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in ("classification", "segmentation"):
            raise ValueError(f"task must be 'classification' or 'segmentation', got {self.task!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))
            if len(self.class_names) != self.num_classes:
                raise ValueError(
                    f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes"
                )
        for split in ("train", "test"):
            x, y = self.split(split)
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{self.name}: {split}_x must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64:
                raise ValueError(f"{self.name}: {split}_y must be int64, got {y.dtype}")
            want = (x.shape[0],) if self.task == "classification" else (x.shape[0], *x.shape[2:])
            if tuple(y.shape) != want:
                raise ValueError(f"{self.name}: {split}_y has shape {tuple(y.shape)}, expected {want}")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"{self.name}: train images {tuple(self.train_x.shape[1:])} and test images "
                f"{tuple(self.test_x.shape[1:])} differ in shape"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def in_channels(self) -> int:
        """Number of image channels (``input_shape[0]``)."""
        return self.input_shape[0]

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``"train"`` or ``"test"``."""
        if split == "train":
            return self.train_x, self.train_y
        if split == "test":
            return self.test_x, self.test_y
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    def subset(self, train: int | None = None, test: int | None = None) -> DatasetBundle:
        """A bundle holding only the first ``train`` training and ``test`` test examples (``None``: all)."""
        for label, n in (("train", train), ("test", test)):
            if n is not None and n < 1:
                raise ValueError(f"{label} subset size must be >= 1, got {n}")
        info = dict(self.info)
        if train is not None or test is not None:
            info["subset"] = {"train": train, "test": test}
        return dataclasses.replace(
            self,
            train_x=self.train_x[:train],
            train_y=self.train_y[:train],
            test_x=self.test_x[:test],
            test_y=self.test_y[:test],
            info=info,
        )

    def __repr__(self) -> str:
        return (
            f"DatasetBundle(name={self.name!r}, task={self.task!r}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, train={len(self.train_x)}, test={len(self.test_x)})"
        )


#: ``((C, H, W), num_classes)`` of a data set's images, known without loading it.
ShapeInfo = tuple[tuple[int, int, int], int]


@dataclass(frozen=True)
class DatasetInfo:
    """A registry entry: the loader function, a one-line description and, when declared, the
    image shape and class count (fixed, or a function of the loader's options)."""

    name: str
    loader: Callable[..., DatasetBundle]
    description: str
    shape: ShapeInfo | Callable[..., ShapeInfo] | None = None


_REGISTRY: dict[str, DatasetInfo] = {}


def register_dataset(
    name: str, description: str = "", *, shape: ShapeInfo | Callable[..., ShapeInfo] | None = None
) -> Callable[[Callable[..., DatasetBundle]], Callable[..., DatasetBundle]]:
    """Decorator that registers ``fn(root=None, **options) -> DatasetBundle`` under ``name``.

    ``shape`` declares ``((C, H, W), num_classes)`` for :func:`dataset_shape`: a fixed pair, or a
    function that receives every option of ``fn`` but ``root`` (defaults filled in) and returns it.
    """

    def decorate(fn: Callable[..., DatasetBundle]) -> Callable[..., DatasetBundle]:
        if name in _REGISTRY and _REGISTRY[name].loader is not fn:
            raise ValueError(f"a data set named {name!r} is already registered")
        if "root" not in inspect.signature(fn).parameters:
            raise TypeError(f"data set loader {fn.__name__} must take a 'root' argument")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = DatasetInfo(name, fn, description or (doc[0] if doc else ""), shape)
        return fn

    return decorate


def list_datasets() -> dict[str, str]:
    """Registered data set names (sorted) mapped to a one-line description."""
    return {name: _REGISTRY[name].description for name in sorted(_REGISTRY)}


def _entry(name: str) -> DatasetInfo:
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ConfigError(
            f"unknown data set {name!r}; {did_you_mean(key, _REGISTRY)}choose one of: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[key]


def dataset_options(name: str) -> dict[str, Any]:
    """The options :func:`load_dataset` takes for data set ``name`` (besides ``root``), with defaults.

    An option without a default maps to :data:`inspect.Parameter.empty`.

    Raises:
        ConfigError: unknown name (the message lists the registered ones).
    """
    params = inspect.signature(_entry(name).loader).parameters
    return {
        k: p.default
        for k, p in params.items()
        if k != "root" and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def dataset_shape(name: str, **options: Any) -> ShapeInfo | None:
    """``((C, H, W), num_classes)`` that :func:`load_dataset` would give, without reading any data.

    Use it to build the model a recipe trains without loading the data set (``flipnet summary``).
    ``None`` when the data set does not declare it.

    Raises:
        ConfigError: unknown name or option, or an invalid option value.
    """
    entry = _entry(name)
    defaults = dataset_options(entry.name)
    unknown = [k for k in options if k not in defaults]
    if unknown:
        raise ConfigError(
            f"data set {entry.name!r} has no option {', '.join(map(repr, unknown))}; "
            f"{did_you_mean(unknown[0], defaults)}its options are: {', '.join(defaults) or '(none)'}"
        )
    if entry.shape is None:
        return None
    if callable(entry.shape):
        chw, num_classes = entry.shape(**{**defaults, **options})
    else:
        chw, num_classes = entry.shape
    c, h, w = (int(v) for v in chw)
    return (c, h, w), int(num_classes)


def load_dataset(name: str, root: str | os.PathLike | None = None, **options: Any) -> DatasetBundle:
    """Load a registered data set into memory.

    Args:
        name: a name from :func:`list_datasets` (case-insensitive; ``-`` and ``_`` are the same).
        root: data root folder; ``None`` uses ``$FLIPNET_DATA`` or ``./data``. See ``docs/data.md``
            for where each data set looks under it.
        **options: data-set specific options (e.g. ``subset``, ``image_size``, ``download``).

    Raises:
        ConfigError: unknown name or option.
        DataNotFoundError: the files are not there (the message says how to get them).
        DataFormatError: the files are there but corrupt or of another format.
    """
    entry = _entry(name)
    key, fn = entry.name, entry.loader
    params = inspect.signature(fn).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in options if k not in params or k == "root"]
    if unknown and not accepts_any:
        allowed = list(dataset_options(key))
        raise ConfigError(
            f"data set {key!r} has no option {', '.join(map(repr, unknown))}; "
            f"{did_you_mean(unknown[0], allowed)}its options are: {', '.join(allowed) or '(none)'}"
        )
    return fn(root=root, **options)


# ---------------------------------------------------------------------------------------------
# helpers shared by the readers


def check_subset(subset: int | None, label: str = "subset") -> int | None:
    """Validate an optional "first N examples" option."""
    if subset is None:
        return None
    if isinstance(subset, bool) or not isinstance(subset, int) or subset < 1:
        raise ConfigError(f"{label} must be a positive integer or None, got {subset!r}")
    return subset


def short_reason(e: BaseException, limit: int = 240) -> str:
    """``"ExcType: message"`` on one line, cut to ``limit`` characters (for wrapping errors)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def not_found(what: str, looked: list[Path], how: str) -> DataNotFoundError:
    """A :class:`DataNotFoundError` that lists every place looked at and says how to get the data."""
    places = ", ".join(str(p.absolute()) for p in looked)
    return DataNotFoundError(f"{what} not found (looked in: {places}). {how}")
