r"""Many runs as one network: the step function of a multi-member :class:`~flipnet.train.Trainer`.

``flipnet train RECIPE seeds=0,1,2`` (:func:`flipnet.train.multi.train_seeds`) and sweeps
(:func:`flipnet.train.multi.train_sweep`) train S runs with one trainer whose step is the
:class:`SeedEnsemble` below. A 3-seed mean then costs about one run's wall time on a GPU instead
of three.

Design: one wide network instead of S small ones
------------------------------------------------
A small network such as BinaryNet at batch 50 leaves most of a modern GPU idle: its time goes to
launching a few hundred small kernels per step. Training S copies *as one network S times wider*
issues the same number of kernels, each S times larger, so S runs cost little more than one.

:class:`SeedEnsemble` builds that wide network from S models of identical architecture (flat
``nn.Sequential`` models such as ``binarynet`` and ``binary_mlp``):

* a convolution with ``C → O`` channels becomes a *grouped* convolution with ``S·C → S·O``
  channels and ``S×`` the groups, so member ``s`` only sees its own channels;
* a dense layer becomes a batched matrix product over the S members;
* a BatchNorm over ``C`` channels becomes one over ``S·C`` channels: per-channel statistics are
  exactly per-member statistics, running averages included;
* element-wise and per-channel layers (sign quantizers, activations, pooling, dropout) run
  unchanged on the merged ``(B, S·C, H, W)`` tensor.

The members' parameters and BatchNorm buffers are *views* into the wide tensors (no copies): the
S original models stay valid ``nn.Module`` s that always hold their current weights, so each
member keeps its own optimizer (:func:`flipnet.optim.create_optimizer`), schedules, flip counters
and checkpoints exactly as in a separate run. After the wide backward pass, each member's
``.grad`` is set to its slice of the wide gradient (a view, again no copy) and its optimizer steps.
Flip optimizers and Adam are element-wise, so this equals S independent runs; gradient clipping
is applied per member. Each member draws its own batches (the data order and augmentation of a
separate run with its seed); the batches are stacked to ``(S, B, ...)``.

Why not ``torch.func.vmap`` or CUDA streams? ``vmap`` over ``functional_call`` would do the same
batching but cannot run flipnet's quantizers (classic ``autograd.Function`` s without vmap rules)
and BatchNorm's in-place running-statistics update needs special handling; the wide network is an
ordinary module, so autograd, ``torch.compile`` and CUDA graphs (:mod:`flipnet.train.fast`) apply
unchanged. Concurrent CUDA streams keep S× the kernel launches (the bottleneck being removed) and
give no overlap guarantee.

Exactness: a grouped convolution or batched matmul may sum in another order than the dense
kernel of a separate run, so results agree with separate runs to float rounding (the tests check
this on CPU); dropout draws different random masks than separate runs would.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from flipnet.errors import ConfigError, FlipnetError
from flipnet.layers import BinaryLayer, binary_modules

__all__ = ["SeedEnsemble", "SeedOptimizer", "NotVectorizable", "ensemble_loss", "ensemble_metrics", "evaluate_ensemble"]


class NotVectorizable(FlipnetError, ValueError):
    """The model has a layer that :class:`SeedEnsemble` cannot widen; train the runs one by one."""


# ----------------------------------------------------------------------------- layer support
#: Parameter-free layers that act per element or per channel: they run unchanged on the merged
#: ``(B, S·C, ...)`` tensor.
_PASSTHROUGH: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softsign, nn.Tanhshrink,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
)


def _check_elementwise(module: nn.Module, where: str) -> None:
    """Quantizers are element-wise except the per-channel magnitude-aware sign."""
    from flipnet.quantizers import MagnitudeAwareSign, Quantizer

    if isinstance(module, MagnitudeAwareSign):
        raise NotVectorizable(
            f"{where}: magnitude_aware_sign on activations averages over channels, which would mix "
            "the merged runs; train the seeds one after the other (vectorize=false)"
        )
    if isinstance(module, Quantizer) or isinstance(module, _PASSTHROUGH):
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            raise NotVectorizable(f"{where}: {type(module).__name__} with parameters cannot be widened")
        return
    raise NotVectorizable(
        f"{where}: layer type {type(module).__name__} cannot be vectorised over seeds; "
        "train the seeds one after the other (vectorize=false)"
    )


class _WideFlatten(nn.Module):
    """Flatten each member's features: ``(B, S·C, *rest) → (B, S·C·prod(rest))`` member-major."""

    def __init__(self, members: int) -> None:
        super().__init__()
        self.members = members

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        return x.reshape(b, self.members, -1).reshape(b, -1)


