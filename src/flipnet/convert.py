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
from dataclasses import dataclass, field, fields
from typing import Callable, Literal, Sequence, TypeVar, overload

import torch
from torch import nn

from .layers import SCALES, WEIGHT_MODES, BinaryConv1d, BinaryConv2d, BinaryLayer, BinaryLinear
from .quantizers import QuantizerLike, SteHeaviside, get_quantizer, is_binary_quantizer

__all__ = ["binarize", "BinarizeConfig", "ConversionReport", "register_binarize_handler"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BinarizeConfig:
    """The options of :func:`binarize`, validated when the config is made (see its arguments).

    ``keep`` may be given as one pattern or a sequence; it is stored as a tuple.
    """

    input_quantizer: QuantizerLike = "ste_sign"
    weight_quantizer: QuantizerLike = "ste_sign"
    weight_mode: Literal["latent", "flip"] = "latent"
    scale: Literal["none", "xnor", "learnable"] = "none"
    pad_value: float = 0.0
    weight_clip: float | None = None
    keep_first: bool = True
    keep_last: bool = True
    keep: Sequence[str] | str = ()

    def __post_init__(self) -> None:
        patterns = _check_options(self.input_quantizer, self.weight_quantizer, self.weight_mode, self.scale,
                                  self.pad_value, self.keep)
        object.__setattr__(self, "keep", tuple(patterns))
        c = self.weight_clip
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not (c > 0 and math.isfinite(c))):
            raise ValueError(f"weight_clip must be a positive finite number or None, got {c!r}")


#: A conversion handler: ``(float layer, config, input quantizer of this layer) -> binary layer``
#: with the float layer's hyperparameters; :func:`binarize` then copies weights and biases.
Handler = Callable[[nn.Module, BinarizeConfig, QuantizerLike], BinaryLayer]
H = TypeVar("H", bound=Handler)
_HANDLERS: dict[type[nn.Module], Handler] = {}


def register_binarize_handler(float_type: type[nn.Module]) -> Callable[[H], H]:
    """Decorator: make :func:`binarize` convert modules of exactly ``float_type`` with the handler.

    The handler builds the binary layer (its shape, stride, ... from the float layer, the
    quantizers and scale from the config, on the float layer's device and dtype, in latent
    mode); :func:`binarize` copies the weight and bias, sets the scale and the weight mode.
    Registering a type twice is an error.
    """
    def register(fn: H) -> H:
        if float_type in _HANDLERS:
            raise ValueError(f"{float_type.__name__} already has a binarize handler ({_HANDLERS[float_type].__name__})")
        _HANDLERS[float_type] = fn
        return fn

    return register


def _layer_options(old: nn.Module, config: BinarizeConfig, input_quantizer: QuantizerLike) -> dict:
    # quantizer modules are copied so that converted layers never share state
    iq = copy.deepcopy(input_quantizer) if isinstance(input_quantizer, nn.Module) else input_quantizer
    wq = config.weight_quantizer
    wq = copy.deepcopy(wq) if isinstance(wq, nn.Module) else wq
    return dict(input_quantizer=iq, weight_quantizer=wq, weight_mode="latent", scale=config.scale,
                weight_clip=config.weight_clip, device=old.weight.device, dtype=old.weight.dtype)


def _binary_conv(cls: type[BinaryLayer]) -> Handler:
    def handler(old: nn.Module, config: BinarizeConfig, input_quantizer: QuantizerLike) -> BinaryLayer:
        assert isinstance(old, (nn.Conv1d, nn.Conv2d))
        options = _layer_options(old, config, input_quantizer)
        # pad_value keeps padded binary inputs binary: only for binary inputs and zero padding
        binary_in = is_binary_quantizer(get_quantizer(options["input_quantizer"]))
        pad_value = config.pad_value if (binary_in and old.padding_mode == "zeros") else 0.0
        return cls(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                   old.groups, old.bias is not None, old.padding_mode, pad_value=pad_value, **options)

    handler.__name__ = f"_binary_{cls.__name__}"
    return handler


