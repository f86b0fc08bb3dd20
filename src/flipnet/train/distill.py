r"""Knowledge distillation from a real-valued teacher: ReActNet's distributional loss.

Reference: Liu et al. 2020, "ReActNet: Towards Precise Binary Neural Network with Generalized
Activation Functions" (ECCV), section 4.2 ("distributional loss"); reference code
``liuzechun/ReActNet`` ``utils/KD_loss.py`` (``DistributionLoss``), used unchanged by Quist et al.
2023 (``jorisquist/Understanding-WM-HP-in-BNNs``, ``imagenet/utils``). Both train the binary
student on this loss alone, against a torchvision ResNet-34 teacher (``--teacher resnet34``).

The loss
--------
With student logits :math:`z^s`, teacher logits :math:`z^t`, temperature :math:`T` and
:math:`p^t = \mathrm{softmax}(z^t / T)`, :math:`\log p^s = \mathrm{log\_softmax}(z^s / T)`:

.. math::

    L_{\mathrm{KD}} = T^2 \cdot \frac{1}{N} \sum_{n=1}^{N} \Big( -\sum_c p^t_{nc} \log p^s_{nc} \Big)

(``kind="cross_entropy"``, the reference's value at :math:`T = 1`). ``kind="kl"`` subtracts the
teacher's entropy, :math:`\mathrm{KL}(p^t \,\|\, p^s) = -\sum_c p^t_c \log p^s_c + \sum_c p^t_c \log p^t_c`:
the same gradient for the student, a value that is 0 when the student matches the teacher. The
factor :math:`T^2` (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network") keeps the
gradient scale independent of :math:`T`; at :math:`T = 1` it is 1. The trained objective is

.. math:: L = w \cdot L_{\mathrm{KD}} + (1 - w) \cdot \mathrm{CE}(z^s, y)

with ``weight`` :math:`w = 1` by default (ReActNet: the labels are not used at all).

The teacher
-----------
``teacher`` names the model: a flipnet registry name (e.g. ``resnet18`` with
``teacher_kwargs: {mode: float, twin_of: bwn}`` for a real ResNet-18 with ReLU blocks), or
``torchvision:<name>`` for a torchvision classification model (``torchvision:resnet34``, the
reference's teacher), built without weights. ``checkpoint`` is the file whose weights it loads:

* a flipnet run folder or checkpoint (``RUN``, ``RUN/checkpoints/best.pt``): its ``model`` state;
* a ``.safetensors`` file (read with :func:`safetensors.torch.load_file`);
* any other PyTorch file, read with ``torch.load(weights_only=True)``: a state dict, or a dict
  holding one under ``state_dict`` or ``model``; a ``module.`` prefix (DataParallel/DDP) is removed.

Weights cannot be downloaded by flipnet. For the reference teacher, download torchvision's
ResNet-34 ImageNet weights on a machine with internet
(``python -c "import torchvision; torchvision.models.resnet34(weights='IMAGENET1K_V1')"`` stores
``resnet34-b627a593.pth`` in ``~/.cache/torch/hub/checkpoints/``) and copy that file over. The
teacher must match it exactly: a missing or unexpected key is an error, never silently ignored.
The teacher runs in eval mode, without gradients, on the student's input batch (moved once to
that batch's device; the batch is cast to the teacher's dtype).
"""

from __future__ import annotations

import math
import os

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flipnet.errors import CheckpointError, ConfigError
from flipnet.train.config import DISTILL_KINDS as KINDS
from flipnet.train.config import DistillConfig

__all__ = [
    "KINDS",
    "spec_from_section",
    "DistillationLoss",
    "distribution_loss",
    "build_teacher",
    "load_teacher_weights",
    "read_state_dict",
    "loss_from_config",
]

TORCHVISION_PREFIX = "torchvision:"


def distribution_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, kind: str = "cross_entropy"
) -> Tensor:
    r"""ReActNet's distributional loss, batch mean (see the module docstring for the formula).

    Args:
        student_logits: ``(N, C)`` pre-softmax outputs of the student (gradients flow).
        teacher_logits: ``(N, C)`` pre-softmax outputs of the teacher (detached here).
        temperature: :math:`T > 0`; both distributions are softened by it and the loss is
            multiplied by :math:`T^2`.
        kind: ``"cross_entropy"`` (the reference's value) or ``"kl"`` (minus the teacher entropy).
    """
    if kind not in KINDS:
        raise ConfigError(f"distillation kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"distillation temperature must be a positive number, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student and teacher logits must both be (N, classes); got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)} (does the teacher predict the same classes?)"
        )
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    teacher = teacher_logits.detach().float() / t
    p_teacher = F.softmax(teacher, dim=1)
    per_sample = -(p_teacher * log_p_student).sum(dim=1)
    if kind == "kl":
        per_sample = per_sample + (p_teacher * F.log_softmax(teacher, dim=1)).sum(dim=1)
    return per_sample.mean() * (t * t)


