"""One optimisation step, fast: the code path shared by the plain loop and the GPU fast path.

:func:`make_train_step` builds a callable ``step(x, y) -> (loss_sum, n_correct)`` that runs

1. the forward pass (under :func:`torch.autocast` when ``amp_dtype`` is given),
2. the loss and its backward pass,
3. optional gradient-norm clipping,
4. ``optimizer.step()`` and ``optimizer.zero_grad(set_to_none=True)``,
5. ``after_step()`` (e.g. :func:`flipnet.layers.apply_constraints`),

and returns the summed loss and the number of correct predictions of the batch as detached
0-d tensors *on the device*. Nothing in the step reads a value back to the host, so the Python
loop can run ahead of the accelerator; read the sums once per epoch (or every few hundred
steps), not after every step.

Three execution modes share that one definition:

``eager`` (default)
    Plain PyTorch. Works everywhere.
``compile=True``
    The model's forward (and, through AOTAutograd, its backward) is compiled with
    :func:`torch.compile`; the optimizer step stays eager.
``cuda_graphs=True``
    The *whole* step -- forward, backward, clipping, optimizer step, constraints -- is captured
    once into a :class:`torch.cuda.CUDAGraph` and replayed for every batch of the captured
    shape, which removes the per-kernel launch cost that dominates small models such as
    BinaryNet at moderate batch sizes. Requirements:

    * CUDA tensors (on CPU the step falls back to eager with a warning);
    * hyperparameters that a schedule changes must be 0-d device tensors, updated in place
      (:func:`tensorize_hyperparameters` converts them; a schedule that assigns a new Python
      number is detected before each replay and copied into the captured tensor, so any
      scheduler works);
    * optimizers whose ``step()`` never reads a value back to the host: flipnet's flip
      optimizers, and torch's Adam/AdamW with ``capturable=True`` (set automatically);
    * no fp16 loss scaling (use ``amp_dtype=torch.bfloat16``).

    The first ``warmup_steps`` calls run eagerly on a side stream (they are real training steps
    on real batches: cuDNN/cuBLAS select their kernels and optimizers create their state); the
    next call captures the graph and replays it. A batch of another shape than the captured one
    (e.g. a short last batch) is run eagerly on the same parameters and optimizer state.

Precision (``train.precision``): :func:`select_precision` resolves ``fp32``, ``tf32``, ``bf16``,
``int8`` or ``auto`` for a device into a :class:`Precision`, whose ``amp_dtype`` goes to
:func:`make_train_step` and whose :meth:`Precision.apply` switches the binary layers' exact int8
forward (CPU) on or off; the exactness of each mode is listed in :class:`Precision`.

Example:
    >>> step = make_train_step(model, optimizer, torch.nn.functional.cross_entropy)
    >>> loss_sum = torch.zeros((), device=device); correct = torch.zeros((), device=device)
    >>> for x, y in loader:
    ...     l, c = step(x, y)
    ...     loss_sum += l; correct += c
    >>> print(loss_sum.item() / n, correct.item() / n)   # one host sync per epoch
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Any, Callable, Iterable, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "Precision",
    "select_precision",
    "cpu_features",
    "TrainStep",
    "make_train_step",
    "prepare_model",
    "tensorize_hyperparameters",
    "leaf_optimizers",
    "count_correct",
    "LossFn",
    "MetricsFn",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
#: ``metrics_fn(output, target, loss) -> (loss_sum, n_correct)``: what a step reports.
MetricsFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
StepMode = Literal["eager", "compile", "cuda_graphs", "compile+cuda_graphs"]

# Hyperparameters that flipnet schedules move and that torch's own optimizers accept as tensors
# under ``capturable=True`` without a host sync. Other torch-optimizer keys (betas, eps,
# weight_decay) stay Python numbers: torch reads them with ``alpha=`` arguments, which would
# copy a device tensor to the host.
_TORCH_TENSOR_KEYS: tuple[str, ...] = ("lr",)


def leaf_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The plain optimizers inside ``optimizer`` (a ``RoutedOptimizer``'s routes, or itself)."""
    inner = getattr(optimizer, "optimizers", None)
    if isinstance(inner, dict):
        out: list[torch.optim.Optimizer] = []
        for opt in inner.values():
            out.extend(leaf_optimizers(opt))
        return out
    return [optimizer]


