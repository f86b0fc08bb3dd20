#!/usr/bin/env python
"""BinaryNet training throughput next to its float twin and a FLOP bound.

For each model, precision, execution mode, batch size and number of vectorised seeds this times
full training steps (forward, backward, optimizer step: Bop + Adam for the binary network, Adam
for the float twin) through :func:`flipnet.train.fast.make_train_step` on random
device-resident data, so the numbers are the model's compute cost without the data pipeline. It
reports images/s and the seconds one CIFAR-10 epoch (50,000 images) would take, and compares
them with a bound:

    bound images/s = measured matmul rate / training FLOPs per image,
    training FLOPs per image = 2 x forward MACs x 3   (forward + two backward matmuls).

The matmul rate is measured here, in the precision of the row (fp32 with TF32 off, TF32, or
bf16; on CUDA timed with CUDA events), so the bound says how far the step is from what the same
device achieves on one large dense matrix product. A binary network trained in PyTorch runs its
±1 arithmetic in float kernels, so its bound equals the float twin's.

Precisions: ``fp32`` (TF32 off for matmuls and cuDNN convolutions), ``tf32`` (TF32 on for
both), ``bf16`` (``torch.autocast`` bf16; TF32 off for what stays fp32). ``--seeds 3`` trains 3
members as one wide network (:class:`flipnet.train.multi.SeedEnsemble`); images/s then counts the
images of every member.

Examples::

    python benchmarks/epoch_time.py                                   # CUDA if present
    python benchmarks/epoch_time.py --modes eager,compile,cuda_graphs --precisions fp32,bf16
    python benchmarks/epoch_time.py --seeds 1,3 --modes cuda_graphs --batch-sizes 50
    python benchmarks/epoch_time.py --device cpu --filters 32 --dense-units 256 \\
        --batch-sizes 50,256 --steps 3 --warmup 1 --modes eager     # quick CPU check
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_TRAIN_IMAGES = 50_000
MODES = ("eager", "compile", "cuda_graphs", "compile+cuda_graphs")
PRECISIONS = ("fp32", "tf32", "bf16")
MODELS = ("binarynet", "float")


@dataclass
class Row:
    model: str
    mode: str
    batch: int
    images_per_s: float
    epoch_s: float
    bound_images_per_s: float
    note: str = ""
    precision: str = "fp32"
    seeds: int = 1
    ran_as: str = ""

    @property
    def fraction_of_bound(self) -> float:
        return self.images_per_s / self.bound_images_per_s if self.bound_images_per_s > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fraction_of_bound"] = self.fraction_of_bound
        return d


def count_forward_macs(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> int:
    """Multiply-accumulates of one forward pass of one image through conv and dense layers."""
    macs = 0

    def conv_hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        kernel = 1
        for k in m.kernel_size:  # type: ignore[attr-defined]
            kernel *= k
        macs += (out.numel() // out.shape[0]) * (m.in_channels // m.groups) * kernel  # type: ignore[attr-defined]

    def linear_hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        macs += (out.numel() // out.shape[0]) * m.in_features  # type: ignore[attr-defined]

    handles = []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((2, *input_shape), device=device))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return macs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def fp32_precision(tf32: bool) -> Iterator[None]:
    """TF32 on or off for CUDA matmuls and cuDNN convolutions inside the block, then restored.

    Uses the ``fp32_precision`` settings where this PyTorch has them (mixing them with the
    older ``allow_tf32`` flags is an error in some versions), else ``allow_tf32``.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and conv is not None and hasattr(conv, "fp32_precision"):
        old = (matmul.fp32_precision, conv.fp32_precision)
        value = "tf32" if tf32 else "ieee"
        matmul.fp32_precision = value
        conv.fp32_precision = value
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = old
    else:
        old_flags = (matmul.allow_tf32, cudnn.allow_tf32)
        matmul.allow_tf32 = cudnn.allow_tf32 = tf32
        try:
            yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = old_flags


class Timer:
    """Wall time of a block: CUDA events on CUDA (device time between the two points in the
    stream, with no host sync inside the block), ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = float("nan")

    def __enter__(self) -> Timer:
        if self.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self._t


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 1.0, trials: int = 5,
                        tf32: bool = False) -> float:
    """Dense matmul FLOP/s of an ``n x n`` by ``n x n`` product on ``device`` in ``dtype``.

    The best of ``trials`` windows of about ``seconds / trials`` each, so that a busy shared
    machine disturbs the probe less. On CUDA each window is timed with CUDA events around a
    batch of products sized from a first timed product. ``tf32`` applies to fp32 on CUDA.
    """
    with fp32_precision(tf32):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        sync(device)
        with Timer(device) as t:
            a @ b
        per = max(t.seconds, 1e-7)
        reps = max(1, min(1000, int(seconds / trials / per)))
        best = 0.0
        for _ in range(trials):
            with Timer(device) as t:
                for _ in range(reps):
                    a @ b
            best = max(best, 2.0 * n**3 * reps / max(t.seconds, 1e-9))
    return best


def rate_dtype(precision: str) -> tuple[torch.dtype, bool]:
    """The matmul probe's dtype and TF32 flag for a precision name."""
    if precision == "bf16":
        return torch.bfloat16, False
    return torch.float32, precision == "tf32"


