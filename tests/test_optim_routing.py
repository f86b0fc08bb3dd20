"""Tests of flipnet.optim.RoutedOptimizer and create_optimizer."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import flipnet
from flipnet.layers import BinaryLinear
from flipnet.optim import CEMA, Bop, Bop2ndOrder, RoutedOptimizer, create_optimizer, prepare_model_for

from _optim_helpers import no_host_sync

torch.set_num_threads(1)


def mlp(weight_mode: str = "latent", weight_clip: float | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        BinaryLinear(6, 12, weight_mode=weight_mode, weight_clip=weight_clip),
        nn.BatchNorm1d(12),
        BinaryLinear(12, 3, input_quantizer="ste_sign", weight_mode=weight_mode, weight_clip=weight_clip, bias=True),
    )


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0, scheduler=None) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


# ------------------------------------------------------------------ RoutedOptimizer
def test_parameter_claimed_by_two_routes_is_named():
    model = mlp()
    shared = model[0].weight
    a = torch.optim.SGD([shared], lr=0.1)
    b = torch.optim.Adam([shared, model[1].weight], lr=0.1)
    with pytest.raises(ValueError, match=r"parameter '0.weight' is claimed by route 'a' and route 'b'"):
        RoutedOptimizer({"a": a, "b": b}, model)
    with pytest.raises(ValueError, match=r"claimed by route 'a' and route 'b'"):
        RoutedOptimizer({"a": a, "b": b})  # without a model: the shape is given instead


def test_unclaimed_trainable_parameters_warn():
    model = mlp()
    opt = torch.optim.SGD(flipnet.binary_parameters(model), lr=0.1)
    with pytest.warns(UserWarning, match=r"3 trainable parameter\(s\).*1.weight, 1.bias, 2.bias"):
        RoutedOptimizer({"binary": opt}, model)
    model[1].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RoutedOptimizer({"binary": torch.optim.SGD(flipnet.binary_parameters(model), lr=0.1)}, model)


def test_bad_routes():
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="non-empty dict"):
        RoutedOptimizer({})
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        RoutedOptimizer({"a": object()})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="unknown route 'b'"):
        RoutedOptimizer({"a": torch.optim.SGD([p], lr=0.1)}, constraints={"b": lambda: None})


def test_param_groups_are_shared_and_tagged_with_routes():
    model = prepare_model_for(mlp(), "bop")
    opt = create_optimizer(model, "bop", {"gamma": 1e-2}, "adam", {"lr": 1e-2})
    assert isinstance(opt, torch.optim.Optimizer)
    assert [g["route"] for g in opt.param_groups] == ["binary", "real"]
    opt.param_groups[0]["gamma"] = 0.5
    assert opt.optimizers["binary"].param_groups[0]["gamma"] == 0.5
    assert opt.state is not None and len(opt.state) == 0
    train(model, opt, 1)
    assert "m" in opt.state[model[0].weight]


def test_torch_lr_scheduler_runs_over_the_router():
    model = prepare_model_for(mlp(), "bop")
    opt = create_optimizer(model, "bop", {"gamma": 1e-2}, "adam", {"lr": 1e-2})
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    train(model, opt, 4, scheduler=sched)
    real = opt.optimizers["real"].param_groups[0]
    assert real["lr"] == pytest.approx(1e-4)
    assert opt.optimizers["binary"].param_groups[0]["gamma"] == 1e-2  # untouched


def test_state_dict_round_trips_across_fresh_instances():
    ref = mlp("flip")
    opt_ref = create_optimizer(ref, "bop2", {"gamma": 1e-2, "sigma": 1e-2, "threshold": 1e-3}, "adam", {"lr": 1e-2})
    train(ref, opt_ref, 6)

    model = mlp("flip")
    opt = create_optimizer(model, "bop2", {"gamma": 1e-2, "sigma": 1e-2, "threshold": 1e-3}, "adam", {"lr": 1e-2})
    train(model, opt, 6)  # same trajectory as ref so far (same seed)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    fresh = mlp("flip")
    fresh.load_state_dict(saved["model"])
    opt_fresh = create_optimizer(fresh, "bop2", {"gamma": 0.9, "sigma": 0.9, "threshold": 0.5}, "adam", {"lr": 0.5})
    opt_fresh.load_state_dict(copy.deepcopy(saved["opt"]))
    assert opt_fresh.param_groups[0]["gamma"] == 1e-2 and opt_fresh.param_groups[1]["lr"] == 1e-2
    assert [g["route"] for g in opt_fresh.param_groups] == ["binary", "real"]
    train(ref, opt_ref, 5, seed=1)
    train(fresh, opt_fresh, 5, seed=1)
    for a, b in zip(ref.state_dict().values(), fresh.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


def test_load_state_dict_with_other_routes_is_an_error():
    model = mlp("flip")
    opt = create_optimizer(model, "bop", None, "adam", None)
    other = create_optimizer(prepare_model_for(mlp("flip"), "bop", "none"), "bop", None, "none", None)
    with pytest.raises(ValueError, match=r"routes \['binary'\] but this optimizer has \['binary', 'real'\]"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="not a RoutedOptimizer state dict"):
        opt.load_state_dict(torch.optim.Adam([nn.Parameter(torch.ones(1))]).state_dict())


def test_add_param_group_goes_to_its_route():
    model = mlp("flip")
    opt = create_optimizer(model, "bop", None, "adam", None)
    extra = nn.Parameter(torch.tensor([0.3, -0.1]))
    opt.add_param_group({"params": [extra], "route": "binary", "gamma": 0.5})
    assert opt.param_groups[-1]["route"] == "binary"
    assert opt.optimizers["binary"].param_groups[-1]["params"] == [extra]
    assert extra.detach().tolist() == [1.0, -1.0]
    with pytest.raises(ValueError, match="needs a 'route' key"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))]})
    with pytest.raises(ValueError, match="claimed by route 'real' and route 'binary'"):
        opt.add_param_group({"params": [model[1].weight], "route": "binary"})


def test_add_param_group_accepts_a_generator():
    # the duplicate check must not use up a generator before the route's optimizer sees it
    model = mlp("flip")
    opt = create_optimizer(model, "bop", None, "adam", None)
    extra = [nn.Parameter(torch.tensor([0.3, -0.1])), nn.Parameter(torch.tensor([-2.0]))]
    opt.add_param_group({"params": (p for p in extra), "route": "real"})
    assert opt.param_groups[-1]["params"] == extra
    assert opt.optimizers["real"].param_groups[-1]["params"] == extra


def test_closure_is_evaluated_once():
    model = mlp("flip")
    opt = create_optimizer(model, "bop", None, "adam", None)
    calls = []
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert opt.step(closure) is not None
    assert len(calls) == 1


# ------------------------------------------------------------------ create_optimizer
@pytest.mark.parametrize(
    "binary, cls, kwargs",
    [("bop", Bop, None), ("Bop2ndOrder", Bop2ndOrder, None), ("bop2", Bop2ndOrder, None),
     ("cema", CEMA, {"alpha": 1e-3, "gamma": 0.1})],
)
def test_prepare_model_for_puts_layers_in_flip_mode(binary, cls, kwargs):
    model = mlp("latent")
    with pytest.raises(ValueError, match=r"layer\(s\) 0, 2 are in latent mode; call flipnet.optim.prepare_model_for"):
        create_optimizer(model, binary, kwargs)
    assert all(m.weight_mode == "latent" for _, m in flipnet.binary_modules(model))  # untouched
    assert prepare_model_for(model, binary) is model
    opt = create_optimizer(model, binary, kwargs)
    assert isinstance(opt.optimizers["binary"], cls)
    assert isinstance(opt.optimizers["real"], torch.optim.Adam)
    assert all(m.weight_mode == "flip" for _, m in flipnet.binary_modules(model))
    train(model, opt, 3)
    for p in flipnet.binary_parameters(model):
        assert set(p.detach().unique().tolist()) <= {-1.0, 1.0}
    real_ids = {id(p) for p in opt.optimizers["real"].param_groups[0]["params"]}
    assert real_ids == {id(p) for p in flipnet.real_parameters(model)}


def test_latent_baseline_needs_latent_layers():
    with pytest.raises(ValueError, match=r"trains latent weights, but layer\(s\) 0, 2 are in flip mode"):
        create_optimizer(mlp("flip"), "adam", {"lr": 1e-2})


def test_latent_baseline_clips_with_argument_or_layer_setting():
    model = mlp("latent", weight_clip=0.05)
    opt = create_optimizer(model, "sgd", {"lr": 1.0}, "adam", {"lr": 1e-2})
    train(model, opt, 3)
    assert max(float(p.detach().abs().max()) for p in flipnet.binary_parameters(model)) == pytest.approx(0.05)
    model = mlp("latent", weight_clip=0.05)
    opt = create_optimizer(model, "adamw", {"lr": 1.0}, "adam", {"lr": 1e-2}, weight_clip=0.02)
    train(model, opt, 3)
    assert max(float(p.detach().abs().max()) for p in flipnet.binary_parameters(model)) == pytest.approx(0.02)


def test_latent_baseline_counts_sign_changes():
    model = mlp("latent")
    opt = create_optimizer(model, "sgd", {"lr": 0.5}, "adam", {"lr": 1e-2})
    total = 0
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        before = [flipnet.quantizers.sign(p.detach()) for p in flipnet.binary_parameters(model)]
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        after = [flipnet.quantizers.sign(p.detach()) for p in flipnet.binary_parameters(model)]
        total += sum(int((a != b).sum()) for a, b in zip(before, after))
    counts = opt.flip_counts()
    assert total > 0
    assert sum(int(counts[p]) for p in flipnet.binary_parameters(model)) == total
    assert opt.num_steps == 4
    opt.reset_flip_counts()
    assert opt.num_steps == 0 and all(int(c) == 0 for c in opt.flip_counts().values())
    no_count = create_optimizer(mlp("latent"), "sgd", {"lr": 0.5}, count_flips=False)
    assert no_count.flip_counts() == {}


def test_none_freezes_the_route():
    model = mlp("flip")
    with pytest.raises(ValueError, match=r"binary='none' leaves the binary parameters untrained, but 2 of them"):
        create_optimizer(model, "none", None, "sgd", {"lr": 0.1})
    assert all(p.requires_grad for p in flipnet.binary_parameters(model))
    opt = create_optimizer(prepare_model_for(model, "none", "sgd"), "none", None, "sgd", {"lr": 0.1})
    assert list(opt.optimizers) == ["real"]
    assert not any(p.requires_grad for p in flipnet.binary_parameters(model))
    before = [p.detach().clone() for p in flipnet.binary_parameters(model)]
    train(model, opt, 2)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, flipnet.binary_parameters(model)))
    model = prepare_model_for(mlp("flip"), "bop", "none")
    opt = create_optimizer(model, "bop", None, "none")
    assert list(opt.optimizers) == ["binary"]
    assert not any(p.requires_grad for p in flipnet.real_parameters(model))
    with pytest.raises(ValueError, match="nothing to train"):
        create_optimizer(prepare_model_for(mlp("flip"), "none", "none"), "none", None, "none")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"binary": "lion"}, r"unknown binary optimizer 'lion'; valid names: bop, bop2ndorder, bop2, cema, adam, adamw, sgd, none"),
        ({"binary": "bopp"}, r"unknown binary optimizer 'bopp'; did you mean 'bop'\? valid names: bop, "),
        ({"real": "bop"}, r"'bop' is a flip optimizer, which the real route does not take; valid names: adam, adamw, sgd, none"),
        ({"binary": "bop", "weight_clip": 1.0}, "weight_clip clamps latent weights"),
        ({"binary": "sgd", "binary_kwargs": {"lr": 0.1}, "weight_clip": -1.0}, "weight_clip must be a positive number"),
        ({"binary": "cema"}, r"'cema' \(CEMA \(Quist et al. 2023\).*\) has no default for alpha, gamma: pass binary_kwargs="),
        ({"binary": "cema", "binary_kwargs": {"gamma": 0.1}}, r"has no default for alpha: pass binary_kwargs=\{'alpha': ..., 'gamma': ...\}"),
        ({"binary": "bop", "binary_kwargs": {"lr": 0.1}}, r"binary_kwargs \{'lr': 0.1.*do not fit optimizer 'bop'"),
        ({"binary": "bop", "binary_kwargs": {"gamma": 2.0}}, r"gamma must be in \(0, 1\]"),
    ],
)
def test_create_optimizer_errors(kwargs, match):
    model = mlp("latent")
    if kwargs.get("binary") in ("bop", "cema"):
        prepare_model_for(model, kwargs["binary"])
    with pytest.raises(ValueError, match=match):
        create_optimizer(model, **kwargs)


def test_model_without_binary_layers_gets_only_a_real_route():
    model = nn.Sequential(nn.Linear(4, 2))
    opt = create_optimizer(model, "bop")
    assert list(opt.optimizers) == ["real"]


@pytest.mark.parametrize("binary, kwargs", [("bop", {"gamma": 0.5}), ("sgd", {"lr": 0.5})])
def test_routed_step_with_counting_and_clipping_does_not_sync(binary, kwargs):
    model = prepare_model_for(mlp("latent"), binary, "sgd")
    opt = create_optimizer(model, binary, kwargs, "sgd", {"lr": 0.1}, weight_clip=0.5 if binary == "sgd" else None)
    train(model, opt, 1)  # creates state and counters
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with no_host_sync():
        opt.step()
        opt.flip_counts()
    assert opt.num_steps == 2


def test_misspelt_optimizer_option_names_the_closest_valid_one():
    with pytest.raises(ValueError, match=r"it has no option 'gama'; did you mean 'gamma'\? its options are: gamma, threshold$"):
        create_optimizer(mlp("flip"), "bop", {"gamma": 1e-3, "gama": 1})
    with pytest.raises(ValueError, match=r"real_kwargs \{'lrr': 1\} do not fit optimizer 'adam': .*did you mean 'lr'\?"):
        create_optimizer(mlp("flip"), "bop", None, "adam", {"lrr": 1})
    # count_flips is create_optimizer's own argument, so it is neither listed nor echoed
    with pytest.raises(ValueError) as info:
        create_optimizer(mlp("flip"), "cema", {"alpha": 1e-3, "gamma": 0.1, "threshold": 1e-6})
    assert "no option 'threshold'" in str(info.value) and "count_flips" not in str(info.value)


def test_kwargs_of_another_optimizer_get_no_far_fetched_suggestion():
    with pytest.raises(ValueError, match=r"it has no option 'gamma'; its options are: lr, "):
        create_optimizer(mlp("latent"), "adam", {"gamma": 1e-3})
