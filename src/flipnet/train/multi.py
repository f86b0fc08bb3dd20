r"""Many runs at once: train several seeds (or hyperparameter values) of one model in one process.

``flipnet train RECIPE seeds=0,1,2`` calls :func:`train_seeds`; ``flipnet.train.multi.train_sweep``
trains configurations that differ only in hyperparameter values. A 3-seed mean then costs about
one run's wall time on a GPU instead of three.

Design: one wide network instead of S small ones
------------------------------------------------
A small network such as BinaryNet at batch 50 leaves most of a modern GPU idle: its time goes to
launching a few hundred small kernels per step. Training S copies *as one network S times wider*
issues the same number of kernels, each S times larger, so S runs cost little more than one.

:class:`SeedEnsemble` builds that wide network from S models of identical architecture (flat
``nn.Sequential`` models such as ``binarynet`` and ``binary_mlp``):

* a convolution with ``C → O`` channels becomes a *grouped* convolution with ``S·C → S·O``
  channels and ``S×`` the groups, so member ``s`` only sees its own channels;
* a dense layer becomes a batched matrix product over the S members;
* a BatchNorm over ``C`` channels becomes one over ``S·C`` channels: per-channel statistics are
  exactly per-member statistics, running averages included;
* element-wise and per-channel layers (sign quantizers, activations, pooling, dropout) run
  unchanged on the merged ``(B, S·C, H, W)`` tensor.

The members' parameters and BatchNorm buffers are *views* into the wide tensors (no copies): the
S original models stay valid ``nn.Module`` s that always hold their current weights, so each
member keeps its own optimizer (:func:`flipnet.optim.create_optimizer`), schedules, flip counters
and checkpoints exactly as in a separate run. After the wide backward pass, each member's
``.grad`` is set to its slice of the wide gradient (a view, again no copy) and its optimizer steps.
Flip optimizers and Adam are element-wise, so this equals S independent runs; gradient clipping
is applied per member. Each member draws its own batches (the data order and augmentation of a
separate run with its seed); the batches are stacked to ``(S, B, ...)``.

Why not ``torch.func.vmap`` or CUDA streams? ``vmap`` over ``functional_call`` would do the same
batching but cannot run flipnet's quantizers (classic ``autograd.Function`` s without vmap rules)
and BatchNorm's in-place running-statistics update needs special handling; the wide network is an
ordinary module, so autograd, ``torch.compile`` and CUDA graphs (:mod:`flipnet.train.fast`) apply
unchanged. Concurrent CUDA streams keep S× the kernel launches (the bottleneck being removed) and
give no overlap guarantee.

Exactness: a grouped convolution or batched matmul may sum in another order than the dense
kernel of a separate run, so results agree with separate runs to float rounding (the tests check
this on CPU); dropout draws different random masks than separate runs would.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from flipnet.errors import ConfigError, FlipnetError
from flipnet.layers import BinaryLayer, binary_modules
from flipnet.utils import atomic_write_text, seed_everything

__all__ = [
    "SeedEnsemble",
    "SeedOptimizer",
    "NotVectorizable",
    "train_seeds",
    "train_sweep",
    "train_group",
    "sweep_configs",
    "summarize",
]


class NotVectorizable(FlipnetError, ValueError):
    """The model has a layer that :class:`SeedEnsemble` cannot widen; train the runs one by one."""


# ----------------------------------------------------------------------------- layer support
#: Parameter-free layers that act per element or per channel: they run unchanged on the merged
#: ``(B, S·C, ...)`` tensor.
_PASSTHROUGH: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softsign, nn.Tanhshrink,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
)


def _check_elementwise(module: nn.Module, where: str) -> None:
    """Quantizers are element-wise except the per-channel magnitude-aware sign."""
    from flipnet.quantizers import MagnitudeAwareSign, Quantizer

    if isinstance(module, MagnitudeAwareSign):
        raise NotVectorizable(
            f"{where}: magnitude_aware_sign on activations averages over channels, which would mix "
            "the merged runs; train the seeds one after the other (vectorize=false)"
        )
    if isinstance(module, Quantizer) or isinstance(module, _PASSTHROUGH):
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            raise NotVectorizable(f"{where}: {type(module).__name__} with parameters cannot be widened")
        return
    raise NotVectorizable(
        f"{where}: layer type {type(module).__name__} cannot be vectorised over seeds; "
        "train the seeds one after the other (vectorize=false)"
    )


class _WideFlatten(nn.Module):
    """Flatten each member's features: ``(B, S·C, *rest) → (B, S·C·prod(rest))`` member-major."""

    def __init__(self, members: int) -> None:
        super().__init__()
        self.members = members

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        return x.reshape(b, self.members, -1).reshape(b, -1)


