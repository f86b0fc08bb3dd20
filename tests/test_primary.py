"""Primary-subnetwork experiment (flipnet.analysis.primary) and the scaling driver."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from flipnet.analysis.flips import read_initial_weights, read_snapshot, snapshot_path, tracked_layers
from flipnet.analysis.primary import primary_experiment, set_signs
from flipnet.errors import CheckpointError
from flipnet.layers import BinaryConv2d, BinaryLinear

torch.set_num_threads(1)

_SMALL = ["model.kwargs.base_width=4", "data.subset=400", "data.test_subset=200", "train.progress=false",
          "train.plots=false", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flipnet.train import Trainer, load_config

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config("sun_yao_digits_bwn", ["train.epochs=2", *_SMALL, f"output.dir={out}", "output.name=run"])
    from flipnet.analysis.flips import SignTracker

    Trainer.from_config(cfg, [SignTracker()]).fit()
    return out / "run"


def test_set_signs_latent_flip_and_mismatch() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(BinaryConv2d(1, 2, 3), BinaryLinear(2, 2, weight_mode="flip"))
    signs = {"0": torch.where(torch.randn(2, 1, 3, 3) >= 0, 1.0, -1.0), "1": -torch.ones(2, 2)}
    mags = {"0": torch.full((2, 1, 3, 3), -0.5), "1": torch.full((2, 2), 3.0)}
    mags["0"][0, 0, 0, 0] = 0.0  # a zero magnitude must not lose the sign
    set_signs(m, signs, mags)
    assert torch.equal(torch.where(m[0].weight >= 0, 1.0, -1.0), signs["0"])
    assert torch.allclose(m[0].weight.abs().flatten()[1:], torch.full((17,), 0.5))
    assert torch.equal(m[1].weight.detach(), -torch.ones(2, 2))  # flip mode: exactly ±1
    with pytest.raises(KeyError, match="do not match"):
        set_signs(m, {"0": signs["0"]})


def test_frozen_retraining_keeps_signs_and_reinit_starts_from_them(tracked_run: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from flipnet.cli import main

    assert main(["primary", str(tracked_run), *_SMALL, "--epochs-k", "0", "1", "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "frozen" in printed and "reinit" in printed
    out = tracked_run / "analysis" / "primary"
    rows = list(csv.DictReader(open(out / "primary.csv")))
    assert [(r["k"], r["variant"]) for r in rows] == [
        ("2", "full"), ("0", "frozen"), ("0", "reinit"), ("1", "frozen"), ("1", "reinit")]
    assert [r["signs_kept"] for r in rows] == ["", "true", "", "true", ""]
    assert (out / "primary.png").read_bytes()[:4] == b"\x89PNG"

    # check the saved retrained weights directly: frozen == signs of epoch 1, exactly
    from flipnet.train import load_run

    snap = read_snapshot(snapshot_path(tracked_run, 1))
    _, frozen = load_run(out / "frozen_k0001", "last")
    for name, _, w in tracked_layers(frozen):
        assert torch.equal(torch.where(w.detach() >= 0, 1.0, -1.0), snap.signs(name))
    # and the frozen run only trained real parameters: BatchNorm moved
    _, original = load_run(tracked_run, "last")
    bn_f = dict(frozen.named_parameters())["layer1.0.bn1.weight"]
    assert not torch.equal(bn_f, torch.ones_like(bn_f))
    # reinit started from sign_k * |w_init| and trained (signs may move, but most stay)
    _, reinit = load_run(out / "reinit_k0001", "last")
    init = read_initial_weights(tracked_run)
    agree = sum(int((torch.where(w.detach() >= 0, 1.0, -1.0) == snap.signs(n)).sum()) for n, _, w in tracked_layers(reinit))
    total = sum(w.numel() for _, _, w in tracked_layers(reinit))
    assert 0.5 < agree / total < 1.0
    assert set(init) == {n for n, _, _ in tracked_layers(original)}
    # equal_final of epoch k agrees with the analysis of snapshots
    from flipnet.analysis.flips import sign_dynamics

    _, eq = sign_dynamics(tracked_run).series("equal_final")
    assert float(rows[3]["equal_final_signs"]) == pytest.approx(eq[1], abs=1e-4)


def test_primary_errors(tracked_run: Path) -> None:
    with pytest.raises(CheckpointError, match="recorded epochs"):
        primary_experiment(tracked_run, [7], epochs=1)
    with pytest.raises(ValueError, match="variants"):
        primary_experiment(tracked_run, [1], variants=["lottery"])
    with pytest.raises(ValueError, match="non-negative"):
        primary_experiment(tracked_run, [-1])
    with pytest.raises(CheckpointError, match="config.yaml"):
        primary_experiment(tracked_run / "signs", [0])


def test_scaling_study_compares_the_three_modes(tmp_path: Path) -> None:
    from flipnet.analysis.scaling import scaling_study

    rows = scaling_study("sun_yao_digits_bwn", overrides=["train.epochs=1", "train.track_signs=false", *_SMALL],
                         out_dir=tmp_path)
    assert [r.scale for r in rows] == ["none", "xnor", "learnable"]
    from flipnet.train import load_run

    for r in rows:
        _, model = load_run(r.run_dir)
        layers = [m for m in model.modules() if isinstance(m, BinaryConv2d)]
        assert layers and all(m.scale_mode == r.scale for m in layers)
        assert 0.0 <= r.final_test_acc <= 1.0
    table = list(csv.DictReader(open(tmp_path / "scaling.csv")))
    assert [t["scale"] for t in table] == ["none", "xnor", "learnable"]
    assert (tmp_path / "scaling.png").is_file()
    with pytest.raises(ValueError, match="scales"):
        scaling_study("sun_yao_digits_bwn", scales=["tanh"], out_dir=tmp_path)


def test_run_accuracy_selects_on_validation_never_on_test(tmp_path: Path) -> None:
    import json

    from flipnet.analysis._runs import run_accuracy

    rows = [{"epoch": 1, "test_acc": 0.9, "val_acc": 0.7, "test_acc_at_best": 0.9},
            {"epoch": 2, "test_acc": 0.6, "val_acc": 0.8, "test_acc_at_best": 0.6},
            {"epoch": 3, "test_acc": 0.7, "val_acc": 0.5, "test_acc_at_best": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_accuracy(tmp_path) == (0.7, 0.6)  # the test accuracy at the best validation epoch, not 0.9
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "test_acc_at_best"})
                                                    + "\n" for r in rows))
    assert run_accuracy(tmp_path) == (0.7, 0.7)  # without a validation split: the final one
