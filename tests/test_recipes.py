"""Every shipped recipe: the hyper-parameters it (or the command line) sets are the ones used.

For each recipe the optimizer and its schedules are built exactly as the trainer builds them
(no data, no training step), then the value of every optimizer keyword in the recipe is read
back from the parameter groups and from the logged hyper-parameter columns at t = 0.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from flipnet.train.config import Config, list_recipes, load_config

torch.set_num_threads(1)

RECIPES = sorted(list_recipes())


def _model(config: Config) -> torch.nn.Module:
    from flipnet.train import loop

    build = getattr(loop, "recipe_model", None)
    if build is None:  # moved to the builder module
        from flipnet.train.build import recipe_model as build  # type: ignore[no-redef]
    return build(config)


def _optimizer_and_schedulers(config: Config, model: torch.nn.Module) -> tuple[Any, list[Any]]:
    import flipnet.optim as optim
    from flipnet.optim.schedules import scheduler_from_dict

    o = config.optim
    prepare = getattr(optim, "prepare_model_for", None)
    if prepare is not None:
        model = prepare(model, binary=o.binary, real=o.real)
    opt = optim.create_optimizer(
        model, binary=o.binary, binary_kwargs=dict(o.binary_kwargs), real=o.real,
        real_kwargs=dict(o.real_kwargs), weight_clip=o.weight_clip,
    )
    schedulers = [
        scheduler_from_dict(opt, {"key": s.key, "type": s.type, "route": s.route, "unit": s.unit, **s.params},
                            epochs=config.train.epochs, steps_per_epoch=7)
        for s in o.schedules
    ]
    return opt, schedulers


def _logged(config: Config, opt: Any) -> dict[str, float]:
    from flipnet.train.loop import hyperparameter_values

    return hyperparameter_values(opt, ((s.route, s.key) for s in config.optim.schedules))


def _route_values(opt: Any, route: str, key: str) -> list[float]:
    out = []
    for g in opt.param_groups:
        if g.get("route") == route and key in g:
            v = g[key]
            out.append(float(v.item()) if isinstance(v, torch.Tensor) else float(v))
    return out


def _scalar_kwargs(kwargs: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in kwargs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _check(config: Config) -> None:
    model = _model(config)
    opt, _ = _optimizer_and_schedulers(config, model)
    logged = _logged(config, opt)
    routes = {g.get("route") for g in opt.param_groups}
    checked = 0
    for route, kwargs in (("binary", config.optim.binary_kwargs), ("real", config.optim.real_kwargs)):
        if route not in routes:
            continue
        for key, want in _scalar_kwargs(kwargs).items():
            # A schedule with an explicit start/value deliberately starts elsewhere.
            explicit = [s for s in config.optim.schedules if s.key == key and s.route in (None, route)
                        and ("start" in s.params or "value" in s.params)]
            if explicit:
                continue
            got = _route_values(opt, route, key)
            assert got, f"route {route!r} has no group key {key!r}"
            assert all(math.isclose(v, want, rel_tol=1e-6) for v in got), (config.name, route, key, got, want)
            name = f"{route}/{key}"
            if name in logged:
                assert math.isclose(logged[name], want, rel_tol=1e-6), (config.name, name, logged[name], want)
            checked += 1
    assert checked, f"{config.name}: no hyper-parameter was checked"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_hyperparameters_are_the_ones_used(name: str) -> None:
    _check(load_config(name))


@pytest.mark.parametrize("name", RECIPES)
def test_command_line_learning_rates_are_the_ones_used(name: str) -> None:
    """The silent bug of issue #10: ``optim.real_kwargs.lr=0.1`` used to start at the binary lr."""
    base = load_config(name)
    overrides = []
    if base.optim.real not in ("none",):
        overrides.append("optim.real_kwargs.lr=0.1234")
    if "lr" in base.optim.binary_kwargs:
        overrides.append("optim.binary_kwargs.lr=0.00321")
    if not overrides:
        pytest.skip("no learning rate to override")
    config = load_config(name, overrides)
    _check(config)
    opt, _ = _optimizer_and_schedulers(config, _model(config))
    logged = _logged(config, opt)
    if "real" in {g.get("route") for g in opt.param_groups}:
        assert logged["real/lr"] == pytest.approx(0.1234)


def test_route_less_schedule_keeps_each_routes_own_lr_over_training() -> None:
    """digits_adam has ``{key: lr, type: cosine}`` without a route; both routes decay from their own lr."""
    config = load_config("digits_adam", ["optim.real_kwargs.lr=0.1", "optim.binary_kwargs.lr=0.01", "train.epochs=4"])
    opt, (sched,) = _optimizer_and_schedulers(config, _model(config))
    assert _route_values(opt, "real", "lr") == [pytest.approx(0.1)]
    assert _route_values(opt, "binary", "lr") == [pytest.approx(0.01)]
    sched.step()
    sched.step()  # half-way through a 4-epoch cosine: each at half its start
    assert _route_values(opt, "real", "lr") == [pytest.approx(0.05)]
    assert _route_values(opt, "binary", "lr") == [pytest.approx(0.005)]
    state = sched.state_dict()
    opt2, (sched2,) = _optimizer_and_schedulers(config, _model(config))
    sched2.load_state_dict(state)
    assert _route_values(opt2, "real", "lr") == [pytest.approx(0.05)]
    assert _route_values(opt2, "binary", "lr") == [pytest.approx(0.005)]


def test_the_issue_command_logs_and_uses_the_real_lr(tmp_path, monkeypatch) -> None:
    """``flipnet train digits_adam optim.real_kwargs.lr=0.1 train.epochs=2``: the first row says 0.1."""
    import json

    import yaml

    from flipnet.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["train", "digits_adam", "optim.real_kwargs.lr=0.1", "train.epochs=2", "data.subset=120",
               "train.device=cpu", "train.progress=false", "train.plots=false", "train.tensorboard=false",
               "output.name=r", "--out", str(tmp_path)])
    assert rc == 0
    run = tmp_path / "r"
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["real/lr"] == pytest.approx(0.1) and first["binary/lr"] == pytest.approx(0.01)
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["real_kwargs"]["lr"] == pytest.approx(0.1)