class _WideLinear(nn.Module):
    """S dense layers as one batched matrix product; ``inner`` holds the stacked parameters."""

    def __init__(self, inner: nn.Linear, members: int) -> None:
        super().__init__()
        self.inner = inner
        self.members = members
        self.in_features = inner.in_features
        self.out_features = inner.out_features // members

    def forward(self, x: Tensor) -> Tensor:
        inner, s = self.inner, self.members
        quant = getattr(inner, "input_quantizer", None)
        if quant is not None:
            x = quant(x)
        b = x.shape[0]
        if isinstance(inner, BinaryLayer):
            w = inner.quantized_weight().to(x.dtype)
        else:
            w = inner.weight.to(x.dtype)
        out = torch.einsum("bsi,soi->bso", x.reshape(b, s, self.in_features), w.view(s, self.out_features, -1))
        out = out.reshape(b, s * self.out_features)
        if isinstance(inner, BinaryLayer):
            return inner._finish(out)
        if inner.bias is not None:
            out = out + inner.bias.to(out.dtype)
        apply_scale = getattr(inner, "_apply_scale", None)  # flipnet's FloatLinear twin
        return apply_scale(out) if apply_scale is not None else out


def _stack_param(tensors: list[Tensor], channels_last: bool) -> Tensor:
    wide = torch.cat([t.detach() for t in tensors], dim=0)
    if channels_last and wide.dim() == 4:
        wide = wide.contiguous(memory_format=torch.channels_last)
    return wide


@dataclass
class _Link:
    """A wide tensor and the member tensors that are views into it."""

    wide: Tensor
    members: list[tuple[nn.Module, str, torch.Size]] = field(default_factory=list)


