"""The ``flipnet`` command end to end on tiny runs: train, resume, eval, plot, recipes, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flipnet.cli import build_parser, main
from flipnet.train import load_checkpoint
from flipnet.train.plots import read_metrics

torch.set_num_threads(1)

TINY = [
    "data.subset=200",
    "data.test_subset=100",
    "model.kwargs.hidden_sizes=[32]",
    "train.epochs=1",
    "train.tensorboard=false",
    "train.plots=false",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def test_help_lists_the_training_commands() -> None:
    parser = build_parser()
    text = parser.format_help()
    for command in ("train", "eval", "recipes", "plot"):
        assert command in text


def test_recipes_lists_every_shipped_recipe(capsys: pytest.CaptureFixture) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in out]
    assert names == sorted(names)
    assert {"digits_bop", "digits_adam", "cifar10_binarynet_smoke"} <= set(names)
    assert any(line.startswith("digits_bop") and line.endswith("(default)") for line in out)


def test_train_resume_eval_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "digits_bop", *TINY, "output.name=cli", "--out", str(tmp_path)]) == 0
    run = tmp_path / "cli"
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "done: 1 epochs" in out
    assert read_metrics(run)[-1]["epoch"] == 1

    # extending the finished run changes its trajectory: refused unless --force, config.yaml untouched
    before = (run / "config.yaml").read_bytes()
    assert main(["train", "--resume", str(run), "train.epochs=2"]) == 2
    assert "would change train.epochs" in capsys.readouterr().err and (run / "config.yaml").read_bytes() == before
    assert main(["train", "--resume", str(run), "--force", "train.epochs=2"]) == 0
    assert "epochs: 2" in (run / "config.yaml").read_text()
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    capsys.readouterr()

    assert main(["eval", str(run), "--checkpoint", "last"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("test accuracy ") and "100 examples" in line and "last.pt, epoch 2" in line
    acc = float(line.split()[2])
    assert acc == pytest.approx(read_metrics(run)[-1]["test_acc"], abs=1e-12)

    assert main(["eval", str(run), "--data.root", str(tmp_path), "--batch-size", "7"]) == 0
    assert "best.pt" in capsys.readouterr().out

    assert main(["plot", str(run), "--out", str(tmp_path / "pl")]) == 0
    printed = capsys.readouterr().out.split()
    assert {Path(p).name for p in printed} == {"loss.png", "accuracy.png", "flip_ratio.png"}
    assert all(Path(p).is_file() for p in printed)


@pytest.mark.parametrize(
    ("argv", "piece"),
    [
        (["train", "digits_bop", "optim.binray=bop"], "did you mean 'optim.binary'"),
        (["train", "no_such_recipe"], "no recipe file or shipped recipe"),
        (["train", "digits_bop", "train.epochs"], "expected key.sub=value"),
        (["train", "digits_bop", "--resume", "x"], "either a recipe or --resume"),
        (["eval", "/nonexistent/run"], "neither a run folder nor a checkpoint"),
        (["plot", "/nonexistent/run"], "no metrics.jsonl"),
        (["eval", ".", "--batch-size", "0"], "--batch-size must be positive"),
        (["eval", ".", "--device", "tpu"], "--device tpu is not a device; use auto, cpu, cuda or cuda:N"),
        (["train", "digits_bop", "optim.binary_kwargs.gama=1"], "no option 'gama'; did you mean 'gamma'?"),
        (["train", "digits_bop", "optim.real_kwargs.lr=abc"], "lr must be a number, got 'abc'"),
        (["train", "digits_bop", *TINY, "output.dir=/dev/null/runs"], "set output.dir (or --out) to a writable folder"),
        (["train", "cifar10_binarynet_smoke", "data.root=/nonexistent/flipnet-data"], "data.root=DIR and data.options.download=true"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv: list[str], piece: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert piece in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"flipnet {argv[0]}: error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_eval_on_cuda_without_cuda_names_the_eval_flag(capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", ".", "--device", "cuda"]) == 2
    assert "--device cuda but CUDA is not available here; use --device cpu" in capsys.readouterr().err


def test_eval_of_a_corrupt_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.pt").write_bytes(b"\x00" * 100)
    assert main(["eval", str(tmp_path)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_resume_without_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_several_seeds_dispatch_to_train_seeds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", *TINY, "seeds=0,1", "output.name=multi", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "seed 0: test accuracy" in out and "seed 1: test accuracy" in out
    assert (tmp_path / "multi" / "summary.json").is_file()
    # the group folder is not a run: eval names the seed runs inside it
    assert main(["eval", str(tmp_path / "multi")]) == 2
    err = capsys.readouterr().err
    assert f"It holds 2 run folders; give those instead: {tmp_path / 'multi' / 'seed_0'}, " in err, err
    assert err.count("\n") == 1
    # ... but the group resumes as a whole, like a single run
    assert main(["train", "--resume", str(tmp_path / "multi")]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "multi"), "--force", "train.epochs=2"]) == 0
    for seed in (0, 1):
        assert [r["epoch"] for r in read_metrics(tmp_path / "multi" / f"seed_{seed}")] == [1, 2]
        assert load_checkpoint(tmp_path / "multi" / f"seed_{seed}" / "checkpoints" / "last.pt")["config"]["seed"] == seed


def test_a_single_seed_in_seeds_is_the_seed(tmp_path: Path) -> None:
    assert main(["train", *TINY, "seeds=[3]", "output.name=one", "--out", str(tmp_path)]) == 0
    assert load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")["config"]["seed"] == 3


def test_out_folder_named_like_a_number_or_bool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --out is a folder name, never YAML: "2024" must not become the integer 2024.
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "output.name=n", "--out", "2024"]) == 0
    assert (tmp_path / "2024" / "n" / "checkpoints" / "last.pt").is_file()


def test_python_dash_m_flipnet_runs_the_default_recipe(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "flipnet", "train", *TINY, "output.name=sub", "--out", str(tmp_path)],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "training binary_mlp on digits" in proc.stdout  # digits_bop is the default recipe
    assert "epoch 1/1 | train loss" in proc.stdout  # not a terminal: one plain line per epoch
    assert (tmp_path / "sub" / "checkpoints" / "best.pt").is_file()


def test_ctrl_c_in_a_subprocess_saves_and_says_how_to_resume(tmp_path: Path) -> None:
    """A real SIGINT to `flipnet train`: exit status 130, last.pt saved, resume hint printed."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "flipnet", "train", "data.subset=200", "model.kwargs.hidden_sizes=[32]",
         "train.epochs=100000", "train.tensorboard=false", "train.plots=false", "output.name=int",
         "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    last = tmp_path / "int" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"flipnet train --resume {tmp_path / 'int'}" in out
    assert "Traceback" not in err
    saved = load_checkpoint(last)
    per_epoch = read_metrics(tmp_path / "int")[0]["step"]
    assert saved["epoch"] >= 1 and saved["step"] == saved["epoch"] * per_epoch + saved["batch_in_epoch"]


