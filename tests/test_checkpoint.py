"""Checkpoints: resume ends bitwise equal to an uninterrupted run; corrupt files; RNG round trip."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flipnet.errors import CheckpointError, ConfigError
from flipnet.train import Callback, Trainer, load_checkpoint, load_config, load_run, save_checkpoint
from flipnet.train.checkpoint import get_rng_state, resolve_checkpoint, set_rng_state
from flipnet.train.plots import read_metrics

torch.set_num_threads(1)

# Dropout (global torch RNG), augmentation (loader RNG), per-step and per-epoch schedules: every
# source of state that a resume must restore.
RESUME_OVERRIDES = [
    "data.subset=192",
    "data.test_subset=64",
    "data.augment=[crop]",
    "model.kwargs={hidden_sizes: [32], dropout: 0.2}",
    "optim.schedules=[{key: lr, route: real, type: cosine, unit: step}, "
    "{key: gamma, route: binary, type: step, factor: 0.5, every: 1, unit: epoch}]",
    "train.epochs=3",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
    "train.nan_check_every=4",
]


def _config(tmp_path: Path, name: str, *extra: str) -> Any:
    return load_config("digits_bop", [*RESUME_OVERRIDES, f"output.dir={tmp_path}", f"output.name={name}", *extra])


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested state (tensors with torch.equal, dtype and shape included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"keys differ at {where}: {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class SigintAfterEpoch(Callback):
    """Sends a real SIGINT at the end of epoch ``n`` (the trainer stops after saving that epoch)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        if trainer.epoch == self.n:
            os.kill(os.getpid(), signal.SIGINT)


class InterruptAtStep(Callback):
    """Raises KeyboardInterrupt after optimizer step ``n`` (mid-epoch)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.step == self.n:
            raise KeyboardInterrupt


def _rows_without_time(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(run)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("resume")
    trainer = Trainer.from_config(_config(root, "straight"))
    trainer.fit()
    return trainer.run_dir, trainer.state_dict()


def _check_equal_to_uninterrupted(resumed: Trainer, uninterrupted: tuple[Path, dict]) -> None:
    """Everything equal, the logged rows included (the epoch interrupted mid-way too: its flip
    ratio counts the flips before the interruption, its hyperparameters are its first step's)."""
    run, state = uninterrupted
    final = resumed.state_dict()
    assert_same(final["model"], state["model"], "model")
    assert_same(final["optimizer"], state["optimizer"], "optimizer")
    assert_same(final["schedulers"], state["schedulers"], "schedulers")
    assert (final["epoch"], final["step"], final["best"]) == (state["epoch"], state["step"], state["best"])
    assert_same(final["rng"], state["rng"], "rng")
    got, want = _rows_without_time(resumed.run_dir), _rows_without_time(run)
    assert got == want
    assert_same(load_checkpoint(resumed.run_dir / "checkpoints" / "best.pt")["model"],
                load_checkpoint(run / "checkpoints" / "best.pt")["model"], "best.pt")


def test_resume_after_ctrl_c_at_epoch_end_is_bitwise_equal(
    tmp_path: Path, uninterrupted: tuple[Path, dict], capsys: pytest.CaptureFixture
) -> None:
    config = _config(tmp_path, "interrupted")
    with pytest.raises(KeyboardInterrupt):
        Trainer.from_config(config, [SigintAfterEpoch(1)]).fit()
    out = capsys.readouterr()
    run = tmp_path / "interrupted"
    assert f"flipnet train --resume {run}" in out.out
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["batch_in_epoch"]) == (1, 0)
    assert len(read_metrics(run)) == 1

    resumed = Trainer.from_config(load_config(run / "config.yaml"), resume=run)
    assert (resumed.epoch, resumed.step) == (1, saved["step"])
    resumed.fit()
    _check_equal_to_uninterrupted(resumed, uninterrupted)


def test_resume_after_interrupt_mid_epoch_is_bitwise_equal(tmp_path: Path, uninterrupted: tuple[Path, dict]) -> None:
    run = tmp_path / "mid"
    first = Trainer.from_config(_config(tmp_path, "mid"), [InterruptAtStep(9)])  # 6 steps per epoch: epoch 2, batch 3
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["step"], saved["batch_in_epoch"]) == (1, 9, 3)
    assert "partial" in saved

    resumed = Trainer.from_config(load_config(run / "config.yaml"), resume=run / "checkpoints" / "last.pt")
    assert resumed.run_dir == run
    resumed.fit()
    _check_equal_to_uninterrupted(resumed, uninterrupted)