def make_optimizer(model: nn.Module, binary: str, binary_kwargs: dict, real: str, real_kwargs: dict) -> Any:
    """``flipnet.optim.create_optimizer`` after the explicit weight-mode step (flip mode for Bop)."""
    from flipnet.optim import create_optimizer, prepare_model_for

    prepare_model_for(model, binary=binary, real=real)
    return create_optimizer(model, binary, binary_kwargs, real, real_kwargs)


def build_model(kind: str, filters: int, dense_units: int, seed: int = 0) -> nn.Module:
    from flipnet.models import create_model

    torch.manual_seed(seed)
    extra = {} if kind == "binarynet" else {"mode": "float"}
    return create_model("binarynet", num_classes=10, in_channels=3, filters=filters, dense_units=dense_units, **extra)


def optimizer_for(kind: str, model: nn.Module) -> Any:
    if kind == "binarynet":
        return make_optimizer(model, "bop", {"gamma": 1e-4, "threshold": 1e-8}, "adam", {"lr": 1e-2})
    return make_optimizer(model, "adam", {"lr": 1e-3}, "adam", {"lr": 1e-3})


def member_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over members of each member's batch-mean cross-entropy (``out (S, B, C)``, ``y (S, B)``)."""
    s, b = y.shape
    return F.cross_entropy(out.reshape(s * b, -1).float(), y.reshape(s * b), reduction="sum") / b


