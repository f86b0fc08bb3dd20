"""Builders: everything a run is assembled from, taken from a recipe (:class:`~flipnet.train.config.Config`).

:meth:`flipnet.train.Trainer.from_config` calls these in order; library users can call them to
build some parts from a recipe and make others themselves, then pass them to
``Trainer(model, optimizer, data, ...)``::

    config = load_config("digits_bop")
    data = build_data(config)
    model = build_model(config, data.num_classes, data.input_shape)
    optimizer = build_optimizer(config, model)
    trainer = Trainer(model, optimizer, data, config=config)

The loop module (:mod:`flipnet.train.loop`) never parses a recipe itself; ``flipnet eval``,
``load_run`` and ``flipnet summary RECIPE`` use the same builders, so a model is built in one place.

Run folders (:func:`new_run_dir`) carry a marker file, :data:`RUN_MARKER`: flipnet writes only into
folders it created (or empty ones), and a name from a recipe or the command line always stays
inside ``output.dir``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from flipnet.errors import CheckpointError, ConfigError, DataNotFoundError, FlipnetError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from .config import Config, OutputConfig

__all__ = [
    "RUN_MARKER",
    "amp_dtype",
    "build_data",
    "build_loader",
    "build_models",
    "build_model",
    "build_optimizer",
    "build_schedules",
    "check_new_run_dir",
    "select_precision",
    "choose_threads",
    "is_run_dir",
    "load_init_weights",
    "load_run",
    "model_from_checkpoint",
    "new_run_dir",
    "read_resume",
    "recipe_model",
    "resolve_device",
]

#: File that marks a folder as written by flipnet (``{"kind": "run" | "group", ...}``, JSON).
RUN_MARKER = ".flipnet-run"
#: Longest folder name most file systems accept (bytes of one path component).
_MAX_NAME_BYTES = 255


# ---------------------------------------------------------------------------------------------
# device, precision, threads


def resolve_device(device: str, option: str = "train.device=") -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cuda*`` without CUDA → ConfigError.

    ``option`` names the setting in error messages (``"train.device="``, or ``"--device "`` for
    ``flipnet eval``).
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (device in ("cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"{option}{device} is not a device; use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{option}{device} but CUDA is not available here; use {option}cpu or {option}auto")
    return torch.device(device)


def amp_dtype(setting: bool | str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run: ``torch.bfloat16`` or ``None`` (full precision).

    ``setting`` is ``train.precision`` (``fp32``, ``tf32``, ``bf16``, ``int8``, ``auto``) or the
    older ``train.amp`` (``True``, ``False``, ``auto``); see :func:`flipnet.train.fast.select_precision`.
    """
    return select_precision(setting, device).amp_dtype


def select_precision(setting: bool | str | None, device: torch.device, model: nn.Module | None = None) -> Any:
    """:func:`flipnet.train.fast.select_precision` with a bad value as :class:`ConfigError`."""
    from .fast import select_precision as select

    try:
        return select(device, "auto" if setting == "auto" else setting, model)
    except ValueError as e:
        raise ConfigError(str(e)) from None


#: Below this many parameters a model trains fastest on one CPU thread (measured, docs/training.md).
SMALL_MODEL_PARAMS = 2_000_000


def choose_threads(requested: int | None, model: nn.Module | None, device: torch.device) -> tuple[int, str]:
    """The intra-op thread count of a run and why: ``(threads, reason)``.

    * ``train.threads`` (``requested``) when set;
    * else ``OMP_NUM_THREADS`` when the environment sets it (torch already follows it);
    * else on CPU, 1 thread when other processes already want every core (1-minute load
      average >= cores: measured 2.5-13x faster than 2 threads on a loaded 2-core machine);
    * else on CPU, 1 thread for models under :data:`SMALL_MODEL_PARAMS` parameters (their
      kernels are too small to split: on a shared 2-core machine 1 thread was 2-4x faster than
      2), and torch's default (one per core) for larger ones;
    * on CUDA, torch's default.

    The same thread count and seed give the same weights; another thread count may sum in
    another order, so results agree only to rounding. Hence a resumed run keeps the count stored
    in its checkpoint (the trainer does not call this then), and an explicit other
    ``train.threads`` on ``--resume`` is refused without ``--force`` (:func:`read_resume`).
    """
    default = _torch_default_threads()  # read before any run in this process changes it
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ConfigError(f"train.threads must be a positive integer or null, got {requested!r}")
        return requested, "train.threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    if device.type == "cpu":
        cores = os.cpu_count() or 1
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # not on this platform
            load = None
        if load is not None and cores > 1 and load >= cores:
            return 1, f"busy machine: load {load:.1f} on {cores} cores"
    if device.type == "cpu" and model is not None:
        n = sum(p.numel() for p in model.parameters())
        if n < SMALL_MODEL_PARAMS:
            return 1, f"small model ({n:,} parameters)"
    return default, "torch default"