def test_resume_of_a_finished_run_does_nothing(uninterrupted: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    run, state = uninterrupted
    trainer = Trainer.from_config(load_config(run / "config.yaml"), resume=run)
    rows = read_metrics(run)
    assert trainer.fit() == rows[-1]
    assert "nothing to do" in capsys.readouterr().out
    assert_same(trainer.state_dict()["model"], state["model"])


def test_checkpoint_format_and_safe_load(uninterrupted: tuple[Path, dict]) -> None:
    run, _ = uninterrupted
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)  # plain data only
    assert ckpt["format"] == "flipnet-checkpoint" and ckpt["version"] == 1
    for key in ("model", "optimizer", "schedulers", "epoch", "step", "rng", "config", "best", "meta"):
        assert key in ckpt
    assert ckpt["meta"]["num_classes"] == 10 and ckpt["meta"]["input_shape"] == [1, 8, 8]
    assert ckpt["config"]["name"] == "digits_bop"
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["best"] == max(r["val_acc"] for r in read_metrics(run))  # chosen on validation, never on test


def test_load_run_rebuilds_the_model(uninterrupted: tuple[Path, dict]) -> None:
    run, state = uninterrupted
    config, model = load_run(run, "last")
    assert config.name == "digits_bop" and not model.training
    assert_same(model.state_dict(), state["model"])
    config_best, model_best = load_run(run / "checkpoints" / "best.pt")
    assert config_best == config
    assert_same(model_best.state_dict(), load_checkpoint(run / "checkpoints" / "best.pt")["model"])


@pytest.mark.parametrize(
    "damage",
    ["truncate", "garbage", "empty", "not_a_dict", "other_format", "future_version", "pickled_object", "missing_keys"],
)
def test_corrupt_checkpoints_raise_checkpoint_error(tmp_path: Path, damage: str, uninterrupted: tuple[Path, dict]) -> None:
    run, _ = uninterrupted
    good = (run / "checkpoints" / "last.pt").read_bytes()
    path = tmp_path / "bad.pt"
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not_a_dict":
        torch.save([1, 2, 3], path)
    elif damage == "other_format":
        torch.save({"model": {}}, path)
    elif damage == "future_version":
        torch.save({"format": "flipnet-checkpoint", "version": 99, "model": {}, "epoch": 0, "step": 0}, path)
    elif damage == "pickled_object":
        torch.save({"format": "flipnet-checkpoint", "version": 1, "model": {}, "epoch": 0, "step": 0,
                    "evil": Path("x")}, path)
    else:
        torch.save({"format": "flipnet-checkpoint", "version": 1}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_damaged_pickle_inside_a_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    # A flipped byte in data.pkl can make the weights-only unpickler raise KeyError (unknown
    # memo index); that is a corrupt file, not a traceback.
    import zipfile

    path = tmp_path / "memo.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02h\x05.")  # BINGET 5 with an empty memo
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/version", b"3\n")
    with pytest.raises(CheckpointError, match="corrupt or not a flipnet checkpoint"):
        load_checkpoint(path)


def test_resume_from_a_corrupt_last_checkpoint_fails_clearly(tmp_path: Path, uninterrupted: tuple[Path, dict]) -> None:
    run, _ = uninterrupted
    copy = tmp_path / "copy"
    (copy / "checkpoints").mkdir(parents=True)
    (copy / "config.yaml").write_bytes((run / "config.yaml").read_bytes())
    (copy / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer.from_config(load_config(copy / "config.yaml"), resume=copy)


def test_missing_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="neither a run folder nor a checkpoint"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoints/last.pt"):
        resolve_checkpoint(tmp_path, "last")
    with pytest.raises(CheckpointError, match="'best' or 'last'"):
        resolve_checkpoint(tmp_path, "middle")


def test_best_falls_back_to_last(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"model": {}, "epoch": 0, "step": 0})
    assert resolve_checkpoint(tmp_path, "best") == tmp_path / "checkpoints" / "last.pt"


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1, "step": 2})
    save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "epoch": 2, "step": 4})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert load_checkpoint(path)["epoch"] == 2


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    save_checkpoint(tmp_path / "r.pt", {"model": {}, "epoch": 0, "step": 0, "rng": get_rng_state()})
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], random.gauss(0, 1))
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], random.gauss(0, 1))
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2:] == got[2:]