class _WideLinear(nn.Module):
    """S dense layers as one batched matrix product; ``inner`` holds the stacked parameters."""

    def __init__(self, inner: nn.Linear, members: int) -> None:
        super().__init__()
        self.inner = inner
        self.members = members
        self.in_features = inner.in_features
        self.out_features = inner.out_features // members

    def forward(self, x: Tensor) -> Tensor:
        inner, s = self.inner, self.members
        quant = getattr(inner, "input_quantizer", None)
        if quant is not None:
            x = quant(x)
        b = x.shape[0]
        if isinstance(inner, BinaryLayer):
            w = inner.quantized_weight().to(x.dtype)
        else:
            w = inner.weight.to(x.dtype)
        out = torch.einsum("bsi,soi->bso", x.reshape(b, s, self.in_features), w.view(s, self.out_features, -1))
        out = out.reshape(b, s * self.out_features)
        if isinstance(inner, BinaryLayer):
            return inner._finish(out)
        if inner.bias is not None:
            out = out + inner.bias.to(out.dtype)
        apply_scale = getattr(inner, "_apply_scale", None)  # flipnet's FloatLinear twin
        return apply_scale(out) if apply_scale is not None else out


def _stack_param(tensors: list[Tensor], channels_last: bool) -> Tensor:
    wide = torch.cat([t.detach() for t in tensors], dim=0)
    if channels_last and wide.dim() == 4:
        wide = wide.contiguous(memory_format=torch.channels_last)
    return wide


@dataclass
class _Link:
    """A wide tensor and the member tensors that are views into it."""

    wide: Tensor
    members: list[tuple[nn.Module, str, torch.Size]] = field(default_factory=list)