_DEFAULT_THREADS: list[int] = []


def _torch_default_threads() -> int:
    """torch's thread count before any trainer set it (a trainer's ``torch.set_num_threads`` is
    process-wide; the next run in the process must not inherit it as its "default")."""
    import torch

    if not _DEFAULT_THREADS:
        _DEFAULT_THREADS.append(torch.get_num_threads())
    return _DEFAULT_THREADS[0]


# ---------------------------------------------------------------------------------------------
# data


def _loader_options(name: str) -> set[str] | None:
    """Keyword options the data set's reader takes (``None`` for an unknown data set)."""
    from flipnet.data import dataset_options

    try:
        return set(dataset_options(name))
    except ConfigError:  # unknown name: load_dataset reports it with the list of names
        return None


def build_data(config: Config) -> Any:
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
    from flipnet.data import split_validation

    return split_validation(bundle, d.val_size)  # data.val_size: held out of the (cut) training set


def has_split(bundle: Any, split: str) -> bool:
    """True when ``bundle`` holds a non-empty ``split`` (``"val"`` exists only with ``data.val_size``)."""
    splits = getattr(bundle, "splits", None)
    if splits is not None:
        return split in splits
    try:
        x, _ = bundle.split(split)
    except (ValueError, KeyError, AttributeError):
        return False
    return x is not None and len(x) > 0


def build_loader(bundle: Any, split: str, batch_size: int, *, train: bool, device: torch.device,
                 augment: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1) -> Any:
    """:func:`flipnet.data.make_loader` for one split of ``bundle`` (this rank's shard)."""
    from flipnet.data import make_loader

    return make_loader(bundle, split, batch_size, train=train, device=device, augment=augment, seed=seed,
                       rank=rank, world_size=world_size)


# ---------------------------------------------------------------------------------------------
# model


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
    from flipnet.models._init import init_weights

    return init_weights(create_model(config.model.name, **kwargs), config.model.init)  # model.init (None: torch's)


def recipe_model(config: Config) -> nn.Module:
    """The model ``config`` trains, built without loading its data set (e.g. for ``flipnet summary``).

    The image shape and class count come from :func:`flipnet.data.dataset_shape`; the model is
    the one the trainer builds, freshly initialised (``model.init_from`` is not applied).

    Raises:
        ConfigError: the data set does not declare its shape without being loaded.
    """
    from flipnet.data import dataset_shape

    shape = dataset_shape(config.data.name, **config.data.options)
    if shape is None:
        raise ConfigError(f"data set {config.data.name!r} does not say its image shape without being loaded")
    input_shape, num_classes = shape
    return build_model(config, num_classes, input_shape)


def build_models(configs: Sequence[Config], data: Any, device: torch.device, *, init_weights: bool = True
                 ) -> tuple[list[nn.Module], Any]:
    """The models of runs trained together, on ``device``, and (several) their ``SeedEnsemble``.

    Each model is built right after seeding with its recipe's seed (as a separate run would be);
    ``init_weights``: apply ``model.init_from`` (a new run, not a resume). One model is moved with
    :func:`flipnet.train.fast.prepare_model` (``train.channels_last``); several become views into one
    :class:`flipnet.train.ensemble.SeedEnsemble`, which must exist before their optimizers.

    Raises:
        NotVectorizable: several models that the ensemble cannot widen, or a non-classification task.
    """
    from flipnet.utils import seed_everything

    from .fast import prepare_model

    base = configs[0]
    models = []
    for cfg in configs:
        seed_everything(cfg.seed)
        m = build_model(cfg, data.num_classes, data.input_shape)
        if cfg.model.init_from and init_weights:
            load_init_weights(m, cfg.model.init_from)
        models.append(m.to(device) if len(configs) > 1 else prepare_model(m, device, base.train.channels_last))
    if len(configs) == 1:
        return models, None
    from torch import nn as _nn

    from .ensemble import NotVectorizable, SeedEnsemble

    if data.task != "classification":
        raise NotVectorizable("vectorised multi-run training supports classification data sets only")
    cl = base.train.channels_last
    if cl == "auto":
        cl = device.type == "cuda" and any(isinstance(x, _nn.Conv2d) for x in models[0].modules())
    return models, SeedEnsemble(models, channels_last=bool(cl))


