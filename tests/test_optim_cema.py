"""Tests of flipnet.optim.CEMA (Quist et al. 2023) against a plain reference implementation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flipnet.optim import CEMA
from flipnet.optim.schedules import HyperparamScheduler, Linear

from _optim_helpers import no_host_sync, step_with_meta_hyperparameters, train_split_and_resume

torch.set_num_threads(1)


def reference_cema(w, m, inertia, g, alpha, gamma):
    """One CEMA step written out: (new w, m, I, ambiguous mask)."""
    m = (1 - gamma) * m + gamma * g
    inertia = (1 - alpha) * inertia + alpha * m
    score = inertia * w
    ambiguous = score.abs() <= 1e-12 * (1 + inertia.abs().max())
    return torch.where(score > 0, -w, w), m, inertia, ambiguous


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    alpha=st.floats(0.0, 1.0),
    gamma=st.floats(1e-3, 1.0),
    steps=st.integers(1, 6),
)
def test_matches_reference_and_weight_is_minus_sign_of_inertia(seed, alpha, gamma, steps):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in ((5, 2), (3,))]
    opt = CEMA(params, alpha=alpha, gamma=gamma)
    ref_m = [torch.zeros_like(p) for p in params]
    ref_i = [torch.zeros_like(p) for p in params]
    for _ in range(steps):
        expected = []
        for k, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            w, ref_m[k], ref_i[k], amb = reference_cema(p.detach(), ref_m[k], ref_i[k], p.grad, alpha, gamma)
            expected.append((w, amb))
        opt.step()
        for k, p in enumerate(params):
            w = p.detach()
            assert set(w.unique().tolist()) <= {-1.0, 1.0}
            inertia = opt.state[p]["inertia"]
            torch.testing.assert_close(opt.state[p]["m"], ref_m[k], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(inertia, ref_i[k], rtol=1e-12, atol=1e-15)
            w_ref, amb = expected[k]
            assert torch.equal(w[~amb], w_ref[~amb])
            decided = (inertia != 0) & ~amb
            assert torch.equal(w[decided], -torch.sign(inertia[decided]))


def test_construction_sets_signs_with_zero_plus_one():
    p = torch.nn.Parameter(torch.tensor([0.0, -3.0, 0.2]))
    CEMA([p], alpha=0.1, gamma=0.1)
    assert p.detach().tolist() == [1.0, -1.0, 1.0]


def test_alpha_zero_freezes_the_weights():
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = CEMA([w], alpha=0.0, gamma=0.5)
    for _ in range(3):
        w.grad = torch.tensor([5.0, -5.0])
        opt.step()
    assert w.detach().tolist() == [1.0, -1.0]


def test_alpha_linear_decay_to_zero_in_one_line():
    w = torch.nn.Parameter(torch.ones(4))
    opt = CEMA([w], alpha=1e-2, gamma=0.1)
    sched = HyperparamScheduler(opt, "alpha", Linear(1e-2, 0.0, 4))
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["alpha"])
        w.grad = torch.randn(4)
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3, 0.0])


def test_step_does_not_sync_with_tensor_hyperparameters():
    w = torch.nn.Parameter(torch.ones(8))
    opt = CEMA([w], alpha=torch.tensor(0.1), gamma=torch.tensor(0.5))
    w.grad = torch.randn(8)
    opt.step()
    w.grad = torch.randn(8)
    with no_host_sync():
        opt.step()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": -0.1, "gamma": 0.1}, r"alpha must be in \[0, 1\]"),
        ({"alpha": 1.1, "gamma": 0.1}, r"alpha must be in \[0, 1\]"),
        ({"alpha": 0.1, "gamma": 0.0}, r"gamma must be in \(0, 1\]"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CEMA([torch.nn.Parameter(torch.ones(3))], **kwargs)


def test_hyperparameters_are_required():
    with pytest.raises(TypeError):
        CEMA([torch.nn.Parameter(torch.ones(3))])  # type: ignore[call-arg]


def test_parameter_in_two_groups_is_an_error():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="already in group 0"):
        CEMA([{"params": [p]}, {"params": [p]}], alpha=0.1, gamma=0.1)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), split=st.integers(1, 8))
def test_state_dict_round_trip_continues_identically(seed, split):
    torch.manual_seed(seed)
    grads = [torch.randn(6) for _ in range(9)]

    def make():
        w = torch.nn.Parameter(torch.ones(6))
        return w, CEMA([w], alpha=0.3, gamma=0.4)

    w_a, opt_a, w_c, opt_c = train_split_and_resume(make, grads, split)
    assert torch.equal(w_a.detach(), w_c.detach())
    assert torch.equal(opt_a.state[w_a]["inertia"], opt_c.state[w_c]["inertia"])


def test_tensor_hyperparameters_are_not_read_back_in_cpp():
    # torch._foreach_lerp_ takes one weight only as a Scalar: a tensor hyperparameter was .item()-ed in C++
    step_with_meta_hyperparameters(CEMA, alpha=0.1, gamma=0.1)