class _OnDevice:
    """Stands in for a CUDA tensor (what ``load_checkpoint(map_location="cuda")`` gives):
    ``.numpy()`` fails until it is copied to the host with ``.cpu()``."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def cpu(self) -> torch.Tensor:
        return self.t

    def tolist(self) -> list:
        return self.t.tolist()

    def numpy(self) -> np.ndarray:
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first")


def test_rng_state_restores_from_a_checkpoint_loaded_onto_the_device() -> None:
    # Trainer.from_config(resume=...) loads the checkpoint with map_location=its device, so on CUDA the saved
    # RNG tensors arrive there; restoring them must not fail with "RNG state is malformed".
    np.random.seed(4)
    state = get_rng_state()
    expected = np.random.rand(4)
    state["torch"] = _OnDevice(state["torch"])
    state["numpy"]["keys"] = _OnDevice(state["numpy"]["keys"])
    state["python"]["state"] = _OnDevice(state["python"]["state"])
    np.random.seed(99)
    set_rng_state(state)
    assert np.array_equal(np.random.rand(4), expected)


def test_malformed_rng_state_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="RNG state is malformed"):
        set_rng_state({"torch": torch.zeros(3, dtype=torch.uint8)})


def test_a_hostile_pickle_is_refused_without_advice_to_load_it_unsafely(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "flipnet-checkpoint", "version": 1, "model": {}, "epoch": 0, "step": 0, "x": Evil()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "refuses to load" in message and "\n" not in message
    assert "weights_only" not in message and "trust" not in message.lower()


def _finished(tmp_path: Path, name: str = "done", *extra: str) -> Path:
    Trainer.from_config(_config(tmp_path, name, "train.epochs=2", *extra)).fit()
    return tmp_path / name


@pytest.mark.parametrize(
    ("override", "keys"),
    [("seed=5", "seed"), ("data.batch_size=16", "data.batch_size"),
     ("optim.binary_kwargs.gamma=0.5", "optim.binary_kwargs.gamma"), ("train.epochs=3", "train.epochs")],
)
def test_resume_refuses_trajectory_changes_unless_forced(tmp_path: Path, override: str, keys: str) -> None:
    run = _finished(tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ConfigError) as info:
        Trainer.from_config(load_config(run / "config.yaml", [override]), resume=run)
    assert keys in str(info.value) and "--force" in str(info.value)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing rewritten


def test_forced_epoch_extension_keeps_the_schedule_horizon(tmp_path: Path) -> None:
    """A cosine over the original 2 epochs ends at its final value; extra epochs stay there."""
    run = _finished(tmp_path, "short", "optim.schedules=[{key: lr, route: real, type: cosine, unit: step}]")
    first_lr = read_metrics(run)[0]["real/lr"]
    trainer = Trainer.from_config(load_config(run / "config.yaml", ["train.epochs=4"]), resume=run, force=True)
    trainer.fit()
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["real/lr"] == first_lr and rows[2]["real/lr"] == rows[3]["real/lr"] == pytest.approx(0.0, abs=1e-12)
    assert load_config(run / "config.yaml").train.epochs == 4  # said so: --force rewrites config.yaml
    assert load_checkpoint(run / "checkpoints" / "last.pt")["schedule_epochs"] == 2


def test_damaged_metrics_log_on_resume_is_a_clear_error(tmp_path: Path) -> None:
    run = tmp_path / "dmg"
    with pytest.raises(KeyboardInterrupt):
        Trainer.from_config(_config(tmp_path, "dmg"), callbacks=[SigintAfterEpoch(2)]).fit()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0][:-5] + "\n" + lines[1] + "\n")  # epoch 1's row damaged
    damaged = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match=r"damaged at line 1"):
        Trainer.from_config(load_config(run / "config.yaml"), resume=run)
    assert (run / "metrics.jsonl").read_bytes() == damaged  # the history is not silently dropped


def test_sigterm_saves_and_stops_like_ctrl_c(tmp_path: Path) -> None:
    class SigtermAfterStep(Callback):
        def on_step_end(self, trainer: Trainer) -> None:
            if trainer.step == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer = Trainer.from_config(_config(tmp_path, "term"), callbacks=[SigtermAfterStep()])
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.stop_signal == signal.SIGTERM
    saved = load_checkpoint(tmp_path / "term" / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["step"], saved["batch_in_epoch"]) == (0, 4, 4)


def test_checkpoint_of_another_architecture_is_one_clear_error(tmp_path: Path) -> None:
    run = _finished(tmp_path, "arch")
    wider = _config(tmp_path, "other", "model.kwargs={hidden_sizes: [48], dropout: 0.2}")
    with pytest.raises(CheckpointError, match="does not fit") as info:
        Trainer.from_config(wider, resume=run / "checkpoints" / "last.pt", force=True)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_folder_is_one_clear_error(tmp_path: Path) -> None:
    trainer = Trainer.from_config(_config(tmp_path, "ro", "train.epochs=1"))
    (trainer.run_dir / "checkpoints").mkdir()
    (trainer.run_dir / "checkpoints").chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="cannot write"):
            trainer.fit()
    finally:
        (trainer.run_dir / "checkpoints").chmod(0o700)


def test_disk_full_while_saving_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import flipnet.train.checkpoint as ckpt_module

    def full(obj: Any, path: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer = Trainer.from_config(_config(tmp_path, "full", "train.epochs=1"))
    monkeypatch.setattr(ckpt_module, "atomic_torch_save", full)
    with pytest.raises(CheckpointError, match="No space left on device.*free disk space") as info:
        trainer.fit()
    assert "\n" not in str(info.value)


def test_resume_refuses_a_precision_that_resolves_otherwise_here(tmp_path: Path) -> None:
    """train.precision=auto is the same text on every machine but not the same arithmetic: the
    precision a run trained in (stored in its checkpoint) must hold on resume, unless --force."""
    run = _finished(tmp_path, "prec")
    last = run / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    assert ckpt["meta"]["precision"] == "fp32"
    ckpt["meta"]["precision"] = "bf16"  # as if trained where auto meant bf16
    save_checkpoint(last, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"trained in precision bf16.*--force"):
        Trainer.from_config(load_config(run / "config.yaml"), resume=run)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert Trainer.from_config(load_config(run / "config.yaml"), resume=run, force=True).precision.name == "fp32"


def test_rows_log_the_optimizer_settings_the_recipe_sets(tmp_path: Path) -> None:
    """Keys set in optim.*_kwargs are logged as the optimizer holds them (here Adam's eps)."""
    run = _finished(tmp_path, "eps", "optim.real_kwargs={lr: 0.003, eps: 1.0e-7}")
    row = read_metrics(run)[0]
    assert (row["real/lr"], row["real/eps"]) == (0.003, 1e-7)


def test_resume_from_best_is_refused_and_loses_no_history(tmp_path: Path) -> None:
    """Continuing from best.pt would drop the epochs logged after it and then overwrite last.pt."""
    run = _finished(tmp_path, "hist")
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"last\.pt, not from best\.pt.*model\.init_from"):
        Trainer.from_config(load_config(run / "config.yaml"), resume=run / "checkpoints" / "best.pt")
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_forced_resume_trains_and_logs_the_changed_hyperparameter(tmp_path: Path) -> None:
    """Loading the optimizer state must not bring back the old, unscheduled settings."""
    run = _finished(tmp_path, "forced")  # gamma and lr are scheduled here; threshold is not
    assert all(r["binary/threshold"] == pytest.approx(1e-6) for r in read_metrics(run))
    trainer = Trainer.from_config(
        load_config(run / "config.yaml", ["optim.binary_kwargs.threshold=1e-4", "train.epochs=3"]), resume=run, force=True)
    groups = [g for g in trainer.optimizer.param_groups if g.get("route") == "binary"]
    assert groups and all(float(g["threshold"]) == pytest.approx(1e-4) for g in groups)
    trainer.fit()
    rows = read_metrics(run)
    assert rows[-1]["epoch"] == 3 and rows[-1]["binary/threshold"] == pytest.approx(1e-4)
    assert rows[0]["binary/threshold"] == pytest.approx(1e-6)
    assert load_config(run / "config.yaml").optim.binary_kwargs["threshold"] == pytest.approx(1e-4)
