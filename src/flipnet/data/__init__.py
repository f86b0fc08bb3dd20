"""Data sets held in memory as tensors, and loaders that scale and augment them on the device.

>>> from flipnet.data import load_dataset, make_loader
>>> bundle = load_dataset("digits")
>>> loader = make_loader(bundle, "train", 64, train=True, device="cpu", augment=False, seed=0)

See ``docs/data.md`` for every data set, where it is looked for, and the loader semantics.
"""

from flipnet.data import cifar10, digits, imagenet, mnist, pets, svhn, synthetic  # noqa: F401  (register the data sets)
from flipnet.data.base import (
    AUGMENTATIONS,
    VAL_SPLIT_SEED,
    AugmentPolicy,
    DataFormatError,
    DatasetBundle,
    dataset_options,
    dataset_shape,
    default_root,
    list_datasets,
    load_dataset,
    register_dataset,
    resolve_augment,
    resolve_val_size,
    split_validation,
)
from flipnet.data.cifar10 import load_lossless_subset
from flipnet.data.gpu_loader import MASK_FILL, GpuLoader, augment_batch, scale_images
from flipnet.data.loader import HostLoader, make_loader

# The public surface (12 names). Also importable from here, for convenience and old code:
# AUGMENTATIONS, VAL_SPLIT_SEED, DataFormatError, default_root, resolve_val_size (flipnet.data.base),
# load_lossless_subset (flipnet.data.cifar10), MASK_FILL, augment_batch, scale_images
# (flipnet.data.gpu_loader).
__all__ = [
    "AugmentPolicy",
    "DatasetBundle",
    "GpuLoader",
    "HostLoader",
    "dataset_options",
    "dataset_shape",
    "list_datasets",
    "load_dataset",
    "make_loader",
    "register_dataset",
    "resolve_augment",
    "split_validation",
]