register_binarize_handler(nn.Conv1d)(_binary_conv(BinaryConv1d))
register_binarize_handler(nn.Conv2d)(_binary_conv(BinaryConv2d))


@register_binarize_handler(nn.Linear)
def _binary_linear(old: nn.Module, config: BinarizeConfig, input_quantizer: QuantizerLike) -> BinaryLayer:
    assert isinstance(old, nn.Linear)
    return BinaryLinear(old.in_features, old.out_features, bias=old.bias is not None,
                        **_layer_options(old, config, input_quantizer))


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


def _make_binary(old: nn.Module, config: BinarizeConfig, input_quantizer: QuantizerLike) -> BinaryLayer:
    new = _HANDLERS[type(old)](old, config, input_quantizer)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        if getattr(old, "bias", None) is not None:
            assert new.bias is not None
            new.bias.copy_(old.bias)
            new.bias.requires_grad_(old.bias.requires_grad)
        if config.scale == "learnable":
            new.reset_scale(old.weight)  # keep the output magnitude of the float layer
        if config.weight_mode == "flip":
            new.set_weight_mode("flip")
        else:
            new.apply_constraint()
    new.weight.requires_grad_(old.weight.requires_grad)
    new.train(old.training)
    return new


@overload
def binarize(
    model: nn.Module, config: BinarizeConfig | None = ..., *, input_quantizer: QuantizerLike = ..., weight_quantizer: QuantizerLike = ...,
    weight_mode: Literal["latent", "flip"] = ..., scale: Literal["none", "xnor", "learnable"] = ...,
    pad_value: float = ..., weight_clip: float | None = ..., keep_first: bool = ..., keep_last: bool = ...,
    keep: Sequence[str] | str = ..., inplace: bool = ..., return_report: Literal[False] = ...,
) -> nn.Module: ...


@overload
def binarize(
    model: nn.Module, config: BinarizeConfig | None = ..., *, input_quantizer: QuantizerLike = ..., weight_quantizer: QuantizerLike = ...,
    weight_mode: Literal["latent", "flip"] = ..., scale: Literal["none", "xnor", "learnable"] = ...,
    pad_value: float = ..., weight_clip: float | None = ..., keep_first: bool = ..., keep_last: bool = ...,
    keep: Sequence[str] | str = ..., inplace: bool = ..., return_report: Literal[True],
) -> tuple[nn.Module, ConversionReport]: ...


def binarize(
    model: nn.Module,
    config: BinarizeConfig | None = None,
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
        config: the options below as one :class:`BinarizeConfig` (then leave them at their
            defaults); ``None`` builds it from them.
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
    options = dict(input_quantizer=input_quantizer, weight_quantizer=weight_quantizer, weight_mode=weight_mode,
                   scale=scale, pad_value=pad_value, weight_clip=weight_clip, keep_first=keep_first,
                   keep_last=keep_last, keep=keep)
    if config is None:
        config = BinarizeConfig(**options)
    else:
        if not isinstance(config, BinarizeConfig):
            raise TypeError(f"config must be a BinarizeConfig, got {type(config).__name__}")
        given = [f.name for f in fields(BinarizeConfig) if options[f.name] is not f.default
                 and options[f.name] != f.default]
        if given:
            raise ValueError(f"binarize: pass the options either in config or as keywords, not both (got {', '.join(given)})")
    patterns = list(config.keep)

    candidates = [
        (name, m) for name, m in model.named_modules()
        if type(m) in _HANDLERS and not _inside_binary_layer(model, name)
    ]
    if not candidates:
        kinds = [f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else t.__qualname__ for t in _HANDLERS]
        listed = ", ".join(kinds[:-1]) + f" or {kinds[-1]}" if len(kinds) > 1 else kinds[0]
        raise ValueError(
            f"nothing to convert: {type(model).__name__} has no {listed} layer "
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
        if config.keep_first and i == 0:
            report.kept[name] = "keep_first"
        elif config.keep_last and i == len(candidates) - 1:
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
    iq_module = get_quantizer(config.input_quantizer)
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
        new = _make_binary(old, config, None if real_in else config.input_quantizer)
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

