"""Training curves: files, seed bands, labels from differing hyperparameters, legends, axes, many layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import pytest

from flipnet.cli import main
from flipnet.errors import CheckpointError
from flipnet.train import plots
from flipnet.train.compare import load_groups
from flipnet.train.plots import group_series, plot_runs, read_metrics

from _run_helpers import fake_run  # noqa: E402


def _is_png(path: Path) -> bool:
    image = mpimg.imread(path)
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.shape[1] > 100


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Capture every figure ``plot_runs`` saves, by file name (the PNG is still written)."""
    seen: dict[str, Any] = {}
    real = plots._save

    def save(fig: Any, path: Path) -> None:
        fig.canvas.draw()
        fig.test_renderer = fig.canvas.get_renderer()  # the canvas is replaced when the figure closes
        seen[path.name] = fig
        real(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    return seen


def test_single_run_plots_go_to_its_plots_folder(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "a", 5)
    written = plot_runs([run])
    assert sorted(p.name for p in written) == ["accuracy.png", "flip_ratio.png", "loss.png"]
    for p in written:
        assert p.parent == run / "plots" and _is_png(p)


def test_honest_axes_whole_epochs_and_legend_outside(tmp_path: Path, figures: dict[str, Any]) -> None:
    a = fake_run(tmp_path / "a", 4, gamma=1e-4)
    b = fake_run(tmp_path / "b", 6, gamma=1e-3, offset=0.2)
    plot_runs([a, b], tmp_path / "out")
    acc = figures["accuracy.png"].axes[0]
    assert acc.get_ylim() == (0.0, 1.0)
    assert "fraction" in acc.get_ylabel()
    loss = figures["loss.png"].axes[0]
    assert loss.get_ylim()[0] == 0.0
    for name in ("accuracy.png", "loss.png", "flip_ratio.png"):
        ax = figures[name].axes[0]
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        legend = ax.get_legend()
        assert legend is not None
        renderer = figures[name].test_renderer
        assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # right of the axes
    assert figures["flip_ratio.png"].axes[0].get_yscale() == "log"
    plot_runs([a, b], tmp_path / "zoom", acc_min=0.5)  # a zoomed accuracy axis says so
    acc = figures["accuracy.png"].axes[0]
    assert acc.get_ylim() == (0.5, 1.0) and "axis starts at 0.5" in acc.get_ylabel()
    plot_runs([a, b], tmp_path / "val", splits=["val"])
    texts = [t.get_text() for t in figures["accuracy.png"].axes[0].get_legend().get_texts()]
    assert len(texts) == 2 and all(t.endswith("(val)") for t in texts)
    with pytest.raises(ValueError, match="splits must be"):
        plot_runs([a], tmp_path / "bad", splits=["dev"])
    with pytest.raises(ValueError, match="acc_min"):
        plot_runs([a], tmp_path / "bad", acc_min=1.0)


def test_labels_are_the_differing_hyperparameters(tmp_path: Path, figures: dict[str, Any]) -> None:
    a = fake_run(tmp_path / "a", 3, gamma=1e-4)
    b = fake_run(tmp_path / "b", 3, gamma=1e-3)
    groups, keys = load_groups([a, b])
    assert keys == ["optim.binary_kwargs.gamma"]
    assert [g.label for g in groups] == ["gamma=0.0001", "gamma=0.001"]
    plot_runs([a, b], tmp_path / "out")
    texts = [t.get_text() for t in figures["accuracy.png"].axes[0].get_legend().get_texts()]
    assert "gamma=0.0001 (val)" in texts and "gamma=0.001 (test)" in texts
    plot_runs([a, b], tmp_path / "out2", labels=["small", "large"])
    texts = [t.get_text() for t in figures["loss.png"].axes[0].get_legend().get_texts()]
    assert "small (train)" in texts and "large (val)" in texts


def test_seed_group_is_one_band_with_mean_and_std(tmp_path: Path, figures: dict[str, Any]) -> None:
    group = tmp_path / "g"
    for s in (0, 1, 2):
        fake_run(group / f"seed_{s}", 4, seed=s)
    (group / "summary.json").write_text("{}")
    groups, _ = load_groups([group])
    assert len(groups) == 1 and len(groups[0].runs) == 3
    xs, mean, std = group_series(groups[0].runs, "val_acc")
    assert xs == [1, 2, 3, 4]
    assert mean[0] == pytest.approx(0.535 + 0.01)  # seeds add 0, 0.01, 0.02
    assert std[0] == pytest.approx(0.01)  # sample std of (0, 0.01, 0.02)
    written = plot_runs([group])
    assert {p.parent for p in written} == {group / "plots"}
    ax = figures["accuracy.png"].axes[0]
    assert len(ax.collections) == 3  # one ±std band per split (train, val, test)
    assert "3 seeds" in ax.get_title()
    # the same runs given one by one merge too; --separate-seeds keeps three curves
    assert len(load_groups([group / "seed_0", group / "seed_1"])[0]) == 1
    assert len(load_groups([group], merge_seeds=False)[0]) == 3
    # one label per run folder keeps the runs apart (what the trainer passes for a group)
    assert [g.label for g in load_groups([group / f"seed_{s}" for s in range(3)], ["a", "b", "c"])[0]] == ["a", "b", "c"]


def test_more_than_ten_layers_are_distinguishable(tmp_path: Path, figures: dict[str, Any]) -> None:
    run = fake_run(tmp_path / "a", 3, layers=14)
    plot_runs([run], tmp_path / "out")
    ax = figures["flip_ratio.png"].axes[0]
    styles = {(line.get_color(), line.get_linestyle()) for line in ax.get_lines() if line.get_label().startswith("fc")}
    assert len(styles) == 14


def test_no_flip_ratio_plot_without_flip_ratios(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "a", 3, flips=False)
    assert {p.name for p in plot_runs([run], tmp_path / "out")} == {"loss.png", "accuracy.png"}


def test_read_metrics_skips_a_torn_line_and_keeps_the_last_row_per_epoch(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "a", 3)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 3, "step": 30, "train_loss": 9.0}) + "\n")
        f.write('{"epoch": 4, "step": 40, "train_lo')  # crash while appending
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] == 9.0
    assert len(plot_runs([run], tmp_path / "out")) == 3


def test_runs_without_config_or_validation(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "old", 3, val=False)
    (run / "config.yaml").unlink()
    written = plot_runs([run], tmp_path / "out")
    assert len(written) == 3 and all(_is_png(p) for p in written)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no metrics.jsonl"):
        plot_runs([tmp_path])
    with pytest.raises(ValueError, match="at least one run"):
        plot_runs([])
    run = fake_run(tmp_path / "a", 2)
    with pytest.raises(ValueError, match="2 labels for 1 runs"):
        plot_runs([run], labels=["x", "y"])


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = fake_run(tmp_path / "a", 3, gamma=1e-4)
    b = fake_run(tmp_path / "b", 3, gamma=1e-3)
    assert main(["plot", str(a), str(b), "--out", str(tmp_path / "o"), "--labels", "x", "y"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "o" / "accuracy.png") in out
    assert main(["plot", str(a), "--labels", "x", "y"]) == 2
    assert "2 labels for 1 runs" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert main(["plot", str(a), "--out", str(tmp_path / "p"), "--prefix", "gallery_"]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["gallery_accuracy.png", "gallery_flip_ratio.png", "gallery_loss.png"]
    assert main(["plot", str(a), "--prefix", "../x"]) == 2