class SeedEnsemble(nn.Module):
    """S models of one architecture trained as one wide network (see the module docs).

    Args:
        models: S >= 1 models with identical structure and shapes (built by the same factory
            call with different seeds or initialisations). Their parameters and BatchNorm
            buffers become views into the ensemble's tensors; keep using the models (for
            optimizers, evaluation, checkpoints) as usual, but never replace a parameter's
            ``.data`` (that would cut the link; ``load_state_dict`` copies in place and is fine).
        channels_last: store wide 4-D weights channels-last (for CUDA convolutions).

    Build the members on their final device and dtype first: the ensemble cannot be moved
    afterwards (``.to()`` raises ``RuntimeError``).

    Input: ``(S, B, ...)`` -- one batch per member -- or ``(B, ...)`` with ``shared=True``.
    Output: ``(S, B, ...)``, member ``s`` at index ``s``.

    Raises:
        NotVectorizable: the models are not flat sequences of supported layers.
        ValueError: the models differ in structure or shapes.
    """

    def __init__(self, models: Sequence[nn.Module], *, channels_last: bool = False) -> None:
        super().__init__()
        if not models:
            raise ValueError("SeedEnsemble needs at least one model")
        self.members: list[nn.Module] = list(models)
        self.num_members = len(self.members)
        first = self.members[0]
        self.input_shape: tuple[int, ...] | None = getattr(first, "input_shape", None)
        sigs = [[(n, tuple(p.shape)) for n, p in m.named_parameters()] for m in self.members]
        if any(s != sigs[0] for s in sigs[1:]):
            raise ValueError("SeedEnsemble: the models differ in parameter names or shapes; build them with the same options")
        self._links: list[_Link] = []
        if not isinstance(first, nn.Sequential):
            raise NotVectorizable(
                f"only flat sequential models (e.g. binarynet, binary_mlp) can be vectorised over seeds, "
                f"not {type(first).__name__}; train the seeds one after the other (vectorize=false)"
            )
        layers = self._widen(self.members, channels_last)
        self.layers = nn.Sequential(*layers)
        self.sync_modes()

    # ------------------------------------------------------------------ construction
    def _flat_children(self, model: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
        """The layers of a (possibly nested) ``nn.Sequential``, in order, with dotted names."""
        if isinstance(model, nn.Sequential):
            out: list[tuple[str, nn.Module]] = []
            for name, child in model.named_children():
                out += self._flat_children(child, f"{prefix}{name}.")
            return out
        return [(prefix.rstrip(".") or type(model).__name__, model)]

    def _widen(self, models: list[nn.Module], channels_last: bool) -> list[nn.Module]:
        per_member = [self._flat_children(m, "") for m in models]
        out: list[nn.Module] = []
        s = self.num_members
        for idx, (name, layer) in enumerate(per_member[0]):
            peers = [pm[idx][1] for pm in per_member]
            where = name or type(layer).__name__
            if any(type(p) is not type(layer) for p in peers):
                raise ValueError(f"SeedEnsemble: layer {where} has different types across models")
            if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
                q = getattr(layer, "input_quantizer", None)
                if q is not None:
                    _check_elementwise(q, f"{where}.input_quantizer")
                wide = copy.deepcopy(layer)
                wide.in_channels *= s
                wide.out_channels *= s
                wide.groups *= s
                self._link_params(wide, peers, ("weight", "bias", "scale"), channels_last)
                out.append(wide)
            elif isinstance(layer, nn.Linear):
                q = getattr(layer, "input_quantizer", None)
                if q is not None:
                    _check_elementwise(q, f"{where}.input_quantizer")
                inner = copy.deepcopy(layer)
                inner.out_features *= s
                self._link_params(inner, peers, ("weight", "bias", "scale"), False)
                out.append(_WideLinear(inner, s))
            elif isinstance(layer, _BatchNorm):
                wide = copy.deepcopy(layer)
                wide.num_features *= s
                self._link_params(wide, peers, ("weight", "bias"), False)
                self._link_buffers(wide, peers, ("running_mean", "running_var"))
                if getattr(wide, "num_batches_tracked", None) is not None:
                    shared = wide.num_batches_tracked
                    shared.copy_(peers[0].num_batches_tracked)
                    for p in peers:
                        p._buffers["num_batches_tracked"] = shared
                out.append(wide)
            elif isinstance(layer, nn.Flatten):
                if layer.start_dim != 1 or layer.end_dim != -1:
                    raise NotVectorizable(f"{where}: only Flatten(start_dim=1, end_dim=-1) can be vectorised")
                out.append(_WideFlatten(s))
            else:
                _check_elementwise(layer, where)
                out.append(copy.deepcopy(layer))
        return out

    def _link_params(self, wide_module: nn.Module, peers: list[nn.Module], names: Iterable[str], channels_last: bool) -> None:
        for name in names:
            first = getattr(peers[0], name, None)
            if not isinstance(first, nn.Parameter):
                continue
            wide = nn.Parameter(_stack_param([getattr(p, name) for p in peers], channels_last),
                                requires_grad=first.requires_grad)
            wide_module._parameters[name] = wide
            link = _Link(wide)
            n = first.shape[0]
            for i, peer in enumerate(peers):
                old = getattr(peer, name)
                view = wide.detach()[i * n:(i + 1) * n]  # same shape as the member's tensor
                peer._parameters[name] = nn.Parameter(view, requires_grad=old.requires_grad)
                link.members.append((peer, name, old.shape))
            self._links.append(link)

    def _link_buffers(self, wide_module: nn.Module, peers: list[nn.Module], names: Iterable[str]) -> None:
        for name in names:
            first = getattr(peers[0], name, None)
            if not isinstance(first, Tensor):
                continue
            wide = torch.cat([getattr(p, name).detach() for p in peers], dim=0)
            wide_module._buffers[name] = wide
            n = first.shape[0]
            for i, peer in enumerate(peers):
                peer._buffers[name] = wide[i * n:(i + 1) * n]

    # ------------------------------------------------------------------ state
    def sync_modes(self) -> None:
        """Copy the members' binary weight modes and ``requires_grad`` flags to the wide tensors.

        Call after anything that changes them on the members, e.g. ``create_optimizer`` (which
        puts binary layers in flip mode, or freezes a route).
        """
        wide_layers = [m for _, m in binary_modules(self.layers)]
        member_layers = [[m for _, m in binary_modules(member)] for member in self.members]
        for i, wide in enumerate(wide_layers):
            modes = {layers[i].weight_mode for layers in member_layers}
            if len(modes) != 1:
                raise ValueError("SeedEnsemble: members disagree on weight_mode; give them the same optimizer type")
            wide.weight_mode = modes.pop()
        for link in self._links:
            flags = {getattr(peer, name).requires_grad for peer, name, _ in link.members}
            link.wide.requires_grad_(any(flags))

    def check_links(self) -> None:
        """Raise ``RuntimeError`` if a member parameter no longer shares memory with the ensemble."""
        for link in self._links:
            base = link.wide.data_ptr()
            size = link.wide.element_size()
            per = link.wide.numel() // self.num_members
            for i, (peer, name, _) in enumerate(link.members):
                p = getattr(peer, name)
                if p.data_ptr() != base + i * per * size:
                    raise RuntimeError(
                        f"member {i} parameter {name!r} was replaced (its .data reassigned); "
                        "it no longer trains inside the SeedEnsemble"
                    )

    def scatter_grads(self) -> None:
        """Give each member parameter its slice of the wide gradient (a view: no copy)."""
        for link in self._links:
            g = link.wide.grad
            n = link.wide.shape[0] // self.num_members
            for i, (peer, name, shape) in enumerate(link.members):
                p = peer._parameters[name]
                if g is None or not p.requires_grad:
                    p.grad = None
                else:
                    p.grad = g[i * n:(i + 1) * n]

    def zero_wide_grads(self) -> None:
        for link in self._links:
            link.wide.grad = None

    def _apply(self, fn: Any, recurse: bool = True) -> SeedEnsemble:  # type: ignore[override]
        # ``.to()``, ``.cuda()``, ``.half()`` ... replace parameter storage, which would cut the
        # members' views; the members would silently stop training.
        raise RuntimeError(
            "SeedEnsemble cannot be moved or cast after it is built (its members' parameters are views "
            "into its tensors); move the member models to the device/dtype first, then build the ensemble"
        )

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, shared: bool = False) -> Tensor:  # type: ignore[override]
        s = self.num_members
        if shared:
            sample = tuple(x.shape[1:])
            b = x.shape[0]
            merged = x.unsqueeze(1).expand(b, s, *sample).reshape(b, s * sample[0], *sample[1:])
        else:
            if x.shape[0] != s:
                raise ValueError(f"SeedEnsemble of {s} members expects input (S={s}, B, ...), got {tuple(x.shape)}")
            sample = tuple(x.shape[2:])
            b = x.shape[1]
            merged = x.transpose(0, 1).reshape(b, s * sample[0], *sample[1:])
        if self.input_shape is not None and sample != tuple(self.input_shape):
            raise ValueError(f"the models expect samples of shape {tuple(self.input_shape)}, got {sample}")
        out = self.layers(merged)
        return out.reshape(b, s, out.shape[1] // s, *out.shape[2:]).transpose(0, 1)


class SeedOptimizer:
    """The members' optimizers of a :class:`SeedEnsemble`, stepped as one.

    ``step()`` hands each member its gradient slice, clips it per member (``grad_clip``), then
    steps every member's optimizer; ``zero_grad()`` clears member and wide gradients. It exposes
    ``optimizers`` (``{"member0": ..., ...}``) and ``param_groups`` so that
    :func:`flipnet.train.fast.make_train_step` (hyperparameter tensors, CUDA graphs) treats it
    like a routed optimizer.
    """

    def __init__(self, ensemble: SeedEnsemble, optimizers: Sequence[Any], grad_clip: float | None = None) -> None:
        if len(optimizers) != ensemble.num_members:
            raise ValueError(f"need one optimizer per member ({ensemble.num_members}), got {len(optimizers)}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip!r}")
        self.ensemble = ensemble
        self.optimizers: dict[str, Any] = {f"member{i}": opt for i, opt in enumerate(optimizers)}
        self.grad_clip = grad_clip
        self._member_params = [[p for p in m.parameters() if p.requires_grad] for m in ensemble.members]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @torch.no_grad()
    def step(self) -> None:
        self.ensemble.scatter_grads()
        for params, opt in zip(self._member_params, self.optimizers.values()):
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.grad_clip)
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)
        self.ensemble.zero_wide_grads()


