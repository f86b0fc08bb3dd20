"""Bit packing: byte, word and k-bit index layouts round-trip; bad input is rejected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flipnet.compress.pack import pack_bits, pack_indices, pack_words, unpack_bits, unpack_indices, unpack_words

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def signs_and_dim(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    shape = draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
    if draw(st.booleans()):  # long dims cross byte and word boundaries
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(60, 200))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.int8, torch.int64, torch.float64]))
    t = (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(dtype)
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    return t, dim


@SETTINGS
@given(signs_and_dim())
def test_pack_bits_round_trip_and_numpy_compatible(case: tuple[torch.Tensor, int]) -> None:
    t, dim = case
    p = pack_bits(t, dim=dim)
    assert p.dtype == torch.uint8
    assert p.shape[dim] == -(-t.shape[dim] // 8)
    np.testing.assert_array_equal(p.numpy(), np.packbits(t.numpy() > 0, axis=dim % t.dim()))
    back = unpack_bits(p, t.shape, dim=dim, dtype=t.dtype)
    assert back.dtype == t.dtype
    assert torch.equal(back, t)
    assert torch.equal(unpack_bits(p, t.shape, dim=dim, dtype=torch.bool), t > 0)


@SETTINGS
@given(signs_and_dim())
def test_pack_words_round_trip(case: tuple[torch.Tensor, int]) -> None:
    t, dim = case
    w = pack_words(t, dim=dim)
    assert w.dtype == torch.int64
    assert w.shape[dim] == -(-t.shape[dim] // 64)
    assert torch.equal(unpack_words(w, t.shape[dim], dim=dim, dtype=t.dtype), t)


def test_pack_words_bit_order_is_lsb_first() -> None:
    t = -torch.ones(70)
    t[0] = 1
    t[63] = 1
    t[64] = 1
    w = pack_words(t)
    assert w.tolist() == [1 | -(2**63), 1]


def test_pack_bits_accepts_bool_and_orders_msb_first() -> None:
    t = torch.tensor([True, False, False, False, False, False, False, True, True])
    assert pack_bits(t).tolist() == [0b10000001, 0b10000000]


@SETTINGS
@given(st.integers(1, 8), st.integers(0, 300), st.integers(0, 2**31 - 1))
def test_indices_round_trip(k: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 2**k, (n,), generator=g)
    p = pack_indices(idx, k)
    assert p.dtype == torch.uint8 and p.numel() == -(-n * k // 8)
    assert torch.equal(unpack_indices(p, k, n), idx)


def test_indices_layout_lsb_first() -> None:
    # indices 1 (=001) and 6 (=110) with k=3: stream bits 1,0,0, 0,1,1 -> byte 0b00110001
    assert pack_indices(torch.tensor([1, 6]), 3).tolist() == [0b00110001]


def test_indices_keep_any_integer_shape() -> None:
    idx = torch.randint(0, 16, (3, 5, 7), dtype=torch.int32)
    assert torch.equal(unpack_indices(pack_indices(idx, 4), 4, idx.numel()).view(3, 5, 7), idx.long())


@pytest.mark.parametrize("bad", [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.5]), torch.tensor([float("nan"), 1.0]), torch.tensor([2, -1])])
def test_non_binary_values_rejected(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="only -1 and \\+1"):
        pack_bits(bad)
    with pytest.raises(ValueError, match="only -1 and \\+1"):
        pack_words(bad)


@pytest.mark.parametrize("k", [0, 9, -1, 2.0, True, "3"])
def test_wrong_k_rejected(k: object) -> None:
    with pytest.raises(ValueError, match="k \\(bits per index\\)"):
        pack_indices(torch.tensor([0, 1]), k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k \\(bits per index\\)"):
        unpack_indices(torch.zeros(1, dtype=torch.uint8), k, 1)  # type: ignore[arg-type]


def test_index_out_of_range_rejected() -> None:
    with pytest.raises(ValueError, match="must lie in \\[0, 8\\)"):
        pack_indices(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="must lie in"):
        pack_indices(torch.tensor([-1]), 3)
    with pytest.raises(ValueError, match="integer tensor"):
        pack_indices(torch.tensor([0.0]), 3)


def test_shape_mismatch_rejected() -> None:
    p = pack_bits(torch.ones(3, 17))
    with pytest.raises(ValueError, match="needs"):
        unpack_bits(p, (3, 25))
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(p.to(torch.int32), (3, 17))
    with pytest.raises(ValueError, match="out of range"):
        unpack_bits(p, (3, 17), dim=2)
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack_words(pack_words(torch.ones(65)), 200)
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack_indices(pack_indices(torch.tensor([1, 2, 3]), 4), 4, 5)


def test_package_exports_are_plain_and_stable() -> None:
    import flipnet.compress as compress
    from flipnet.compress._summary import summary

    assert compress.summary is summary  # the function: the module is the private _summary
    assert compress.qbn.__name__ == "flipnet.compress.qbn"
    assert all(hasattr(compress, name) for name in compress.__all__)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        compress.not_a_name  # noqa: B018
