r"""Sign dynamics of binary weights: a cheap tracker callback and the per-epoch analysis.

Sun & Yao ("Weights having stable signs are important: finding primary subnetworks and kernels
to compress binary weight networks") observe that most signs of a binary-weight network settle
early in training. :class:`SignTracker` records what is needed to check this on any flipnet run,
and :func:`analyze_run` turns the records into tables and plots.

What is recorded
----------------
Let :math:`s_t = \mathrm{sign}(w_t) \in \{\pm1\}^n` be the signs of a layer's binary weight
after optimizer step :math:`t` (latent weights are binarised with ``sign(0) = +1``; flip-mode
weights are their own signs, so one code path serves latent and flip training).

* Per step and layer, the flip count :math:`f_t = \#\{i : s_{t,i} \ne s_{t-1,i}\}`. It is computed
  on the weights' device and kept there; the host reads it once per epoch (no synchronisation
  per step).
* Per epoch :math:`e`, a snapshot of :math:`s` bit-packed with :func:`numpy.packbits` (``+1`` → 1,
  little bit order, 8 signs per byte) in ``RUN/signs/epoch_XXXX.safetensors``; ``epoch_0000``
  holds the initial signs. Each snapshot also holds the step flip counts since the previous one
  and, for latent weights, the Euclidean norm :math:`\lVert w \rVert_2` of each layer.
* ``RUN/signs/init.safetensors``: the initial binary-layer weights (full precision), which the
  primary-subnetwork experiment (:mod:`flipnet.analysis.primary`) re-uses.

What is analysed (:func:`analyze_run`), per layer and overall, for each snapshot epoch :math:`e`
(final epoch :math:`E`):

* ``flip_ratio``: :math:`\frac{1}{n S_e}\sum_{t \in e} f_t`, flips per weight per step in the
  epoch (:math:`S_e` steps), the quantity of Helwegen et al.'s flip-ratio plots;
* ``changed``: fraction with :math:`s_e \ne s_{e-1}` (net change over the epoch);
* ``equal_final``: fraction with :math:`s_e = s_E`;
* ``never_flip_after``: fraction with :math:`s_e = s_{e+1} = \dots = s_E` (measured at snapshot
  resolution: a weight that flips and flips back within one epoch is not seen);
* ``latent_norm``: :math:`\lVert w_e \rVert_2` (latent training).

The overall row weights layers by their number of weights.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..train.callbacks import Callback

__all__ = [
    "SIGNS_DIR",
    "SNAPSHOT_FORMAT",
    "SignTracker",
    "SignSnapshot",
    "snapshot_path",
    "list_snapshots",
    "read_snapshot",
    "read_initial_weights",
    "pack_signs",
    "unpack_signs",
    "tracked_layers",
    "SignDynamics",
    "sign_dynamics",
    "analyze_run",
]

SIGNS_DIR = "signs"
SNAPSHOT_FORMAT = "flipnet-signs"
_SNAPSHOT_RE = re.compile(r"^epoch_(\d{4,})\.safetensors$")
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


# ----------------------------------------------------------------------------- helpers
def pack_signs(w: Tensor) -> np.ndarray:
    """Bit-pack ``w >= 0`` (flattened) into ``uint8``: 8 signs per byte, little bit order, +1 → 1."""
    return np.packbits(w.detach().reshape(-1).ge(0).cpu().numpy(), bitorder="little")


def unpack_signs(packed: np.ndarray | Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`pack_signs`: a ±1 tensor of ``shape``."""
    n = int(np.prod(shape))
    data = np.asarray(packed.cpu() if isinstance(packed, Tensor) else packed, dtype=np.uint8).reshape(-1)
    if data.size != math.ceil(n / 8):
        raise ValueError(f"packed signs hold {data.size} bytes, expected {math.ceil(n / 8)} for shape {tuple(shape)}")
    bits = np.unpackbits(data, bitorder="little", count=n).astype(np.float32)
    return torch.from_numpy(bits * 2 - 1).to(dtype).reshape(tuple(shape))