def _member_loss(out: Tensor, y: Tensor) -> Tensor:
    """Per-member mean cross-entropy, shape ``(S,)``; dense targets average over pixels too."""
    s, b = y.shape[0], y.shape[1]
    flat = F.cross_entropy(out.flatten(0, 1).float(), y.flatten(0, 1), reduction="none")
    return flat.reshape(s, b, -1).mean(dim=(1, 2))


def ensemble_loss(out: Tensor, y: Tensor) -> Tensor:
    """Σ_s of each member's batch-mean cross-entropy: member s gets the gradient of its own loss."""
    return _member_loss(out, y).sum()


def ensemble_metrics(out: Tensor, y: Tensor, loss: Tensor) -> tuple[Tensor, Tensor]:
    """Per-member ``(loss_sum, n_correct)``, each of shape ``(S,)`` (no host sync)."""
    per = _member_loss(out, y) * y.shape[1]
    hits = (out.argmax(dim=2) == y).reshape(y.shape[0], -1).sum(dim=1)
    return per, hits



@torch.no_grad()
def evaluate_ensemble(ensemble: SeedEnsemble, loader: Any, amp_dtype: torch.dtype | None, device: torch.device) -> list[dict[str, float]]:
    """Each member's ``{"loss", "acc", "n"}`` over ``loader`` (every member sees the same batches)."""
    was = ensemble.training
    ensemble.eval()
    s = ensemble.num_members
    sums = torch.zeros(s, 2, device=device, dtype=torch.float64)
    n_samples = n_targets = 0
    try:
        for x, y in loader:
            ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else torch.autocast(device.type, enabled=False)
            with ctx:
                out = ensemble(x, shared=True)
            ys = y.unsqueeze(0).expand(s, *y.shape)
            per = _member_loss(out.float(), ys)
            sums[:, 0] += per.double() * y.shape[0]
            sums[:, 1] += (out.argmax(dim=2) == ys).reshape(s, -1).sum(dim=1)
            n_samples += y.shape[0]
            n_targets += y.numel()
    finally:
        ensemble.train(was)
    if n_samples == 0:
        raise ConfigError("the evaluation set is empty; check data.test_subset / data.val_size")
    vals = sums.tolist()
    return [{"loss": v[0] / n_samples, "acc": v[1] / n_targets, "n": n_samples} for v in vals]
