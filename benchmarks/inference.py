"""Latency of packed (XNOR-popcount) vs float32 PyTorch inference for BinaryNet, and model bytes.

Measures, at each batch size:

* every binary-input layer of BinaryNet (CIFAR-10, 32×32): ``PackedBinaryConv2d`` /
  ``PackedBinaryLinear`` on ±1 inputs against ``F.conv2d`` / ``F.linear`` with float32 ±1 weights
  on the same shapes (the packed time includes packing the float input and writing a float
  output);
* the whole network: the float model (flip-mode weights, eval mode) against the model returned by
  ``load_exported`` (packed layers, folded thresholds; the real-input first layer stays float);
* bytes: float32 parameters and BatchNorm statistics against the export file.

Packed layers run with ``impl="auto"``: each picks its implementation (C popcount kernel, PyTorch
word ops, or float ``F.linear``/``F.conv2d`` on ±1 values) by timing on its first call at a batch
size (during the warm-up here); the ``impl`` column shows the choice, and ``C-only ms`` the same
layers forced to the C kernels (``impl="c"``), i.e. without the per-layer choice.

Timings are interleaved (float, packed, C-only, float, packed, ...) in rounds so that load from
other processes hits all alike; each round keeps the fastest of ``--reps`` calls and the table gives
the median over rounds. Usage::

    python benchmarks/inference.py                 # markdown table
    python benchmarks/inference.py --json out.json # also write the numbers
    python benchmarks/inference.py --threads 1 --batch-sizes 1
    python benchmarks/inference.py --model resnet20 --no-layers   # a residual network instead
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from flipnet.compress import export_model, kernel_backend, load_exported
from flipnet.compress.packed import PackedBinaryConv2d, PackedBinaryLinear

def _time(fn: Callable[[], Any], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def compare(float_fn: Callable[[], Any], packed_fn: Callable[[], Any], rounds: int, reps: int,
            c_fn: Callable[[], Any] | None = None) -> dict[str, float]:
    """Interleaved timing; median over rounds of the per-round best, in milliseconds. The warm-up
    calls include the packed layers' autotuning."""
    fns = [float_fn, packed_fn] + ([c_fn] if c_fn is not None else [])
    with torch.inference_mode():
        for _ in range(2):
            for fn in fns:
                fn()  # warm up (kernel build, autotuning, allocations)
        times: list[list[float]] = [[] for _ in fns]
        ratios = []
        for _ in range(rounds):
            for t, fn in zip(times, fns):
                t.append(_time(fn, reps))
            ratios.append(times[0][-1] / times[1][-1])
    out = {
        "float_ms": statistics.median(times[0]) * 1e3,
        "packed_ms": statistics.median(times[1]) * 1e3,
        "speedup": statistics.median(ratios),
    }
    if c_fn is not None:
        out["c_only_ms"] = statistics.median(times[2]) * 1e3
    return out


def _force(model: nn.Module, impl: str) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (PackedBinaryConv2d, PackedBinaryLinear)):
            m.impl = impl
    return model


def _signs(*shape: int) -> torch.Tensor:
    return torch.randint(0, 2, shape).float() * 2 - 1


def layer_shapes() -> list[tuple[str, str, tuple[int, ...]]]:
    """BinaryNet's binary-input layers: name, (in, out, spatial) for 3×3 "same" convs, (in, out) for dense layers."""
    from flipnet.layers import BinaryConv2d, BinaryLinear
    from flipnet.models import create_model

    model = create_model("binarynet", num_classes=10, in_channels=3, input_size=32)
    out: list[tuple[str, str, tuple[int, ...]]] = []
    x = torch.zeros(1, 3, 32, 32)
    for name, m in model.named_children():
        if isinstance(m, BinaryConv2d) and m.binary_inputs:
            out.append((name, "conv", (m.in_channels, m.out_channels, x.shape[-1])))
        elif isinstance(m, BinaryLinear) and m.binary_inputs:
            out.append((name, "dense", (m.in_features, m.out_features)))
        with torch.no_grad():
            x = m.eval()(x)
    return out


def bench_layers(batch: int, rounds: int, reps: int) -> list[dict[str, Any]]:
    rows = []
    for name, kind, shape in layer_shapes():
        if kind == "conv":
            c, o, s = shape
            x = _signs(batch, c, s, s)
            w = _signs(o, c, 3, 3)
            packed = PackedBinaryConv2d.from_signs(w, 1, "same", 1, 0.0)
            c_only = PackedBinaryConv2d.from_signs(w, 1, "same", 1, 0.0, impl="c")
            r = compare(lambda: F.conv2d(x, w, None, 1, 1), lambda: packed(x), rounds, reps, lambda: c_only(x))
            label = f"{name} conv {c}→{o} @{s}×{s}"
        else:
            f_in, o = shape
            x = _signs(batch, f_in)
            w = _signs(o, f_in)
            packed = PackedBinaryLinear.from_signs(w)
            c_only = PackedBinaryLinear.from_signs(w, impl="c")
            r = compare(lambda: F.linear(x, w), lambda: packed(x), rounds, reps, lambda: c_only(x))
            label = f"{name} dense {f_in}→{o}"
        with torch.inference_mode():
            rows.append({"layer": label, "batch": batch, **r, "impl": packed.selected_impl(x)})
    return rows