def tracked_layers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Parameter]]:
    """``(layer name, module, weight)`` of every binary layer with 1-bit weights (each weight once)."""
    from ..layers import binary_modules

    out = []
    seen: set[int] = set()
    for name, m in binary_modules(model):
        if getattr(m, "has_binary_weight", True) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append((name or "weight", m, m.weight))
    return out


def snapshot_path(run_dir: str | Path, epoch: int) -> Path:
    """``RUN/signs/epoch_XXXX.safetensors``."""
    return Path(run_dir) / SIGNS_DIR / f"epoch_{int(epoch):04d}.safetensors"


def _save_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from ..utils import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


# ----------------------------------------------------------------------------- tracker
class SignTracker(Callback):
    """Trainer callback recording sign flips and per-epoch sign snapshots (see module docstring).

    Usage: ``train.track_signs: true`` in a recipe, or ``Trainer(config, callbacks=[SignTracker()])``.

    Args:
        out_dir: folder for snapshots; default ``trainer.run_dir / "signs"``.
        every: write a snapshot every ``every`` epochs (the last epoch is always written).
        save_initial_weights: also write ``init.safetensors`` with the initial weights.

    Attributes:
        layers: tracked layer names, in snapshot order.
        epoch_flips: per layer, flips during the last finished epoch (host ``int`` list).

    Cost per step: for each binary layer, one comparison of the weight with 0, one comparison
    with the previous signs and a sum, all on the weight's device, plus one ``torch.stack``;
    nothing is copied to the host until the epoch ends.
    """

    #: Satisfies ``train.track_signs`` (the trainer checks that such a callback is attached).
    tracks_signs = True

    def __init__(self, out_dir: str | Path | None = None, every: int = 1, save_initial_weights: bool = True) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of epochs, got {every!r}")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.every = every
        self.save_initial_weights = save_initial_weights
        self.layers: list[str] = []
        self.epoch_flips: list[int] = []
        self._weights: list[Tensor] = []
        self._modules: list[nn.Module] = []
        self._prev: list[Tensor] = []
        self._rows: list[Tensor] = []
        self._pending_rows: list[Tensor] = []
        self._epoch = 0
        self._active = False

    # -- callback hooks -----------------------------------------------------------------
    def on_train_start(self, trainer: Any) -> None:
        self._active = bool(getattr(trainer, "is_main", True))
        if not self._active:
            return
        model = trainer.model
        tracked = tracked_layers(model)
        if not tracked:
            raise ValueError("sign tracking needs a model with binary layers (flipnet.layers.BinaryLayer)")
        self.layers = [n for n, _, _ in tracked]
        self._modules = [m for _, m, _ in tracked]
        self._weights = [w for _, _, w in tracked]
        self._prev = [w.detach().ge(0) for w in self._weights]
        self._rows = []
        self._pending_rows = []
        if self.out_dir is None:
            self.out_dir = Path(trainer.run_dir) / SIGNS_DIR
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._epoch = int(getattr(trainer, "epoch", 0) or 0)
        if self._epoch == 0 or not (self.out_dir / f"epoch_{self._epoch:04d}.safetensors").exists():
            self._write_snapshot(self._epoch, int(getattr(trainer, "step", 0) or 0), [])
        if self.save_initial_weights and self._epoch == 0:
            _save_safetensors(
                self.out_dir / "init.safetensors",
                {n: w.detach().float().cpu() for n, w in zip(self.layers, self._weights)},
                {"format": "flipnet-init-weights", "version": "1", "layers": json.dumps(self.layers)},
            )

    @torch.no_grad()
    def on_step_end(self, trainer: Any) -> None:
        if not self._active:
            return
        cur = [w.detach().ge(0) for w in self._weights]
        self._rows.append(torch.stack([torch.ne(c, p).sum() for c, p in zip(cur, self._prev)]))
        self._prev = cur

    def on_epoch_end(self, trainer: Any, metrics: dict) -> None:
        if not self._active:
            return
        # the trainer counts completed epochs: at on_epoch_end it is the finished epoch's number
        self._epoch = int(getattr(trainer, "epoch", self._epoch + 1))
        rows = torch.stack(self._rows).cpu() if self._rows else torch.zeros(0, len(self.layers), dtype=torch.int64)
        self._rows = []
        self.epoch_flips = [int(v) for v in rows.sum(dim=0).tolist()]
        n = sum(w.numel() for w in self._weights)
        steps = rows.shape[0]
        if steps:
            metrics["sign_flip_ratio"] = sum(self.epoch_flips) / (n * steps)
        self._pending_rows.append(rows)
        last = getattr(getattr(getattr(trainer, "config", None), "train", None), "epochs", None)
        if self._epoch % self.every == 0 or (last is not None and self._epoch >= int(last)):
            all_rows = torch.cat(self._pending_rows) if self._pending_rows else rows
            self._pending_rows = []
            self._write_snapshot(self._epoch, int(getattr(trainer, "step", 0) or 0), [all_rows])

    def on_train_end(self, trainer: Any) -> None:
        if self._active and self._pending_rows:
            self._write_snapshot(self._epoch, int(getattr(trainer, "step", 0) or 0), [torch.cat(self._pending_rows)])
            self._pending_rows = []
        self._active = False

    # -- writing --------------------------------------------------------------------------
    def _write_snapshot(self, epoch: int, step: int, step_rows: list[Tensor]) -> None:
        assert self.out_dir is not None
        tensors: dict[str, Tensor] = {}
        for name, w in zip(self.layers, self._weights):
            tensors[f"signs.{name}"] = torch.from_numpy(pack_signs(w))
        rows = step_rows[0] if step_rows else torch.zeros(0, len(self.layers), dtype=torch.int64)
        tensors["step_flips"] = rows.to(torch.int64)
        modes = [str(getattr(m, "weight_mode", "latent")) for m in self._modules]
        if any(mode == "latent" for mode in modes):
            tensors["latent_norm"] = torch.tensor(
                [float(w.detach().float().norm()) if mode == "latent" else float("nan")
                 for w, mode in zip(self._weights, modes)],
                dtype=torch.float32,
            )
        meta = {
            "format": SNAPSHOT_FORMAT,
            "version": "1",
            "epoch": str(epoch),
            "step": str(step),
            "layers": json.dumps(self.layers),
            "shapes": json.dumps([list(w.shape) for w in self._weights]),
            "weight_modes": json.dumps(modes),
        }
        _save_safetensors(self.out_dir / f"epoch_{epoch:04d}.safetensors", tensors, meta)


