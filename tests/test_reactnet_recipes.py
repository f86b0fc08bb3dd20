"""The ReActNet/ImageNet recipes: each builds its model; missing ImageNet files give one clear error;
the ImageNet recipes run end to end on a generated ImageFolder fixture through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _imagenet_fixture import make_image_folder
from flipnet.cli import main
from flipnet.errors import DataNotFoundError
from flipnet.models import count_parameters
from flipnet.train.config import load_config

RECIPES = ["imagenet_reactnet_step1", "imagenet_reactnet_step2", "imagenet_reactnet_cema", "cifar10_reactnet_cpu",
           "cifar10_reactnet_distill_cpu"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_its_model(name: str) -> None:
    from flipnet.train.build import recipe_model

    config = load_config(name)
    model = recipe_model(config)
    counts = count_parameters(model)
    if name.startswith("imagenet"):
        assert model.input_shape == (3, 224, 224)
        assert counts["total"] == 29_343_592  # ReActNet-A, as the reference
        assert config.train.distill.teacher == "torchvision:resnet34"
    else:
        assert model.input_shape == (3, 32, 32) and counts["total"] == 1_784_746
        if "distill" in name:
            assert config.train.distill.teacher == "resnet18"
    if name == "imagenet_reactnet_step1":
        assert counts["binary"] == 0  # real weights, binary activations
    else:
        assert counts["binary"] > 0


def test_recipe_headers_cite_their_sources() -> None:
    from flipnet.train.config import recipe_path

    step1 = recipe_path("imagenet_reactnet_step1").read_text()
    assert "mobilenet/1_step1/run.sh" in step1 and "--learning_rate=5e-4" in step1 and "--weight_decay=1e-5" in step1
    step2 = recipe_path("imagenet_reactnet_step2").read_text()
    assert "mobilenet/2_step2/run.sh" in step2 and "--weight_decay=0" in step2
    cema = recipe_path("imagenet_reactnet_cema").read_text()
    assert "imagenet/step2/train.py" in cema and "NOT verified" in cema


def test_summary_of_the_imagenet_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "imagenet_reactnet_cema"]) == 0
    out = capsys.readouterr().out
    assert "29,343,592" in out or "29343592" in out


def test_missing_imagenet_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flipnet.train.build import build_data

    config = load_config("imagenet_reactnet_cema", [f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(DataNotFoundError, match=r"ImageNet data not found \(looked in: .*nowhere/imagenet, .*nowhere\)"):
        build_data(config)
    rc = main(["train", "imagenet_reactnet_cema", f"data.root={tmp_path / 'nowhere'}", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "ImageNet data not found" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _teacher(tmp_path: Path) -> Path:
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "resnet34-test.pth"
    torch.save(torchvision.models.resnet34(weights=None, num_classes=3).state_dict(), path)
    return path


FIXTURE_OVERRIDES = [
    "data.options.num_classes=3", "data.options.image_size=32", "data.options.num_workers=0", "data.batch_size=6",
    "data.eval_batch_size=6", "data.val_size=3", "train.epochs=1", "train.device=cpu", "train.progress=false",
    "train.tensorboard=false", "train.plots=false", "model.kwargs.small_input=true", "model.kwargs.base_width=2",
]


@pytest.mark.parametrize("name", ["imagenet_reactnet_cema", "imagenet_reactnet_step1"])
def test_imagenet_recipe_runs_end_to_end_on_the_fixture(name: str, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imagenet")
    teacher = _teacher(tmp_path)
    out = tmp_path / "runs"
    rc = main(["train", name, f"data.root={root}", f"train.distill.checkpoint={teacher}", "output.name=fixture",
               *FIXTURE_OVERRIDES, "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "fixture" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["train_loss"] > 0
    assert (out / "fixture" / "checkpoints" / "last.pt").is_file()


def test_two_step_on_the_fixture(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imagenet")
    teacher = _teacher(tmp_path)
    out = tmp_path / "runs"
    common = [f"data.root={root}", f"train.distill.checkpoint={teacher}", *FIXTURE_OVERRIDES, "--out", str(out)]
    assert main(["train", "imagenet_reactnet_step1", "output.name=step1", *common]) == 0
    assert main(["train", "imagenet_reactnet_step2", "output.name=step2", f"model.init_from={out / 'step1'}", *common]) == 0
    assert (out / "step2" / "checkpoints" / "last.pt").is_file()


def test_distillation_really_builds_the_teacher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A teacher file that is missing stops the run: the distill section is never silently ignored."""
    root = make_image_folder(tmp_path / "imagenet")
    rc = main(["train", "imagenet_reactnet_cema", f"data.root={root}", f"train.distill.checkpoint={tmp_path / 'no.pth'}",
               *FIXTURE_OVERRIDES, "--out", str(tmp_path / "runs")])
    assert rc == 2 and "teacher checkpoint" in capsys.readouterr().err


def test_cifar10_teacher_recipe_builds() -> None:
    from flipnet.train.build import recipe_model

    model = recipe_model(load_config("cifar10_reactnet_teacher_cpu"))
    assert count_parameters(model) == {"binary": 0, "real": 701_466, "total": 701_466}
    student = load_config("cifar10_reactnet_distill_cpu")
    assert student.train.distill.checkpoint == "runs/cifar10_reactnet_teacher_cpu"
    teacher = load_config("cifar10_reactnet_teacher_cpu")
    assert student.train.distill.teacher == teacher.model.name and student.train.distill.teacher_kwargs == teacher.model.kwargs


def _cifar_folder() -> Path | None:
    for cand in (Path("/work/shared/data/cifar10"), Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"):
        if (cand / "cifar10_jpgs.tar.gz").is_file():
            return cand
    return None


@pytest.mark.slow  # about 30 s: two runs, each decoding from the offline CIFAR-10 archive
@pytest.mark.skipif(_cifar_folder() is None, reason="the offline CIFAR-10 folder is not in this workspace")
def test_cifar10_teacher_then_distilled_student(tmp_path: Path) -> None:
    """The teacher recipe's run folder is the student recipe's teacher checkpoint (tiny sizes)."""
    root = _cifar_folder()
    out = tmp_path / "runs"
    small = [f"data.root={root}", "data.subset=48", "data.val_size=16", "data.test_subset=32", "data.batch_size=16",
             "data.eval_batch_size=32", "train.epochs=1", "train.device=cpu", "train.progress=false",
             "train.tensorboard=false", "train.plots=false", "--out", str(out)]
    assert main(["train", "cifar10_reactnet_teacher_cpu", "model.kwargs.base_width=4", *small]) == 0
    assert main(["train", "cifar10_reactnet_distill_cpu", "output.name=student", "model.kwargs.base_width=2",
                 f"train.distill.checkpoint={out / 'cifar10_reactnet_teacher_cpu'}", "train.distill.teacher_kwargs.base_width=4",
                 *small]) == 0
    assert (out / "student" / "checkpoints" / "last.pt").is_file()
