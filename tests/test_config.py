"""Recipes: validation, closest-name suggestions, overrides, round trips, shipped recipes."""

from __future__ import annotations

import re
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
    assert config.train.precision == "fp32" and config.train.amp is False and config.train.channels_last == "auto"
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
        ({"train": {"precision": "fp16"}}, ["train.precision", "fp32 or tf32 or bf16 or int8 or auto"]),
        ({"data": {"augment": "yes please"}}, ["data.augment[0]", "must be crop or flip", "yes please"]),
        ({"data": {"augment": 3}}, ["data.augment", "true/false"]),
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
    assert config.train.amp is False and config.train.precision == "fp32"
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


# --------------------------------------------------------------------------- hardening (issue #10)


@pytest.mark.parametrize(
    "override",
    [
        "train.grad_clip=nan", "train.grad_clip=.nan", "train.grad_clip=inf", "train.grad_clip=-.inf",
        "optim.weight_clip=.nan", "optim.binary_kwargs.gamma=.nan", "optim.real_kwargs.lr=.inf",
        "data.val_size=.nan", "optim.schedules=[{key: lr, type: cosine, end: .nan}]",
    ],
)
def test_nan_and_infinity_are_refused(override: str) -> None:
    with pytest.raises(ConfigError, match="finite|must be"):
        load_config("digits_bop", [override])


def test_nan_never_passes_a_positivity_check() -> None:
    from flipnet.train.config import DataConfig, _positive

    with pytest.raises(ConfigError, match="grad_clip must be positive"):
        _positive(type("T", (), {"grad_clip": float("nan")})(), "train", "grad_clip")
    assert DataConfig().batch_size > 0


@pytest.mark.parametrize(
    ("override", "piece"),
    [
        ("seed=-1", "seed must be an integer in 0..4294967295"),
        ("seed=4294967296", "seed must be an integer in 0..4294967295"),
        ("seeds=[0, 99999999999]", "seeds[1] must be an integer in 0..4294967295"),
        ("train.epochs=100000000000000000000", "train.epochs is too large"),
        ("train.threads=0", "train.threads must be positive"),
        ("data.val_size=1.5", "data.val_size must be a count"),
        ("data.val_size=-3", "data.val_size must be 0 or more"),
        ("data.augment=[flip, flip]", "lists an augmentation twice"),
        ("data.augment=[rotate]", "data.augment"),
        ("train.amp=true", None),
    ],
)
def test_bad_numbers_and_new_keys(override: str, piece: str | None) -> None:
    if piece is None:
        assert load_config("digits_bop", [override]).train.precision == "bf16"
        return
    with pytest.raises(ConfigError) as info:
        load_config("digits_bop", [override])
    assert piece in str(info.value)


def test_amp_and_precision_must_agree() -> None:
    with pytest.raises(ConfigError, match="disagree; set only train.precision"):
        load_config("digits_bop", ["train.amp=false", "train.precision=bf16"])
    assert load_config("digits_bop", ["train.amp=auto", "train.precision=auto"]).train.amp == "auto"
    assert "amp" not in dump_config(load_config("digits_bop", ["train.amp=true"]))


def test_new_keys_round_trip(tmp_path: Path) -> None:
    config = load_config("digits_bop", ["train.threads=1", "data.val_size=0.2", "model.init=Glorot_Uniform",
                                        "data.augment=[crop]", "train.precision=tf32"])
    assert (config.train.threads, config.data.val_size, config.model.init) == (1, 0.2, "glorot_uniform")
    assert config.data.augment == ["crop"] and config.train.precision == "tf32"
    assert config.train.amp is False
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config
    assert load_config("digits_bop", ["data.val_size=500"]).data.val_size == 500
    assert load_config("digits_bop", ["data.val_size=null"]).data.val_size is None


BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
name: bomb
model: {kwargs: {x: *i}}
"""


def test_yaml_bomb_is_refused_cheaply(tmp_path: Path) -> None:
    import resource
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert path.stat().st_size < 1000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than") as info:
        load_config(path)
    assert "cannot be read" not in str(info.value)  # said once, not wrapped
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config("digits_bop", ["model.kwargs.x={" + ", ".join(BOMB.split("name:")[0].splitlines()) + "}"])
    assert time.perf_counter() - start < 2.0
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 50_000, f"peak memory grew by {grown_kib} KiB"


@pytest.mark.parametrize(
    ("text", "piece"),
    [
        ("a: &a [*a]\n", "recursive alias"),
        ("seed: " + "9" * 5000 + "\n", "a YAML integer has 5000 digits"),
        ("description: " + "x" * 200_000 + "\n", "characters long"),
    ],
)
def test_hostile_yaml_scalars(tmp_path: Path, text: str, piece: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=piece):
        load_config(path)


def test_huge_and_binary_recipe_files(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00 garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


def test_anchors_within_limits_still_work(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  binary: adam\n  binary_kwargs: &k {lr: 0.02}\n  real_kwargs: *k\n")
    config = load_config(path)
    assert config.optim.real_kwargs == {"lr": 0.02} == config.optim.binary_kwargs


def test_trajectory_changes_lists_what_changes_training() -> None:
    from flipnet.train.config import trajectory_changes

    base = load_config("digits_bop")
    same = load_config("digits_bop", ["train.progress=false", "output.dir=/tmp/x", "train.eval_every=3",
                                      "data.eval_batch_size=7", "train.threads=1", "train.device=cpu",
                                      "data.options.download=true", "data.options.cache_dir=/tmp/c"])
    assert trajectory_changes(base, same) == []
    # a key added to a mapping that was empty is compared on its own
    assert trajectory_changes(base, load_config("digits_bop", ["data.options.noise=0.1"])) == ["data.options.noise"]
    changed = load_config("digits_bop", ["seed=1", "data.batch_size=16", "optim.binary_kwargs.gamma=1e-2",
                                         "train.epochs=40", "optim.schedules=[]", "data.val_size=0",
                                         "train.precision=bf16", "model.kwargs.hidden_sizes=[8]"])
    assert trajectory_changes(base, changed) == [
        "data.batch_size", "data.val_size", "model.kwargs.hidden_sizes", "optim.binary_kwargs.gamma",
        "optim.schedules", "seed", "train.epochs", "train.precision",
    ]
    # a stored config.yaml mapping works, ints equal floats, and world size comes in as an extra
    stored = config_to_dict(base)
    stored["optim"]["real_kwargs"]["lr"] = 0.01
    assert trajectory_changes(stored, base, extra_stored={"world_size": 1}, extra_new={"world_size": 2}) == ["world_size"]
    with pytest.raises(ConfigError, match="stored config is not a valid recipe"):
        trajectory_changes({"trian": {}}, base)


def test_distillation_keys_are_trajectory_keys() -> None:
    from flipnet.train.config import trajectory_changes

    base = load_config("digits_bop")
    other = load_config("digits_bop", ["train.distill.temperature=2.0", "train.distill.weight=0.5"])
    assert trajectory_changes(base, other) == ["train.distill.temperature", "train.distill.weight"]


def test_augment_names_in_a_file_may_be_one_string(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("data: {augment: crop}\n")
    assert load_config(path).data.augment == ["crop"]
    path.write_text("data: {augment: 'crop, flip'}\n")
    assert load_config(path).data.augment == ["crop", "flip"]
    path.write_text("data: {augment: rotate}\n")
    with pytest.raises(ConfigError, match=r"data.augment\[0\] must be crop or flip, got 'rotate'"):
        load_config(path)


def test_the_old_amp_override_replaces_a_recipes_precision() -> None:
    """Paper recipes set ``precision: fp32``; ``train.amp=true`` on the command line used to be refused
    as a disagreement with a key the user cannot unset from the command line."""
    assert load_config("bop_cifar10").train.precision == "fp32"
    assert load_config("bop_cifar10", ["train.amp=true"]).train.precision == "bf16"
    assert load_config("bop_cifar10", ["train.amp=auto"]).train.precision == "auto"
    assert load_config({"train": {"amp": True}}, ["train.precision=tf32"]).train.precision == "tf32"
    # two overrides, or one file, that disagree are still an error
    with pytest.raises(ConfigError, match="disagree"):
        load_config("bop_cifar10", ["train.amp=true", "train.precision=fp32"])
    with pytest.raises(ConfigError, match="disagree"):
        load_config({"train": {"amp": True, "precision": "fp32"}})


def test_shipped_recipes_are_listed_with_libyaml_and_user_files_keep_the_limits(tmp_path: Path, monkeypatch) -> None:
    from flipnet.train import config as cfg

    if not getattr(yaml, "__with_libyaml__", False):
        pytest.skip("PyYAML without libyaml")
    slow = {p.stem: str((cfg._load_yaml_text(p.read_text(encoding="utf-8")) or {}).get("description", ""))
            for p in sorted(cfg._recipes_dir().glob("*.yaml"))}

    def limited(*args, **kwargs):
        raise AssertionError("list_recipes parsed a shipped recipe with the pure-Python loader")

    monkeypatch.setattr(cfg._LimitedLoader, "compose_document", limited)
    assert list_recipes() == slow and len(slow) > 20
    path = tmp_path / "r.yaml"
    path.write_text("name: mine\n")
    with pytest.raises(AssertionError, match="pure-Python loader"):  # a user's file still goes through the limits
        load_config(path)


@pytest.mark.parametrize(("entry", "piece"), [
    ("{key: lr, rout: real, type: cosine}", "did you mean 'optim.schedules[0].route'"),
    ("{key: lr, route: real, type: cosine, units: epoch}", "did you mean 'optim.schedules[0].unit'"),
    ("{kye: lr, route: real, type: cosine}", "did you mean 'optim.schedules[0].key'"),
])
def test_a_misspelt_schedule_field_is_named_when_the_recipe_loads(entry: str, piece: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(piece)):
        load_config("digits_adam", [f"optim.schedules=[{entry}]"])


def test_schedule_parameter_names_match_the_schedule_types() -> None:
    from flipnet.optim.schedules import SCHEDULE_TYPES
    from flipnet.train.config import _SCHEDULE_PARAMS

    assert set(_SCHEDULE_PARAMS) == {k for req, opt in SCHEDULE_TYPES.values() for k in req + opt}
    every = load_config("digits_adam", ["optim.schedules=[{key: lr, type: step, factor: 0.5, every: 2, unit: epoch}]"])
    assert every.optim.schedules[0].params == {"factor": 0.5, "every": 2}
