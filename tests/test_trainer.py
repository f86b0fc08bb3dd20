"""The trainer on tiny digits runs: run folder, metrics, callbacks, NaN stop, init_from, frozen routes."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from flipnet.errors import ConfigError
from flipnet.layers import binary_modules, binary_parameters, real_parameters
from flipnet.train import Callback, Trainer, TrainingDiverged, load_checkpoint, load_config
from flipnet.train.plots import read_metrics

torch.set_num_threads(1)

TINY = [
    "data.subset=256",
    "data.test_subset=128",
    "model.kwargs.hidden_sizes=[32]",
    "train.epochs=2",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
]


def tiny(tmp_path: Path, *extra: str, recipe: str = "digits_bop", name: str = "run") -> Any:
    return load_config(recipe, [*TINY, f"output.dir={tmp_path}", f"output.name={name}", *extra])


class Recorder(Callback):
    """Records hook calls and adds a metric."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.steps = 0

    def on_train_start(self, trainer: Trainer) -> None:
        self.calls.append("start")
        self.initial = {k: v.clone() for k, v in trainer.model.state_dict().items() if isinstance(v, torch.Tensor)}

    def on_step_end(self, trainer: Trainer) -> None:
        self.steps += 1

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        self.calls.append(f"epoch{trainer.epoch}")
        metrics["custom_metric"] = trainer.epoch * 10

    def on_train_end(self, trainer: Trainer) -> None:
        self.calls.append("end")


