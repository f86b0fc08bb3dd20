"""Tests of flipnet.train.multi: several runs trained as one wide network."""

from __future__ import annotations

import copy
import csv
import json
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

from flipnet.errors import ConfigError
from flipnet.models import create_model
from flipnet.optim import create_optimizer, prepare_model_for
from flipnet.train.checkpoint import load_checkpoint
from flipnet.train.config import load_config
from flipnet.train.multi import (
    NotVectorizable,
    SeedEnsemble,
    SeedOptimizer,
    summarize,
    sweep_configs,
    train_seeds,
    train_sweep,
)
from flipnet.train.plots import read_metrics

torch.set_num_threads(1)


def _tiny_config(tmp_path: Path, *extra: str):
    return load_config(
        "digits_bop",
        [
            "data.name=synthetic",
            "data.options={num_train: 192, num_test: 64, shape: [1, 8, 8], num_classes: 4}",
            "data.batch_size=32",
            "model.name=binary_mlp",
            "model.kwargs={hidden_sizes: [24, 24]}",
            "train.epochs=2",
            "train.device=cpu",
            "train.progress=false",
            "train.plots=false",
            "train.tensorboard=false",
            f"output.dir={tmp_path}",
            *extra,
        ],
    )


def _binarynets(n: int, **kw) -> list[nn.Module]:
    out = []
    for s in range(n):
        torch.manual_seed(s)
        out.append(create_model("binarynet", num_classes=10, in_channels=3, filters=4, dense_units=16, input_size=16, **kw))
    return out


@pytest.mark.parametrize("mode", ["bnn", "float"])
def test_ensemble_forward_equals_each_member(mode):
    models = _binarynets(3, mode=mode)
    refs = [copy.deepcopy(m) for m in models]
    ens = SeedEnsemble(models)
    x = torch.randn(3, 5, 3, 16, 16)
    out = ens(x)
    assert out.shape == (3, 5, 10)
    for i, ref in enumerate(refs):
        torch.testing.assert_close(out[i], ref(x[i]), rtol=1e-5, atol=1e-5)
    # shared input and eval mode (running statistics) too
    ens.eval()
    xs = torch.randn(4, 3, 16, 16)
    shared = ens(xs, shared=True)
    for i, ref in enumerate(refs):
        ref.eval()
        torch.testing.assert_close(shared[i], ref(xs), rtol=1e-5, atol=1e-5)


