"""Distributed data parallel training set up from ``torchrun``'s environment variables.

``torchrun --nproc-per-node N -m flipnet train RECIPE`` starts N processes with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. :func:`init_distributed`
reads them and joins the process group (``nccl`` on CUDA, ``gloo`` on CPU). Without them it does
nothing and training runs in a single process.

Under DDP every rank holds the same model: gradients are all-reduced (averaged) by
:class:`~torch.nn.parallel.DistributedDataParallel` before the optimizer step, so flip optimizers
take the same flips on every rank. Metrics are summed over ranks with :func:`all_reduce_sum`;
only rank 0 writes files and prints.

Shutdown order matters. A rank that reaches interpreter exit with the gloo process group still
alive can die with SIGABRT ("terminate called without an active exception") while C++ static
destructors tear down the group's threads, at random and more often when its peer has already
gone. So :func:`init_distributed` registers an ``atexit`` hook that destroys the group before the
interpreter shuts down, whatever the exit path (normal end, exception, ``KeyboardInterrupt``),
and :meth:`flipnet.train.Trainer.fit` ends with a barrier so no rank leaves while another still
writes or communicates.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from flipnet.errors import ConfigError

__all__ = [
    "DistInfo",
    "env_world_size",
    "init_distributed",
    "cleanup_distributed",
    "all_reduce_sum",
    "broadcast_buffers",
    "barrier",
    "is_distributed",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def is_distributed() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: str = "auto") -> tuple[DistInfo, torch.device | None]:
    """Join the process group described by torchrun's environment variables.

    Args:
        device: the configured device (``auto``, ``cpu``, ``cuda``, ``cuda:N``). Under DDP on
            CUDA each rank uses ``cuda:LOCAL_RANK``.

    Returns:
        ``(info, device)`` where ``device`` is the device this rank must use, or ``None`` when not
        distributed (the caller resolves the device itself).
    """
    world = env_world_size()
    if world <= 1:
        return DistInfo(), None
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={device} but CUDA is not available; use train.device=cpu")
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise ConfigError(f"WORLD_SIZE={world} but {var} is not set; launch with torchrun --nproc-per-node N -m flipnet train ...")
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(minutes=30))
    _register_exit_hook()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, backend=backend), dev


def cleanup_distributed() -> None:
    """Leave the process group (no-op when none is initialised).

    Local and non-blocking, so it is safe on every exit path, errors included; the ordering
    barrier belongs where all ranks are known to arrive (the end of ``Trainer.fit``). Called
    again at interpreter exit (see :func:`init_distributed`), so scripts that never call it
    still shut down cleanly.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_EXIT_HOOK_REGISTERED = False


def _destroy_at_exit() -> None:
    try:
        cleanup_distributed()
    except Exception:  # a peer already gone must not turn a clean exit into a traceback
        pass


def _register_exit_hook() -> None:
    """Destroy the process group before interpreter shutdown (once per process)."""
    global _EXIT_HOOK_REGISTERED
    if not _EXIT_HOOK_REGISTERED:
        atexit.register(_destroy_at_exit)
        _EXIT_HOOK_REGISTERED = True


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op outside DDP) and return it."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy every buffer (BatchNorm running statistics) from rank ``src`` to all ranks.

    DDP broadcasts buffers at the start of each forward pass, so after the last training step the
    ranks' running statistics differ slightly; call this before evaluating or saving.
    """
    if not is_distributed():
        return
    with torch.no_grad():
        for buf in model.buffers():
            dist.broadcast(buf, src)


def barrier() -> None:
    """Wait for every rank (no-op outside DDP)."""
    if is_distributed():
        dist.barrier()
