r"""Compare runs: one table of validation-selected and final accuracy, mean ± std over seeds.

``flipnet compare RUN_OR_GROUP ...`` (and ``flipnet plot``) read run folders as the trainer
writes them:

* a **run folder** holds ``metrics.jsonl`` (one JSON row per epoch), ``config.yaml`` (the resolved
  recipe) and, once finished, ``summary.json``;
* a **group folder** (several seeds or hyperparameter values trained together, ``seeds=[...]``)
  holds one run folder per member (``seed_0``, ``seed_1``, ...), plus its own ``summary.json``.

Every argument is expanded to its runs; runs whose configs are equal except for the seed (and the
output folder) form one *seed group*, reported as mean ± sample standard deviation
(:math:`s = \sqrt{\sum_i (x_i - \bar x)^2 / (n - 1)}`, blank for one seed). The hyperparameters
in which the groups differ are found by comparing their configs key by key, and label the groups.

Per run, from its last ``metrics.jsonl`` row (or ``summary.json`` where a finished run wrote
one):

``test_at_best_val``
    test accuracy at the epoch of the best validation accuracy (``test_acc_at_best``; computed
    from the rows where an older trainer did not log it). Runs without a validation split
    (``data.val_size`` 0) have none: a number selected on the test set would be optimistic, so
    the table shows ``n/a`` rather than the best test accuracy.
``best_val_acc``, ``best_epoch``
    the best validation accuracy and its epoch.
``final_test_acc``
    test accuracy of the last epoch (the last row that has one).
``epochs``, ``time_s``
    epochs logged, and the run's training time (``summary.json``'s ``time_s``, else the sum of the
    per-epoch ``time_s``; for runs trained together in one vectorised process each member's time
    is the shared wall time).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from flipnet.errors import CheckpointError

__all__ = [
    "read_metrics",
    "RunRecord",
    "RunGroup",
    "find_runs",
    "group_runs",
    "differing_keys",
    "compare_runs",
    "format_markdown",
    "write_csv",
]

#: Config keys that never distinguish runs (where they were written, not what was trained).
IGNORED_KEYS: tuple[str, ...] = ("output.", "data.root", "description")
SEED_KEYS: tuple[str, ...] = ("seed", "seeds")


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch rows of a run (``metrics.jsonl``; a torn last line is skipped).

    When a resumed run re-logged an epoch, the last row of that epoch wins.

    Raises:
        CheckpointError: ``run_dir`` is not a run folder (no ``metrics.jsonl``).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        from .checkpoint import inner_runs_hint

        raise CheckpointError(
            f"{run_dir} has no metrics.jsonl; give a run folder written by flipnet train.{inner_runs_hint(run_dir)}"
        )
    rows: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash while appending
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row.get("epoch"), bool):
            rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        if not d and prefix:
            out[prefix[:-1]] = "{}"
    elif isinstance(d, list):
        out[prefix[:-1]] = json.dumps(d, sort_keys=True, default=str)
    else:
        out[prefix[:-1]] = d
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _num(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


@dataclass
class RunRecord:
    """One run folder: its rows, flattened config and the numbers the table reports."""

    path: Path
    rows: list[dict[str, Any]]
    config: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> Any:
        return self.config.get("seed", self.summary.get("seed"))

    def identity(self) -> tuple:
        """The config without seed and output keys: runs with equal identities are seeds of one group."""
        return tuple(sorted((k, json.dumps(v, default=str)) for k, v in self.config.items() if not _ignored(k) and k not in SEED_KEYS))

    def metric(self, key: str) -> float | None:
        """A summary number: ``summary.json`` where written, else computed from the rows."""
        rows = self.rows
        last = rows[-1] if rows else {}
        if key == "final_test_acc":
            v = _num(self.summary.get("test_acc")) if self.summary else None
            if v is None:
                tests = [r for r in rows if _num(r.get("test_acc")) is not None]
                v = _num(tests[-1]["test_acc"]) if tests else None
            return v
        if key == "best_val_acc":
            v = _num(self.summary.get("best_val_acc")) if self.summary else None
            if v is None:
                v = _num(last.get("best_val_acc"))
            if v is None:
                vals = [_num(r.get("val_acc")) for r in rows]
                vals_f = [x for x in vals if x is not None]
                v = max(vals_f) if vals_f else None
            return v
        if key == "test_at_best_val":
            v = _num(self.summary.get("test_acc_at_best")) if self.summary else None
            if v is None:
                v = _num(last.get("test_acc_at_best"))
            if v is None:  # older runs: the first epoch with the best validation accuracy
                best, at = -math.inf, None
                for r in rows:
                    val = _num(r.get("val_acc"))
                    if val is not None and val > best:
                        best, at = val, _num(r.get("test_acc"))
                v = at
            return v
        if key == "best_epoch":
            v = _num(self.summary.get("best_epoch")) if self.summary else None
            if v is None:
                best, at = -math.inf, None
                for r in rows:
                    val = _num(r.get("val_acc"))
                    if val is not None and val > best:
                        best, at = val, float(r["epoch"])
                v = at
            return v
        if key == "epochs":
            return float(last["epoch"]) if rows else None
        if key == "time_s":
            v = _num(self.summary.get("time_s")) if self.summary else None
            if v is not None:
                return v
            times = [_num(r.get("time_s")) for r in rows]
            return sum(t for t in times if t is not None) if rows else None
        return _num(last.get(key))


def _ignored(key: str) -> bool:
    return any(key == p or key.startswith(p) for p in IGNORED_KEYS)


def _is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file()


def _run_dirs(path: Path, depth: int) -> list[Path]:
    """Run folders at ``path`` or below it (at most ``depth`` levels), sorted by name per level."""
    if _is_run(path):
        return [path]
    if depth == 0 or not path.is_dir():
        return []
    try:
        subs = sorted(d for d in path.iterdir() if d.is_dir() and d.name != "plots")
    except OSError:
        return []
    return [r for d in subs for r in _run_dirs(d, depth - 1)]


def find_runs(paths: Sequence[str | os.PathLike]) -> list[RunRecord]:
    """Every run under ``paths``: a run folder is itself, a group folder its member run folders,
    and a folder of run or group folders (e.g. ``runs/``) every run in them.

    Raises:
        CheckpointError: a path holds no run (no ``metrics.jsonl`` in it or up to two levels below).
    """
    records: list[RunRecord] = []
    for p in paths:
        path = Path(p)
        dirs = _run_dirs(path, 2)
        if not dirs:
            raise CheckpointError(
                f"{path} has no metrics.jsonl, and no sub-folder has one; give run folders or group folders "
                "written by flipnet train"
            )
        for d in dirs:
            records.append(RunRecord(d, read_metrics(d), _flatten(_read_yaml(d / "config.yaml")), _read_json(d / "summary.json")))
    return records


@dataclass
class RunGroup:
    """Runs that differ only in their seed (or one run), with the label they are shown under."""

    label: str
    runs: list[RunRecord]

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]


def group_runs(records: Sequence[RunRecord], merge_seeds: bool = True) -> list[list[RunRecord]]:
    """Runs grouped by config without seed and output (first appearance order); one run per group
    with ``merge_seeds=False``."""
    if not merge_seeds:
        return [[r] for r in records]
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        key = r.identity() if r.config else ("path", str(r.path))
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Flattened config keys whose values are not the same in every config (seed and output
    keys left out unless nothing else differs), in first-appearance order."""
    if len(configs) < 2:
        return []
    keys: list[str] = []
    for c in configs:
        for k in c:
            if k not in keys and not _ignored(k):
                keys.append(k)
    missing = object()

    def differs(k: str) -> bool:
        vals = [json.dumps(c.get(k, missing), default=str) if c.get(k, missing) is not missing else "<missing>" for c in configs]
        return len(set(vals)) > 1

    diff = [k for k in keys if differs(k)]
    non_seed = [k for k in diff if k not in SEED_KEYS]
    return non_seed or diff