class SeedEnsemble(nn.Module):
    """S models of one architecture trained as one wide network (see the module docs).

    Args:
        models: S >= 1 models with identical structure and shapes (built by the same factory
            call with different seeds or initialisations). Their parameters and BatchNorm
            buffers become views into the ensemble's tensors; keep using the models (for
            optimizers, evaluation, checkpoints) as usual, but never replace a parameter's
            ``.data`` (that would cut the link; ``load_state_dict`` copies in place and is fine).
        channels_last: store wide 4-D weights channels-last (for CUDA convolutions).

    Build the members on their final device and dtype first: the ensemble cannot be moved
    afterwards (``.to()`` raises ``RuntimeError``).

    Input: ``(S, B, ...)`` -- one batch per member -- or ``(B, ...)`` with ``shared=True``.
    Output: ``(S, B, ...)``, member ``s`` at index ``s``.

    Raises:
        NotVectorizable: the models are not flat sequences of supported layers.
        ValueError: the models differ in structure or shapes.
    """

    def __init__(self, models: Sequence[nn.Module], *, channels_last: bool = False) -> None:
        super().__init__()
        if not models:
            raise ValueError("SeedEnsemble needs at least one model")
        self.members: list[nn.Module] = list(models)
        self.num_members = len(self.members)
        first = self.members[0]
        self.input_shape: tuple[int, ...] | None = getattr(first, "input_shape", None)
        sigs = [[(n, tuple(p.shape)) for n, p in m.named_parameters()] for m in self.members]
        if any(s != sigs[0] for s in sigs[1:]):
            raise ValueError("SeedEnsemble: the models differ in parameter names or shapes; build them with the same options")
        self._links: list[_Link] = []
        if not isinstance(first, nn.Sequential):
            raise NotVectorizable(
                f"only flat sequential models (e.g. binarynet, binary_mlp) can be vectorised over seeds, "
                f"not {type(first).__name__}; train the seeds one after the other (vectorize=false)"
            )
        layers = self._widen(self.members, channels_last)
        self.layers = nn.Sequential(*layers)
        self.sync_modes()

    # ------------------------------------------------------------------ construction
    def _flat_children(self, model: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
        """The layers of a (possibly nested) ``nn.Sequential``, in order, with dotted names."""
        if isinstance(model, nn.Sequential):
            out: list[tuple[str, nn.Module]] = []
            for name, child in model.named_children():
                out += self._flat_children(child, f"{prefix}{name}.")
            return out
        return [(prefix.rstrip(".") or type(model).__name__, model)]

    def _widen(self, models: list[nn.Module], channels_last: bool) -> list[nn.Module]:
        per_member = [self._flat_children(m, "") for m in models]
        out: list[nn.Module] = []
        s = self.num_members
        for idx, (name, layer) in enumerate(per_member[0]):
            peers = [pm[idx][1] for pm in per_member]
            where = name or type(layer).__name__
            if any(type(p) is not type(layer) for p in peers):
                raise ValueError(f"SeedEnsemble: layer {where} has different types across models")
            if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
                q = getattr(layer, "input_quantizer", None)
                if q is not None:
                    _check_elementwise(q, f"{where}.input_quantizer")
                wide = copy.deepcopy(layer)
                wide.in_channels *= s
                wide.out_channels *= s
                wide.groups *= s
                self._link_params(wide, peers, ("weight", "bias", "scale"), channels_last)
                out.append(wide)
            elif isinstance(layer, nn.Linear):
                q = getattr(layer, "input_quantizer", None)
                if q is not None:
                    _check_elementwise(q, f"{where}.input_quantizer")
                inner = copy.deepcopy(layer)
                inner.out_features *= s
                self._link_params(inner, peers, ("weight", "bias", "scale"), False)
                out.append(_WideLinear(inner, s))
            elif isinstance(layer, _BatchNorm):
                wide = copy.deepcopy(layer)
                wide.num_features *= s
                self._link_params(wide, peers, ("weight", "bias"), False)
                self._link_buffers(wide, peers, ("running_mean", "running_var"))
                if getattr(wide, "num_batches_tracked", None) is not None:
                    shared = wide.num_batches_tracked
                    shared.copy_(peers[0].num_batches_tracked)
                    for p in peers:
                        p._buffers["num_batches_tracked"] = shared
                out.append(wide)
            elif isinstance(layer, nn.Flatten):
                if layer.start_dim != 1 or layer.end_dim != -1:
                    raise NotVectorizable(f"{where}: only Flatten(start_dim=1, end_dim=-1) can be vectorised")
                out.append(_WideFlatten(s))
            else:
                _check_elementwise(layer, where)
                out.append(copy.deepcopy(layer))
        return out

    def _link_params(self, wide_module: nn.Module, peers: list[nn.Module], names: Iterable[str], channels_last: bool) -> None:
        for name in names:
            first = getattr(peers[0], name, None)
            if not isinstance(first, nn.Parameter):
                continue
            wide = nn.Parameter(_stack_param([getattr(p, name) for p in peers], channels_last),
                                requires_grad=first.requires_grad)
            wide_module._parameters[name] = wide
            link = _Link(wide)
            n = first.shape[0]
            for i, peer in enumerate(peers):
                old = getattr(peer, name)
                view = wide.detach()[i * n:(i + 1) * n]  # same shape as the member's tensor
                peer._parameters[name] = nn.Parameter(view, requires_grad=old.requires_grad)
                link.members.append((peer, name, old.shape))
            self._links.append(link)

    def _link_buffers(self, wide_module: nn.Module, peers: list[nn.Module], names: Iterable[str]) -> None:
        for name in names:
            first = getattr(peers[0], name, None)
            if not isinstance(first, Tensor):
                continue
            wide = torch.cat([getattr(p, name).detach() for p in peers], dim=0)
            wide_module._buffers[name] = wide
            n = first.shape[0]
            for i, peer in enumerate(peers):
                peer._buffers[name] = wide[i * n:(i + 1) * n]

    # ------------------------------------------------------------------ state
    def sync_modes(self) -> None:
        """Copy the members' binary weight modes and ``requires_grad`` flags to the wide tensors.

        Call after anything that changes them on the members, e.g. ``create_optimizer`` (which
        puts binary layers in flip mode, or freezes a route).
        """
        wide_layers = [m for _, m in binary_modules(self.layers)]
        member_layers = [[m for _, m in binary_modules(member)] for member in self.members]
        for i, wide in enumerate(wide_layers):
            modes = {layers[i].weight_mode for layers in member_layers}
            if len(modes) != 1:
                raise ValueError("SeedEnsemble: members disagree on weight_mode; give them the same optimizer type")
            wide.weight_mode = modes.pop()
        for link in self._links:
            flags = {getattr(peer, name).requires_grad for peer, name, _ in link.members}
            link.wide.requires_grad_(any(flags))

    def check_links(self) -> None:
        """Raise ``RuntimeError`` if a member parameter no longer shares memory with the ensemble."""
        for link in self._links:
            base = link.wide.data_ptr()
            size = link.wide.element_size()
            per = link.wide.numel() // self.num_members
            for i, (peer, name, _) in enumerate(link.members):
                p = getattr(peer, name)
                if p.data_ptr() != base + i * per * size:
                    raise RuntimeError(
                        f"member {i} parameter {name!r} was replaced (its .data reassigned); "
                        "it no longer trains inside the SeedEnsemble"
                    )

    def scatter_grads(self) -> None:
        """Give each member parameter its slice of the wide gradient (a view: no copy)."""
        for link in self._links:
            g = link.wide.grad
            n = link.wide.shape[0] // self.num_members
            for i, (peer, name, shape) in enumerate(link.members):
                p = peer._parameters[name]
                if g is None or not p.requires_grad:
                    p.grad = None
                else:
                    p.grad = g[i * n:(i + 1) * n]

    def zero_wide_grads(self) -> None:
        for link in self._links:
            link.wide.grad = None

    def _apply(self, fn: Any, recurse: bool = True) -> SeedEnsemble:  # type: ignore[override]
        # ``.to()``, ``.cuda()``, ``.half()`` ... replace parameter storage, which would cut the
        # members' views; the members would silently stop training.
        raise RuntimeError(
            "SeedEnsemble cannot be moved or cast after it is built (its members' parameters are views "
            "into its tensors); move the member models to the device/dtype first, then build the ensemble"
        )

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, shared: bool = False) -> Tensor:  # type: ignore[override]
        s = self.num_members
        if shared:
            sample = tuple(x.shape[1:])
            b = x.shape[0]
            merged = x.unsqueeze(1).expand(b, s, *sample).reshape(b, s * sample[0], *sample[1:])
        else:
            if x.shape[0] != s:
                raise ValueError(f"SeedEnsemble of {s} members expects input (S={s}, B, ...), got {tuple(x.shape)}")
            sample = tuple(x.shape[2:])
            b = x.shape[1]
            merged = x.transpose(0, 1).reshape(b, s * sample[0], *sample[1:])
        if self.input_shape is not None and sample != tuple(self.input_shape):
            raise ValueError(f"the models expect samples of shape {tuple(self.input_shape)}, got {sample}")
        out = self.layers(merged)
        return out.reshape(b, s, out.shape[1] // s, *out.shape[2:]).transpose(0, 1)


class SeedOptimizer:
    """The members' optimizers of a :class:`SeedEnsemble`, stepped as one.

    ``step()`` hands each member its gradient slice, clips it per member (``grad_clip``), then
    steps every member's optimizer; ``zero_grad()`` clears member and wide gradients. It exposes
    ``optimizers`` (``{"member0": ..., ...}``) and ``param_groups`` so that
    :func:`flipnet.train.fast.make_train_step` (hyperparameter tensors, CUDA graphs) treats it
    like a routed optimizer.
    """

    def __init__(self, ensemble: SeedEnsemble, optimizers: Sequence[Any], grad_clip: float | None = None) -> None:
        if len(optimizers) != ensemble.num_members:
            raise ValueError(f"need one optimizer per member ({ensemble.num_members}), got {len(optimizers)}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip!r}")
        self.ensemble = ensemble
        self.optimizers: dict[str, Any] = {f"member{i}": opt for i, opt in enumerate(optimizers)}
        self.grad_clip = grad_clip
        self._member_params = [[p for p in m.parameters() if p.requires_grad] for m in ensemble.members]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @torch.no_grad()
    def step(self) -> None:
        self.ensemble.scatter_grads()
        for params, opt in zip(self._member_params, self.optimizers.values()):
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.grad_clip)
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)
        self.ensemble.zero_wide_grads()


