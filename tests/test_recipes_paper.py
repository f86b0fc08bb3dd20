"""The paper-reproduction recipes: they validate, encode the papers' protocols, and run.

Each recipe is smoke-run for 2 optimizer steps on tiny synthetic data (``data.name=synthetic``
and a narrow model), so the whole recipe -> trainer path is exercised without the real data.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from flipnet.train.config import load_config, recipe_path

torch.set_num_threads(1)

CIFAR_RECIPES = [
    "bop_cifar10",
    "adam_cifar10",
    "bop_constant_gamma_cifar10",
    "bop_dropout_cifar10",
    "bop2_biased_cifar10",
    "bop2_unbiased_cifar10",
    "cema_cifar10",
    "fast91_cifar10",
]
SVHN_RECIPES = ["svhn_bop", "svhn_adam"]
PETS_RECIPES = ["pets_unet_float", "pets_unet_adam", "pets_unet_bop"]
TWO_STEP = ["two_step_latent_step1", "two_step_latent_step2"]
ALL = CIFAR_RECIPES + SVHN_RECIPES + PETS_RECIPES + TWO_STEP


def _common(tmp_path: Path) -> list[str]:
    return [
        "train.epochs=1",
        "train.device=cpu",
        "train.compile=false",
        "train.progress=false",
        "train.plots=false",
        "train.tensorboard=false",
        "train.eval_every=1",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        "data.val_size=4",
        f"output.dir={tmp_path}",
    ]


def _smoke_overrides(name: str, tmp_path: Path) -> list[str]:
    if name in PETS_RECIPES:
        data = "data.options={num_train: 16, num_test: 8, shape: [3, 16, 16], num_classes: 3, task: segmentation}"
        model = ["model.kwargs.base_width=4", "model.kwargs.depth=2", "model.kwargs.input_size=16"]
    else:
        data = "data.options={num_train: 16, num_test: 16, shape: [3, 16, 16], num_classes: 10}"
        model = ["model.kwargs.filters=4", "model.kwargs.dense_units=16", "model.kwargs.input_size=16"]
    return ["data.name=synthetic", data, *model, *_common(tmp_path)]


@pytest.mark.parametrize("name", ALL)
def test_recipe_validates_and_documents_its_source(name):
    config = load_config(name)
    assert config.name == name
    assert config.description
    text = recipe_path(name).read_text(encoding="utf-8")
    assert "reported" in text, f"{name}: the YAML comment must state the reported number (or that there is none)"


def _run(name: str, overrides: list[str]) -> dict:
    from flipnet.train.loop import Trainer

    config = load_config(name, overrides)
    with warnings.catch_warnings():
        # fast91 asks for CUDA graphs, which fall back to eager on CPU with a warning
        warnings.filterwarnings("ignore", message="cuda_graphs=True ignored")
        warnings.filterwarnings("ignore", message="segmentation data: accuracy is pixel accuracy")
        trainer = Trainer(config)
        row = trainer.fit()
    assert trainer.step == 2, f"{name}: expected 2 optimizer steps, got {trainer.step}"
    assert row["test_acc"] is not None and 0.0 <= row["test_acc"] <= 1.0
    assert torch.isfinite(torch.tensor(row["train_loss"]))
    return row


@pytest.mark.parametrize("name", CIFAR_RECIPES + SVHN_RECIPES + PETS_RECIPES)
def test_recipe_smoke_run(name, tmp_path):
    _run(name, _smoke_overrides(name, tmp_path))


def test_two_step_recipes_chain(tmp_path):
    _run("two_step_latent_step1", _smoke_overrides("two_step_latent_step1", tmp_path))
    step1 = tmp_path / "two_step_latent_step1"
    assert (step1 / "checkpoints" / "last.pt").is_file()
    _run("two_step_latent_step2", _smoke_overrides("two_step_latent_step2", tmp_path) + [f"model.init_from={step1}"])


def test_two_step_protocol():
    s1, s2 = load_config("two_step_latent_step1"), load_config("two_step_latent_step2")
    assert s1.model.kwargs["mode"] == "float" and s1.model.kwargs["activation"] == "ste_sign"
    assert s1.optim.binary_kwargs["weight_decay"] > 0 and s1.optim.real_kwargs["weight_decay"] > 0
    assert s2.model.kwargs.get("mode", "bnn") == "bnn"
    assert s2.optim.binary_kwargs.get("weight_decay", 0.0) == 0.0
    assert s2.model.init_from == str(Path(s1.output.dir) / s1.output.name)


def _schedule(config, key):
    found = [s for s in config.optim.schedules if s.key == key]
    assert len(found) == 1, f"expected one schedule for {key}"
    return found[0]


def test_bop_paper_protocol():
    for name in ("bop_cifar10", "bop_dropout_cifar10"):
        c = load_config(name)
        assert (c.data.batch_size, c.train.epochs, c.data.augment) == (50, 500, True)
        assert c.optim.binary_kwargs == {"gamma": 1e-4, "threshold": 1e-8}
        assert c.optim.real == "adam" and c.optim.real_kwargs == {"lr": 1e-2, "eps": 1e-7}
        s = _schedule(c, "gamma")
        assert (s.type, s.unit, s.params) == ("step", "epoch", {"factor": 0.1, "every": 100})
        assert [s.key for s in c.optim.schedules] == ["gamma"]  # Adam stays constant
    assert load_config("bop_dropout_cifar10").model.kwargs["dropout"] == 0.25
    constant = load_config("bop_constant_gamma_cifar10")
    assert constant.optim.schedules == [] and constant.optim.binary_kwargs["gamma"] == 1e-4


def test_bop2_paper_protocol():
    for name, unbiased in (("bop2_biased_cifar10", False), ("bop2_unbiased_cifar10", True)):
        c = load_config(name)
        assert (c.data.batch_size, c.train.epochs) == (50, 500)
        assert c.optim.binary == "bop2ndorder" and c.optim.binary_kwargs["unbiased"] is unbiased
        start = c.optim.binary_kwargs
        ends = {k: _schedule(c, k).params["end"] for k in ("threshold", "gamma", "sigma", "lr")}
        assert (start["threshold"], ends["threshold"]) == (1e-5, 1e-8)
        assert (start["gamma"], ends["gamma"]) == (1e-2, 1e-5)
        assert (start["sigma"], ends["sigma"]) == (1e-7, 1e-2)
        assert (c.optim.real_kwargs["lr"], ends["lr"]) == (1e-2, 1e-3)
        assert all(s.type == "linear" and s.unit == "step" for s in c.optim.schedules)


def test_cema_follows_the_sgd_mapping():
    c = load_config("cema_cifar10")
    eta, mu, lam = 0.1, 0.9, 5e-4  # the SGD set-up named in the recipe's comment
    assert c.optim.binary_kwargs["alpha"] == pytest.approx(eta * lam)
    assert c.optim.binary_kwargs["gamma"] == pytest.approx(1 - mu)
    alpha = _schedule(c, "alpha")
    assert alpha.type == "linear" and alpha.params["end"] == 0.0
    # the reference decays alpha (and the real lr) once per epoch: LambdaLR(1 - epoch/epochs)
    assert alpha.unit == "epoch" and _schedule(c, "lr").unit == "epoch"
    assert not [s for s in c.optim.schedules if s.key == "gamma"]


def test_cema_alpha_decays_per_epoch_like_the_reference():
    """alpha at epoch e is alpha0 * (1 - e / epochs), constant within an epoch; unit=step stays available."""
    from flipnet.optim.schedules import schedule_from_dict

    c = load_config("cema_cifar10")
    spec = {k: v for k, v in (("type", _schedule(c, "alpha").type), *_schedule(c, "alpha").params.items())}
    a0, epochs = c.optim.binary_kwargs["alpha"], c.train.epochs
    per_epoch = schedule_from_dict(spec, a0, epochs)
    for e in (0, 1, 250, 499, 500):
        assert per_epoch(e) == pytest.approx(a0 * (1 - e / epochs))
    per_step = schedule_from_dict(spec, a0, epochs * 1000)
    assert per_step(500) == pytest.approx(a0 * (1 - 0.5 / epochs))  # the per-step option decays within epoch 0


KERAS_RECIPES = ["bop_cifar10", "bop_constant_gamma_cifar10", "bop_dropout_cifar10", "adam_cifar10",
                 "bop2_biased_cifar10", "bop2_unbiased_cifar10"]


@pytest.mark.parametrize("name", KERAS_RECIPES)
def test_recipes_of_keras_code_use_keras_conventions(name):
    c = load_config(name)
    assert c.model.init == "glorot_uniform"
    for route, opt, kwargs in (("binary", c.optim.binary, c.optim.binary_kwargs), ("real", c.optim.real, c.optim.real_kwargs)):
        if opt in ("adam", "adamw"):
            assert kwargs["eps"] == 1e-7, (route, kwargs)


@pytest.mark.parametrize("name", ALL)
def test_paper_recipes_train_in_fp32_unless_they_opt_into_bf16(name):
    c = load_config(name)
    assert c.train.precision == ("bf16" if name == "fast91_cifar10" else "fp32")


@pytest.mark.parametrize("name", CIFAR_RECIPES + SVHN_RECIPES + TWO_STEP + ["digits_bop", "digits_adam"])
def test_validation_split_is_on(name):
    c = load_config(name)
    assert c.data.val_size not in (None, 0, 0.0)


def test_adam_cifar10_states_the_reference_baseline_truthfully():
    text = recipe_path("adam_cifar10").read_text(encoding="utf-8")
    assert "128 filters" in text and "1,024 dense units" in text and "Adam 5e-3, batch 256, 100 epochs" in text
    assert "4,096" not in text and "64 filters" not in text


@pytest.mark.parametrize("name", sorted(__import__("flipnet.train.config", fromlist=["x"]).list_recipes()))
def test_every_recipe_header_cites_its_number_and_source(name):
    text = recipe_path(name).read_text(encoding="utf-8")
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "reported" in header, f"{name}: the header must state the reported number (or that there is none)"
    assert any(w in header for w in ("reference code", "source", "Source", "flipnet's own", "no paper", "flipnet benchmark")), name


def test_fast91_scaling_rule():
    """gamma scales with the batch size (same EMA time constant in epochs); tau is unchanged."""
    base, fast = load_config("bop_cifar10"), load_config("fast91_cifar10")
    ratio = fast.data.batch_size / base.data.batch_size
    assert fast.optim.binary_kwargs["gamma"] == pytest.approx(base.optim.binary_kwargs["gamma"] * ratio)
    assert fast.optim.binary_kwargs["threshold"] == base.optim.binary_kwargs["threshold"]
    # the decay happens at the same fraction of training (every 1/5 of the run in the paper)
    every_frac_base = _schedule(base, "gamma").params["every"] / base.train.epochs
    every_frac_fast = _schedule(fast, "gamma").params["every"] / fast.train.epochs
    assert every_frac_fast == pytest.approx(2 * every_frac_base)  # 2 decays in 100 epochs vs 4 in 500
    assert fast.train.cuda_graphs is True


def test_svhn_protocol():
    for name in SVHN_RECIPES:
        c = load_config(name)
        assert c.data.name == "svhn" and c.train.epochs == 300 and c.data.augment is False


def test_binarynet_batchnorm_has_the_keras_statistics_the_headers_state():
    from flipnet.models import create_model

    model = create_model("binarynet", num_classes=10, in_channels=3, input_size=32, filters=4, dense_units=8)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all((m.momentum, m.eps) == (0.01, 1e-3) for m in bns)
    text = recipe_path("bop_cifar10").read_text(encoding="utf-8")
    assert "momentum 0.99 = PyTorch 0.01, epsilon 1e-3" in text
