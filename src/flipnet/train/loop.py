"""The trainer: builds data, model, optimizer and schedules from a :class:`~flipnet.train.config.Config`,
trains, evaluates, logs, checkpoints and resumes.

One optimisation step is :func:`flipnet.train.fast.make_train_step` (eager, ``torch.compile`` or
CUDA graphs), so the plain loop and the GPU fast path share one code path. The loop itself never
reads a value back to the host per step: losses and correct counts are accumulated on the device
and read every ``train.nan_check_every`` steps and at the end of each epoch.

Example:
    >>> from flipnet.train import Trainer, load_config
    >>> trainer = Trainer(load_config("digits_bop", ["train.epochs=2"]))
    >>> metrics = trainer.fit()
    >>> metrics["test_acc"]
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flipnet.errors import CheckpointError, ConfigError, DataNotFoundError, FlipnetError, TrainingDiverged
from flipnet.utils import atomic_write_text, seed_everything

from .checkpoint import get_rng_state, load_checkpoint, resolve_checkpoint, save_checkpoint, set_rng_state
from .config import Config, config_to_dict, dump_config, load_config
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    init_distributed,
)

__all__ = [
    "Callback",
    "Trainer",
    "TrainingDiverged",
    "MetricsLogger",
    "evaluate",
    "load_run",
    "build_model",
    "recipe_model",
    "load_data",
    "resolve_device",
]

#: Param-group keys logged each epoch (per route) when present: learning rate, Bop's γ and τ,
#: CEMA's σ/α, momentum. Keys that have a schedule in the recipe are logged too.
HYPERPARAM_KEYS = ("lr", "gamma", "threshold", "tau", "sigma", "alpha", "beta", "momentum")


def hyperparameter_values(optimizer: Any, scheduled: Iterable[tuple[str | None, str]] = ()) -> dict[str, float]:
    """Current hyper-parameter values of ``optimizer``, keyed ``<route>/<key>`` (first group per route).

    A flip optimizer's route logs its declared hyper-parameters (Bop: γ and τ; CEMA: α, γ, ...),
    never the router's ``lr`` placeholder; other routes log the keys of :data:`HYPERPARAM_KEYS`
    they have; ``scheduled`` ``(route, key)`` pairs (route ``None``: every route) are always logged.
    """
    routes = getattr(optimizer, "optimizers", None)
    scheduled = set(scheduled)
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        route = g.get("route", "all")
        leaf = routes.get(route) if isinstance(routes, dict) else None
        declared = getattr(leaf, "hyperparameters", None)
        keys = set(declared) if declared else set(HYPERPARAM_KEYS)
        keys |= {k for r, k in scheduled if r in (None, route)}
        for k in sorted(keys):
            name = f"{route}/{k}"
            if k in g and name not in out:
                v = g[k]
                if isinstance(v, Tensor) and v.numel() == 1:
                    out[name] = float(v.item())
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[name] = float(v)
    return out


class Callback:
    """Hooks into :class:`Trainer`. Override the ones you need; each receives the trainer.

    The trainer attributes a callback may read: ``model`` (unwrapped), ``optimizer``,
    ``config``, ``run_dir``, ``epoch`` (epochs completed), ``step`` (optimizer steps taken),
    ``device``, ``is_main`` (rank 0: the process that may write files).
    """

    def on_train_start(self, trainer: Trainer) -> None:
        """Called once, after everything is built (and restored, when resuming)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """Called after every optimizer step. Keep it cheap: no host synchronisation."""

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """Called after each epoch's evaluation, before logging; keys added to ``metrics`` are logged."""

    def on_train_end(self, trainer: Trainer) -> None:
        """Called once when training stops: finished, interrupted (Ctrl-C) or diverged."""


# ---------------------------------------------------------------------------------------------
# building blocks shared with `flipnet eval` and `load_run`