def _all_optimizers(optimizer: Any) -> list[Any]:
    """``optimizer`` and every optimizer nested in it (routers included), outermost first."""
    out = [optimizer]
    inner = getattr(optimizer, "optimizers", None)
    if isinstance(inner, dict):
        for opt in inner.values():
            out.extend(_all_optimizers(opt))
    return out


def _is_flip_optimizer(opt: Any) -> bool:
    try:
        from flipnet.optim.base import FlipOptimizer  # noqa: PLC0415 (keeps import of fast cheap)
    except ImportError:  # pragma: no cover - partial installs
        return False
    return isinstance(opt, FlipOptimizer)


def _param_device(opt: torch.optim.Optimizer) -> torch.device | None:
    for group in opt.param_groups:
        for p in group["params"]:
            return p.device
    return None


@torch.no_grad()
def tensorize_hyperparameters(
    optimizer: Any, device: torch.device | str | None = None, keys: Iterable[str] | None = None
) -> dict[str, list[str]]:
    """Hold scheduled hyperparameters as 0-d tensors on the parameters' device.

    A CUDA graph captures the *memory* a kernel reads, not Python numbers; a learning rate or
    a Bop threshold that a schedule changes must therefore live in a device tensor that the
    schedule updates in place (``tensor.fill_(value)``, which is what flipnet's
    ``HyperparamScheduler`` and torch's LR schedulers do with tensor values).

    * Flip optimizers (``flipnet.optim.FlipOptimizer``): every float entry of the group that
      also appears in the optimizer's ``defaults`` (``gamma``, ``threshold``, ``sigma``, ...),
      or the given ``keys``.
    * torch optimizers with a ``capturable`` option (Adam, AdamW, ...) on a CUDA device: ``lr``
      only, and ``capturable`` is switched on (existing ``step`` counters are moved to the
      device). torch allows ``capturable`` on accelerators only, so on CPU they are left alone.
    * Other optimizers (e.g. SGD) are left alone: their step turns a tensor ``lr`` into a host
      value, so they cannot be captured with a changing learning rate.

    Args:
        optimizer: a ``torch.optim.Optimizer`` or a ``flipnet.optim.RoutedOptimizer``.
        device: target device; default: the device of each optimizer's first parameter.
        keys: restrict to these hyperparameter names.

    Returns:
        ``{optimizer class name: [converted keys]}`` for the optimizers that were changed.
    """
    wanted = None if keys is None else set(keys)
    changed: dict[str, list[str]] = {}
    for opt in leaf_optimizers(optimizer):
        dev = torch.device(device) if device is not None else _param_device(opt)
        if dev is None:
            continue
        if _is_flip_optimizer(opt):
            candidates = {k for k, v in opt.defaults.items() if isinstance(v, (int, float, Tensor)) and not isinstance(v, bool)}
        elif "capturable" in opt.defaults and dev.type == "cuda":
            candidates = set(_TORCH_TENSOR_KEYS)
            for group in opt.param_groups:
                group["capturable"] = True
            for state in opt.state.values():
                step = state.get("step") if isinstance(state, dict) else None
                if isinstance(step, Tensor) and step.device != dev:
                    state["step"] = step.to(device=dev, dtype=torch.float32)
        else:
            continue
        if wanted is not None:
            candidates &= wanted
        done: list[str] = []
        for group in opt.param_groups:
            for key in sorted(candidates):
                value = group.get(key)
                if isinstance(value, bool) or value is None:
                    continue
                if isinstance(value, Tensor):
                    if value.dim() == 0 and value.device == dev:
                        continue
                    group[key] = value.detach().to(dev, torch.float32).reshape(())
                elif isinstance(value, (int, float)):
                    group[key] = torch.tensor(float(value), device=dev, dtype=torch.float32)
                else:
                    continue
                if key not in done:
                    done.append(key)
        if done:
            changed[type(opt).__name__] = done
    return changed


