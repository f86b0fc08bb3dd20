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
    :func:`apply_qbn` registers a :class:`QBNProjection` parametrization on the ``weight`` of each
    binary 3×3 convolution (:func:`torch.nn.utils.parametrize.register_parametrization`), so the
    forward pass uses the projected kernel :math:`c^\star(w)` while the stored parameter stays the
    same object: an optimizer built before keeps working. The gradient is straight-through:
    :math:`P(w) = w + (c^\star |w| - w)_{\text{no grad}}`, then the layer's own quantizer, so latent
    training (Adam/SGD through ``ste_sign``) and flip training (Bop flips ±1 weights from their
    gradient) both work unchanged. The codebook is fixed during fine-tuning. :func:`remove_qbn`
    is ``remove_parametrizations(..., leave_parametrized=True)``: the weight keeps its projection.

Size
    A layer with :math:`N` kernels stores :math:`N k` index bits plus :math:`2^k \cdot 9` codebook
    bits, i.e. :math:`k/9 + 2^k \cdot 9 / (9N)` bits per weight (:func:`qbn_bits`); k = 6 gives
    0.67 bits per weight plus the codebook.

Stored form
    :func:`stored_form` gives a :class:`QBNStored` (codebook codes and the indices bit-packed at
    exactly :math:`k` bits each with :func:`flipnet.compress.pack.pack_indices`, least significant
    bit first). Files use the one export format: :func:`flipnet.compress.export_model` writes QBN
    layers as indices plus codebook, :func:`flipnet.compress.export.load_qbn` reads them back as
    ``{name: QBNStored}`` and :func:`from_stored` puts them into a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..layers import BinaryConv2d, binary_modules
from ..quantizers import sign
from .codes import decode_kernels, encode_kernels, kernel_histogram, kernel_layers
from .pack import pack_indices, unpack_indices

__all__ = [
    "apply_qbn",
    "remove_qbn",
    "QBNProjection",
    "projection",
    "qbn_layers",
    "qbn_bits",
    "QBNStored",
    "to_stored",
    "from_stored",
    "select_codebook",
    "nearest_codewords",
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


# ----------------------------------------------------------------------------- the projection
class QBNProjection(nn.Module):
    r"""Parametrization of a binary convolution's ``weight``: every kernel goes to its codeword.

    Registered with :func:`torch.nn.utils.parametrize.register_parametrization` by
    :func:`apply_qbn`, so ``layer.weight`` reads :math:`P(w) = w + (c^\star(w)\,|w| - w)_{\text{no grad}}`:
    its value is the nearest codeword :math:`c^\star(w)` (see :func:`nearest_codewords`) scaled by
    the weight's own magnitudes, and its gradient passes straight through to the stored weight
    ``layer.parametrizations.weight.original`` (the same parameter object as before). The layer's
    quantizer then sees the projected signs with the original magnitudes: ``ste_sign`` gives
    :math:`c^\star` with the usual :math:`|w| \le 1` gradient mask, ``magnitude_aware_sign``
    :math:`\mathrm{mean}|w| \cdot c^\star`, and in flip mode (:math:`|w| = 1`) the weight is
    :math:`c^\star` itself. A weight of exactly 0 keeps the codeword's sign with magnitude
    ``torch.finfo(dtype).tiny``. Where a magnitude is computed from the weight (the per-channel
    mean of ``magnitude_aware_sign`` or ``scale="xnor"``), its value is that of the stored weight
    and its gradient :math:`\partial\,\mathrm{mean}|P(w)|/\partial w = c^\star/n` follows the
    projected signs.

    Attributes:
        codebook: ``(2^k, kh*kw)`` ±1 codewords (a buffer; it follows ``.to(device)``).
        k: index width.
        kernel_size: ``(kh, kw)``.
        distance: ``"hamming"`` or ``"magnitude"``.
    """

    codebook: Tensor

    def __init__(self, codes: Tensor, k: int, kernel_size: tuple[int, int], distance: str) -> None:
        super().__init__()
        self.kernel_size = (int(kernel_size[0]), int(kernel_size[1]))
        self.register_buffer("codebook", torch.empty(0), persistent=False)
        self._setup(codes, k, distance)

    def _setup(self, codes: Tensor, k: int, distance: str) -> None:
        k = check_k(k, self.kernel_size[0] * self.kernel_size[1])
        codes = torch.as_tensor(codes, dtype=torch.int64).reshape(-1).cpu()
        if len(codes) != 1 << k:
            raise ValueError(f"a codebook for k={k} must hold {1 << k} codes, got {len(codes)}")
        if distance not in ("hamming", "magnitude"):
            raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}")
        device = self.codebook.device
        self.codebook = codebook_signs(codes, self.kernel_size).to(device)
        self.k = k
        self.distance = distance

    @property
    def codes(self) -> Tensor:
        """The codebook as ``int64`` kernel codes ``(2^k,)``."""
        kh, kw = self.kernel_size
        return encode_kernels(self.codebook.reshape(-1, kh, kw)).cpu()

    def indices(self, weight: Tensor) -> Tensor:
        """Codeword index of every kernel of the stored ``weight``, ``(out, in / groups)`` ``int64``."""
        return nearest_codewords(weight.detach(), self.codebook, self.distance)  # type: ignore[arg-type]

    def project(self, weight: Tensor) -> Tensor:
        """The ±1 projected weight (no gradient), same shape and dtype as ``weight``."""
        idx = self.indices(weight)
        return self.codebook[idx.reshape(-1)].reshape(weight.shape).to(weight.dtype)

    def forward(self, weight: Tensor) -> Tensor:
        mag = weight.detach().abs()
        if weight.is_floating_point():
            mag = torch.where(mag > 0, mag, torch.full_like(mag, torch.finfo(weight.dtype).tiny))
        target = self.project(weight) * mag
        return weight + (target - weight).detach()

    def get_extra_state(self) -> dict:
        """``{"k", "distance", "codes"}``: the codebook travels with the state dict."""
        return {"k": self.k, "distance": self.distance, "codes": self.codes.clone()}

    def set_extra_state(self, state: dict) -> None:
        if isinstance(state, dict) and "codes" in state:
            self._setup(torch.as_tensor(state["codes"]), int(state["k"]), str(state["distance"]))

    def extra_repr(self) -> str:
        return f"k={self.k}, kernel_size={self.kernel_size}, distance={self.distance}"


