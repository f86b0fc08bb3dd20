"""benchmarks/cpu_train.py runs end to end on a tiny configuration and reports every mode."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_train.py"


def _load():
    spec = importlib.util.spec_from_file_location("cpu_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["cpu_train"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_benchmark_reports_every_mode(capsys) -> None:
    bench = _load()
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--models", "narrow", "--batch-sizes", "4", "--rounds", "1", "--threads", "1",
                           "--modes", "plain,fp32,bf16,int8", "--probe-seconds", "0.03", "--warmup", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| narrow | 4 |")]
    assert [r.split("|")[3].strip() for r in rows] == ["plain", "fp32", "bf16", "int8"]
    assert rows[0].split("|")[6].strip() == "1.00x"


def test_binarynet_costs_3_08_gflop_per_training_image() -> None:
    from flipnet.models import create_model

    bench = _load()
    macs, per_layer = bench.count_forward_macs(create_model("binarynet", num_classes=10, in_channels=3), (3, 32, 32))
    by_hand = (30 * 30 * 128 * 3 * 9 + 30 * 30 * 128 * 128 * 9 + 15 * 15 * 256 * 128 * 9 + 15 * 15 * 256 * 256 * 9
               + 7 * 7 * 512 * 256 * 9 + 7 * 7 * 512 * 512 * 9 + 4608 * 1024 + 1024 * 1024 + 1024 * 10)
    assert macs == by_hand == 514_072_064 and round(6 * macs / 1e9, 2) == 3.08
    assert dict(per_layer)["conv2"] == 30 * 30 * 128 * 128 * 9


def test_plain_loop_flips_weights_and_trains_batchnorm() -> None:
    bench = _load()
    torch.manual_seed(0)
    step, net = bench.plain_step(4, 8)
    x, y = torch.rand(6, 3, 32, 32) * 2 - 1, torch.randint(0, 10, (6,))
    before = [w.detach().clone() for w in net.convs]
    shift = net.bns[0].bias.detach().clone()
    for _ in range(3):
        step(x, y)
    assert all(bool((w.abs() == 1).all()) for w in net.convs)  # Bop keeps ±1 weights
    assert not torch.equal(net.bns[0].bias, shift)  # Adam moved the BatchNorm shifts
    assert len(before) == 6 and all(w.grad is None for w in net.convs)
