"""Fake run folders in the trainer's layout (metrics.jsonl, config.yaml), for the plot and compare tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def fake_run(folder: Path, epochs: int, *, seed: int = 0, gamma: float = 1e-4, offset: float = 0.0, flips: bool = True,
             layers: int = 2, val: bool = True) -> Path:
    folder.mkdir(parents=True)
    lines = []
    for e in range(1, epochs + 1):
        row: dict[str, Any] = {"epoch": e, "step": 10 * e, "train_loss": 1.0 / e + offset + 0.01 * seed,
                               "train_acc": 0.5 + 0.04 * e, "test_loss": 1.2 / e + offset,
                               "test_acc": None if e == 1 else 0.5 + 0.03 * e + 0.01 * seed, "time_s": 0.1}
        if val:
            row.update({"val_loss": 1.1 / e, "val_acc": 0.5 + 0.035 * e + 0.01 * seed})
        if flips:
            row["flip_ratio"] = 1e-2 / e
            for j in range(layers):
                row[f"flip_ratio/fc{j + 1}"] = (j + 1) * 1e-3 / e
        lines.append(json.dumps(row))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    config = {"name": "digits_bop", "seed": seed, "optim": {"binary": "bop", "binary_kwargs": {"gamma": gamma, "threshold": 1e-6}},
              "train": {"epochs": epochs}, "output": {"dir": str(folder.parent), "name": folder.name}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder
