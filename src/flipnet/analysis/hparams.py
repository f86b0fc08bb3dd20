r"""Latent-weight hyperparameters seen as a flip filter: the analysis of Quist et al. 2023 as functions.

Reference: Joris Quist, Yunqiang Li and Jan van Gemert, "Understanding weight-magnitude
hyperparameters in training binary networks", ICLR 2023. A binary weight is ``sign(w)`` of its
latent weight ``w``, so only the sign of ``w`` matters; ``w`` is a linear filter of the gradients
(for SGD), and a filter is defined by its poles up to a positive gain. This module computes that
filter from latent-weight hyperparameters, the reverse, the filter's responses and memory, and
the hyperparameter rescalings that leave every binary weight unchanged. ``flipnet hparams`` is its
command line; ``docs/optimizers.md`` walks through the paper's own settings.

The filters (``g`` the gradient of the binary weight, STE without clipping)
-----------------------------------------------------------------------------

SGD with momentum :math:`\mu`, learning rate :math:`\eta` and **decoupled** weight decay
:math:`\lambda` (``w ← (1-ηλ) w − η v``, ``v ← μ v + g``) is exactly CEMA with

.. math:: \alpha = \eta\lambda, \qquad \gamma = 1 - \mu, \qquad I = -\lambda(1-\mu)\, w

(derivation in ``docs/optimizers.md``; the initial inertia is :math:`I_0 = -\lambda(1-\mu) w_0`).
A learning-rate schedule :math:`\eta_t` is an :math:`\alpha_t = \eta_t\lambda` schedule.

SGD with **coupled** (L2) weight decay, torch's ``SGD(weight_decay=λ)``
(``v ← μ v + g + λ w``, ``w ← w − η v``) is the second-order filter
:math:`w_t = (1 + \mu - \eta\lambda) w_{t-1} - \mu w_{t-2} - \eta g_t` with poles the roots
:math:`p_{1,2}` of :math:`z^2 - (1+\mu-\eta\lambda) z + \mu`. When they are real and in
:math:`(0, 1)` it is CEMA with :math:`\{1-\gamma, 1-\alpha\} = \{p_1, p_2\}` (the two EMAs commute;
the faster pole is called momentum) and :math:`I = -(\alpha\gamma/\eta) w`, exactly, from
:math:`w_0 = 0`. Complex poles (an underdamped filter) have no CEMA equivalent.

Adam with decoupled decay (AdamW) updates ``w ← (1-ηλ) w − η u`` with Adam's normalised
step :math:`u_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon)`: the latent weight is an
:math:`\alpha = \eta\lambda` EMA of :math:`-u` — CEMA's inertia filter applied to Adam's
normalised momentum (:math:`\beta_1` plays :math:`1-\gamma`), not to the raw gradient. Adam with
coupled L2 decay puts :math:`\lambda w` into both moments: no linear filter. Without decay
(:math:`\lambda = 0`, e.g. ReActNet's step 2) :math:`\alpha = 0`: the latent weight integrates every
step since initialisation, and a weight flips once the accumulated normalised steps exceed
:math:`|w_0| / \eta` — the initial magnitude over the learning rate is a *flip threshold in
steps* (each :math:`|u| \lesssim 1`).

Redundancy
----------
For all four optimizers, scaling the learning rate, the latent initialisation (and any latent
clip value, including the STE's gradient clip) by :math:`c > 0` while dividing the weight decay by
:math:`c` multiplies every latent weight by :math:`c` at every step and leaves every binary weight
— hence every gradient and every real parameter — unchanged (:func:`rescaled`; checked by
training in ``tests/test_hparams.py``). So of (learning rate, weight decay, initial scale) only
two numbers matter: :math:`\eta\lambda` and :math:`w_0/\eta` (for SGD :math:`w_0 \lambda(1-\mu)`,
the initial inertia). For SGD the gradient (loss) scale is one more: scaling the loss by
:math:`k` equals scaling :math:`\eta` by :math:`k` — it is absorbed the same way. Adam is
invariant to the loss scale by itself (up to :math:`\epsilon`), which is why Adam needs no
learning-rate retuning when the loss is rescaled, but then its :math:`\eta` sets the flip
threshold :math:`|w_0|/\eta`.
"""

from __future__ import annotations

import cmath
import math
import os
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from flipnet.errors import ConfigError

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "LatentHparams",
    "FlipFilter",
    "Memory",
    "lr_at",
    "flip_filter",
    "latent_from_cema",
    "impulse_response",
    "frequency_response",
    "memory",
    "rescaled",
    "redundancy_notes",
    "report",
    "plot_filter",
    "hparams_from_recipe",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine", "step")


@dataclass(frozen=True)
class LatentHparams:
    """Hyperparameters of latent-weight training of binary weights.

    Attributes:
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: initial learning rate :math:`\\eta_0`.
        momentum: SGD momentum :math:`\\mu`, or Adam's :math:`\\beta_1`.
        weight_decay: :math:`\\lambda`.
        decoupled: decoupled decay (SGDW / AdamW: ``w ← (1-ηλ)w``) instead of L2 in the gradient
            (torch's ``SGD``/``Adam`` ``weight_decay``).
        init_scale: magnitude of the initial latent weights :math:`|w_0|` (0: start at 0).
        schedule: learning-rate schedule: ``constant``, ``linear`` (to ``end_lr``), ``cosine``
            (to ``end_lr``) or ``step`` (× ``step_factor`` every ``step_every`` steps).
        end_lr: final learning rate of ``linear``/``cosine`` (default 0).
        step_factor, step_every: of ``step``.
        steps: total optimizer steps.
        steps_per_epoch: for memory in epochs (``None``: not reported).
        beta2: Adam's :math:`\\beta_2` (reported only).
    """

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    decoupled: bool = True
    init_scale: float = 0.0
    schedule: str = "constant"
    end_lr: float = 0.0
    step_factor: float = 0.1
    step_every: int = 1
    steps: int = 1
    steps_per_epoch: int | None = None
    beta2: float = 0.999

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        checks: list[tuple[str, float, bool]] = [
            ("lr", self.lr, self.lr > 0),
            ("momentum", self.momentum, 0 <= self.momentum < 1),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0),
            ("init_scale", self.init_scale, self.init_scale >= 0),
            ("end_lr", self.end_lr, self.end_lr >= 0),
            ("step_factor", self.step_factor, self.step_factor > 0),
            ("beta2", self.beta2, 0 <= self.beta2 < 1),
        ]
        for name, value, ok in checks:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
                raise ConfigError(f"{name} is out of range: {value!r}")
        for name, n in (("steps", self.steps), ("step_every", self.step_every)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"{name} must be a positive integer, got {n!r}")
        if self.steps_per_epoch is not None and (not isinstance(self.steps_per_epoch, int) or self.steps_per_epoch < 1):
            raise ConfigError(f"steps_per_epoch must be a positive integer or None, got {self.steps_per_epoch!r}")
        if self.weight_decay > 0 and self.decoupled and self.lr * self.weight_decay > 1:
            raise ConfigError(f"lr * weight_decay = {self.lr * self.weight_decay:g} > 1: decoupled decay would flip the latent weight's sign")


def lr_at(h: LatentHparams, step: int | np.ndarray) -> np.ndarray:
    """Learning rate used at optimizer step ``step`` (0-based), as flipnet's schedules compute it.

    ``linear``/``cosine`` go from ``lr`` at step 0 to ``end_lr`` at step ``steps``.
    """
    t = np.asarray(step, dtype=np.float64)
    if h.schedule == "constant":
        return np.full_like(t, h.lr)
    frac = np.clip(t / h.steps, 0.0, 1.0)
    if h.schedule == "linear":
        return h.lr + (h.end_lr - h.lr) * frac
    if h.schedule == "cosine":
        return h.end_lr + (h.lr - h.end_lr) * 0.5 * (1 + np.cos(np.pi * frac))
    return h.lr * h.step_factor ** np.floor(t / h.step_every)


# ---------------------------------------------------------------------------------------------
# the filter


@dataclass(frozen=True)
class FlipFilter:
    """The flip filter of a latent-weight set-up: CEMA's α (a schedule) and γ, and how exact it is.

    Attributes:
        kind: ``"cema"`` (exactly CEMA on the gradient), ``"normalised_cema"`` (CEMA's inertia on
            Adam's normalised step), ``"integrator"`` (α = 0: no decay), ``"underdamped"`` (no
            CEMA equivalent: complex poles) or ``"nonlinear"`` (Adam with L2 decay).
        alpha: α at step 0 (None when there is none).
        gamma: γ (None when there is none).
        alpha_of_step: α as a function of the step (vectorised), or None.
        initial_inertia: CEMA's :math:`I_0` per unit of :math:`w_0` sign, for SGD (``-λ(1-μ)|w_0|``
            in magnitude), or None.
        poles: the filter's poles.
        notes: sentences that qualify the mapping.
    """

    kind: str
    alpha: float | None
    gamma: float | None
    alpha_of_step: Callable[[np.ndarray], np.ndarray] | None = None
    initial_inertia: float | None = None
    poles: tuple[complex, ...] = ()
    notes: tuple[str, ...] = ()


def flip_filter(h: LatentHparams) -> FlipFilter:
    """The flip filter equivalent to ``h`` (see the module docstring for every case)."""
    lam, mu = h.weight_decay, h.momentum
    if h.optimizer == "sgd":
        if h.decoupled or lam == 0:
            alpha0 = h.lr * lam
            gamma = 1.0 - mu
            notes = ["exact: same binary weights as CEMA step by step (STE without clipping, same gradients)"]
            if lam == 0:
                notes.append("no weight decay: alpha = 0, the inertia never forgets (latent SGD without decay)")
            if h.schedule != "constant" and lam > 0:
                notes.append(f"alpha follows the learning-rate schedule: alpha_t = lr_t * {lam:g}")
            return FlipFilter(
                kind="cema" if lam > 0 else "integrator", alpha=alpha0, gamma=gamma,
                alpha_of_step=lambda t: lr_at(h, t) * lam, initial_inertia=lam * (1 - mu) * h.init_scale,
                poles=(complex(1 - gamma), complex(1 - alpha0)), notes=tuple(notes),
            )
        # coupled L2: poles of z^2 - (1 + mu - eta*lam) z + mu
        b = 1 + mu - h.lr * lam
        disc = b * b - 4 * mu
        root = cmath.sqrt(disc)
        p1, p2 = (b + root) / 2, (b - root) / 2
        if disc < 0 or not (0 < p2.real and p1.real < 1):
            why = (f"complex poles |p| = {abs(p1):.6g}" if disc < 0 else
                   f"a pole at {p2.real:.6g}, outside (0, 1) (lr*wd > (1 + sqrt(momentum))^2: the latent weight changes sign every step)")
            return FlipFilter(
                kind="underdamped", alpha=None, gamma=None, poles=(p1, p2),
                notes=(f"coupled weight decay gives {why}: an oscillating filter with no CEMA equivalent",),
            )
        slow, fast = max(p1.real, p2.real), min(p1.real, p2.real)
        gamma, alpha0 = 1 - fast, 1 - slow

        def alpha_of_step(t: np.ndarray) -> np.ndarray:
            bt = 1 + mu - lr_at(h, t) * lam
            return 1 - (bt + np.sqrt(np.maximum(bt * bt - 4 * mu, 0.0))) / 2

        return FlipFilter(
            kind="cema", alpha=alpha0, gamma=gamma, alpha_of_step=alpha_of_step, poles=(p1, p2),
            notes=("exact from w0 = 0 (coupled L2 decay enters the momentum, so both poles move with eta*lambda)",
                   f"decoupled approximation: alpha ~ lr*wd/(1-momentum) = {h.lr * lam / max(1 - mu, 1e-300):.6g}"),
        )
    # Adam
    if lam == 0:
        return FlipFilter(
            kind="integrator", alpha=0.0, gamma=1 - mu, alpha_of_step=lambda t: np.zeros_like(np.asarray(t, float)),
            notes=("no weight decay: the latent weight sums Adam's normalised steps since initialisation",
                   f"flip threshold |w0|/lr = {h.init_scale / h.lr:.6g} steps of size <= ~1"),
        )
    if h.decoupled:
        return FlipFilter(
            kind="normalised_cema", alpha=h.lr * lam, gamma=1 - mu, alpha_of_step=lambda t: lr_at(h, t) * lam,
            notes=("AdamW: alpha = lr*wd is exact for the inertia of Adam's normalised step m/(sqrt(v)+eps); "
                   "gamma = 1 - beta1 filters the raw gradient before the normalisation",),
        )
    return FlipFilter(
        kind="nonlinear", alpha=None, gamma=None,
        notes=("Adam with L2 decay puts wd*w into both moments: the normalisation makes it no linear filter; "
               f"its decay per step is of order lr*wd/sqrt(v) — use AdamW (decoupled) to get alpha = lr*wd",),
    )


