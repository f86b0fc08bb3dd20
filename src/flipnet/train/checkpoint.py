"""Checkpoints: atomic save, safe load (``weights_only=True``), RNG state capture and restore.

A checkpoint is a plain ``dict`` of tensors and plain containers (see ``docs/architecture.md``)::

    {"format": "flipnet-checkpoint", "version": 1,
     "model": state_dict, "optimizer": state_dict, "schedulers": [state_dict, ...],
     "epoch": int,            # epochs completed
     "step": int,             # optimizer steps taken
     "batch_in_epoch": int,   # batches of epoch `epoch` already trained (0 at an epoch boundary)
     "rng": {"torch": uint8 tensor, "cuda": [uint8 tensor, ...], "numpy": {...}, "python": {...}},
     "config": dict, "best": float, "meta": {"num_classes": int, "input_shape": [C, H, W], ...}}

Every value loads with ``torch.load(..., weights_only=True)``: the RNG states are stored as tensors
and lists, never as pickled objects.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flipnet.errors import CheckpointError
from flipnet.utils import atomic_torch_save

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "resolve_checkpoint",
    "inner_runs_hint",
    "get_rng_state",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "flipnet-checkpoint"
CHECKPOINT_VERSION = 1
_REQUIRED = ("model", "epoch", "step")


def get_rng_state() -> dict[str, Any]:
    """Every random generator's state (torch CPU and CUDA, NumPy, Python) as tensors/plain data."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`get_rng_state` (CUDA only when present and usable)."""
    try:
        torch.set_rng_state(state["torch"].cpu())
        n = state["numpy"]
        keys = n["keys"].cpu().numpy().astype(np.uint32)  # the trainer loads onto its device (map_location)
        np.random.set_state((n["name"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])))
        p = state["python"]
        random.setstate((int(p["version"]), tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
        cuda = state.get("cuda")
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.cpu() for t in cuda])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"the checkpoint's RNG state is malformed ({e}); it cannot be resumed exactly") from None


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Save ``state`` (see the module docstring) atomically; ``format``/``version`` are added.

    The old file stays intact until the new one is complete, so an interruption never leaves a
    half-written checkpoint.

    Raises:
        CheckpointError: the file cannot be written (full disk, read-only folder, size limit).
    """
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    try:
        atomic_torch_save(payload, path)
    except (OSError, RuntimeError) as e:  # torch's C++ writer reports a full disk as RuntimeError
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, RuntimeError):
            reason = f"{_write_failure_cause(path)}: {reason}"
        raise CheckpointError(
            f"cannot write {path} ({reason}); free disk space or make the folder writable, "
            "then continue with flipnet train --resume (the previous checkpoint is kept)"
        ) from None
    return path


def _write_failure_cause(path: Path) -> str:
    """Why torch's C++ writer failed (it reports no errno): a size limit, a full disk, or unknown."""
    import shutil

    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            return f"File too large (this process may write at most {soft} bytes per file)"
    except (ImportError, OSError, ValueError):
        pass
    try:
        if shutil.disk_usage(path.parent).free < 64 * 2**20:
            return "No space left on device"
    except OSError:
        pass
    return "disk full or file too large"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        CheckpointError: the file is missing, truncated, not a flipnet checkpoint or of a newer
            version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; give a run folder or a .pt file written by flipnet train")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (
        RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError,
        KeyError, IndexError, OverflowError, MemoryError,  # damaged pickle opcodes or lengths
    ) as e:
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            # torch's message goes on to suggest weights_only=False; flipnet never loads code from a file
            raise CheckpointError(
                f"checkpoint {path} holds Python objects other than tensors and plain data, which flipnet refuses to "
                "load (files are data, never code); it was not written by flipnet train"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a flipnet checkpoint ({first[:200]}); "
            "use the other checkpoint of the run (--checkpoint best|last) or retrain"
        ) from None
    except Exception as e:  # e.g. safetensors' own errors for a (truncated) export file given as checkpoint
        raise CheckpointError(
            f"{path} cannot be read as a flipnet checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
            "give a run folder or checkpoints/*.pt (an export file is read by flipnet.compress.load_exported)"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a flipnet checkpoint (no 'format: {CHECKPOINT_FORMAT}' entry)")
    version = obj.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {version!r}; this flipnet reads version {CHECKPOINT_VERSION} or older — upgrade flipnet"
        )
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; it is incomplete, retrain or use another one")
    return obj


def inner_runs_hint(folder: str | os.PathLike) -> str:
    """For a folder that holds run folders (``seeds=[...]`` writes ``NAME/seed_0``, ...): a hint
    naming them, to append to a "not a run folder" message; ``""`` otherwise."""
    p = Path(folder)
    try:
        inner = sorted(d for d in p.iterdir() if d.is_dir() and (d / "config.yaml").is_file())
    except OSError:
        return ""
    if not inner:
        return ""
    names = ", ".join(str(d) for d in inner[:3]) + (", ..." if len(inner) > 3 else "")
    return f" It holds {len(inner)} run folder{'s' if len(inner) > 1 else ''}; give those instead: {names}"


def resolve_checkpoint(run_or_file: str | os.PathLike, checkpoint: str = "best") -> Path:
    """The checkpoint file for a run folder (``best`` or ``last``) or a checkpoint path itself.

    For ``best`` a run without ``best.pt`` (no evaluation happened yet) falls back to ``last.pt``.

    Raises:
        CheckpointError: no such run folder or checkpoint.
    """
    if checkpoint not in ("best", "last"):
        raise CheckpointError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    p = Path(run_or_file).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise CheckpointError(f"{p} is neither a run folder nor a checkpoint file; check the path")
    folder = p / "checkpoints"
    want = folder / f"{checkpoint}.pt"
    if want.is_file():
        return want
    if checkpoint == "best" and (folder / "last.pt").is_file():
        return folder / "last.pt"
    raise CheckpointError(
        f"{p} has no checkpoints/{checkpoint}.pt; is it a run folder written by flipnet train?{inner_runs_hint(p)}"
    )
