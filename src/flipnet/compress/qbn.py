r"""QBN: compress binary 3×3 kernels below one bit per weight with per-layer kernel codebooks.

Sun & Yao ("Weights having stable signs are important: finding primary subnetworks and kernels
to compress binary weight networks", the QBN method; see also Wang et al., "Sub-bit Neural
Networks", ICCV 2021, which restricts kernels to a subset of the 512 patterns the same way) note
that the 3×3 sign kernels of a trained binary-weight network concentrate on few of the
:math:`2^9` patterns. QBN keeps, per layer, a codebook of the :math:`K = 2^k` most frequent
kernels and stores every kernel as a :math:`k`-bit index into it.

Codebook
    :func:`select_codebook`: the :math:`2^k` most frequent codes of the layer (codes as in
    :mod:`flipnet.compress.codes`: bit :math:`i = 3r + c` is 1 where entry :math:`(r, c)` is +1),
    most frequent first, ties broken by the smaller code. A layer with fewer distinct kernels is
    padded with unused codes in increasing order, so the index is always exactly :math:`k` bits.

Projection
    Every kernel :math:`w \in \mathbb{R}^9` goes to the codeword :math:`c^\star \in \{\pm 1\}^9`
    of least distance

    .. math:: d(w, c) = \sum_{j=1}^{9} |w_j|\, 1[\mathrm{sign}(w_j) \ne c_j]
                      = \tfrac12\Big(\sum_j |w_j| - w \cdot c\Big),

    the magnitude-weighted distance for latent weights (``distance="magnitude"``); for binary
    weights (:math:`|w_j| = 1`, ``distance="hamming"``) it is the Hamming distance
    :math:`(9 - w\cdot c)/2`. Both are minimised by :math:`\arg\max_c\, w \cdot c`, one matrix
    product; ties go to the lower index, i.e. to the more frequent codeword.

Fine-tuning
    :class:`QBNConv2d` is a :class:`~flipnet.layers.BinaryConv2d` whose forward pass uses the
    projected kernel :math:`c^\star(w)`. The gradient is the straight-through estimator of the
    layer's own quantizer: :math:`\tilde w = q(w) + (c^\star - q(w))_{\text{no grad}}`, so latent
    training (Adam/SGD through ``ste_sign``) and flip training (Bop flips ±1 weights from their
    gradient) both work unchanged. :func:`apply_qbn` converts layers *in place* (the class of the
    module changes, its parameters stay the same objects), so an optimizer built before keeps
    working; the codebook is fixed during fine-tuning.

Size
    A layer with :math:`N` kernels stores :math:`N k` index bits plus :math:`2^k \cdot 9` codebook
    bits, i.e. :math:`k/9 + 2^k \cdot 9 / (9N)` bits per weight (:func:`qbn_bits`); k = 6 gives
    0.67 bits per weight plus the codebook.

Stored form
    :meth:`QBNConv2d.to_stored` gives a :class:`QBNStored` (the codebook as ``int16`` codes and the
    indices bit-packed at exactly :math:`k` bits each with
    :func:`flipnet.compress.pack.pack_indices`, least significant bit first);
    :meth:`QBNStored.to_tensors` / :meth:`QBNStored.from_tensors` map it to and from a flat
    ``{name: tensor}`` dict for safetensors (:func:`save_qbn`, :func:`load_qbn`), and
    :func:`from_stored` rebuilds a model's QBN layers from it.

For exporters: a QBN layer is ``isinstance(m, QBNConv2d)`` (also ``hasattr(m, "qbn_codebook")``);
``m.qbn_codebook`` is the ``(2^k, kh*kw)`` ±1 codebook (row-major kernel entries), ``m.qbn_codes``
the same as ``int64`` codes, ``m.qbn_indices`` the ``(out_channels, in_channels/groups)`` ``int64``
index of each kernel, ``m.qbn_k`` the index width, and ``m.binary_weight()`` the projected ±1 weight.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..layers import BinaryConv2d, binary_modules
from ..quantizers import sign
from .codes import decode_kernels, encode_kernels, kernel_histogram, kernel_layers
from .pack import pack_indices, unpack_indices

__all__ = [
    "MAX_QBN_BITS",
    "Distance",
    "select_codebook",
    "codebook_signs",
    "nearest_codewords",
    "QBNConv2d",
    "QBNStored",
    "QBNLayerBits",
    "apply_qbn",
    "remove_qbn",
    "qbn_layers",
    "qbn_bits",
    "to_stored",
    "from_stored",
    "save_qbn",
    "load_qbn",
]

#: Largest index width (a codebook of 256 of the 512 3×3 patterns).
MAX_QBN_BITS = 8
Distance = Literal["auto", "hamming", "magnitude"]
_DISTANCES = ("auto", "hamming", "magnitude")


def check_k(k: int, n_bits: int = 9) -> int:
    """``k`` as an int if it is a valid index width (1..8, at most the kernel's entries), else ``ValueError``."""
    top = min(MAX_QBN_BITS, n_bits)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= top:
        raise ValueError(f"the QBN index width k must be an integer in 1..{top} (codebook of 2^k kernels), got {k!r}")
    return int(k)


def select_codebook(codes: Tensor, k: int, n_bits: int = 9) -> Tensor:
    """The ``2**k`` most frequent codes in ``codes`` (most frequent first, ties: smaller code).

    Unused codes (in increasing order) pad the codebook when fewer than ``2**k`` distinct kernels
    occur. Returns an ``int64`` tensor of ``2**k`` distinct codes.
    """
    k = check_k(k, n_bits)
    counts = kernel_histogram(codes, n_bits).numpy()
    order = np.lexsort((np.arange(len(counts)), -counts))  # count descending, then code ascending
    return torch.as_tensor(order[: 1 << k].copy(), dtype=torch.int64)


def codebook_signs(codes: Tensor, kernel_size: tuple[int, int] = (3, 3), dtype: torch.dtype = torch.float32) -> Tensor:
    """Codes ``(K,)`` → ±1 codebook ``(K, kh*kw)`` (row-major kernel entries)."""
    return decode_kernels(codes, kernel_size, dtype).reshape(len(codes), -1)


def nearest_codewords(kernels: Tensor, codebook: Tensor, distance: Literal["hamming", "magnitude"] = "hamming") -> Tensor:
    """Index of the nearest codeword of each kernel.

    Args:
        kernels: ``(N, kh*kw)`` or ``(..., kh, kw)`` real or ±1 weights.
        codebook: ``(K, kh*kw)`` ±1 codewords.
        distance: ``"hamming"`` (on ``sign(kernels)``) or ``"magnitude"``
            (:math:`\\sum_j |w_j| 1[\\mathrm{sign}(w_j) \\ne c_j]`).

    Returns:
        ``int64`` indices of shape ``kernels.shape[:-1]`` (``[:-2]`` for ``(..., kh, kw)`` input);
        ties go to the lower index.
    """
    if distance not in ("hamming", "magnitude"):
        raise ValueError(f"distance must be 'hamming' or 'magnitude', got {distance!r}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must have shape (K, entries), got {tuple(codebook.shape)}")
    n = codebook.shape[1]
    if kernels.shape[-1] == n:
        lead, flat = kernels.shape[:-1], kernels.reshape(-1, n)
    elif kernels.dim() >= 2 and kernels.shape[-1] * kernels.shape[-2] == n:
        lead, flat = kernels.shape[:-2], kernels.reshape(-1, n)
    else:
        raise ValueError(f"kernels of shape {tuple(kernels.shape)} do not match codewords of {n} entries")
    flat = flat.detach()
    if distance == "hamming":
        flat = sign(flat)
    # argmin_c sum_j |w_j| 1[sign w_j != c_j] = argmin_c (sum|w| - w.c)/2 = argmax_c w.c
    scores = flat.to(torch.float32) @ codebook.to(device=flat.device, dtype=torch.float32).t()
    return scores.argmax(dim=1).reshape(lead)


# ----------------------------------------------------------------------------- the layer
class QBNConv2d(BinaryConv2d):
    """A :class:`~flipnet.layers.BinaryConv2d` whose kernels are projected onto a codebook.

    Made by :func:`apply_qbn` (in place) rather than constructed directly. See the module
    docstring for the projection and its straight-through gradient.

    Attributes:
        qbn_codebook: ``(2^k, kh*kw)`` ±1 codewords (a buffer; it follows ``.to(device)``).
        qbn_k: index width k.
        qbn_distance: ``"hamming"`` or ``"magnitude"``.
    """

    qbn_codebook: Tensor
    qbn_k: int
    qbn_distance: str

    def _qbn_setup(self, codes: Tensor, k: int, distance: str) -> None:
        k = check_k(k, self.kernel_size[0] * self.kernel_size[1])
        if len(codes) != 1 << k:
            raise ValueError(f"a codebook for k={k} must hold {1 << k} codes, got {len(codes)}")
        if distance == "auto":
            distance = "hamming" if self.weight_mode == "flip" else "magnitude"
        if distance not in ("hamming", "magnitude"):
            raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}")
        cb = codebook_signs(codes.cpu(), tuple(self.kernel_size), self.weight.dtype).to(self.weight.device)
        if "qbn_codebook" in self._buffers:
            self._buffers["qbn_codebook"] = cb
        else:
            self.register_buffer("qbn_codebook", cb, persistent=False)
        self.qbn_k = k
        self.qbn_distance = distance

    @property
    def qbn_codes(self) -> Tensor:
        """The codebook as ``int64`` kernel codes ``(2^k,)``."""
        kh, kw = self.kernel_size
        return encode_kernels(self.qbn_codebook.reshape(-1, kh, kw)).cpu()

    @property
    def qbn_indices(self) -> Tensor:
        """Codeword index of every kernel, ``(out_channels, in_channels / groups)`` ``int64``."""
        return nearest_codewords(self.weight.detach(), self.qbn_codebook, self.qbn_distance)  # type: ignore[arg-type]

    def projected_signs(self) -> Tensor:
        """The ±1 weight after projection (no gradient), same shape as ``weight``."""
        idx = self.qbn_indices
        return self.qbn_codebook[idx.reshape(-1)].reshape(self.weight.shape).to(self.weight.dtype)

    def quantized_weight(self) -> Tensor:
        q = super().quantized_weight()
        # keep the quantizer's magnitude (1 for ste_sign; the channel mean for magnitude_aware_sign)
        mag = q.detach().abs()
        target = self.projected_signs() * torch.where(mag > 0, mag, torch.ones_like(mag))
        if q.requires_grad:
            return q + (target - q).detach()
        return target

    def binary_weight(self) -> Tensor:
        return self.projected_signs()

    def to_stored(self) -> "QBNStored":
        """The compressed form: codebook codes and ``k``-bit packed indices."""
        idx = self.qbn_indices.reshape(-1)
        return QBNStored(
            k=self.qbn_k,
            kernel_size=(int(self.kernel_size[0]), int(self.kernel_size[1])),
            weight_shape=tuple(int(s) for s in self.weight.shape),
            codebook=self.qbn_codes.to(torch.int64),
            packed_indices=pack_indices(idx.cpu(), self.qbn_k),
        )

    def get_extra_state(self) -> dict:
        state = super().get_extra_state()
        state.update(qbn_k=self.qbn_k, qbn_distance=self.qbn_distance, qbn_codes=self.qbn_codes.clone())
        return state

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        if isinstance(state, dict) and "qbn_codes" in state:
            self._qbn_setup(torch.as_tensor(state["qbn_codes"]), int(state["qbn_k"]), str(state["qbn_distance"]))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", qbn_k={self.qbn_k}, qbn_distance={self.qbn_distance}"