def load_init_weights(model: nn.Module, source: str) -> None:
    """``model.init_from``: copy the model weights of a run folder (best, else last) or checkpoint.

    Weights only: the layers keep the weight mode the recipe builds (a Bop run's ±1 weights
    become latent weights for Adam; latent weights are binarised by a flip optimizer).
    """
    from flipnet.layers import binary_modules

    from .checkpoint import load_checkpoint, resolve_checkpoint

    try:
        path = resolve_checkpoint(source, "best")
    except CheckpointError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    state = load_checkpoint(path)["model"]
    modes = {name: m.weight_mode for name, m in binary_modules(model)}
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(
            f"model.init_from={source}: its weights do not fit the model the recipe builds "
            f"({str(e).splitlines()[0]}); use the same model.name and model.kwargs"
        ) from None
    for name, m in binary_modules(model):
        if m.weight_mode != modes[name]:
            m.set_weight_mode(modes[name])


# ---------------------------------------------------------------------------------------------
# optimizer and schedules


def build_optimizer(config: Config, model: nn.Module) -> Any:
    """``optim.*`` → :func:`flipnet.optim.create_optimizer` (a ``RoutedOptimizer``).

    Puts the model's binary layers in the weight mode the optimizer needs first (flip mode for
    flip optimizers, frozen routes for ``none``: :func:`flipnet.optim.prepare_model_for`).
    """
    from flipnet.optim import create_optimizer, prepare_model_for

    o = config.optim
    try:
        prepare_model_for(model, binary=o.binary, real=o.real)
        return create_optimizer(
            model, binary=o.binary, binary_kwargs=dict(o.binary_kwargs), real=o.real,
            real_kwargs=dict(o.real_kwargs), weight_clip=o.weight_clip,
        )
    except (TypeError, ValueError, KeyError) as e:  # unknown optimizer, bad kwargs, latent/flip mismatch
        if isinstance(e, FlipnetError):
            raise
        raise ConfigError(f"optim: {e}") from None


def build_schedules(config: Config, optimizer: Any, steps_per_epoch: int, *, epochs: int | None = None) -> list[Any]:
    """``optim.schedules`` → :class:`flipnet.optim.schedules.HyperparamScheduler` objects.

    Args:
        epochs: the schedules' horizon (default ``train.epochs``). A resumed run keeps the
            horizon it started with, so extending ``train.epochs`` does not re-stretch a cosine:
            the extra epochs run at the schedule's final value.
    """
    from flipnet.optim.schedules import scheduler_from_dict

    horizon = config.train.epochs if epochs is None else epochs
    out = []
    for i, s in enumerate(config.optim.schedules):
        spec = {"key": s.key, "type": s.type, "route": s.route, "unit": s.unit, **s.params}
        try:
            out.append(scheduler_from_dict(optimizer, spec, epochs=horizon, steps_per_epoch=steps_per_epoch))
        except (FlipnetError, TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"optim.schedules[{i}]: {e}") from None
    return out


# ---------------------------------------------------------------------------------------------
# run folders


def _marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_run_dir(folder: str | os.PathLike) -> bool:
    """True when ``folder`` was written by flipnet: its marker, or (older runs) a checkpoint or log."""
    p = Path(folder)
    return _marker(p) is not None or (p / "checkpoints").is_dir() or (p / "metrics.jsonl").is_file()


def _holds_progress(folder: Path) -> bool:
    """A run that got as far as a checkpoint or a logged epoch (which a new run would overwrite)."""
    ckpt = folder / "checkpoints"
    if ckpt.is_dir() and any(ckpt.glob("*.pt")):
        return True
    if (folder / "summary.json").is_file():
        return True
    metrics = folder / "metrics.jsonl"
    try:
        return metrics.is_file() and metrics.stat().st_size > 0
    except OSError:
        return True


