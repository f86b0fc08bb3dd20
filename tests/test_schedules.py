"""Tests of flipnet.optim.schedules: schedule values, HyperparamScheduler, recipe parsing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flipnet.errors import ConfigError
from flipnet.layers import BinaryLinear
from flipnet.optim import CEMA, Bop, create_optimizer, prepare_model_for
from flipnet.optim.schedules import (
    Constant,
    Cosine,
    Exponential,
    HyperparamScheduler,
    Lambda,
    Linear,
    StepDecay,
    schedule_from_dict,
    scheduler_from_dict,
)

positive = st.floats(1e-9, 10.0)


@settings(max_examples=50, deadline=None)
@given(start=positive, end=st.floats(0.0, 10.0), duration=st.integers(1, 1000), t=st.integers(0, 2000))
def test_linear_and_cosine_hit_their_ends_and_stay_between(start, end, duration, t):
    for sched in (Linear(start, end, duration), Cosine(start, end, duration)):
        assert sched(0) == pytest.approx(start)
        assert sched(duration) == end and sched(duration + 7) == end
        lo, hi = min(start, end), max(start, end)
        assert lo - 1e-12 <= sched(t) <= hi + 1e-12
    assert Linear(start, end, duration)(duration // 2) == pytest.approx(start + (end - start) * (duration // 2) / duration)
    if duration % 2 == 0:
        assert Cosine(start, end, duration)(duration // 2) == pytest.approx((start + end) / 2)


@settings(max_examples=50, deadline=None)
@given(initial=positive, factor=st.floats(0.01, 2.0), every=st.integers(1, 50), k=st.integers(0, 5), r=st.integers(0, 49))
def test_step_decay_and_exponential(initial, factor, every, k, r):
    r = r % every
    assert StepDecay(initial, factor, every)(k * every + r) == pytest.approx(initial * factor**k)
    assert Exponential(initial, factor, every)(k * every) == pytest.approx(initial * factor**k)
    if r:
        between = Exponential(initial, factor, every)(k * every + r)
        assert min(initial * factor**k, initial * factor ** (k + 1)) <= between * (1 + 1e-12)


def test_constant_and_lambda():
    assert Constant(0.3)(0) == Constant(0.3)(10**6) == 0.3
    assert Lambda(lambda t: 1.0 / (t + 1))(3) == 0.25
    with pytest.raises(TypeError, match="callable"):
        Lambda(3.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: StepDecay(1.0, 0.0, 10), "factor must be > 0"),
        (lambda: StepDecay(1.0, 0.1, 0), "every must be a positive integer"),
        (lambda: Linear(1.0, 0.0, 2.5), "duration must be a positive integer"),
        (lambda: Cosine(float("nan")), "start must be finite"),
        (lambda: Exponential(1.0, -0.5), "factor must be > 0"),
        (lambda: Constant("a"), "value must be a number"),
    ],
)
def test_bad_schedule_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def routed():
    torch.manual_seed(0)
    model = nn.Sequential(BinaryLinear(4, 8), nn.BatchNorm1d(8), BinaryLinear(8, 2))
    return model, create_optimizer(prepare_model_for(model, "bop"), "bop", {"gamma": 1e-3, "threshold": 1e-6}, "adam", {"lr": 1e-2})


def test_scheduler_writes_values_per_route_and_key():
    _, opt = routed()
    gamma = HyperparamScheduler(opt, "gamma", StepDecay(1e-3, 0.1, 2), route="binary")
    lr = HyperparamScheduler(opt, "lr", Linear(1e-2, 0.0, 4), route="real")
    seen = []
    for _ in range(5):
        seen.append((opt.param_groups[0]["gamma"], opt.param_groups[1]["lr"]))
        gamma.step()
        lr.step()
    assert [g for g, _ in seen] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5])
    assert [v for _, v in seen] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3, 0.0])
    assert opt.param_groups[0]["lr"] == 0.0  # the binary route's placeholder lr is untouched


def test_scheduler_without_route_targets_groups_that_have_the_key():
    _, opt = routed()
    HyperparamScheduler(opt, "threshold", Constant(0.5))
    assert opt.param_groups[0]["threshold"] == 0.5 and "threshold" not in opt.param_groups[1]


def test_lr_schedule_without_route_skips_the_flip_routes_placeholder_lr():
    # the binary (Bop) route comes first and holds the router's placeholder lr = 0.0: the
    # schedule must start from Adam's lr, not from 0.0 (which set the real lr to 0 for good)
    _, opt = routed()
    sched = scheduler_from_dict(opt, {"key": "lr", "type": "cosine"}, epochs=1, steps_per_epoch=4)
    assert sched.schedule(0) == pytest.approx(1e-2)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-2)
    sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert opt.param_groups[0]["lr"] == 0.0


def test_tensor_values_are_updated_in_place():
    w = nn.Parameter(torch.ones(3))
    gamma = torch.tensor(0.5)
    opt = Bop([w], gamma=gamma)
    sched = HyperparamScheduler(opt, "gamma", Exponential(0.5, 0.5))
    sched.step()
    assert opt.param_groups[0]["gamma"] is gamma
    assert float(gamma) == 0.25


def test_scheduler_errors_name_what_exists():
    _, opt = routed()
    with pytest.raises(ValueError, match=r"no parameter group on route 'latent'; routes present: \['binary', 'real'\]"):
        HyperparamScheduler(opt, "gamma", Constant(1.0), route="latent")
    with pytest.raises(ValueError, match=r"groups of route 'real' have no key 'gamma'; their keys: .*lr"):
        HyperparamScheduler(opt, "gamma", Constant(1.0), route="real")
    with pytest.raises(ValueError, match=r"no parameter group has key 'alpha'; keys present: .*gamma"):
        HyperparamScheduler(opt, "alpha", Constant(1.0))
    with pytest.raises(ValueError, match="unit must be one of"):
        HyperparamScheduler(opt, "gamma", Constant(1.0), unit="batch")


def test_scheduler_state_dict_resumes():
    _, opt = routed()
    a = HyperparamScheduler(opt, "gamma", StepDecay(1e-3, 0.5, 1), unit="epoch", route="binary")
    for _ in range(3):
        a.step()
    state = a.state_dict()
    assert state == {"key": "gamma", "route": "binary", "unit": "epoch", "t": 3}
    _, opt2 = routed()
    b = HyperparamScheduler(opt2, "gamma", StepDecay(1e-3, 0.5, 1), unit="epoch", route="binary")
    b.load_state_dict(state)
    assert opt2.param_groups[0]["gamma"] == pytest.approx(1.25e-4)
    b.step()
    a.step()
    assert opt2.param_groups[0]["gamma"] == opt.param_groups[0]["gamma"]
    with pytest.raises(ValueError, match="scheduler state is for key='gamma'"):
        HyperparamScheduler(opt2, "lr", Constant(1.0), unit="epoch", route="real").load_state_dict(state)


def test_scheduler_survives_optimizer_load_state_dict():
    _, opt = routed()
    sched = HyperparamScheduler(opt, "gamma", Linear(1e-3, 0.0, 10), route="binary")
    opt.load_state_dict(opt.state_dict())  # replaces the group dicts
    sched.step()
    assert opt.param_groups[0]["gamma"] == pytest.approx(9e-4)


# ------------------------------------------------------------------ recipes
def test_schedule_from_dict_examples():
    step = schedule_from_dict({"type": "step", "factor": 0.1, "every": 100}, initial=1e-3, duration=500)
    assert step(99) == pytest.approx(1e-3) and step(100) == pytest.approx(1e-4)
    lin = schedule_from_dict({"type": "linear", "start": 1e-5, "end": 1e-8}, initial=1.0, duration=10)
    assert lin(0) == 1e-5 and lin(10) == 1e-8
    to_zero = schedule_from_dict({"type": "linear", "end": 0.0}, initial=0.2, duration=4)
    assert [to_zero(t) for t in range(5)] == pytest.approx([0.2, 0.15, 0.1, 0.05, 0.0])
    cos = schedule_from_dict({"type": "cosine"}, initial=2.0, duration=2)
    assert [cos(t) for t in range(3)] == pytest.approx([2.0, 1.0, 0.0])
    assert schedule_from_dict({"type": "constant"}, initial=0.7, duration=3)(2) == 0.7
    exp = schedule_from_dict({"type": "exponential", "factor": 0.5, "every": 2}, initial=1.0, duration=3)
    assert exp(2) == 0.5 and math.isclose(exp(1), 0.5**0.5)


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"factor": 0.1}, r"unknown schedule type None; valid types: constant, step, linear, cosine, exponential"),
        ({"type": "poly"}, "unknown schedule type 'poly'"),
        ({"type": "step", "factor": 0.1, "every": 10, "evry": 3}, r"unknown key\(s\) 'evry' for schedule type 'step'; did you mean 'every'\? valid keys: factor, every"),
        ({"type": "step", "factor": 0.1}, r"schedule type 'step' needs key\(s\) 'every'"),
        ({"type": "linear", "end": "zero"}, "end must be a number"),
        ("linear", "must be a mapping"),
    ],
)
def test_schedule_from_dict_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        schedule_from_dict(spec, initial=1.0, duration=10)


def test_scheduler_from_recipe_entry():
    _, opt = routed()
    entry = {"key": "gamma", "route": "binary", "type": "step", "factor": 0.1, "every": 2, "unit": "epoch"}
    sched = scheduler_from_dict(opt, entry, epochs=10, steps_per_epoch=100)
    assert sched.unit == "epoch" and sched.route == "binary"
    for _ in range(2):
        sched.step()
    assert opt.param_groups[0]["gamma"] == pytest.approx(1e-4)
    # a linear decay to 0 over the whole run, in steps (CEMA's α in the paper)
    w = nn.Parameter(torch.ones(3))
    cema = CEMA([w], alpha=1e-3, gamma=0.1)
    sched = scheduler_from_dict(cema, {"key": "alpha", "type": "linear", "end": 0.0}, epochs=2, steps_per_epoch=5)
    assert sched.schedule(0) == 1e-3 and sched.schedule(10) == 0.0 and sched.schedule(5) == pytest.approx(5e-4)
    with pytest.raises(ConfigError, match="needs a 'key'"):
        scheduler_from_dict(opt, {"type": "constant"}, epochs=1, steps_per_epoch=1)
    with pytest.raises(ConfigError, match="no parameter group has key 'sigma'"):
        scheduler_from_dict(opt, {"key": "sigma", "type": "constant"}, epochs=1, steps_per_epoch=1)
    with pytest.raises(ConfigError, match="unit must be one of"):
        scheduler_from_dict(opt, {"key": "gamma", "type": "constant", "unit": "batch"}, epochs=1, steps_per_epoch=1)


def test_misspelt_schedule_names_get_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown schedule type 'cosin'; did you mean 'cosine'\? valid types"):
        schedule_from_dict({"type": "cosin"}, 1.0, 10)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'factr' for schedule type 'step'; did you mean 'factor'\?"):
        schedule_from_dict({"type": "step", "factr": 0.1, "every": 2}, 1.0, 10)


def test_a_misspelt_group_key_gets_a_suggestion_but_a_foreign_one_does_not():
    model = nn.Sequential(BinaryLinear(4, 3), nn.BatchNorm1d(3))
    opt = create_optimizer(prepare_model_for(model, "bop"), "bop", {"gamma": 1e-3}, "adam", {"lr": 1e-2})
    with pytest.raises(ValueError, match=r"no parameter group has key 'gama'; did you mean 'gamma'\? keys present"):
        HyperparamScheduler(opt, "gama", Constant(1.0))
    with pytest.raises(ValueError, match=r"groups of route 'real' have no key 'gamma'; their keys"):
        HyperparamScheduler(opt, "gamma", Constant(1.0), route="real")


def test_per_group_schedules_start_from_each_groups_own_value():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}])
    sched = HyperparamScheduler.per_group(opt, "lr", lambda v: StepDecay(v, 0.5, 1))
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.005])
    assert sched.values == pytest.approx([0.05, 0.005]) and sched.value == pytest.approx(0.05)
    # a recipe entry without a route means the same
    opt2 = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}])
    scheduler_from_dict(opt2, {"key": "lr", "type": "cosine"}, epochs=2, steps_per_epoch=1)
    assert [g["lr"] for g in opt2.param_groups] == [0.1, 0.01]


def test_suggestions_list_only_keys_the_route_reads():
    _, opt = routed()
    with pytest.raises(ValueError, match=r"groups of route 'binary' have no key 'gama'; did you mean 'gamma'\? their keys: gamma, threshold$"):
        HyperparamScheduler(opt, "gama", Constant(1.0), route="binary")


def test_the_trainer_uses_epoch_e_value_in_epoch_e_and_resume_keeps_the_horizon(tmp_path) -> None:
    """Epoch e (0-based) trains with schedule(e) for ``unit: epoch`` (CEMA's alpha0 * (1 - e/E), as the
    reference's LambdaLR stepped after each epoch) and each row logs the value its first step used
    (``unit: step``: schedule(e * S)); a forced extension of train.epochs continues at the end values."""
    import json

    from flipnet.cli import main

    common = ["data.subset=300", "data.val_size=30", "model.kwargs.hidden_sizes=[16]", "optim.binary=cema",
              "optim.binary_kwargs={alpha: 1.0e-3, gamma: 0.1}", "optim.real_kwargs.lr=0.01",
              "optim.schedules=[{key: alpha, route: binary, type: linear, end: 0.0, unit: epoch}, "
              "{key: lr, route: real, type: cosine, unit: step}]",
              "train.device=cpu", "train.progress=false", "train.plots=false", "train.tensorboard=false"]
    assert main(["train", "digits_bop", "train.epochs=4", "output.name=r", *common, "--out", str(tmp_path)]) == 0
    run = tmp_path / "r"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = rows[0]["step"]
    assert [r["binary/alpha"] for r in rows] == pytest.approx([1e-3 * (1 - e / 4) for e in range(4)])
    assert [r["real/lr"] for r in rows] == pytest.approx([Cosine(0.01, 0.0, 4 * steps)(e * steps) for e in range(4)])
    assert main(["train", "--resume", str(run), "train.epochs=6", "--force"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["binary/alpha"] for r in rows[4:]] == [0.0, 0.0] and [r["real/lr"] for r in rows[4:]] == [0.0, 0.0]
