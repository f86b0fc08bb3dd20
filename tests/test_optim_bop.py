"""Tests of flipnet.optim.Bop (Helwegen et al. 2019) against a plain reference implementation."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flipnet.optim import Bop

from _optim_helpers import no_host_sync, step_with_meta_hyperparameters, train_split_and_resume

torch.set_num_threads(1)


def reference_bop(w: torch.Tensor, m: torch.Tensor, g: torch.Tensor, gamma: float, tau: float):
    """One Bop step written out: returns (new w, new m, flip mask, ambiguous mask)."""
    m = (1 - gamma) * m + gamma * g
    score = w * m
    flip = score > tau
    ambiguous = (score - tau).abs() <= 1e-12 * (1 + abs(tau))  # rounding could decide these
    return torch.where(flip, -w, w), m, flip, ambiguous


def _signs(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    gamma=st.floats(1e-4, 1.0),
    tau=st.sampled_from([0.0, 1e-8, 1e-4, 1e-2, 0.3]),
    steps=st.integers(1, 6),
    scale=st.sampled_from([1e-3, 1e-1, 1.0]),
)
def test_matches_reference_and_stays_binary(seed, gamma, tau, steps, scale):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (2, 3, 2)]
    params = [torch.nn.Parameter(_signs(s, seed + i)) for i, s in enumerate(shapes)]
    ref_w = [p.detach().clone() for p in params]
    ref_m = [torch.zeros_like(p) for p in params]
    opt = Bop(params, gamma=gamma, threshold=tau)
    observed_flips = [0] * len(params)
    for _ in range(steps):
        ambiguous = []
        for i, p in enumerate(params):
            p.grad = scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)
            ref_w[i], ref_m[i], flip, amb = reference_bop(ref_w[i], ref_m[i], p.grad, gamma, tau)
            ambiguous.append(amb)
        before = [p.detach().clone() for p in params]
        opt.step()
        for i, p in enumerate(params):
            assert set(p.detach().unique().tolist()) <= {-1.0, 1.0}
            torch.testing.assert_close(opt.state[p]["m"], ref_m[i], rtol=1e-12, atol=1e-15)
            decided = ~ambiguous[i]
            assert torch.equal(p.detach()[decided], ref_w[i][decided])
            observed_flips[i] += int((p.detach() != before[i]).sum())
            ref_w[i] = p.detach().clone()  # carry on from the optimizer's weights
    counts = opt.flip_counts()
    assert [int(counts[p]) for p in params] == observed_flips
    assert opt.num_steps == steps


def test_binarises_at_construction_with_sign_zero_plus_one():
    p = torch.nn.Parameter(torch.tensor([-0.5, 0.0, 2.0, -0.0, 1e-30]))
    Bop([p])
    assert p.detach().tolist() == [-1.0, 1.0, 1.0, 1.0, 1.0]


def test_no_flip_below_threshold_and_flip_above():
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0]))
    opt = Bop([w], gamma=1.0, threshold=0.5)  # γ = 1: m = g
    w.grad = torch.tensor([0.6, 0.5, -0.6, 0.6, -3.0])
    opt.step()
    # w·m = [0.6, 0.5, 0.6, -0.6, -3.0]: only the strict excesses flip; the tie does not.
    assert w.detach().tolist() == [-1.0, 1.0, 1.0, -1.0, 1.0]
    assert int(opt.flip_counts()[w]) == 2


def test_zero_gradient_never_flips_even_with_zero_threshold():
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0, -1.0]))
    opt = Bop([w], gamma=0.1, threshold=0.0)
    for _ in range(3):
        w.grad = torch.zeros(3)
        opt.step()
    assert w.detach().tolist() == [1.0, -1.0, -1.0]


def test_per_group_hyperparameters():
    a = torch.nn.Parameter(torch.ones(4))
    b = torch.nn.Parameter(torch.ones(4))
    opt = Bop([{"params": [a], "gamma": 1.0}, {"params": [b]}], gamma=1e-3, threshold=0.1)
    a.grad = torch.full((4,), 0.5)
    b.grad = torch.full((4,), 0.5)
    opt.step()
    assert a.detach().tolist() == [-1.0] * 4  # m = 0.5 > 0.1
    assert b.detach().tolist() == [1.0] * 4  # m = 5e-4 < 0.1
    assert opt.param_groups[1]["gamma"] == 1e-3


def test_tensor_hyperparameters_match_floats():
    torch.manual_seed(0)
    grads = [torch.randn(6, 4) for _ in range(5)]
    results = []
    for hyper in ({"gamma": 0.3, "threshold": 0.05}, {"gamma": torch.tensor(0.3), "threshold": torch.tensor(0.05)}):
        w = torch.nn.Parameter(torch.ones(6, 4))
        opt = Bop([w], **hyper)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        results.append(w.detach().clone())
    assert torch.equal(results[0], results[1])


def test_step_does_not_sync_with_tensor_hyperparameters():
    w = torch.nn.Parameter(torch.ones(10))
    opt = Bop([w], gamma=torch.tensor(0.5), threshold=torch.tensor(0.01))
    w.grad = torch.randn(10)
    opt.step()  # creates state and scratch buffers
    w.grad = torch.randn(10)
    with no_host_sync():
        opt.step()
        opt.flip_counts()
        opt.reset_flip_counts()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gamma": 0.0}, r"gamma must be in \(0, 1\]"),
        ({"gamma": 1.5}, r"gamma must be in \(0, 1\]"),
        ({"gamma": float("nan")}, "gamma"),
        ({"threshold": -1e-3}, r"threshold must be in \[0, inf\)"),
        ({"threshold": torch.tensor(-1.0)}, "threshold"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Bop([torch.nn.Parameter(torch.ones(3))], **kwargs)


def test_bad_hyperparameter_types():
    with pytest.raises(TypeError, match="0-d"):
        Bop([torch.nn.Parameter(torch.ones(3))], gamma=torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="floating-point parameters"):
        Bop([torch.nn.Parameter(torch.ones(3, dtype=torch.int64), requires_grad=False)])


def test_bad_hyperparameter_in_added_group_is_rejected_before_changing_anything():
    a = torch.nn.Parameter(torch.ones(3))
    opt = Bop([a])
    b = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.0]))
    with pytest.raises(ValueError, match="threshold"):
        opt.add_param_group({"params": [b], "threshold": -1.0})
    assert len(opt.param_groups) == 1
    assert torch.equal(b.detach(), torch.tensor([0.3, -0.2, 0.0]))  # not binarised


def test_parameter_in_two_groups_is_an_error():
    p = torch.nn.Parameter(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"shape \(2, 3\) is already in group 0"):
        Bop([{"params": [p]}, {"params": [p]}])
    with pytest.raises(ValueError, match="already in this same group"):
        Bop([p, p])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), split=st.integers(1, 5))
def test_state_dict_round_trip_continues_identically(seed, split):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(4, 5, generator=gen) for _ in range(7)]

    def make():
        w = torch.nn.Parameter(_signs((4, 5), seed).float())
        return w, Bop([w], gamma=0.2, threshold=0.01)

    def through_file(w, state):
        buf = io.BytesIO()
        torch.save({"w": w, "opt": state}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        return saved["w"], copy.deepcopy(saved["opt"])

    w_a, opt_a, w_c, opt_c = train_split_and_resume(make, grads, split, transfer=through_file)
    assert torch.equal(w_a.detach(), w_c.detach())
    assert torch.equal(opt_a.state[w_a]["m"], opt_c.state[w_c]["m"])


def test_flip_counts_reset_and_parameters_without_gradient():
    a = torch.nn.Parameter(torch.ones(4))
    b = torch.nn.Parameter(torch.ones(3))
    opt = Bop([a, b], gamma=1.0, threshold=0.0)
    a.grad = torch.tensor([1.0, 1.0, -1.0, 1.0])
    opt.step()
    counts = opt.flip_counts()
    assert int(counts[a]) == 3 and int(counts[b]) == 0
    assert counts[a].dtype == torch.int64
    opt.reset_flip_counts()
    assert opt.num_steps == 0 and int(opt.flip_counts()[a]) == 0
    off = Bop([torch.nn.Parameter(torch.ones(2))], count_flips=False)
    off.param_groups[0]["params"][0].grad = torch.ones(2)
    off.step()
    assert int(off.flip_counts()[off.param_groups[0]["params"][0]]) == 0


def test_closure_is_evaluated_with_grad_enabled():
    w = torch.nn.Parameter(torch.ones(3))
    opt = Bop([w], gamma=1.0, threshold=0.0)
    x = torch.tensor([1.0, -2.0, 3.0])

    def closure():
        opt.zero_grad()
        loss = (w * x).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == 2.0
    assert w.detach().tolist() == [-1.0, 1.0, -1.0]


def test_channels_last_weights_match_contiguous_ones():
    torch.manual_seed(0)
    grads = [torch.randn(8, 4, 3, 3) for _ in range(4)]
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(1)
        w = torch.nn.Parameter(torch.randn(8, 4, 3, 3).contiguous(memory_format=fmt))
        small = torch.nn.Parameter(torch.randn(5))  # shares the scratch buffer
        opt = Bop([w, small], gamma=0.5, threshold=0.1)
        for g in grads:
            w.grad = g.contiguous(memory_format=fmt)
            small.grad = torch.ones(5)
            opt.step()
        assert w.is_contiguous(memory_format=fmt)
        results.append((w.detach().contiguous(), int(opt.flip_counts()[w])))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["bop", "bop2ndorder", "cema"])
def test_cuda_step_does_not_sync(name):
    from flipnet.optim import CEMA, Bop2ndOrder

    dev = torch.device("cuda")
    w = torch.nn.Parameter(torch.ones(64, 32, device=dev))
    hyper = lambda v: torch.tensor(v, device=dev)  # noqa: E731
    if name == "bop":
        opt = Bop([w], gamma=hyper(0.5), threshold=hyper(0.01))
    elif name == "bop2ndorder":
        opt = Bop2ndOrder([w], gamma=hyper(0.5), sigma=hyper(0.1), threshold=hyper(0.01), unbiased=True)
    else:
        opt = CEMA([w], alpha=hyper(0.1), gamma=hyper(0.5))
    w.grad = torch.randn(64, 32, device=dev)
    opt.step()  # state, counters and scratch buffers
    torch.cuda.synchronize()
    w.grad = torch.randn(64, 32, device=dev)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert set(w.detach().unique().tolist()) <= {-1.0, 1.0}


def test_tensor_hyperparameters_are_not_read_back_in_cpp():
    # torch._foreach_lerp_ takes one weight only as a Scalar: a tensor hyperparameter was .item()-ed in C++
    step_with_meta_hyperparameters(Bop, gamma=0.1, threshold=1e-3)


def test_nan_scores_never_flip_and_a_negative_zero_threshold_acts_as_zero():
    # the rule w·m > τ is applied with arithmetic (r = τ − w·m, flip where r < 0): check its edges
    nan = torch.tensor(float("nan"))
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0]))
    opt = Bop([w], gamma=1.0, threshold=-0.0)  # γ = 1: m = g
    w.grad = torch.stack([nan, -nan, torch.tensor(0.0), torch.tensor(-0.0),
                          torch.tensor(3e38), torch.tensor(-3e38), torch.tensor(1e-45)])
    opt.step()
    assert w.detach().tolist() == [1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -1.0]  # huge and subnormal scores flip
    assert int(opt.flip_counts()[w]) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_flip_counts_are_exact_in_every_dtype(dtype):
    n = 3001  # more flips than bf16 and fp16 hold exactly
    w = torch.nn.Parameter(torch.ones(n, dtype=dtype))
    opt = Bop([w], gamma=1.0, threshold=0.0)
    w.grad = torch.ones(n, dtype=dtype)
    w.grad[::3] = -1.0
    opt.step()
    assert int(opt.flip_counts()[w]) == n - len(range(0, n, 3)) == int((w.detach() == -1).sum())


@pytest.mark.slow
def test_flip_count_of_a_tensor_above_two_to_the_24_is_exact():
    n = 2**24 + 3  # float32 sums of ±1 stop being exact here; the count is summed in slices
    w = torch.nn.Parameter(torch.ones(n))
    opt = Bop([w], gamma=1.0, threshold=0.0)
    w.grad = torch.ones(n)
    w.grad[:5] = -1.0
    opt.step()
    assert int(opt.flip_counts()[w]) == n - 5
