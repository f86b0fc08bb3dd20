"""A loader that keeps a whole uint8 data set on the device and augments batches there.

Semantics shared by :class:`GpuLoader` and :class:`flipnet.data.loader.HostLoader`:

* **Order.** Each epoch has one permutation of the data set (``shuffle=True``) or the identity.
  It depends only on ``seed`` and the epoch, so it is the same on every rank and device.
* **Sharding.** Like ``torch.utils.data.DistributedSampler``: the epoch order is padded by
  wrapping around (or cut, with ``drop_last``) to a multiple of ``world_size``, and rank ``r``
  takes positions ``r, r + world_size, ...``. Every rank gets the same number of samples and
  batches; without ``drop_last`` up to ``world_size - 1`` samples repeat in an epoch.
* **Augmentation** (``augment=True``): a random crop after zero-padding each side by ``pad``
  pixels (offsets uniform in ``0..2*pad``; ``pad=0``: no crop) and, unless ``flip=False``, a
  horizontal flip with probability 1/2, done for the whole batch with one gather (no per-image
  Python loop). :func:`flipnet.data.make_loader` picks these from what the data set declares. Segmentation masks get the same
  crop and flip; padded mask pixels get ``mask_fill`` (default ``-100``, the ``ignore_index`` of
  ``torch.nn.CrossEntropyLoss``). The parameters depend on ``seed``, the epoch and the rank.
* **Scaling.** Images come out as ``x / 127.5 - 1`` in ``[-1, 1]`` (float32 unless ``dtype``
  says otherwise); labels/masks as int64.
* **Epochs.** ``set_epoch(e)`` selects the epoch of the next pass; a pass without it uses the
  epoch after the previous pass, so plain ``for epoch in ...: for x, y in loader`` reshuffles.
* **A lone last sample** (``drop_lone_last=True``, what ``make_loader`` sets for training): when
  an epoch's last batch would hold a single sample (``samples % batch_size == 1`` with
  ``batch_size > 1``), that sample is left out of the epoch. BatchNorm cannot normalise one
  sample per channel in training mode, and as the order is reshuffled every epoch a different
  sample is left out each time.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from flipnet.errors import ConfigError

__all__ = ["GpuLoader", "EpochPlan", "augment_batch", "scale_images", "MASK_FILL"]

MASK_FILL = -100
"""Mask value of padded pixels after a random crop (``CrossEntropyLoss``'s default ``ignore_index``)."""


def scale_images(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images → ``x / 127.5 - 1`` in ``[-1, 1]``."""
    return x.to(dtype).div_(127.5).sub_(1.0)


def augment_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    ox: torch.Tensor,
    oy: torch.Tensor,
    flip: torch.Tensor,
    pad: int,
    mask_fill: int = MASK_FILL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop (after zero padding by ``pad``) and horizontal flip of a batch, vectorised.

    Args:
        x: ``(B, C, H, W)`` images (any dtype; padding is 0).
        y: ``(B,)`` labels (returned unchanged) or ``(B, H, W)`` masks (cropped and flipped like
            ``x``; padding is ``mask_fill``).
        ox, oy: ``(B,)`` integer crop offsets in ``0..2*pad`` (column, row) in padded coordinates.
        flip: ``(B,)`` bool, flip image ``b`` left-right after cropping.
        pad: padding on each side.

    Returns:
        ``(x', y')`` of the same shapes: ``x'[b] = flip?(pad(x)[b, :, oy:oy+H, ox:ox+W])``.
    """
    b, c, h, w = x.shape
    hp, wp = h + 2 * pad, w + 2 * pad
    dev = x.device
    rows = oy.to(dev).view(b, 1) + torch.arange(h, device=dev).view(1, h)  # (B, H)
    cols = ox.to(dev).view(b, 1) + torch.arange(w, device=dev).view(1, w)  # (B, W)
    cols = torch.where(flip.to(dev).view(b, 1), cols.flip(1), cols)
    index = (rows.view(b, h, 1) * wp + cols.view(b, 1, w)).view(b, 1, h * w)  # flat index into the padded image
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    out_x = xp.reshape(b, c, hp * wp).gather(2, index.expand(b, c, h * w)).view(b, c, h, w)
    if y.dim() == 3:
        yp = F.pad(y, (pad, pad, pad, pad), value=mask_fill) if pad else y
        y = yp.reshape(b, hp * wp).gather(1, index.view(b, h * w)).view(b, h, w)
    return out_x, y


def _derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from the parts (the same on every machine and Python run)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class EpochPlan:
    """What one rank reads in one epoch: sample indices and augmentation parameters (CPU tensors)."""

    indices: torch.Tensor  # (S,) int64 positions in the data set, S = samples of this rank
    ox: torch.Tensor  # (S,) int64 crop column offsets
    oy: torch.Tensor  # (S,) int64 crop row offsets
    flip: torch.Tensor  # (S,) bool


class _PlannedLoader:
    """Order, sharding, batching and augmentation parameters shared by the loaders."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        drop_last: bool,
        seed: int,
        rank: int,
        world_size: int,
        pad: int,
        flip: bool = True,
        drop_lone_last: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        if n < 1:
            raise ValueError("the data set is empty")
        self.dataset_size = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.flip = bool(flip)
        total = (n // world_size) * world_size if drop_last else math.ceil(n / world_size) * world_size
        self.num_samples = total // world_size
        """Samples this rank reads per epoch."""
        lone = drop_lone_last and batch_size > 1 and self.num_samples % batch_size == 1
        self.drops_lone_sample = bool(lone)
        """Whether each epoch leaves out one sample that would form a batch of one."""
        if lone and self.num_samples == 1:
            raise ConfigError(
                f"{n} training sample(s) over {world_size} rank(s) give one sample per rank; BatchNorm cannot "
                "train on a batch of one: use more samples (data.subset) or fewer ranks"
            )
        self._num_batches = (
            self.num_samples // batch_size if drop_last or lone else math.ceil(self.num_samples / batch_size)
        )
        if self._num_batches == 0:
            raise ValueError(
                f"no full batch: {n} samples over {world_size} rank(s) give {self.num_samples} per rank, fewer "
                f"than batch_size={batch_size} with drop_last=True; lower batch_size or set drop_last=False"
            )
        self._epoch = 0

    def _set_output(
        self, device: torch.device | str | None, dtype: torch.dtype, channels_last: bool, mask_fill: int
    ) -> None:
        """Where batches are produced (default: CUDA when available) and how they are finished."""
        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = dtype
        self.channels_last = channels_last
        self.mask_fill = mask_fill

    @property
    def epoch(self) -> int:
        """The epoch the next pass will use."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next pass (order and augmentation depend on seed and epoch)."""
        self._epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self._num_batches

    def plan(self, epoch: int) -> EpochPlan:
        """The indices and augmentation parameters this rank uses in ``epoch``."""
        n, ws = self.dataset_size, self.world_size
        if self.shuffle:
            g = torch.Generator().manual_seed(_derive_seed("order", self.seed, epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        total = self.num_samples * ws
        if total > n:  # wrap around so every rank gets the same number of samples
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        indices = order[:total][self.rank :: ws][: self._num_batches * self.batch_size]
        s = len(indices)
        if self.augment:
            g = torch.Generator().manual_seed(_derive_seed("augment", self.seed, epoch, self.rank))
            ox = torch.randint(0, 2 * self.pad + 1, (s,), generator=g)
            oy = torch.randint(0, 2 * self.pad + 1, (s,), generator=g)
            flip = torch.rand(s, generator=g) < 0.5
            if not self.flip:
                flip = torch.zeros(s, dtype=torch.bool)
        else:
            ox = oy = torch.full((s,), self.pad, dtype=torch.int64)
            flip = torch.zeros(s, dtype=torch.bool)
        return EpochPlan(indices, ox, oy, flip)

    def _next_epoch(self) -> int:
        epoch = self._epoch
        self._epoch += 1
        return epoch


class GpuLoader(_PlannedLoader):
    """Iterate ``(x, y)`` batches of a uint8 data set held entirely on ``device``.

    ``x`` (uint8 ``(N, C, H, W)``) and ``y`` (``(N,)`` labels or ``(N, H, W)`` masks) are copied to
    the device once; each batch is gathered, augmented and scaled there, so an epoch costs no
    host-to-device traffic beyond one index vector. See the module docstring for the order,
    sharding, augmentation and epoch semantics; ``len(loader)`` is the number of batches per epoch.

    Args:
        x, y: the data set.
        batch_size: samples per batch (per rank).
        shuffle: a new seeded permutation every epoch.
        augment: random crop with ``pad``-pixel zero padding and horizontal flip.
        drop_last: drop the last partial batch (and the samples that do not split evenly
            over ranks).
        device: where to keep the data and produce batches (default: CUDA when available).
        seed: base seed of order and augmentation.
        rank, world_size: this process's shard for data-parallel training.
        pad: padding of the random crop (4 for 32×32 images as in the Bop reference).
        dtype: floating dtype of the scaled images.
        channels_last: return images in ``torch.channels_last`` memory format.
        mask_fill: mask value of padded pixels in segmentation crops.
        flip: with ``augment``, also flip horizontally (``False``: crop only).
        drop_lone_last: leave out the sample that would form a last batch of one.
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
        flip: bool = True,
        drop_lone_last: bool = False,
    ) -> None:
        _check_xy(x, y)
        super().__init__(
            len(x), batch_size, shuffle=shuffle, augment=augment, drop_last=drop_last,
            seed=seed, rank=rank, world_size=world_size, pad=pad, flip=flip, drop_lone_last=drop_lone_last,
        )
        self._set_output(device, dtype, channels_last, mask_fill)
        self.x = x.to(self.device)
        self.y = _compact_masks(y).to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.plan(self._next_epoch())
        contiguous = not self.shuffle and self.world_size == 1
        idx_all = plan.indices.to(self.device, non_blocking=True)
        if self.augment:
            ox_all = plan.ox.to(self.device, non_blocking=True)
            oy_all = plan.oy.to(self.device, non_blocking=True)
            flip_all = plan.flip.to(self.device, non_blocking=True)
        bs = self.batch_size
        for i in range(len(self)):
            sl = slice(i * bs, (i + 1) * bs)
            if contiguous:
                xb, yb = self.x[sl], self.y[sl]
            else:
                idx = idx_all[sl]
                xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            yb = yb.long()
            if self.augment:
                xb, yb = augment_batch(xb, yb, ox_all[sl], oy_all[sl], flip_all[sl], self.pad, self.mask_fill)
            yield _finish(xb, self.dtype, self.channels_last), yb

    def __repr__(self) -> str:
        return (
            f"GpuLoader(n={self.dataset_size}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, augment={self.augment}, device={self.device}, "
            f"rank={self.rank}/{self.world_size})"
        )


def _finish(x: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    out = scale_images(x, dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        got = f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}"
        raise ValueError(f"x must be a uint8 tensor (N, C, H, W), got {got}")
    if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"y must be an integer tensor, got {getattr(y, 'dtype', type(y))}")
    if y.dim() == 1:
        if len(y) != len(x):
            raise ValueError(f"{len(y)} labels for {len(x)} images")
    elif y.dim() != 3 or y.shape[0] != x.shape[0] or y.shape[1:] != x.shape[2:]:
        raise ValueError(f"y must be (N,) labels or (N, H, W) masks matching x {tuple(x.shape)}, got {tuple(y.shape)}")


def _compact_masks(y: torch.Tensor) -> torch.Tensor:
    """Masks with ids in 0..255 are stored as uint8 (8× less memory); batches are int64 again."""
    if y.dim() == 3 and y.numel() and int(y.min()) >= 0 and int(y.max()) <= 255:
        return y.to(torch.uint8)
    return y


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
