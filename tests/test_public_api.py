"""The top-level ``flipnet`` namespace and the error hierarchy: names users and other modules rely on."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import flipnet
from flipnet import errors


def test_key_api_is_reexported_from_the_package() -> None:
    expected = {
        "binarize": "flipnet.convert",
        "summary": "flipnet.compress.summary",
        "Bop": "flipnet.optim",
        "Bop2ndOrder": "flipnet.optim",
        "CEMA": "flipnet.optim",
        "create_optimizer": "flipnet.optim",
        "FlipRatio": "flipnet.metrics",
        "create_model": "flipnet.models",
        "list_models": "flipnet.models",
        "load_dataset": "flipnet.data",
        "Trainer": "flipnet.train",
        "load_config": "flipnet.train",
        "binary_parameters": "flipnet.layers",
    }
    for name, module in expected.items():
        assert getattr(flipnet, name) is getattr(importlib.import_module(module), name), name
        assert name in flipnet.__all__ and name in dir(flipnet)
    from flipnet import Trainer, summary  # noqa: F401  (from-import goes through __getattr__ too)

    assert callable(flipnet.summary)  # the function, not the module flipnet.compress.summary
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        flipnet.not_a_name  # noqa: B018


def test_import_flipnet_stays_light() -> None:
    code = (
        "import sys, flipnet; "
        "heavy = ('flipnet.train', 'flipnet.data', 'flipnet.compress', 'flipnet.analysis', 'matplotlib', "
        "'torchvision', 'tensorboard', 'torch.utils.tensorboard', 'sklearn', 'PIL'); "
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    "name, builtin",
    [
        ("ConfigError", ValueError),
        ("DataNotFoundError", FileNotFoundError),
        ("DataFormatError", ValueError),
        ("CheckpointError", ValueError),
        ("ExportFormatError", ValueError),
        ("TrainingDiverged", ArithmeticError),
    ],
)
def test_every_user_error_lives_in_flipnet_errors(name: str, builtin: type) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, errors.FlipnetError) and issubclass(cls, builtin)
    assert name in errors.__all__


def test_old_import_paths_of_moved_errors_still_work() -> None:
    from flipnet.data import DataFormatError as a
    from flipnet.data.base import DataFormatError as b
    from flipnet.train import TrainingDiverged as c
    from flipnet.train.loop import TrainingDiverged as d

    assert a is b is errors.DataFormatError
    assert c is d is errors.TrainingDiverged


def test_did_you_mean() -> None:
    assert errors.did_you_mean("gama", ["gamma", "threshold"]) == "did you mean 'gamma'? "
    assert errors.did_you_mean("zzz", ["gamma", "threshold"]) == ""
