"""Time one optimizer step of Bop, Bop2ndOrder and CEMA against Adam(foreach=True).

The parameters have the shapes of the binary weights of BinaryNet (Courbariaux et al. 2016)
on CIFAR-10: 3×3 convolutions 3→128, 128→128, 128→256, 256→256, 256→512, 512→512 and dense
layers 8192→1024, 1024→1024, 1024→10 (about 14M weights). Gradients are random and fixed; the
time is that of ``optimizer.step()`` alone, median over ``--repeats`` steps after ``--warmup``;
the optimizers take turns step by step so that load changes on a shared machine hit all alike,
and "vs Adam" is the median over the rounds of (step time / Adam's step time in that round).

Usage::

    python benchmarks/optimizer_step.py                  # CPU
    python benchmarks/optimizer_step.py --device cuda    # GPU, if present
    python benchmarks/optimizer_step.py --threads 1 --repeats 20
    python benchmarks/optimizer_step.py --threads 1 --repeats 21 --baseline d373ef6   # A/B
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Callable

import torch

BINARYNET_SHAPES: list[tuple[int, ...]] = [
    (128, 3, 3, 3),
    (128, 128, 3, 3),
    (256, 128, 3, 3),
    (256, 256, 3, 3),
    (512, 256, 3, 3),
    (512, 512, 3, 3),
    (1024, 8192),
    (1024, 1024),
    (10, 1024),
]


def make_params(device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in BINARYNET_SHAPES:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype).to(device))
        p.grad = (1e-3 * torch.randn(shape, generator=gen, dtype=dtype)).to(device)
        params.append(p)
    return params


def load_baseline(rev: str) -> types.ModuleType:
    """The flip optimizers of git revision ``rev`` of this repository, as a throw-away package.

    Their files (``optim/base.py``, ``bop.py``, ``bop2.py``, ``cema.py``) are read with
    ``git show`` into a temporary folder; relative imports of other flipnet modules point at the
    installed flipnet, and the registry calls of newer revisions go to a stub.
    """
    root = Path(__file__).resolve().parents[1]
    folder = Path(tempfile.mkdtemp(prefix="flipnet_baseline_")) / "flipnet_baseline"
    folder.mkdir()
    for name in ("base", "bop", "bop2", "cema"):
        text = subprocess.run(["git", "show", f"{rev}:src/flipnet/optim/{name}.py"], cwd=root, check=True,
                              capture_output=True, text=True).stdout
        (folder / f"{name}.py").write_text(text.replace("from ..", "from flipnet."))
    (folder / "factory.py").write_text("class OptimInfo:\n    def __init__(self, *a, **k): pass\n\n"
                                        "def register_optimizer(info):\n    return info\n")
    (folder / "__init__.py").write_text("")
    sys.path.insert(0, str(folder.parent))
    return importlib.import_module("flipnet_baseline")


def build(name: str, params: list[torch.nn.Parameter], source: types.ModuleType | None = None) -> torch.optim.Optimizer:
    if source is None:
        from flipnet.optim import CEMA, Bop, Bop2ndOrder
    else:
        Bop = importlib.import_module(f"{source.__name__}.bop").Bop
        Bop2ndOrder = importlib.import_module(f"{source.__name__}.bop2").Bop2ndOrder
        CEMA = importlib.import_module(f"{source.__name__}.cema").CEMA

    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, foreach=True)
    if name == "bop":
        return Bop(params, gamma=1e-3, threshold=1e-6)
    if name == "bop2ndorder":
        return Bop2ndOrder(params, gamma=1e-6, sigma=1e-2, threshold=1e-6)
    if name == "cema":
        return CEMA(params, alpha=1e-4, gamma=0.1)
    raise ValueError(name)


def time_steps(
    steps: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Wall time of each step function in milliseconds, one entry per round.

    The optimizers take turns (one step each per round), so a change in the machine's load
    during the run affects all of them alike.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also time the flip optimizers of this git revision (A/B in the same run)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    n = sum(torch.Size(s).numel() for s in BINARYNET_SHAPES)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_name()}, {os.cpu_count()} cores)"
    load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"device: {where}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{n:,} weights in {len(BINARYNET_SHAPES)} tensors, {args.dtype}{load}")
    names = ("adam", "bop", "bop2ndorder", "cema")
    optimizers = {name: build(name, make_params(device, dtype)) for name in names}
    if args.baseline:
        baseline = load_baseline(args.baseline)
        for name in names[1:]:
            optimizers[f"{name}@{args.baseline}"] = build(name, make_params(device, dtype), baseline)
    times = time_steps({name: opt.step for name, opt in optimizers.items()}, device, args.warmup, args.repeats)
    # the ratio of each round, then the median: robust to load that changes during the run
    width = max(len(n) for n in times) + 2
    print(f"{'optimizer':<{width}}{'ms/step':>10}{'vs Adam':>10}")
    for name, ts in times.items():
        ratio = statistics.median(t / a for t, a in zip(ts, times["adam"]))
        print(f"{name:<{width}}{statistics.median(ts):>10.2f}{ratio:>10.2f}")


if __name__ == "__main__":
    main()
