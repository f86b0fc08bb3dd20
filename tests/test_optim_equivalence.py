r"""Latent-weight SGD (momentum μ, decoupled weight decay λ, learning rate η) and CEMA with
α = ηλ, γ = 1 − μ train the same binary network: the binary weights agree at every step.

Derivation in docs/optimizers.md: with v the SGD momentum buffer and w the latent weight,
m = (1 − μ)·v and I = −(αγ/η)·w, so sign(w) = −sign(I) is CEMA's binary weight.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import flipnet
from flipnet.layers import BinaryLinear
from flipnet.optim import CEMA
from flipnet.quantizers import SteSign, sign

torch.set_num_threads(1)


def bnn(weight_mode: str) -> nn.Sequential:
    """A small BNN in float64; pure STE (no clipping) so d loss/d latent = d loss/d binary."""
    model = nn.Sequential(
        BinaryLinear(10, 16, weight_quantizer=SteSign(clip_value=None), weight_mode=weight_mode),
        nn.BatchNorm1d(16, affine=False),
        BinaryLinear(16, 16, input_quantizer="ste_sign", weight_quantizer=SteSign(clip_value=None),
                     weight_mode=weight_mode),
        nn.BatchNorm1d(16, affine=False),
        BinaryLinear(16, 3, input_quantizer="ste_sign", weight_quantizer=SteSign(clip_value=None),
                     weight_mode=weight_mode),
    ).double()
    with torch.no_grad():
        for p in flipnet.binary_parameters(model):
            p.zero_()  # latent weights start at 0; sign(0) = +1 is the flip model's start
    return model


def run_both(seed: int, lr: float, momentum: float, weight_decay: float, steps: int) -> int:
    """Train both ways; assert agreement at every step; return the number of sign changes seen."""
    latent, flip = bnn("latent"), bnn("flip")
    sgd = torch.optim.SGD(flipnet.binary_parameters(latent), lr=lr, momentum=momentum)
    alpha, gamma = lr * weight_decay, 1.0 - momentum
    cema = CEMA(flipnet.binary_parameters(flip), alpha=alpha, gamma=gamma)
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.randn(64, 10, generator=gen, dtype=torch.float64)
    y_all = (x_all[:, :3].argmax(dim=1) + (x_all[:, 3] > 1).long()) % 3
    changes = 0
    previous = [torch.ones_like(p) for p in flipnet.binary_parameters(flip)]
    for step in range(steps):
        idx = torch.randint(0, 64, (16,), generator=gen)
        x, y = x_all[idx], y_all[idx]
        for model, opt in ((latent, sgd), (flip, cema)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():  # decoupled weight decay: w ← (1 − ηλ)·w, then SGD's w ← w − η·v
            for w in flipnet.binary_parameters(latent):
                w.mul_(1.0 - lr * weight_decay)
        sgd.step()
        cema.step()
        for w_lat, w_bin, before in zip(flipnet.binary_parameters(latent), flipnet.binary_parameters(flip), previous):
            assert torch.equal(sign(w_lat.detach()), w_bin.detach()), f"binary weights differ at step {step}"
            # with μ = 0 torch keeps no buffer: v = g
            state = cema.state[w_bin]
            mom = sgd.state[w_lat].get("momentum_buffer", w_lat.grad) if momentum else w_lat.grad
            torch.testing.assert_close(state["m"], gamma * mom, rtol=1e-9, atol=1e-13)
            torch.testing.assert_close(state["inertia"], -(alpha * gamma / lr) * w_lat.detach(), rtol=1e-9, atol=1e-13)
            changes += int((w_bin.detach() != before).sum())
        previous = [p.detach().clone() for p in flipnet.binary_parameters(flip)]
    assert sum(int(c) for c in cema.flip_counts().values()) == changes
    return changes


@pytest.mark.parametrize(
    "lr, momentum, weight_decay",
    [(0.1, 0.9, 5e-2), (0.5, 0.0, 1e-1), (0.05, 0.99, 1.0)],
)
def test_cema_equals_latent_sgd_with_decoupled_decay(lr, momentum, weight_decay):
    changes = run_both(seed=0, lr=lr, momentum=momentum, weight_decay=weight_decay, steps=30)
    assert changes > 0  # the check is not vacuous: weights did flip


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    lr=st.floats(1e-3, 1.0),
    momentum=st.floats(0.0, 0.99),
    weight_decay=st.floats(1e-4, 0.9),
)
def test_cema_equals_latent_sgd_property(seed, lr, momentum, weight_decay):
    run_both(seed=seed, lr=lr, momentum=momentum, weight_decay=weight_decay, steps=12)
