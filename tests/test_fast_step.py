"""Tests of flipnet.train.fast: the shared training step (eager, compile, CUDA graphs)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flipnet.layers import BinaryLinear, apply_constraints
from flipnet.train.fast import (
    TrainStep,
    count_correct,
    leaf_optimizers,
    make_train_step,
    prepare_model,
    tensorize_hyperparameters,
)

torch.set_num_threads(1)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _mlp(seed: int = 0, clip: float | None = None) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        BinaryLinear(12, 16, weight_clip=clip),
        nn.BatchNorm1d(16),
        nn.Hardtanh(),
        BinaryLinear(16, 3, input_quantizer="ste_sign", weight_clip=clip),
        nn.BatchNorm1d(3),
    )


def _batches(n: int = 6, batch: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 12, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(n)]


def _manual_loop(model: nn.Module, opt: torch.optim.Optimizer, batches, clip=None, constraints=False):
    losses, correct = [], []
    for x, y in batches:
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if constraints:
            apply_constraints(model)
        losses.append(loss.detach() * y.shape[0])
        correct.append((out.argmax(1) == y).sum())
    return losses, correct


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        if isinstance(pa, torch.Tensor):
            torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=f"{na} differs")


@pytest.mark.parametrize("clip", [None, 0.05])
def test_eager_step_matches_hand_written_loop(clip):
    batches = _batches()
    ref, test = _mlp(clip=0.5), _mlp(clip=0.5)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt_test = torch.optim.Adam(test.parameters(), lr=1e-2)
    losses, correct = _manual_loop(ref, opt_ref, batches, clip=clip, constraints=True)
    step = make_train_step(test, opt_test, F.cross_entropy, grad_clip=clip, after_step=lambda: apply_constraints(test))
    assert isinstance(step, TrainStep) and step.mode == "eager"
    for (x, y), l_ref, c_ref in zip(batches, losses, correct):
        l, c = step(x, y)
        assert not l.requires_grad and l.dim() == 0 and c.dim() == 0
        torch.testing.assert_close(l, l_ref, rtol=0, atol=0)
        assert int(c) == int(c_ref)
    _assert_same_params(ref, test)
    assert step.eager_steps == len(batches) and step.graph_replays == 0
    # the constraint ran: every latent weight is inside the clip range
    for m in test.modules():
        if isinstance(m, BinaryLinear):
            assert float(m.weight.detach().abs().max()) <= 0.5


def test_grad_clip_changes_the_update():
    batches = _batches(n=2)
    a, b = _mlp(), _mlp()
    sa = make_train_step(a, torch.optim.SGD(a.parameters(), lr=1.0), F.cross_entropy)
    sb = make_train_step(b, torch.optim.SGD(b.parameters(), lr=1.0), F.cross_entropy, grad_clip=1e-3)
    w0 = b[1].weight.detach().clone()
    for x, y in batches:
        sa(x, y)
        sb(x, y)
    # with a tiny clip the SGD update is tiny: total movement <= lr * clip * steps
    assert float((b[1].weight.detach() - w0).norm()) <= 2 * 1e-3 + 1e-6
    assert float((a[1].weight.detach() - w0).norm()) > 1e-2


def test_zero_grad_and_loss_sum_semantics():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = make_train_step(model, opt, F.cross_entropy)
    x, y = _batches(n=1, batch=5)[0]
    # BatchNorm in train mode uses batch statistics: compare with a train-mode forward of a copy
    twin = copy.deepcopy(model)
    expected = F.cross_entropy(twin(x), y).detach() * 5
    loss_sum, _ = step(x, y)
    torch.testing.assert_close(loss_sum, expected)
    assert all(p.grad is None for p in model.parameters())


def test_cuda_graphs_on_cpu_warns_and_runs_eagerly():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match="cuda_graphs=True ignored"):
        step = make_train_step(model, opt, F.cross_entropy, cuda_graphs=True)
    assert step.mode == "eager"
    for x, y in _batches(n=2):
        step(x, y)
    assert step.eager_steps == 2 and step.graph_replays == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"amp_dtype": torch.float32}, "amp_dtype"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    model = _mlp()
    with pytest.raises(ValueError, match=match):
        make_train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, **kwargs)


def test_bf16_autocast_on_cpu_trains():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = make_train_step(model, opt, F.cross_entropy, amp_dtype=torch.bfloat16)
    x, y = _batches(n=1, batch=32)[0]
    first, _ = step(x, y)
    for _ in range(30):
        last, _ = step(x, y)
    assert last.dtype == torch.float32
    assert float(last) < float(first)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_count_correct_classification_segmentation_and_regression():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    assert int(count_correct(logits, torch.tensor([0, 1, 1]))) == 2
    seg = torch.zeros(1, 3, 2, 2)
    seg[0, 2] = 1.0  # every pixel predicts class 2
    assert int(count_correct(seg, torch.tensor([[[2, 2], [0, 2]]]))) == 3
    assert int(count_correct(torch.randn(4, 1), torch.randn(4, 1))) == 0


def test_prepare_model_channels_last():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    prepare_model(model, "cpu", channels_last=True)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 4, 6, 6)
    auto = prepare_model(nn.Sequential(nn.Conv2d(3, 4, 3)), "cpu", channels_last="auto")
    assert auto[0].weight.is_contiguous()  # auto: off on CPU


def test_tensorize_leaves_cpu_torch_optimizers_alone():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    assert tensorize_hyperparameters(opt) == {}
    assert isinstance(opt.param_groups[0]["lr"], float)
    assert leaf_optimizers(opt) == [opt]


def test_tensorize_converts_integer_flip_hyperparameters():
    # ``threshold: 0`` in a YAML recipe is an int; left a Python number, a captured graph would
    # bake it in and never see a schedule's updates
    from flipnet.optim import Bop2ndOrder

    p = nn.Parameter(torch.randn(5))
    opt = Bop2ndOrder([p], gamma=1, sigma=1e-2, threshold=0)
    assert tensorize_hyperparameters(opt) == {"Bop2ndOrder": ["gamma", "sigma", "threshold"]}
    group = opt.param_groups[0]
    for key in ("gamma", "sigma", "threshold"):
        assert isinstance(group[key], torch.Tensor) and group[key].dim() == 0
    assert group["unbiased"] is False


# ------------------------------------------------------------------ compile (slow on CPU)
@pytest.mark.slow
def test_compile_step_matches_eager():
    batches = _batches(n=4)
    ref, test = _mlp(), _mlp()
    s_ref = make_train_step(ref, torch.optim.Adam(ref.parameters(), lr=1e-2), F.cross_entropy)
    s_test = make_train_step(test, torch.optim.Adam(test.parameters(), lr=1e-2), F.cross_entropy, compile=True)
    assert s_test.mode == "compile"
    for x, y in batches:
        l_ref, c_ref = s_ref(x, y)
        l, c = s_test(x, y)
        torch.testing.assert_close(l, l_ref, rtol=1e-4, atol=1e-5)
        assert int(c) == int(c_ref)
    for pa, pb in zip(ref.parameters(), test.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------ CUDA graphs (GPU only)
def _gpu_pair(binary: str):
    from flipnet.optim import create_optimizer, prepare_model_for

    models, opts = [], []
    for _ in range(2):
        m = _mlp().cuda()
        kwargs = {"gamma": 1e-2, "threshold": 1e-4} if binary == "bop" else {"lr": 1e-2}
        opt = create_optimizer(prepare_model_for(m, binary), binary=binary, binary_kwargs=kwargs, real="adam", real_kwargs={"lr": 1e-2},
                               weight_clip=None if binary == "bop" else 1.0)
        models.append(m)
        opts.append(opt)
    return models, opts


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("binary", ["bop", "adam"])
def test_cuda_graph_step_matches_eager(binary):
    (ref, test), (opt_ref, opt_test) = _gpu_pair(binary)
    tensorize_hyperparameters(opt_ref)  # same numerics (capturable Adam) on both sides
    s_ref = make_train_step(ref, opt_ref, F.cross_entropy)
    s_test = make_train_step(test, opt_test, F.cross_entropy, cuda_graphs=True, warmup_steps=2)
    assert s_test.mode == "cuda_graphs"
    batches = [(x.cuda(), y.cuda()) for x, y in _batches(n=8)]
    batches.append((batches[0][0][:5], batches[0][1][:5]))  # odd shape: eager fallback
    batches.append(batches[1])
    for x, y in batches:
        l_ref, c_ref = s_ref(x, y)
        l, c = s_test(x, y)
        torch.testing.assert_close(l, l_ref, rtol=1e-5, atol=1e-6)
        assert int(c) == int(c_ref)
    torch.cuda.synchronize()
    for pa, pb in zip(ref.parameters(), test.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert s_test.graph_replays == 7 and s_test.eager_steps == 3
    for a, b in zip(leaf_optimizers(opt_ref), leaf_optimizers(opt_test)):
        if hasattr(a, "num_steps"):
            assert a.num_steps == b.num_steps == len(batches)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_sees_schedule_updates():
    (ref, test), (opt_ref, opt_test) = _gpu_pair("bop")
    tensorize_hyperparameters(opt_ref)
    s_ref = make_train_step(ref, opt_ref, F.cross_entropy)
    s_test = make_train_step(test, opt_test, F.cross_entropy, cuda_graphs=True, warmup_steps=1)
    batches = [(x.cuda(), y.cuda()) for x, y in _batches(n=6)]
    for i, (x, y) in enumerate(batches):
        if i == 3:  # a schedule that assigns plain numbers rather than updating in place
            for opt in (opt_ref, opt_test):
                for g in opt.param_groups:
                    if g["route"] == "binary":
                        g["threshold"] = 1e-6
                    else:
                        g["lr"] = 1e-3
        s_ref(x, y)
        s_test(x, y)
    torch.cuda.synchronize()
    for pa, pb in zip(ref.parameters(), test.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_bf16_channels_last_graph_on_conv_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    prepare_model(model, "cuda", channels_last=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = make_train_step(model, opt, F.cross_entropy, amp_dtype=torch.bfloat16, cuda_graphs=True)
    x = torch.randn(16, 3, 8, 8, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    first, _ = step(x, y)
    for _ in range(40):
        last, _ = step(x, y)
    assert float(last) < float(first)
    assert step.graph_replays > 30


def test_flip_optimizer_with_tensor_hyperparameters_matches_floats():
    """What CUDA graphs rely on, checked on CPU: tensor γ/τ updated in place give the same run."""
    from flipnet.optim import create_optimizer, prepare_model_for
    from flipnet.optim.schedules import HyperparamScheduler, StepDecay

    batches = _batches(n=6)
    ref, test = _mlp(), _mlp()
    kw = {"gamma": 1e-2, "threshold": 1e-5}
    opt_ref = create_optimizer(prepare_model_for(ref, "bop"), "bop", kw, "adam", {"lr": 1e-2})
    opt_test = create_optimizer(prepare_model_for(test, "bop"), "bop", kw, "adam", {"lr": 1e-2})
    changed = tensorize_hyperparameters(opt_test)
    assert changed == {"Bop": ["gamma", "threshold"]}  # Adam on CPU cannot be capturable
    gamma_tensor = next(g for g in opt_test.param_groups if g["route"] == "binary")["gamma"]
    assert isinstance(gamma_tensor, torch.Tensor) and gamma_tensor.dim() == 0
    scheds = [HyperparamScheduler(o, "gamma", StepDecay(1e-2, 0.5, 2), route="binary") for o in (opt_ref, opt_test)]
    s_ref = make_train_step(ref, opt_ref, F.cross_entropy)
    s_test = make_train_step(test, opt_test, F.cross_entropy)
    for x, y in batches:
        s_ref(x, y)
        s_test(x, y)
        for s in scheds:
            s.step()
    _assert_same_params(ref, test)
    # the schedule updated the very tensor a captured graph would read
    group = next(g for g in opt_test.param_groups if g["route"] == "binary")
    assert group["gamma"] is gamma_tensor
    assert float(gamma_tensor) == pytest.approx(1e-2 * 0.5**3)


def test_benchmark_counts_binarynet_macs_and_runs():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "epoch_time.py"
    spec = importlib.util.spec_from_file_location("epoch_time", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["epoch_time"] = bench  # dataclasses look their module up while being created
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules["epoch_time"]
    from flipnet.models import create_model

    model = create_model("binarynet", num_classes=10, in_channels=3)
    # by hand: six 3x3 convolutions (conv1 unpadded 30x30; pools after conv2/4/6) + three dense layers
    convs = [(3, 128, 30), (128, 128, 30), (128, 256, 15), (256, 256, 15), (256, 512, 7), (512, 512, 7)]
    expected = sum(cout * cin * 9 * hw * hw for cin, cout, hw in convs) + 4608 * 1024 + 1024 * 1024 + 1024 * 10
    assert bench.count_forward_macs(model, (3, 32, 32), torch.device("cpu")) == expected
    args = bench.argparse.Namespace(
        device="cpu", batch_sizes=[4], modes=["eager"], models=["binarynet", "float"], amp="none",
        channels_last="false", steps=1, warmup=1, filters=4, dense_units=16, matmul_size=64, threads=1,
    )
    rows = bench.run(args)
    assert [(r.model, r.batch) for r in rows] == [("binarynet", 4), ("float", 4)]
    assert all(r.images_per_s > 0 and r.bound_images_per_s > 0 for r in rows)
    table = bench.markdown(rows)
    assert table.count("\n") == 3 and "| binarynet | eager | 4 |" in table