def projection(layer: nn.Module) -> QBNProjection | None:
    """The :class:`QBNProjection` on ``layer.weight``, or ``None`` if the layer is not under QBN."""
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    for p in layer.parametrizations["weight"]:  # type: ignore[union-attr]
        if isinstance(p, QBNProjection):
            return p
    return None


def stored_weight(layer: nn.Module) -> Tensor:
    """The layer's weight parameter itself (the original one under a parametrization)."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations["weight"].original  # type: ignore[union-attr]
    return layer.weight  # type: ignore[return-value]


def qbn_layers(model: nn.Module) -> list[tuple[str, BinaryConv2d]]:
    """The binary convolutions of ``model`` under QBN projection, as ``(name, module)`` pairs."""
    return [(n, m) for n, m in binary_modules(model) if isinstance(m, BinaryConv2d) and projection(m) is not None]


def _attach(m: BinaryConv2d, codes: Tensor, k: int, distance: str) -> None:
    """Put ``m`` under projection onto ``codes`` (re-targeting an existing projection)."""
    if distance == "auto":
        distance = "hamming" if m.weight_mode == "flip" else "magnitude"
    p = projection(m)
    if p is not None:
        p._setup(codes, k, distance)
        return
    p = QBNProjection(codes, k, tuple(m.kernel_size), distance).to(stored_weight(m).device)
    parametrize.register_parametrization(m, "weight", p)


def apply_qbn(
    model: nn.Module,
    k: int,
    *,
    distance: Distance = "auto",
    codebooks: Mapping[str, Tensor] | None = None,
    exclude: Iterable[str] = (),
) -> dict[str, BinaryConv2d]:
    """Put every binary 3×3 convolution of ``model`` under QBN projection, in place.

    Each layer gets a :class:`QBNProjection` parametrization on its ``weight``; the weight
    parameter stays the same object, so an optimizer built before keeps training it.

    Args:
        model: a model with :class:`~flipnet.layers.BinaryConv2d` 3×3 layers.
        k: index width; the codebook holds ``2**k`` kernels (1..8).
        distance: ``"auto"`` (Hamming in flip mode, magnitude-weighted in latent mode),
            ``"hamming"`` or ``"magnitude"``.
        codebooks: optional ``{layer name: codes}`` to use instead of the layer's own most
            frequent kernels.
        exclude: layer names to leave at 1 bit per weight.

    Returns:
        ``{name: layer}`` of the converted layers (layers already under QBN are re-targeted).

    Raises:
        ValueError: if no layer qualifies or ``k`` is out of range.
    """
    k = check_k(k)
    if distance not in _DISTANCES:
        raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}")
    skip = set(exclude)
    out: dict[str, BinaryConv2d] = {}
    for name, m in kernel_layers(model):
        if name in skip:
            continue
        assert isinstance(m, BinaryConv2d)
        if codebooks is not None and name in codebooks:
            codes = torch.as_tensor(codebooks[name], dtype=torch.int64)
        else:
            # the layer's own signs: under QBN already, layer.weight would give the projected
            # kernels, i.e. at most the old codebook's 2^k' codes
            codes = select_codebook(encode_kernels(sign(stored_weight(m).detach()).reshape(-1, 3, 3)).cpu(), k)
        _attach(m, codes, k, distance)
        out[name] = m
    if not out:
        raise ValueError("the model has no binary 3×3 convolution to put under QBN (or all were excluded)")
    return out


@torch.no_grad()
def remove_qbn(model: nn.Module, bake: bool = True) -> list[str]:
    """Take the QBN projection off every layer, in place; returns the names of those layers.

    With ``bake`` (default) the weight keeps its projected value
    (``remove_parametrizations(..., leave_parametrized=True)``: flip mode the ±1 codewords,
    latent mode codeword × |w|); without, the stored weight is left as it was trained.
    """
    names = []
    for name, m in qbn_layers(model):
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=bake)
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
    """Bits of every layer with 1-bit weights: QBN layers at ``N k + 2^k kh kw``, others at 1 bit
    per weight (binary layers with real weights, ``weight_quantizer=None``, are left out).

    The last two entries are ``"total_qbn"`` (QBN layers only: the paper's "bits per weight" of
    the compressed convolutions) and ``"total"`` (all binary weights of the model).
    """
    rows: list[QBNLayerBits] = []
    for name, m in binary_modules(model):
        if not m.has_binary_weight:  # weight_quantizer=None: real weights, not counted as bits
            continue
        n = stored_weight(m).numel()
        p = projection(m)
        if p is not None:
            kh, kw = p.kernel_size
            kernels = n // (kh * kw)
            rows.append(QBNLayerBits(name, n, kernels, p.k, kernels * p.k, (1 << p.k) * kh * kw))
        else:
            rows.append(QBNLayerBits(name, n, 0, None, n, 0))
    if not rows:
        raise ValueError("the model has no binary layer with 1-bit weights")

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
    """Compressed weights of one QBN layer (how the export stores it, see ``docs/deployment.md``).

    Attributes:
        k: index width.
        kernel_size: ``(kh, kw)``.
        weight_shape: shape of the layer weight ``(out, in/groups, kh, kw)``.
        codebook: ``(2^k,)`` ``int64`` kernel codes (:mod:`flipnet.compress.codes`).
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

    def codebook_signs(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ±1 codebook ``(2^k, kh*kw)``."""
        return codebook_signs(self.codebook, self.kernel_size, dtype)

    def decode(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ±1 weight tensor."""
        return self.codebook_signs(dtype)[self.indices()].reshape(self.weight_shape)


def stored_form(layer: nn.Module) -> QBNStored | None:
    """The compressed form of a layer under QBN (codebook codes and ``k``-bit packed indices), else ``None``."""
    p = projection(layer)
    if p is None:
        return None
    w = stored_weight(layer)
    idx = p.indices(w).reshape(-1).cpu()
    return QBNStored(k=p.k, kernel_size=p.kernel_size, weight_shape=tuple(int(s) for s in w.shape),
                     codebook=p.codes.to(torch.int64), packed_indices=pack_indices(idx, p.k))


def to_stored(model: nn.Module) -> dict[str, QBNStored]:
    """``{layer name: QBNStored}`` for every QBN layer of ``model``."""
    out = {name: stored_form(m) for name, m in qbn_layers(model)}
    if not out:
        raise ValueError("the model has no QBN layer; call apply_qbn(model, k) first")
    return out  # type: ignore[return-value]


@torch.no_grad()
def from_stored(model: nn.Module, stored: Mapping[str, QBNStored], distance: Distance = "auto") -> nn.Module:
    """Load stored QBN layers into ``model`` (same architecture), in place, and return it.

    Each named layer's weight is set to the decoded ±1 kernels (latent mode: ±1 as the latent
    value) and the layer is put under QBN with the stored codebook, so its forward pass reproduces
    the stored weights exactly. ``stored`` comes from :func:`to_stored` or, for a file, from
    :func:`flipnet.compress.export.load_qbn`.
    """
    if not stored:
        raise ValueError("no stored QBN layers given")
    modules = dict(binary_modules(model))
    for name, s in stored.items():
        m = modules.get(name)
        if not isinstance(m, BinaryConv2d) or tuple(m.kernel_size) != tuple(s.kernel_size):
            raise KeyError(f"layer {name!r} of the stored QBN weights is not a binary "
                           f"{s.kernel_size[0]}×{s.kernel_size[1]} convolution of this model")
        w = stored_weight(m)
        if tuple(w.shape) != tuple(s.weight_shape):
            raise ValueError(f"layer {name!r}: stored weight shape {s.weight_shape} != model {tuple(w.shape)}")
        w.copy_(s.decode(w.dtype).to(w.device))
        _attach(m, s.codebook, s.k, distance)
    return model