def test_fit_writes_a_complete_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rec = Recorder()
    trainer = Trainer.from_config(tiny(tmp_path, "train.plots=true", "train.epochs=3"), [rec])
    last = trainer.fit()
    run = tmp_path / "run"
    assert trainer.run_dir == run and trainer.is_main and trainer.device.type == "cpu"
    assert rec.calls == ["start", "epoch1", "epoch2", "epoch3", "end"]
    assert rec.steps == trainer.step == 3 * 8
    for name in ("config.yaml", "metrics.csv", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt",
                 "plots/loss.png", "plots/accuracy.png", "plots/flip_ratio.png"):
        assert (run / name).is_file(), name
    assert load_config(run / "config.yaml") == trainer.config

    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["step"] for r in rows] == [8, 16, 24]
    assert rows[-1] == last
    for r in rows:
        assert 0.0 <= r["train_acc"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0
        assert r["train_loss"] > 0 and r["test_loss"] > 0 and r["time_s"] > 0
        assert r["binary/gamma"] == 1e-3 and r["binary/threshold"] == 1e-6 and "real/lr" in r
        assert "binary/lr" not in r  # Bop has no learning rate
        assert 0.0 < r["flip_ratio"] < 1.0
        assert {"flip_ratio/fc1", "flip_ratio/fc2"} <= set(r)
        assert r["custom_metric"] == r["epoch"] * 10
    assert rows[-1]["test_acc"] > 0.5  # well above chance (0.1) after 3 tiny epochs
    assert rows[0]["real/lr"] > rows[-1]["real/lr"]  # the recipe's cosine schedule ran

    with open(run / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3
    assert {"epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "flip_ratio", "time_s"} <= set(table[0])
    assert not any(k.startswith("flip_ratio/") for k in table[0])
    assert float(table[2]["test_acc"]) == rows[2]["test_acc"]

    # best.pt is chosen on the validation split (never on test); the test accuracy at that epoch is reported
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    best_row = max(rows, key=lambda r: (r["val_acc"], -r["epoch"]))
    assert best["best"] == best_row["val_acc"] and best["epoch"] == best["best_epoch"] == best_row["epoch"]
    assert rows[-1]["test_acc_at_best"] == best_row["test_acc"] and rows[-1]["best_epoch"] == best_row["epoch"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_acc"] == rows[-1]["test_acc"] and summary["test_acc_at_best"] == best_row["test_acc"]
    assert summary["threads"] == trainer.threads == 1
    out = capsys.readouterr().out
    assert out.count("epoch ") >= 3 and "done: 3 epochs" in out and str(run) in out
    assert f"test accuracy {rows[-1]['test_acc']:.4f} at the last epoch, {best_row['test_acc']:.4f} at the best validation epoch" in out


def test_eval_every_skips_evaluations_but_not_the_last(tmp_path: Path) -> None:
    trainer = Trainer.from_config(tiny(tmp_path, "train.epochs=3", "train.eval_every=2"))
    trainer.fit()
    rows = read_metrics(trainer.run_dir)
    assert [r["test_acc"] is None for r in rows] == [True, False, False]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    class PoisonInEpoch2(Callback):
        def on_step_end(self, trainer: Trainer) -> None:
            if trainer.epoch == 1 and trainer.batch_in_epoch == 3:
                with torch.no_grad():
                    for p in real_parameters(trainer.model):
                        p.fill_(float("nan"))

    config = tiny(tmp_path, "train.epochs=4", "train.nan_check_every=2", "train.plots=true")
    trainer = Trainer.from_config(config, [PoisonInEpoch2()])
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    assert "NaN/inf in epoch 2" in message and "between steps 11 and 12" in message
    assert "last.pt" in message and "\n" not in message
    run = tmp_path / "run"
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    assert saved["epoch"] == 1 and saved["step"] == 8
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if isinstance(v, torch.Tensor))
    assert [r["epoch"] for r in read_metrics(run)] == [1]
    assert (run / "plots" / "loss.png").is_file()  # the good epochs are still plotted


def test_nan_check_once_per_epoch(tmp_path: Path) -> None:
    class PoisonAtStep5(Callback):
        def on_step_end(self, trainer: Trainer) -> None:
            if trainer.step == 5:
                with torch.no_grad():
                    real_parameters(trainer.model)[-1].fill_(float("inf"))  # the logits' BatchNorm shift

    trainer = Trainer.from_config(tiny(tmp_path, "train.nan_check_every=0"), [PoisonAtStep5()])
    with pytest.raises(TrainingDiverged, match=r"in epoch 1 \(by step 8\)"):
        trainer.fit()
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_init_from_loads_weights_only(tmp_path: Path) -> None:
    first = Trainer.from_config(tiny(tmp_path, "train.epochs=1", name="first"))
    first.fit()
    source = load_checkpoint(tmp_path / "first" / "checkpoints" / "best.pt")["model"]
    rec = Recorder()
    second = Trainer.from_config(tiny(tmp_path, "train.epochs=1", f"model.init_from={tmp_path / 'first'}", name="second"), [rec])
    second.fit()
    for k, v in source.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(rec.initial[k], v), k
    # weights only: a fresh optimizer and step counter
    assert second.step == 8
    # a Bop run (flip-mode ±1 weights) initialises a latent-weight Adam run
    rec_adam = Recorder()
    adam = Trainer.from_config(tiny(tmp_path, "train.epochs=1", f"model.init_from={tmp_path / 'first'}", name="adam",
                        recipe="digits_adam"), [rec_adam])
    assert all(m.weight_mode == "latent" for _, m in binary_modules(adam.model))
    adam.fit()
    assert torch.equal(rec_adam.initial["fc1.weight"], source["fc1.weight"])
    with pytest.raises(ConfigError, match="model.init_from"):
        Trainer.from_config(tiny(tmp_path, f"model.init_from={tmp_path / 'missing'}", name="third"))
    with pytest.raises(ConfigError, match="do not fit"):
        Trainer.from_config(tiny(tmp_path, "model.kwargs.hidden_sizes=[16]", f"model.init_from={tmp_path / 'first'}", name="fourth"))


def test_optim_binary_none_freezes_binary_weights(tmp_path: Path) -> None:
    rec = Recorder()
    trainer = Trainer.from_config(tiny(tmp_path, "optim.binary=none", "optim.binary_kwargs={}"), [rec])
    trainer.fit()
    names = {n for n, p in trainer.model.named_parameters() if any(p is b for b in binary_parameters(trainer.model))}
    assert names
    state = {k: v for k, v in trainer.model.state_dict().items() if isinstance(v, torch.Tensor)}
    for name in names:
        assert torch.equal(state[name], rec.initial[name]), name
    real_changed = [n for n in state if n not in names and n.endswith("bias") and not torch.equal(state[n], rec.initial[n])]
    assert real_changed  # the real route still trains
    assert "flip_ratio" not in read_metrics(trainer.run_dir)[-1]


def test_latent_adam_recipe_trains(tmp_path: Path) -> None:
    trainer = Trainer.from_config(tiny(tmp_path, recipe="digits_adam"))
    last = trainer.fit()
    assert last["binary/lr"] > 0 and last["real/lr"] > 0
    assert 0.0 <= last["flip_ratio"] < 1.0  # sign changes of the latent weights
    assert last["test_acc"] > 0.3


def test_cifar_smoke_recipe_builds_and_steps_on_synthetic_images(tmp_path: Path) -> None:
    config = load_config(
        "cifar10_binarynet_smoke",
        ["data.name=synthetic", "data.options={shape: [3, 32, 32], num_train: 100, num_test: 50}",
         "train.epochs=1", "train.progress=false", "train.tensorboard=false", "train.plots=false",
         f"output.dir={tmp_path}", "output.name=smoke"],
    )
    trainer = Trainer.from_config(config)
    assert trainer.steps_per_epoch == 2
    row = trainer.fit()
    assert row["step"] == 2 and row["test_acc"] is not None


def test_progress_bar_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    Trainer.from_config(tiny(tmp_path, "train.progress=true", "train.epochs=1")).fit()
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "/8 [" in err


def test_tensorboard_events(tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="tensorboard is not installed"):
            Trainer.from_config(tiny(tmp_path, "train.tensorboard=true"))
        return
    trainer = Trainer.from_config(tiny(tmp_path, "train.tensorboard=auto", "train.epochs=1"))
    trainer.fit()
    assert list((trainer.run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_track_signs(tmp_path: Path) -> None:
    from flipnet.analysis.flips import SignTracker

    config = tiny(tmp_path, "train.track_signs=true", "train.epochs=1")
    with pytest.raises(ConfigError, match="track_signs"):  # the loop never imports analysis: say what is missing
        Trainer.from_config(config)
    trainer = Trainer.from_config(config, callbacks=[SignTracker()])
    trainer.fit()
    assert list((trainer.run_dir / "signs").glob("*.safetensors"))


def test_existing_run_folder_is_not_overwritten(tmp_path: Path) -> None:
    Trainer.from_config(tiny(tmp_path, "train.epochs=1")).fit()
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        Trainer.from_config(tiny(tmp_path, "train.epochs=1"))


def test_named_run_folder_check_is_rank_0_only(tmp_path: Path) -> None:
    # Under torchrun rank 0 writes RUN/metrics.jsonl in its __init__; another rank reaching the
    # "already holds a run" check later must join that folder, not fail.
    from flipnet.train.build import new_run_dir

    config = tiny(tmp_path, "train.epochs=1")
    run_dir = Path(config.output.dir) / config.output.name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    assert new_run_dir(config.output, config.name, is_main=False) == run_dir
    with pytest.raises(ConfigError, match="already holds a run"):
        new_run_dir(config.output, config.name, is_main=True)


def test_unnamed_runs_get_unique_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flipnet.train.build as build

    monkeypatch.setattr(build.time, "strftime", lambda fmt: "20300101-120000")  # both in "the same second"
    config = tiny(tmp_path, "output.name=null", "train.epochs=1")
    a = Trainer.from_config(config)
    a.fit()
    b = Trainer.from_config(config)
    b.fit()
    assert a.run_dir == tmp_path / "digits_bop-20300101-120000"
    assert b.run_dir == tmp_path / "digits_bop-20300101-120000-1"
    assert len(read_metrics(a.run_dir)) == len(read_metrics(b.run_dir)) == 1


@pytest.mark.parametrize(
    ("override", "piece"),
    [
        ("optim.schedules=[{key: momentum, route: binary, type: cosine}]", "optim.schedules[0]"),
        ("optim.schedules=[{key: gamma, type: wobble}]", "unknown schedule type"),
        ("model.kwargs.num_classes=3", "set by the data set"),
        ("model.kwargs.depth=3", "unknown option"),
        ("model.name=nonexistent", "unknown model"),
        ("data.name=imagenet-ish", "unknown data set"),
        ("optim.binary=bopp", "unknown binary optimizer"),
        ("train.device=cuda", "CUDA is not available"),
    ],
)
def test_bad_recipes_fail_before_training(tmp_path: Path, override: str, piece: str) -> None:
    if override == "train.device=cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match=piece.replace("[", r"\[").replace("]", r"\]")):
        Trainer.from_config(tiny(tmp_path, override))


def test_trainer_rejects_a_raw_dict(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="load_config"):
        Trainer.from_config({"name": "x"})  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_recipe_reaches_90_percent(tmp_path: Path, seed: int) -> None:
    trainer = Trainer.from_config(load_config(None, [f"seed={seed}", f"output.dir={tmp_path}", "train.progress=false"]))
    last = trainer.fit()
    assert last["test_acc"] >= 0.90
    assert json.loads((trainer.run_dir / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == trainer.config.train.epochs


@pytest.mark.slow
def test_cifar_smoke_recipe_on_real_cifar10(tmp_path: Path) -> None:
    root = Path("/work/shared/data/cifar10")
    if not root.is_dir():
        pytest.skip("no CIFAR-10 offline folder here")
    trainer = Trainer.from_config(load_config("cifar10_binarynet_smoke", [f"data.root={root}", f"output.dir={tmp_path}", "train.progress=false"]))
    last = trainer.fit()
    assert last["step"] == 180 and last["test_acc"] > 0.2  # 1,800 training images after the validation split


def test_recipe_model_is_the_trained_model_without_loading_data(tmp_path: Path) -> None:
    """`recipe_model` (for `flipnet summary RECIPE`) builds what Trainer builds, from dataset_shape."""
    from flipnet.data import dataset_shape, load_dataset
    from flipnet.train.build import recipe_model

    config = tiny(tmp_path)
    trained = Trainer.from_config(config).model
    built = recipe_model(config)
    def shapes(m: torch.nn.Module) -> dict[str, Any]:
        return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in m.state_dict().items()}

    assert shapes(built).keys() == shapes(trained).keys()
    assert all(shapes(built)[k] == v for k, v in shapes(trained).items() if isinstance(v, tuple))
    assert built.fc1.in_features == 64  # the 8x8 digits, not the model's default 28x28
    bundle = load_dataset("synthetic", shape=(3, 6, 5), num_classes=4, num_train=8, num_test=4)
    assert dataset_shape("synthetic", shape=(3, 6, 5), num_classes=4) == (bundle.input_shape, bundle.num_classes)
    assert dataset_shape("digits") == (load_dataset("digits").input_shape, 10)
    smoke = recipe_model(load_config("cifar10_binarynet_smoke"))  # CIFAR-10 is not read
    assert tuple(smoke.input_shape) == (3, 32, 32)


# --------------------------------------------------------------------------- divergence checks
def _poison(what: str, at_step: int) -> Callback:
    class Poison(Callback):
        def on_step_end(self, trainer: Trainer) -> None:
            if trainer.step != at_step:
                return
            with torch.no_grad():
                if what == "binary_weight":  # sign(NaN) = -1: the loss stays finite
                    binary_parameters(trainer.model)[0][0, 0] = float("nan")
                elif what == "bn_stat":
                    trainer.model.bn1.running_var[0] = float("inf")
                else:  # a NaN gradient leaves its trace in Bop's momentum (no flip happens, the loss stays finite)
                    hit = 0
                    for opt in [trainer.optimizer.optimizers["binary"]]:
                        for st in opt.state.values():
                            for v in st.values():
                                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 1:
                                    v.view(-1)[0] = float("nan")
                                    hit += 1
                    assert hit

    return Poison()


@pytest.mark.parametrize(("what", "piece"), [("binary_weight", "weight fc1.weight"), ("bn_stat", "BatchNorm statistic bn1.running_var"),
                                              ("gradient", "gradient statistic")])
def test_divergence_outside_the_loss_is_caught_and_never_saved(tmp_path: Path, what: str, piece: str) -> None:
    trainer = Trainer.from_config(tiny(tmp_path, "train.epochs=3", "train.nan_check_every=0"), callbacks=[_poison(what, 10)])
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    assert piece in str(info.value) and "in epoch 2" in str(info.value) and "\n" not in str(info.value)
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["epoch"] == 1
    for ckpt in (saved, load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")):
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if isinstance(v, torch.Tensor) and v.is_floating_point())


def test_ctrl_c_after_a_silent_nan_does_not_save_it(tmp_path: Path) -> None:
    class NanThenStop(Callback):
        def on_step_end(self, trainer: Trainer) -> None:
            if trainer.step == 10:
                with torch.no_grad():
                    binary_parameters(trainer.model)[0][0, 0] = float("nan")
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer.from_config(tiny(tmp_path, "train.epochs=3", "train.nan_check_every=0"), callbacks=[NanThenStop()]).fit()
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["epoch"] == 1 and saved["batch_in_epoch"] == 0


# --------------------------------------------------------------------------- validation split
def test_without_a_validation_split_best_is_the_last_epoch_never_test(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trainer = Trainer.from_config(tiny(tmp_path, "train.epochs=3", "data.val_size=0"))
    assert trainer.val_loader is None
    trainer.fit()
    rows = read_metrics(trainer.run_dir)
    assert "val_acc" not in rows[-1] and rows[-1]["best_epoch"] == 3 and rows[-1]["best_val_acc"] is None
    assert load_checkpoint(trainer.run_dir / "checkpoints" / "best.pt")["epoch"] == 3
    assert "no validation split" in capsys.readouterr().out


def test_val_split_is_held_out_of_training(tmp_path: Path) -> None:
    trainer = Trainer.from_config(tiny(tmp_path, "data.val_size=64"))
    assert len(trainer.data.split("val")[1]) == 64 and len(trainer.data.train_y) == 256 - 64
    assert trainer.steps_per_epoch == 6


# --------------------------------------------------------------------------- run folders
@pytest.mark.parametrize(("name", "piece"), [("../escaped", "leaves output.dir"), ("/tmp/abs", "absolute path"),
                                             ("x" * 300, "300 characters long")])
def test_run_names_stay_inside_out(tmp_path: Path, name: str, piece: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=piece):
        Trainer.from_config(load_config("digits_bop", [*TINY, f"output.dir={out}", f"output.name={name}"]))
    assert not (tmp_path / "escaped").exists() and not out.exists()


def test_a_folder_flipnet_did_not_create_is_never_written(tmp_path: Path) -> None:
    foreign = tmp_path / "run"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="not created by flipnet"):
        Trainer.from_config(tiny(tmp_path))
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    (tmp_path / "empty").mkdir()  # an empty folder loses nothing
    Trainer.from_config(tiny(tmp_path, "train.epochs=1", name="empty")).fit()
    assert (tmp_path / "empty" / ".flipnet-run").is_file()


def test_a_run_that_died_before_its_first_checkpoint_restarts_cleanly(tmp_path: Path) -> None:
    class DieEarly(Callback):
        def on_step_end(self, trainer: Trainer) -> None:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        Trainer.from_config(tiny(tmp_path), callbacks=[DieEarly()]).fit()
    assert not (tmp_path / "run" / "checkpoints").exists()
    Trainer.from_config(tiny(tmp_path, "train.epochs=1")).fit()  # same name: reused
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == [1]
    with pytest.raises(RuntimeError, match="power cut"):
        Trainer.from_config(tiny(tmp_path, name="again"), callbacks=[DieEarly()]).fit()
    resumed = Trainer.from_config(tiny(tmp_path, "train.epochs=1", name="again"), resume=tmp_path / "again")
    resumed.fit()  # --resume of such a folder starts from the beginning
    assert [r["epoch"] for r in read_metrics(tmp_path / "again")] == [1]


# --------------------------------------------------------------------------- threads and batches
def test_same_threads_and_seed_give_identical_weights(tmp_path: Path) -> None:
    a = Trainer.from_config(tiny(tmp_path, "train.threads=1", name="a"))
    a.fit()
    b = Trainer.from_config(tiny(tmp_path, "train.threads=1", name="b"))
    b.fit()
    assert a.threads == b.threads == 1
    for k, v in a.model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b.model.state_dict()[k]), k
    assert load_checkpoint(a.run_dir / "checkpoints" / "last.pt")["meta"]["threads"] == 1
    assert json.loads((a.run_dir / "summary.json").read_text())["threads_reason"] == "train.threads"


def test_thread_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    from flipnet.train.build import choose_threads

    small, cpu = torch.nn.Linear(4, 4), torch.device("cpu")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    monkeypatch.setattr("os.getloadavg", lambda: (4.5, 3.0, 2.0))
    assert choose_threads(None, small, cpu) == (1, "busy machine: load 4.5 on 4 cores")
    big = torch.nn.Linear(2000, 1001)
    assert choose_threads(None, big, cpu) == (1, "busy machine: load 4.5 on 4 cores")
    monkeypatch.setattr("os.getloadavg", lambda: (0.5, 0.5, 0.5))
    assert choose_threads(None, small, cpu) == (1, "small model (20 parameters)")
    assert choose_threads(None, big, cpu)[1] == "torch default"
    assert choose_threads(3, small, cpu) == (3, "train.threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads(None, small, cpu) == (2, "OMP_NUM_THREADS")  # the environment's, not what torch was last set to
    with pytest.raises(ConfigError, match="train.threads"):
        choose_threads(0, small, cpu)


def test_a_last_batch_of_one_trains(tmp_path: Path) -> None:
    """BatchNorm cannot normalise one sample; the loader must not hand the trainer such a batch."""
    trainer = Trainer.from_config(tiny(tmp_path, "data.subset=257", "data.val_size=0", "data.batch_size=4", "train.epochs=1"))
    row = trainer.fit()
    assert math.isfinite(row["train_loss"]) and row["step"] == trainer.steps_per_epoch


def test_library_form_trains_parts_built_by_hand(tmp_path: Path) -> None:
    from flipnet.train.build import build_data, build_model, build_optimizer

    config = tiny(tmp_path, "train.epochs=1")
    data = build_data(config)
    model = build_model(config, data.num_classes, data.input_shape)
    trainer = Trainer(model, build_optimizer(config, model), data, config=config,
                      loss_fn=lambda out, y: torch.nn.functional.cross_entropy(out, y, label_smoothing=0.1))
    row = trainer.fit()
    assert trainer.model is model and row["epoch"] == 1 and (trainer.run_dir / "checkpoints" / "last.pt").is_file()


# --------------------------------------------------------------------------- what is logged is what was set
def test_first_row_logs_the_set_values_under_per_step_schedules(tmp_path: Path) -> None:
    """A per-step cosine moves the lr during epoch 1; its row shows the lr its first step used
    (the recipe's), and each later row the lr at that epoch's first step."""
    config = tiny(tmp_path, "optim.real_kwargs.lr=0.05", "optim.binary_kwargs.lr=0.02",
                  "optim.schedules=[{key: lr, type: cosine, unit: step}]", recipe="digits_adam")
    trainer = Trainer.from_config(config)
    trainer.fit()
    rows = read_metrics(trainer.run_dir)
    assert (rows[0]["real/lr"], rows[0]["binary/lr"]) == (0.05, 0.02)
    half = 0.05 * 0.5 * (1 + math.cos(math.pi * 0.5))  # epoch 2 starts half way through the cosine
    assert rows[1]["real/lr"] == pytest.approx(half, rel=1e-9)


def test_resumed_run_keeps_its_thread_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default thread count depends on the machine; a resume uses the run's own, and an
    explicit other count is a trajectory change (refused without --force)."""
    from flipnet.train.build import choose_threads

    with pytest.raises(KeyboardInterrupt):
        Trainer.from_config(tiny(tmp_path, "train.threads=2"), callbacks=[_StopAfterEpoch(1)]).fit()
    run = tmp_path / "run"
    config = load_config(run / "config.yaml", ["train.threads=null"])  # back to the machine's default
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # which would now be 1
    assert choose_threads(None, torch.nn.Linear(2, 2), torch.device("cpu"))[1] == "OMP_NUM_THREADS"
    resumed = Trainer.from_config(config, resume=run)
    assert (resumed.threads, resumed._threads_reason) == (2, "the run's own, resumed")
    with pytest.raises(ConfigError, match=r"train\.threads.*--force"):
        Trainer.from_config(load_config(run / "config.yaml", ["train.threads=1"]), resume=run)


class _StopAfterEpoch(Callback):
    """Ctrl-C at the end of epoch ``n``: the trainer saves that epoch, then stops."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        if trainer.epoch == self.n:
            os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupt_while_an_epoch_closes_keeps_the_last_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A second Ctrl-C (or a callback's KeyboardInterrupt) during evaluation/logging must not save
    a checkpoint of an epoch whose row is missing: the run would be unresumable."""
    class BreakInEpoch2(Callback):
        def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
            if trainer.epoch == 2:
                raise KeyboardInterrupt

    config = tiny(tmp_path, "train.epochs=3")
    with pytest.raises(KeyboardInterrupt):
        Trainer.from_config(config, callbacks=[BreakInEpoch2()]).fit()
    run = tmp_path / "run"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert "kept the last checkpoint (epoch 1" in capsys.readouterr().out
    resumed = Trainer.from_config(load_config(run / "config.yaml"), resume=run)
    resumed.fit()
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]


def test_restart_before_the_first_checkpoint_records_the_recipe_it_runs(tmp_path: Path) -> None:
    """--resume of a run that died before its first checkpoint starts over with the given
    overrides; config.yaml must say so (it is what a later resume and flipnet eval read)."""
    class DieEarly(Callback):
        def on_step_end(self, trainer: Trainer) -> None:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        Trainer.from_config(tiny(tmp_path), callbacks=[DieEarly()]).fit()
    run = tmp_path / "run"
    Trainer.from_config(load_config(run / "config.yaml", ["train.epochs=1", "seed=7"]), resume=run).fit()
    saved = load_config(run / "config.yaml")
    assert (saved.train.epochs, saved.seed) == (1, 7)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["config"]["seed"] == 7


def test_a_run_folder_given_in_python_follows_the_folder_rules(tmp_path: Path) -> None:
    """Trainer(..., run_dir=X) and train_seeds(..., run_dir=G) never write into a folder flipnet
    did not create, nor over a run it holds."""
    from flipnet.train.build import build_data, build_model, build_optimizer
    from flipnet.train.multi import train_seeds

    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("keep me")
    config = tiny(tmp_path, "train.epochs=1")
    data = build_data(config)
    model = build_model(config, data.num_classes, data.input_shape)
    with pytest.raises(ConfigError, match="not created by flipnet"):
        Trainer(model, build_optimizer(config, model), data, config=config, run_dir=foreign)
    assert [p.name for p in foreign.iterdir()] == ["chapter1.tex"]
    with pytest.raises(ConfigError, match="not created by flipnet"):
        train_seeds(config, [0, 1], run_dir=foreign, verbose=False)
    assert [p.name for p in foreign.iterdir()] == ["chapter1.tex"]
    train_seeds(config, [0, 1], run_dir=tmp_path / "group", verbose=False)
    before = (tmp_path / "group" / "seed_0" / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        train_seeds(config, [0, 1], run_dir=tmp_path / "group", verbose=False)
    assert (tmp_path / "group" / "seed_0" / "metrics.jsonl").read_bytes() == before
