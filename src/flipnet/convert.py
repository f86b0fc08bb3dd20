r"""Turn a float model into a binary one: :func:`binarize`.

:func:`binarize` replaces every ``nn.Conv2d``, ``nn.Conv1d`` and ``nn.Linear`` of a model by the
matching binary layer of :mod:`flipnet.layers` (:class:`~flipnet.layers.BinaryConv2d`,
:class:`~flipnet.layers.BinaryConv1d`, :class:`~flipnet.layers.BinaryLinear`), copying weights
and biases, except the layers that rules keep in full precision:

* ``keep_first`` (default ``True``): the first convertible layer, in the order of
  ``model.named_modules()`` (registration order; for most models the order of execution);
* ``keep_last`` (default ``True``): the last one, usually the classifier;
* ``keep``: :func:`fnmatch.fnmatchcase` patterns matched against module names; a layer is kept
  when its name or the name of any module that contains it matches (``keep=["head"]`` keeps
  everything inside ``head``).

Keeping the first and last layers real is the usual practice since XNOR-Net (Rastegari et al.
2016) and Bi-Real Net (Liu et al. 2018): they hold few of the weights but much of the accuracy.

When the first layer is converted (``keep_first=False``) it still gets real inputs
(``input_quantizer=None``): binarising the image itself loses most of its information, as in the
larq model zoo. ``pad_value`` is only given to converted convolutions with binary inputs and
``padding_mode='zeros'`` (its purpose is to keep padded binary inputs binary).

Only layers of exactly these three types are converted; subclasses (which may compute
something else with their weight, like the output projection of ``nn.MultiheadAttention``)
and existing binary layers are left as they are. Forward hooks and parametrizations of a
replaced layer are not carried over. Activations are not changed either: since
:math:`\mathrm{sign}(\mathrm{ReLU}(x)) = +1` for every :math:`x`, :func:`binarize` warns when the
model has ``nn.ReLU``/``nn.ReLU6`` modules and the input quantizer is a ±1 sign; replace them
(by ``nn.Hardtanh``, say) or use ``input_quantizer="ste_heaviside"``.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, Sequence, overload

import torch
from torch import nn

from .layers import SCALES, WEIGHT_MODES, BinaryConv1d, BinaryConv2d, BinaryLayer, BinaryLinear
from .quantizers import QuantizerLike, SteHeaviside, get_quantizer, is_binary_quantizer

__all__ = ["binarize", "ConversionReport", "CONVERTIBLE"]

logger = logging.getLogger(__name__)

#: float layer type → binary layer type that replaces it.
CONVERTIBLE: dict[type[nn.Module], type[BinaryLayer]] = {
    nn.Conv2d: BinaryConv2d,
    nn.Conv1d: BinaryConv1d,
    nn.Linear: BinaryLinear,
}


@dataclass
class ConversionReport:
    """What :func:`binarize` did.

    Attributes:
        converted: names of the layers replaced by binary layers, in model order.
        kept: name → reason (``"keep_first"``, ``"keep_last"``, ``"keep pattern 'x'"``) for the
            convertible layers left in full precision.
        real_inputs: converted layers that keep real inputs (the first layer of the model).
        unmatched_patterns: ``keep`` patterns that matched no module name.
    """

    converted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    real_inputs: list[str] = field(default_factory=list)
    unmatched_patterns: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"binarize: {len(self.converted)} layer(s) converted, {len(self.kept)} kept in full precision"]
        for name in self.converted:
            note = " (real inputs)" if name in self.real_inputs else ""
            lines.append(f"  converted  {name}{note}")
        for name, why in self.kept.items():
            lines.append(f"  kept       {name}  [{why}]")
        for pattern in self.unmatched_patterns:
            lines.append(f"  pattern {pattern!r} matched no module")
        return "\n".join(lines)


def _check_options(
    input_quantizer: QuantizerLike,
    weight_quantizer: QuantizerLike,
    weight_mode: str,
    scale: str,
    pad_value: float,
    keep: Sequence[str] | str,
) -> list[str]:
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scale == "xnor" and weight_mode == "flip":
        raise ValueError("scale='xnor' needs latent weights; use weight_mode='latent' or scale='learnable'")
    if weight_mode == "flip" and not is_binary_quantizer(get_quantizer(weight_quantizer)):
        raise ValueError("weight_mode='flip' needs a 1-bit weight_quantizer (e.g. 'ste_sign')")
    get_quantizer(input_quantizer)  # unknown aliases fail here, before the model is touched
    if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float)) or not math.isfinite(pad_value):
        raise ValueError(f"pad_value must be a finite number (usually -1, 0 or +1), got {pad_value!r}")
    if isinstance(keep, str):
        keep = [keep]
    patterns = list(keep)
    bad = [p for p in patterns if not isinstance(p, str) or not p]
    if bad:
        raise ValueError(f"keep must be a list of non-empty name patterns (fnmatch), got {bad!r}")
    return patterns


def _kept_by_pattern(name: str, patterns: list[str]) -> str | None:
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return pattern
    return None


def _make_binary(
    old: nn.Module,
    *,
    input_quantizer: QuantizerLike,
    weight_quantizer: QuantizerLike,
    weight_mode: str,
    scale: str,
    pad_value: float,
    weight_clip: float | None,
) -> BinaryLayer:
    cls = CONVERTIBLE[type(old)]
    # quantizer modules are copied so that converted layers never share state
    iq = copy.deepcopy(input_quantizer) if isinstance(input_quantizer, nn.Module) else input_quantizer
    wq = copy.deepcopy(weight_quantizer) if isinstance(weight_quantizer, nn.Module) else weight_quantizer
    common = dict(
        input_quantizer=iq,
        weight_quantizer=wq,
        weight_mode="latent",  # set after the weights are copied
        scale=scale,
        weight_clip=weight_clip,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    if isinstance(old, nn.Linear):
        new: BinaryLayer = cls(old.in_features, old.out_features, bias=old.bias is not None, **common)
    else:
        assert isinstance(old, (nn.Conv1d, nn.Conv2d))
        binary_in = is_binary_quantizer(get_quantizer(iq))
        use_pad = pad_value if (binary_in and old.padding_mode == "zeros") else 0.0
        new = cls(
            old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
            old.groups, old.bias is not None, old.padding_mode, pad_value=use_pad, **common,
        )
    with torch.no_grad():
        new.weight.copy_(old.weight)
        if old.bias is not None:
            assert new.bias is not None
            new.bias.copy_(old.bias)
            new.bias.requires_grad_(old.bias.requires_grad)
        if scale == "learnable":
            new.reset_scale(old.weight)  # keep the output magnitude of the float layer
        if weight_mode == "flip":
            new.set_weight_mode("flip")
        else:
            new.apply_constraint()
    new.weight.requires_grad_(old.weight.requires_grad)
    new.train(old.training)
    return new


@overload
def binarize(
    model: nn.Module, *, input_quantizer: QuantizerLike = ..., weight_quantizer: QuantizerLike = ...,
    weight_mode: Literal["latent", "flip"] = ..., scale: Literal["none", "xnor", "learnable"] = ...,
    pad_value: float = ..., weight_clip: float | None = ..., keep_first: bool = ..., keep_last: bool = ...,
    keep: Sequence[str] | str = ..., inplace: bool = ..., return_report: Literal[False] = ...,
) -> nn.Module: ...


@overload
def binarize(
    model: nn.Module, *, input_quantizer: QuantizerLike = ..., weight_quantizer: QuantizerLike = ...,
    weight_mode: Literal["latent", "flip"] = ..., scale: Literal["none", "xnor", "learnable"] = ...,
    pad_value: float = ..., weight_clip: float | None = ..., keep_first: bool = ..., keep_last: bool = ...,
    keep: Sequence[str] | str = ..., inplace: bool = ..., return_report: Literal[True],
) -> tuple[nn.Module, ConversionReport]: ...


def binarize(
    model: nn.Module,
    *,
    input_quantizer: QuantizerLike = "ste_sign",
    weight_quantizer: QuantizerLike = "ste_sign",
    weight_mode: Literal["latent", "flip"] = "latent",
    scale: Literal["none", "xnor", "learnable"] = "none",
    pad_value: float = 0.0,
    weight_clip: float | None = None,
    keep_first: bool = True,
    keep_last: bool = True,
    keep: Sequence[str] | str = (),
    inplace: bool = False,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    r"""Replace the float conv/linear layers of ``model`` by binary layers.

    Each converted layer computes :math:`y = \alpha\,(q_w(W) \ast q_x(x)) + b` with the float
    layer's :math:`W` and :math:`b` (see :mod:`flipnet.layers`); BatchNorm, activations and
    every other module are left as they are.

    Args:
        model: the float model. Not modified unless ``inplace=True``.
        input_quantizer: quantizer of the inputs of converted layers (default ``"ste_sign"``);
            the model's first layer, if converted, always keeps real inputs.
        weight_quantizer: quantizer of latent weights (default ``"ste_sign"``).
        weight_mode: ``"latent"`` (default; weights copied as they are) or ``"flip"`` (weights
            replaced by their signs, for flip optimizers such as Bop).
        scale: ``"none"`` (default), ``"xnor"`` or ``"learnable"`` (initialised to the
            per-channel mean :math:`|W|` of the float weight, in both weight modes).
        pad_value: padding value of converted convolutions with binary inputs (default 0;
            -1 or +1 keeps padded inputs binary).
        weight_clip: clip latent weights to :math:`[-c, c]` (applied once here, then by
            :func:`flipnet.apply_constraints` after each step); default ``None``.
        keep_first: keep the first convertible layer in full precision (default ``True``).
        keep_last: keep the last convertible layer in full precision (default ``True``).
        keep: name patterns (:func:`fnmatch.fnmatchcase`, e.g. ``"layer4.*"``) of layers, or
            of modules containing them, to keep in full precision. A pattern that matches no
            module gives a ``UserWarning``.
        inplace: modify ``model`` itself instead of a deep copy (default ``False``).
        return_report: also return a :class:`ConversionReport`. The report is always logged
            at INFO level on the ``flipnet.convert`` logger.

    Returns:
        The converted model, or ``(model, report)`` when ``return_report=True``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an option is invalid, or nothing would be converted (no
            ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` in the model, or every one is kept).

    Example:
        >>> import torch.nn as nn
        >>> from flipnet.convert import binarize
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3),
        ...                     nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
        >>> bnet, report = binarize(net, return_report=True)
        >>> report.converted
        ['2']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"binarize needs an nn.Module, got {type(model).__name__}")
    patterns = _check_options(input_quantizer, weight_quantizer, weight_mode, scale, pad_value, keep)
    if weight_clip is not None and (
        isinstance(weight_clip, bool)
        or not isinstance(weight_clip, (int, float))
        or not (weight_clip > 0 and math.isfinite(weight_clip))
    ):
        raise ValueError(f"weight_clip must be a positive finite number or None, got {weight_clip!r}")

    candidates = [
        (name, m) for name, m in model.named_modules()
        if type(m) in CONVERTIBLE and not _inside_binary_layer(model, name)
    ]
    if not candidates:
        raise ValueError(
            f"nothing to convert: {type(model).__name__} has no nn.Conv1d, nn.Conv2d or nn.Linear layer "
            "(subclasses and layers that are already binary are not converted)"
        )

    report = ConversionReport()
    all_names = [name for name, _ in model.named_modules()]
    report.unmatched_patterns = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in all_names)]
    for p in report.unmatched_patterns:
        warnings.warn(f"binarize: keep pattern {p!r} matches no module name of the model", UserWarning, stacklevel=2)

    plan: list[tuple[str, nn.Module]] = []
    for i, (name, m) in enumerate(candidates):
        pattern = _kept_by_pattern(name, patterns)
        if keep_first and i == 0:
            report.kept[name] = "keep_first"
        elif keep_last and i == len(candidates) - 1:
            report.kept[name] = "keep_last"
        elif pattern is not None:
            report.kept[name] = f"keep pattern {pattern!r}"
        else:
            plan.append((name, m))
    if not plan:
        raise ValueError(
            f"nothing to convert: all {len(candidates)} convertible layer(s) are kept in full precision "
            f"({', '.join(f'{n or type(model).__name__}: {why}' for n, why in report.kept.items())}); "
            "pass keep_first=False, keep_last=False or fewer keep patterns"
        )

    first_name = candidates[0][0]
    iq_module = get_quantizer(input_quantizer)
    relus = [n for n, m in model.named_modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    signs_activations = is_binary_quantizer(iq_module) and not isinstance(iq_module, SteHeaviside)
    if relus and signs_activations and any(name != first_name for name, _ in plan):
        warnings.warn(
            f"binarize: the model has {len(relus)} ReLU module(s) (e.g. {relus[0]!r}); the sign of a ReLU "
            "output is always +1, so a converted layer right after one sees constant inputs. Replace them "
            "(e.g. by nn.Hardtanh or nn.Identity) or pass input_quantizer='ste_heaviside'",
            UserWarning,
            stacklevel=2,
        )

    # the model itself may be the single layer to convert: then there is no parent to update
    model_is_root_layer = plan[0][0] == ""
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules(remove_duplicate=False))

    replacements: dict[int, BinaryLayer] = {}
    for name, _ in plan:
        old = modules[name]
        if id(old) in replacements:
            continue
        real_in = name == first_name
        new = _make_binary(
            old,
            input_quantizer=None if real_in else input_quantizer,
            weight_quantizer=weight_quantizer,
            weight_mode=weight_mode,
            scale=scale,
            pad_value=pad_value,
            weight_clip=weight_clip,
        )
        replacements[id(old)] = new
        report.converted.append(name)
        if real_in:
            report.real_inputs.append(name)

    if model_is_root_layer:
        model = replacements[id(model)]
    else:
        # every place a replaced module is registered (a shared module may sit under several names)
        for parent in list(model.modules()):
            for child_name, child in list(parent._modules.items()):
                if child is not None and id(child) in replacements:
                    setattr(parent, child_name, replacements[id(child)])

    logger.info("%s", report)
    return (model, report) if return_report else model


def _inside_binary_layer(model: nn.Module, name: str) -> bool:
    """True for modules nested in a binary layer (a quantizer, say): never convert those."""
    parts = name.split(".")
    for i in range(len(parts)):
        parent = model.get_submodule(".".join(parts[:i])) if i else model
        if isinstance(parent, BinaryLayer):
            return True
    return False

