"""The optimizer registry (OptimInfo), prepare_model_for, and every registered optimizer end to end."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import flipnet
from flipnet.layers import BinaryLinear
from flipnet.optim import (
    FlipOptimizer,
    OptimInfo,
    create_optimizer,
    get_optimizer_info,
    list_optimizers,
    prepare_model_for,
    register_optimizer,
)
from flipnet.optim import factory

torch.set_num_threads(1)

ALL = list_optimizers()
FLIP = list_optimizers("flip")


def mlp(weight_mode: str = "latent") -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        BinaryLinear(6, 12, weight_mode=weight_mode),
        nn.BatchNorm1d(12),
        BinaryLinear(12, 3, input_quantizer="ste_sign", weight_mode=weight_mode, bias=True),
    )


def kwargs_for(name: str) -> dict:
    """Values for the required hyperparameters (the defaults cover the rest); large rates, so weights flip."""
    info = get_optimizer_info(name)
    big = {"gamma": 0.5, "alpha": 0.5, "threshold": 1e-4, "lr": 0.1}
    kw = {k: big.get(k, 0.1) for k in info.required}
    kw.setdefault("gamma" if info.kind == "flip" else "lr", 0.5)
    return kw


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def build(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = prepare_model_for(mlp(), name, "adam")
    return model, create_optimizer(model, name, kwargs_for(name), "adam", {"lr": 1e-2})


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test disappear after it."""
    monkeypatch.setattr(factory, "_REGISTRY", dict(factory._REGISTRY))


# ------------------------------------------------------------------ the registry
def test_builtin_registrations():
    assert FLIP == ["bop", "bop2ndorder", "cema"]
    assert list_optimizers("real") == ["adam", "adamw", "sgd"]
    assert list_optimizers("latent") == []
    assert ALL == FLIP + ["adam", "adamw", "sgd"]
    assert get_optimizer_info("Bop2").name == "bop2ndorder"
    assert get_optimizer_info("BOP_2nd-Order").name == "bop2ndorder"
    assert get_optimizer_info("cema").required == ("alpha", "gamma")
    assert get_optimizer_info("adam").cls is torch.optim.Adam
    for name in FLIP:
        assert issubclass(get_optimizer_info(name).cls, FlipOptimizer)


def test_lookup_errors_name_the_closest_and_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown optimizer 'cemma'; did you mean 'cema'\? valid names: bop, bop2ndorder"):
        get_optimizer_info("cemma")
    with pytest.raises(ValueError, match="route must be 'binary', 'real' or None"):
        get_optimizer_info("sgd", route="nowhere")
    with pytest.raises(ValueError, match="kind must be one of flip, latent, real"):
        list_optimizers("binary")


def test_info_is_frozen_and_validated():
    info = get_optimizer_info("bop")
    with pytest.raises(AttributeError):
        info.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        get_optimizer_info("adam").defaults["eps"] = 1.0  # type: ignore[index]
    with pytest.raises(ValueError, match="kind must be one of flip, latent, real"):
        OptimInfo("x", torch.optim.SGD, "binary")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must subclass flipnet.optim.FlipOptimizer"):
        OptimInfo("x", torch.optim.SGD, "flip")
    with pytest.raises(ValueError, match="other than 'none'"):
        OptimInfo("None", torch.optim.SGD, "real")


def test_registering_twice_is_an_error(scratch_registry):
    with pytest.raises(ValueError, match=r"optimizer name 'BOP' is already registered \(by 'bop'\)"):
        register_optimizer(OptimInfo("BOP", torch.optim.SGD, "real"))
    with pytest.raises(ValueError, match=r"'bop2' is already registered \(by 'bop2ndorder'\)"):
        register_optimizer(OptimInfo("mine", torch.optim.SGD, "real", aliases=("bop2",)))