def count_correct(output: Tensor, target: Tensor) -> Tensor:
    """Number of correct arg-max predictions, as a 0-d device tensor (no host sync).

    Works for classification (``output (N, C)``, ``target (N,)``) and dense prediction
    (``output (N, C, H, W)``, ``target (N, H, W)``: correct pixels). Targets that are not
    class indices (floating point) count as 0 correct.
    """
    if target.is_floating_point() or output.dim() < 2:
        return torch.zeros((), device=output.device, dtype=torch.int64)
    return (output.detach().argmax(dim=1) == target).sum()


def prepare_model(
    model: nn.Module, device: torch.device | str, channels_last: bool | Literal["auto"] = "auto"
) -> nn.Module:
    """Move ``model`` to ``device`` and, if asked, to the channels-last memory format.

    Channels-last (NHWC) lets cuDNN use its fastest convolution kernels with tensor cores; a
    convolution whose weight is channels-last produces channels-last activations from a
    standard (NCHW) input, so the loader need not change. ``"auto"`` turns it on for CUDA
    devices when the model has 2-D convolutions, off otherwise (on CPU it is usually slower).

    Returns:
        the same module (moved in place).
    """
    device = torch.device(device)
    model.to(device)
    if channels_last == "auto":
        channels_last = device.type == "cuda" and any(
            isinstance(m, nn.Conv2d) for m in model.modules()
        )
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _bind_hparams(optimizer: Any) -> list[tuple[dict, str, Tensor]]:
    """The tensor hyperparameters a captured graph reads: ``(group, key, tensor)``."""
    bound = []
    for opt in leaf_optimizers(optimizer):
        for group in opt.param_groups:
            for key, value in group.items():
                if key != "params" and isinstance(value, Tensor) and value.dim() == 0:
                    bound.append((group, key, value))
    return bound


