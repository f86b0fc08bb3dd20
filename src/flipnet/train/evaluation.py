"""Evaluation of one model: mean loss and accuracy over a loader, summed over DDP ranks."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flipnet.errors import ConfigError

from .distributed import all_reduce_sum

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: torch.device,
             amp_dtype: torch.dtype | None = None, max_samples: int | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader`` (summed over DDP ranks).

    Args:
        max_samples: use only the first ``max_samples`` samples this rank's loader yields. Under
            DDP a loader pads the last batches by wrapping around so that every rank gets as many
            samples; with each rank's true share here, every sample counts exactly once.

    Returns ``{"loss": float, "acc": float, "n": int}``; accuracy counts pixels for segmentation.
    One host synchronisation at the end.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, targets
    n_samples = 0
    try:
        for x, y in loader:
            if max_samples is not None:
                if n_samples >= max_samples:
                    break
                x, y = x[: max_samples - n_samples], y[: max_samples - n_samples]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(x)
                loss = F.cross_entropy(out.float(), y, reduction="sum")
            if y.dim() > 1:  # dense targets: mean loss per pixel, times the number of images
                loss = loss / (y.numel() / y.shape[0])
            sums += torch.stack([loss.double(), (out.argmax(dim=1) == y).sum().double(), torch.tensor(float(y.numel()), device=device, dtype=torch.float64)])
            n_samples += y.shape[0]
    finally:
        model.train(was_training)
    both = all_reduce_sum(torch.cat([sums, torch.tensor([float(n_samples)], device=device, dtype=torch.float64)]))
    loss_sum, correct, targets, samples = both.tolist()
    if samples == 0:
        raise ConfigError("the evaluation set is empty; check data.test_subset / data.val_size")
    return {"loss": loss_sum / samples, "acc": correct / targets, "n": int(samples)}
