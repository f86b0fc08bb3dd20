"""``make_loader``: the one way the trainer turns a :class:`DatasetBundle` split into batches.

Two loaders with the same semantics (order, sharding, augmentation, scaling; see
:mod:`flipnet.data.gpu_loader`) and, for the same arguments, the same batches:

* :class:`~flipnet.data.gpu_loader.GpuLoader` keeps the uint8 split on the device (default).
* :class:`HostLoader` keeps it in host memory and feeds uint8 batches through a
  ``torch.utils.data.DataLoader`` (optional worker processes, pinned memory on CUDA); crops,
  flips and scaling then run on the device exactly as in ``GpuLoader``. ``make_loader`` picks it
  when asked (``resident=False``) or when the split would take more than ``max_device_fraction``
  of the free device memory.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from flipnet.data.base import DatasetBundle, resolve_augment
from flipnet.data.gpu_loader import (
    MASK_FILL,
    GpuLoader,
    _check_xy,
    _compact_masks,
    _default_device,
    _finish,
    _PlannedLoader,
    augment_batch,
)

__all__ = ["HostLoader", "make_loader", "fits_on_device"]


class _Rows(Dataset):
    """Batched row access to two tensors (``__getitems__`` avoids one call per sample)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.x.index_select(0, idx), self.y.index_select(0, idx)


def _as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


class _PlanBatches(Sampler[list[int]]):
    """Yields the index lists of one epoch's batches from a fixed plan."""

    def __init__(self, indices: torch.Tensor, batch_size: int, num_batches: int) -> None:
        self.indices, self.batch_size, self.num_batches = indices, batch_size, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        bs = self.batch_size
        for i in range(self.num_batches):
            yield self.indices[i * bs : (i + 1) * bs].tolist()


class HostLoader(_PlannedLoader):
    """Like :class:`GpuLoader`, but the data stay in host memory and batches go through a ``DataLoader``.

    Takes the same arguments as :class:`GpuLoader` plus ``num_workers`` (``DataLoader`` worker
    processes; 0 reads in the main process). Given the same arguments, both loaders yield the
    same batches.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: bool = False,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: int = 4,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        mask_fill: int = MASK_FILL,
        num_workers: int = 0,
        flip: bool = True,
        drop_lone_last: bool = False,
    ) -> None:
        _check_xy(x, y)
        super().__init__(
            len(x), batch_size, shuffle=shuffle, augment=augment, drop_last=drop_last,
            seed=seed, rank=rank, world_size=world_size, pad=pad, flip=flip, drop_lone_last=drop_lone_last,
        )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self._set_output(device, dtype, channels_last, mask_fill)
        self.num_workers = num_workers
        self.x = x.cpu()
        self.y = _compact_masks(y.cpu())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.plan(self._next_epoch())
        cuda = self.device.type == "cuda"
        loader = DataLoader(
            _Rows(self.x, self.y),
            batch_sampler=_PlanBatches(plan.indices, self.batch_size, len(self)),
            collate_fn=_as_batch,
            num_workers=self.num_workers,
            pin_memory=cuda,
        )
        bs = self.batch_size
        for i, (xb, yb) in enumerate(loader):
            xb = xb.to(self.device, non_blocking=cuda)
            yb = yb.to(self.device, non_blocking=cuda).long()
            if self.augment:
                sl = slice(i * bs, (i + 1) * bs)
                xb, yb = augment_batch(xb, yb, plan.ox[sl], plan.oy[sl], plan.flip[sl], self.pad, self.mask_fill)
            yield _finish(xb, self.dtype, self.channels_last), yb

    def __repr__(self) -> str:
        return (
            f"HostLoader(n={self.dataset_size}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, augment={self.augment}, device={self.device}, "
            f"rank={self.rank}/{self.world_size}, num_workers={self.num_workers})"
        )


def fits_on_device(nbytes: int, device: torch.device, max_device_fraction: float = 0.5) -> bool:
    """Whether ``nbytes`` fit in ``max_device_fraction`` of the device's free memory.

    Host memory (CPU) always counts as fitting: the data are already there.
    """
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= max_device_fraction * free


def make_loader(
    bundle: DatasetBundle,
    split: str,
    batch_size: int,
    *,
    train: bool,
    device: torch.device | str | None = None,
    augment: bool | Sequence[str] = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    resident: bool | None = None,
    drop_last: bool = False,
    pad: int | None = None,
    num_workers: int = 0,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    max_device_fraction: float = 0.5,
) -> GpuLoader | HostLoader:
    """A loader over ``bundle``'s ``split`` yielding ``(x in [-1, 1], y)`` batches on ``device``.

    Args:
        bundle: the data set.
        split: ``"train"``, ``"val"`` (when the bundle holds one) or ``"test"``.
        batch_size: samples per batch per rank.
        train: shuffle every epoch, allow augmentation and leave out a sample that would form a
            last batch of one (BatchNorm cannot train on it; a different sample each epoch);
            ``False`` keeps the data order and every sample.
        device: default CUDA when available, else CPU.
        augment: ``True``: the augmentations the data set declares as its default (CIFAR-10:
            random crop after ``pad``-pixel zero padding + horizontal flip; SVHN, MNIST and
            digits: crop only); a list of ``"crop"``/``"flip"``: those, each of which the data
            set must allow (:func:`flipnet.data.base.resolve_augment` refuses, with the reason,
            e.g. a flip of digits). Only applied when ``train`` is true, so evaluation never sees
            augmented images.
        seed: base seed of shuffling and augmentation (combined with the epoch and rank).
        rank, world_size: data-parallel shard.
        resident: ``True`` keeps the split on the device (:class:`GpuLoader`), ``False`` streams
            it from host memory (:class:`HostLoader`); ``None`` picks ``GpuLoader`` when the split
            fits in ``max_device_fraction`` of the free device memory.
        drop_last: drop the last partial batch (and samples that do not split evenly over ranks).
        pad: the crop's padding (``None``: the data set's declared pad, 4 for 32×32 images).
        num_workers, dtype, channels_last: see :class:`GpuLoader` / :class:`HostLoader`.
        max_device_fraction: budget for ``resident=None``.

    Note: evaluation with ``world_size > 1`` repeats up to ``world_size - 1`` samples to keep the
    ranks in step (as ``DistributedSampler`` does); evaluate on one rank for exact numbers.
    """
    if hasattr(bundle, "make_loader"):  # a streaming data set (flipnet.data.imagenet) makes its own loaders
        return bundle.make_loader(split, batch_size, train=train, device=device, augment=augment, seed=seed,
                                  rank=rank, world_size=world_size, num_workers=num_workers)
    x, y = bundle.split(split)
    augs, policy_pad = resolve_augment(bundle.name, augment) if train else ((), 0)
    pad = (policy_pad if pad is None else pad) if "crop" in augs else 0
    dev = torch.device(device) if device is not None else _default_device()
    if resident is None:
        nbytes = x.numel() * x.element_size() + y.numel() * (1 if y.dim() == 3 else y.element_size())
        resident = fits_on_device(nbytes, dev, max_device_fraction)
    kwargs: dict[str, Any] = dict(
        shuffle=train, augment=bool(augs), drop_last=drop_last, device=dev, seed=seed, rank=rank,
        world_size=world_size, pad=pad, dtype=dtype, channels_last=channels_last, flip="flip" in augs,
        drop_lone_last=train,
    )
    if resident:
        return GpuLoader(x, y, batch_size, **kwargs)
    return HostLoader(x, y, batch_size, num_workers=num_workers, **kwargs)