def test_members_are_views_of_the_wide_tensors():
    models = _binarynets(2)
    ens = SeedEnsemble(models)
    ens.check_links()
    conv = ens.layers[0]
    with torch.no_grad():
        conv.weight[conv.weight.shape[0] // 2:].fill_(0.25)  # the second member's rows
    assert bool((models[1].conv1.weight == 0.25).all())
    assert not bool((models[0].conv1.weight == 0.25).all())
    # BatchNorm running statistics are shared too
    ens(torch.randn(2, 8, 3, 16, 16))
    assert float(models[0].bn1.running_mean.abs().sum()) > 0
    assert models[0].bn1.num_batches_tracked is models[1].bn1.num_batches_tracked
    # cutting a link is detected
    models[0].conv1.weight.data = models[0].conv1.weight.data.clone()
    with pytest.raises(RuntimeError, match="replaced"):
        ens.check_links()


def test_seed_optimizer_steps_like_separate_optimizers():
    models = _binarynets(2)
    refs = [copy.deepcopy(m) for m in models]
    ens = SeedEnsemble(models)
    opts = [create_optimizer(prepare_model_for(m, "bop"), "bop", {"gamma": 1e-2, "threshold": 1e-5}, "adam", {"lr": 1e-2}) for m in models]
    ref_opts = [create_optimizer(prepare_model_for(m, "bop"), "bop", {"gamma": 1e-2, "threshold": 1e-5}, "adam", {"lr": 1e-2}) for m in refs]
    ens.sync_modes()
    sopt = SeedOptimizer(ens, opts)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(2, 6, 3, 16, 16, generator=g)
        y = torch.randint(0, 10, (2, 6), generator=g)
        out = ens(x)
        loss = sum(nn.functional.cross_entropy(out[i], y[i]) for i in range(2))
        loss.backward()
        sopt.step()
        sopt.zero_grad()
        for i, (ref, ro) in enumerate(zip(refs, ref_opts)):
            nn.functional.cross_entropy(ref(x[i]), y[i]).backward()
            ro.step()
            ro.zero_grad()
    for m, ref in zip(models, refs):
        for (name, p), q in zip(m.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        assert int((m.conv2.weight.abs() != 1).sum()) == 0  # still binary


@pytest.mark.parametrize("binary", ["bop", "adam"])
def test_vectorised_seeds_equal_separate_runs(tmp_path, binary):
    extra = [] if binary == "bop" else ["optim.binary=adam", "optim.binary_kwargs={lr: 0.01}", "optim.weight_clip=1.0"]
    cfg = _tiny_config(tmp_path, *extra)
    vec = train_seeds(cfg, [0, 1, 2], vectorize=True, verbose=False)
    seq = train_seeds(cfg, [0, 1, 2], vectorize=False, verbose=False)
    for a, b in zip(vec, seq):
        assert a["seed"] == b["seed"]
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1e-12)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["flip_ratio"] == pytest.approx(b["flip_ratio"], rel=1e-6)
        # the same hyper-parameter columns as a single run (no router lr placeholder on flip routes)
        rows_a, rows_b = read_metrics(Path(a["run_dir"])), read_metrics(Path(b["run_dir"]))
        hp_a = {k: v for k, v in rows_a[-1].items() if "/" in k and not k.startswith("flip_ratio/")}
        hp_b = {k: v for k, v in rows_b[-1].items() if "/" in k and not k.startswith("flip_ratio/")}
        assert hp_a and hp_a == pytest.approx(hp_b)
        wa = load_checkpoint(Path(a["run_dir"]) / "checkpoints" / "last.pt")["model"]
        wb = load_checkpoint(Path(b["run_dir"]) / "checkpoints" / "last.pt")["model"]
        for k, v in wa.items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(v, wb[k], rtol=1e-4, atol=1e-5, msg=k)
    # different seeds really are different runs
    assert len({r["train_loss"] for r in vec}) == 3


def test_group_folder_files_and_summary(tmp_path):
    cfg = _tiny_config(tmp_path, "output.name=three_seeds", "train.epochs=1")
    rows = train_seeds(cfg, [3, 4], vectorize=True, verbose=False)
    group = tmp_path / "three_seeds"
    summary = json.loads((group / "summary.json").read_text())
    accs = [r["test_acc"] for r in rows]
    assert summary["mode"] == "vectorized" and summary["seeds"] == [3, 4]
    assert summary["test_acc"]["mean"] == pytest.approx(statistics.fmean(accs))
    assert summary["test_acc"]["std"] == pytest.approx(statistics.stdev(accs))
    with open(group / "seeds.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["seed"]) for r in table] == [3, 4]
    for label in ("seed_3", "seed_4"):
        assert (group / label / "config.yaml").is_file()
        assert (group / label / "checkpoints" / "last.pt").is_file()
        assert (group / label / "metrics.csv").is_file()
    # a member folder is a normal run folder
    from flipnet.train.build import load_run

    config, model = load_run(group / "seed_4", "last")
    assert config.seed == 4 and config.seeds is None
    with pytest.raises(ConfigError, match="already holds"):
        train_seeds(cfg, [3, 4], verbose=False)


def test_sweep_members_use_their_own_hyperparameters(tmp_path):
    cfg = _tiny_config(tmp_path, "train.epochs=1")
    vec = train_sweep(cfg, "optim.binary_kwargs.gamma", [1e-4, 1e-2], seeds=[0], vectorize=True, verbose=False)
    seq = train_sweep(cfg, "optim.binary_kwargs.gamma", [1e-4, 1e-2], seeds=[0], vectorize=False, verbose=False)
    assert [r["label"] for r in vec] == ["gamma=0.0001-seed_0", "gamma=0.01-seed_0"]
    assert [r["value"] for r in vec] == [1e-4, 1e-2]
    for a, b in zip(vec, seq):
        assert a["flip_ratio"] == pytest.approx(b["flip_ratio"], rel=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert vec[0]["flip_ratio"] != vec[1]["flip_ratio"]
    configs = sweep_configs(cfg, "optim.binary_kwargs.gamma", [1e-4, 1e-3])
    assert [c.optim.binary_kwargs["gamma"] for c in configs] == [1e-4, 1e-3]


def test_unsupported_models_and_bad_input():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.fc(x)

    with pytest.raises(NotVectorizable, match="sequential"):
        SeedEnsemble([Residual(), Residual()])
    with pytest.raises(NotVectorizable, match="Residual"):
        SeedEnsemble([nn.Sequential(Residual()), nn.Sequential(Residual())])
    with pytest.raises(NotVectorizable, match="magnitude_aware_sign"):
        from flipnet.layers import BinaryLinear

        SeedEnsemble([nn.Sequential(BinaryLinear(4, 2, input_quantizer="magnitude_aware_sign")) for _ in range(2)])
    with pytest.raises(ValueError, match="differ"):
        SeedEnsemble([nn.Sequential(nn.Linear(4, 2)), nn.Sequential(nn.Linear(4, 3))])
    ens = SeedEnsemble([nn.Sequential(nn.Linear(4, 2)) for _ in range(2)])
    with pytest.raises(ValueError, match="expects input"):
        ens(torch.randn(3, 1, 4))


def test_seed_list_validation(tmp_path):
    cfg = _tiny_config(tmp_path)
    with pytest.raises(ConfigError, match="distinct"):
        train_seeds(cfg, [1, 1], verbose=False)
    with pytest.raises(ConfigError, match="integers"):
        train_seeds(cfg, [0.5], verbose=False)  # type: ignore[list-item]
    other = _tiny_config(tmp_path, "data.batch_size=16")
    from flipnet.train.multi import train_group

    with pytest.raises(ConfigError, match="differs"):
        train_group([cfg, other], verbose=False)


def test_summarize():
    s = summarize([{"test_acc": 0.5}, {"test_acc": 0.7}, {"test_acc": None}])
    assert s["n"] == 3
    assert s["test_acc"]["mean"] == pytest.approx(0.6)
    assert s["test_acc"]["std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert summarize([{"test_acc": 0.5}])["test_acc"]["std"] == 0.0


def test_channels_last_ensemble_and_no_moving():
    models = _binarynets(2)
    refs = [copy.deepcopy(m) for m in models]
    ens = SeedEnsemble(models, channels_last=True)
    assert ens.layers[0].weight.is_contiguous(memory_format=torch.channels_last)
    ens.check_links()
    x = torch.randn(2, 3, 3, 16, 16)
    out = ens(x)
    for i, ref in enumerate(refs):
        torch.testing.assert_close(out[i], ref(x[i]), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ens.scatter_grads()
    assert models[1].conv2.weight.grad is not None
    assert models[1].conv2.weight.grad.data_ptr() != models[0].conv2.weight.grad.data_ptr()
    with pytest.raises(RuntimeError, match="cannot be moved"):
        ens.to(torch.float64)


@pytest.mark.slow
def test_vectorised_compile_matches_eager(tmp_path):
    cfg = _tiny_config(tmp_path, "train.epochs=1")
    eager = train_seeds(cfg, [0, 1], vectorize=True, verbose=False)
    compiled = train_seeds(_tiny_config(tmp_path, "train.epochs=1", "train.compile=true"), [0, 1], vectorize=True, verbose=False)
    for a, b in zip(eager, compiled):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1 / 64 + 1e-9)  # at most one test image differs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("binary", ["bop", "adam"])
def test_vectorised_cuda_graphs_match_eager_on_gpu(tmp_path, binary):
    extra = [] if binary == "bop" else ["optim.binary=adam", "optim.binary_kwargs={lr: 0.01}", "optim.weight_clip=1.0"]
    base = ["train.device=cuda", "train.amp=false", "train.compile=false", "train.channels_last=false", *extra]
    eager = train_seeds(_tiny_config(tmp_path, *base), [0, 1, 2], vectorize=True, verbose=False)
    graphs = train_seeds(_tiny_config(tmp_path, *base, "train.cuda_graphs=true"), [0, 1, 2], vectorize=True, verbose=False)
    for a, b in zip(eager, graphs):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["flip_ratio"] == pytest.approx(b["flip_ratio"], rel=1e-6)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1e-12)


def test_multi_seed_run_resumes_stops_on_nan_and_plots(tmp_path):
    """The group is one trainer: Ctrl-C saves every member, --resume ends where an uninterrupted
    group ends, plots are drawn, and a NaN in one member stops all with its name."""
    import os
    import signal

    from flipnet.train.callbacks import Callback
    from flipnet.train.loop import Trainer

    class SigintAfterEpoch1(Callback):
        def on_epoch_end(self, trainer, metrics):
            if trainer.epoch == 1 and trainer.member is trainer.members[-1]:
                os.kill(os.getpid(), signal.SIGINT)

    base = ["train.epochs=3", "train.plots=true", "seeds=[0,1]"]
    straight = Trainer.from_config(_tiny_config(tmp_path, *base, "output.name=straight"))
    straight.fit()
    group = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        Trainer.from_config(_tiny_config(tmp_path, *base, "output.name=cut"), callbacks=[SigintAfterEpoch1()]).fit()
    assert all(load_checkpoint(group / f"seed_{s}" / "checkpoints" / "last.pt")["epoch"] == 1 for s in (0, 1))
    resumed = Trainer.from_config(load_config(group / "config.yaml"), resume=group)
    assert resumed.epoch == 1 and len(resumed.members) == 2
    resumed.fit()
    for a, b in zip(straight.members, resumed.members):
        for k, v in a.model.state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b.model.state_dict()[k]), k
        assert [r["test_acc"] for r in read_metrics(a.run_dir)] == [r["test_acc"] for r in read_metrics(b.run_dir)]
    assert (group / "plots" / "accuracy.png").is_file() and (group / "seed_1" / "plots" / "loss.png").is_file()
    summary = json.loads((group / "summary.json").read_text())
    assert summary["n"] == 2 and "test_acc_at_best" in summary and summary["members"] == ["seed_0", "seed_1"]

    class PoisonSecond(Callback):
        def on_step_end(self, trainer):
            if trainer.step == 3:
                with torch.no_grad():
                    trainer.members[1].model.fc1.weight[0, 0] = float("nan")  # sign(NaN) = -1: loss stays finite

    from flipnet.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"run seed_1: weight fc1.weight became NaN/inf in epoch 1"):
        Trainer.from_config(_tiny_config(tmp_path, *base, "output.name=nan"), callbacks=[PoisonSecond()]).fit()


def test_sign_tracking_of_several_seeds_is_refused_clearly(tmp_path):
    cfg = _tiny_config(tmp_path, "train.track_signs=true")
    with pytest.raises(ConfigError, match="track_signs records the signs of one run"):
        train_seeds(cfg, [0, 1], verbose=False)
    assert not any(tmp_path.iterdir())


def test_multi_seed_mid_epoch_resume_logs_the_rows_of_an_uninterrupted_group(tmp_path):
    """Interrupted inside epoch 2 and resumed: every member's rows equal the uninterrupted ones,
    the epoch cut in two included (its flip ratio, and the lr of its first step under a per-step
    schedule), and the first row shows the recipe's lr."""
    from flipnet.train.callbacks import Callback
    from flipnet.train.loop import Trainer

    class InterruptAtStep(Callback):
        def on_step_end(self, trainer):
            if trainer.step == 8:  # 6 steps per epoch: epoch 2, batch 2
                raise KeyboardInterrupt

    base = ["train.epochs=3", "seeds=[0,1]", "optim.real_kwargs.lr=0.02",
            "optim.schedules=[{key: lr, route: real, type: cosine, unit: step}]"]
    straight = Trainer.from_config(_tiny_config(tmp_path, *base, "output.name=straight"))
    straight.fit()
    group = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        Trainer.from_config(_tiny_config(tmp_path, *base, "output.name=cut"), callbacks=[InterruptAtStep()]).fit()
    assert load_checkpoint(group / "seed_1" / "checkpoints" / "last.pt")["batch_in_epoch"] == 2
    Trainer.from_config(load_config(group / "config.yaml"), resume=group).fit()
    for seed in (0, 1):
        want = [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(tmp_path / "straight" / f"seed_{seed}")]
        got = [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(group / f"seed_{seed}")]
        assert got == want
        assert want[0]["real/lr"] == 0.02 and "flip_ratio" in want[1]


def test_group_members_at_different_points_are_not_resumed_together(tmp_path):
    from flipnet.errors import CheckpointError
    from flipnet.train import save_checkpoint
    from flipnet.train.loop import Trainer

    Trainer.from_config(_tiny_config(tmp_path, "train.epochs=1", "seeds=[0,1]", "output.name=g")).fit()
    last = tmp_path / "g" / "seed_1" / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    ckpt["epoch"], ckpt["step"] = 0, 3  # as if its save had been cut off a step earlier
    save_checkpoint(last, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    with pytest.raises(CheckpointError, match="different points.*seed_1 at epoch 0 step 3"):
        Trainer.from_config(load_config(tmp_path / "g" / "config.yaml", ["train.epochs=2"]), resume=tmp_path / "g", force=True)