def test_one_registration_adds_an_optimizer_to_both_routes(scratch_registry):
    info = register_optimizer(OptimInfo("rms", torch.optim.RMSprop, "real", aliases=("rmsprop",),
                                        defaults={"alpha": 0.9}, description="RMSprop"))
    assert get_optimizer_info("RMSProp") is info and "rms" in list_optimizers("real")
    model = mlp()
    opt = create_optimizer(model, "rmsprop", {"lr": 0.01}, "rms", {"lr": 0.02, "alpha": 0.5})
    binary, real = opt.optimizers["binary"], opt.optimizers["real"]
    assert isinstance(binary, torch.optim.RMSprop) and isinstance(real, torch.optim.RMSprop)
    assert binary.defaults["alpha"] == 0.9 and real.defaults["alpha"] == 0.5  # the user's value wins
    assert opt.count_flips_routes == ("binary",)  # a latent baseline: its sign changes are counted
    train(model, opt, 2)


def test_latent_kind_goes_to_the_binary_route_only(scratch_registry):
    register_optimizer(OptimInfo("latent_sgd", torch.optim.SGD, "latent"))
    assert list_optimizers("latent") == ["latent_sgd"]
    opt = create_optimizer(mlp(), "latent_sgd", {"lr": 0.1}, "sgd", {"lr": 0.1}, weight_clip=1.0)
    assert set(opt.optimizers) == {"binary", "real"} and "binary" in opt.constraints
    with pytest.raises(ValueError, match="'latent_sgd' is a latent optimizer, which the real route does not take"):
        create_optimizer(mlp(), "latent_sgd", {"lr": 0.1}, "latent_sgd")
    with pytest.raises(ValueError, match=r"trains latent weights, but layer\(s\) 0, 2 are in flip mode"):
        create_optimizer(mlp("flip"), "latentsgd", {"lr": 0.1})


def test_keras_convention_options_pass_through_and_are_checked():
    model = prepare_model_for(mlp(), "bop")
    opt = create_optimizer(model, "bop", None, "adam", {"lr": 1e-3, "eps": 1e-7})  # larq / Keras Adam
    assert opt.optimizers["real"].defaults["eps"] == 1e-7
    with pytest.raises(ValueError, match=r"real_kwargs \{'eps': '1e-7'\} do not fit optimizer 'adam': eps must be a number"):
        create_optimizer(model, "bop", None, "adam", {"eps": "1e-7"})
    with pytest.raises(ValueError, match=r"real_kwargs \{'eps': -1.0\} do not fit optimizer 'adam': Invalid epsilon"):
        create_optimizer(model, "bop", None, "adam", {"eps": -1.0})
    with pytest.raises(ValueError, match=r"it has no option 'epsilon'; did you mean 'eps' \(Keras calls it 'epsilon'\)\?"):
        create_optimizer(model, "bop", None, "adam", {"epsilon": 1e-7})
    with pytest.raises(ValueError, match=r"no option 'learning_rate'; did you mean 'lr' \(Keras"):
        create_optimizer(model, "bop", None, "sgd", {"learning_rate": 0.1})


# ------------------------------------------------------------------ prepare_model_for
def test_create_optimizer_does_not_change_the_model():
    for binary, real in [("bop", "adam"), ("none", "sgd"), ("cema", "none"), ("sgd", "adam")]:
        model = mlp()
        before = copy.deepcopy(model.state_dict())
        grads = [p.requires_grad for p in model.parameters()]
        try:
            create_optimizer(model, binary, kwargs_for(binary) if binary != "none" else None, real)
        except ValueError:
            pass  # the flip and "none" cases ask for prepare_model_for first
        assert all(m.weight_mode == "latent" for _, m in flipnet.binary_modules(model))
        assert [p.requires_grad for p in model.parameters()] == grads
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]) if isinstance(v, torch.Tensor) else v == before[k]


