"""Recipes: validation, closest-name suggestions, overrides, round trips, shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flipnet.errors import ConfigError
from flipnet.train.config import (
    DEFAULT_RECIPE,
    Config,
    ScheduleConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    list_recipes,
    load_config,
    recipe_path,
)

SHIPPED = ("digits_bop", "digits_adam", "cifar10_binarynet_smoke")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_validate_and_describe_themselves(name: str) -> None:
    config = load_config(name)
    assert config.name == name
    assert config.description and "\n" not in config.description
    assert list_recipes()[name] == config.description


def test_default_recipe_is_digits_bop() -> None:
    assert DEFAULT_RECIPE == "digits_bop"
    config = load_config(None)
    assert config.name == "digits_bop"
    assert config.data.name == "digits"
    assert config.optim.binary == "bop"


def test_defaults_fill_every_key() -> None:
    config = config_from_dict({})
    assert config == Config()
    assert config.train.amp == "auto" and config.train.channels_last == "auto"
    assert config.output.dir == "runs" and config.output.name is None


@pytest.mark.parametrize(
    ("raw", "pieces"),
    [
        ({"optim": {"binray": "bop"}}, ["optim.binray", "did you mean 'optim.binary'", "binary_kwargs"]),
        ({"trian": {}}, ["'trian'", "did you mean 'train'", "valid keys: name"]),
        ({"train": {"epoch": 3}}, ["train.epoch", "did you mean 'train.epochs'"]),
        ({"data": {"zzzzzz": 1}}, ["data.zzzzzz", "valid keys in data: name, root, batch_size"]),
    ],
)
def test_unknown_key_names_closest_and_valid_keys(raw: dict, pieces: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    message = str(info.value)
    for piece in pieces:
        assert piece in message
    if "zzzzzz" in message:
        assert "did you mean" not in message


@pytest.mark.parametrize(
    ("raw", "pieces"),
    [
        ({"train": {"epochs": "ten"}}, ["train.epochs", "an integer", "'ten'"]),
        ({"train": {"epochs": 2.5}}, ["train.epochs", "an integer"]),
        ({"train": {"epochs": True}}, ["train.epochs", "an integer"]),
        ({"train": {"amp": "maybe"}}, ["train.amp", "true/false or auto"]),
        ({"data": {"augment": "yes please"}}, ["data.augment", "true/false"]),
        ({"optim": {"binary_kwargs": [1, 2]}}, ["optim.binary_kwargs", "a mapping"]),
        ({"seeds": [0, "one"]}, ["seeds[1]", "an integer"]),
        ({"data": 3}, ["data must be a mapping"]),
        ({"optim": {"schedules": [{"key": "lr", "unit": "hour", "type": "cosine"}]}}, ["optim.schedules[0].unit", "step or epoch"]),
    ],
)
def test_wrong_types_are_reported_with_key_and_expected_type(raw: dict, pieces: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    for piece in pieces:
        assert piece in str(info.value)


@pytest.mark.parametrize(
    ("raw", "piece"),
    [
        ({"data": {"batch_size": 0}}, "data.batch_size must be positive"),
        ({"train": {"epochs": -1}}, "train.epochs must be positive"),
        ({"train": {"device": "gpu"}}, "train.device must be auto, cpu, cuda or cuda:N"),
        ({"seeds": []}, "seeds must be a non-empty list"),
        ({"optim": {"schedules": [{"key": "lr"}]}}, "needs at least 'key'"),
    ],
)
def test_bad_values_are_rejected(raw: dict, piece: str) -> None:
    with pytest.raises(ConfigError, match=piece.replace("(", r"\(")):
        config_from_dict(raw)


def test_numbers_are_widened_and_yaml11_exponents_read_as_floats() -> None:
    config = config_from_dict(
        {"train": {"grad_clip": 1}, "optim": {"binary_kwargs": {"gamma": "1e-3", "nested": {"t": "2E-8"}}}}
    )
    assert config.train.grad_clip == 1.0 and isinstance(config.train.grad_clip, float)
    assert config.optim.binary_kwargs == {"gamma": 1e-3, "nested": {"t": 2e-8}}


def test_overrides_parse_values_with_yaml() -> None:
    config = load_config(
        "digits_bop",
        [
            "optim.binary_kwargs.gamma=1e-3",
            "train.epochs=3",
            "train.amp=false",
            "data.root=null",
            "model.kwargs.hidden_sizes=[32, 16]",
            "output.name=my run",
        ],
    )
    assert config.optim.binary_kwargs["gamma"] == 1e-3
    assert config.optim.binary_kwargs["threshold"] == 1e-6  # untouched sibling kept
    assert config.train.epochs == 3
    assert config.train.amp is False
    assert config.data.root is None
    assert config.model.kwargs["hidden_sizes"] == [32, 16]
    assert config.output.name == "my run"


@pytest.mark.parametrize("text", ["seeds=0,1,2", "seeds=[0, 1, 2]", "seeds=[0,1,2]"])
def test_seed_lists_in_either_spelling(text: str) -> None:
    assert load_config("digits_bop", [text]).seeds == [0, 1, 2]


def test_single_seed_in_a_list_key() -> None:
    assert load_config("digits_bop", ["seeds=4"]).seeds == [4]


@pytest.mark.parametrize(
    ("override", "piece"),
    [
        ("train.epochs", "not of the form key.sub=value"),
        ("train..epochs=3", "empty key part"),
        ("seed.x=1", "seed is not a mapping"),
        ("optim.binary_kwarg.gamma=1", "did you mean 'optim.binary_kwargs'"),
    ],
)
def test_bad_overrides(override: str, piece: str) -> None:
    with pytest.raises(ConfigError, match=piece):
        load_config("digits_bop", [override])


def test_apply_overrides_leaves_input_untouched() -> None:
    raw = {"train": {"epochs": 1}}
    out = apply_overrides(raw, ["train.epochs=2", "optim.real=sgd"])
    assert raw == {"train": {"epochs": 1}}
    assert out == {"train": {"epochs": 2}, "optim": {"real": "sgd"}}


def test_schedule_entries_are_flat_in_yaml() -> None:
    config = config_from_dict(
        {"optim": {"schedules": [{"key": "gamma", "route": "binary", "type": "step", "factor": 0.1, "every": 2, "unit": "epoch"}]}}
    )
    (s,) = config.optim.schedules
    assert s == ScheduleConfig(key="gamma", type="step", route="binary", unit="epoch", params={"factor": 0.1, "every": 2})
    assert config_to_dict(config)["optim"]["schedules"][0] == {
        "key": "gamma", "type": "step", "route": "binary", "unit": "epoch", "factor": 0.1, "every": 2,
    }


@pytest.mark.parametrize("name", SHIPPED)
def test_dump_and_reload_round_trip(name: str, tmp_path: Path) -> None:
    config = load_config(name, ["seeds=[1,2]", "train.compile=auto"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config
    assert yaml.safe_load(path.read_text())["train"]["compile"] == "auto"


def test_recipe_by_path_and_by_name(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ntrain: {epochs: 2}\n")
    assert recipe_path(path) == path
    assert load_config(str(path)).train.epochs == 2
    assert recipe_path("digits_bop").name == "digits_bop.yaml"
    assert recipe_path("digits_bop.yaml").name == "digits_bop.yaml"


def test_unknown_recipe_suggests_and_lists() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("digits_bopp")
    assert "did you mean 'digits_bop'" in str(info.value)
    assert "digits_adam" in str(info.value)


@pytest.mark.parametrize(
    ("text", "piece"),
    [("train: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "must hold a mapping"), ("a: !!python/object:os.system {}\n", "not valid YAML")],
)
def test_bad_recipe_files(tmp_path: Path, text: str, piece: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=piece):
        load_config(path)


def test_a_folder_is_not_a_recipe(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
