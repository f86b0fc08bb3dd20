"""Sign tracking and sign-dynamics analysis (flipnet.analysis.flips)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flipnet.analysis.flips import (
    SignTracker,
    analyze_run,
    list_snapshots,
    pack_signs,
    read_initial_weights,
    read_snapshot,
    sign_dynamics,
    snapshot_path,
    unpack_signs,
)
from flipnet.errors import CheckpointError
from flipnet.layers import BinaryConv2d, BinaryLinear

torch.set_num_threads(1)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_pack_unpack_signs_round_trip(n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    w[0] = 0.0  # sign(0) = +1
    packed = pack_signs(w)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(n / 8)
    assert torch.equal(unpack_signs(packed, (n,)), torch.where(w >= 0, 1.0, -1.0))
    with pytest.raises(ValueError, match="bytes"):
        unpack_signs(packed, (n + 8,))


def _fake_trainer(run_dir: Path, model: nn.Module, epochs: int) -> SimpleNamespace:
    return SimpleNamespace(model=model, run_dir=run_dir, epoch=0, step=0, is_main=True,
                           config=SimpleNamespace(train=SimpleNamespace(epochs=epochs)))


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        BinaryConv2d(1, 4, 3),
        BinaryConv2d(4, 4, 3, weight_mode="flip"),
        nn.Flatten(),
        BinaryLinear(4, 3, weight_quantizer=None),  # real weights: not tracked
        BinaryLinear(3, 2),
    )


def test_tracker_counts_match_brute_force_and_snapshots_round_trip(tmp_path: Path) -> None:
    model = _model()
    trainer = _fake_trainer(tmp_path, model, epochs=2)
    tracker = SignTracker()
    tracker.on_train_start(trainer)
    assert tracker.layers == ["0", "1", "4"]
    init = {n: w.detach().clone() for n, w in zip(tracker.layers, (model[0].weight, model[1].weight, model[4].weight))}
    g = torch.Generator().manual_seed(1)
    expected = []  # per epoch, per step: flips per layer
    history = {n: [torch.where(init[n] >= 0, 1.0, -1.0)] for n in init}
    for epoch in range(2):
        rows = []
        for _ in range(3):
            with torch.no_grad():
                model[0].weight.add_(torch.randn(model[0].weight.shape, generator=g) * 0.3)
                flip = torch.rand(model[1].weight.shape, generator=g) < 0.2
                model[1].weight.mul_(torch.where(flip, -1.0, 1.0))
                model[4].weight.add_(torch.randn(model[4].weight.shape, generator=g) * 0.3)
            row = []
            for n, w in zip(tracker.layers, (model[0].weight, model[1].weight, model[4].weight)):
                s = torch.where(w.detach() >= 0, 1.0, -1.0)
                row.append(int((s != history[n][-1]).sum()))
                history[n].append(s)
            rows.append(row)
            trainer.step += 1
            tracker.on_step_end(trainer)
        trainer.epoch += 1
        metrics: dict = {}
        tracker.on_epoch_end(trainer, metrics)
        expected.append(rows)
        n_total = sum(w.numel() for w in (model[0].weight, model[1].weight, model[4].weight))
        assert metrics["sign_flip_ratio"] == pytest.approx(np.sum(rows) / (n_total * 3))
        assert tracker.epoch_flips == list(np.sum(rows, axis=0))
    tracker.on_train_end(trainer)

    snaps = list_snapshots(tmp_path)
    assert [e for e, _ in snaps] == [0, 1, 2]
    for epoch, path in snaps:
        snap = read_snapshot(path)
        assert snap.epoch == epoch and snap.step == 3 * epoch
        assert snap.layers == ["0", "1", "4"]
        if epoch == 0:
            assert snap.step_flips.shape == (0, 3)
        else:
            assert snap.step_flips.tolist() == expected[epoch - 1]
        for n in snap.layers:
            assert torch.equal(snap.signs(n), history[n][3 * epoch])
        assert snap.weight_modes == ["latent", "flip", "latent"]
        assert snap.latent_norm is not None and math.isnan(float(snap.latent_norm[1]))
    last = read_snapshot(snapshot_path(tmp_path, 2))
    assert float(last.latent_norm[0]) == pytest.approx(float(model[0].weight.detach().norm()), rel=1e-6)
    saved = read_initial_weights(tmp_path)
    for n in init:
        assert torch.equal(saved[n], init[n])


def _write_history(tmp_path: Path, signs: list[torch.Tensor]) -> None:
    """Write snapshots of a one-layer model whose signs go through ``signs`` (one per epoch)."""
    w = nn.Parameter(signs[0].clone())
    model = nn.Sequential(BinaryLinear(signs[0].shape[1], signs[0].shape[0]))
    model[0].weight = w
    trainer = _fake_trainer(tmp_path, model, epochs=len(signs) - 1)
    tracker = SignTracker()
    tracker.on_train_start(trainer)
    for s in signs[1:]:
        with torch.no_grad():
            w.copy_(s)
        trainer.step += 1
        tracker.on_step_end(trainer)
        trainer.epoch += 1
        tracker.on_epoch_end(trainer, {})
    tracker.on_train_end(trainer)


def test_dynamics_on_a_known_history(tmp_path: Path) -> None:
    # 4 weights over epochs 0..3. weight a: never flips; b: flips at epoch 1 only;
    # c: flips at 1 and back at 2; d: flips at 3.
    s = [
        torch.tensor([[1.0, 1.0, 1.0, 1.0]]),
        torch.tensor([[1.0, -1.0, -1.0, 1.0]]),
        torch.tensor([[1.0, -1.0, 1.0, 1.0]]),
        torch.tensor([[1.0, -1.0, 1.0, -1.0]]),
    ]
    _write_history(tmp_path, s)
    dyn = analyze_run(tmp_path)
    e, equal = dyn.series("equal_final")
    assert e.tolist() == [0, 1, 2, 3]
    assert equal.tolist() == [0.5, 0.5, 0.75, 1.0]
    _, never = dyn.series("never_flip_after")
    # after 0: a only; after 1: a, b; after 2: a, b, c; after 3: all
    assert never.tolist() == [0.25, 0.5, 0.75, 1.0]
    _, changed = dyn.series("changed")
    assert math.isnan(changed[0]) and changed[1:].tolist() == [0.5, 0.25, 0.25]
    _, fr = dyn.series("flip_ratio", "0")
    assert math.isnan(fr[0]) and fr[1:].tolist() == [0.5, 0.25, 0.25]  # one step per epoch
    _, norm = dyn.series("latent_norm")
    assert norm.tolist() == [2.0, 2.0, 2.0, 2.0]
    rows = list(csv.DictReader(open(tmp_path / "analysis" / "sign_dynamics.csv")))
    assert len(rows) == 8 and {r["layer"] for r in rows} == {"0", "total"}
    pngs = sorted(p.name for p in (tmp_path / "analysis").glob("signs_*.png"))
    assert pngs == ["signs_equal_final.png", "signs_flip_ratio.png", "signs_latent_norm.png",
                    "signs_never_flip_after.png"]
    with pytest.raises(KeyError):
        dyn.series("nope")


def test_analysis_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="track_signs"):
        sign_dynamics(tmp_path)
    with pytest.raises(CheckpointError, match="track_signs"):
        read_initial_weights(tmp_path)
    (tmp_path / "signs").mkdir()
    (tmp_path / "signs" / "epoch_0000.safetensors").write_bytes(b"garbage")
    (tmp_path / "signs" / "epoch_0001.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        sign_dynamics(tmp_path)
    # a snapshot whose shape list does not match its layers, or whose packed signs are not uint8
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    meta = {"format": "flipnet-signs", "version": "1", "epoch": "0", "step": "0",
            "layers": '["a", "b"]', "shapes": "[[8]]"}
    save_file({"signs.a": torch.zeros(1, dtype=torch.uint8), "signs.b": torch.zeros(1, dtype=torch.uint8),
               "step_flips": torch.zeros(0, 2, dtype=torch.int64)}, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="shapes"):
        read_snapshot(bad)
    meta["shapes"] = "[[8], [8]]"
    save_file({"signs.a": torch.zeros(1, dtype=torch.int64), "signs.b": torch.zeros(1, dtype=torch.uint8),
               "step_flips": torch.zeros(0, 2, dtype=torch.int64)}, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="corrupt"):
        read_snapshot(bad)
    with pytest.raises(ValueError, match="every"):
        SignTracker(every=0)
    with pytest.raises(ValueError, match="binary layers"):
        SignTracker().on_train_start(_fake_trainer(tmp_path, nn.Linear(2, 2), 1))


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flipnet.train import Trainer, load_config

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config("sun_yao_digits_bwn", [
        "train.epochs=3", "model.kwargs.base_width=4", "data.subset=400", "data.test_subset=200",
        f"output.dir={out}", "output.name=run", "train.progress=false", "train.plots=false",
        "train.tensorboard=false",
    ])
    Trainer.from_config(cfg, [SignTracker()]).fit()
    return out / "run"


def test_trainer_integration_and_cli(tracked_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flipnet.cli import main
    from flipnet.train import load_run

    assert [e for e, _ in list_snapshots(tracked_run)] == [0, 1, 2, 3]
    _, model = load_run(tracked_run, "last")
    final = read_snapshot(snapshot_path(tracked_run, 3))
    from flipnet.layers import named_binary_parameters

    params = {n[: -len(".weight")]: p for n, p in named_binary_parameters(model)}
    for name in final.layers:
        assert torch.equal(final.signs(name), torch.where(params[name].detach() >= 0, 1.0, -1.0))
    # the tracker's flip counts agree with the optimizer's own counters (FlipRatio)
    import json

    rows = [json.loads(line) for line in (tracked_run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["sign_flip_ratio"] == pytest.approx(r["flip_ratio"], rel=1e-9)
    assert main(["analyze", str(tracked_run)]) == 0
    out = capsys.readouterr().out
    assert "equal_final" in out and "sign_dynamics.csv" in out
    table = list(csv.DictReader(open(tracked_run / "analysis" / "sign_dynamics.csv")))
    total = [r for r in table if r["layer"] == "total"]
    assert [int(r["epoch"]) for r in total] == [0, 1, 2, 3]
    assert float(total[-1]["equal_final"]) == 1.0 and float(total[-1]["never_flip_after"]) == 1.0
    assert all(float(r["latent_norm"]) > 0 for r in total)
    assert main(["kernels", str(tracked_run), "--merge-negation", "--no-plots"]) == 0
    assert (tracked_run / "analysis" / "kernels_merged.csv").is_file()
    assert main(["analyze", str(tracked_run / "nope")]) == 2