def _count_impls(model: nn.Module, batch: int) -> dict[str, int]:
    """How many packed layers of ``model`` use each implementation at this batch size."""
    counts: dict[str, int] = {}
    bucket = 1 if batch <= 1 else 1 << (batch - 1).bit_length()
    for m in model.modules():
        if isinstance(m, (PackedBinaryConv2d, PackedBinaryLinear)):
            for key, impl in m.tuned.items():
                if key[0] == bucket and key[-1] == torch.get_num_threads():
                    counts[impl] = counts.get(impl, 0) + 1
    return counts


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 40)
                m.running_var.copy_(torch.rand(n, generator=g) * 60 + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(n, generator=g) * 2 - 1)


def bench_network(batches: list[int], rounds: int, reps: int, tmp: Path, name: str = "binarynet",
                  mode: str = "bnn") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from flipnet.layers import binary_modules, set_weight_mode
    from flipnet.models import create_model

    kwargs: dict[str, Any] = {"mode": mode} if name != "binarynet" else {"input_size": 32}
    model = create_model(name, num_classes=10, in_channels=3, **kwargs)
    set_weight_mode(model, "flip")
    _randomize_bn(model)
    model.eval()
    path = tmp / f"{name}.safetensors"
    export_model(model, path, metadata={"model": {"name": name, "kwargs": kwargs}})
    packed = load_exported(path)
    c_only = _force(load_exported(path), "c")
    n_binary = sum(m.weight.numel() for _, m in binary_modules(model))
    float_bytes = sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * 4 for n, b in model.named_buffers() if "running" in n
    )
    sizes = {
        "binary_weights": n_binary,
        "float32_binary_weight_bytes": n_binary * 4,
        "float32_model_bytes": float_bytes,
        "export_file_bytes": path.stat().st_size,
        "model_ratio": float_bytes / path.stat().st_size,
    }
    rows = []
    for b in batches:
        x = torch.rand(b, 3, 32, 32) * 2 - 1
        with torch.inference_mode():
            same = bool((model(x).argmax(1) == packed(x).argmax(1)).all())
        r = compare(lambda: model(x), lambda: packed(x), rounds, max(1, reps // 2), lambda: c_only(x))
        impls = " ".join(f"{k}×{v}" for k, v in _count_impls(packed, b).items())
        label = "whole BinaryNet (32×32)" if name == "binarynet" else f"whole {name} {mode} (32×32)"
        rows.append({"layer": label, "batch": b, **r, "impl": impls or "-", "same_predictions": same})
    return rows, sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    p.add_argument("--reps", type=int, default=10, help="calls per round at batch 1; fewer at larger batches")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--model", choices=("binarynet", "resnet20", "resnet18"), default="binarynet",
                   help="network for the whole-network rows and the sizes (default: binarynet)")
    p.add_argument("--mode", choices=("bnn", "bwn"), default="bnn", help="mode of a ResNet (default: bnn)")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer BinaryNet rows")
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "kernels": kernel_backend(),
        "python": sys.version.split()[0],
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            machine["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), machine["cpu"])
    except OSError:
        pass
    rows: list[dict[str, Any]] = []
    for b in ([] if ns.no_layers else ns.batch_sizes):
        reps = ns.reps if b == 1 else max(2, ns.reps // 4)
        rows += bench_layers(b, ns.rounds, reps)
    with tempfile.TemporaryDirectory() as tmp:
        net_rows, sizes = bench_network(ns.batch_sizes, ns.rounds, ns.reps, Path(tmp), ns.model, ns.mode)
    rows += net_rows
    print(f"machine: {machine['cpu']}, torch {machine['torch']}, {machine['threads']} threads, kernels {machine['kernels']}\n")
    print("| layer | batch | float32 ms | packed ms | impl | speedup | C-only ms |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['layer']} | {r['batch']} | {r['float_ms']:.3f} | {r['packed_ms']:.3f} | {r['impl']} | "
              f"{r['speedup']:.1f}× | {r.get('c_only_ms', float('nan')):.3f} |")
    print()
    print(f"binary weights: {sizes['binary_weights']:,} = {sizes['float32_binary_weight_bytes']:,} bytes as float32")
    print(f"float32 model (parameters + BatchNorm statistics): {sizes['float32_model_bytes']:,} bytes; "
          f"export file: {sizes['export_file_bytes']:,} bytes ({sizes['model_ratio']:.1f}× smaller)")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"machine": machine, "rows": rows, "sizes": sizes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