def test_sigterm_in_a_subprocess_saves_and_exits_143(tmp_path: Path) -> None:
    """A batch scheduler's SIGTERM stops like Ctrl-C: last.pt saved, resume hint, status 143."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "flipnet", "train", "data.subset=200", "model.kwargs.hidden_sizes=[32]",
         "train.epochs=100000", "train.tensorboard=false", "train.plots=false", "output.name=term",
         "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    last = tmp_path / "term" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert f"flipnet train --resume {tmp_path / 'term'}" in out and "Traceback" not in err
    assert main(["train", "--resume", str(tmp_path / "term"), "--force", "train.epochs=1"]) == 0


def test_a_closed_output_pipe_is_not_a_traceback() -> None:
    """`flipnet recipes | head -1`: the reader leaves before flipnet writes; no traceback, status 141."""
    proc = subprocess.Popen([sys.executable, "-m", "flipnet", "recipes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    proc.stdout.close()  # before the interpreter has even imported flipnet
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_sigterm_of_a_multi_seed_run_exits_143(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """seeds=0,1 stops on SIGTERM like one run: every member saved, status 143 (not Ctrl-C's 130)."""
    import signal

    from flipnet.train.loop import Trainer

    original = Trainer._log_and_save

    def log_then_term(self, m, row):  # the scheduler's SIGTERM arrives while epoch 1 is logged
        original(self, m, row)
        if self.epoch == 1 and m is self.members[-1]:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_log_and_save", log_then_term)
    status = main(["train", *TINY, "train.epochs=3", "seeds=[0,1]", "output.name=grp", "--out", str(tmp_path)])
    assert status == 143
    assert "flipnet: terminated" in capsys.readouterr().err
    for seed in (0, 1):
        assert load_checkpoint(tmp_path / "grp" / f"seed_{seed}" / "checkpoints" / "last.pt")["epoch"] == 1


def test_overrides_after_an_option_are_overrides(tmp_path: Path) -> None:
    assert main(["train", "--out", str(tmp_path), *TINY, "output.name=late", "train.progress=false"]) == 0
    assert read_metrics(tmp_path / "late")[0]["epoch"] == 1


@pytest.mark.parametrize("argv", [["bogus"], ["train", "--bogus"], ["eval"], ["train", "--out", "x", "--nope"]])
def test_usage_mistakes_are_one_line_with_status_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "error:" in err and "--help" in err


def test_resume_accepts_the_checkpoint_file_and_eval_uses_the_trained_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import flipnet.train.build as build

    assert main(["train", *TINY, "train.epochs=1", "train.progress=false", "output.name=f", "--out", str(tmp_path)]) == 0
    last = tmp_path / "f" / "checkpoints" / "last.pt"
    assert main(["train", "--resume", str(last), "--force", "train.epochs=2"]) == 0
    assert load_checkpoint(last)["epoch"] == 2
    seen = []
    real = build.select_precision
    monkeypatch.setattr(build, "select_precision", lambda setting, device, model=None: seen.append(setting) or real(setting, device, model))
    monkeypatch.setattr("flipnet.train.build.select_precision", build.select_precision)
    from flipnet.train import save_checkpoint

    ckpt = load_checkpoint(last)
    ckpt["meta"]["precision"] = "bf16"  # as if trained where train.precision=auto meant bf16
    save_checkpoint(last, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    assert main(["eval", str(tmp_path / "f"), "--checkpoint", "last", "--device", "cpu"]) == 0
    assert seen == ["bf16"] and "test accuracy" in capsys.readouterr().out  # not the recipe's fp32
