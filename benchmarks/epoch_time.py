#!/usr/bin/env python
"""BinaryNet training throughput next to its float twin and a FLOP bound.

For each batch size and execution mode this times full training steps (forward, backward,
optimizer step: Bop for the binary network, Adam for the float twin) through
:func:`flipnet.train.fast.make_train_step` on random device-resident data, so the numbers are
the model's compute cost without the data pipeline. It reports images/s and the seconds one
CIFAR-10 epoch (50,000 images) would take, and compares them with a bound:

    bound images/s = measured matmul rate / training FLOPs per image,
    training FLOPs per image = 2 x forward MACs x 3   (forward + two backward matmuls).

The matmul rate is measured here (bf16 on CUDA, fp32 on CPU), so the bound says how far the
step is from what the same device achieves on one large dense matrix product. A binary network
trained in PyTorch runs its ±1 arithmetic in float kernels, so its bound equals the float twin's.

Examples::

    python benchmarks/epoch_time.py                                   # CUDA if present
    python benchmarks/epoch_time.py --modes eager,compile,cuda_graphs --amp bf16
    python benchmarks/epoch_time.py --device cpu --filters 32 --dense-units 256 \\
        --batch-sizes 50,256 --steps 3 --warmup 1 --modes eager     # quick CPU check
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_TRAIN_IMAGES = 50_000


@dataclass
class Row:
    model: str
    mode: str
    batch: int
    images_per_s: float
    epoch_s: float
    bound_images_per_s: float
    note: str = ""

    @property
    def fraction_of_bound(self) -> float:
        return self.images_per_s / self.bound_images_per_s if self.bound_images_per_s > 0 else float("nan")


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 1.0, trials: int = 5) -> float:
    """Dense matmul FLOP/s of an ``n x n`` by ``n x n`` product on ``device`` in ``dtype``.

    The best of ``trials`` windows of ``seconds / trials`` each, so that a busy shared machine
    (other processes on the same cores or GPU) disturbs the probe less.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    best = 0.0
    for _ in range(trials):
        reps = 0
        start = time.perf_counter()
        while True:
            a @ b
            reps += 1
            if reps % 4 == 0:  # check the clock only after the queued products have finished
                _sync(device)
                if time.perf_counter() - start >= seconds / trials:
                    break
        best = max(best, 2.0 * n**3 * reps / (time.perf_counter() - start))
    return best


def _time_steps(step: Callable, x: torch.Tensor, y: torch.Tensor, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` timed steps after ``warmup`` untimed ones."""
    total = torch.zeros((), device=device)
    for _ in range(warmup):
        loss, _ = step(x, y)
        total += loss
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = step(x, y)
        total += loss
    _sync(device)
    elapsed = time.perf_counter() - start
    if not torch.isfinite(total).item():
        raise RuntimeError("the loss became NaN/inf while benchmarking")
    return elapsed / steps


def _build(kind: str, args: argparse.Namespace, device: torch.device, channels_last: bool):
    from flipnet.models import create_model
    from flipnet.optim import create_optimizer
    from flipnet.train.fast import prepare_model

    torch.manual_seed(0)
    if kind == "binarynet":
        model = create_model("binarynet", num_classes=10, in_channels=3, filters=args.filters, dense_units=args.dense_units)
        model = prepare_model(model, device, channels_last)
        opt = create_optimizer(model, "bop", {"gamma": 1e-4, "threshold": 1e-8}, "adam", {"lr": 1e-2})
    else:
        model = create_model("binarynet", num_classes=10, in_channels=3, filters=args.filters,
                             dense_units=args.dense_units, mode="float")
        model = prepare_model(model, device, channels_last)
        opt = create_optimizer(model, "adam", {"lr": 1e-3}, "adam", {"lr": 1e-3})
    return model, opt


def run(args: argparse.Namespace) -> list[Row]:
    from flipnet.train.fast import make_train_step

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = args.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    amp_dtype = torch.bfloat16 if amp == "bf16" else None
    channels_last = device.type == "cuda" if args.channels_last == "auto" else args.channels_last == "true"
    rate_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    rate = measure_matmul_rate(device, rate_dtype, n)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU, %d threads' % args.threads}); "
          f"matmul {n}x{n} {str(rate_dtype).replace('torch.', '')}: {rate / 1e12:.3f} TFLOP/s; amp {amp}; "
          f"channels_last {channels_last}", file=sys.stderr)

    rows: list[Row] = []
    for kind in args.models:
        model, _ = _build(kind, args, device, channels_last)
        macs = count_forward_macs(model, (3, 32, 32), device)
        train_flops = 2 * macs * 3
        bound = rate / train_flops
        print(f"{kind}: {macs / 1e6:.1f} M forward MACs per image, {train_flops / 1e9:.2f} GFLOP per training image; "
              f"bound {bound:,.0f} images/s", file=sys.stderr)
        del model
        for mode in args.modes:
            for batch in args.batch_sizes:
                model, opt = _build(kind, args, device, channels_last)
                note = ""
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    step = make_train_step(
                        model, opt, F.cross_entropy, amp_dtype=amp_dtype,
                        compile=mode in ("compile", "compile+cuda_graphs"),
                        cuda_graphs=mode in ("cuda_graphs", "compile+cuda_graphs"),
                    )
                if caught:
                    note = f"ran as {step.mode}"
                g = torch.Generator(device="cpu").manual_seed(batch)
                x = (torch.rand((batch, 3, 32, 32), generator=g) * 2 - 1).to(device)
                y = torch.randint(0, 10, (batch,), generator=g).to(device)
                sec = _time_steps(step, x, y, args.warmup, args.steps, device)
                ips = batch / sec
                rows.append(Row(kind, mode, batch, ips, CIFAR_TRAIN_IMAGES / ips, bound, note))
                print(f"  {kind:9s} {mode:12s} batch {batch:5d}: {ips:10.1f} images/s", file=sys.stderr)
                del model, opt, step
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def markdown(rows: list[Row]) -> str:
    lines = [
        "| model | mode | batch | images/s | s / epoch (50k) | bound images/s | % of bound | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.mode} | {r.batch} | {r.images_per_s:,.1f} | {r.epoch_s:,.1f} | "
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
    p.add_argument("--modes", type=_csv, default=["eager"],
                   help="comma list of eager, compile, cuda_graphs, compile+cuda_graphs")
    p.add_argument("--models", type=_csv, default=["binarynet", "float"], help="binarynet and/or float (its float twin)")
    p.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto", help="auto: bf16 on CUDA, none on CPU")
    p.add_argument("--channels-last", choices=["auto", "true", "false"], default="auto")
    p.add_argument("--steps", type=int, default=50, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, graph capture)")
    p.add_argument("--filters", type=int, default=128)
    p.add_argument("--dense-units", type=int, default=1024)
    p.add_argument("--matmul-size", type=int, default=0, help="n of the n x n matmul rate probe (0: 8192 CUDA, 1024 CPU)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    args = p.parse_args(argv)
    valid = {"eager", "compile", "cuda_graphs", "compile+cuda_graphs"}
    bad = [m for m in args.modes if m not in valid]
    if bad:
        p.error(f"unknown mode(s) {bad}; valid: {sorted(valid)}")
    bad = [m for m in args.models if m not in ("binarynet", "float")]
    if bad:
        p.error(f"unknown model(s) {bad}; valid: binarynet, float")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    rows = run(args)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
