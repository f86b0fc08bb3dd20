"""Training curves: files written, overlays, torn metrics lines, bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from flipnet.errors import CheckpointError
from flipnet.train.plots import plot_runs, read_metrics


def _fake_run(folder: Path, epochs: int, offset: float = 0.0, flips: bool = True) -> Path:
    folder.mkdir(parents=True)
    lines = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "step": 10 * e, "train_loss": 1.0 / e + offset, "train_acc": 0.5 + 0.04 * e,
               "test_loss": 1.2 / e + offset, "test_acc": None if e == 1 else 0.5 + 0.03 * e, "time_s": 0.1}
        if flips:
            row.update({"flip_ratio": 1e-2 / e, "flip_ratio/fc1": 2e-2 / e, "flip_ratio/fc2": 5e-3 / e})
        lines.append(json.dumps(row))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _is_png(path: Path) -> bool:
    image = mpimg.imread(path)
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.shape[1] > 100


def test_single_run_plots_go_to_its_plots_folder(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "a", 5)
    written = plot_runs([run])
    assert sorted(p.name for p in written) == ["accuracy.png", "flip_ratio.png", "loss.png"]
    for p in written:
        assert p.parent == run / "plots" and _is_png(p)


def test_overlay_of_several_runs(tmp_path: Path) -> None:
    a = _fake_run(tmp_path / "a", 4)
    b = _fake_run(tmp_path / "b", 6, offset=0.2)
    out = tmp_path / "cmp"
    written = plot_runs([a, b], out, labels=["bop", "adam"])
    assert {p.name for p in written} == {"loss.png", "accuracy.png", "flip_ratio.png"}
    assert all(p.parent == out and _is_png(p) for p in written)


def test_no_flip_ratio_plot_without_flip_ratios(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "a", 3, flips=False)
    assert {p.name for p in plot_runs([run], tmp_path / "out")} == {"loss.png", "accuracy.png"}


def test_read_metrics_skips_a_torn_line_and_keeps_the_last_row_per_epoch(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "a", 3)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 3, "step": 30, "train_loss": 9.0}) + "\n")
        f.write('{"epoch": 4, "step": 40, "train_lo')  # crash while appending
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] == 9.0
    assert len(plot_runs([run], tmp_path / "out")) == 3


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no metrics.jsonl"):
        plot_runs([tmp_path])
    with pytest.raises(ValueError, match="at least one run"):
        plot_runs([])
    run = _fake_run(tmp_path / "a", 2)
    with pytest.raises(ValueError, match="2 labels for 1 runs"):
        plot_runs([run], labels=["x", "y"])
