#!/usr/bin/env python
r"""CPU training throughput: flipnet's precision modes next to a plain PyTorch loop, in one run.

For each batch size this times full training steps (forward, backward, Bop on the binary weights,
Adam on the BatchNorm shifts) of

* ``plain``: a plain eager fp32 BinaryNet + Bop loop written below in ~40 lines of PyTorch (no
  flipnet code), the baseline of issue #11;
* ``fp32``, ``bf16``, ``int8``: flipnet's :func:`flipnet.train.fast.make_train_step` with
  ``train.precision`` resolved by :func:`flipnet.train.fast.select_precision`, channels-last
  (``--channels-last``), optionally ``torch.compile`` (``--compile``; its compile time is
  reported separately: two cores need minutes);

The measurements are **interleaved**: every round runs one timed window of each configuration
in turn, so a change of machine load (this is a shared machine) hits all of them alike; the
table reports the median images/s over rounds and the median of the per-round ratios to
``plain``. The bound is the measured bf16 GEMM rate (square ``n x n`` products, best of a few
short probes, ``n`` = 1024 and 2048, probed again before and after every round so that the bound
sees the same load as the round) divided by the training FLOPs per image, counted here with
forward hooks: ``2 x forward MACs x 3`` (forward, and the two products of the backward pass).

Example (about 3 minutes on 2 cores)::

    python benchmarks/cpu_train.py --models binarynet --batch-sizes 50,256 --rounds 3
    python benchmarks/cpu_train.py --models narrow,resnet20 --modes plain,fp32,bf16,int8
    python benchmarks/cpu_train.py --threads 1,2 --modes int8    # intra-op threads, interleaved
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

MODELS = {
    # name: (flipnet model name, keyword arguments, has a plain-loop twin)
    "binarynet": ("binarynet", {}, True),
    "narrow": ("binarynet", {"filters": 32, "dense_units": 256}, True),
    "resnet20": ("resnet20", {"mode": "bwn"}, False),
}
FLIPNET_MODES = ("fp32", "bf16", "int8")
#: Profiler op names by part of the step (``--profile``).
PROFILE_GROUPS = {
    "convolution backward (grad input + grad weight)": {"aten::convolution_backward"},
    "forward convolutions (oneDNN, float)": {"aten::mkldnn_convolution", "aten::_convolution"},
    "forward int8 GEMMs": {"aten::_int_mm"},
    "dense products (forward float, backward)": {"aten::mm", "aten::addmm", "aten::bmm"},
    "copies and casts (im2col, dtype, layout)": {"aten::copy_", "aten::_to_copy", "aten::contiguous",
                                                  "aten::constant_pad_nd", "aten::clone"},
    "element-wise (sign, STE mask, ...)": {"aten::where", "aten::mul", "aten::abs", "aten::le", "aten::ge",
                                           "aten::gt", "aten::lt", "aten::fill_", "aten::neg", "aten::add",
                                           "aten::add_", "aten::sub", "aten::div", "aten::ne", "aten::eq"},
    "BatchNorm (forward + backward)": {"aten::native_batch_norm", "aten::native_batch_norm_backward",
                                       "aten::_batch_norm_with_update"},
    "max-pool (forward + backward)": {"aten::max_pool2d_with_indices", "aten::max_pool2d_with_indices_backward"},
    "optimizer (Bop, Adam)": {"aten::lerp_", "aten::_foreach_lerp_", "aten::mul_", "aten::_foreach_mul_",
                              "aten::addcmul_", "aten::_foreach_addcmul_", "aten::sqrt", "aten::_foreach_sqrt",
                              "aten::addcdiv_", "aten::_foreach_addcdiv_", "aten::count_nonzero", "aten::sum",
                              "aten::_foreach_add_", "aten::_foreach_div_", "aten::_foreach_sqrt_"},
    "loss": {"aten::_log_softmax", "aten::nll_loss_forward", "aten::_log_softmax_backward_data",
             "aten::nll_loss_backward"},
}


# ----------------------------------------------------------------------------- the plain loop
class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1)


class PlainBinaryNet(nn.Module):
    """BinaryNet as a plain PyTorch user writes it: ±1 weights used directly, sign-STE activations."""

    def __init__(self, filters: int = 128, dense: int = 1024) -> None:
        super().__init__()
        w = [3, filters, filters, 2 * filters, 2 * filters, 4 * filters, 4 * filters]
        self.convs = nn.ParameterList([nn.Parameter(torch.randn(w[i + 1], w[i], 3, 3).sign()) for i in range(6)])
        self.fcs = nn.ParameterList([nn.Parameter(torch.randn(o, i).sign())
                                     for i, o in ((w[6] * 9, dense), (dense, dense), (dense, 10))])
        self.bns = nn.ModuleList([nn.BatchNorm2d(c, momentum=0.01, eps=1e-3) for c in w[1:]]
                                 + [nn.BatchNorm1d(c, momentum=0.01, eps=1e-3) for c in (dense, dense, 10)])
        for bn in self.bns:
            bn.weight.requires_grad_(False)  # shift only, as in the Bop reference

    def forward(self, x):
        for i, w in enumerate(self.convs):
            x = F.conv2d(x if i == 0 else _SignSTE.apply(x), w, padding=0 if i == 0 else 1)
            x = self.bns[i](F.max_pool2d(x, 2) if i % 2 else x)
        x = x.flatten(1)
        for i, w in enumerate(self.fcs):
            x = self.bns[6 + i](F.linear(_SignSTE.apply(x), w))
        return x


def plain_step(filters: int, dense: int) -> tuple[Callable[[torch.Tensor, torch.Tensor], None], PlainBinaryNet]:
    model = PlainBinaryNet(filters, dense)
    binary = list(model.convs) + list(model.fcs)
    momenta = [torch.zeros_like(w) for w in binary]
    adam = torch.optim.Adam([p for p in model.bns.parameters() if p.requires_grad], lr=1e-2)
    gamma, tau = 1e-4, 1e-8

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        with torch.no_grad():
            for w, m in zip(binary, momenta):  # Bop: m <- (1 - g) m + g grad; flip where w m > tau
                m.lerp_(w.grad, gamma)
                w.mul_(torch.where(w * m > tau, -1.0, 1.0))
                w.grad = None
        adam.step()
        adam.zero_grad(set_to_none=True)

    return step, model


# ----------------------------------------------------------------------------- flipnet
def count_forward_macs(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, list[tuple[str, int]]]:
    """Multiply-accumulates of one image's forward pass through conv and dense layers, per layer."""
    per_layer: list[tuple[str, int]] = []
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            def hook(mod, inp, out, name=name):
                if isinstance(mod, nn.Linear):
                    per_layer.append((name, out[0].numel() * mod.in_features))
                else:
                    k = 1
                    for s in mod.kernel_size:
                        k *= s
                    per_layer.append((name, out[0].numel() * (mod.in_channels // mod.groups) * k))
            handles.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros((1, *shape)))
    model.train(was)
    for h in handles:
        h.remove()
    return sum(n for _, n in per_layer), per_layer


def flipnet_step(model_key: str, mode: str, channels_last: bool, compile_: bool):
    from flipnet.models import create_model
    from flipnet.optim import create_optimizer, prepare_model_for
    from flipnet.train.fast import make_train_step, prepare_model, select_precision

    name, kwargs, _ = MODELS[model_key]
    model = create_model(name, num_classes=10, in_channels=3, **kwargs)
    prepare_model_for(model, "bop", "adam")
    model = prepare_model(model, "cpu", channels_last)
    precision = select_precision("cpu", mode, model)
    precision.apply(model)
    opt = create_optimizer(model, "bop", {"gamma": 1e-4, "threshold": 1e-8}, "adam", {"lr": 1e-2})
    step = make_train_step(model, opt, F.cross_entropy, amp_dtype=precision.amp_dtype, compile=compile_)
    return step, model


# ----------------------------------------------------------------------------- measuring
def gemm_rate(dtype: torch.dtype, n: int, seconds: float = 0.6) -> float:
    """Best FLOP/s (int8: OP/s) of an n x n x n product over three short windows."""
    if dtype is torch.int8:
        a = torch.randint(-1, 2, (n, n), dtype=torch.int8)
        b = torch.randint(-1, 2, (n, n), dtype=torch.int8)
        fn = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        fn = lambda: a @ b  # noqa: E731
    fn()
    best = 0.0
    for _ in range(3):
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            fn()
            reps += 1
        best = max(best, 2.0 * n**3 * reps / (time.perf_counter() - start))
    return best


@dataclass
class Config:
    label: str
    model: str
    batch: int
    threads: int
    step: Callable
    x: torch.Tensor
    y: torch.Tensor
    setup_s: float = 0.0
    ips: list[float] = field(default_factory=list)
    ipcs: list[float] = field(default_factory=list)


def _time(cfg: Config, steps: int) -> None:
    """One timed window: images per wall-clock second and per CPU second of this process."""
    torch.set_num_threads(cfg.threads)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        cfg.step(cfg.x, cfg.y)
    cfg.ips.append(steps * cfg.batch / (time.perf_counter() - start))
    cfg.ipcs.append(steps * cfg.batch / (time.process_time() - cpu))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="binarynet", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--modes", default="plain,fp32,bf16,int8", help="comma list of plain, fp32, bf16, int8")
    p.add_argument("--batch-sizes", default="50,256")
    p.add_argument("--threads", default=str(os.cpu_count() or 1), help="comma list: intra-op threads, interleaved")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the table shows medians)")
    p.add_argument("--steps", type=int, default=1, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration first")
    p.add_argument("--channels-last", choices=["true", "false"], default="true", help="flipnet modes only")
    p.add_argument("--compile", action="store_true", help="also time every flipnet mode under torch.compile")
    p.add_argument("--layers", action="store_true", help="print the per-layer MAC count")
    p.add_argument("--probe-seconds", type=float, default=0.6, help="length of each GEMM rate probe")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, profile 2 steps of each configuration (torch.profiler, ops by input shape)")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    threads = [int(t) for t in args.threads.split(",") if t]
    bad = [m for m in models if m not in MODELS] + [m for m in modes if m not in ("plain",) + FLIPNET_MODES]
    if bad:
        p.error(f"unknown model(s)/mode(s): {bad}")
    torch.manual_seed(0)
    load0 = os.getloadavg()
    torch.set_num_threads(max(threads))
    rates = {(dt, n): gemm_rate(dt, n, args.probe_seconds)
             for dt in (torch.bfloat16, torch.float32, torch.int8) for n in (1024, 2048)}
    bf16_rate = max(v for (dt, _), v in rates.items() if dt is torch.bfloat16)
    print(f"# {torch.__version__}, {max(threads)} threads, load average {load0[0]:.2f}; GEMM rates (TFLOP/s or TOP/s): "
          + ", ".join(f"{str(dt).replace('torch.', '')} n={n}: {v / 1e12:.3f}" for (dt, n), v in rates.items()),
          file=sys.stderr)

    configs: list[Config] = []
    bounds: dict[str, float] = {}
    macs_of: dict[str, int] = {}
    for mk in models:
        from flipnet.models import create_model

        name, kwargs, has_plain = MODELS[mk]
        macs, per_layer = count_forward_macs(create_model(name, num_classes=10, in_channels=3, **kwargs), (3, 32, 32))
        flops = 6 * macs
        macs_of[mk] = macs
        bounds[mk] = bf16_rate / flops
        print(f"# {mk}: {macs / 1e6:.1f} M forward MACs per image = {flops / 1e9:.3f} GFLOP per training image; "
              f"bf16 bound {bounds[mk]:.1f} images/s", file=sys.stderr)
        if args.layers:
            for lname, n in per_layer:
                print(f"#   {lname:12s} {n / 1e6:8.2f} M MACs", file=sys.stderr)
        for batch in batches:
            g = torch.Generator().manual_seed(batch)
            x = torch.rand((batch, 3, 32, 32), generator=g) * 2 - 1
            y = torch.randint(0, 10, (batch,), generator=g)
            for th in threads:
                for mode in modes:
                    variants = [False, True] if (args.compile and mode in FLIPNET_MODES) else [False]
                    for comp in variants:
                        if mode == "plain" and not has_plain:
                            continue
                        torch.manual_seed(0)
                        torch.set_num_threads(th)
                        t0 = time.perf_counter()
                        if mode == "plain":
                            f, d = (128, 1024) if mk == "binarynet" else (32, 256)
                            step, _ = plain_step(f, d)
                        else:
                            step, _ = flipnet_step(mk, mode, args.channels_last == "true", comp)
                        label = mode + ("+compile" if comp else "") + (f" {th}t" if len(threads) > 1 else "")
                        cfg = Config(label, mk, batch, th, step, x, y)
                        for _ in range(args.warmup):
                            step(x, y)
                        cfg.setup_s = time.perf_counter() - t0
                        configs.append(cfg)
                        print(f"# ready: {mk} batch {batch} {label} (build + warm-up {cfg.setup_s:.1f} s)", file=sys.stderr)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for c in configs:
            torch.set_num_threads(c.threads)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(2):
                    c.step(c.x, c.y)
            total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
            print(f"\n### {c.model} batch {c.batch} {c.label}: {total / 2:.2f} s per step ({2 * c.batch / total:.1f} images/s)\n")
            print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25,
                                                                      max_name_column_width=36, max_shapes_column_width=70))
            shares: dict[str, float] = {}
            for e in prof.key_averages():
                cat = next((c for c, names in PROFILE_GROUPS.items() if e.key in names), "other")
                shares[cat] = shares.get(cat, 0.0) + e.self_cpu_time_total / 1e6
            print("\n| part of the step | s per step | share |\n|---|---:|---:|")
            for cat, sec in sorted(shares.items(), key=lambda kv: -kv[1]):
                print(f"| {cat} | {sec / 2:.3f} | {100 * sec / total:.0f}% |")
        return 0

    ratios: dict[int, list[float]] = {id(c): [] for c in configs}
    cpu_ratios: dict[int, list[float]] = {id(c): [] for c in configs}
    of_bound: dict[int, list[float]] = {id(c): [] for c in configs}
    round_rates: list[float] = []
    for r in range(args.rounds):
        torch.set_num_threads(max(threads))
        rate_before = max(gemm_rate(torch.bfloat16, n, args.probe_seconds / 2) for n in (1024, 2048))
        for c in configs:
            _time(c, args.steps)
        torch.set_num_threads(max(threads))
        # the bound of this round: the GEMM rate probed just before and after it (same load)
        rate = max(rate_before, max(gemm_rate(torch.bfloat16, n, args.probe_seconds / 2) for n in (1024, 2048)))
        round_rates.append(rate)
        for c in configs:
            of_bound[id(c)].append(c.ips[-1] * 6 * macs_of[c.model] / rate)
        for c in configs:
            peers = [b for b in configs if b.model == c.model and b.batch == c.batch and b.threads == c.threads]
            base = next((b for b in peers if b.label.startswith("plain")), None)
            if base is None:  # no plain twin (ResNet-20): compare with flipnet's own fp32 eager step
                base = next((b for b in peers if b.label.split()[0] == "fp32"), None)
            if base is not None:
                ratios[id(c)].append(c.ips[-1] / base.ips[-1])
                cpu_ratios[id(c)].append(c.ipcs[-1] / base.ipcs[-1])
        print(f"# round {r + 1}/{args.rounds}: " + ", ".join(f"{c.model}/{c.batch}/{c.label} {c.ips[-1]:.1f}" for c in configs),
              file=sys.stderr)
    load1 = os.getloadavg()
    print(f"\nLoad average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end ({os.cpu_count()} cores); "
          f"bf16 GEMM rate {bf16_rate / 1e12:.3f} TFLOP/s before the runs, per round "
          + ", ".join(f"{r / 1e12:.3f}" for r in round_rates)
          + f"; medians of {args.rounds} interleaved rounds of {args.steps} step(s).\n")
    print("| model | batch | mode | images/s | min-max | x plain | images per CPU-s | x plain (CPU) | "
          "% of bf16 bound | build+warm-up s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")

    def ratio(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}x" if values else "-"

    for c in configs:
        med = statistics.median(c.ips)
        print(f"| {c.model} | {c.batch} | {c.label} | {med:.1f} | {min(c.ips):.1f}-{max(c.ips):.1f} | "
              f"{ratio(ratios[id(c)])} | {statistics.median(c.ipcs):.1f} | {ratio(cpu_ratios[id(c)])} | "
              f"{100 * statistics.median(of_bound[id(c)]):.0f}% | {c.setup_s:.1f} |")
    print("\nMedians over rounds; 'x plain' is the median of the per-round ratios to the plain loop (same round, "
          "same load; for a model without a plain twin, to flipnet's fp32 step). 'images per CPU-s' divides by this process's CPU time instead of wall time: with one "
          "thread it approximates an idle core on a loaded machine (with more threads it also counts "
          "OpenMP spin-waiting). The bound uses the bf16 GEMM rate probed around each round (wall time).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
