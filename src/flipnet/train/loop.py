"""The trainer: one loop over S >= 1 *members*, each a complete run.

A member (:class:`Member`) is one run: its recipe, model, optimizer, schedules, logs, best epoch and
run folder. With one member the step is the model's own (:func:`flipnet.train.fast.make_train_step`,
under DDP when launched by ``torchrun``); with several (``seeds=[0, 1, 2]``, sweeps) the members are
trained as one wide network (:class:`flipnet.train.ensemble.SeedEnsemble`), and everything else --
callbacks, resume, progress, divergence checks, plots, Ctrl-C -- is the same code.

Assembly lives in :mod:`flipnet.train.build`; this module runs the loop. Per epoch::

    for each batch:  step (forward, backward, optimizer); step schedules; callbacks
                     every train.nan_check_every steps: one divergence check (one host sync)
    end of epoch:    divergence check; epoch schedules; evaluate (validation, test);
                     per member: callbacks, choose best on validation, log, checkpoint

Nothing is read back to the host per step: losses and correct counts are summed on the device.

Example:
    >>> from flipnet.train import Trainer, load_config
    >>> trainer = Trainer.from_config(load_config("digits_bop", ["train.epochs=2"]))
    >>> metrics = trainer.fit()
    >>> metrics["test_acc"]
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flipnet.errors import CheckpointError, ConfigError, FlipnetError, TrainingDiverged
from flipnet.metrics import FlipRatio
from flipnet.utils import atomic_write_text, seed_everything

from . import build
from .callbacks import Callback, MetricsLogger, ProgressBar, StopSignals, Stopped, TensorBoardLogger
from .checkpoint import get_rng_state, save_checkpoint, set_rng_state
from .config import Config, config_to_dict, dump_config
from .distributed import all_reduce_sum, barrier, broadcast_buffers, init_distributed
from .divergence import first_non_finite, watched_tensors
from .ensemble import SeedEnsemble, SeedOptimizer, ensemble_loss, ensemble_metrics, evaluate_ensemble
from .evaluation import evaluate
from .fast import make_train_step, prepare_model
from .report import epoch_line, final_line, finish_files, hyperparameter_values, results, start_line

__all__ = ["Trainer", "Member"]

class _StopRequested(Exception):
    """Internal: Ctrl-C / SIGTERM (or a rank's request under DDP) asks the loop to stop after a step."""


@dataclass(eq=False)
class Member:
    """One run trained by a :class:`Trainer`: what a separate ``flipnet train`` would own.

    ``best``/``best_epoch``: the best validation accuracy and its epoch (without a validation
    split, ``best.pt`` follows the last evaluated epoch and ``best`` stays ``-inf``);
    ``test_at_best``: the test accuracy at ``best_epoch``; ``last_row``: the last logged row.
    """

    config: Config
    model: nn.Module
    optimizer: Any
    schedulers: list[Any] | None = None
    label: str = "run"
    run_dir: Path | None = None
    flip_ratio: FlipRatio | None = None
    logger: MetricsLogger | None = None
    tb: TensorBoardLogger | None = None
    best: float = -math.inf
    best_epoch: int = 0
    test_at_best: float | None = None
    last_row: dict[str, Any] = field(default_factory=dict)
    time_s: float = 0.0


def _expand_seeds(config: Config) -> list[Config]:
    seeds = config.seeds if config.seeds is not None and len(config.seeds) > 1 else None
    if seeds is None:
        if config.seeds:
            config = copy.deepcopy(config)
            config.seed, config.seeds = int(config.seeds[0]), None
        return [config]
    out = []
    for sd in seeds:
        c = copy.deepcopy(config)
        c.seed, c.seeds = int(sd), None
        out.append(c)
    return out


class Trainer:
    """Train S >= 1 runs (members) with one loop; see the module docs.

    Two ways to build one:

    * ``Trainer.from_config(config, callbacks, resume=RUN, force=False)`` -- or equivalently
      ``Trainer(config, callbacks=..., resume=...)`` -- builds data, model(s), optimizer(s) and
      schedules from a recipe (:mod:`flipnet.train.build`); ``seeds=[...]`` gives one member per seed.
    * ``Trainer(model, optimizer, data, config=None, schedulers=None, callbacks=(), run_dir=None,
      loss_fn=None)`` trains parts you built: ``data`` is a :class:`flipnet.data.DatasetBundle`,
      ``config`` supplies the loop settings (``train.*``, ``data.batch_size``, ``seed``, ``output``;
      default :class:`Config`'s), ``loss_fn(output, target)`` replaces cross-entropy (the hook for an
      extra loss term, e.g. distillation from a teacher the loss function holds).

    Args:
        resume: a run folder (or its ``checkpoints/last.pt``), or a multi-seed group folder, to
            continue from; training ends with exactly the weights of an uninterrupted run.
        force: resume even though the recipe changes keys that alter the training trajectory
            (see :func:`flipnet.train.config.trajectory_changes`); the schedules keep their
            original horizon, so extra epochs run at the schedules' final values.

    Under ``torchrun`` the trainer joins the process group and wraps the model in
    :class:`~torch.nn.parallel.DistributedDataParallel`; only rank 0 writes files and prints.
    """

    def __init__(self, model: nn.Module | Config, optimizer: Any = None, data: Any = None, *,
                 config: Config | None = None, schedulers: Sequence[Any] | None = None,
                 callbacks: Sequence[Callback] = (), run_dir: str | os.PathLike | None = None,
                 resume: str | os.PathLike | None = None, force: bool = False,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        if isinstance(model, Config):
            if optimizer is not None or data is not None:
                raise TypeError("Trainer(config) builds its own model, optimizer and data; give a Config or (model, optimizer, data)")
            self._from_configs(_expand_seeds(model), callbacks, resume=resume, force=force, group_config=model)
            return
        if not isinstance(model, nn.Module) or optimizer is None or data is None:
            raise TypeError(
                f"Trainer takes (model, optimizer, data) or a recipe Config from flipnet.train.load_config, got {type(model).__name__}"
            )
        config = config if config is not None else Config()
        self._group = None
        self.dist, dist_device = init_distributed(config.train.device)
        device = dist_device or build.resolve_device(config.train.device)
        member = Member(config, prepare_model(model, device, config.train.channels_last), optimizer,
                        None if schedulers is None else list(schedulers))
        self._setup([member], data, device, callbacks, run_dirs=[Path(run_dir)] if run_dir else None, loss_fn=loss_fn)

    @classmethod
    def from_config(cls, config: Config, callbacks: Sequence[Callback] = (), *,
                    resume: str | os.PathLike | None = None, force: bool = False) -> Trainer:
        """Build a trainer from a recipe (one member per seed of ``config.seeds``)."""
        if not isinstance(config, Config):
            raise TypeError(f"config must be a flipnet.train.Config (see load_config), got {type(config).__name__}")
        return cls(config, callbacks=callbacks, resume=resume, force=force)

    @classmethod
    def from_configs(cls, configs: Sequence[Config], labels: Sequence[str], callbacks: Sequence[Callback] = (), *,
                     group_dir: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
                     force: bool = False, group_config: Config | None = None) -> Trainer:
        """Members from several recipes that differ only in seed and optimizer hyperparameters (sweeps).

        ``group_config`` is written to ``GROUP/config.yaml`` (default: the first recipe)."""
        self = cls.__new__(cls)
        self._from_configs(list(configs), callbacks, labels=list(labels), group_dir=group_dir, resume=resume, force=force,
                           group_config=group_config or configs[0])
        return self

    # ----------------------------------------------------------------- assembly
    def _from_configs(self, configs: list[Config], callbacks: Sequence[Callback], *, labels: list[str] | None = None,
                      group_dir: Any = None, resume: Any = None, force: bool = False, group_config: Config | None = None) -> None:
        base, multi = configs[0], len(configs) > 1
        self.dist, dist_device = init_distributed(base.train.device)
        if multi and self.dist.enabled:
            raise ConfigError("several seeds (seeds=[...]) cannot be combined with torchrun; train one seed per launch")
        device = dist_device or build.resolve_device(base.train.device)
        labels = labels or ([f"seed_{c.seed}" for c in configs] if multi else ["run"])
        run_dirs, ckpts, changes, self._note = build.read_resume(configs, labels, resume, force) if resume is not None else (None, None, [], None)
        seed_everything(base.seed)
        data = build.build_data(base)
        models, ensemble = build.build_models(configs, data, device, init_weights=ckpts is None)
        members = [Member(c, m, build.build_optimizer(c, m), label=lb) for c, m, lb in zip(configs, models, labels)]
        self._group = (Path(group_dir) if group_dir else (run_dirs[0].parent if run_dirs else None), group_config) if multi else None
        if base.train.track_signs and not any(getattr(cb, "tracks_signs", False) for cb in callbacks):
            raise ConfigError("train.track_signs=true needs a flipnet.analysis.flips.SignTracker in callbacks "
                              "(flipnet train adds it); pass callbacks=[SignTracker()]")
        from .distill import loss_from_config

        self._setup(members, data, device, callbacks, run_dirs=run_dirs, ckpts=ckpts, ensemble=ensemble,
                    loss_fn=loss_from_config(base, data, device), force=force)

    def _setup(self, members: list[Member], data: Any, device: torch.device, callbacks: Sequence[Callback], *,
               run_dirs: list[Path] | None = None, ckpts: list[dict] | None = None, ensemble: SeedEnsemble | None = None,
               loss_fn: Callable | None = None, force: bool = False) -> None:
        self.members, self.data, self.device, self.callbacks = members, data, device, list(callbacks)
        self.is_main = self.dist.is_main
        t = members[0].config.train
        self.precision = build.select_precision(getattr(t, "precision", t.amp), device, members[0].model)
        was = (ckpts[0].get("meta") or {}).get("precision") if ckpts else None
        if was is not None and was != self.precision.name and not force:
            # train.precision=auto resolves per machine: the same recipe text may train otherwise here
            raise ConfigError(
                f"--resume: the run trained in precision {was}, but train.precision={getattr(t, 'precision', t.amp)} gives "
                f"{self.precision.name} here ({self.precision.reason}), which alters the training trajectory; "
                f"resume with train.precision={was}, or add --force to continue anyway"
            )
        self.amp_dtype = self.precision.amp_dtype
        for m in members:
            self.precision.apply(m.model)
        stored_threads = (ckpts[0].get("meta") or {}).get("threads") if ckpts else None
        if ckpts and getattr(t, "threads", None) is None and isinstance(stored_threads, int) and stored_threads > 0:
            # another thread count may sum in another order: a resumed run keeps the one it ran with
            self.threads, self._threads_reason = stored_threads, "the run's own, resumed"
        else:
            self.threads, self._threads_reason = build.choose_threads(getattr(t, "threads", None), members[0].model, device)
        torch.set_num_threads(self.threads)
        self.epoch = self.step = self.batch_in_epoch = 0
        self._active, self._partial = 0, None
        self._epoch_hparams: list[dict[str, float]] | None = None  # per member, at the epoch's first step
        self._flip_offsets: list[tuple[dict[str, int], int] | None] = [None] * len(members)  # a resumed epoch's flips
        self._stop_shared = self._in_step = self._closing_epoch = False
        self._last_saved: tuple[int, int] | None = None  # (epoch, step) of the newest last.pt
        self._signals = StopSignals(announce=self.is_main)
        self.ensemble = ensemble
        self._build_step(loss_fn)
        self._build_loaders()
        self.schedule_epochs = int(ckpts[0].get("schedule_epochs") or ckpts[0]["config"]["train"]["epochs"]) if ckpts else t.epochs
        for m in members:
            if m.schedulers is None:
                m.schedulers = build.build_schedules(m.config, m.optimizer, self.steps_per_epoch, epochs=self.schedule_epochs)
            try:
                m.flip_ratio = FlipRatio(m.model, m.optimizer)
            except ValueError:  # no trained binary weights (optim.binary: none, or a float model)
                m.flip_ratio = None
        if ckpts:
            for m, ck in zip(members, ckpts):
                self._restore(m, ck)
            self._last_saved = (self.epoch, self.step)
        self._open_folders(run_dirs, resumed=ckpts is not None)
        self.bar = ProgressBar(t.progress, self.is_main)

    def _build_step(self, loss_fn: Callable | None) -> None:
        t = self.members[0].config.train
        compile_ = (self.device.type == "cuda") if t.compile == "auto" else bool(t.compile)
        common = dict(amp_dtype=self.amp_dtype, cuda_graphs=t.cuda_graphs, compile=compile_)
        if self.ensemble is None:
            self.ddp_model: nn.Module = self.model
            if self.dist.enabled:
                from torch.nn.parallel import DistributedDataParallel as DDP

                self.ddp_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.train_step = make_train_step(self.ddp_model, self.optimizer, loss_fn or F.cross_entropy, grad_clip=t.grad_clip, **common)
            return
        if loss_fn is not None:
            raise ConfigError("a custom loss_fn is not supported with several members (seeds=[...]) yet")
        self.ensemble.sync_modes()  # the optimizers may have switched weight modes or frozen routes
        self.ensemble.check_links()
        opt = SeedOptimizer(self.ensemble, [m.optimizer for m in self.members], grad_clip=t.grad_clip)
        self.ddp_model = self.ensemble
        self.train_step = make_train_step(self.ensemble, opt, ensemble_loss, metrics_fn=ensemble_metrics, **common)

    def _build_loaders(self) -> None:
        d, r, w = self.members[0].config.data, self.dist.rank, self.dist.world_size
        self.train_loaders = [build.build_loader(self.data, "train", m.config.data.batch_size, train=True, device=self.device,
                                                 augment=m.config.data.augment, seed=m.config.seed, rank=r, world_size=w)
                              for m in self.members]
        self.test_loader = build.build_loader(self.data, "test", d.eval_batch_size, train=False, device=self.device,
                                              seed=self.config.seed, rank=r, world_size=w)
        self.val_loader = (build.build_loader(self.data, "val", d.eval_batch_size, train=False, device=self.device,
                                              seed=self.config.seed, rank=r, world_size=w)
                           if build.has_split(self.data, "val") else None)
        try:
            self.steps_per_epoch = len(self.train_loaders[0])
        except TypeError:
            raise ConfigError("the training loader has no length; flipnet needs a sized loader") from None

    def _open_folders(self, run_dirs: list[Path] | None, *, resumed: bool) -> None:
        """Create or reopen the run folders; ``config.yaml`` always records the recipe that runs
        (also on a resume: a restart before the first checkpoint, ``--force`` changes, or keys that
        do not alter the trajectory, such as ``train.eval_every``)."""
        base = self.members[0].config
        if self._group is not None:
            group_dir, group_config = self._group
            if group_dir is None:
                group_dir = build.new_run_dir(base.output, base.name, kind="group")
            elif self.is_main:
                if not resumed:  # a group folder given by the caller: the rules of a new run's folder
                    build.check_new_run_dir(Path(group_dir), "group", "choose another group folder")
                build.make_run_dir(group_dir, "group")
            self._group = (group_dir, group_config)
            run_dirs = run_dirs or [group_dir / m.label for m in self.members]
        elif run_dirs is None:
            run_dirs = [build.new_run_dir(base.output, base.name, is_main=self.is_main, dist_enabled=self.dist.enabled)]
        if self.is_main and not resumed:  # folders given by the caller (run_dir=, a group's members)
            for d in run_dirs:
                build.check_new_run_dir(Path(d), "run", "choose another run folder")
        for m, d in zip(self.members, run_dirs):
            m.run_dir = Path(d)
            if self.is_main:  # the logs first: a damaged history refuses the resume before any file changes
                build.make_run_dir(m.run_dir)
                m.logger = MetricsLogger(m.run_dir, keep_until_epoch=self.epoch if resumed else None)
        for m in self.members:
            if self.is_main:
                self._write(m.run_dir / "config.yaml", dump_config(m.config))
                m.tb = TensorBoardLogger(m.run_dir, m.config.train.tensorboard, self.epoch)
        if self._group is not None and self.is_main and self._group[1] is not None:
            self._write(self._group[0] / "config.yaml", dump_config(self._group[1]))

    # ----------------------------------------------------------------- the active member
    @property
    def member(self) -> Member:
        """The member callbacks see now (the first, except during a member's ``on_epoch_end``)."""
        return self.members[self._active]

    model = property(lambda self: self.member.model, doc="The active member's model (unwrapped).")
    optimizer = property(lambda self: self.member.optimizer, doc="The active member's optimizer.")
    config = property(lambda self: self.member.config, doc="The active member's recipe.")
    run_dir = property(lambda self: self.member.run_dir, doc="The active member's run folder.")
    schedulers = property(lambda self: self.member.schedulers, doc="The active member's schedules.")
    logger = property(lambda self: self.member.logger, doc="The active member's metrics logger (rank 0).")
    best = property(lambda self: self.member.best, doc="The active member's best validation accuracy.")

    @property
    def stop_signal(self) -> int | None:
        """The signal that stopped :meth:`fit` (``signal.SIGINT`` or ``signal.SIGTERM``), else ``None``."""
        return self._signals.signal

    @property
    def group_dir(self) -> Path | None:
        """The folder holding the members' run folders (several members only)."""
        return self._group[0] if self._group is not None else None

    # ----------------------------------------------------------------- state
    def state_dict(self, member: Member | None = None) -> dict[str, Any]:
        """Everything needed to continue ``member`` (default: the active one) exactly."""
        m = member or self.member
        i = self.members.index(m)
        state: dict[str, Any] = {
            "model": m.model.state_dict(), "optimizer": m.optimizer.state_dict(),
            "schedulers": [s.state_dict() for s in m.schedulers or ()], "epoch": self.epoch, "step": self.step,
            "batch_in_epoch": self.batch_in_epoch, "rng": get_rng_state(), "config": config_to_dict(m.config),
            "best": m.best, "best_epoch": m.best_epoch, "test_at_best": m.test_at_best, "schedule_epochs": self.schedule_epochs,
            "meta": {"num_classes": int(self.data.num_classes), "input_shape": [int(v) for v in self.data.input_shape],
                     "task": str(self.data.task), "world_size": self.dist.world_size, "threads": self.threads,
                     "precision": self.precision.name},
        }
        if len(self.members) > 1:
            state["meta"]["multi"] = {"members": len(self.members), "index": i}
        if self._partial is not None:
            p = self._partial
            state["partial"] = {"sums": p["sums"][i], "n_samples": p["n_samples"], "n_targets": p["n_targets"]}
            if self._epoch_hparams is not None:
                state["partial"]["hparams"] = dict(self._epoch_hparams[i])
            if m.flip_ratio is not None:  # the epoch's flips so far, so its flip ratio survives a resume
                counts, steps = self._flip_counts(i)
                state["partial"]["flips"] = {"counts": counts, "steps": steps}
        return state

    def _restore(self, m: Member, ckpt: dict[str, Any]) -> None:
        try:
            m.model.load_state_dict(ckpt["model"])
            configured = [{k: v for k, v in g.items() if k != "params"} for g in m.optimizer.param_groups]
            m.optimizer.load_state_dict(ckpt["optimizer"])
            self._reapply_configured(m, configured)
            saved = ckpt.get("schedulers", [])
            if len(saved) != len(m.schedulers or ()):
                raise CheckpointError(f"the checkpoint has {len(saved)} schedules but the recipe {len(m.schedulers or ())}; "
                                      "resume with the run's own optim.schedules")
            for s, sd in zip(m.schedulers or (), saved):
                s.load_state_dict(sd)
        except (RuntimeError, KeyError, ValueError) as e:
            if isinstance(e, FlipnetError):
                raise
            raise CheckpointError(f"the checkpoint does not fit this run's model/optimizer: {str(e).splitlines()[0]}") from None
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        m.best, m.best_epoch, m.test_at_best = float(ckpt.get("best", -math.inf)), int(ckpt.get("best_epoch", 0)), ckpt.get("test_at_best")
        partial = ckpt.get("partial") if self.batch_in_epoch else None
        if partial is not None:
            i = self.members.index(m)
            if self._partial is None:
                self._partial = {"sums": torch.zeros(len(self.members), 2), "n_samples": int(partial["n_samples"]),
                                 "n_targets": int(partial["n_targets"])}
            self._partial["sums"][i] = partial["sums"].reshape(2).to(torch.float32).cpu()
            if isinstance(partial.get("hparams"), dict):  # the values this epoch started with (its metrics row)
                if self._epoch_hparams is None:
                    self._epoch_hparams = [{} for _ in self.members]
                self._epoch_hparams[i] = {str(k): float(v) for k, v in partial["hparams"].items()}
            flips = partial.get("flips")
            if isinstance(flips, dict) and isinstance(flips.get("counts"), dict):
                self._flip_offsets[i] = ({str(k): int(v) for k, v in flips["counts"].items()}, int(flips.get("steps", 0)))
        if "rng" in ckpt:  # written by rank 0; every rank starts from the same seed, so the states agree anyway
            set_rng_state(ckpt["rng"])

    @staticmethod
    def _reapply_configured(m: Member, configured: list[dict[str, Any]]) -> None:
        """Put the recipe's hyperparameters back after ``optimizer.load_state_dict``.

        Loading an optimizer state also restores every param-group setting saved with it, so a
        forced resume with ``optim.*_kwargs`` changed would train (and log) the old values while
        ``config.yaml`` shows the new ones. Keys a schedule writes are left to the schedule; without
        ``--force`` the configured values equal the saved ones and this changes nothing.
        """
        groups = m.optimizer.param_groups
        if len(groups) != len(configured):
            return
        scheduled = {getattr(s, "key", None) for s in m.schedulers or ()}
        for group, values in zip(groups, configured):
            for key, value in values.items():
                if key in scheduled or key not in group:
                    continue
                current = group[key]
                if isinstance(current, Tensor):
                    current.copy_(torch.as_tensor(value, dtype=current.dtype, device=current.device))
                else:
                    group[key] = value

    def _flip_layers(self, i: int) -> list[tuple[str, Tensor]]:
        """``(layer, binary weight)`` that member ``i``'s flip ratio reports, in its order."""
        from flipnet.layers import named_binary_parameters

        m = self.members[i]
        names, live = set(m.flip_ratio.layer_names), m.optimizer.flip_counts()
        params = [(n[: -len(".weight")] if n.endswith(".weight") else n, p) for n, p in named_binary_parameters(m.model)]
        return [(n, p) for n, p in params if n in names and p in live]

    def _flip_counts(self, i: int) -> tuple[dict[str, int], int]:
        """Member ``i``'s sign flips per binary layer and optimizer steps in this epoch (with the
        part trained before a mid-epoch resume); one host sync."""
        m = self.members[i]
        live, params = m.optimizer.flip_counts(), self._flip_layers(i)
        values = torch.stack([live[p].to(params[0][1].device) for _, p in params]).tolist() if params else []
        counts, steps = {n: int(v) for (n, _), v in zip(params, values)}, int(m.optimizer.num_steps)
        offset = self._flip_offsets[i]
        if offset is not None:
            counts = {n: v + offset[0].get(n, 0) for n, v in counts.items()}
            steps += offset[1]
        return counts, steps

    def _flip_ratios(self, i: int) -> dict[str, float]:
        """The epoch's flip ratios of member ``i`` (:class:`flipnet.metrics.FlipRatio`'s numbers;
        an epoch resumed mid-way counts the flips from before the interruption too)."""
        m = self.members[i]
        if m.flip_ratio is None:
            return {}
        if self._flip_offsets[i] is None:
            return m.flip_ratio.compute()
        counts, steps = self._flip_counts(i)
        numels = {n: p.numel() for n, p in self._flip_layers(i)}
        if steps == 0 or not counts:
            return m.flip_ratio.compute()
        out = {n: counts[n] / (numels[n] * steps) for n in numels}
        out["total"] = sum(counts.values()) / (sum(numels.values()) * steps)
        return out

    def _write(self, path: Path, text: str) -> None:
        try:
            atomic_write_text(path, text)
        except OSError as e:
            raise CheckpointError(f"cannot write {path} ({e.strerror or e}); free disk space or make the folder writable") from None

    def _save(self, m: Member, name: str, state: dict[str, Any] | None = None) -> None:
        if self.is_main:
            save_checkpoint(m.run_dir / "checkpoints" / f"{name}.pt", state if state is not None else self.state_dict(m))
        if name == "last":
            self._last_saved = (self.epoch, self.step)

    def _print(self, msg: str) -> None:
        if self.is_main:
            self.bar.write(msg)

    def hyperparameters(self, member: Member | None = None) -> dict[str, float]:
        """Current values of the logged hyper-parameters of ``member`` (see :func:`hyperparameter_values`):
        the optimizers' usual ones, every scheduled key, and every scalar the recipe sets in
        ``optim.binary_kwargs`` / ``optim.real_kwargs`` (e.g. Adam's ``eps``), as the optimizer holds it."""
        m = member or self.member
        o = m.config.optim
        keys = [(s.route, s.key) for s in o.schedules]
        keys += [("binary", k) for k in o.binary_kwargs] + [("real", k) for k in o.real_kwargs]
        return hyperparameter_values(m.optimizer, keys)

    # ----------------------------------------------------------------- divergence
    def _check(self, sums: Tensor, where: str, collective: bool = True) -> bool:
        """Raise :class:`TrainingDiverged` when a member's loss, weights, BatchNorm statistics or
        gradient averages hold NaN/inf (:mod:`flipnet.train.divergence`; one host sync). Returns
        whether some DDP rank asked to stop."""
        watched = [watched_tensors(m.model, m.optimizer) for m in self.members]
        found, stop = first_non_finite(sums[:, 0], watched, self._signals.requested, self.device, collective)
        for m, what in zip(self.members, found):
            if what is not None:
                run = f"run {m.label}: " if len(self.members) > 1 else ""
                kept = (f"The last good checkpoint ({m.run_dir / 'checkpoints' / 'last.pt'}, epoch {self._last_saved[0]}, "
                        f"step {self._last_saved[1]}) was kept" if self._last_saved else "No checkpoint had been written yet")
                raise TrainingDiverged(
                    f"{run}{what} became NaN/inf {where}; stopped. {kept}. "
                    "Lower the learning rate / Bop gamma or set train.grad_clip"
                )
        return stop

    # ----------------------------------------------------------------- training
    def fit(self) -> dict[str, Any]:
        """Train for ``train.epochs`` epochs (from where a resumed run stopped).

        Returns:
            The first member's last logged row (:attr:`members` hold every member's ``last_row``).

        Raises:
            TrainingDiverged: NaN/inf in the loss, weights, BatchNorm statistics or gradients (the
                last good checkpoint is kept, NaN is never saved).
            flipnet.train.callbacks.Stopped: (a ``KeyboardInterrupt``) Ctrl-C or SIGTERM, after
                saving ``checkpoints/last.pt`` (resume with ``flipnet train --resume RUN``); its
                ``signum`` and :attr:`stop_signal` say which signal.
        """
        t = self.config.train
        for m in self.members:
            m.last_row = m.logger.rows[-1] if m.logger and m.logger.rows else {}
        for cb in self.callbacks:
            cb.on_train_start(self)
        where = self.group_dir or self.run_dir
        if self.epoch >= t.epochs:
            self._print(f"{where}: already trained for {self.epoch} epochs (train.epochs={t.epochs}); nothing to do")
        self._signals.install()
        if getattr(self, "_note", None):
            self._print(self._note)
        if self.epoch < t.epochs:
            self._print(start_line(self))
        started, first_epoch, ended = time.perf_counter(), self.epoch, False
        try:
            while self.epoch < t.epochs:
                self._train_epoch()
                if self._stop_shared if self.dist.enabled else self._signals.requested:
                    raise _StopRequested
            ended = True
            if self.epoch > first_epoch:
                self._print(final_line(self, self.epoch - first_epoch, time.perf_counter() - started))
        except (_StopRequested, KeyboardInterrupt):
            self._interrupted()
            raise Stopped(self._signals.signal) from None
        finally:
            self._signals.restore()
            self.bar.close()
            for cb in self.callbacks:
                cb.on_train_end(self)
            finish_files(self, time.perf_counter() - started)
            # Under DDP no rank may run ahead (and tear down its process group) while rank 0 still
            # writes; only where every rank is known to get here (a normal end or an agreed stop).
            if ended or (self.dist.enabled and self._stop_shared):
                barrier()
        return self.members[0].last_row

    def _interrupted(self) -> None:
        self.bar.close()
        where = f"in epoch {self.epoch + 1} after step {self.step}" if self.batch_in_epoch else f"after epoch {self.epoch}"
        finite = self._partial is None or bool(torch.isfinite(self._partial["sums"]).all())
        if finite and not self._in_step:
            try:
                # collective only when every rank stops here together (an agreed stop under DDP)
                self._check(torch.zeros(len(self.members), 2, device=self.device), where,
                            collective=not self.dist.enabled or self._stop_shared)
            except TrainingDiverged:
                finite = False
        resume = self.group_dir or self.run_dir
        if finite and not self._in_step:
            for m in self.members:
                self._save(m, "last")
            self._print(f"interrupted {where}; saved {self.run_dir / 'checkpoints' / 'last.pt'}"
                        f"{' (and the other members)' if len(self.members) > 1 else ''}. Continue with: flipnet train --resume {resume}")
        else:
            what = "inside a step" if self._in_step and not self._closing_epoch else f"while closing epoch {self.epoch}"
            kept = (f"kept the last checkpoint (epoch {self._last_saved[0]}, step {self._last_saved[1]})"
                    if self._last_saved else "no checkpoint was written yet")
            self._print(f"interrupted {what}; {kept}. Continue with: flipnet train --resume {resume}")

    def _batches(self) -> Iterable[tuple[Tensor, Tensor]]:
        if len(self.train_loaders) == 1:
            yield from self.train_loaders[0]
            return
        for group in zip(*self.train_loaders):  # member s trains on the batches of a separate run with its seed
            yield torch.stack([b[0] for b in group]), torch.stack([b[1] for b in group])

    def _train_epoch(self) -> None:
        t, s, epoch = self.config.train, len(self.members), self.epoch
        started = time.perf_counter()
        self.ddp_model.train()
        for loader in self.train_loaders:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
        skip = self.batch_in_epoch
        sums = torch.zeros(s, 2, device=self.device, dtype=torch.float32)  # per member: loss sum, correct
        n_samples = n_targets = 0
        if skip and self._partial is not None and self.is_main:  # saved by rank 0 alone
            sums += self._partial["sums"].to(self.device, torch.float32)
            n_samples, n_targets = int(self._partial["n_samples"]), int(self._partial["n_targets"])
        for m in self.members:
            if not skip and m.flip_ratio is not None:
                m.flip_ratio.reset()
        if not skip or self._epoch_hparams is None or not all(self._epoch_hparams):
            # The row of an epoch logs the hyperparameters its first step used: the recipe's values
            # in the first row, even when a per-step schedule moves them during the epoch.
            self._epoch_hparams = [self.hyperparameters(m) for m in self.members]
        self.bar.start(self.steps_per_epoch, skip, f"epoch {epoch + 1}/{t.epochs}")
        step_scheds = [sc for m in self.members for sc in m.schedulers if getattr(sc, "unit", "step") == "step"]
        every = t.nan_check_every
        for i, (x, y) in enumerate(self._batches()):
            if i < skip:
                continue
            self._in_step = True
            try:
                loss_sum, correct = self.train_step(x, y)
            except ValueError as e:
                if "Expected more than 1 value per channel" not in str(e):
                    raise
                raise ConfigError(
                    f"a training batch of {int((y if s == 1 else y[0]).shape[0])} example(s) is too small for this "
                    "model's BatchNorm layers (they need at least 2 values per channel in training); "
                    "use data.batch_size=2 or more"
                ) from None
            sums[:, 0] += loss_sum
            sums[:, 1] += correct
            one = y if s == 1 else y[0]
            n_samples, n_targets = n_samples + int(one.shape[0]), n_targets + int(one.numel())
            self.step, self.batch_in_epoch = self.step + 1, i + 1
            self._partial = {"sums": sums, "n_samples": n_samples, "n_targets": n_targets}
            self._in_step = False
            for sc in step_scheds:
                sc.step()
            for cb in self.callbacks:
                cb.on_step_end(self)
            if every and self.step % every == 0:
                if self._check(sums, f"in epoch {epoch + 1} (between steps {self.step - every + 1} and {self.step})"):
                    self._stop_shared = True
                    raise _StopRequested
                self.bar.postfix(float(sums[0, 0]) / max(n_samples, 1))
            self.bar.update()
            if self._signals.requested and not self.dist.enabled:  # under DDP shared at the next check
                raise _StopRequested
        if self._check(sums, f"in epoch {epoch + 1} (by step {self.step})"):
            self._stop_shared = True  # every rank finishes this epoch, then stops
        self.bar.close()
        self._end_epoch(sums, n_samples, n_targets, started)

    def _end_epoch(self, sums: Tensor, n_samples: int, n_targets: int, started: float) -> None:
        # Until every member's row is logged and saved, the state is neither the end of the epoch
        # nor its last step (epoch schedules stepped, epoch counted, rows missing): an interrupt
        # here keeps the last checkpoint instead of saving one that a resume would refuse.
        self._in_step = self._closing_epoch = True
        self._close_epoch(sums, n_samples, n_targets, started)  # an exception leaves the flags set for _interrupted
        self._in_step = self._closing_epoch = False

    def _close_epoch(self, sums: Tensor, n_samples: int, n_targets: int, started: float) -> None:
        t, s = self.config.train, len(self.members)
        totals = all_reduce_sum(torch.cat([sums.double().reshape(-1), torch.tensor([n_samples, n_targets], device=self.device, dtype=torch.float64)])).tolist()
        samples, targets = max(totals[-2], 1), max(totals[-1], 1)
        hparams = self._epoch_hparams or [self.hyperparameters(m) for m in self.members]  # at the epoch's first step
        self._epoch_hparams = None
        for m in self.members:
            for sc in m.schedulers:
                if getattr(sc, "unit", "step") == "epoch":
                    sc.step()
        flips = [self._flip_ratios(i) for i in range(s)]
        self._flip_offsets = [None] * s
        self.epoch, self.batch_in_epoch, self._partial = self.epoch + 1, 0, None
        evaluated = self.epoch % t.eval_every == 0 or self.epoch == t.epochs
        tests = self._evaluate(self.test_loader) if evaluated else [None] * s
        vals = self._evaluate(self.val_loader) if evaluated and self.val_loader is not None else [None] * s
        elapsed = time.perf_counter() - started
        for i, m in enumerate(self.members):
            row: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "train_loss": totals[2 * i] / samples,
                                   "train_acc": totals[2 * i + 1] / targets}
            if self.val_loader is not None:
                row["val_loss"], row["val_acc"] = (vals[i]["loss"], vals[i]["acc"]) if vals[i] else (None, None)
            row["test_loss"], row["test_acc"] = (tests[i]["loss"], tests[i]["acc"]) if tests[i] else (None, None)
            row.update(hparams[i])
            if flips[i]:
                row["flip_ratio"] = float(flips[i].get("total", float("nan")))
                row.update({f"flip_ratio/{k}": float(v) for k, v in flips[i].items() if k != "total"})
            self._active = i
            try:
                for cb in self.callbacks:
                    cb.on_epoch_end(self, row)
            finally:
                self._active = 0
            row["time_s"] = elapsed
            m.time_s += elapsed
            self._log_and_save(m, row)
        self._print(epoch_line(self, elapsed))

    def _evaluate(self, loader: Any) -> list[dict[str, float]]:
        if self.ensemble is not None:
            return evaluate_ensemble(self.ensemble, loader, self.amp_dtype, self.device)
        broadcast_buffers(self.model)
        n = len(loader.dataset) if hasattr(loader, "dataset") else None
        n = n if isinstance(n, int) else len(self.data.val_y if loader is self.val_loader else self.data.test_y)
        share = len(range(self.dist.rank, n, self.dist.world_size))
        return [evaluate(self.model, loader, self.device, self.amp_dtype, max_samples=share)]

    def results(self) -> list[dict[str, Any]]:
        """One summary row per member (:func:`flipnet.train.report.results`): last-epoch and
        best-validation-epoch numbers, seed, folder, threads."""
        return results(self)

    def evaluate(self) -> dict[str, float]:
        """Test-set loss and accuracy of the first member's current model (``{"loss", "acc", "n"}``)."""
        return self._evaluate(self.test_loader)[0]

    def _log_and_save(self, m: Member, row: dict[str, Any]) -> None:
        """Choose best on validation (never on test), log the row, then write the checkpoints.

        The row goes first: a crash in between leaves a checkpoint one epoch behind the logs; a
        resume re-trains that epoch and replaces the newer row."""
        if self.val_loader is not None:
            improved = row.get("val_acc") is not None and row["val_acc"] > m.best
            if improved:
                m.best = row["val_acc"]
        else:  # no validation data: the last evaluated epoch
            improved = row["test_acc"] is not None
        if improved:
            m.best_epoch, m.test_at_best = self.epoch, row["test_acc"]
        row["best_epoch"] = m.best_epoch or None
        row["best_val_acc"] = m.best if math.isfinite(m.best) else None
        row["test_acc_at_best"] = m.test_at_best
        state = self.state_dict(m)
        if self.is_main:
            m.logger.append(row)
            m.tb.log(row)
        m.last_row = row
        if improved:
            self._save(m, "best", state)
        self._save(m, "last", state)