def member_metrics(out: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a wide step reports: the summed loss times the batch size, and the hits of all members."""
    return loss * y.shape[1], (out.argmax(dim=2) == y).sum()


def build(kind: str, seeds: int, filters: int, dense_units: int, device: torch.device,
          channels_last: bool) -> tuple[nn.Module, Any, Callable, Callable | None]:
    """``(module, optimizer, loss_fn, metrics_fn)`` of one model, or of ``seeds`` members as one
    wide network."""
    from flipnet.train.fast import prepare_model

    if seeds == 1:
        model = prepare_model(build_model(kind, filters, dense_units), device, channels_last)
        return model, optimizer_for(kind, model), F.cross_entropy, None
    try:
        from flipnet.train.ensemble import SeedEnsemble, SeedOptimizer
    except ImportError:  # before the move out of flipnet.train.multi
        from flipnet.train.multi import SeedEnsemble, SeedOptimizer

    members = [build_model(kind, filters, dense_units, seed=s).to(device) for s in range(seeds)]
    ensemble = SeedEnsemble(members, channels_last=channels_last)
    opts = [optimizer_for(kind, m) for m in members]
    ensemble.sync_modes()
    return ensemble, SeedOptimizer(ensemble, opts), member_loss, member_metrics


def time_steps(step: Callable, x: torch.Tensor, y: torch.Tensor, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` timed steps after ``warmup`` untimed ones."""
    total = torch.zeros((), device=device)
    for _ in range(warmup):
        loss, _ = step(x, y)
        total += loss.sum()
    sync(device)
    with Timer(device) as t:
        for _ in range(steps):
            loss, _ = step(x, y)
            total += loss.sum()
    if not torch.isfinite(total).item():
        raise RuntimeError("the loss became NaN/inf while benchmarking")
    return t.seconds / steps


def time_config(kind: str, mode: str, batch: int, precision: str, *, seeds: int = 1, filters: int = 128,
                dense_units: int = 1024, device: torch.device, channels_last: bool, warmup: int, steps: int,
                bound: float) -> Row:
    """Build a fresh model and step for one configuration and time it."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {MODES}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {PRECISIONS}")
    from flipnet.train.fast import make_train_step

    if "compile" in mode:
        torch._dynamo.reset()  # a fresh model each time: never hit dynamo's recompile limit
    with fp32_precision(precision == "tf32"):
        model, opt, loss_fn, metrics_fn = build(kind, seeds, filters, dense_units, device, channels_last)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step = make_train_step(
                model, opt, loss_fn, amp_dtype=torch.bfloat16 if precision == "bf16" else None,
                compile="compile" in mode, cuda_graphs="cuda_graphs" in mode, metrics_fn=metrics_fn,
            )
        note = "; ".join(str(w.message) for w in caught if "ignored" in str(w.message))
        g = torch.Generator(device="cpu").manual_seed(batch)
        shape = (batch, 3, 32, 32) if seeds == 1 else (seeds, batch, 3, 32, 32)
        x = (torch.rand(shape, generator=g) * 2 - 1).to(device)
        y = torch.randint(0, 10, shape[:-3], generator=g).to(device)
        sec = time_steps(step, x, y, warmup, steps, device)
        ran_as = step.mode
        if "cuda_graphs" in mode and step.graph_replays == 0:
            note = (note + "; " if note else "") + "no graph replay"
        del model, opt, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ips = batch * seeds / sec
    return Row(kind, mode, batch, ips, CIFAR_TRAIN_IMAGES * seeds / ips, bound, note, precision, seeds, ran_as)


def model_flops(kind: str, filters: int, dense_units: int, device: torch.device) -> tuple[int, int]:
    """``(forward MACs per image, training FLOPs per image)``."""
    model = build_model(kind, filters, dense_units).to(device)
    macs = count_forward_macs(model, (3, 32, 32), device)
    return macs, 2 * macs * 3


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _precisions(args: argparse.Namespace, device: torch.device) -> list[str]:
    """``args.precisions``, or the older ``args.amp`` (auto/bf16/none) as one precision."""
    chosen = getattr(args, "precisions", None)
    if chosen:
        return list(chosen)
    amp = getattr(args, "amp", "auto")
    return ["bf16"] if amp == "bf16" or (amp == "auto" and device.type == "cuda") else ["fp32"]


def run(args: argparse.Namespace) -> list[Row]:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.precisions = _precisions(args, device)
    args.seeds = list(getattr(args, "seeds", None) or [1])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = device.type == "cuda" if args.channels_last == "auto" else args.channels_last == "true"
    n = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    rates = {}
    for p in args.precisions:
        dtype, tf32 = rate_dtype(p)
        if device.type == "cpu" and dtype == torch.bfloat16:
            dtype = torch.float32  # CPU bf16 matmuls are not what autocast-on-CPU runs either
        rates[p] = measure_matmul_rate(device, dtype, n, tf32=tf32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"device {device} ({name}); matmul {n}x{n}: " + ", ".join(f"{p} {r / 1e12:.3f} TFLOP/s" for p, r in rates.items())
          + f"; channels_last {channels_last}", file=sys.stderr)

    rows: list[Row] = []
    for kind in args.models:
        macs, train_flops = model_flops(kind, args.filters, args.dense_units, device)
        print(f"{kind}: {macs / 1e6:.1f} M forward MACs per image, {train_flops / 1e9:.2f} GFLOP per training image",
              file=sys.stderr)
        for precision in args.precisions:
            bound = rates[precision] / train_flops
            for mode in args.modes:
                for seeds in args.seeds:
                    for batch in args.batch_sizes:
                        row = time_config(kind, mode, batch, precision, seeds=seeds, filters=args.filters,
                                          dense_units=args.dense_units, device=device, channels_last=channels_last,
                                          warmup=args.warmup, steps=args.steps, bound=bound)
                        rows.append(row)
                        print(f"  {kind:9s} {precision:4s} {mode:19s} seeds {seeds} batch {batch:5d}: "
                              f"{row.images_per_s:10.1f} images/s", file=sys.stderr)
    return rows


def markdown(rows: list[Row]) -> str:
    lines = [
        "| model | mode | batch | precision | seeds | images/s | s / epoch (50k per seed) | bound images/s | % of bound | note |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        mode = r.mode if not r.ran_as or r.ran_as == r.mode else f"{r.mode} (ran as {r.ran_as})"
        lines.append(
            f"| {r.model} | {mode} | {r.batch} | {r.precision} | {r.seeds} | {r.images_per_s:,.1f} | {r.epoch_s:,.1f} | "
            f"{r.bound_images_per_s:,.0f} | {100 * r.fraction_of_bound:.1f}% | {r.note} |"
        )
    return "\n".join(lines)


def _csv_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--batch-sizes", type=_csv_ints, default=[50, 256, 1024])
    p.add_argument("--modes", type=_csv, default=["eager"], help="comma list of " + ", ".join(MODES))
    p.add_argument("--models", type=_csv, default=list(MODELS), help="binarynet and/or float (its float twin)")
    p.add_argument("--precisions", type=_csv, default=None,
                   help="comma list of fp32, tf32, bf16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--seeds", type=_csv_ints, default=[1], help="members trained as one wide network, e.g. 1,3")
    p.add_argument("--channels-last", choices=["auto", "true", "false"], default="auto")
    p.add_argument("--steps", type=int, default=50, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, graph capture)")
    p.add_argument("--filters", type=int, default=128)
    p.add_argument("--dense-units", type=int, default=1024)
    p.add_argument("--matmul-size", type=int, default=0, help="n of the n x n matmul rate probe (0: 8192 CUDA, 1024 CPU)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    args = p.parse_args(argv)
    args.precisions = _precisions(args, resolve_device(args.device))
    for what, values, valid in (("mode", args.modes, MODES), ("model", args.models, MODELS),
                                ("precision", args.precisions, PRECISIONS)):
        bad = [v for v in values if v not in valid]
        if bad:
            p.error(f"unknown {what}(s) {bad}; valid: {', '.join(valid)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if not args.seeds or any(s < 1 for s in args.seeds):
        p.error("--seeds must be positive integers")
    rows = run(args)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