def qbn_layers(model: nn.Module) -> list[tuple[str, QBNConv2d]]:
    """The QBN layers of ``model`` as ``(name, module)`` pairs."""
    return [(n, m) for n, m in binary_modules(model) if isinstance(m, QBNConv2d)]


def apply_qbn(
    model: nn.Module,
    k: int,
    *,
    distance: Distance = "auto",
    codebooks: Mapping[str, Tensor] | None = None,
    exclude: Iterable[str] = (),
) -> dict[str, QBNConv2d]:
    """Put every binary 3×3 convolution of ``model`` under QBN projection, in place.

    Args:
        model: a model with :class:`~flipnet.layers.BinaryConv2d` 3×3 layers.
        k: index width; the codebook holds ``2**k`` kernels (1..8).
        distance: ``"auto"`` (Hamming in flip mode, magnitude-weighted in latent mode),
            ``"hamming"`` or ``"magnitude"``.
        codebooks: optional ``{layer name: codes}`` to use instead of the layer's own most
            frequent kernels (e.g. from :func:`load_qbn`).
        exclude: layer names to leave at 1 bit per weight.

    Returns:
        ``{name: layer}`` of the converted layers (already-QBN layers are re-targeted).

    Raises:
        ValueError: if no layer qualifies or ``k`` is out of range.
    """
    k = check_k(k)
    if distance not in _DISTANCES:
        raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}")
    skip = set(exclude)
    out: dict[str, QBNConv2d] = {}
    for name, m in kernel_layers(model):
        if name in skip:
            continue
        if codebooks is not None and name in codebooks:
            codes = torch.as_tensor(codebooks[name], dtype=torch.int64)
        else:
            # the layer's own signs: for a layer already under QBN, binary_weight() would give the
            # projected kernels, i.e. at most the old codebook's 2^k' codes
            codes = select_codebook(encode_kernels(BinaryConv2d.binary_weight(m).reshape(-1, 3, 3)).cpu(), k)
        if not isinstance(m, QBNConv2d):
            m.__class__ = QBNConv2d
        assert isinstance(m, QBNConv2d)
        m._qbn_setup(codes, k, distance)
        out[name] = m
    if not out:
        raise ValueError("the model has no binary 3×3 convolution to put under QBN (or all were excluded)")
    return out


