"""``flipnet hparams``: the latent-weight → flip-filter mapping, its reverse, the filter's numbers,
and the redundancy statements checked by actual training (identical binary weights step by step)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import flipnet
from flipnet.analysis.hparams import (
    LatentHparams,
    flip_filter,
    frequency_response,
    impulse_response,
    latent_from_cema,
    lr_at,
    memory,
    redundancy_notes,
    report,
    rescaled,
)
from flipnet.cli import main
from flipnet.errors import ConfigError
from flipnet.layers import BinaryLinear
from flipnet.optim import CEMA
from flipnet.quantizers import SteSign, sign

# ----------------------------------------------------------------------------- the mapping


@pytest.mark.parametrize(("lr", "mom", "wd"), [(0.1, 0.9, 1e-4), (0.01, 0.0, 5e-4), (2.0, 0.99, 1e-6)])
def test_decoupled_sgd_is_cema_and_round_trips(lr: float, mom: float, wd: float) -> None:
    f = flip_filter(LatentHparams(optimizer="sgd", lr=lr, momentum=mom, weight_decay=wd))
    assert f.kind == "cema"
    assert f.alpha == pytest.approx(lr * wd) and f.gamma == pytest.approx(1 - mom)
    back = latent_from_cema(f.alpha, f.gamma, lr=lr)
    assert back.lr == lr and back.momentum == pytest.approx(mom) and back.weight_decay == pytest.approx(wd)
    # and the other way round, for any free lr
    for free_lr in (1.0, 0.05):
        again = flip_filter(latent_from_cema(3e-5, 0.2, lr=free_lr))
        assert again.alpha == pytest.approx(3e-5) and again.gamma == pytest.approx(0.2)


def test_initial_inertia_round_trips() -> None:
    h = LatentHparams(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, init_scale=0.02)
    f = flip_filter(h)
    assert f.initial_inertia == pytest.approx(1e-3 * 0.1 * 0.02)
    back = latent_from_cema(f.alpha, f.gamma, lr=0.1, initial_inertia=f.initial_inertia)
    assert back.init_scale == pytest.approx(0.02)


def test_schedule_becomes_an_alpha_schedule() -> None:
    h = LatentHparams(optimizer="sgd", lr=0.1, weight_decay=1e-4, schedule="linear", steps=100)
    f = flip_filter(h)
    t = np.array([0, 50, 100], dtype=np.float64)
    np.testing.assert_allclose(f.alpha_of_step(t), [1e-5, 5e-6, 0.0], atol=1e-18)
    np.testing.assert_allclose(lr_at(LatentHparams(lr=1.0, schedule="step", step_every=10, steps=30), np.array([9, 10, 25])), [1, 0.1, 0.01])
    c = lr_at(LatentHparams(lr=1.0, schedule="cosine", end_lr=0.0, steps=10), np.array([0, 5, 10]))
    np.testing.assert_allclose(c, [1.0, 0.5, 0.0], atol=1e-12)


def test_coupled_sgd_poles() -> None:
    h = LatentHparams(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.02, decoupled=False)
    f = flip_filter(h)
    assert f.kind == "cema"
    # 1 - alpha and 1 - gamma are the roots of z^2 - (1 + mu - eta*lam) z + mu
    assert (1 - f.alpha) + (1 - f.gamma) == pytest.approx(1 + 0.9 - 0.1 * 0.02)
    assert (1 - f.alpha) * (1 - f.gamma) == pytest.approx(0.9)
    # past (1 - sqrt(mu))^2 the poles are complex: no CEMA equivalent
    under = flip_filter(LatentHparams(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.05, decoupled=False))
    assert under.kind == "underdamped" and under.alpha is None and "no CEMA equivalent" in under.notes[0]


def test_adam_cases() -> None:
    assert flip_filter(LatentHparams(optimizer="adam", lr=1e-3, weight_decay=1e-2)).kind == "normalised_cema"
    assert flip_filter(LatentHparams(optimizer="adam", lr=1e-3, weight_decay=1e-2, decoupled=False)).kind == "nonlinear"
    f = flip_filter(LatentHparams(optimizer="adam", lr=5e-4, weight_decay=0.0, init_scale=1e-3))
    assert f.kind == "integrator" and f.alpha == 0 and "flip threshold |w0|/lr = 2" in f.notes[1]


def test_filter_numbers_match_their_definitions() -> None:
    alpha, gamma = 0.01, 0.2
    h = impulse_response(alpha, gamma, 20000)
    # the cascade of the two EMAs, computed directly
    m = i = 0.0
    direct = []
    for k in range(50):
        m = (1 - gamma) * m + gamma * (1.0 if k == 0 else 0.0)
        i = (1 - alpha) * i + alpha * m
        direct.append(i)
    np.testing.assert_allclose(h[:50], direct, rtol=1e-12)
    assert h.sum() == pytest.approx(1.0, abs=1e-9)
    mem = memory(alpha, gamma, steps_per_epoch=10)
    k = np.arange(len(h))
    assert mem.mean_lag == pytest.approx(float((k * h).sum()), rel=1e-6)
    assert np.cumsum(h)[int(np.floor(mem.span95))] <= 0.95 + 1e-9 <= np.cumsum(h)[int(np.ceil(mem.span95)) + 1]
    assert mem.epochs(mem.tau_alpha) == pytest.approx(10.0)
    assert abs(frequency_response(alpha, gamma, np.array([0.0]))[0]) == pytest.approx(1.0)
    assert memory(0.0, gamma).mean_lag == float("inf")


def test_bad_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="momentum"):
        LatentHparams(momentum=1.0)
    with pytest.raises(ConfigError, match="optimizer"):
        LatentHparams(optimizer="rmsprop")
    with pytest.raises(ConfigError, match="alpha"):
        latent_from_cema(1.5, 0.1)
    with pytest.raises(ConfigError, match="flip the latent"):
        LatentHparams(lr=10.0, weight_decay=0.5)


def test_report_and_notes() -> None:
    h = LatentHparams(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="linear", steps=1000, steps_per_epoch=10)
    text = report(h)
    assert "CEMA alpha 1e-05  gamma 0.1" in text
    assert "schedules: [{key: alpha, route: binary, type: linear, end: 0, unit: step}]" in text
    assert "1/alpha: 100000 steps = 10000 epochs" in text
    notes = " ".join(redundancy_notes(LatentHparams(optimizer="adam", lr=1e-3)))
    assert "loss scale is irrelevant" in notes
    r = rescaled(h, 4.0)
    assert (r.lr, r.weight_decay, r.init_scale) == (0.4, 2.5e-5, 0.0)
    assert flip_filter(r).alpha == pytest.approx(flip_filter(h).alpha)


# ----------------------------------------------------------------------------- redundancy by training


def _bnn(weight_mode: str = "latent") -> nn.Sequential:
    """A small BNN in float64; the STE passes gradients unclipped (a clip would have to scale too)."""
    torch.manual_seed(0)
    return nn.Sequential(
        BinaryLinear(10, 16, weight_quantizer=SteSign(clip_value=None), weight_mode=weight_mode),
        nn.BatchNorm1d(16),
        BinaryLinear(16, 16, input_quantizer="ste_sign", weight_quantizer=SteSign(clip_value=None), weight_mode=weight_mode),
        nn.BatchNorm1d(16),
        BinaryLinear(16, 3, input_quantizer="ste_sign", weight_quantizer=SteSign(clip_value=None), weight_mode=weight_mode),
    ).double()


def _train(kind: str, lr: float, wd: float, init: float, steps: int = 25) -> list[list[torch.Tensor]]:
    """Latent-weight training; returns the binary weights after every step."""
    model = _bnn()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in flipnet.binary_parameters(model):
            p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * init)
    binary = flipnet.binary_parameters(model)
    if kind == "sgd_coupled":
        opt = torch.optim.SGD(binary, lr=lr, momentum=0.9, weight_decay=wd)
    elif kind == "sgd_decoupled":
        opt = torch.optim.SGD(binary, lr=lr, momentum=0.9)
    elif kind == "adam_coupled":
        opt = torch.optim.Adam(binary, lr=lr, weight_decay=wd)
    else:
        opt = torch.optim.AdamW(binary, lr=lr, weight_decay=wd)
    real = torch.optim.Adam(flipnet.real_parameters(model), lr=1e-2)  # the same in every run
    x_all = torch.randn(64, 10, generator=g, dtype=torch.float64)
    y_all = (x_all[:, :3].argmax(dim=1) + (x_all[:, 3] > 1).long()) % 3
    out = []
    for _ in range(steps):
        idx = torch.randint(0, 64, (16,), generator=g)
        opt.zero_grad(), real.zero_grad()
        nn.functional.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
        if kind == "sgd_decoupled":
            with torch.no_grad():
                for w in binary:
                    w.mul_(1.0 - lr * wd)
        opt.step(), real.step()
        out.append([sign(p.detach()).clone() for p in binary])
    return out


SETTINGS = [("sgd_coupled", 0.05, 0.02, 0.01), ("sgd_decoupled", 0.05, 0.5, 0.01), ("adam_coupled", 0.01, 0.1, 0.02), ("adamw", 0.01, 0.5, 0.02)]


@pytest.mark.parametrize(("kind", "lr", "wd", "init"), SETTINGS)
def test_scaling_lr_and_init_by_c_and_decay_by_1_over_c_keeps_every_binary_weight(kind: str, lr: float, wd: float, init: float) -> None:
    c = 4.0  # a power of two: the scaled runs are exact in floating point
    a = _train(kind, lr, wd, init)
    b = _train(kind, lr * c, wd / c, init * c)
    flips = 0
    for step, (wa, wb) in enumerate(zip(a, b)):
        for pa, pb in zip(wa, wb):
            assert torch.equal(pa, pb), f"{kind}: binary weights differ at step {step}"
        if step:
            flips += sum(int((p != q).sum()) for p, q in zip(wa, a[step - 1]))
    assert flips > 0, "no weight flipped: the test would prove nothing"


@pytest.mark.parametrize(("kind", "lr", "wd", "init"), SETTINGS)
def test_scaling_only_the_learning_rate_does_change_binary_weights(kind: str, lr: float, wd: float, init: float) -> None:
    a = _train(kind, lr, wd, init)
    b = _train(kind, lr * 4.0, wd, init)
    assert any(not torch.equal(pa, pb) for wa, wb in zip(a, b) for pa, pb in zip(wa, wb))


def test_coupled_sgd_equals_cema_with_the_pole_rates() -> None:
    lr, mom, wd = 0.1, 0.9, 0.02
    f = flip_filter(LatentHparams(optimizer="sgd", lr=lr, momentum=mom, weight_decay=wd, decoupled=False))
    latent, flip = _bnn("latent"), _bnn("flip")
    with torch.no_grad():
        for p in flipnet.binary_parameters(latent):
            p.zero_()
        for p in flipnet.binary_parameters(flip):
            p.fill_(1.0)
    sgd = torch.optim.SGD(flipnet.binary_parameters(latent), lr=lr, momentum=mom, weight_decay=wd)
    cema = CEMA(flipnet.binary_parameters(flip), alpha=f.alpha, gamma=f.gamma)
    g = torch.Generator().manual_seed(2)
    x_all = torch.randn(64, 10, generator=g, dtype=torch.float64)
    y_all = (x_all[:, :3].argmax(dim=1) + (x_all[:, 3] > 1).long()) % 3
    scale = f.alpha * f.gamma / lr
    flips = 0
    prev = [torch.ones_like(p) for p in flipnet.binary_parameters(flip)]
    for step in range(40):
        idx = torch.randint(0, 64, (16,), generator=g)
        for model, opt in ((latent, sgd), (flip, cema)):
            model.zero_grad()  # BatchNorm parameters stay at their (equal) initial values
            nn.functional.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
            opt.step()
        for w, b, p in zip(flipnet.binary_parameters(latent), flipnet.binary_parameters(flip), prev):
            inertia = cema.state[b]["inertia"]
            torch.testing.assert_close(inertia, -scale * w.detach(), rtol=1e-9, atol=1e-15)
            assert torch.equal(sign(w.detach()), b.detach()), f"binary weights differ at step {step}"
            flips += int((b.detach() != p).sum())
        prev = [b.detach().clone() for b in flipnet.binary_parameters(flip)]
    assert flips > 0


# ----------------------------------------------------------------------------- the command


def test_cli_forward_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "img" / "hparams_sgd"
    rc = main(["hparams", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--weight-decay", "1e-4",
               "--schedule", "linear", "--epochs", "2", "--train-size", "1000", "--batch-size", "100", "--out", str(prefix)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "CEMA alpha 1e-05  gamma 0.1" in out and "steps 20 (2 epochs of 10)" in out
    for part in ("impulse", "frequency", "memory"):
        png = Path(f"{prefix}_{part}.png")
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reverse(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hparams", "--alpha", "2e-5", "--gamma", "0.1", "--lr", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "momentum 0.9, decoupled weight decay 0.0001 at lr 0.2" in out
    assert "CEMA alpha 2e-05  gamma 0.1" in out


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hparams", "--alpha", "1e-5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "flipnet hparams: error: the reverse mapping needs both --alpha and --gamma"
    assert main(["hparams", "--epochs", "3"]) == 2
    assert "needs --steps-per-epoch" in capsys.readouterr().err
    assert main(["hparams", "--optimizer", "sgd", "--weight-decay", "0.05", "--coupled", "--out", "/tmp/never"]) == 2
    assert "no CEMA filter to plot" in capsys.readouterr().err


def test_command_module_imports_no_torch() -> None:
    code = "import sys, flipnet.cli.hparams; print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_cli_reads_a_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hparams", "--recipe", "cema_cifar10", "--train-size", "45000"]) == 0
    out = capsys.readouterr().out
    assert "CEMA alpha 5e-05  gamma 0.1" in out and "steps 450000 (500 epochs of 900)" in out
    assert main(["hparams", "--recipe", "cifar10_reactnet_cpu"]) == 0  # size from data.subset - data.val_size
    assert "(15 epochs of 141)" in capsys.readouterr().out
    assert main(["hparams", "--recipe", "two_step_latent_step2", "--train-size", "45000"]) == 0
    assert "equivalent flip filter: integrator" in capsys.readouterr().out
    assert main(["hparams", "--recipe", "bop_cifar10", "--train-size", "45000"]) == 2
    assert "binary optimizer is 'bop'" in capsys.readouterr().err
    assert main(["hparams", "--recipe", "cema_cifar10"]) == 2
    assert "--train-size" in capsys.readouterr().err


def test_recipe_mapping_of_an_sgd_recipe() -> None:
    from flipnet.analysis.hparams import hparams_from_recipe
    from flipnet.train.config import config_from_dict

    cfg = config_from_dict({
        "data": {"name": "digits", "batch_size": 100, "subset": 1000, "val_size": 0},
        "optim": {"binary": "sgd", "binary_kwargs": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
                  "schedules": [{"key": "lr", "type": "step", "factor": 0.5, "every": 2, "unit": "epoch"}]},
        "train": {"epochs": 6},
    })
    h = hparams_from_recipe(cfg)
    assert (h.optimizer, h.decoupled, h.steps_per_epoch, h.steps, h.step_every, h.step_factor) == ("sgd", False, 10, 60, 20, 0.5)
    assert flip_filter(h).kind == "cema"


def test_cli_never_overwrites_plots_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "p"
    args = ["hparams", "--weight-decay", "1e-4", "--out", str(prefix)]
    memory_png = Path(f"{prefix}_memory.png")
    memory_png.write_bytes(b"keep me")
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"flipnet hparams: error: {prefix}_memory.png already exists; pass --force to replace it, or choose another --out prefix"
    assert captured.out == ""  # refused before printing anything
    assert memory_png.read_bytes() == b"keep me" and not Path(f"{prefix}_impulse.png").exists()  # nothing written
    assert main([*args, "--force"]) == 0
    assert memory_png.read_bytes()[:4] == b"\x89PNG"
    assert main(["hparams", "--force"]) == 2
    assert "needs --out" in capsys.readouterr().err
    # a set-up without a filter is refused before the report is printed
    assert main(["hparams", "--out", str(tmp_path / "q")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "no CEMA filter to plot" in captured.err


@pytest.mark.parametrize("args, word", [
    (["--alpha", "1e-4", "--gamma", "0.1", "--weight-decay", "5e-4"], "--weight-decay"),
    (["--alpha", "1e-4", "--gamma", "0.1", "--momentum", "0.5"], "--momentum"),
    (["--alpha", "1e-4", "--gamma", "0.1", "--optimizer", "adam"], "--optimizer"),
    (["--alpha", "1e-4", "--gamma", "0.1", "--coupled"], "--coupled"),
    (["--recipe", "cema_cifar10", "--train-size", "45000", "--lr", "0.1"], "--lr"),
    (["--recipe", "cema_cifar10", "--train-size", "45000", "--optimizer", "sgd"], "--optimizer"),
    (["--recipe", "cema_cifar10", "--train-size", "45000", "--batch-size", "10"], "--batch-size"),
    (["--weight-decay", "1e-4", "--end-lr", "0.01"], "--end-lr"),
    (["--weight-decay", "1e-4", "--schedule", "linear", "--step-every", "10"], "--step-factor/--step-every"),
    (["--weight-decay", "1e-4", "--schedule", "step", "--step-every", "0"], "--step-every must be a positive"),
    (["--weight-decay", "1e-4", "--steps", "100", "--epochs", "2", "--steps-per-epoch", "10"], "not both"),
    (["--weight-decay", "1e-4", "--title", "x"], "--title names the plots; it needs --out"),
])
def test_cli_refuses_options_it_would_ignore(args: list[str], word: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hparams", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and word in lines[0]


def _recipe(schedules: list[dict], binary: str = "sgd", kwargs: dict | None = None):
    from flipnet.train.config import config_from_dict

    return config_from_dict({
        "data": {"name": "digits", "batch_size": 100, "subset": 1000, "val_size": 0},
        "optim": {"binary": binary, "binary_kwargs": kwargs or {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
                  "schedules": schedules},
        "train": {"epochs": 6},
    })


def test_recipe_mapping_reads_the_schedule_start_and_refuses_what_it_cannot_map() -> None:
    from flipnet.analysis.hparams import hparams_from_recipe

    # a linear schedule's own start is the lr that runs at step 0 (not binary_kwargs.lr)
    h = hparams_from_recipe(_recipe([{"key": "lr", "route": "binary", "type": "linear", "start": 0.05, "end": 0.0, "unit": "epoch"}]))
    assert h.lr == 0.05 and h.schedule == "linear"
    h = hparams_from_recipe(_recipe([{"key": "alpha", "type": "linear", "start": 2e-4, "end": 1e-4}], "cema",
                                     {"alpha": 1e-3, "gamma": 0.1}))
    f = flip_filter(h)
    assert f.alpha == pytest.approx(2e-4) and float(f.alpha_of_step(np.array([60.0]))[0]) == pytest.approx(1e-4)
    refused = [
        ([{"key": "gamma", "route": "binary", "type": "linear", "end": 0.01}], "cema", {"alpha": 1e-3, "gamma": 0.1}, "'gamma'"),
        ([{"key": "weight_decay", "type": "step", "factor": 0.1, "every": 2}], "sgd", None, "'weight_decay'"),
        ([{"key": "lr", "route": "binary", "type": "linear", "end": 0.0, "duration": 3, "unit": "epoch"}], "sgd", None, "lasts 3 epochs"),
        ([{"key": "lr", "route": "binary", "type": "linear", "end": 0.0},
          {"key": "lr", "route": "binary", "type": "step", "factor": 0.5, "every": 5}], "sgd", None, "2 lr schedules"),
        ([], "sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}, "dampening=0.5"),
        ([], "sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True}, "nesterov=True"),
        ([], "adam", {"lr": 1e-3, "amsgrad": True}, "amsgrad=True"),
    ]
    for scheds, binary, kwargs, match in refused:
        with pytest.raises(ConfigError, match=match):
            hparams_from_recipe(_recipe(scheds, binary, kwargs))
    # a schedule of the real route only is not the binary route's
    h = hparams_from_recipe(_recipe([{"key": "weight_decay", "route": "real", "type": "linear", "end": 0.0}]))
    assert h.schedule == "constant" and h.weight_decay == 1e-3


def test_coupled_sgd_with_a_negative_real_pole_is_not_called_complex() -> None:
    # lr*wd = 5 > (1 + sqrt(0.9))^2: the discriminant is positive, a pole is real and negative
    f = flip_filter(LatentHparams(optimizer="sgd", lr=1.0, momentum=0.9, weight_decay=5.0, decoupled=False))
    assert f.kind == "underdamped" and f.alpha is None
    assert all(abs(p.imag) < 1e-12 for p in f.poles) and min(p.real for p in f.poles) < 0
    assert "complex" not in f.notes[0] and "outside (0, 1)" in f.notes[0]
    g = flip_filter(LatentHparams(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.05, decoupled=False))
    assert "complex poles" in g.notes[0]


def test_cli_recipe_with_a_latent_clip_says_the_filter_is_approximate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hparams", "--recipe", "adam_cifar10", "--train-size", "45000"]) == 0
    out = capsys.readouterr().out
    assert "optim.weight_clip=1" in out and "only while the latent weights stay inside the clip" in out
    assert main(["hparams", "--recipe", "cema_cifar10", "--train-size", "45000"]) == 0
    assert "weight_clip=" not in capsys.readouterr().out


def test_cli_recipe_with_a_per_epoch_schedule_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hparams", "--recipe", "imagenet_reactnet_cema", "--train-size", "1271167"]) == 0
    assert "updates alpha once per epoch" in capsys.readouterr().out
    assert main(["hparams", "--recipe", "cifar10_reactnet_cpu"]) == 0  # unit: step
    assert "once per epoch" not in capsys.readouterr().out
