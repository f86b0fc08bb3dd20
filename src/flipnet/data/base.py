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
from typing import Any, Callable, Literal, Sequence

import torch

from flipnet.errors import ConfigError, DataFormatError, DataNotFoundError, did_you_mean

__all__ = [
    "AUGMENTATIONS",
    "AugmentPolicy",
    "DataFormatError",
    "DatasetBundle",
    "DatasetInfo",
    "VAL_SPLIT_SEED",
    "Task",
    "dataset_options",
    "dataset_shape",
    "default_root",
    "list_datasets",
    "load_dataset",
    "register_dataset",
    "resolve_augment",
    "resolve_root",
    "resolve_val_size",
    "split_validation",
]

Task = Literal["classification", "segmentation"]

#: Augmentations a loader can apply: a random crop after zero padding (a random shift of up to
#: ``pad`` pixels) and a horizontal flip with probability 1/2.
AUGMENTATIONS: tuple[str, ...] = ("crop", "flip")

VAL_SPLIT_SEED = 0
"""Seed of the validation split: the split is the same for every training seed, so the seeds of
a multi-seed run differ only in training randomness."""


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
        val_x, val_y: the validation split held out of the training set by
            :func:`split_validation` (``None`` when there is none).
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
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

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
        if (self.val_x is None) != (self.val_y is None):
            raise ValueError(f"{self.name}: give both val_x and val_y, or neither")
        for split in self.splits:
            x, y = self.split(split)
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{self.name}: {split}_x must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64:
                raise ValueError(f"{self.name}: {split}_y must be int64, got {y.dtype}")
            want = (x.shape[0],) if self.task == "classification" else (x.shape[0], *x.shape[2:])
            if tuple(y.shape) != want:
                raise ValueError(f"{self.name}: {split}_y has shape {tuple(y.shape)}, expected {want}")
        for split in self.splits[1:]:
            other = self.split(split)[0]
            if self.train_x.shape[1:] != other.shape[1:]:
                raise ValueError(
                    f"{self.name}: train images {tuple(self.train_x.shape[1:])} and {split} images "
                    f"{tuple(other.shape[1:])} differ in shape"
                )

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits this bundle holds: ``("train", "test")`` or ``("train", "val", "test")``."""
        return ("train", "val", "test") if self.val_x is not None else ("train", "test")

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
        """``(x, y)`` of ``"train"``, ``"val"`` (when held out) or ``"test"``.

        Raises:
            ValueError: an unknown split, or ``"val"`` when the bundle has no validation split.
        """
        if split == "train":
            return self.train_x, self.train_y
        if split == "test":
            return self.test_x, self.test_y
        if split == "val":
            if self.val_x is None or self.val_y is None:
                raise ValueError(
                    f"{self.name} has no validation split; set data.val_size (or call flipnet.data.split_validation)"
                )
            return self.val_x, self.val_y
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")

    def subset(self, train: int | None = None, test: int | None = None) -> DatasetBundle:
        """A bundle holding only the first ``train`` training and ``test`` test examples (``None``: all).

        A validation split is kept as it is (split it off after cutting the training set).
        """
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
        val = f", val={len(self.val_x)}" if self.val_x is not None else ""
        return (
            f"DatasetBundle(name={self.name!r}, task={self.task!r}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, train={len(self.train_x)}{val}, test={len(self.test_x)})"
        )


#: ``((C, H, W), num_classes)`` of a data set's images, known without loading it.
ShapeInfo = tuple[tuple[int, int, int], int]


@dataclass(frozen=True)
class AugmentPolicy:
    """Which training augmentations make sense for a data set.

    Attributes:
        allowed: the augmentations of :data:`AUGMENTATIONS` that preserve the labels.
        default: what ``augment=True`` applies (a subset of ``allowed``; empty: none makes sense,
            so ``augment=True`` is refused).
        pad: the crop's zero padding, i.e. the largest shift in pixels (4 for 32×32 images as in
            the Bop reference; 1 for 8×8 digits).
        reasons: one sentence per refused augmentation, shown in the error (key ``"default"``:
            why ``augment=True`` has no default).
    """

    allowed: tuple[str, ...] = AUGMENTATIONS
    default: tuple[str, ...] = AUGMENTATIONS
    pad: int = 4
    reasons: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for names in (self.allowed, self.default):
            unknown = [a for a in names if a not in AUGMENTATIONS]
            if unknown:
                raise ValueError(f"unknown augmentation(s) {unknown}; choose from {AUGMENTATIONS}")
        if not set(self.default) <= set(self.allowed):
            raise ValueError(f"default augmentations {self.default} must be allowed ({self.allowed})")
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}")


FLIP_CHANGES_DIGITS = "a mirrored digit is not the same digit (or not a digit at all)"


@dataclass(frozen=True)
class DatasetInfo:
    """A registry entry: the loader function, a one-line description and, when declared, the
    image shape and class count (fixed, or a function of the loader's options), the default
    validation split and the augmentations that make sense."""

    name: str
    loader: Callable[..., DatasetBundle]
    description: str
    shape: ShapeInfo | Callable[..., ShapeInfo] | None = None
    val_size: int | float | None = None
    augment: AugmentPolicy = field(default_factory=AugmentPolicy)


_REGISTRY: dict[str, DatasetInfo] = {}


def register_dataset(
    name: str,
    description: str = "",
    *,
    shape: ShapeInfo | Callable[..., ShapeInfo] | None = None,
    val_size: int | float | None = None,
    augment: AugmentPolicy | None = None,
) -> Callable[[Callable[..., DatasetBundle]], Callable[..., DatasetBundle]]:
    """Decorator that registers ``fn(root=None, **options) -> DatasetBundle`` under ``name``.

    ``shape`` declares ``((C, H, W), num_classes)`` for :func:`dataset_shape`: a fixed pair, or a
    function that receives every option of ``fn`` but ``root`` (defaults filled in) and returns it.
    ``val_size`` is the validation split ``val_size="auto"`` holds out (``None``: none).
    ``augment`` declares which augmentations make sense (default: crop and flip, pad 4).
    """

    def decorate(fn: Callable[..., DatasetBundle]) -> Callable[..., DatasetBundle]:
        if name in _REGISTRY and _REGISTRY[name].loader is not fn:
            raise ValueError(f"a data set named {name!r} is already registered")
        if "root" not in inspect.signature(fn).parameters:
            raise TypeError(f"data set loader {fn.__name__} must take a 'root' argument")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = DatasetInfo(
            name, fn, description or (doc[0] if doc else ""), shape, val_size, augment or AugmentPolicy()
        )
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


def load_dataset(
    name: str, root: str | os.PathLike | None = None, *, val_size: int | float | str | None = None, **options: Any
) -> DatasetBundle:
    """Load a registered data set into memory.

    Args:
        name: a name from :func:`list_datasets` (case-insensitive; ``-`` and ``_`` are the same).
        root: data root folder; ``None`` uses ``$FLIPNET_DATA`` or ``./data``. See ``docs/data.md``
            for where each data set looks under it.
        val_size: hold out a validation split of the (loaded) training set with
            :func:`split_validation`: a count, a fraction, ``"auto"`` (the data set's default)
            or ``None``/``0`` (none, the default here).
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
    bundle = fn(root=root, **options)
    return split_validation(bundle, val_size) if val_size else bundle


# ---------------------------------------------------------------------------------------------
# validation split


def resolve_val_size(val_size: int | float | str | None, n_train: int, name: str | None = None) -> int:
    """The number of training examples a validation split of ``val_size`` holds out.

    ``None``/``0``: 0. A fraction ``f`` in (0, 1): ``round(f * n_train)``, at least 1. A count:
    itself. ``"auto"``: the default the data set ``name`` declared (0 when it declared none, or
    when the training set has fewer than 20 examples: too few to split).

    Raises:
        ConfigError: a bad value, or a split that would leave no training example.
    """
    if isinstance(val_size, str):
        if val_size != "auto":
            raise ConfigError(f"val_size must be a count, a fraction in (0, 1), 'auto' or None, got {val_size!r}")
        entry = _REGISTRY.get(name.strip().lower().replace("-", "_")) if name else None
        if entry is None or entry.val_size is None or n_train < 20:
            return 0
        val_size = entry.val_size
    if val_size is None or val_size == 0:
        return 0
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ConfigError(f"val_size must be a count, a fraction in (0, 1), 'auto' or None, got {val_size!r}")
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise ConfigError(f"a fractional val_size must lie in (0, 1), got {val_size!r}")
        count = max(1, round(val_size * n_train))
    else:
        count = int(val_size)
    if count < 0:
        raise ConfigError(f"val_size must be 0 or more, got {val_size!r}")
    if count >= n_train:
        raise ConfigError(
            f"data.val_size={val_size!r} holds out {count} of {n_train} training examples and leaves none to "
            "train on; lower data.val_size (or raise data.subset)"
        )
    return count


def stratified_holdout(labels: torch.Tensor, k: int, num_classes: int, seed: int) -> torch.Tensor:
    """A seeded, stratified choice of ``k`` of ``len(labels)`` examples, as a boolean mask.

    Class ``c`` with ``n_c`` of the ``n`` examples gives ``floor(k n_c / n)`` of them; the
    examples still missing go to the classes with the largest remainders. Within a class, the
    chosen examples are the first ones of one seeded random permutation of all ``n``.
    """
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    permuted = labels[perm]
    counts = torch.bincount(permuted, minlength=num_classes).double()
    share = counts * (k / n)
    take = share.floor().long()
    short = k - int(take.sum())
    if short:
        order = torch.argsort(share - take.double(), descending=True, stable=True)
        take[order[:short]] += 1
    sort = torch.argsort(permuted, stable=True)
    starts = torch.cumsum(counts.long(), 0) - counts.long()
    rank_in_class = torch.empty(n, dtype=torch.long)
    rank_in_class[sort] = torch.arange(n) - starts[permuted[sort]]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[perm[rank_in_class < take[permuted]]] = True
    return mask


def split_validation(
    bundle: DatasetBundle, val_size: int | float | str | None, *, seed: int = VAL_SPLIT_SEED
) -> DatasetBundle:
    """Hold out a validation split of ``bundle``'s training set (``bundle.split("val")``).

    The split is seeded (``seed``, by default :data:`VAL_SPLIT_SEED` whatever the training seed)
    and deterministic. For classification it is stratified: class ``c`` with ``n_c`` of the
    ``n`` training examples gives about ``k · n_c / n`` of the ``k`` validation examples
    (largest-remainder rounding, so the counts add up to ``k``), chosen at random within the
    class. Segmentation splits are plain random draws. Both parts keep the original order.
    A bundle that already has a validation split keeps it when ``val_size`` resolves to 0 and
    is refused otherwise.

    Args:
        bundle: the data set.
        val_size: see :func:`resolve_val_size` (``"auto"``: the data set's declared default).
        seed: seed of the draw.

    Raises:
        ConfigError: a bad ``val_size`` (see :func:`resolve_val_size`), or a second split.
    """
    if hasattr(bundle, "split_validation"):  # a streaming data set splits its own file list
        return bundle.split_validation(val_size, seed=seed)
    n = len(bundle.train_x)
    k = resolve_val_size(val_size, n, bundle.name)
    if k == 0:
        return bundle
    if bundle.val_x is not None:
        raise ConfigError(f"{bundle.name} already has a validation split of {len(bundle.val_x)} examples")
    if bundle.task == "classification":
        is_val = stratified_holdout(bundle.train_y, k, bundle.num_classes, seed)
    else:
        is_val = torch.zeros(n, dtype=torch.bool)
        is_val[torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:k]] = True
    info = dict(bundle.info)
    info["val_split"] = {"size": k, "of": n, "seed": int(seed), "stratified": bundle.task == "classification"}
    return dataclasses.replace(
        bundle,
        train_x=bundle.train_x[~is_val].contiguous(),
        train_y=bundle.train_y[~is_val].contiguous(),
        val_x=bundle.train_x[is_val].contiguous(),
        val_y=bundle.train_y[is_val].contiguous(),
        info=info,
    )


# ---------------------------------------------------------------------------------------------
# augmentation


def augment_policy(name: str) -> AugmentPolicy:
    """The :class:`AugmentPolicy` the data set ``name`` declared (crop + flip, pad 4, when the
    name is not registered, e.g. a bundle built by hand)."""
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    entry = _REGISTRY.get(key)
    return entry.augment if entry is not None else AugmentPolicy()


def resolve_augment(name: str, augment: bool | str | Sequence[str]) -> tuple[tuple[str, ...], int]:
    """``(augmentations, pad)`` that ``augment`` means for the data set ``name``.

    ``False``/empty: none. ``True``: the data set's default. A list (or one name): those, each of
    which the data set must allow.

    Raises:
        ConfigError: an augmentation the data set does not allow (one sentence saying why), or
            ``True`` for a data set where no augmentation makes sense.
    """
    policy = augment_policy(name)
    if augment is False or augment is None:
        return (), policy.pad
    if augment is True:
        if not policy.default:
            why = policy.reasons.get("default")
            raise ConfigError(
                f"data set {name!r} has no default augmentation{': ' + why if why else ''} "
                f"(allowed: {', '.join(policy.allowed) or 'none'}); set data.augment=false, or list the ones you want, "
                f"e.g. data.augment=[{policy.allowed[0] if policy.allowed else 'crop'}]"
            )
        return tuple(policy.default), policy.pad
    names = (augment,) if isinstance(augment, str) else tuple(augment)
    for a in names:
        if a not in AUGMENTATIONS:
            raise ConfigError(f"unknown augmentation {a!r}; {did_you_mean(a, AUGMENTATIONS)}choose from: {', '.join(AUGMENTATIONS)}")
        if a not in policy.allowed:
            why = policy.reasons.get(a, "it does not preserve the labels")
            raise ConfigError(
                f"data set {name!r} does not allow the {a!r} augmentation: {why} "
                f"(allowed: {', '.join(policy.allowed) or 'none'})"
            )
    return tuple(a for a in AUGMENTATIONS if a in names), policy.pad


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
