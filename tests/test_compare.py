"""Run comparison table: validation selection, mean ± std over seeds, differing keys, old runs, CSV, CLI."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from _run_helpers import fake_run

from flipnet.cli import main
from flipnet.errors import CheckpointError
from flipnet.train.compare import compare_runs, differing_keys, format_markdown, short_keys, write_csv


def _group(folder: Path, seeds: tuple[int, ...], **kwargs) -> Path:
    for s in seeds:
        fake_run(folder / f"seed_{s}", 4, seed=s, **kwargs)
    (folder / "summary.json").write_text("{}")
    return folder


def test_selection_is_on_validation_and_stats_are_over_seeds(tmp_path: Path) -> None:
    g = _group(tmp_path / "g", (0, 1, 2))
    rows, keys = compare_runs([g])
    assert len(rows) == 1 and keys == []
    r = rows[0]
    assert r["n_seeds"] == 3 and r["seeds"] == "0 1 2" and r["epochs"] == "4"
    # val_acc rises every epoch, so the best validation epoch is the last: test there = final test
    finals = [0.5 + 0.03 * 4 + 0.01 * s for s in (0, 1, 2)]
    assert r["final_test_acc_mean"] == pytest.approx(statistics.fmean(finals))
    assert r["final_test_acc_std"] == pytest.approx(statistics.stdev(finals))
    assert r["test_at_best_val_mean"] == pytest.approx(statistics.fmean(finals))
    assert r["best_val_acc_mean"] == pytest.approx(statistics.fmean(0.5 + 0.035 * 4 + 0.01 * s for s in (0, 1, 2)))
    assert r["best_epoch_mean"] == 4
    assert r["time_s_mean"] == pytest.approx(0.4)


def test_test_accuracy_is_taken_at_the_best_validation_epoch(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "a", 4)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[1]["val_acc"] = 0.99  # epoch 2 is the best on validation; its test accuracy is 0.56
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = compare_runs([run])[0][0]
    assert r["test_at_best_val_mean"] == pytest.approx(0.56)
    assert r["best_val_acc_mean"] == pytest.approx(0.99) and r["best_epoch_mean"] == 2
    assert r["final_test_acc_mean"] == pytest.approx(0.62)
    # a finished run's summary.json wins over the rows
    (run / "summary.json").write_text(json.dumps({"test_acc_at_best": 0.7, "best_val_acc": 0.8, "test_acc": 0.6, "best_epoch": 3}))
    r = compare_runs([run])[0][0]
    assert (r["test_at_best_val_mean"], r["best_val_acc_mean"], r["final_test_acc_mean"]) == (0.7, 0.8, 0.6)


def test_runs_without_validation_are_not_selected_on_test(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "old", 4, val=False)
    rows, keys = compare_runs([run])
    assert rows[0]["test_at_best_val_mean"] is None and rows[0]["best_val_acc_mean"] is None
    assert rows[0]["final_test_acc_mean"] == pytest.approx(0.62)
    text = format_markdown(rows, keys)
    assert "| n/a | n/a | 0.6200 |" in text and "no validation split" in text


def test_differing_hyperparameters_are_columns_and_labels(tmp_path: Path) -> None:
    a = _group(tmp_path / "a", (0, 1), gamma=1e-4)
    b = _group(tmp_path / "b", (0, 1), gamma=1e-3)
    rows, keys = compare_runs([a, b])
    assert keys == ["optim.binary_kwargs.gamma"]
    assert [r["run"] for r in rows] == ["gamma=0.0001", "gamma=0.001"]
    assert [r["optim.binary_kwargs.gamma"] for r in rows] == [1e-4, 1e-3]
    text = format_markdown(rows, keys)
    header = text.splitlines()[0]
    assert "gamma" in header and "test acc at best val" in header
    assert "±" in text.splitlines()[2] and "mean ± sample standard deviation" in text
    assert len(compare_runs([a, b], merge_seeds=False)[0]) == 4


def test_differing_keys_and_short_names() -> None:
    a = {"seed": 0, "name": "x", "optim.lr": 0.1, "output.dir": "a"}
    b = {"seed": 1, "name": "x", "optim.lr": 0.2, "output.dir": "b"}
    assert differing_keys([a, b]) == ["optim.lr"]  # seed and output never count when something else differs
    assert differing_keys([a, {**a, "seed": 1}]) == ["seed"]
    assert short_keys(["optim.binary_kwargs.lr", "optim.real_kwargs.lr", "train.epochs"]) == {
        "optim.binary_kwargs.lr": "binary_kwargs.lr", "optim.real_kwargs.lr": "real_kwargs.lr", "train.epochs": "train.epochs"}


def test_csv_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _group(tmp_path / "a", (0, 1), gamma=1e-4)
    b = fake_run(tmp_path / "b", 4, gamma=1e-3)
    rows, keys = compare_runs([a, b])
    out = write_csv(rows, keys, tmp_path / "t.csv")
    with open(out) as f:
        table = list(csv.DictReader(f))
    assert [t["run"] for t in table] == ["gamma=0.0001", "gamma=0.001"]
    assert float(table[0]["final_test_acc_mean"]) == pytest.approx(0.625) and table[1]["final_test_acc_std"] == ""
    assert main(["compare", str(a), str(b), "--csv", str(tmp_path / "c.csv")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("| run | seeds |") and (tmp_path / "c.csv").is_file()
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        compare_runs([tmp_path / "missing"])


def test_labels_when_many_keys_differ(tmp_path: Path) -> None:
    from flipnet.train.compare import RunRecord, label_groups

    def rec(name: str, **cfg) -> list[RunRecord]:
        return [RunRecord(tmp_path / name, [], {"name": name.split("#")[0], **cfg})]

    groups = [rec("bop#1", a=1, b=1, c=1, gamma=1), rec("adam", a=2, b=2, c=2, lr=1), rec("bop#2", a=1, b=1, c=1, gamma=2),
              rec("bop#3", a=1, b=3, c=1, gamma=1)]
    labelled, keys = label_groups(groups)
    assert len(keys) > 3
    # recipe names, and within one name the keys that tell its groups apart (most distinct values first)
    assert [g.label for g in labelled] == ["bop, b=1, gamma=1", "adam", "bop, b=1, gamma=2", "bop, b=3, gamma=1"]
    assert short_keys(["train.epochs", "optim.lr"])["train.epochs"] == "train.epochs"  # not the table's own column


def test_a_folder_of_groups_is_every_run_in_it(tmp_path: Path) -> None:
    _group(tmp_path / "runs" / "a", (0, 1), gamma=1e-4)
    _group(tmp_path / "runs" / "b", (0, 1), gamma=1e-3)
    fake_run(tmp_path / "runs" / "c", 4, gamma=1e-2)
    rows, keys = compare_runs([tmp_path / "runs"])
    assert [r["run"] for r in rows] == ["gamma=0.0001", "gamma=0.001", "gamma=0.01"]
    assert [r["n_seeds"] for r in rows] == [2, 2, 1]