def spec_from_section(section: Any) -> DistillConfig:
    """A validated :class:`~flipnet.train.config.DistillConfig` from a ``train.distill`` section.

    ``section`` is a :class:`DistillConfig`, a mapping with its keys, or ``None`` (no distillation).
    """
    if section is None:
        return DistillConfig()
    fields = DistillConfig.__dataclass_fields__
    if isinstance(section, Mapping):
        unknown = set(section) - set(fields)
        if unknown:
            raise ConfigError(f"train.distill has no key {sorted(unknown)[0]!r}; valid: {', '.join(fields)}")
        spec = DistillConfig(**dict(section))
    else:
        spec = DistillConfig(**{k: getattr(section, k) for k in fields if hasattr(section, k)})
    spec.validate()
    return spec


# ---------------------------------------------------------------------------------------------
# teacher


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from a flipnet run/checkpoint, a ``.safetensors`` file or a PyTorch file.

    Files are data: PyTorch files are read with ``weights_only=True``. See the module docstring
    for the accepted layouts.

    Raises:
        CheckpointError: missing file, unreadable file, or no state dict inside.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / "checkpoints" / name).is_file():
                p = p / "checkpoints" / name
                break
        else:
            raise CheckpointError(f"teacher checkpoint folder {p} holds no checkpoints/best.pt or checkpoints/last.pt")
    if not p.is_file():
        raise CheckpointError(
            f"teacher checkpoint {p} does not exist; flipnet cannot download weights, copy the teacher's "
            "weights there (see docs/models.md, 'Distillation')"
        )
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"teacher checkpoint {p} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a weights file"
        raise CheckpointError(f"teacher checkpoint {p} cannot be read as a weights file ({_load_failure(e)})") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    # a flipnet state dict also holds each binary layer's ``_extra_state`` (a small dict)
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()) or not all(
        isinstance(v, Tensor) or str(k).endswith("_extra_state") for k, v in obj.items()
    ):
        raise CheckpointError(f"teacher checkpoint {p} holds no state dict (a mapping of names to tensors)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _load_failure(e: Exception) -> str:
    """The reason in a ``torch.load(weights_only=True)`` failure, without torch's advice to load
    the file unsafely (flipnet never does: files are data)."""
    text = str(e).strip()
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = " ".join(text.split(marker, 1)[1].split()).split(" Check the documentation")[0].strip()
        detail = detail.split(" Please use `torch.serialization")[0].strip()
        return f"not a PyTorch file of tensors only: {detail[:160]}; flipnet reads weights only, never pickled objects"
    first = (text.splitlines() or [""])[0] or type(e).__name__
    return first[:200]


def _build_teacher_model(name: str, kwargs: Mapping[str, Any], num_classes: int, in_channels: int) -> nn.Module:
    kwargs = dict(kwargs)
    for fixed in ("num_classes", "in_channels"):
        if fixed in kwargs:
            raise ConfigError(f"train.distill.teacher_kwargs.{fixed} is set by the data set; remove it")
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        tv_name = name[len(TORCHVISION_PREFIX):]
        available = torchvision.models.list_models(module=torchvision.models)
        if tv_name not in available:
            raise ConfigError(f"unknown torchvision classification model {tv_name!r} (teacher {name!r})")
        if in_channels != 3:
            raise ConfigError(f"torchvision teachers take 3-channel images; this data set has {in_channels}")
        if "weights" in kwargs:
            raise ConfigError("train.distill.teacher_kwargs.weights: flipnet never downloads weights; use train.distill.checkpoint")
        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
    from flipnet.models import create_model

    return create_model(name, num_classes=num_classes, in_channels=in_channels, **kwargs)


def load_teacher_weights(teacher: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load ``state`` strictly into ``teacher``; a mismatch raises :class:`CheckpointError` naming keys."""
    try:
        result = teacher.load_state_dict(dict(state), strict=False)
    except (RuntimeError, ValueError) as e:  # shape mismatch
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"teacher weights {source} do not fit the teacher: {' '.join(first[:3])[:300]}"
        ) from None
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if result.unexpected_keys:
            u = result.unexpected_keys
            parts.append(f"unexpected {u[:3]}{' ...' if len(u) > 3 else ''}")
        raise CheckpointError(f"teacher weights {source} do not fit the teacher model ({'; '.join(parts)})")


def build_teacher(
    spec: DistillConfig, *, num_classes: int, in_channels: int, device: torch.device | str = "cpu"
) -> nn.Module:
    """The frozen teacher: built from ``spec``, weights loaded strictly, eval mode, no gradients."""
    if spec.teacher is None:
        raise ConfigError("no teacher set (train.distill.teacher)")
    spec.validate()
    teacher = _build_teacher_model(spec.teacher.strip(), spec.teacher_kwargs, num_classes, in_channels)
    assert spec.checkpoint is not None
    load_teacher_weights(teacher, read_state_dict(spec.checkpoint), str(spec.checkpoint))
    teacher.to(device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


# ---------------------------------------------------------------------------------------------
# the objective


class DistillationLoss(nn.Module):
    r"""``loss(student_logits, target, inputs)`` = :math:`w L_{KD}(z^s, T(x)) + (1 - w)\,\mathrm{CE}(z^s, y)`.

    The teacher runs on ``inputs`` under ``torch.no_grad()`` in eval mode (also while the student
    trains). It is held outside the module tree (``teacher`` is not a submodule), so it is not in
    the student's ``state_dict``, not seen by the optimizers and not wrapped by DDP.

    Args:
        teacher: the frozen teacher (:func:`build_teacher`).
        weight, temperature, kind: as in :class:`DistillConfig`.
    """

    #: :func:`flipnet.train.fast.make_train_step` passes the input batch to losses that say so.
    takes_input = True

    def __init__(self, teacher: nn.Module, *, weight: float = 1.0, temperature: float = 1.0, kind: str = "cross_entropy") -> None:
        super().__init__()
        DistillConfig(teacher="x", checkpoint="x", weight=weight, temperature=temperature, kind=kind).validate()
        self.__dict__["teacher"] = teacher  # not a submodule (see the class docstring)
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.kind = kind

    @classmethod
    def from_spec(cls, spec: DistillConfig, *, num_classes: int, in_channels: int, device: torch.device | str = "cpu") -> "DistillationLoss":
        """Build the teacher of ``spec`` and the loss around it."""
        teacher = build_teacher(spec, num_classes=num_classes, in_channels=in_channels, device=device)
        return cls(teacher, weight=spec.weight, temperature=spec.temperature, kind=spec.kind)

    def teacher_logits(self, inputs: Tensor) -> Tensor:
        """Teacher outputs on ``inputs`` (no gradients, eval mode).

        The teacher follows the batch: it is moved (once) to the device of ``inputs``, and a
        floating-point batch is cast to the teacher's own dtype (under autocast both run in the
        autocast dtype), so a teacher built on another device or in another precision than the
        student still runs.
        """
        teacher: nn.Module = self.__dict__["teacher"]
        if teacher.training:
            teacher.eval()
        ref = next(iter(teacher.parameters()), None)
        if ref is None:
            ref = next(iter(teacher.buffers()), None)
        if ref is not None:
            if ref.device != inputs.device:
                teacher.to(inputs.device)
            if inputs.is_floating_point() and ref.is_floating_point() and inputs.dtype != ref.dtype:
                inputs = inputs.to(ref.dtype)
        with torch.no_grad():
            return teacher(inputs)

    def forward(self, student_logits: Tensor, target: Tensor, inputs: Tensor) -> Tensor:  # type: ignore[override]
        kd = distribution_loss(student_logits, self.teacher_logits(inputs), temperature=self.temperature, kind=self.kind)
        if self.weight >= 1.0:
            return kd
        ce = F.cross_entropy(student_logits.float(), target)
        return self.weight * kd + (1.0 - self.weight) * ce

    def extra_repr(self) -> str:
        t = type(self.__dict__["teacher"]).__name__
        return f"teacher={t}, weight={self.weight:g}, temperature={self.temperature:g}, kind={self.kind}"


def loss_from_config(config: Any, data: Any, device: torch.device | str = "cpu") -> DistillationLoss | None:
    """The training loss a recipe asks for: a :class:`DistillationLoss` when ``train.distill.teacher``
    is set (the teacher built for ``data``'s classes and channels, on ``device``), else ``None``
    (plain cross-entropy).
    """
    section = getattr(getattr(config, "train", None), "distill", None)
    spec = spec_from_section(section)
    if not spec.enabled:
        return None
    if getattr(data, "task", "classification") != "classification":
        raise ConfigError("train.distill needs a classification data set (the teacher's class distribution)")
    in_channels = int(data.input_shape[0])
    return DistillationLoss.from_spec(spec, num_classes=int(data.num_classes), in_channels=in_channels, device=device)
