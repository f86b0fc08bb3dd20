"""Time one optimizer step of Bop, Bop2ndOrder and CEMA against Adam(foreach=True).

The parameters have the shapes of the binary weights of BinaryNet (Courbariaux et al. 2016)
on CIFAR-10: 3×3 convolutions 3→128, 128→128, 128→256, 256→256, 256→512, 512→512 and dense
layers 8192→1024, 1024→1024, 1024→10 (about 14M weights). Gradients are random and fixed; the
time is that of ``optimizer.step()`` alone, median over ``--repeats`` steps after ``--warmup``;
the optimizers take turns step by step so that load changes on a shared machine hit all alike.

Usage::

    python benchmarks/optimizer_step.py                  # CPU
    python benchmarks/optimizer_step.py --device cuda    # GPU, if present
    python benchmarks/optimizer_step.py --threads 1 --repeats 20
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
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


def build(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from flipnet.optim import CEMA, Bop, Bop2ndOrder

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
) -> dict[str, float]:
    """Median wall time of each step function in milliseconds.

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
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    n = sum(torch.Size(s).numel() for s in BINARYNET_SHAPES)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    print(f"device: {where}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{n:,} weights in {len(BINARYNET_SHAPES)} tensors, {args.dtype}")
    optimizers = {name: build(name, make_params(device, dtype)) for name in ("adam", "bop", "bop2ndorder", "cema")}
    results = time_steps({name: opt.step for name, opt in optimizers.items()}, device, args.warmup, args.repeats)
    print(f"{'optimizer':<14}{'ms/step':>10}{'vs Adam':>10}")
    for name, ms in results.items():
        print(f"{name:<14}{ms:>10.2f}{ms / results['adam']:>10.2f}")


if __name__ == "__main__":
    main()