@torch.no_grad()
def remove_qbn(model: nn.Module, bake: bool = True) -> list[str]:
    """Turn QBN layers back into plain :class:`~flipnet.layers.BinaryConv2d`, in place.

    With ``bake`` the weight is first set so that its signs are the projected kernels (flip mode:
    the ±1 codewords; latent mode: codeword × max(|w|, 1e-8), keeping magnitudes). Returns the
    names of the converted layers.
    """
    names = []
    for name, m in qbn_layers(model):
        if bake:
            target = m.projected_signs()
            if m.weight_mode == "flip":
                m.weight.copy_(target)
            else:
                m.weight.copy_(target * m.weight.abs().clamp_min(1e-8))
        del m._buffers["qbn_codebook"]
        for attr in ("qbn_k", "qbn_distance"):
            m.__dict__.pop(attr, None)
        m.__class__ = BinaryConv2d
        names.append(name)
    return names


# ----------------------------------------------------------------------------- bits
@dataclass(frozen=True)
class QBNLayerBits:
    """Storage of one layer's binary weights.

    ``k is None`` for a layer stored at 1 bit per weight (not under QBN); ``name="total"`` sums.
    """

    name: str
    weights: int
    kernels: int
    k: int | None
    index_bits: int
    codebook_bits: int

    @property
    def bits(self) -> int:
        return self.index_bits + self.codebook_bits

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights if self.weights else float("nan")