def resolve_device(device: str, option: str = "train.device=") -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cuda*`` without CUDA → ConfigError.

    ``option`` names the setting in error messages (``"train.device="``, or ``"--device "`` for
    ``flipnet eval``).
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (device in ("cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"{option}{device} is not a device; use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{option}{device} but CUDA is not available here; use {option}cpu or {option}auto")
    return torch.device(device)


def _loader_options(name: str) -> set[str] | None:
    """Keyword options the data set's reader takes (``None`` for an unknown data set)."""
    from flipnet.data import dataset_options

    try:
        return set(dataset_options(name))
    except ConfigError:  # unknown name: load_dataset reports it with the list of names
        return None


def load_data(config: Config) -> Any:
    """Load ``config.data`` with :func:`flipnet.data.load_dataset` and apply ``subset``/``test_subset``.

    Readers that take ``subset``/``test_subset`` themselves get them (CIFAR-10 then decodes only
    those images); for the others the loaded bundle is cut.
    """
    from flipnet.data import load_dataset

    d = config.data
    options = dict(d.options)
    accepted = _loader_options(d.name) or set()
    for key in ("subset", "test_subset"):
        value = getattr(d, key)
        if value is not None and key in accepted:
            if key in options and options[key] != value:
                raise ConfigError(f"data.{key}={value} and data.options.{key}={options[key]} disagree; set only data.{key}")
            options[key] = value
    try:
        bundle = load_dataset(d.name, root=d.root, **options)
    except DataNotFoundError as e:
        # The reader speaks Python (root=..., download=True); say it in recipe terms too.
        raise DataNotFoundError(
            f"{e} In a recipe or override these are data.root=DIR and data.options.download=true "
            "(flipnet eval: --data.root DIR)."
        ) from None
    if d.subset is not None or d.test_subset is not None:
        bundle = bundle.subset(d.subset, d.test_subset)
    return bundle


def build_model(config: Config, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """``flipnet.models.create_model(config.model.name, num_classes=..., in_channels=..., **kwargs)``.

    The data set fixes ``num_classes`` and ``in_channels``; a model with an ``input_size`` option
    (``binary_mlp``, ``binarynet``, ``unet``) gets the data's height and width unless
    ``model.kwargs`` sets it.
    """
    from flipnet.models import create_model, model_options

    kwargs = dict(config.model.kwargs)
    for fixed in ("num_classes", "in_channels"):
        if fixed in kwargs:
            raise ConfigError(f"model.kwargs.{fixed} is set by the data set ({config.data.name}); remove it from the recipe")
    kwargs["num_classes"] = int(num_classes)
    kwargs["in_channels"] = int(input_shape[0])
    if "input_size" in model_options(config.model.name) and "input_size" not in kwargs:
        h, w = int(input_shape[1]), int(input_shape[2])
        kwargs["input_size"] = h if h == w else [h, w]
    return create_model(config.model.name, **kwargs)


def recipe_model(config: Config) -> nn.Module:
    """The model ``config`` trains, built without loading its data set (e.g. for ``flipnet summary``).

    The image shape and class count come from :func:`flipnet.data.dataset_shape`; the model is
    the one :class:`Trainer` builds, freshly initialised (``model.init_from`` is not applied).

    Raises:
        ConfigError: the data set does not declare its shape without being loaded.
    """
    from flipnet.data import dataset_shape

    shape = dataset_shape(config.data.name, **config.data.options)
    if shape is None:
        raise ConfigError(f"data set {config.data.name!r} does not say its image shape without being loaded")
    input_shape, num_classes = shape
    return build_model(config, num_classes, input_shape)


def _amp_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if amp else None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    max_samples: int | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader`` (summed over DDP ranks).

    Args:
        max_samples: use only the first ``max_samples`` samples this rank's loader yields. Under
            DDP a loader pads the last batches by wrapping around so that every rank gets as many
            samples; with each rank's true share here, every test sample counts exactly once.

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
            with _autocast(device, amp_dtype):
                out = model(x)
                loss = F.cross_entropy(out.float(), y, reduction="sum")
            if y.dim() > 1:  # dense targets: mean loss per pixel, times the number of images
                loss = loss / (y.numel() / y.shape[0])
            sums[0] += loss.double()
            sums[1] += (out.argmax(dim=1) == y).sum()
            sums[2] += y.numel()
            n_samples += y.shape[0]
    finally:
        model.train(was_training)
    counts = torch.tensor([float(n_samples)], device=device, dtype=torch.float64)
    both = all_reduce_sum(torch.cat([sums, counts]))
    loss_sum, correct, targets, samples = both.tolist()
    if samples == 0:
        raise ConfigError("the test set is empty; check data.test_subset")
    return {"loss": loss_sum / samples, "acc": correct / targets, "n": int(samples)}


def _make_loader(bundle: Any, split: str, batch_size: int, *, train: bool, device: torch.device,
                 augment: bool, seed: int, dist_info: DistInfo) -> Any:
    from flipnet.data import make_loader

    return make_loader(
        bundle, split, batch_size, train=train, device=device, augment=augment, seed=seed,
        rank=dist_info.rank, world_size=dist_info.world_size,
    )


# ---------------------------------------------------------------------------------------------
# metrics files


class MetricsLogger:
    """Per-epoch rows to ``metrics.jsonl`` (appended, flushed and fsynced per row) and
    ``metrics.csv`` (rewritten atomically each epoch; per-layer flip ratios only in the JSONL)."""

    def __init__(self, run_dir: Path, keep_until_epoch: int | None = None) -> None:
        self.run_dir = run_dir
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if keep_until_epoch is not None and self.jsonl.is_file():
            from .plots import read_metrics

            self.rows = [r for r in read_metrics(run_dir) if r["epoch"] <= keep_until_epoch]
            atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
            self._write_csv()
        elif keep_until_epoch is None:
            atomic_write_text(self.jsonl, "")

    def append(self, row: dict[str, Any]) -> None:
        """Add one epoch's row to both files."""
        self.rows.append(row)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._write_csv()

    def _write_csv(self) -> None:
        columns: list[str] = []
        for r in self.rows:
            for k in r:
                if not k.startswith("flip_ratio/") and k not in columns:
                    columns.append(k)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
        atomic_write_text(self.csv, buf.getvalue())


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Train a model as a recipe describes.

    Args:
        config: the validated recipe (:func:`~flipnet.train.config.load_config`).
        callbacks: :class:`Callback` objects (``train.track_signs`` adds a ``SignTracker``).
        resume: a run folder (or its ``checkpoints/last.pt``) to continue from; the run folder is
            reused and training ends with exactly the weights of an uninterrupted run.

    ``__init__`` builds everything (data, model, optimizer, schedules, run folder); :meth:`fit`
    trains. Under ``torchrun`` the trainer joins the process group and wraps the model in
    :class:`~torch.nn.parallel.DistributedDataParallel`; only rank 0 writes files and prints.
    """

    def __init__(
        self,
        config: Config,
        callbacks: Sequence[Callback] = (),
        *,
        resume: str | os.PathLike | None = None,
    ) -> None:
        if not isinstance(config, Config):
            raise TypeError(f"config must be a flipnet.train.Config (see load_config), got {type(config).__name__}")
        self.config = config
        self.callbacks: list[Callback] = list(callbacks)
        t = config.train

        # -- process group and device
        self.dist, dist_device = init_distributed(t.device)
        self.is_main = self.dist.is_main
        self.device = dist_device if dist_device is not None else resolve_device(t.device)
        self.amp_dtype = _amp_dtype(t.amp, self.device)
        self.compile = (self.device.type == "cuda") if t.compile == "auto" else bool(t.compile)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.batch_in_epoch = 0
        self.best = -math.inf
        self._partial: dict[str, Any] | None = None

        # -- resume: read the checkpoint first (it fixes the run folder)
        ckpt: dict[str, Any] | None = None
        if resume is not None:
            ckpt_path = resolve_checkpoint(resume, "last")
            ckpt = load_checkpoint(ckpt_path, map_location=self.device)
            if Path(resume).is_dir():
                self.run_dir = Path(resume)
            else:  # RUN/checkpoints/last.pt
                self.run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
        seed_everything(config.seed)

        # -- data
        self.data = load_data(config)
        if self.data.task != "classification" and self.is_main:
            warnings.warn("segmentation data: accuracy is pixel accuracy", stacklevel=2)
        self.test_loader = _make_loader(
            self.data, "test", config.data.eval_batch_size, train=False, device=self.device,
            augment=False, seed=config.seed, dist_info=self.dist,
        )
        self._train_loader: Any = None

        # -- model
        model = build_model(config, self.data.num_classes, self.data.input_shape)
        if config.model.init_from and ckpt is None:
            _load_init_weights(model, config.model.init_from)
        from flipnet.train.fast import prepare_model

        channels_last = "auto" if t.channels_last == "auto" else bool(t.channels_last)
        self.model: nn.Module = prepare_model(model, self.device, channels_last)

        # -- optimizer and schedules
        from flipnet.optim import create_optimizer

        o = config.optim
        try:
            self.optimizer = create_optimizer(
                self.model, binary=o.binary, binary_kwargs=dict(o.binary_kwargs), real=o.real,
                real_kwargs=dict(o.real_kwargs), weight_clip=o.weight_clip,
            )
        except ValueError as e:  # unknown optimizer, bad kwargs, latent/flip mismatch (see create_optimizer)
            if isinstance(e, FlipnetError):
                raise
            raise ConfigError(f"optim: {e}") from None
        self.steps_per_epoch = self._count_train_batches()
        self.schedulers = self._build_schedulers()

        # -- DDP and the step function
        self.ddp_model: nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DDP(self.model, device_ids=ids)
        from flipnet.train.fast import make_train_step

        self.train_step = make_train_step(
            self.ddp_model, self.optimizer, F.cross_entropy, amp_dtype=self.amp_dtype,
            cuda_graphs=t.cuda_graphs, compile=self.compile, grad_clip=t.grad_clip,
        )
        from flipnet.metrics import FlipRatio

        try:
            self.flip_ratio: FlipRatio | None = FlipRatio(self.model, self.optimizer)
        except ValueError:  # no trained binary weights (optim.binary: none, or a float model)
            self.flip_ratio = None

        # -- restore
        if ckpt is not None:
            self._restore(ckpt)

        # -- run folder, logs
        if resume is None:
            self.run_dir = self._new_run_dir()
        self.run_dir = Path(self.run_dir)
        self.logger: MetricsLogger | None = None
        self.tb: Any = None
        if self.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.run_dir / "config.yaml", dump_config(config))
            except OSError as e:
                raise ConfigError(
                    f"cannot write the run folder {self.run_dir} ({e.strerror or e}); "
                    "set output.dir (or --out) to a writable folder"
                ) from None
            self.logger = MetricsLogger(self.run_dir, keep_until_epoch=self.epoch if ckpt is not None else None)
            self.tb = self._open_tensorboard()
        if t.track_signs:
            try:
                from flipnet.analysis.flips import SignTracker
            except ModuleNotFoundError as e:
                if e.name not in ("flipnet.analysis.flips", "flipnet.analysis"):
                    raise
                raise ConfigError("train.track_signs needs flipnet.analysis.flips, which is not installed") from None
            self.callbacks.append(SignTracker())

    # ----------------------------------------------------------------- building helpers
    def _new_run_dir(self) -> Path:
        out = self.config.output
        if out.name:
            run_dir = Path(out.dir) / out.name
            # Rank 0 alone checks: under DDP it may already have created this run's files.
            exists = (run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists()
            if self.is_main and exists:
                raise ConfigError(
                    f"run folder {run_dir} already holds a run; continue it with `flipnet train --resume {run_dir}` "
                    "or choose another output.name"
                )
            return run_dir
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(out.dir) / f"{self.config.name}-{stamp}"
        run_dir, i = base, 1
        while run_dir.exists():
            run_dir = base.with_name(f"{base.name}-{i}")
            i += 1
        if self.dist.enabled:  # every rank must use rank 0's folder name
            import torch.distributed as dist

            box = [str(run_dir)]
            dist.broadcast_object_list(box, src=0)
            run_dir = Path(box[0])
        return run_dir

    def _loader_for_epoch(self, epoch: int) -> Any:
        """The training loader positioned at ``epoch`` (its shuffle and augmentation seeded by it)."""
        if self._train_loader is None:
            self._train_loader = _make_loader(
                self.data, "train", self.config.data.batch_size, train=True, device=self.device,
                augment=self.config.data.augment, seed=self.config.seed, dist_info=self.dist,
            )
        loader = self._train_loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        return loader

    def _count_train_batches(self) -> int:
        loader = self._loader_for_epoch(0)
        try:
            return len(loader)
        except TypeError:
            raise ConfigError("the training loader has no length; flipnet needs a sized loader") from None

    def _build_schedulers(self) -> list[Any]:
        """``optim.schedules`` → :class:`flipnet.optim.schedules.HyperparamScheduler` objects."""
        from flipnet.optim.schedules import scheduler_from_dict

        out = []
        for i, s in enumerate(self.config.optim.schedules):
            spec = {"key": s.key, "type": s.type, "route": s.route, "unit": s.unit, **s.params}
            try:
                out.append(scheduler_from_dict(self.optimizer, spec, epochs=self.config.train.epochs,
                                               steps_per_epoch=self.steps_per_epoch))
            except (FlipnetError, ValueError) as e:
                raise ConfigError(f"optim.schedules[{i}]: {e}") from None
        return out

    def _open_tensorboard(self) -> Any:
        mode = self.config.train.tensorboard
        if mode is False:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if mode is True:
                raise ConfigError("train.tensorboard=true but tensorboard is not installed; pip install tensorboard") from None
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=self.epoch + 1 if self.epoch else None)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, schedules, counters, RNG."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedulers": [s.state_dict() for s in self.schedulers],
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": get_rng_state(),
            "config": config_to_dict(self.config),
            "best": self.best,
            "meta": {
                "num_classes": int(self.data.num_classes),
                "input_shape": [int(v) for v in self.data.input_shape],
                "task": str(self.data.task),
                "world_size": self.dist.world_size,
            },
        }
        if self._partial is not None:
            state["partial"] = self._partial
        return state

    def _restore(self, ckpt: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            saved = ckpt.get("schedulers", [])
            if len(saved) != len(self.schedulers):
                raise CheckpointError(
                    f"the checkpoint has {len(saved)} schedules but the recipe {len(self.schedulers)}; "
                    "resume with the run's own optim.schedules"
                )
            for s, sd in zip(self.schedulers, saved):
                s.load_state_dict(sd)
        except (RuntimeError, KeyError, ValueError) as e:
            if isinstance(e, FlipnetError):
                raise
            raise CheckpointError(f"the checkpoint does not fit this run's model/optimizer: {str(e).splitlines()[0]}") from None
        self.epoch = int(ckpt["epoch"])
        self.step = int(ckpt["step"])
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        self.best = float(ckpt.get("best", -math.inf))
        self._partial = ckpt.get("partial") if self.batch_in_epoch else None
        if "rng" in ckpt:
            # Written by rank 0; every rank starts from the same seed, so the states agree anyway.
            set_rng_state(ckpt["rng"])
        saved_world = (ckpt.get("meta") or {}).get("world_size", 1)
        if saved_world != self.dist.world_size and self.is_main:
            warnings.warn(
                f"resuming a run trained with {saved_world} process(es) on {self.dist.world_size}: the data "
                "shards differ, so the result will not equal an uninterrupted run", stacklevel=3,
            )

    def _save(self, name: str, state: dict[str, Any] | None = None) -> None:
        if self.is_main:
            save_checkpoint(self.run_dir / "checkpoints" / f"{name}.pt", state if state is not None else self.state_dict())

    # ----------------------------------------------------------------- logging helpers
    def _print(self, msg: str) -> None:
        if self.is_main:
            if self._bar is not None:
                from tqdm import tqdm

                tqdm.write(msg, file=sys.stderr)
            else:
                print(msg, flush=True)

    def _progress_enabled(self) -> bool:
        p = self.config.train.progress
        if not self.is_main:
            return False
        if p == "auto":
            return sys.stderr.isatty()
        return bool(p)

    def hyperparameters(self) -> dict[str, float]:
        """Current values of the logged hyper-parameters, keyed ``<route>/<key>`` (first group per route).

        See :func:`hyperparameter_values`.
        """
        return hyperparameter_values(self.optimizer, ((s.route, s.key) for s in self.config.optim.schedules))

    # ----------------------------------------------------------------- training
    _bar: Any = None
    _stop_requested: bool = False  # Ctrl-C seen by this process
    _stop_shared: bool = False  # Ctrl-C seen by some rank, agreed at a loss check (DDP)
    _in_step: bool = False

    def _check_finite(self, loss_sum: Tensor, where: str) -> bool:
        """Raise :class:`TrainingDiverged` when any rank's running loss is NaN/inf.

        Also shares the Ctrl-C request between ranks (one all-reduce for both), so that under DDP
        every rank stops after the same step. Returns True when some rank asked to stop.
        """
        flags = torch.stack([(~torch.isfinite(loss_sum)).to(torch.float32).reshape(()),
                             torch.tensor(float(self._stop_requested), device=loss_sum.device)])
        bad, stop = all_reduce_sum(flags).tolist()
        if bad > 0:
            raise TrainingDiverged(
                f"the training loss became NaN/inf {where}; stopped. The last good checkpoint "
                f"({self.run_dir / 'checkpoints' / 'last.pt'}, epoch {self.epoch}) was kept. "
                "Lower the learning rate / Bop gamma or set train.grad_clip"
            )
        return stop > 0

    def fit(self) -> dict[str, Any]:
        """Train for ``train.epochs`` epochs (from where a resumed run stopped).

        Returns:
            The last epoch's metrics row (what was logged).

        Raises:
            TrainingDiverged: the loss became NaN/inf (the last good checkpoint is kept).
            KeyboardInterrupt: after saving ``checkpoints/last.pt`` (resume with
                ``flipnet train --resume RUN``).
        """
        t = self.config.train
        last_row: dict[str, Any] = self.logger.rows[-1] if self.logger and self.logger.rows else {}
        for cb in self.callbacks:
            cb.on_train_start(self)
        if self.epoch >= t.epochs:
            self._print(f"{self.run_dir}: already trained for {self.epoch} epochs (train.epochs={t.epochs}); nothing to do")
        self._stop_requested = self._stop_shared = False
        self._in_step = False
        previous_handler = self._install_sigint_handler()
        if self.epoch < t.epochs:
            self._print(self._start_line())
        started = time.perf_counter()
        first_epoch = self.epoch
        ended = False
        try:
            while self.epoch < t.epochs:
                last_row = self._train_epoch()
                if self._stop_shared if self.dist.enabled else self._stop_requested:
                    raise KeyboardInterrupt
            ended = True
            if self.epoch > first_epoch:
                best = f"best test accuracy {self.best:.4f}; " if math.isfinite(self.best) else ""
                self._print(
                    f"done: {self.epoch - first_epoch} epochs in {time.perf_counter() - started:.1f} s; "
                    f"{best}run folder {self.run_dir}"
                )
        except KeyboardInterrupt:
            self._close_bar()
            consistent = not self._in_step and (
                self._partial is None or math.isfinite(float(self._partial["sums"][0]))
            )
            where = f"in epoch {self.epoch + 1} after step {self.step}" if self.batch_in_epoch else f"after epoch {self.epoch}"
            if consistent:
                self._save("last")
                self._print(
                    f"interrupted {where}; saved {self.run_dir / 'checkpoints' / 'last.pt'}. "
                    f"Continue with: flipnet train --resume {self.run_dir}"
                )
            else:
                self._print(
                    f"interrupted inside a step; kept the last checkpoint (end of epoch {self.epoch}). "
                    f"Continue with: flipnet train --resume {self.run_dir}"
                )
            raise
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            self._close_bar()
            for cb in self.callbacks:
                cb.on_train_end(self)
            self._finish_files()
            # Under DDP, let no rank run ahead (to exit and tear down its process group, which
            # makes torchrun stop the others) while rank 0 still writes the final files or the
            # interrupted run's checkpoint. Only where every rank is known to get here: a normal
            # end, or a stop all ranks agreed on; after an error torchrun stops the others.
            if ended or (self.dist.enabled and self._stop_shared):
                barrier()
        return last_row

    def _start_line(self) -> str:
        o, d = self.config.optim, self.data
        where = f"{self.device}" + (f" x {self.dist.world_size} processes" if self.dist.enabled else "")
        resumed = f", resuming after epoch {self.epoch}" + (f" step {self.step}" if self.batch_in_epoch else "") if self.epoch or self.step else ""
        return (
            f"training {self.config.model.name} on {self.config.data.name} ({len(d.train_y)} train / {len(d.test_y)} test, "
            f"{self.steps_per_epoch} steps per epoch) with binary={o.binary} real={o.real} on {where}{resumed}; "
            f"run folder {self.run_dir}"
        )

    def _install_sigint_handler(self) -> Any:
        """Defer Ctrl-C to the end of the current step so the saved state is consistent.

        The first Ctrl-C asks the loop to stop after the running step; a second one stops at once
        (then the last end-of-epoch checkpoint is kept). Only in the main thread.
        """
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            if self.is_main:
                print("\nstopping after this step (press Ctrl-C again to stop at once) ...", file=sys.stderr, flush=True)

        try:
            return signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main interpreter
            return None

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _finish_files(self) -> None:
        if not self.is_main:
            return
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.config.train.plots and self.logger is not None and self.logger.rows:
            from .plots import plot_runs

            try:
                plot_runs([self.run_dir], self.run_dir / "plots")
            except (OSError, ValueError, RuntimeError) as e:  # never lose a run over a plot
                warnings.warn(f"could not draw the plots of {self.run_dir}: {e}", stacklevel=2)

    def _train_epoch(self) -> dict[str, Any]:
        t = self.config.train
        epoch = self.epoch  # 0-based index of the epoch being trained
        started = time.perf_counter()
        self.ddp_model.train()
        loader = self._loader_for_epoch(epoch)
        skip = self.batch_in_epoch
        sums = torch.zeros(2, device=self.device, dtype=torch.float32)  # loss sum, correct
        n_samples = n_targets = 0
        if skip and self._partial is not None:
            # The partial sums were saved by rank 0 alone: under DDP only rank 0 adds them, so the
            # interrupted epoch's training metrics miss the other ranks' batches before the stop.
            if self.is_main:
                sums += self._partial["sums"].to(self.device, torch.float32)
                n_samples, n_targets = int(self._partial["n_samples"]), int(self._partial["n_targets"])
        if not skip and self.flip_ratio is not None:
            self.flip_ratio.reset()
        if self._progress_enabled():
            from tqdm import tqdm

            self._bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{t.epochs}",
                             leave=False, dynamic_ncols=True, file=sys.stderr)
        step_scheds = [s for s in self.schedulers if getattr(s, "unit", "step") == "step"]
        check_every = t.nan_check_every
        for i, (x, y) in enumerate(loader):
            if i < skip:
                continue
            self._in_step = True
            loss_sum, correct = self.train_step(x, y)
            sums[0] += loss_sum
            sums[1] += correct
            n_samples += int(y.shape[0])
            n_targets += int(y.numel())
            self.step += 1
            self.batch_in_epoch = i + 1
            self._partial = {"sums": sums, "n_samples": n_samples, "n_targets": n_targets}
            self._in_step = False
            for s in step_scheds:
                s.step()
            for cb in self.callbacks:
                cb.on_step_end(self)
            if check_every and self.step % check_every == 0:
                if self._check_finite(sums[0], f"in epoch {epoch + 1} (between steps {self.step - check_every + 1} and {self.step})"):
                    self._stop_shared = True
                    raise KeyboardInterrupt
                if self._bar is not None:
                    self._bar.set_postfix(loss=f"{sums[0].item() / max(n_samples, 1):.4f}")
            if self._bar is not None:
                self._bar.update(1)
            if self._stop_requested and not self.dist.enabled:
                # Under DDP the request is shared at the next loss check, so all ranks stop together.
                raise KeyboardInterrupt
        if self._check_finite(sums[0], f"in epoch {epoch + 1} (by step {self.step})"):
            self._stop_shared = True  # every rank finishes this epoch, then stops
        self._close_bar()

        totals = all_reduce_sum(torch.cat([sums.double(), torch.tensor([n_samples, n_targets], device=self.device, dtype=torch.float64)]))
        loss_total, correct_total, samples, targets = totals.tolist()
        hparams = self.hyperparameters()  # the values used during this epoch
        for s in self.schedulers:
            if getattr(s, "unit", "step") == "epoch":
                s.step()
        flips = self.flip_ratio.compute() if self.flip_ratio is not None else {}
        self.epoch += 1
        self.batch_in_epoch = 0
        self._partial = None

        row: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.step,
            "train_loss": loss_total / max(samples, 1),
            "train_acc": correct_total / max(targets, 1),
            "test_loss": None,
            "test_acc": None,
        }
        if self.epoch % t.eval_every == 0 or self.epoch == t.epochs:
            broadcast_buffers(self.model)
            ev = self.evaluate()
            row["test_loss"], row["test_acc"] = ev["loss"], ev["acc"]
        row.update(hparams)
        if flips:
            row["flip_ratio"] = float(flips.get("total", float("nan")))
            for name, v in flips.items():
                if name != "total":
                    row[f"flip_ratio/{name}"] = float(v)
        for cb in self.callbacks:
            cb.on_epoch_end(self, row)
        row["time_s"] = time.perf_counter() - started

        # files: the row first, then the checkpoint. A crash in between leaves a checkpoint one
        # epoch behind the logs; a resume re-trains that epoch and drops the newer row.
        state = self.state_dict()
        improved = row["test_acc"] is not None and row["test_acc"] > self.best
        if improved:
            self.best = state["best"] = row["test_acc"]
        row["best_test_acc"] = None if not math.isfinite(self.best) else self.best
        if self.is_main:
            assert self.logger is not None
            self.logger.append(row)
            if self.tb is not None:
                for k, v in row.items():
                    if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.tb.add_scalar(k, v, self.epoch)
                self.tb.flush()
        if improved:
            self._save("best", state)
        self._save("last", state)
        self._print(self._epoch_line(row))
        return row

    def _epoch_line(self, row: dict[str, Any]) -> str:
        parts = [f"epoch {row['epoch']}/{self.config.train.epochs}",
                 f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"]
        if row.get("test_acc") is not None:
            parts.append(f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}")
        if "flip_ratio" in row:
            parts.append(f"flips {row['flip_ratio']:.3g}")
        hp = [f"{k}={_fmt(v)}" for k, v in row.items() if "/" in k and not k.startswith("flip_ratio/")]
        if hp:
            parts.append(" ".join(hp))
        parts.append(f"{row['time_s']:.1f}s")
        return " | ".join(parts)

    def evaluate(self) -> dict[str, float]:
        """Test-set loss and accuracy of the current model (``{"loss", "acc", "n"}``)."""
        n_test = len(self.data.test_y)
        share = len(range(self.dist.rank, n_test, self.dist.world_size))
        return evaluate(self.model, self.test_loader, self.device, self.amp_dtype, max_samples=share)


# ---------------------------------------------------------------------------------------------
# loading runs


def _load_init_weights(model: nn.Module, source: str) -> None:
    """``model.init_from``: copy the model weights of a run folder (best, else last) or checkpoint."""
    try:
        path = resolve_checkpoint(source, "best")
    except CheckpointError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    from flipnet.layers import binary_modules

    state = load_checkpoint(path)["model"]
    modes = {name: m.weight_mode for name, m in binary_modules(model)}
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(
            f"model.init_from={source}: its weights do not fit the model the recipe builds "
            f"({str(e).splitlines()[0]}); use the same model.name and model.kwargs"
        ) from None
    # Weights only: the layers keep the weight mode this recipe builds (a Bop run's ±1 weights
    # become latent weights for Adam; latent weights are binarised by a flip optimizer).
    for name, m in binary_modules(model):
        if m.weight_mode != modes[name]:
            m.set_weight_mode(modes[name])


def load_run(
    run_dir: str | os.PathLike, checkpoint: str = "best", map_location: str | torch.device = "cpu"
) -> tuple[Config, nn.Module]:
    """Load a trained model: ``(config, model)`` with the weights of ``best`` or ``last``.

    Args:
        run_dir: a run folder written by the trainer, or a checkpoint file.
        checkpoint: ``"best"`` (highest test accuracy; falls back to ``last`` when no evaluation
            happened) or ``"last"``.

    Returns:
        The run's config and the model (in eval mode on ``map_location``).

    Raises:
        CheckpointError: no such run, or a corrupt checkpoint.
    """
    path = resolve_checkpoint(run_dir, checkpoint)
    return model_from_checkpoint(load_checkpoint(path, map_location=map_location), path, run_dir, map_location)


def model_from_checkpoint(
    ckpt: dict, path: str | os.PathLike, run_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[Config, nn.Module]:
    """``(config, model)`` from an already loaded checkpoint ``ckpt`` read from ``path`` (see :func:`load_run`)."""
    raw = ckpt.get("config")
    cfg_file = Path(run_dir) / "config.yaml"
    if raw is None and cfg_file.is_file():
        config = load_config(cfg_file)
    elif isinstance(raw, dict):
        config = load_config(raw)
    else:
        raise CheckpointError(f"{path} holds no config; it was not written by flipnet train")
    meta = ckpt.get("meta") or {}
    if "num_classes" not in meta or "input_shape" not in meta:
        raise CheckpointError(f"{path} lacks the model metadata (num_classes, input_shape); it was not written by flipnet train")
    model = build_model(config, int(meta["num_classes"]), [int(v) for v in meta["input_shape"]])
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: weights do not fit model {config.model.name!r} ({str(e).splitlines()[0]})") from None
    model.to(map_location).eval()
    return config, model
