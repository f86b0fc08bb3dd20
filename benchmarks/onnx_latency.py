"""Size and latency of ONNX Runtime on flipnet's ONNX export, next to flipnet's packed path and float PyTorch.

For each model (BinaryNet and ResNet-20 on 32×32 CIFAR-10 inputs, the binary MLP on 28×28) and
batch size, four ways to run the same trained-form network (flip-mode ±1 weights, BatchNorm with
non-trivial statistics) are timed on the CPU:

* ``float PyTorch``: the flipnet model itself in eval mode (float32 ±1 weights, ``F.conv2d``);
* ``packed``: :func:`flipnet.compress.load_exported` of the safetensors export (XNOR-popcount
  layers, folded thresholds; ``impl="auto"``, tuned during the warm-up);
* ``ORT``: ONNX Runtime (CPU execution provider, all graph optimisations) on
  :func:`flipnet.compress.onnx.export_onnx` (folded thresholds, float32 ±1 weights);
* ``ORT bits``: the same graph with bit-packed weights (``weight_storage="bits"``), which ONNX
  Runtime unpacks into constants when the session is created.

Every runtime gets the same number of threads (``--threads``, default 1: the numbers in the docs
come from a 2-core machine shared with other jobs). Calls are interleaved in rounds (float,
packed, ORT, ORT bits, float, ...) so that load from other processes hits all alike; each round
keeps the fastest of its calls, and the table shows the median over rounds. Sizes are bytes on
disk (float32 model: parameters and BatchNorm statistics as float32). The QONNX file's size is
listed too; QONNX's executor runs node by node in Python as a reference, not a deployment
runtime, so it is not timed.

Usage::

    python benchmarks/onnx_latency.py                       # markdown tables
    python benchmarks/onnx_latency.py --models binarynet --batch-sizes 1 --rounds 5
    python benchmarks/onnx_latency.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from flipnet.compress import export_model, kernel_backend, load_exported
from flipnet.compress.onnx import export_onnx
from flipnet.layers import set_weight_mode
from flipnet.models import create_model

MODELS: dict[str, tuple[dict[str, Any], tuple[int, int, int]]] = {
    "binarynet": ({}, (3, 32, 32)),
    "resnet20": ({}, (3, 32, 32)),
    "binary_mlp": ({}, (1, 28, 28)),
}


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 20 + 1)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.num_features, generator=g))


def _best(fn: Callable[[], Any], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(name: str, batches: list[int], rounds: int, threads: int, tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import onnxruntime as ort

    kwargs, shape = MODELS[name]
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    set_weight_mode(model, "flip")
    _randomize_bn(model)
    model.eval()
    st = tmp / f"{name}.safetensors"
    export_model(model, st)
    packed = load_exported(st)
    onnx_f, onnx_b, qonnx_f = tmp / f"{name}.onnx", tmp / f"{name}.bits.onnx", tmp / f"{name}.qonnx.onnx"
    export_onnx(model, onnx_f, input_shape=shape)
    export_onnx(model, onnx_b, input_shape=shape, weight_storage="bits")
    export_onnx(model, qonnx_f, input_shape=shape, format="qonnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(onnx_f), opts, providers=["CPUExecutionProvider"])
    sess_b = ort.InferenceSession(str(onnx_b), opts, providers=["CPUExecutionProvider"])
    float_bytes = sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * 4 for n, b in model.named_buffers() if "running" in n)
    sizes = {"model": name, "float32_bytes": float_bytes, "safetensors_bytes": st.stat().st_size,
             "onnx_bytes": onnx_f.stat().st_size, "onnx_bits_bytes": onnx_b.stat().st_size, "qonnx_bytes": qonnx_f.stat().st_size}
    rows = []
    for batch in batches:
        x = torch.rand(batch, *shape) * 2 - 1
        xn = x.numpy()
        with torch.no_grad():
            ref = model(x)
            diffs = {"packed": float((packed(x) - ref).abs().max()),
                     "ort": float(abs(sess.run(None, {"input": xn})[0] - ref.numpy()).max()),
                     "ort_bits": float(abs(sess_b.run(None, {"input": xn})[0] - ref.numpy()).max())}
            fns = {
                "float": lambda: model(x),
                "packed": lambda: packed(x),
                "ort": lambda: sess.run(None, {"input": xn}),
                "ort_bits": lambda: sess_b.run(None, {"input": xn}),
            }
            reps = 10 if batch == 1 else 2
            for fn in fns.values():  # warm-up (packed layers tune here)
                for _ in range(3):
                    fn()
            times: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(rounds):
                for k, fn in fns.items():
                    times[k].append(_best(fn, reps))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.append({"model": name, "batch": batch, **{f"{k}_ms": v for k, v in med.items()},
                     **{f"max_abs_diff_{k}": v for k, v in diffs.items()}})
    return rows, sizes


def bench_conv_integer(threads: int, rounds: int, c: int = 256, size: int = 15) -> list[dict[str, Any]]:
    """One 3×3 ``c``→``c`` convolution of ±1 values at ``size``×``size``: float ``Conv`` against
    the exact integer form ``ConvInteger`` (±1 weights as int8, input as uint8 ``x + 1`` with zero
    point 1), in ONNX Runtime. Checks that both give the same output."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = np.where(rng.standard_normal((c, c, 3, 3)) >= 0, 1, -1)

    def session(integer: bool) -> Any:
        if integer:
            inits = [numpy_helper.from_array(w.astype(np.int8), "w"), numpy_helper.from_array(np.array(1, np.uint8), "zp"),
                     numpy_helper.from_array(np.array(1.0, np.float32), "one")]
            nodes = [helper.make_node("Add", ["x", "one"], ["x1"]), helper.make_node("Cast", ["x1"], ["xu"], to=TensorProto.UINT8),
                     helper.make_node("ConvInteger", ["xu", "w", "zp"], ["y32"], pads=[1, 1, 1, 1]),
                     helper.make_node("Cast", ["y32"], ["y"], to=TensorProto.FLOAT)]
        else:
            inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
            nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
        graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, size, size])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
        model.ir_version = 9
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    s_float, s_int = session(False), session(True)
    rows = []
    for batch in (1, 64):
        x = np.where(rng.standard_normal((batch, c, size, size)) >= 0, 1, -1).astype(np.float32)
        same = bool((s_float.run(None, {"x": x})[0] == s_int.run(None, {"x": x})[0]).all())
        times: dict[str, list[float]] = {"float": [], "int": []}
        for _ in range(rounds):
            for k, sess in (("float", s_float), ("int", s_int)):
                times[k].append(_best(lambda: sess.run(None, {"x": x}), 3 if batch == 1 else 1))
        rows.append({"batch": batch, "conv_ms": statistics.median(times["float"]) * 1e3,
                     "conv_integer_ms": statistics.median(times["int"]) * 1e3, "same": same})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=1, help="threads for PyTorch and ONNX Runtime (default 1)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--conv-integer", action="store_true",
                   help="only compare float Conv with ConvInteger on one ±1 convolution (256→256, 3×3, 15×15)")
    a = p.parse_args(argv)
    import onnxruntime as ort

    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    if a.conv_integer:
        print("| batch | Conv (float ±1) ms | ConvInteger (int8 ±1) ms | same output |")
        print("|---:|---:|---:|---|")
        for r in bench_conv_integer(a.threads, a.rounds):
            print(f"| {r['batch']} | {r['conv_ms']:.3f} | {r['conv_integer_ms']:.3f} | {r['same']} |")
        return 0
    rows, sizes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            r, s = bench(name, a.batch_sizes, a.rounds, a.threads, Path(tmp))
            rows += r
            sizes.append(s)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, Python {platform.python_version()}, "
          f"{a.threads} thread(s), kernels {kernel_backend()}, {platform.machine()}")
    print()
    print("| model | batch | float PyTorch ms | packed ms | ORT ms | ORT bits ms | ORT vs float | packed vs ORT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['float_ms']:.3f} | {r['packed_ms']:.3f} | {r['ort_ms']:.3f} | "
              f"{r['ort_bits_ms']:.3f} | {r['float_ms'] / r['ort_ms']:.1f}× | {r['ort_ms'] / r['packed_ms']:.1f}× |")
    print()
    print("| model | float32 bytes | safetensors (packed) | ONNX | ONNX bits | QONNX |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in sizes:
        print(f"| {s['model']} | {s['float32_bytes']:,} | {s['safetensors_bytes']:,} | {s['onnx_bytes']:,} | "
              f"{s['onnx_bits_bytes']:,} | {s['qonnx_bytes']:,} |")
    worst = max(max(r[k] for k in r if k.startswith("max_abs_diff")) for r in rows)
    print(f"\nlargest |logit difference| to the float model over all runtimes: {worst:.3g}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "sizes": sizes, "threads": a.threads,
                                            "torch": torch.__version__, "onnxruntime": ort.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
