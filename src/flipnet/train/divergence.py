"""Divergence checks: is anything of a run NaN or infinite? One host sync per check, none per step.

What is checked, per member: the summed training loss of the steps since the epoch began, every
weight, every floating-point buffer (BatchNorm running statistics) and every optimizer state
tensor (Adam's moments, Bop's momentum: the running averages of the gradients, where a NaN
gradient stays visible after ``zero_grad``). Checking the weights matters for binary networks:
sign quantizers map NaN to −1, so NaN weights can leave the loss finite.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .distributed import all_reduce_sum

__all__ = ["watched_tensors", "first_non_finite"]


def watched_tensors(model: nn.Module, optimizer: Any) -> list[tuple[str, Tensor]]:
    """``(description, tensor)`` of everything a divergence check looks at, in report order."""
    out = [(f"weight {n}", p) for n, p in model.named_parameters()]
    out += [(f"BatchNorm statistic {n}", b) for n, b in model.named_buffers() if b.is_floating_point()]
    names = {id(p): n for n, p in model.named_parameters()}
    for opt in getattr(optimizer, "optimizers", {"": optimizer}).values():
        for p, state in getattr(opt, "state", {}).items():
            for key, v in (state.items() if isinstance(state, dict) else ()):
                if isinstance(v, Tensor) and v.is_floating_point() and v.numel() > 1:
                    out.append((f"gradient statistic {key} of {names.get(id(p), '?')}", v))
    return out


def first_non_finite(losses: Tensor, watched: Sequence[list[tuple[str, Tensor]]], stop: bool,
                     device: torch.device, collective: bool = True) -> tuple[list[str | None], bool]:
    """One check for S members: what is non-finite first in each (``None``: nothing), and whether
    some DDP rank asked to stop (the request is shared in the same all-reduce).

    Args:
        losses: the members' summed training losses, shape ``(S,)``.
        watched: per member, :func:`watched_tensors`.
        stop: this rank's stop request (Ctrl-C, SIGTERM).
        collective: sum the flags over DDP ranks (every rank must call); ``False``: this rank only.
    """
    flags = [~torch.isfinite(losses.reshape(-1))]
    flags += [torch.stack([~torch.isfinite(t).all() for _, t in w]) for w in watched if w]
    flags.append(torch.tensor([stop], device=device))
    both = torch.cat([f.reshape(-1).to(device, torch.float32) for f in flags])
    bad = (all_reduce_sum(both) if collective else both).tolist()
    s, offset, found = len(watched), len(watched), []
    for i, w in enumerate(watched):
        hits = [name for (name, _), v in zip(w, bad[offset:offset + len(w)]) if v > 0]
        offset += len(w)
        found.append("the training loss" if bad[i] > 0 else (hits[0] if hits else None))
    assert offset == len(bad) - 1 and s == len(losses.reshape(-1))
    return found, bad[-1] > 0