def test_prepare_model_for_is_idempotent_and_checks_before_changing():
    model = mlp()
    prepare_model_for(model, "bop", "none")
    state = copy.deepcopy(model.state_dict())
    prepare_model_for(model, "bop", "none")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))
    assert all(m.weight_mode == "flip" for _, m in flipnet.binary_modules(model))
    assert not any(p.requires_grad for p in flipnet.real_parameters(model))
    assert all(p.requires_grad for p in flipnet.binary_parameters(model))
    fresh = mlp()
    with pytest.raises(ValueError, match="unknown real optimizer 'adamm'"):
        prepare_model_for(fresh, "bop", "adamm")
    assert all(m.weight_mode == "latent" for _, m in flipnet.binary_modules(fresh))
    xnor = nn.Sequential(BinaryLinear(4, 4, scale="xnor"))
    with pytest.raises(ValueError, match="scale='xnor'"):
        prepare_model_for(xnor, "bop")
    prepare_model_for(xnor, "adam")  # a latent baseline needs nothing


# ------------------------------------------------------------------ every registered optimizer
@pytest.mark.parametrize("name", ALL)
def test_every_optimizer_builds_steps_and_routes_everything(name):
    model, opt = build(name)
    info = get_optimizer_info(name)
    assert isinstance(opt.optimizers["binary"], info.cls)
    routed = {id(p) for g in opt.param_groups for p in g["params"]}
    assert routed == {id(p) for p in model.parameters()}
    before = [p.detach().clone() for p in flipnet.binary_parameters(model)]
    train(model, opt, 4)
    after = flipnet.binary_parameters(model)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, after))
    flips = opt.flip_counts()
    assert sum(int(flips[p]) for p in after) > 0 and opt.num_steps == 4


@pytest.mark.parametrize("name", FLIP)
def test_every_flip_optimizer_keeps_weights_exactly_pm1(name):
    model, opt = build(name)
    for seed in range(3):
        train(model, opt, 2, seed=seed)
        for p in flipnet.binary_parameters(model):
            assert set(p.detach().unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("name", ALL)
def test_every_optimizer_resumes_identically_from_its_state_dict(name):
    model, opt = build(name)
    train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh_model, fresh_opt = build(name)
    fresh_model.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(copy.deepcopy(saved["opt"]))
    train(fresh_model, fresh_opt, 3, seed=0)  # the same batches the reference saw in steps 1-3
    train(model, opt, 3, seed=0)
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", FLIP)
def test_large_cpu_tensors_stepped_in_slices_give_the_same_numbers(name, monkeypatch):
    from flipnet.optim import base

    def run(slice_size: int):
        monkeypatch.setattr(base, "_CPU_SLICE", slice_size)
        gen = torch.Generator().manual_seed(0)
        shapes = [(base._CPU_SLICE_DEFAULT + 77,), (64, 64, 9, 9), (33, 5)]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        params[1] = torch.nn.Parameter(params[1].detach().contiguous(memory_format=torch.channels_last))
        info = get_optimizer_info(name)
        opt = info.cls(params, **{**kwargs_for(name), "gamma": 0.3})
        for _ in range(4):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * 4).round().div(4).contiguous(
                    memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format)
            opt.step()
        return params, opt

    sliced, opt_s = run(base._CPU_SLICE_DEFAULT)
    whole, opt_w = run(2**40)
    for a, b in zip(sliced, whole):
        assert torch.equal(a, b)
        assert all(torch.equal(opt_s.state[a][k], opt_w.state[b][k]) for k in opt_s.state[a])
        assert int(opt_s.flip_counts()[a]) == int(opt_w.flip_counts()[b]) > 0


@pytest.mark.parametrize("name", FLIP)
def test_sliced_cpu_step_does_not_sync(name):
    from _optim_helpers import no_host_sync

    from flipnet.optim import base

    w = torch.nn.Parameter(torch.randn(base._CPU_SLICE_DEFAULT * 2 + 5))
    opt = get_optimizer_info(name).cls([w], **{**kwargs_for(name), "gamma": torch.tensor(0.5)})
    w.grad = torch.randn(w.shape)
    opt.step()
    w.grad = torch.randn(w.shape)
    with no_host_sync():
        opt.step()
        opt.flip_counts()