# ----------------------------------------------------------------------------- reading
@dataclass
class SignSnapshot:
    """One snapshot file.

    Attributes:
        epoch: epoch index (0 = before training).
        step: optimizer steps done.
        layers: layer names.
        shapes: weight shape per layer.
        packed: packed signs per layer (:func:`pack_signs` layout).
        step_flips: ``(steps, layers)`` flip counts since the previous snapshot.
        latent_norm: per layer ``||w||_2`` (``nan`` for flip-mode layers), or ``None``.
        weight_modes: per layer ``"latent"`` or ``"flip"``.
    """

    epoch: int
    step: int
    layers: list[str]
    shapes: list[tuple[int, ...]]
    packed: list[np.ndarray]
    step_flips: np.ndarray
    latent_norm: np.ndarray | None
    weight_modes: list[str]

    def signs(self, layer: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ±1 signs of ``layer``."""
        i = self.layers.index(layer)
        return unpack_signs(self.packed[i], self.shapes[i], dtype)

    @property
    def numels(self) -> list[int]:
        return [int(np.prod(s)) for s in self.shapes]


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of every snapshot of a run, by epoch."""
    d = Path(run_dir) / SIGNS_DIR
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _SNAPSHOT_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_snapshot(path: str | Path) -> SignSnapshot:
    """Read one snapshot file; raises :class:`~flipnet.errors.CheckpointError` if malformed."""
    from safetensors import safe_open

    from ..errors import CheckpointError

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != SNAPSHOT_FORMAT:
                raise CheckpointError(f"{path} is not a flipnet sign snapshot (format={meta.get('format')!r})")
            layers = json.loads(meta["layers"])
            shapes = [tuple(int(v) for v in s) for s in json.loads(meta["shapes"])]
            packed = [f.get_tensor(f"signs.{n}").numpy() for n in layers]
            step_flips = f.get_tensor("step_flips").numpy()
            latent = f.get_tensor("latent_norm").numpy() if "latent_norm" in f.keys() else None
            modes = json.loads(meta.get("weight_modes", json.dumps(["latent"] * len(layers))))
            snap = SignSnapshot(int(meta["epoch"]), int(meta["step"]), layers, shapes, packed, step_flips, latent, modes)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise
    except Exception as e:  # malformed JSON, missing keys, safetensors errors
        raise CheckpointError(f"cannot read sign snapshot {path}: {e}") from None
    if len(snap.shapes) != len(layers) or any(s < 0 for shape in snap.shapes for s in shape):
        raise CheckpointError(f"sign snapshot {path} has {len(snap.shapes)} weight shapes for {len(layers)} layers")
    for p, n in zip(snap.packed, snap.numels):
        if p.dtype != np.uint8 or p.size != math.ceil(n / 8):
            raise CheckpointError(f"sign snapshot {path} is truncated or corrupt (packed size mismatch)")
    if snap.step_flips.ndim != 2 or snap.step_flips.shape[1] != len(layers):
        raise CheckpointError(f"sign snapshot {path} has step flips of the wrong shape {snap.step_flips.shape}")
    return snap


def read_initial_weights(run_dir: str | Path) -> dict[str, Tensor]:
    """The initial binary-layer weights saved by :class:`SignTracker` (``RUN/signs/init.safetensors``)."""
    from safetensors.torch import load_file

    p = Path(run_dir) / SIGNS_DIR / "init.safetensors"
    if not p.is_file():
        from ..errors import CheckpointError

        raise CheckpointError(f"{p} is missing: train the run with train.track_signs=true to record initial weights")
    return load_file(str(p))


# ----------------------------------------------------------------------------- analysis
_COLUMNS = ("epoch", "layer", "n_weights", "steps", "flip_ratio", "changed", "equal_final", "never_flip_after",
            "latent_norm")


@dataclass
class SignDynamics:
    """Result of :func:`sign_dynamics`: rows of :data:`_COLUMNS`, one per (epoch, layer) and
    per epoch for ``layer="total"``."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)

    def series(self, column: str, layer: str = "total") -> tuple[np.ndarray, np.ndarray]:
        """``(epochs, values)`` of ``column`` for ``layer``."""
        if column not in _COLUMNS:
            raise KeyError(f"unknown column {column!r}; valid: {', '.join(_COLUMNS)}")
        sel = [r for r in self.rows if r["layer"] == layer]
        if not sel:
            raise KeyError(f"unknown layer {layer!r}; valid: total, {', '.join(self.layers)}")
        return np.array([r["epoch"] for r in sel]), np.array([r[column] for r in sel], dtype=np.float64)

    def write_csv(self, path: str | Path) -> None:
        from ..utils import atomic_path

        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(_COLUMNS))
            w.writeheader()
            for r in self.rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _popcount(a: np.ndarray) -> int:
    return int(_POPCOUNT8[a].sum())


def sign_dynamics(run_dir: str | Path) -> SignDynamics:
    """Compute the per-epoch sign statistics of a run from its snapshots (see module docstring).

    Works on the packed bits (XOR and popcount), one snapshot in memory at a time plus the final
    one and a running "stable" mask.

    Raises:
        CheckpointError: if the run has fewer than two snapshots or they disagree on layers.
    """
    from ..errors import CheckpointError

    snaps = list_snapshots(run_dir)
    if len(snaps) < 2:
        raise CheckpointError(
            f"{Path(run_dir) / SIGNS_DIR} holds {len(snaps)} sign snapshot(s); train with train.track_signs=true "
            "for at least one epoch"
        )
    final = read_snapshot(snaps[-1][1])
    layers, numels = final.layers, final.numels
    n_total = sum(numels)
    # pass 1 (backward): never-flip-after masks need the future
    stable = [np.full(p.shape, 0xFF, dtype=np.uint8) for p in final.packed]
    never: dict[int, list[int]] = {final.epoch: list(numels)}
    later = final
    for epoch, path in reversed(snaps[:-1]):
        snap = read_snapshot(path)
        if snap.layers != layers or snap.shapes != final.shapes:
            raise CheckpointError(f"sign snapshot {path} tracks other layers than {snaps[-1][1]}")
        for i in range(len(layers)):
            stable[i] &= ~(snap.packed[i] ^ later.packed[i])
        never[epoch] = [_stable_count(stable[i], numels[i]) for i in range(len(layers))]
        later = snap
    # pass 2 (forward): flips, changes, agreement with the final signs
    out = SignDynamics(layers=list(layers), epochs=[e for e, _ in snaps])
    prev: SignSnapshot | None = None
    for epoch, path in snaps:
        snap = final if epoch == final.epoch else read_snapshot(path)
        steps = int(snap.step_flips.shape[0])
        flips = snap.step_flips.sum(axis=0) if steps else np.zeros(len(layers), dtype=np.int64)
        tot: dict[str, float] = dict(flips=0.0, changed=0.0, equal=0.0, never=0.0, norm_sq=0.0)
        has_norm = snap.latent_norm is not None
        for i, name in enumerate(layers):
            n = numels[i]
            diff_final = _popcount(snap.packed[i] ^ final.packed[i])
            changed = _popcount(snap.packed[i] ^ prev.packed[i]) if prev is not None else 0
            norm = float(snap.latent_norm[i]) if has_norm else float("nan")
            row = {
                "epoch": epoch,
                "layer": name,
                "n_weights": n,
                "steps": steps,
                "flip_ratio": float(flips[i]) / (n * steps) if steps else float("nan"),
                "changed": changed / n if prev is not None else float("nan"),
                "equal_final": 1.0 - diff_final / n,
                "never_flip_after": never[epoch][i] / n,
                "latent_norm": norm,
            }
            out.rows.append(row)
            tot["flips"] += float(flips[i])
            tot["changed"] += changed
            tot["equal"] += n - diff_final
            tot["never"] += never[epoch][i]
            tot["norm_sq"] += norm * norm if not math.isnan(norm) else 0.0
        out.rows.append({
            "epoch": epoch,
            "layer": "total",
            "n_weights": n_total,
            "steps": steps,
            "flip_ratio": tot["flips"] / (n_total * steps) if steps else float("nan"),
            "changed": tot["changed"] / n_total if prev is not None else float("nan"),
            "equal_final": tot["equal"] / n_total,
            "never_flip_after": tot["never"] / n_total,
            "latent_norm": math.sqrt(tot["norm_sq"]) if has_norm else float("nan"),
        })
        prev = snap
    return out


def _stable_count(mask: np.ndarray, n: int) -> int:
    # padding bits beyond n are 0 in every snapshot, so XOR leaves them 0 and ~0 sets them: drop them
    bits = np.unpackbits(mask, bitorder="little", count=n)
    return int(bits.sum())


def _plot_dynamics(dyn: SignDynamics, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import atomic_path

    specs = [
        ("flip_ratio", "flips per weight per step", "Flip ratio", True),
        ("equal_final", "fraction of signs equal to the final signs", "Agreement with final signs", False),
        ("never_flip_after", "fraction never flipping again", "Signs fixed from epoch e on", False),
        ("latent_norm", "‖w‖₂ (latent weights)", "Latent-weight norm", False),
    ]
    paths = []
    for col, ylabel, title, logy in specs:
        _, tot = dyn.series(col)
        if np.all(np.isnan(tot)):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for layer in dyn.layers:
            e, v = dyn.series(col, layer)
            ax.plot(e, v, linewidth=0.9, alpha=0.7, label=layer)
        if col != "latent_norm":
            e, v = dyn.series(col)
            ax.plot(e, v, color="black", linewidth=2.2, label="total")
        if logy and np.nanmax(tot) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if len(dyn.layers) <= 24:
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        p = out_dir / f"signs_{col}.png"
        with atomic_path(p) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        paths.append(p)
    return paths


def analyze_run(run_dir: str | Path, out_dir: str | Path | None = None, plot: bool = True) -> SignDynamics:
    """Analyse a run's sign snapshots; write ``sign_dynamics.csv`` and ``signs_*.png`` to
    ``out_dir`` (default ``RUN/analysis``) and return the table."""
    dyn = sign_dynamics(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    dyn.write_csv(out / "sign_dynamics.csv")
    if plot:
        _plot_dynamics(dyn, out)
    return dyn
