"""Tests of flipnet.optim.Bop2ndOrder (Suarez-Ramirez et al. 2021) against a plain reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flipnet.optim import Bop2ndOrder

from _optim_helpers import no_host_sync, step_with_meta_hyperparameters, train_split_and_resume

torch.set_num_threads(1)


def reference_bop2(w, m, v, g, gamma, sigma, tau, unbiased):
    """One Bop2ndOrder step written out: (new w, m, v, ambiguous mask)."""
    m = (1 - gamma) * m + gamma * g
    v = (1 - sigma) * v + sigma * g * g
    if unbiased:
        score = w * (m / gamma) / (torch.sqrt(v / sigma) + 1e-10)
    else:
        score = w * m / (torch.sqrt(v) + 1e-10)
    ambiguous = (score - tau).abs() <= 1e-9 * (1 + abs(tau))
    return torch.where(score > tau, -w, w), m, v, ambiguous


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    gamma=st.floats(1e-6, 1.0),
    sigma=st.floats(1e-4, 1.0),
    tau=st.sampled_from([0.0, 1e-6, 1e-3, 0.1, 0.9]),
    unbiased=st.booleans(),
    steps=st.integers(1, 5),
)
def test_matches_reference_and_stays_binary(seed, gamma, sigma, tau, unbiased, steps):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (6,)]
    params = [
        torch.nn.Parameter(torch.where(torch.rand(s, generator=gen) < 0.5, -1.0, 1.0).double()) for s in shapes
    ]
    ref_m = [torch.zeros_like(p) for p in params]
    ref_v = [torch.zeros_like(p) for p in params]
    opt = Bop2ndOrder(params, gamma=gamma, sigma=sigma, threshold=tau, unbiased=unbiased)
    for _ in range(steps):
        expected = []
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-2
            w, ref_m[i], ref_v[i], amb = reference_bop2(p.detach(), ref_m[i], ref_v[i], p.grad, gamma, sigma, tau, unbiased)
            expected.append((w, amb))
        opt.step()
        for i, p in enumerate(params):
            assert set(p.detach().unique().tolist()) <= {-1.0, 1.0}
            torch.testing.assert_close(opt.state[p]["m"], ref_m[i], rtol=1e-12, atol=1e-18)
            torch.testing.assert_close(opt.state[p]["v"], ref_v[i], rtol=1e-12, atol=1e-18)
            w, amb = expected[i]
            assert torch.equal(p.detach()[~amb], w[~amb])


def test_unbiased_is_a_rescaled_threshold_when_v_dominates_eps():
    """(m/γ)/√(v/σ) = (m/√v)·√σ/γ: the unbiased rule at τ equals the biased rule at τ·γ/√σ."""
    torch.manual_seed(0)
    gamma, sigma, tau = 1e-2, 1e-1, 0.05
    grads = [torch.randn(50, dtype=torch.float64) for _ in range(6)]
    runs = []
    for unbiased, threshold in ((True, tau), (False, tau * gamma / math.sqrt(sigma))):
        w = torch.nn.Parameter(torch.ones(50, dtype=torch.float64))
        opt = Bop2ndOrder([w], gamma=gamma, sigma=sigma, threshold=threshold, unbiased=unbiased)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        runs.append(w.detach().clone())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], torch.ones(50, dtype=torch.float64))  # something flipped


def test_first_step_score_is_sign_agreement_times_rate_ratio():
    # m = γg, v = σg²: score = w·γg/(√σ|g| + ε) ≈ w·sign(g)·γ/√σ.
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64))
    opt = Bop2ndOrder([w], gamma=0.04, sigma=0.01, threshold=0.3)  # γ/√σ = 0.4 > 0.3
    w.grad = torch.tensor([2.0, -2.0, -5.0, 5.0], dtype=torch.float64)
    opt.step()
    assert w.detach().tolist() == [-1.0, 1.0, 1.0, -1.0]
    assert int(opt.flip_counts()[w]) == 2


def test_step_does_not_sync_with_tensor_hyperparameters():
    w = torch.nn.Parameter(torch.ones(8))
    opt = Bop2ndOrder(
        [w], gamma=torch.tensor(0.1), sigma=torch.tensor(0.1), threshold=torch.tensor(1e-3), unbiased=True
    )
    w.grad = torch.randn(8)
    opt.step()
    w.grad = torch.randn(8)
    with no_host_sync():
        opt.step()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gamma": 0.0}, r"gamma must be in \(0, 1\]"),
        ({"sigma": 0.0}, r"sigma must be in \(0, 1\]"),
        ({"sigma": 2.0}, r"sigma must be in \(0, 1\]"),
        ({"threshold": -1.0}, r"threshold must be in \[0, inf\)"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Bop2ndOrder([torch.nn.Parameter(torch.ones(3))], **kwargs)


def test_unbiased_must_be_bool():
    with pytest.raises(TypeError, match="unbiased"):
        Bop2ndOrder([torch.nn.Parameter(torch.ones(3))], unbiased="yes")


def test_parameter_in_two_groups_is_an_error():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="already in group 0"):
        Bop2ndOrder([{"params": [p]}, {"params": [p], "sigma": 0.5}])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), split=st.integers(1, 7))
def test_state_dict_round_trip_continues_identically(seed, split):
    torch.manual_seed(seed)
    grads = [torch.randn(3, 4) for _ in range(8)]

    def make():
        w = torch.nn.Parameter(torch.ones(3, 4))
        return w, Bop2ndOrder([w], gamma=0.1, sigma=0.2, threshold=0.05)

    w_a, opt_a, w_c, opt_c = train_split_and_resume(make, grads, split)
    assert torch.equal(w_a.detach(), w_c.detach())
    assert torch.equal(opt_a.state[w_a]["v"], opt_c.state[w_c]["v"])


@pytest.mark.parametrize("unbiased", [False, True])
def test_tensor_hyperparameters_are_not_read_back_in_cpp(unbiased):
    # torch._foreach_lerp_ takes one weight only as a Scalar: a tensor γ was .item()-ed in C++
    step_with_meta_hyperparameters(Bop2ndOrder, gamma=0.1, sigma=0.1, threshold=1e-3, unbiased=unbiased)