def _member_loss(out: Tensor, y: Tensor) -> Tensor:
    """Per-member mean cross-entropy, shape ``(S,)``; dense targets average over pixels too."""
    s, b = y.shape[0], y.shape[1]
    flat = F.cross_entropy(out.flatten(0, 1).float(), y.flatten(0, 1), reduction="none")
    return flat.reshape(s, b, -1).mean(dim=(1, 2))


def _ensemble_loss(out: Tensor, y: Tensor) -> Tensor:
    # Σ_s mean_s: the gradient of member s is that of its own batch-mean loss.
    return _member_loss(out, y).sum()


def _ensemble_metrics(out: Tensor, y: Tensor, loss: Tensor) -> tuple[Tensor, Tensor]:
    per = _member_loss(out, y) * y.shape[1]
    hits = (out.argmax(dim=2) == y).reshape(y.shape[0], -1).sum(dim=1)
    return per, hits


# ----------------------------------------------------------------------------- configs
_FREE_KEYS = ("seed", "seeds", "output", "description", "name")


def _structure(config: Any) -> dict[str, Any]:
    """The parts of a config that members of one group must share."""
    from .config import config_to_dict

    d = config_to_dict(config)
    for k in _FREE_KEYS:
        d.pop(k, None)
    optim = d.get("optim", {})
    for k in ("binary_kwargs", "real_kwargs", "schedules", "weight_clip"):
        optim.pop(k, None)
    return d


def sweep_configs(config: Any, key: str, values: Sequence[Any]) -> list[Any]:
    """Copies of ``config`` with ``key`` (a dotted recipe key) set to each of ``values``.

    Example:
        >>> sweep_configs(cfg, "optim.binary_kwargs.gamma", [1e-4, 1e-3])
    """
    from .config import apply_overrides, config_from_dict, config_to_dict

    if not values:
        raise ConfigError(f"sweep over {key} needs at least one value")
    raw = config_to_dict(config)
    out = []
    for v in values:
        text = json.dumps(v) if not isinstance(v, str) else v
        out.append(config_from_dict(apply_overrides(raw, [f"{key}={text}"])))
    return out