class TrainStep:
    """A compiled/captured training step; call it as ``step(x, y) -> (loss_sum, n_correct)``.

    Build it with :func:`make_train_step`. Attributes:

    Attributes:
        model: the module as given (parameters are shared with the forward module).
        forward_module: what the forward pass calls (the compiled module under ``compile``).
        optimizer: the optimizer stepped after every backward pass.
        mode: ``"eager"``, ``"compile"``, ``"cuda_graphs"`` or ``"compile+cuda_graphs"`` -- what
            actually runs after fallbacks.
        graph_replays: number of steps served by the CUDA graph.
        eager_steps: number of steps run eagerly (warm-up and odd-shaped batches included).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        loss_fn: LossFn,
        *,
        amp_dtype: torch.dtype | None = None,
        cuda_graphs: bool = False,
        compile: bool = False,
        grad_clip: float | None = None,
        after_step: Callable[[], None] | None = None,
        warmup_steps: int = 3,
        compile_kwargs: dict[str, Any] | None = None,
        metrics_fn: MetricsFn | None = None,
    ) -> None:
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be a positive number or None, got {grad_clip!r}")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be at least 1, got {warmup_steps!r}")
        if amp_dtype is not None and amp_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be torch.bfloat16, torch.float16 or None, got {amp_dtype!r}")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.amp_dtype = amp_dtype
        self.grad_clip = grad_clip
        self.after_step = after_step
        self.warmup_steps = warmup_steps
        self.metrics_fn = metrics_fn
        self.graph_replays = 0
        self.eager_steps = 0
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.forward_module: nn.Module | Callable[..., Tensor] = model
        if compile:
            self.forward_module = torch.compile(model, **(compile_kwargs or {}))
        self._scaler: torch.amp.GradScaler | None = None
        device = self._model_device()
        if amp_dtype is torch.float16 and device.type == "cuda":
            self._scaler = torch.amp.GradScaler("cuda")
        self._graphs = bool(cuda_graphs)
        if self._graphs:
            reason = None
            if device.type != "cuda" or not torch.cuda.is_available():
                reason = f"the model is on {device.type}, CUDA graphs need a CUDA device"
            elif self._scaler is not None:
                reason = "fp16 loss scaling reads a value back to the host; use amp_dtype=torch.bfloat16"
            elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
                reason = "DistributedDataParallel's gradient all-reduce is not captured by this step"
            if reason is not None:
                warnings.warn(f"cuda_graphs=True ignored ({reason}); running the step eagerly", stacklevel=3)
                self._graphs = False
            else:
                tensorize_hyperparameters(optimizer, device)
        base = "compile" if compile else "eager"
        self.mode: StepMode = ("compile+cuda_graphs" if compile else "cuda_graphs") if self._graphs else base  # type: ignore[assignment]
        # CUDA-graph state
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_x: Tensor | None = None
        self._static_y: Tensor | None = None
        self._static_out: tuple[Tensor, Tensor] | None = None
        self._bound: list[tuple[dict, str, Tensor]] = []
        self._side_stream: torch.cuda.Stream | None = None

    # ----------------------------------------------------------------- helpers
    def _model_device(self) -> torch.device:
        for t in self.model.parameters():
            return t.device
        for t in self.model.buffers():
            return t.device
        return torch.device("cpu")

    def _autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # The autocast weight cache must be off while capturing/replaying a graph.
        return torch.autocast(device_type=device_type, dtype=self.amp_dtype, cache_enabled=not self._graphs)

    def _forward_backward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with self._autocast(x.device.type):
            out = self.forward_module(x)
            # a loss that declares ``takes_input = True`` (distillation: the teacher runs on x) gets the batch too
            loss = self.loss_fn(out, y, x) if getattr(self.loss_fn, "takes_input", False) else self.loss_fn(out, y)
        if self._scaler is not None:
            self._scaler.scale(loss).backward()
            if self.grad_clip is not None:
                self._scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            loss.backward()
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step()
        if self.metrics_fn is not None:
            return self.metrics_fn(out.detach(), y, loss.detach())
        loss_sum = loss.detach().float() * y.shape[0]
        return loss_sum, count_correct(out, y)

    def _eager(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.eager_steps += 1
        return self._forward_backward(x, y)

    def _sync_hparams(self) -> None:
        # A schedule that assigned a new number (or a new tensor) instead of updating the
        # captured tensor in place: copy the value into the tensor the graph reads.
        for group, key, tensor in self._bound:
            value = group[key]
            if value is not tensor:
                if isinstance(value, Tensor):
                    tensor.copy_(value.detach())
                else:
                    tensor.fill_(float(value))
                group[key] = tensor

    def _capture(self, x: Tensor, y: Tensor) -> None:
        # Again at capture time: a checkpoint loaded since construction replaces the param
        # groups (plain numbers, capturable=False) and the graph must read device tensors.
        tensorize_hyperparameters(self.optimizer, x.device)
        self._static_x = x.detach().clone()
        self._static_y = y.detach().clone()
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_out = self._forward_backward(self._static_x, self._static_y)
        self._graph = graph
        self._bound = _bind_hparams(self.optimizer)
        # Capturing called ``step()`` once without running it: undo host-side step counters.
        self._advance_host_counters(-1)

    def _advance_host_counters(self, n: int) -> None:
        """Keep Python-side step counters (``FlipOptimizer.num_steps``) right under graphs.

        A replay runs the captured kernels but not the Python code of ``step()``, so counters
        kept as Python integers are advanced here instead.
        """
        for opt in _all_optimizers(self.optimizer):
            if isinstance(getattr(opt, "_num_steps", None), int):
                opt._num_steps += n

    # ------------------------------------------------------------------ call
    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Train on one batch; returns ``(loss_sum, n_correct)`` as detached device tensors.

        ``loss_sum`` is the batch-mean loss times the batch size (float32), so summing it over
        an epoch and dividing by the number of samples gives the epoch's mean loss.
        ``n_correct`` counts correct arg-max predictions (pixels for segmentation).
        """
        if not self._graphs:
            return self._eager(x, y)
        if self._graph is None:
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(device=x.device)
            stream = self._side_stream
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                if self.eager_steps < self.warmup_steps:
                    result = self._eager(x, y)
                else:
                    self._capture(x, y)
                    result = None
            torch.cuda.current_stream(x.device).wait_stream(stream)
            if result is not None:
                return result
            # Capture recorded the step without running it: run it now on this batch.
        elif self._static_x is None or x.shape != self._static_x.shape or y.shape != self._static_y.shape:
            return self._eager(x, y)
        else:
            self._static_x.copy_(x, non_blocking=True)
            self._static_y.copy_(y, non_blocking=True)
        assert self._graph is not None and self._static_out is not None
        self._sync_hparams()
        self._graph.replay()
        self.graph_replays += 1
        self._advance_host_counters(1)
        # The static outputs are overwritten by the next replay: hand out copies.
        return self._static_out[0].clone(), self._static_out[1].clone()

    def __repr__(self) -> str:
        return (
            f"TrainStep(mode={self.mode!r}, amp_dtype={self.amp_dtype}, grad_clip={self.grad_clip}, "
            f"graph_replays={self.graph_replays}, eager_steps={self.eager_steps})"
        )