#: Column names of the comparison table, which a short key must not repeat.
_RESERVED = {"run", "seeds", "epochs", "name"}


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Shortest unique dotted suffix of each key (``optim.binary_kwargs.gamma`` → ``gamma``;
    ``train.epochs`` stays whole, since the table has its own ``epochs`` column)."""
    out: dict[str, str] = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            if (cand == k or cand not in _RESERVED) and sum(1 for o in keys if o == cand or o.endswith("." + cand)) == 1:
                out[k] = cand
                break
        else:
            out[k] = k
    return out


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if v is None:
        return "—"
    return str(v)


MAX_LABEL_KEYS = 3


def label_groups(groups: Sequence[list[RunRecord]], labels: Sequence[str] | None = None) -> tuple[list[RunGroup], list[str]]:
    """Label each group by the hyperparameters in which the groups differ (or by ``labels``).

    Returns the labelled groups and the differing keys. When more than three keys differ and the
    recipe names differ, the recipe name is the label (the table lists every differing key).
    """
    configs = [g[0].config for g in groups]
    keys = differing_keys(configs)
    if labels is not None:
        if len(labels) != len(groups):
            raise ValueError(f"{len(labels)} labels for {len(groups)} runs or seed groups")
        return [RunGroup(str(lab), list(g)) for lab, g in zip(labels, groups)], keys
    short = short_keys(keys)
    out: list[RunGroup] = []
    for g, c in zip(groups, configs):
        if not keys or not c:
            label = g[0].path.name if len(g) == 1 else g[0].path.parent.name or g[0].path.name
        elif len(keys) > MAX_LABEL_KEYS and "name" in keys:
            # the recipe name, plus what tells apart the groups that share it
            same = [h[0].config for h in groups if h[0].config.get("name") == c.get("name")]
            within = [k for k in differing_keys(same) if k != "name"] if len(same) > 1 else []
            # keys with the most distinct values first: they tell the most groups apart
            within.sort(key=lambda k: -len({json.dumps(x.get(k), default=str) for x in same}))
            label = str(c.get("name"))
            if within:
                label += ", " + ", ".join(f"{short[k]}={fmt_value(c.get(k))}" for k in within[:2]) + (", …" if len(within) > 2 else "")
        else:
            shown = [k for k in keys if k != "name"] or keys
            label = ", ".join(f"{short[k]}={fmt_value(c.get(k))}" for k in shown[:MAX_LABEL_KEYS])
            if len(shown) > MAX_LABEL_KEYS:
                label += ", …"
        out.append(RunGroup(label, list(g)))
    # equal labels (e.g. the same folder name in two places) get a number
    seen: dict[str, int] = {}
    for grp in out:
        n = seen.get(grp.label, 0)
        seen[grp.label] = n + 1
        if n:
            grp.label = f"{grp.label} ({n + 1})"
    return out, keys


def load_groups(paths: Sequence[str | os.PathLike], labels: Sequence[str] | None = None, merge_seeds: bool = True) -> tuple[list[RunGroup], list[str]]:
    """:func:`find_runs`, :func:`group_runs` and :func:`label_groups` in one call.

    With ``labels`` of one per *path* where merging would give another count, runs are not merged
    (each path its own curve), so a caller naming every run keeps one label per run.
    """
    records = find_runs(paths)
    groups = group_runs(records, merge_seeds)
    if labels is not None and len(labels) != len(groups) and len(labels) == len(records):
        groups = group_runs(records, merge_seeds=False)
    return label_groups(groups, labels)


# ============================================================================ the table
_STATS = ("test_at_best_val", "best_val_acc", "final_test_acc")


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None, 0
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None), len(v)


def compare_runs(paths: Sequence[str | os.PathLike], labels: Sequence[str] | None = None,
                 merge_seeds: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per seed group: label, seeds, epochs, the accuracies' mean/std, time, hyperparameters.

    Returns ``(rows, differing keys)``. Row keys: ``run``, ``n_seeds``, ``seeds``, ``epochs``,
    ``<stat>_mean``/``<stat>_std``/``<stat>_n`` for ``test_at_best_val``, ``best_val_acc``,
    ``final_test_acc``, ``best_epoch_mean``, ``time_s_mean``, and one entry per differing key.
    """
    groups, keys = load_groups(paths, labels, merge_seeds)
    rows: list[dict[str, Any]] = []
    for g in groups:
        row: dict[str, Any] = {"run": g.label, "n_seeds": len(g.runs), "seeds": " ".join(fmt_value(s) for s in g.seeds)}
        epochs = [r.metric("epochs") for r in g.runs]
        e = [int(x) for x in epochs if x is not None]
        row["epochs"] = (str(e[0]) if len(set(e)) == 1 else f"{min(e)}–{max(e)}") if e else ""
        for stat in _STATS:
            m, s, n = _mean_std([r.metric(stat) for r in g.runs])
            row[f"{stat}_mean"], row[f"{stat}_std"], row[f"{stat}_n"] = m, s, n
        row["best_epoch_mean"] = _mean_std([r.metric("best_epoch") for r in g.runs])[0]
        row["time_s_mean"] = _mean_std([r.metric("time_s") for r in g.runs])[0]
        for k in keys:
            row[k] = g.config.get(k)
        rows.append(row)
    return rows, keys