# ----------------------------------------------------------------------------- results
def summarize(results: Sequence[dict[str, Any]], keys: Sequence[str] = ("test_acc", "best_test_acc", "test_loss", "train_acc", "train_loss")) -> dict[str, Any]:
    """Mean, sample standard deviation (n−1), min and max of ``keys`` over runs.

    A key missing (or ``None``) in some run is summarised over the others; ``std`` is 0.0 for
    a single run.
    """
    out: dict[str, Any] = {"n": len(results)}
    for k in keys:
        vals = [float(r[k]) for r in results if r.get(k) is not None and math.isfinite(float(r[k]))]
        if not vals:
            continue
        out[k] = {
            "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals),
            "max": max(vals),
        }
    return out


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns and not k.startswith("flip_ratio/"):
                columns.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------- training
def _build_schedulers(config: Any, optimizer: Any, steps_per_epoch: int) -> list[Any]:
    """The recipe's ``optim.schedules`` for one member (same rules as the trainer)."""
    from flipnet.optim import schedules as S

    out = []
    epochs = config.train.epochs
    for i, s in enumerate(config.optim.schedules):
        where = f"optim.schedules[{i}]"
        try:  # the selection of the trainer's scheduler_from_dict (skips placeholder lr = 0.0)
            groups = S._select_groups(optimizer, s.key, s.route)
        except ValueError:
            raise ConfigError(f"{where}: no parameter group of route {s.route or 'any'} has the key {s.key!r}") from None
        initial = groups[0][s.key]
        initial = float(initial.item() if isinstance(initial, Tensor) else initial)
        duration = epochs * steps_per_epoch if s.unit == "step" else epochs
        try:
            schedule = S.schedule_from_dict({"type": s.type, **s.params}, initial, duration)
            out.append(S.HyperparamScheduler(optimizer, s.key, schedule, unit=s.unit, route=s.route))
        except FlipnetError as e:
            raise ConfigError(f"{where}: {e}") from None
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"{where}: {e}") from None
    return out


def _member_label(config: Any, sweep_key: str | None) -> str:
    label = f"seed_{config.seed}"
    if sweep_key is not None:
        node: Any = config
        for part in sweep_key.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        label = f"{sweep_key.split('.')[-1]}={node}-{label}"
    return label


def _group_dir(config: Any) -> Path:
    out = config.output
    if out.name:
        run_dir = Path(out.dir) / out.name
        if (run_dir / "summary.json").exists() or (run_dir / "seeds.csv").exists():
            raise ConfigError(f"run folder {run_dir} already holds a multi-seed run; choose another output.name")
        return run_dir
    base = Path(out.dir) / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, i = base, 1
    while run_dir.exists():
        run_dir = Path(f"{base}-{i}")
        i += 1
    return run_dir