def make_train_step(
    model: nn.Module,
    optimizer: Any,
    loss_fn: LossFn,
    *,
    amp_dtype: torch.dtype | None = None,
    cuda_graphs: bool = False,
    compile: bool = False,
    grad_clip: float | None = None,
    after_step: Callable[[], None] | None = None,
    warmup_steps: int = 3,
    compile_kwargs: dict[str, Any] | None = None,
    metrics_fn: MetricsFn | None = None,
) -> TrainStep:
    """Build the training step ``step(x, y) -> (loss_sum, n_correct)``.

    Args:
        model: the model, already on its device (see :func:`prepare_model`) and in train mode.
        optimizer: a ``torch.optim.Optimizer`` or ``flipnet.optim.RoutedOptimizer``.
        loss_fn: ``loss_fn(output, target) -> scalar`` batch-mean loss.
        amp_dtype: ``torch.bfloat16`` (recommended on GPUs that have it) or ``torch.float16``
            (CUDA only, with dynamic loss scaling; not with CUDA graphs); ``None``: full precision.
        cuda_graphs: capture the whole step into a CUDA graph (see the module docs); falls back
            to eager with a warning where capture is impossible (CPU, fp16 loss scaling).
        compile: ``torch.compile`` the model's forward (and backward).
        grad_clip: clip the global gradient norm of all trainable parameters to this value.
        after_step: called after every optimizer step, e.g. ``lambda: apply_constraints(model)``.
            Under CUDA graphs it is captured too, so it must be pure device work.
        warmup_steps: eager steps before capture (CUDA graphs only).
        compile_kwargs: extra arguments of :func:`torch.compile` (e.g. ``{"mode": "max-autotune"}``).
        metrics_fn: ``metrics_fn(output, target, loss) -> (loss_sum, n_correct)`` replaces the
            default report (batch-mean loss × batch size, arg-max hits); it receives detached
            tensors and must not synchronise (e.g. per-model sums in :mod:`flipnet.train.multi`).

    Returns:
        a :class:`TrainStep`; its ``mode`` says what runs after fallbacks.
    """
    return TrainStep(
        model,
        optimizer,
        loss_fn,
        amp_dtype=amp_dtype,
        cuda_graphs=cuda_graphs,
        compile=compile,
        grad_clip=grad_clip,
        after_step=after_step,
        warmup_steps=warmup_steps,
        compile_kwargs=compile_kwargs,
        metrics_fn=metrics_fn,
    )



# ----------------------------------------------------------------------------- precision
#: Values of ``train.precision`` that :func:`select_precision` accepts.
PRECISION_SETTINGS: tuple[str, ...] = ("fp32", "tf32", "bf16", "int8", "auto")


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo`` on Linux, e.g. ``avx512_bf16``, ``amx_int8``).

    Empty where they cannot be read (other systems): :func:`select_precision` then stays on fp32
    for ``auto`` on the CPU.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@dataclasses.dataclass(frozen=True)