def qbn_bits(model: nn.Module) -> list[QBNLayerBits]:
    """Bits of every binary layer: QBN layers at ``N k + 2^k kh kw``, others at 1 bit per weight.

    The last two entries are ``"total_qbn"`` (QBN layers only: the paper's "bits per weight" of
    the compressed convolutions) and ``"total"`` (all binary weights of the model).
    """
    rows: list[QBNLayerBits] = []
    for name, m in binary_modules(model):
        n = m.weight.numel()
        if isinstance(m, QBNConv2d):
            kh, kw = m.kernel_size
            kernels = n // (kh * kw)
            rows.append(QBNLayerBits(name, n, kernels, m.qbn_k, kernels * m.qbn_k, (1 << m.qbn_k) * kh * kw))
        else:
            rows.append(QBNLayerBits(name, n, 0, None, n, 0))
    if not rows:
        raise ValueError("the model has no binary layer")

    def total(label: str, sel: list[QBNLayerBits]) -> QBNLayerBits:
        return QBNLayerBits(
            label,
            sum(r.weights for r in sel),
            sum(r.kernels for r in sel),
            None,
            sum(r.index_bits for r in sel),
            sum(r.codebook_bits for r in sel),
        )

    rows.append(total("total_qbn", [r for r in rows if r.k is not None]))
    rows.append(total("total", rows[:-1]))
    return rows


