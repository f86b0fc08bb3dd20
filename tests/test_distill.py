"""Distillation: the distributional loss against a hand computation, teacher loading, a few steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from flipnet.errors import CheckpointError, ConfigError
from flipnet.models import create_model
from flipnet.optim import create_optimizer
from flipnet.train.config import DistillConfig
from flipnet.train.distill import DistillationLoss, build_teacher, distribution_loss, read_state_dict


def _hand_loss(s: list[list[float]], t: list[list[float]], temp: float, kl: bool) -> float:
    total = 0.0
    for zs, zt in zip(s, t):
        es = [math.exp(v / temp) for v in zs]
        et = [math.exp(v / temp) for v in zt]
        ps = [v / sum(es) for v in es]
        pt = [v / sum(et) for v in et]
        ce = -sum(a * math.log(b) for a, b in zip(pt, ps))
        if kl:
            ce += sum(a * math.log(a) for a in pt)
        total += ce
    return total / len(s) * temp * temp


@pytest.mark.parametrize("temp", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("kind", ["cross_entropy", "kl"])
def test_loss_matches_hand_computation(temp: float, kind: str) -> None:
    s = [[1.0, -0.5, 2.0], [0.0, 0.3, -1.2]]
    t = [[0.5, 0.5, 3.0], [-2.0, 1.0, 0.0]]
    got = distribution_loss(torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64),
                            temperature=temp, kind=kind)
    assert float(got) == pytest.approx(_hand_loss(s, t, temp, kind == "kl"), rel=1e-6)


def test_reference_form_and_kl_properties() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7)
    # the reference's form: -bmm(softmax(t) (N,1,C), log_softmax(s) (N,C,1)).mean()
    ref = -torch.bmm(torch.softmax(t, 1).unsqueeze(1), torch.log_softmax(s, 1).unsqueeze(2)).mean()
    ce = distribution_loss(s, t)
    torch.testing.assert_close(ce, ref)
    kl = distribution_loss(s, t, kind="kl")
    assert float(distribution_loss(t, t, kind="kl")) == pytest.approx(0.0, abs=1e-6)
    g_ce = torch.autograd.grad(ce, s)[0]
    g_kl = torch.autograd.grad(kl, s)[0]
    torch.testing.assert_close(g_ce, g_kl)  # same gradient, values differ by the teacher entropy
    assert float(kl.detach()) < float(ce.detach())


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="temperature"):
        distribution_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=0.0)
    with pytest.raises(ConfigError, match="kind"):
        distribution_loss(torch.zeros(1, 2), torch.zeros(1, 2), kind="mse")
    with pytest.raises(ValueError, match="same classes"):
        distribution_loss(torch.zeros(1, 2), torch.zeros(1, 3))
    with pytest.raises(ConfigError, match="checkpoint is required"):
        DistillConfig(teacher="resnet18").validate()
    with pytest.raises(ConfigError, match="weight"):
        DistillConfig(teacher="resnet18", checkpoint="x", weight=1.5).validate()


def _teacher_file(tmp_path: Path, fmt: str) -> tuple[Path, nn.Module]:
    torch.manual_seed(1)
    teacher = create_model("binary_mlp", mode="float", input_size=8, num_classes=4, hidden_sizes=(16,))
    state = teacher.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "teacher.safetensors"
        save_file({k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}, str(path))
    elif fmt == "ddp":
        path = tmp_path / "teacher.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        path = tmp_path / "teacher.pt"
        torch.save(state, path)
    return path, teacher


@pytest.mark.parametrize("fmt", ["plain", "ddp", "safetensors"])
def test_teacher_loads_from_files(tmp_path: Path, fmt: str) -> None:
    path, reference = _teacher_file(tmp_path, fmt)
    spec = DistillConfig(teacher="binary_mlp", teacher_kwargs={"mode": "float", "input_size": 8, "hidden_sizes": [16]},
                       checkpoint=str(path))
    teacher = build_teacher(spec, num_classes=4, in_channels=1)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(3, 1, 8, 8)
    reference.eval()
    torch.testing.assert_close(teacher(x), reference(x))


def test_teacher_errors(tmp_path: Path) -> None:
    spec = DistillConfig(teacher="binary_mlp", teacher_kwargs={"mode": "float", "input_size": 8}, checkpoint=str(tmp_path / "no.pt"))
    with pytest.raises(CheckpointError, match="cannot download"):
        build_teacher(spec, num_classes=4, in_channels=1)
    path, _ = _teacher_file(tmp_path, "plain")
    spec.checkpoint = str(path)  # hidden size 256 by default: does not fit the 16-unit file
    with pytest.raises(CheckpointError, match="do not fit"):
        build_teacher(spec, num_classes=4, in_channels=1)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_state_dict(bad)
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": object.__new__(_Unsafe)}, evil)
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_state_dict(evil)  # weights_only=True refuses arbitrary objects


class _Unsafe:
    pass


def test_torchvision_teacher_is_built_without_weights(tmp_path: Path) -> None:
    import torchvision

    tv = torchvision.models.resnet18(weights=None, num_classes=5)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    teacher = build_teacher(DistillConfig(teacher="torchvision:resnet18", checkpoint=str(path)), num_classes=5, in_channels=3)
    x = torch.randn(1, 3, 32, 32)
    tv.eval()
    torch.testing.assert_close(teacher(x), tv(x))
    with pytest.raises(ConfigError, match="never downloads"):
        build_teacher(DistillConfig(teacher="torchvision:resnet18", checkpoint=str(path), teacher_kwargs={"weights": "DEFAULT"}),
                      num_classes=5, in_channels=3)


def test_teacher_is_not_part_of_the_student(tmp_path: Path) -> None:
    path, _ = _teacher_file(tmp_path, "plain")
    loss = DistillationLoss.from_spec(
        DistillConfig(teacher="binary_mlp", teacher_kwargs={"mode": "float", "input_size": 8, "hidden_sizes": [16]}, checkpoint=str(path)),
        num_classes=4, in_channels=1,
    )
    assert list(loss.parameters()) == [] and loss.state_dict() == {}
    assert "teacher=" in repr(loss)


def test_mixed_weight_adds_label_cross_entropy(tmp_path: Path) -> None:
    path, teacher = _teacher_file(tmp_path, "plain")
    teacher.eval()
    loss = DistillationLoss(teacher, weight=0.25, temperature=2.0)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    s = torch.randn(4, 4)
    with torch.no_grad():
        t = teacher(x)
    expected = 0.25 * distribution_loss(s, t, temperature=2.0) + 0.75 * nn.functional.cross_entropy(s, y)
    torch.testing.assert_close(loss(s, y, x), expected)


def test_a_few_distilled_steps_move_the_student_towards_the_teacher(tmp_path: Path) -> None:
    path, teacher = _teacher_file(tmp_path, "plain")
    loss_fn = DistillationLoss(teacher.eval())
    torch.manual_seed(0)
    student = create_model("reactnet_a", num_classes=4, in_channels=1, small_input=True, base_width=2)
    opt = create_optimizer(student, binary="adam", binary_kwargs={"lr": 1e-2}, real="adam", real_kwargs={"lr": 1e-2})
    x = torch.randn(16, 1, 32, 32)
    x_teacher = nn.functional.adaptive_avg_pool2d(x, 8)
    wrapped = DistillationLoss(nn.Sequential(nn.AdaptiveAvgPool2d(8), teacher).eval())
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = wrapped(student(x), torch.zeros(16, dtype=torch.long), x)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert loss_fn.teacher_logits(x_teacher).shape == (16, 4)


def test_train_step_passes_the_batch_to_the_distillation_loss(tmp_path: Path) -> None:
    from flipnet.optim import prepare_model_for
    from flipnet.train.fast import make_train_step

    _, teacher = _teacher_file(tmp_path, "plain")
    teacher.eval()
    torch.manual_seed(0)
    student = create_model("binary_mlp", input_size=8, num_classes=4, hidden_sizes=(32,))
    prepare_model_for(student, binary="adam", real="adam")
    opt = create_optimizer(student, binary="adam", binary_kwargs={"lr": 1e-2}, real="adam", real_kwargs={"lr": 1e-2})
    loss_fn = DistillationLoss(teacher)
    step = make_train_step(student, opt, loss_fn)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,))
    with torch.no_grad():
        expected = distribution_loss(student(x), teacher(x))
    sums = [float(step(x, y)[0]) / 32 for _ in range(6)]
    assert sums[0] == pytest.approx(float(expected), rel=1e-5)  # the step's loss is the distillation loss
    assert sums[-1] < sums[0]


def test_loss_from_config(tmp_path: Path) -> None:
    from flipnet.train.config import load_config
    from flipnet.train.distill import loss_from_config

    path, _ = _teacher_file(tmp_path, "plain")
    assert loss_from_config(load_config("digits_bop"), None) is None
    cfg = load_config("digits_bop", [
        "train.distill.teacher=binary_mlp", f"train.distill.checkpoint={path}", "train.distill.temperature=2",
        "train.distill.teacher_kwargs={mode: float, input_size: 8, hidden_sizes: [16]}",
    ])
    data4 = type("D", (), {"num_classes": 4, "input_shape": (1, 8, 8), "task": "classification"})()
    loss = loss_from_config(cfg, data4)
    assert isinstance(loss, DistillationLoss) and loss.temperature == 2.0 and loss.takes_input


def test_teacher_from_a_run_folder(tmp_path: Path) -> None:
    _, reference = _teacher_file(tmp_path, "plain")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"format": "flipnet-checkpoint", "model": reference.state_dict(), "epoch": 1}, run / "checkpoints" / "best.pt")
    state = read_state_dict(run)
    assert set(state) == set(reference.state_dict())
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        read_state_dict(tmp_path)


def test_the_trainer_trains_on_the_distillation_loss(tmp_path: Path) -> None:
    from flipnet.train import Trainer
    from flipnet.train.config import load_config

    torch.manual_seed(1)
    teacher = create_model("binary_mlp", mode="float", input_size=8, num_classes=10, hidden_sizes=(16,))
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    cfg = load_config("digits_bop", [
        "train.distill.teacher=binary_mlp", f"train.distill.checkpoint={path}",
        "train.distill.teacher_kwargs={mode: float, input_size: 8, hidden_sizes: [16]}",
        "train.epochs=1", "train.device=cpu", "train.progress=false", "train.tensorboard=false", "train.plots=false",
        f"output.dir={tmp_path / 'runs'}",
    ])
    trainer = Trainer.from_config(cfg)
    loss_fn = trainer.train_step.loss_fn
    assert isinstance(loss_fn, DistillationLoss)
    # the teacher it holds is the file's
    x = torch.randn(4, 1, 8, 8)
    teacher.eval()
    torch.testing.assert_close(loss_fn.teacher_logits(x), teacher(x))
    trainer.fit()


def test_teacher_follows_the_batch_device_and_keeps_its_dtype(tmp_path: Path) -> None:
    _, teacher = _teacher_file(tmp_path, "plain")
    teacher64 = teacher.double().eval()
    loss = DistillationLoss(teacher64)
    x = torch.randn(4, 1, 8, 8)  # float32 batch, float64 teacher
    out = loss.teacher_logits(x)
    assert out.dtype == torch.float64 and not out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out, teacher64(x.double()))
    s = torch.randn(4, 4, requires_grad=True)
    value = loss(s, torch.zeros(4, dtype=torch.long), x)
    value.backward()
    assert s.grad is not None and all(p.grad is None for p in teacher64.parameters())
    # a teacher on another device is moved to the batch's device (the meta device stands in for a GPU here)
    meta = torch.empty(4, 1, 8, 8, device="meta")
    assert loss.teacher_logits(meta).device.type == "meta"
    assert next(teacher64.parameters()).device.type == "meta"


def test_unreadable_teacher_file_never_suggests_unsafe_loading(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": object.__new__(_Unsafe)}, evil)
    png = tmp_path / "picture.pth"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    for path in (evil, png):
        with pytest.raises(CheckpointError) as info:
            read_state_dict(path)
        message = str(info.value)
        assert "\n" not in message and "weights_only" not in message and "trusted source" not in message
        assert "cannot be read as a weights file (not a PyTorch file of tensors only: " in message
    assert "_Unsafe" in str(pytest.raises(CheckpointError, read_state_dict, evil).value)