class Precision:
    r"""The arithmetic a run uses, resolved from ``train.precision`` for one device.

    ``name`` (what runs, never ``auto``), the exactness of each mode (tested in
    ``tests/test_int8_precision.py``; measured speeds in ``docs/performance.md``):

    ``fp32``
        fp32 everywhere (the paper setting). Binary-by-binary products and sums are exact up to
        :math:`2^{24}`; real values round as fp32 does.
    ``tf32``
        fp32, with TF32 tensor-core matrix products on CUDA (inputs rounded to 10 mantissa bits:
        exact for ±1 by ±1, rounds real inputs); on a CPU it is fp32.
    ``bf16``
        bf16 autocast: products of ±1 are exact and accumulate in fp32, but a convolution's or
        dense layer's *output* is stored in bf16 (8 significant bits), so binary sums above 256
        in magnitude are rounded (relative error :math:`\le 2^{-8}`); real activations, the first
        layer's input and every backward product are rounded to bf16 as well.
    ``int8``
        CPU only: the forward product of every binary-by-binary layer is an int8 matrix product
        with int32 sums (:func:`flipnet.functional.conv_nd_int8`): exact, equal to fp32 bit for
        bit. Everything else runs under bf16 autocast as in ``bf16`` (layers with real inputs or
        weights, and the backward products of all layers: :math:`g` rounded to bf16, exact
        products with ±1, fp32 sums, result stored in bf16).

    Attributes:
        name: ``"fp32"``, ``"tf32"``, ``"bf16"`` or ``"int8"``.
        amp_dtype: the autocast dtype for :func:`make_train_step` and evaluation (``None``: off).
        int8: the binary layers' exact int8 forward is switched on by :meth:`apply`.
        reason: why ``auto`` chose it (or ``"train.precision"``).
    """

    name: str
    amp_dtype: torch.dtype | None
    int8: bool = False
    reason: str = "train.precision"

    def apply(self, model: nn.Module) -> nn.Module:
        """Switch every binary layer's exact int8 forward on (``int8``) or off; returns ``model``.

        Layers that cannot use it (real inputs or weights, ``magnitude_aware_sign``, groups, ...)
        keep the float path; see :mod:`flipnet.layers`.
        """
        from flipnet.layers import binary_modules  # noqa: PLC0415 (layers sit below train)

        for _, layer in binary_modules(model):
            layer.int8_forward = self.int8
        return model


def _cpu_has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_features())


def select_precision(device: torch.device | str, setting: str | bool | None, model: nn.Module | None = None) -> Precision:
    """Resolve ``train.precision`` (``fp32``, ``tf32``, ``bf16``, ``int8``, ``auto``) for ``device``.

    ``auto`` picks the fastest mode that is exact where it matters:

    * CUDA: ``bf16`` where the GPU supports it, else ``fp32``;
    * CPU with native bf16 (``avx512_bf16`` or ``amx_bf16``): ``bf16``. ``int8`` (exact binary
      forward) is not chosen automatically: measured on a 2-core Zen 4 (``docs/performance.md``)
      it ran at 0.8-1.2x the speed of ``bf16``, median 0.97x (the int8 products are faster, the
      im2col copies and int8 conversions eat the gain), so it is the setting to pick for an exact
      forward pass at about bf16 speed;
    * any other CPU: ``fp32`` (bf16 without hardware support is emulated and slower than fp32).

    The older ``train.amp`` values are accepted: ``True`` is ``bf16``, ``False``/``None`` is
    ``fp32``. ``int8`` on a non-CPU device raises ``ValueError``. ``model`` is not read by these
    rules; it is in the signature so that a model-dependent rule needs no change at the callers.
    """
    del model
    device = torch.device(device)
    if setting is True:
        setting = "bf16"
    elif setting is False or setting is None:
        setting = "fp32"
    if not isinstance(setting, str) or setting not in PRECISION_SETTINGS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISION_SETTINGS)}, got {setting!r}")
    if setting in ("fp32", "tf32"):
        return Precision(setting, None)
    if setting == "bf16":
        return Precision("bf16", torch.bfloat16)
    if setting == "int8":
        if device.type != "cpu":
            raise ValueError(f"train.precision=int8 runs on the CPU only (torch._int_mm); the run is on {device.type}")
        return Precision("int8", torch.bfloat16, int8=True)
    # auto
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return Precision("bf16", torch.bfloat16, reason="auto: a CUDA device with bf16")
        return Precision("fp32", None, reason="auto: a CUDA device without bf16")
    if device.type != "cpu":
        return Precision("fp32", None, reason=f"auto: {device.type} device")
    if not _cpu_has_bf16():
        return Precision("fp32", None, reason="auto: this CPU has no native bf16 (avx512_bf16/amx_bf16)")
    return Precision("bf16", torch.bfloat16, reason="auto: CPU with native bf16")