def _pm(mean: float | None, std: float | None, n: int, total: int) -> str:
    if mean is None:
        return "n/a"
    text = f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")
    if n < total:
        text += f" ({n} of {total})"
    return text


def format_markdown(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    """The comparison as a markdown table (accuracies as fractions, mean ± std over seeds)."""
    short = short_keys(list(keys))
    head = ["run", "seeds", "epochs", "test acc at best val", "best val acc", "final test acc", "time/run (s)"]
    head += [short[k] for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * 6 + ["---"] * len(keys)) + "|"]
    for r in rows:
        n = r["n_seeds"]
        cells = [
            str(r["run"]),
            str(n),
            str(r["epochs"]),
            _pm(r["test_at_best_val_mean"], r["test_at_best_val_std"], r["test_at_best_val_n"], n),
            _pm(r["best_val_acc_mean"], r["best_val_acc_std"], r["best_val_acc_n"], n),
            _pm(r["final_test_acc_mean"], r["final_test_acc_std"], r["final_test_acc_n"], n),
            "n/a" if r["time_s_mean"] is None else f"{r['time_s_mean']:.1f}",
        ]
        cells += [fmt_value(r.get(k)) for k in keys]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = []
    if any(r["test_at_best_val_mean"] is None for r in rows):
        notes.append("n/a in 'test acc at best val': the run has no validation split (data.val_size), so no epoch is "
                     "selected; the final test accuracy is not selected on anything.")
    if any(r["n_seeds"] > 1 for r in rows):
        notes.append("mean ± sample standard deviation over seeds.")
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


def write_csv(rows: Sequence[dict[str, Any]], keys: Sequence[str], path: str | os.PathLike) -> Path:
    """The comparison as CSV (plain numbers: ``*_mean``, ``*_std``, ``*_n`` columns), written atomically."""
    from flipnet.utils import atomic_write_text

    columns = ["run", "n_seeds", "seeds", "epochs"]
    for stat in _STATS:
        columns += [f"{stat}_mean", f"{stat}_std", f"{stat}_n"]
    columns += ["best_epoch_mean", "time_s_mean", *keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    out = Path(path)
    atomic_write_text(out, buf.getvalue())
    return out
