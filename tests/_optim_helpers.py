"""Helpers shared by the optimizer tests (test_optim_*.py)."""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = ["no_host_sync", "step_with_meta_hyperparameters", "train_split_and_resume"]


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Make every tensor → Python conversion raise while the block runs."""
    saved = {}

    def boom(*_a, **_k):
        raise AssertionError("host synchronisation inside step()")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        saved[name] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, boom)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def step_with_meta_hyperparameters(cls: type, **hyper: Any) -> None:
    """Step ``cls`` on meta tensors with meta 0-d tensor hyperparameters.

    ``no_host_sync`` patches only the Python methods; a read-back in C++ (e.g. a 0-d tensor
    passed where an op takes a Scalar) calls ``item()`` there, which raises on meta tensors.
    """
    w = torch.nn.Parameter(torch.ones(8, device="meta"))
    opt = cls([w], **hyper)
    group = opt.param_groups[0]
    for key, value in hyper.items():
        if isinstance(value, float):
            group[key] = torch.tensor(value, device="meta")
    for _ in range(2):
        w.grad = torch.ones(8, device="meta")
        opt.step()


def train_split_and_resume(
    make: Callable[[], tuple[torch.nn.Parameter, torch.optim.Optimizer]],
    grads: Sequence[torch.Tensor],
    split: int,
    transfer: Callable[[torch.Tensor, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]] | None = None,
) -> tuple[torch.nn.Parameter, torch.optim.Optimizer, torch.nn.Parameter, torch.optim.Optimizer]:
    """Step one fresh ``make()`` through all ``grads``; step another through ``grads[:split]``,
    copy its weight and (deep-copied) state dict into a third, and step that through the rest.
    ``transfer(weight, state_dict) -> (weight, state_dict)`` replaces the plain copy (e.g. to go
    through ``torch.save``/``torch.load``).

    Returns ``(w_a, opt_a, w_c, opt_c)``: the uninterrupted run and the resumed one.
    """
    w_a, opt_a = make()
    for g in grads:
        w_a.grad = g.clone()
        opt_a.step()
    w_b, opt_b = make()
    for g in grads[:split]:
        w_b.grad = g.clone()
        opt_b.step()
    if transfer is None:
        state, weights = copy.deepcopy(opt_b.state_dict()), w_b.detach().clone()
    else:
        weights, state = transfer(w_b.detach().clone(), opt_b.state_dict())
    w_c, opt_c = make()
    with torch.no_grad():
        w_c.copy_(weights)
    opt_c.load_state_dict(state)
    for g in grads[split:]:
        w_c.grad = g.clone()
        opt_c.step()
    return w_a, opt_a, w_c, opt_c