# ----------------------------------------------------------------------------- stored form
@dataclass
class QBNStored:
    """Compressed weights of one QBN layer.

    Attributes:
        k: index width.
        kernel_size: ``(kh, kw)``.
        weight_shape: shape of the layer weight ``(out, in/groups, kh, kw)``.
        codebook: ``(2^k,)`` ``int64`` kernel codes (``int16`` in :meth:`to_tensors`).
        packed_indices: ``uint8`` bytes, ``k`` bits per kernel, LSB first
            (:func:`flipnet.compress.pack.pack_indices`).
    """

    k: int
    kernel_size: tuple[int, int]
    weight_shape: tuple[int, ...]
    codebook: Tensor
    packed_indices: Tensor

    @property
    def n_kernels(self) -> int:
        return int(np.prod(self.weight_shape)) // (self.kernel_size[0] * self.kernel_size[1])

    @property
    def nbits(self) -> int:
        """Payload bits: ``N k`` index bits plus ``2^k kh kw`` codebook bits."""
        return self.n_kernels * self.k + len(self.codebook) * self.kernel_size[0] * self.kernel_size[1]

    def indices(self) -> Tensor:
        return unpack_indices(self.packed_indices.reshape(-1).to(torch.uint8), self.k, self.n_kernels)

    def decode(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ±1 weight tensor."""
        cb = codebook_signs(self.codebook, self.kernel_size, dtype)
        return cb[self.indices()].reshape(self.weight_shape)

    def to_tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """Flat tensors for safetensors: ``{prefix}qbn_codebook`` (int16 codes; 9-bit codes fit),
        ``{prefix}qbn_indices`` (packed uint8) and ``{prefix}qbn_meta`` (int64: k, kh, kw, shape...)."""
        meta = torch.tensor([self.k, *self.kernel_size, *self.weight_shape], dtype=torch.int64)
        return {
            f"{prefix}qbn_codebook": self.codebook.to(torch.int16).contiguous(),
            f"{prefix}qbn_indices": self.packed_indices.to(torch.uint8).contiguous(),
            f"{prefix}qbn_meta": meta,
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], prefix: str = "") -> "QBNStored":
        """Inverse of :meth:`to_tensors`; checks sizes and raises ``ValueError`` on a mismatch."""
        try:
            meta = [int(v) for v in tensors[f"{prefix}qbn_meta"].tolist()]
            codebook = tensors[f"{prefix}qbn_codebook"].to(torch.int64)
            packed = tensors[f"{prefix}qbn_indices"].to(torch.uint8)
        except KeyError as e:
            raise ValueError(f"QBN tensors for {prefix!r} are incomplete: missing {e.args[0]!r}") from None
        if len(meta) < 4:
            raise ValueError(f"QBN metadata for {prefix!r} is malformed")
        k, kh, kw, shape = meta[0], meta[1], meta[2], tuple(meta[3:])
        if kh < 1 or kw < 1 or any(s < 0 for s in shape):
            raise ValueError(f"QBN metadata for {prefix!r} is malformed (kernel {kh}×{kw}, weight shape {shape})")
        check_k(k, kh * kw)
        if len(codebook) != 1 << k:
            raise ValueError(f"QBN codebook for {prefix!r} holds {len(codebook)} codes, expected {1 << k}")
        stored = cls(k, (kh, kw), shape, codebook, packed)
        if int(np.prod(shape)) % (kh * kw):
            raise ValueError(f"QBN weight shape {shape} is not made of {kh}×{kw} kernels")
        if packed.numel() != math.ceil(stored.n_kernels * k / 8):
            raise ValueError(f"QBN indices for {prefix!r} hold {packed.numel()} bytes, expected "
                             f"{math.ceil(stored.n_kernels * k / 8)}")
        return stored


def to_stored(model: nn.Module) -> dict[str, QBNStored]:
    """``{layer name: QBNStored}`` for every QBN layer of ``model``."""
    out = {name: m.to_stored() for name, m in qbn_layers(model)}
    if not out:
        raise ValueError("the model has no QBN layer; call apply_qbn(model, k) first")
    return out


@torch.no_grad()
def from_stored(model: nn.Module, stored: Mapping[str, QBNStored], distance: Distance = "auto") -> nn.Module:
    """Load stored QBN layers into ``model`` (same architecture), in place, and return it.

    Each named layer's weight is set to the decoded ±1 kernels (latent mode: ±1 as the latent
    value) and the layer is put under QBN with the stored codebook, so its forward pass reproduces
    the stored weights exactly.
    """
    if not stored:
        raise ValueError("no stored QBN layers given")
    modules = dict(binary_modules(model))
    for name, s in stored.items():
        m = modules.get(name)
        if not isinstance(m, BinaryConv2d) or tuple(m.kernel_size) != tuple(s.kernel_size):
            raise KeyError(f"layer {name!r} of the stored QBN weights is not a binary "
                           f"{s.kernel_size[0]}×{s.kernel_size[1]} convolution of this model")
        if tuple(m.weight.shape) != tuple(s.weight_shape):
            raise ValueError(f"layer {name!r}: stored weight shape {s.weight_shape} != model {tuple(m.weight.shape)}")
        m.weight.copy_(s.decode(m.weight.dtype).to(m.weight.device))
        if not isinstance(m, QBNConv2d):
            m.__class__ = QBNConv2d
        assert isinstance(m, QBNConv2d)
        m._qbn_setup(s.codebook, s.k, distance)
    return model


def save_qbn(path: str | Path, model_or_stored: nn.Module | Mapping[str, QBNStored], metadata: Mapping[str, str] | None = None) -> Path:
    """Write the stored QBN layers to a safetensors file (keys ``<layer>.qbn_*``), atomically."""
    from safetensors.torch import save_file

    from ..utils import atomic_path

    stored = to_stored(model_or_stored) if isinstance(model_or_stored, nn.Module) else dict(model_or_stored)
    tensors: dict[str, Tensor] = {}
    for name, s in stored.items():
        tensors.update(s.to_tensors(f"{name}."))
    meta = {"format": "flipnet-qbn", "version": "1", "layers": json.dumps(list(stored))}
    meta.update(metadata or {})
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_qbn(path: str | Path) -> dict[str, QBNStored]:
    """Read a file written by :func:`save_qbn`."""
    from safetensors import safe_open

    from ..errors import ExportFormatError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no QBN file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types on malformed files
        raise ExportFormatError(f"{path} is not a readable safetensors file ({e})") from None
    if meta.get("format") != "flipnet-qbn":
        raise ExportFormatError(f"{path} is not a flipnet QBN file (format={meta.get('format')!r})")
    try:
        return {name: QBNStored.from_tensors(tensors, f"{name}.") for name in json.loads(meta["layers"])}
    except (ValueError, KeyError) as e:
        raise ExportFormatError(f"{path}: {e}") from None