def train_group(
    configs: Sequence[Any],
    *,
    vectorize: bool | str = "auto",
    run_dir: str | Path | None = None,
    labels: Sequence[str] | None = None,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Train several configurations that share data, model and schedule lengths, in one process.

    Members may differ in ``seed`` and in optimizer hyperparameter values (``optim.binary_kwargs``,
    ``optim.real_kwargs``, ``optim.schedules``, ``optim.weight_clip``); everything else must be
    equal. NaN/inf losses are checked once per epoch (not every ``train.nan_check_every`` steps).

    Args:
        configs: validated recipes (:func:`flipnet.train.load_config`).
        vectorize: ``True``: one wide network (:class:`SeedEnsemble`); ``False``: one
            :class:`~flipnet.train.Trainer` run after the other; ``"auto"``: vectorise when the
            model allows it, else run one after the other (with a warning).
        run_dir: the group's folder (default from ``configs[0].output``); member ``i`` writes a
            normal run folder ``run_dir/<label>`` (``config.yaml``, ``metrics.csv``,
            ``checkpoints/``) that ``flipnet eval`` / ``export`` accept.
        labels: member folder names (default ``seed_<seed>``).
        verbose: print one line per epoch.

    Returns:
        One dict per member: ``label``, ``seed``, ``run_dir``, the last epoch's ``train_loss``,
        ``train_acc``, ``test_loss``, ``test_acc``, ``best_test_acc``, ``epochs``, ``time_s``.
        The group folder gets ``seeds.csv`` (these rows), ``metrics.csv`` (every member's
        epochs) and ``summary.json`` (mean ± std over members, wall time, mode).
    """
    if not configs:
        raise ConfigError("train_group needs at least one configuration")
    ref = _structure(configs[0])
    for i, c in enumerate(configs[1:], start=1):
        if _structure(c) != ref:
            raise ConfigError(
                f"configuration {i} differs from the first in more than seed and optimizer hyperparameters; "
                "runs trained together must share data, model, batch size, epochs and optimizer types"
            )
    labels = list(labels) if labels is not None else [f"seed_{c.seed}" for c in configs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"member labels must be distinct, got {labels}; use distinct seeds")
    if vectorize not in (True, False, "auto"):
        raise ConfigError(f"vectorize must be true, false or auto, got {vectorize!r}")
    group_dir = Path(run_dir) if run_dir is not None else _group_dir(configs[0])
    group_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    mode = "vectorized"
    if vectorize is False:
        results, rows = _train_sequential(configs, labels, group_dir, verbose)
        mode = "sequential"
    else:
        try:
            results, rows = _train_vectorized(configs, labels, group_dir, verbose)
        except NotVectorizable as e:
            if vectorize is True:
                raise
            warnings.warn(f"{e}; training the runs one after the other", stacklevel=2)
            results, rows = _train_sequential(configs, labels, group_dir, verbose)
            mode = "sequential"
    wall = time.perf_counter() - started
    _write_csv(group_dir / "seeds.csv", results)
    _write_csv(group_dir / "metrics.csv", rows)
    from .config import dump_config

    atomic_write_text(group_dir / "config.yaml", dump_config(configs[0]))
    summary = {
        "name": configs[0].name,
        "mode": mode,
        "members": labels,
        "seeds": [c.seed for c in configs],
        "wall_time_s": wall,
        "device": results[0].get("device") if results else None,
        **summarize(results),
    }
    atomic_write_text(group_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if verbose:
        acc = summary.get("test_acc")
        if acc:
            print(f"{group_dir}: test_acc {acc['mean']:.4f} ± {acc['std']:.4f} over {len(results)} runs ({mode}, {wall:.1f}s)", flush=True)
    return results


def _train_sequential(configs: Sequence[Any], labels: list[str], group_dir: Path, verbose: bool) -> tuple[list[dict], list[dict]]:
    import dataclasses

    from .loop import Trainer

    results, rows = [], []
    for cfg, label in zip(configs, labels):
        cfg = copy.deepcopy(cfg)
        cfg.seeds = None
        cfg.output = dataclasses.replace(cfg.output, dir=str(group_dir), name=label)
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        last = trainer.fit()
        for r in (trainer.logger.rows if trainer.logger else []):
            rows.append({"member": label, "seed": cfg.seed, **r})
        results.append(_result_row(label, cfg.seed, trainer.run_dir, last, time.perf_counter() - t0, trainer.device))
    return results, rows


def _result_row(label: str, seed: int, run_dir: Path, last: dict[str, Any], time_s: float, device: Any) -> dict[str, Any]:
    return {
        "label": label,
        "seed": seed,
        "epochs": last.get("epoch"),
        "train_loss": last.get("train_loss"),
        "train_acc": last.get("train_acc"),
        "test_loss": last.get("test_loss"),
        "test_acc": last.get("test_acc"),
        "best_test_acc": last.get("best_test_acc"),
        "flip_ratio": last.get("flip_ratio"),
        "time_s": time_s,
        "device": str(device),
        "run_dir": str(run_dir),
    }


@torch.no_grad()
def _evaluate_ensemble(ensemble: SeedEnsemble, loader: Any, amp_dtype: torch.dtype | None, device: torch.device) -> list[dict[str, float]]:
    was = ensemble.training
    ensemble.eval()
    s = ensemble.num_members
    sums = torch.zeros(s, 2, device=device, dtype=torch.float64)
    n_samples = n_targets = 0
    try:
        for x, y in loader:
            ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else torch.autocast(device.type, enabled=False)
            with ctx:
                out = ensemble(x, shared=True)
            ys = y.unsqueeze(0).expand(s, *y.shape)
            per = _member_loss(out.float(), ys)
            sums[:, 0] += per.double() * y.shape[0]
            sums[:, 1] += (out.argmax(dim=2) == ys).reshape(s, -1).sum(dim=1)
            n_samples += y.shape[0]
            n_targets += y.numel()
    finally:
        ensemble.train(was)
    if n_samples == 0:
        raise ConfigError("the test set is empty; check data.test_subset")
    vals = sums.tolist()
    return [{"loss": v[0] / n_samples, "acc": v[1] / n_targets} for v in vals]


def _train_vectorized(configs: Sequence[Any], labels: list[str], group_dir: Path, verbose: bool) -> tuple[list[dict], list[dict]]:
    from flipnet.metrics import FlipRatio
    from flipnet.optim import create_optimizer

    from .checkpoint import get_rng_state, save_checkpoint
    from .config import config_to_dict, dump_config
    from .fast import make_train_step
    from .loop import MetricsLogger, _load_init_weights, build_model, hyperparameter_values, load_data, resolve_device

    base = configs[0]
    t = base.train
    device = resolve_device(t.device)
    if t.amp == "auto":
        amp_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    else:
        amp_dtype = torch.bfloat16 if t.amp else None
    use_compile = (device.type == "cuda") if t.compile == "auto" else bool(t.compile)
    channels_last = (device.type == "cuda") if t.channels_last == "auto" else bool(t.channels_last)

    seed_everything(base.seed)
    data = load_data(base)
    if data.task != "classification":
        raise NotVectorizable("vectorised multi-run training supports classification data sets only")

    # -- members: the model of a separate run with that seed, its optimizer and schedules
    models = []
    for cfg in configs:
        seed_everything(cfg.seed)
        m = build_model(cfg, data.num_classes, data.input_shape)
        if cfg.model.init_from:
            _load_init_weights(m, cfg.model.init_from)
        models.append(m.to(device))
    ensemble = SeedEnsemble(models, channels_last=channels_last)  # may raise NotVectorizable
    optimizers = []
    for cfg, m in zip(configs, models):
        o = cfg.optim
        try:
            optimizers.append(create_optimizer(
                m, binary=o.binary, binary_kwargs=dict(o.binary_kwargs), real=o.real,
                real_kwargs=dict(o.real_kwargs), weight_clip=o.weight_clip,
            ))
        except (TypeError, ValueError, KeyError) as e:
            if isinstance(e, FlipnetError):
                raise
            raise ConfigError(f"optim: {e}") from None
    ensemble.sync_modes()
    ensemble.check_links()
    seed_opt = SeedOptimizer(ensemble, optimizers, grad_clip=t.grad_clip)

    # -- data: each member sees the batches of a separate run with its seed
    from flipnet.data import make_loader

    loaders = [
        make_loader(data, "train", base.data.batch_size, train=True, device=device, augment=base.data.augment, seed=c.seed)
        for c in configs
    ]
    test_loader = make_loader(data, "test", base.data.eval_batch_size, train=False, device=device, augment=False, seed=base.seed)
    steps_per_epoch = len(loaders[0])
    schedulers = [_build_schedulers(c, opt, steps_per_epoch) for c, opt in zip(configs, optimizers)]
    flip_ratios = [FlipRatio(m, opt) for m, opt in zip(models, optimizers)]

    step_fn = make_train_step(
        ensemble, seed_opt, _ensemble_loss, amp_dtype=amp_dtype, cuda_graphs=t.cuda_graphs,
        compile=use_compile, metrics_fn=_ensemble_metrics,
    )

    # -- member run folders
    member_dirs = [group_dir / label for label in labels]
    loggers = []
    for cfg, d in zip(configs, member_dirs):
        d.mkdir(parents=True, exist_ok=True)
        member_cfg = copy.deepcopy(cfg)
        member_cfg.seeds = None
        atomic_write_text(d / "config.yaml", dump_config(member_cfg))
        loggers.append(MetricsLogger(d))
    s = len(configs)
    best = [-math.inf] * s
    step = 0
    all_rows: list[dict[str, Any]] = []
    last_rows: list[dict[str, Any]] = [{} for _ in range(s)]
    member_time = [0.0] * s
    scheduled = {(sc.route, sc.key) for c in configs for sc in c.optim.schedules}
    for epoch in range(t.epochs):
        t0 = time.perf_counter()
        ensemble.train()
        for fr in flip_ratios:
            fr.reset()
        sums = torch.zeros(2, s, device=device, dtype=torch.float32)
        n_samples = n_targets = 0
        for ld in loaders:
            if hasattr(ld, "set_epoch"):
                ld.set_epoch(epoch)
        for batches in zip(*loaders):
            x = torch.stack([b[0] for b in batches])
            y = torch.stack([b[1] for b in batches])
            loss_sum, correct = step_fn(x, y)
            sums[0] += loss_sum
            sums[1] += correct
            n_samples += int(y.shape[1])
            n_targets += int(y[0].numel())
            step += 1
            for member in schedulers:
                for sch in member:
                    if getattr(sch, "unit", "step") == "step":
                        sch.step()
        loss_tot, correct_tot = sums.double().tolist()
        hparams = [hyperparameter_values(opt, scheduled) for opt in optimizers]
        for member in schedulers:
            for sch in member:
                if getattr(sch, "unit", "step") == "epoch":
                    sch.step()
        flips = [fr.compute() for fr in flip_ratios]
        done = epoch + 1
        evals: list[dict[str, float] | None] = [None] * s
        if done % t.eval_every == 0 or done == t.epochs:
            evals = list(_evaluate_ensemble(ensemble, test_loader, amp_dtype, device))
        elapsed = time.perf_counter() - t0
        for i in range(s):
            row: dict[str, Any] = {
                "epoch": done,
                "step": step,
                "train_loss": loss_tot[i] / max(n_samples, 1),
                "train_acc": correct_tot[i] / max(n_targets, 1),
                "test_loss": evals[i]["loss"] if evals[i] else None,
                "test_acc": evals[i]["acc"] if evals[i] else None,
            }
            if not math.isfinite(row["train_loss"]):
                raise _diverged(labels[i], done)
            row.update(hparams[i])
            if flips[i]:
                row["flip_ratio"] = float(flips[i].get("total", float("nan")))
                for name, v in flips[i].items():
                    if name != "total":
                        row[f"flip_ratio/{name}"] = float(v)
            row["time_s"] = elapsed
            member_time[i] += elapsed
            state = {
                "model": models[i].state_dict(),
                "optimizer": optimizers[i].state_dict(),
                "schedulers": [sch.state_dict() for sch in schedulers[i]],
                "epoch": done,
                "step": step,
                "batch_in_epoch": 0,
                "rng": get_rng_state(),
                "config": config_to_dict(configs[i]),
                "best": best[i],
                "meta": {
                    "num_classes": int(data.num_classes),
                    "input_shape": [int(v) for v in data.input_shape],
                    "task": str(data.task),
                    "world_size": 1,
                    "multi": {"members": s, "index": i},
                },
            }
            ckpt_dir = member_dirs[i] / "checkpoints"
            if row["test_acc"] is not None and row["test_acc"] > best[i]:
                best[i] = row["test_acc"]
                state["best"] = best[i]
                save_checkpoint(ckpt_dir / "best.pt", state)
            save_checkpoint(ckpt_dir / "last.pt", state)
            row["best_test_acc"] = None if not math.isfinite(best[i]) else best[i]
            loggers[i].append(row)
            all_rows.append({"member": labels[i], "seed": configs[i].seed, **row})
            last_rows[i] = row
        if verbose:
            accs = " ".join(
                f"{r['test_acc']:.4f}" if r.get("test_acc") is not None else f"(train {r['train_acc']:.4f})" for r in last_rows
            )
            print(f"epoch {done}/{t.epochs} | {s} runs | test acc {accs} | {elapsed:.1f}s", flush=True)
    results = [
        _result_row(labels[i], configs[i].seed, member_dirs[i], last_rows[i], member_time[i], device) for i in range(s)
    ]
    return results, all_rows


def _diverged(label: str, epoch: int) -> Exception:
    from flipnet.errors import TrainingDiverged

    return TrainingDiverged(
        f"run {label}: the training loss became NaN/inf in epoch {epoch}; stopped. "
        "Lower the learning rate / Bop gamma or set train.grad_clip"
    )


def train_seeds(config: Any, seeds: Sequence[int] | None = None, *, vectorize: bool | str = "auto",
                verbose: bool = True) -> list[dict[str, Any]]:
    """Train ``config`` once per seed, all seeds together in one process.

    Args:
        config: a validated recipe (:func:`flipnet.train.load_config`).
        seeds: the seeds; default ``config.seeds``, else ``[config.seed]``.
        vectorize: see :func:`train_group`.
        verbose: print one line per epoch.

    Returns:
        One result dict per seed (see :func:`train_group`); ``runs/<name>/seeds.csv`` and
        ``summary.json`` hold the same rows and their mean ± std.

    Example:
        >>> from flipnet.train import load_config
        >>> rows = train_seeds(load_config("digits_bop", ["train.epochs=3"]), [0, 1, 2])
        >>> [r["test_acc"] for r in rows]
    """
    seeds = list(seeds if seeds is not None else (config.seeds or [config.seed]))
    if not seeds:
        raise ConfigError("seeds must be a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct, got {seeds}")
    configs = []
    for sd in seeds:
        if isinstance(sd, bool) or not isinstance(sd, int):
            raise ConfigError(f"seeds must be integers, got {sd!r}")
        c = copy.deepcopy(config)
        c.seed = int(sd)
        c.seeds = None
        configs.append(c)
    return train_group(configs, vectorize=vectorize, verbose=verbose)


def train_sweep(config: Any, key: str, values: Sequence[Any], seeds: Sequence[int] | None = None, *,
                vectorize: bool | str = "auto", verbose: bool = True) -> list[dict[str, Any]]:
    """Train ``config`` for each value of one hyperparameter (× each seed), all together.

    Args:
        config: a validated recipe.
        key: dotted recipe key of an optimizer hyperparameter, e.g. ``optim.binary_kwargs.gamma``.
        values: the values to try.
        seeds: seeds per value (default ``config.seeds`` or ``[config.seed]``).

    Returns:
        One result dict per (value, seed), labelled ``<last key part>=<value>-seed_<seed>``, with
        the swept ``value`` added.
    """
    seeds = list(seeds if seeds is not None else (config.seeds or [config.seed]))
    configs, labels = [], []
    for cfg in sweep_configs(config, key, values):
        for sd in seeds:
            c = copy.deepcopy(cfg)
            c.seed = int(sd)
            c.seeds = None
            configs.append(c)
            labels.append(_member_label(c, key))
    vals = [v for v in values for _ in seeds]
    results = train_group(configs, vectorize=vectorize, labels=labels, verbose=verbose)
    for r, v in zip(results, vals):
        r["value"] = v
    return results