def latent_from_cema(alpha: float, gamma: float, *, lr: float = 1.0, initial_inertia: float = 0.0) -> LatentHparams:
    """SGD (decoupled decay) hyperparameters with the flip filter CEMA(α, γ): the reverse mapping.

    The learning rate is free (one of the redundant magnitudes): ``momentum = 1 - γ``,
    ``weight_decay = α / lr``, ``init_scale = |I_0| / (weight_decay · γ)``.
    """
    for name, v, ok in (("alpha", alpha, 0 <= alpha <= 1), ("gamma", gamma, 0 < gamma <= 1), ("lr", lr, lr > 0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok:
            raise ConfigError(f"{name} is out of range: {v!r}")
    wd = alpha / lr
    init = abs(initial_inertia) / (wd * gamma) if initial_inertia and wd > 0 else 0.0
    return LatentHparams(optimizer="sgd", lr=float(lr), momentum=1.0 - gamma, weight_decay=wd, decoupled=True, init_scale=init)


def impulse_response(alpha: float, gamma: float, n: int) -> np.ndarray:
    r"""The first ``n`` taps of CEMA's (unit-gain) filter from gradient to inertia.

    :math:`h_k = \alpha\gamma \sum_{j=0}^{k} (1-\gamma)^j (1-\alpha)^{k-j}`; :math:`\sum_k h_k = 1`
    for :math:`\alpha > 0`.
    """
    a, b = 1.0 - gamma, 1.0 - alpha
    k = np.arange(n, dtype=np.float64)
    if abs(a - b) < 1e-12:
        return alpha * gamma * (k + 1) * a**k
    return alpha * gamma * (a ** (k + 1) - b ** (k + 1)) / (a - b)


def frequency_response(alpha: float, gamma: float, omega: np.ndarray) -> np.ndarray:
    r"""CEMA's transfer function on the unit circle, :math:`H(e^{i\omega}) = \alpha\gamma / ((1 - (1-\gamma)e^{-i\omega})(1 - (1-\alpha)e^{-i\omega}))`."""
    z1 = np.exp(-1j * np.asarray(omega, dtype=np.float64))
    return alpha * gamma / ((1 - (1 - gamma) * z1) * (1 - (1 - alpha) * z1))


@dataclass(frozen=True)
class Memory:
    """How far back a flip filter looks, in optimizer steps (and epochs when known).

    Attributes: ``mean_lag`` (centre of mass of the impulse response, :math:`(1-\\alpha)/\\alpha +
    (1-\\gamma)/\\gamma`), ``tau_alpha`` = 1/α and ``tau_gamma`` = 1/γ (time constants),
    ``span95`` (steps holding 95 % of the response), and the same in epochs (``None`` without
    ``steps_per_epoch``). ``inf`` for α = 0.
    """

    mean_lag: float
    tau_alpha: float
    tau_gamma: float
    span95: float
    steps_per_epoch: int | None = None

    def epochs(self, steps: float) -> float | None:
        """``steps`` in epochs (None without ``steps_per_epoch``)."""
        return None if self.steps_per_epoch is None else steps / self.steps_per_epoch


def _tail(alpha: float, gamma: float, k: float) -> float:
    """1 − (sum of the first k+1 taps): the weight of the response older than k steps."""
    a, b = 1.0 - gamma, 1.0 - alpha
    if abs(a - b) < 1e-12:
        b = a * (1 - 1e-9)
    return alpha * gamma / (a - b) * (a ** (k + 2) / gamma - b ** (k + 2) / alpha)


def memory(alpha: float, gamma: float, steps_per_epoch: int | None = None) -> Memory:
    """The :class:`Memory` of CEMA(α, γ)."""
    if alpha <= 0:
        return Memory(math.inf, math.inf, 1.0 / gamma, math.inf, steps_per_epoch)
    lo, hi = 0.0, 1.0
    while _tail(alpha, gamma, hi) > 0.05:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _tail(alpha, gamma, mid) > 0.05 else (lo, mid)
        if hi - lo < 1e-6 * max(hi, 1):
            break
    return Memory((1 - alpha) / alpha + (1 - gamma) / gamma, 1.0 / alpha, 1.0 / gamma, hi, steps_per_epoch)


# ---------------------------------------------------------------------------------------------
# redundancy


def rescaled(h: LatentHparams, c: float) -> LatentHparams:
    """``h`` with learning rates and latent init × ``c`` and weight decay ÷ ``c``: the same binary weights.

    (Also multiply any latent clip value, and the STE's gradient clip, by ``c``.)
    """
    if not (isinstance(c, (int, float)) and c > 0 and math.isfinite(c)):
        raise ConfigError(f"the scale c must be a positive number, got {c!r}")
    return replace(h, lr=h.lr * c, end_lr=h.end_lr * c, init_scale=h.init_scale * c, weight_decay=h.weight_decay / c)


def redundancy_notes(h: LatentHparams) -> list[str]:
    """Which magnitude hyperparameters of ``h`` do not change a single binary weight."""
    c = 10.0
    r = rescaled(h, c)
    out = [
        f"lr x c, init x c, weight decay / c (and latent/STE clip x c) leaves every binary weight unchanged; e.g. c = {c:g}: "
        f"lr {r.lr:g}, init {r.init_scale:g}, weight decay {r.weight_decay:g}",
        "so only two of (lr, weight decay, init scale) matter: lr*wd and init/lr",
    ]
    if h.optimizer == "sgd":
        out.append("SGD: the loss (gradient) scale is one more redundant magnitude: loss x k = lr x k")
        if h.init_scale == 0:
            out.append("init 0: lr alone is redundant given lr*wd (every lr with the same lr*wd trains the same binary weights)")
    else:
        out.append("Adam: the loss scale is irrelevant by itself (normalised steps, up to eps); lr sets the flip threshold init/lr")
        if h.weight_decay == 0:
            out.append(f"no decay: only init/lr = {h.init_scale / h.lr:g} (steps to overcome the initial magnitude) matters, "
                       "plus the lr schedule's shape")
    return out


# ---------------------------------------------------------------------------------------------
# text and plots


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.6g}"


def _sample_steps(h: LatentHparams) -> list[int]:
    return sorted({0, h.steps // 4, h.steps // 2, (3 * h.steps) // 4, max(h.steps - 1, 0)})


def report(h: LatentHparams) -> str:
    """The text ``flipnet hparams`` prints for ``h``."""
    f = flip_filter(h)
    lines = ["latent-weight hyperparameters:"]
    decay = "decoupled" if h.decoupled else "coupled (L2)"
    mom = "momentum" if h.optimizer == "sgd" else "beta1"
    sched = h.schedule
    if h.schedule in ("linear", "cosine"):
        sched += f" to {_fmt(h.end_lr)}"
    elif h.schedule == "step":
        sched += f" x{_fmt(h.step_factor)} every {h.step_every} steps"
    epochs = "" if h.steps_per_epoch is None else f" ({h.steps / h.steps_per_epoch:.6g} epochs of {h.steps_per_epoch})"
    lines.append(f"  {h.optimizer}  lr {_fmt(h.lr)} ({sched})  {mom} {_fmt(h.momentum)}  weight decay {_fmt(h.weight_decay)} "
                 f"{decay}  init |w0| {_fmt(h.init_scale)}  steps {h.steps}{epochs}")
    lines.append("")
    lines.append(f"equivalent flip filter: {f.kind}")
    lines.append(f"  CEMA alpha {_fmt(f.alpha)}  gamma {_fmt(f.gamma)}")
    if f.initial_inertia:
        lines.append(f"  initial inertia |I0| = wd*(1-momentum)*|w0| = {_fmt(f.initial_inertia)}")
    for note in f.notes:
        lines.append(f"  note: {note}")
    if f.alpha_of_step is not None and f.alpha is not None:
        lines.append("  alpha schedule:")
        for s in _sample_steps(h):
            a = float(np.asarray(f.alpha_of_step(np.array([s], dtype=np.float64)))[0])
            ep = "" if h.steps_per_epoch is None else f" (epoch {s / h.steps_per_epoch:.4g})"
            lines.append(f"    step {s:>10d}{ep}: alpha {_fmt(a)}  lr {_fmt(float(lr_at(h, s)))}")
    if f.alpha is not None and f.gamma is not None:
        m = memory(f.alpha, f.gamma, h.steps_per_epoch)
        lines.append("")
        lines.append("effective memory at step 0:")
        for label, v in (("mean lag", m.mean_lag), ("1/alpha", m.tau_alpha), ("1/gamma", m.tau_gamma), ("95% of the weight within", m.span95)):
            ep = m.epochs(v)
            lines.append(f"  {label}: {_fmt(v)} steps" + ("" if ep is None else f" = {_fmt(ep)} epochs"))
        if f.kind == "cema" and f.alpha > 0:
            lines.append("")
            lines.append("as a flipnet recipe:")
            lines.append(f"  optim: {{binary: cema, binary_kwargs: {{alpha: {f.alpha:.6g}, gamma: {f.gamma:.6g}}}}}")
            if h.schedule in ("linear", "cosine"):
                assert f.alpha_of_step is not None
                end = float(np.asarray(f.alpha_of_step(np.array([float(h.steps)])))[0])
                end = 0.0 if abs(end) < 1e-9 * f.alpha else end  # rounding noise of the pole formula
                approx = "" if h.decoupled else "   # approximately: with coupled decay alpha_t is not exactly this shape"
                lines.append(f"  schedules: [{{key: alpha, route: binary, type: {h.schedule}, end: {end:.6g}, unit: step}}]{approx}")
            elif h.schedule == "step":
                lines.append(f"  schedules: [{{key: alpha, route: binary, type: step, factor: {h.step_factor:g}, every: {h.step_every}, unit: step}}]"
                             + ("" if h.decoupled else "   # approximately (coupled decay)"))
    lines.append("")
    lines.append("redundant magnitude hyperparameters:")
    for note in redundancy_notes(h):
        lines.append(f"  - {note}")
    return "\n".join(lines)


PLOT_SUFFIXES: tuple[str, ...] = ("_impulse.png", "_frequency.png", "_memory.png")


def plot_paths(prefix: str) -> list[str]:
    """The files :func:`plot_filter` writes for ``prefix``."""
    return [f"{prefix}{suffix}" for suffix in PLOT_SUFFIXES]


def check_plottable(h: LatentHparams, prefix: str | None = None, *, overwrite: bool = False) -> None:
    """Raise :class:`~flipnet.errors.ConfigError` when :func:`plot_filter` would refuse ``h``
    (no filter with α > 0), or when one of its files exists and ``overwrite`` is false."""
    f = flip_filter(h)
    if f.alpha is None or f.gamma is None or not f.alpha > 0:
        why = "no weight decay gives alpha = 0, an integrator" if f.kind == "integrator" else f"{f.kind} filter"
        raise ConfigError(f"no CEMA filter to plot for this set-up ({why}); leave out --out")
    if prefix is not None and not overwrite:
        existing = [q for q in plot_paths(prefix) if os.path.lexists(q)]
        if existing:
            raise ConfigError(f"{existing[0]} already exists; pass --force to replace it, or choose another --out prefix")


def plot_filter(h: LatentHparams, prefix: str, *, title: str | None = None, overwrite: bool = False) -> list[str]:
    """Draw ``PREFIX_impulse.png``, ``PREFIX_frequency.png`` and ``PREFIX_memory.png``; return the paths.

    Impulse response (log-log), magnitude frequency response, and the effective memory over
    training (1/α_t and the 95 % span, in epochs when known). Needs a filter with α > 0 and γ.
    An existing file is an error (nothing is written) unless ``overwrite`` is true.
    """
    check_plottable(h, prefix, overwrite=overwrite)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    f = flip_filter(h)
    assert f.alpha is not None and f.gamma is not None
    import textwrap

    name = title or f"{h.optimizer} lr {h.lr:g} wd {h.weight_decay:g} mom {h.momentum:g}"

    def heading(what: str) -> str:
        return "\n".join(textwrap.wrap(f"{what}: {name}", 70))
    out = Path(prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    spe = h.steps_per_epoch
    m = memory(f.alpha, f.gamma, spe)

    n = int(min(max(4 * m.span95, 10), 5e7))
    k = np.unique(np.geomspace(1, n, 2000).astype(np.int64)) - 1
    fig, ax = plt.subplots(figsize=(6, 4))
    taps = impulse_response(f.alpha, f.gamma, int(k[-1]) + 1)[k]
    ax.loglog(k + 1, taps, label=f"alpha {f.alpha:.3g}, gamma {f.gamma:.3g}")
    ax.axvline(m.mean_lag + 1, color="gray", ls="--", lw=1, label=f"mean lag {m.mean_lag:.3g} steps")
    ax.axvline(m.span95 + 1, color="gray", ls=":", lw=1, label=f"95% within {m.span95:.3g} steps")
    ax.set_xlabel("steps back (k + 1)")
    ax.set_ylabel("weight of the gradient k steps ago")
    ax.set_title(heading("impulse response"), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    p = f"{out}_impulse.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    w = np.geomspace(min(f.alpha, f.gamma) / 100, np.pi, 2000)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(w / (2 * np.pi), np.abs(frequency_response(f.alpha, f.gamma, w)))
    for rate, label in ((f.alpha, "alpha"), (f.gamma, "gamma")):
        ax.axvline(rate / (2 * np.pi), color="gray", ls="--", lw=1)
        ax.text(rate / (2 * np.pi), 1e-3, f" {label}", fontsize=8, color="gray")
    ax.set_xlabel("frequency (cycles per step)" + ("" if spe is None else f"; 1 epoch = {spe} steps"))
    ax.set_ylabel("|H|  (gain from gradient to inertia)")
    ax.set_title(heading("frequency response"), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    p = f"{out}_frequency.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    steps = np.linspace(0, h.steps - 1, 400)
    assert f.alpha_of_step is not None
    alphas = np.asarray(f.alpha_of_step(steps), dtype=np.float64)
    spans = np.array([memory(a, f.gamma).span95 if a > 0 else np.inf for a in alphas])
    unit, scale = ("epochs", float(spe)) if spe else ("steps", 1.0)
    fig, ax = plt.subplots(figsize=(6, 4))
    x = steps / scale
    with np.errstate(divide="ignore"):
        ax.semilogy(x, np.where(alphas > 0, 1 / np.maximum(alphas, 1e-300), np.inf) / scale, label="1/alpha")
    ax.semilogy(x, spans / scale, label="95% span")
    ax.semilogy(x[1:], x[1:], color="gray", ls=":", lw=1, label="training so far")
    ax.set_xlabel(f"training progress ({unit})")
    ax.set_ylabel(f"memory ({unit})")
    ax.set_title(heading("effective memory during training"), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    p = f"{out}_memory.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths



# ---------------------------------------------------------------------------------------------
# recipes


def _recipe_train_size(config: object, train_size: int | None) -> int:
    if train_size is not None:
        if isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1:
            raise ConfigError(f"train size must be a positive integer, got {train_size!r}")
        return train_size
    data = config.data  # type: ignore[attr-defined]
    if data.subset is None:
        raise ConfigError(
            f"the recipe trains on all of {data.name!r}; give its number of training examples with --train-size "
            "(after the validation split) so that steps per epoch are known"
        )
    from flipnet.data.base import resolve_val_size

    return data.subset - resolve_val_size(data.val_size, data.subset, data.name)


def hparams_from_recipe(config: object, *, train_size: int | None = None, init_scale: float = 0.0) -> LatentHparams:
    """The :class:`LatentHparams` of a recipe's binary route (a :class:`flipnet.train.config.Config`).

    ``optim.binary`` ``sgd`` (torch's coupled ``weight_decay``), ``adam`` (coupled L2), ``adamw``
    (decoupled; torch's default decay 0.01) or ``cema`` (given as the SGD set-up with that filter,
    lr 1); the ``lr`` schedule of the binary route (``alpha`` for CEMA) becomes the schedule,
    per step (a per-epoch linear/cosine schedule is a staircase of that line). Steps per epoch come
    from ``data.batch_size`` and ``train_size`` (default: ``data.subset`` minus the validation
    split). ``init_scale`` is not in a recipe (the model's initialiser sets it): pass it.

    Raises:
        ConfigError: another binary optimizer (Bop is a different flip rule), an unknown size, a
            schedule of another key of the binary route (e.g. CEMA's ``gamma``, SGD's
            ``weight_decay``), a schedule shorter than the run, or an option that changes the
            filter (Nesterov, dampening, AMSGrad): nothing the recipe sets is silently dropped.
            A schedule's own ``start`` (``value`` for ``constant``) is the initial value.
    """
    optim, data, train = config.optim, config.data, config.train  # type: ignore[attr-defined]
    n = _recipe_train_size(config, train_size)
    spe = max(1, -(-n // data.batch_size))
    steps = max(1, train.epochs * spe)
    kw = dict(optim.binary_kwargs)
    name = optim.binary
    if name not in _RECIPE_GROUP_KEYS:
        raise ConfigError(
            f"flipnet hparams maps latent-weight sgd, adam, adamw and cema; the recipe's binary optimizer is {name!r} "
            "(Bop-style optimizers flip on a thresholded gradient average: a different rule)"
        )
    key = "alpha" if name == "cema" else "lr"
    # every schedule that reaches the binary route's param groups changes the filter: one, of `key`, is read
    binary_scheds = [sc for sc in optim.schedules if sc.route == "binary" or (sc.route is None and sc.key in _RECIPE_GROUP_KEYS[name])]
    other = next((sc for sc in binary_scheds if sc.key != key), None)
    if other is not None:
        raise ConfigError(f"flipnet hparams reads the binary route's {key} schedule only; the recipe also schedules {other.key!r} "
                          "(the printed filter would leave it out)")
    if len(binary_scheds) > 1:
        raise ConfigError(f"the recipe has {len(binary_scheds)} {key} schedules for the binary route; flipnet hparams reads one")
    sched = binary_scheds[0] if binary_scheds else None
    schedule, end_value, factor, every, start = "constant", 0.0, 0.1, 1, None
    if sched is not None:
        if sched.type not in ("constant", "linear", "cosine", "step"):
            raise ConfigError(f"flipnet hparams reads constant, linear, cosine and step schedules; the recipe's {key} schedule is {sched.type!r}")
        schedule = sched.type
        per = spe if sched.unit == "epoch" else 1
        length = train.epochs if sched.unit == "epoch" else steps
        if "duration" in sched.params and sched.params["duration"] != length:
            raise ConfigError(f"the recipe's {key} schedule lasts {sched.params['duration']} {sched.unit}s of the run's {length}; "
                              "flipnet hparams reads schedules that span the whole run")
        start = sched.params.get("value" if schedule == "constant" else "start")  # the schedule's own start wins over the optimizer's value
        end_value = float(sched.params.get("end", 0.0))
        factor = float(sched.params.get("factor", 0.1))
        every = int(sched.params.get("every", 1)) * per
    for opt_key, neutral in _RECIPE_NEUTRAL_KWARGS.get(name, {}).items():
        if opt_key in kw and kw[opt_key] != neutral:
            raise ConfigError(f"flipnet hparams does not map {name} with {opt_key}={kw[opt_key]!r} (only {opt_key}={neutral!r})")
    common = dict(schedule=schedule, step_factor=factor, step_every=every, steps=steps, steps_per_epoch=spe, init_scale=init_scale)
    if name == "cema":
        alpha, gamma = float(kw["alpha"] if start is None else start), float(kw["gamma"])
        if alpha <= 0:
            raise ConfigError("the recipe's CEMA alpha is 0: the binary weights never change")
        # lr 1, weight decay alpha: alpha_t = lr_t * alpha, so an alpha schedule ending at E is an lr schedule ending at E / alpha
        return LatentHparams(optimizer="sgd", lr=1.0, momentum=1.0 - gamma, weight_decay=alpha, decoupled=True,
                             end_lr=end_value / alpha, **common)  # type: ignore[arg-type]
    lr = float(kw.get("lr", 1e-3) if start is None else start)
    if name == "sgd":
        return LatentHparams(optimizer="sgd", lr=lr, momentum=float(kw.get("momentum", 0.0)),
                             weight_decay=float(kw.get("weight_decay", 0.0)), decoupled=False, end_lr=end_value, **common)  # type: ignore[arg-type]
    betas = kw.get("betas", (0.9, 0.999))
    return LatentHparams(optimizer="adam", lr=lr, momentum=float(betas[0]), beta2=float(betas[1]),
                         weight_decay=float(kw.get("weight_decay", 0.01 if name == "adamw" else 0.0)),
                         decoupled=name == "adamw", end_lr=end_value, **common)  # type: ignore[arg-type]


#: Param-group keys of the binary optimizers ``hparams_from_recipe`` maps (a schedule of any of
#: them reaches the binary route).
_RECIPE_GROUP_KEYS: dict[str, frozenset[str]] = {
    "cema": frozenset({"alpha", "gamma"}),
    "sgd": frozenset({"lr", "momentum", "dampening", "weight_decay", "nesterov"}),
    "adam": frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad"}),
    "adamw": frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad"}),
}
#: Optimizer options that change the filter: only their neutral value is mapped.
_RECIPE_NEUTRAL_KWARGS: dict[str, dict[str, object]] = {
    "sgd": {"nesterov": False, "dampening": 0, "maximize": False},
    "adam": {"amsgrad": False, "maximize": False},
    "adamw": {"amsgrad": False, "maximize": False},
}