def _check_name(name: str) -> Path:
    p = Path(name)
    if p.is_absolute() or name.startswith("~"):
        raise ConfigError(f"output.name={name} is an absolute path; give a folder name, and the parent folder with output.dir (or --out)")
    if any(part == ".." for part in p.parts) or not p.parts or all(part == "." for part in p.parts):
        raise ConfigError(f"output.name={name} leaves output.dir; give a plain folder name (no '..')")
    for part in p.parts:
        if len(part.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
            raise ConfigError(
                f"output.name is {len(part)} characters long; a folder name may have at most {_MAX_NAME_BYTES} bytes"
            )
    return p


def make_run_dir(folder: Path, kind: str = "run") -> None:
    """Create ``folder`` (and parents) with its :data:`RUN_MARKER`; OSError → ConfigError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if _marker(folder) is None:
            from flipnet.utils import atomic_write_text

            atomic_write_text(folder / RUN_MARKER, json.dumps({"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    except OSError as e:
        raise ConfigError(
            f"cannot write the run folder {folder} ({e.strerror or e}); set output.dir (or --out) to a writable folder"
        ) from None


def check_new_run_dir(run_dir: Path, kind: str = "run", what: str = "choose another output.name") -> None:
    """Refuse ``run_dir`` as the folder of a *new* run (or group, ``kind``) unless it is absent,
    empty, or a flipnet folder of that kind whose run stopped before its first checkpoint.

    Raises:
        ConfigError: a file, a folder holding a run, a non-empty folder flipnet did not create,
            or a flipnet folder of the other kind; ``what`` is the advice that ends the message.
    """
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} exists and is not a folder; {what}")
    if _holds_progress(run_dir):
        raise ConfigError(f"run folder {run_dir} already holds a run; continue it with `flipnet train --resume {run_dir}` or {what}")
    try:
        empty = not any(run_dir.iterdir())
    except OSError as e:
        raise ConfigError(f"cannot read {run_dir} ({e.strerror or e}); {what}") from None
    marker = _marker(run_dir)
    if not empty and marker is None:
        raise ConfigError(f"{run_dir} is not empty and was not created by flipnet; {what} "
                          "(flipnet never writes into a folder it did not make)")
    if marker is not None and marker.get("kind", "run") != kind:
        raise ConfigError(f"{run_dir} holds a flipnet {marker.get('kind')} folder; {what}")


def new_run_dir(output: OutputConfig, default_name: str, *, is_main: bool = True, dist_enabled: bool = False,
                kind: str = "run") -> Path:
    """The folder of a new run: ``output.dir/output.name``, or ``output.dir/<default_name>-<time>``.

    Rank 0 (``is_main``) checks and creates it (with its marker); under DDP every rank gets
    rank 0's name. Named folders:

    * an absolute name, or one with ``..``, is refused (a run stays inside ``output.dir``);
    * a name longer than a file system allows gets a clear error;
    * a folder holding a run (a checkpoint or logged epochs) is refused: resume it instead;
    * a folder flipnet did not create and that is not empty is refused (its files would be mixed
      with the run's);
    * a flipnet folder whose run died before its first checkpoint is reused (a clean restart).

    Raises:
        ConfigError: for each refusal above, or when the folder cannot be written.
    """
    parent = Path(output.dir).expanduser()
    refused: str | None = None
    if output.name:
        run_dir = parent / _check_name(str(output.name))
        if is_main:
            try:
                check_new_run_dir(run_dir, kind)
            except ConfigError as e:
                if not dist_enabled:
                    raise
                refused = str(e)  # every rank must hear it, or the others wait for rank 0 forever
    else:
        base = parent / f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        _check_name(base.name)
        run_dir, i = base, 1
        while run_dir.exists():
            run_dir = base.with_name(f"{base.name}-{i}")
            i += 1
    if dist_enabled:  # every rank must use rank 0's folder name
        import torch.distributed as dist

        box = [str(run_dir), refused]
        dist.broadcast_object_list(box, src=0)
        run_dir, refused = Path(box[0]), box[1]
        if refused is not None:
            raise ConfigError(refused if is_main else f"rank 0 refused the run folder: {refused}")
    if is_main:
        make_run_dir(run_dir, kind)
    return run_dir


# ---------------------------------------------------------------------------------------------
# loading runs


def load_run(
    run_dir: str | os.PathLike, checkpoint: str = "best", map_location: str | torch.device = "cpu"
) -> tuple[Config, nn.Module]:
    """Load a trained model: ``(config, model)`` with the weights of ``best`` or ``last``.

    Args:
        run_dir: a run folder written by the trainer, or a checkpoint file.
        checkpoint: ``"best"`` (best validation accuracy, or the last epoch when the run has no
            validation split; falls back to ``last`` when no evaluation happened) or ``"last"``.

    Returns:
        The run's config and the model (in eval mode on ``map_location``).

    Raises:
        CheckpointError: no such run, or a corrupt checkpoint.
    """
    from .checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(run_dir, checkpoint)
    return model_from_checkpoint(load_checkpoint(path, map_location=map_location), path, run_dir, map_location)


def model_from_checkpoint(
    ckpt: dict, path: str | os.PathLike, run_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[Config, nn.Module]:
    """``(config, model)`` from an already loaded checkpoint ``ckpt`` read from ``path`` (see :func:`load_run`)."""
    from .config import load_config

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


def read_resume(configs: Sequence[Config], labels: Sequence[str], resume: str | os.PathLike, force: bool = False
                ) -> tuple[list[Path], list[dict] | None, list[str], str | None]:
    """What ``--resume`` continues: ``(run_dirs, checkpoints, changed_keys, note)``.

    One run: ``resume`` is its folder (or its ``checkpoints/last.pt``); several members: the group
    folder holding ``<label>/`` per member. ``checkpoints`` is ``None`` for a folder whose run
    stopped before its first checkpoint (it restarts from the beginning; ``note`` says so).
    ``changed_keys``: the recipe keys that alter the training trajectory
    (:func:`flipnet.train.config.trajectory_changes`, world size included).

    Raises:
        ConfigError: trajectory changes without ``force``.
        CheckpointError: not a run folder, members without checkpoints, a missing ``last.pt``
            although epochs were logged, or a corrupt checkpoint.
    """
    from .checkpoint import load_checkpoint, resolve_checkpoint
    from .config import trajectory_changes
    from .distributed import env_world_size

    path = Path(resume)
    single_file = len(configs) == 1 and path.is_file()
    if single_file and path.name != "last.pt":
        # A resume rewrites the history after the checkpoint's epoch and then last.pt itself: from
        # best.pt that would silently drop the epochs logged after it.
        raise ConfigError(
            f"--resume continues a run from its checkpoints/last.pt, not from {path.name}; to start from those "
            f"weights, train a new run with model.init_from={path}"
        )
    if len(configs) == 1:
        run_dirs = [(path.parent.parent if path.parent.name == "checkpoints" else path.parent) if single_file else path]
    else:
        run_dirs = [path / lb for lb in labels]
    found = [True] if single_file else [(d / "checkpoints" / "last.pt").is_file() for d in run_dirs]
    if not any(found):
        if not is_run_dir(path) or not all(is_run_dir(d) or not d.exists() for d in run_dirs):
            resolve_checkpoint(path, "last")  # not a run folder: its error names the problem
        logged = [d for d in run_dirs if (d / "metrics.jsonl").is_file() and (d / "metrics.jsonl").read_text().strip()]
        if logged:
            raise CheckpointError(
                f"{logged[0] / 'checkpoints' / 'last.pt'} is missing although {logged[0] / 'metrics.jsonl'} records "
                "finished epochs; the run cannot be continued exactly: restore last.pt or start a new run"
            )
        return run_dirs, None, [], f"{path} has no checkpoint yet (the run stopped before its first epoch ended); starting it from the beginning"
    if not all(found):
        missing = [str(d) for d, f in zip(run_dirs, found) if not f]
        raise CheckpointError(f"{path}: members without a checkpoint ({', '.join(missing)}); the group cannot be resumed together")
    ckpts = [load_checkpoint(resolve_checkpoint(path if len(configs) == 1 else d, "last"), map_location="cpu") for d in run_dirs]
    points = {(int(ck["epoch"]), int(ck["step"]), int(ck.get("batch_in_epoch", 0))) for ck in ckpts}
    if len(points) > 1:  # e.g. a save interrupted between members: one trainer cannot continue them together
        where = ", ".join(f"{d.name} at epoch {ck['epoch']} step {ck['step']}" for d, ck in zip(run_dirs, ckpts))
        raise CheckpointError(f"{path}: the members' last checkpoints are at different points ({where}); "
                              "resume each member folder on its own with flipnet train --resume")
    changes: list[str] = []
    for ck, cfg in zip(ckpts, configs):
        stored = ck.get("config")
        if not isinstance(stored, dict):
            raise CheckpointError(f"{path}: the checkpoint holds no config; it was not written by flipnet train")
        saved_world = int((ck.get("meta") or {}).get("world_size", 1))
        for key in trajectory_changes(stored, cfg, extra_stored={"world_size": saved_world},
                                      extra_new={"world_size": env_world_size()}):
            if key not in changes:
                changes.append(key)
        # The run keeps its thread count (the trainer reuses the stored one); an explicit other
        # count sums in another order, so it changes the trajectory too.
        saved_threads, threads = (ck.get("meta") or {}).get("threads"), getattr(cfg.train, "threads", None)
        if threads is not None and saved_threads is not None and int(threads) != int(saved_threads) and "train.threads" not in changes:
            changes.append("train.threads")
    if changes and not force:
        raise ConfigError(
            f"--resume {path} would change {', '.join(changes)}, which alters the training trajectory; "
            "resume with the run's own settings, or add --force to continue anyway"
        )
    note = f"--force: continuing {path} with changed {', '.join(changes)}; config.yaml updated" if changes else None
    return run_dirs, ckpts, changes, note
