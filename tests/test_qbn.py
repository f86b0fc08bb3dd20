"""QBN codebooks, projection parametrization, bit counts and stored form (flipnet.compress.qbn)."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flipnet.compress.codes import decode_kernels, encode_kernels
from flipnet.compress.export import export_model, load_qbn
from flipnet.compress.qbn import (
    apply_qbn,
    codebook_signs,
    from_stored,
    nearest_codewords,
    projection,
    qbn_bits,
    qbn_layers,
    remove_qbn,
    select_codebook,
    stored_weight,
    to_stored,
)
from flipnet.errors import ExportFormatError
from flipnet.layers import BinaryConv2d, BinaryLinear

torch.set_num_threads(1)


def _model(mode: str = "latent", seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        BinaryConv2d(2, 8, 3, padding=1, weight_mode=mode),
        nn.BatchNorm2d(8),
        BinaryConv2d(8, 16, 3, padding=1, weight_mode=mode),
        nn.BatchNorm2d(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        BinaryLinear(16, 4, weight_mode=mode),
    )


def test_select_codebook_order_ties_and_padding() -> None:
    codes = torch.tensor([7, 7, 7, 3, 3, 9, 9, 100])
    assert select_codebook(codes, 1).tolist() == [7, 3]  # 3 and 9 tie: the smaller code first
    assert select_codebook(codes, 2).tolist() == [7, 3, 9, 100]
    # fewer distinct kernels than 2^k: padded with unused codes in increasing order
    assert select_codebook(codes, 3).tolist() == [7, 3, 9, 100, 0, 1, 2, 4]
    cb = select_codebook(torch.randint(0, 512, (1000,)), 8)
    assert len(cb) == 256 and len(set(cb.tolist())) == 256
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="k must be an integer in 1..8"):
            select_codebook(codes, bad)  # type: ignore[arg-type]


def _brute_force(kernels: torch.Tensor, codebook: torch.Tensor, distance: str) -> torch.Tensor:
    out = []
    for w in kernels.reshape(-1, 9):
        s = torch.where(w >= 0, 1.0, -1.0)
        mag = torch.ones(9) if distance == "hamming" else w.abs()
        d = [(mag * (s != c).float()).sum().item() for c in codebook]
        best = min(d)
        out.append(next(i for i, v in enumerate(d) if v == best))  # ties: lowest index
    return torch.tensor(out)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["hamming", "magnitude"]),
)
def test_nearest_codeword_is_brute_force_nearest(k: int, seed: int, distance: str) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randperm(512, generator=g)[: 1 << k]
    cb = codebook_signs(codes)
    kernels = torch.randn(40, 3, 3, generator=g)
    kernels[0] = 0.0  # sign(0) = +1 and zero magnitudes
    kernels[1] = decode_kernels(codes[:1])[0]  # an exact codeword
    idx = nearest_codewords(kernels, cb, distance)  # type: ignore[arg-type]
    assert idx.shape == (40,)
    expected = _brute_force(kernels, cb, distance)
    # the returned codeword has the minimal distance (ties may legitimately differ in index
    # only through float rounding, so compare distances, then indices where the minimum is unique)
    for w, i, j in zip(kernels.reshape(-1, 9), idx, expected):
        s = torch.where(w >= 0, 1.0, -1.0)
        mag = torch.ones(9) if distance == "hamming" else w.abs()
        di = (mag * (s != cb[i]).float()).sum()
        dj = (mag * (s != cb[j]).float()).sum()
        assert di.item() == pytest.approx(dj.item(), abs=1e-5)
    assert int(idx[1]) == 0
    if distance == "hamming":
        assert torch.equal(idx, expected)  # integer distances: exact, ties to the lower index


def test_projection_in_forward_and_ste_gradient() -> None:
    m = _model()
    conv: BinaryConv2d = m[2]  # type: ignore[assignment]
    w_before = conv.weight
    apply_qbn(m, 2)
    p = projection(conv)
    assert p is not None and stored_weight(conv) is w_before  # in place, same parameter
    assert conv.parametrizations.weight.original is w_before
    w = stored_weight(conv)
    x = torch.randn(3, 8, 5, 5)
    target = p.project(w)
    # every kernel is a codeword, and the one nearest (magnitude-weighted) to its latent weight
    codes = encode_kernels(target.reshape(-1, 3, 3))
    assert set(codes.tolist()) <= set(p.codes.tolist())
    assert torch.equal(p.indices(w), nearest_codewords(w.detach(), p.codebook, "magnitude"))
    out = conv(x)
    assert torch.allclose(out, F.conv2d(x, target, padding=1), atol=1e-6)
    # STE: the gradient is that of the projected weight, masked by |w| <= 1 (ste_sign)
    out.square().sum().backward()
    w_ref = target.clone().requires_grad_(True)
    F.conv2d(x, w_ref, padding=1).square().sum().backward()
    mask = (w.detach().abs() <= 1).float()
    assert torch.allclose(w.grad, w_ref.grad * mask, atol=1e-5)
    assert torch.equal(conv.binary_weight(), target)


def test_flip_mode_uses_hamming_and_bits() -> None:
    m = _model("flip")
    layers = apply_qbn(m, 3)
    assert set(layers) == {"0", "2"}
    assert all(projection(layer).distance == "hamming" for layer in layers.values())
    bits = {b.name: b for b in qbn_bits(m)}
    # layer "2": 16*8 = 128 kernels, k=3: 384 index bits + 8*9 codebook bits
    assert bits["2"].index_bits == 128 * 3 and bits["2"].codebook_bits == 8 * 9
    assert bits["2"].bits_per_weight == pytest.approx((384 + 72) / 1152)
    assert bits["0"].index_bits == 16 * 3 and bits["0"].codebook_bits == 72
    assert bits["6"].k is None and bits["6"].bits == 64  # linear layer: 1 bit per weight
    assert bits["total_qbn"].weights == 144 + 1152 and bits["total_qbn"].bits == 48 + 72 + 384 + 72
    assert bits["total"].bits == bits["total_qbn"].bits + 64
    assert bits["total"].weights == 144 + 1152 + 64


def test_k6_gives_two_thirds_bit_plus_codebook() -> None:
    conv = BinaryConv2d(64, 64, 3)
    apply_qbn(nn.Sequential(conv), 6)
    (b, *_rest) = qbn_bits(nn.Sequential(conv))
    # 0.667 bits per weight of indices plus the 64×9-bit codebook spread over 36,864 weights
    assert b.index_bits / b.weights == pytest.approx(6 / 9)
    assert b.bits_per_weight == pytest.approx(6 / 9 + 64 * 9 / (64 * 64 * 9))


def test_stored_round_trip_and_file(tmp_path) -> None:
    m = _model()
    apply_qbn(m, 3)
    stored = to_stored(m)
    for name, s in stored.items():
        layer = dict(qbn_layers(m))[name]
        assert s.packed_indices.dtype == torch.uint8
        assert s.packed_indices.numel() == math.ceil(s.n_kernels * 3 / 8)
        assert s.nbits == s.n_kernels * 3 + 8 * 9
        assert torch.equal(s.decode(), layer.binary_weight())
    # one file format: the export stores QBN layers as indices + codebook, load_qbn reads them back
    path = tmp_path / "q.safetensors"
    export_model(m, path)
    loaded = load_qbn(path)
    assert list(loaded) == ["0", "2"]
    for name, s in loaded.items():
        assert s.k == 3 and torch.equal(s.decode(), stored[name].decode())
        assert torch.equal(s.codebook, stored[name].codebook)
    # a fresh model (other random weights) loaded from the file computes exactly the same
    fresh = _model(seed=1)
    fresh.load_state_dict({k: v for k, v in _plain_state(m).items() if "weight" not in k or k.startswith("1.")
                           or k.startswith("3.") or k.startswith("6.")}, strict=False)
    fresh[6].weight.data.copy_(m[6].weight.data)
    from_stored(fresh, loaded)
    m.eval()
    fresh.eval()
    x = torch.randn(2, 2, 6, 6)
    assert torch.allclose(fresh(x), m(x), atol=1e-5)
    # corrupt files are refused with a clear error
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ExportFormatError):
        load_qbn(bad)
    with pytest.raises(ExportFormatError, match="no export file"):
        load_qbn(tmp_path / "missing.safetensors")


def _plain_state(m: nn.Module) -> dict[str, torch.Tensor]:
    """A QBN model's state dict with the stored weights under their plain names."""
    return {k.replace("parametrizations.weight.original", "weight"): v for k, v in m.state_dict().items()
            if "parametrizations.weight.0" not in k}


def test_state_dict_carries_codebook() -> None:
    m = _model()
    apply_qbn(m, 2)
    sd = m.state_dict()
    # the parametrization moves the weight to parametrizations.weight.original; the codebook rides
    # in the projection's extra state
    plain = set(_model().state_dict())
    assert set(_plain_state(m)) == plain
    assert {k for k in sd if k.endswith("parametrizations.weight.0._extra_state")} == {"0.parametrizations.weight.0._extra_state",
                                                                                        "2.parametrizations.weight.0._extra_state"}
    other = _model(seed=5)
    apply_qbn(other, 4)
    other.load_state_dict(sd)
    assert projection(other[2]).k == 2 and torch.equal(projection(other[2]).codes, projection(m[2]).codes)
    assert torch.equal(other[2].weight, m[2].weight)


def test_optimizer_survives_in_place_conversion_and_fine_tuning_keeps_codebook() -> None:
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    apply_qbn(m, 1)
    cb = {n: projection(layer).codes.clone() for n, layer in qbn_layers(m)}
    before = stored_weight(m[2]).detach().clone()
    x, y = torch.randn(16, 2, 5, 5), torch.randint(0, 4, (16,))
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    assert not torch.equal(stored_weight(m[2]).detach(), before)  # the optimizer still trains the layer
    for n, layer in qbn_layers(m):
        assert torch.equal(projection(layer).codes, cb[n])
        assert set(encode_kernels(layer.binary_weight().reshape(-1, 3, 3)).tolist()) <= set(cb[n].tolist())


def test_remove_qbn_bakes_projected_signs() -> None:
    m = _model()
    apply_qbn(m, 2)
    w = stored_weight(m[2])
    target = projection(m[2]).project(w)
    assert remove_qbn(m) == ["0", "2"]
    assert type(m[2]) is BinaryConv2d and projection(m[2]) is None
    assert m[2].weight is w  # the same parameter object, now holding the projected weight
    assert torch.equal(m[2].binary_weight(), target)
    mf = _model("flip")
    apply_qbn(mf, 1)
    t = projection(mf[0]).project(stored_weight(mf[0]))
    remove_qbn(mf)
    assert torch.equal(mf[0].weight.detach(), t)
    mu = _model()
    w0 = stored_weight(mu[0]).detach().clone()
    apply_qbn(mu, 1)
    remove_qbn(mu, bake=False)  # without baking, the trained weight is left as it was
    assert torch.equal(mu[0].weight.detach(), w0)


def test_apply_qbn_errors_and_options() -> None:
    m = _model()
    with pytest.raises(ValueError, match="k must be"):
        apply_qbn(m, 9)
    with pytest.raises(ValueError, match="distance"):
        apply_qbn(m, 2, distance="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no binary 3×3 convolution"):
        apply_qbn(nn.Sequential(BinaryLinear(3, 3)), 2)
    layers = apply_qbn(m, 2, exclude=["0"], distance="hamming")
    assert list(layers) == ["2"] and type(m[0]) is BinaryConv2d
    forced = torch.tensor([0, 511, 1, 2])
    apply_qbn(m, 2, codebooks={"2": forced})
    assert projection(m[2]).codes.tolist() == forced.tolist()
    with pytest.raises(ValueError, match="must hold 4 codes"):
        apply_qbn(m, 2, codebooks={"2": torch.tensor([1, 2, 3])})


def test_retargeting_a_qbn_layer_uses_its_own_signs_not_the_old_projection() -> None:
    m, fresh = _model(), _model()
    apply_qbn(m, 1)
    apply_qbn(m, 5)  # re-target with a larger codebook
    apply_qbn(fresh, 5)
    for i in (0, 2):
        assert projection(m[i]).codes.tolist() == projection(fresh[i]).codes.tolist()
        assert len(m[i].parametrizations.weight) == 1  # re-targeted, not stacked


def test_qbn_sweep_end_to_end(tmp_path) -> None:
    from flipnet.analysis.qbn_sweep import qbn_sweep
    from flipnet.train import Trainer, load_config

    cfg = load_config("sun_yao_digits_bwn", [
        "train.epochs=2", "model.kwargs.base_width=4", "data.subset=400", "data.test_subset=200",
        f"output.dir={tmp_path}", "output.name=base", "train.progress=false", "train.track_signs=false",
        "train.plots=false", "train.tensorboard=false",
    ])
    Trainer(cfg).fit()
    rows = qbn_sweep(tmp_path / "base", [1, 6], epochs=1, overrides=["train.plots=false", "train.tensorboard=false"])
    assert [r.k for r in rows] == [None, 1, 6]
    assert rows[0].bits_per_weight_qbn == 1.0
    assert 1 / 9 < rows[1].bits_per_weight_qbn < rows[2].bits_per_weight_qbn
    assert all(0.0 <= r.acc_finetuned <= 1.0 for r in rows)
    out = tmp_path / "base" / "analysis" / "qbn"
    table = list(csv.DictReader(open(out / "qbn.csv")))
    assert [t["k"] for t in table] == ["none", "1", "6"]
    assert (out / "control" / "metrics.jsonl").is_file()  # the 1-bit control was fine-tuned too
    assert (out / "qbn.png").read_bytes()[:4] == b"\x89PNG"
    stored = load_qbn(out / "k6" / "qbn.safetensors")
    assert stored and all(s.k == 6 for s in stored.values())


def test_projection_keeps_magnitude_aware_scale() -> None:
    torch.manual_seed(3)
    conv = BinaryConv2d(3, 4, 3, weight_quantizer="magnitude_aware_sign")
    apply_qbn(nn.Sequential(conv), 2)
    w = stored_weight(conv)
    alpha = w.detach().abs().mean(dim=(1, 2, 3), keepdim=True)
    x = torch.randn(2, 3, 5, 5)
    expected = F.conv2d(x, projection(conv).project(w) * alpha)
    assert torch.allclose(conv(x), expected, atol=1e-5)


def test_qbn_cli_rejects_bad_widths_before_training(tmp_path, capsys) -> None:
    from flipnet.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("name: x\n")
    assert main(["qbn", str(tmp_path / "run"), "--bits", "0", "4"]) == 2
    assert "k must be an integer in 1..8" in capsys.readouterr().err
    assert main(["qbn", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "run" / "analysis").exists()  # refused before anything was written


def test_discovery_clipping_and_mode_switch_reach_the_stored_weight_under_qbn() -> None:
    from flipnet.layers import apply_constraints, binary_parameters, set_weight_mode

    torch.manual_seed(4)
    conv = BinaryConv2d(2, 4, 3, weight_clip=0.5)
    m = nn.Sequential(conv)
    with torch.no_grad():
        conv.weight.mul_(10)
    w = conv.weight
    apply_qbn(m, 2)
    assert binary_parameters(m) == [w] and w.is_leaf  # the parameter, not the computed projection
    apply_constraints(m)
    assert float(w.detach().abs().max()) <= 0.5
    set_weight_mode(m, "flip")
    assert bool((w.detach().abs() == 1).all())
    assert bool((conv.weight.detach().abs() == 1).all())


def test_summary_counts_qbn_layers_at_one_bit_per_weight() -> None:
    from flipnet.compress import summary

    m = _model()
    before = summary(m, input_size=(1, 2, 6, 6)).params_by_bits
    apply_qbn(m, 2)
    assert summary(m, input_size=(1, 2, 6, 6)).params_by_bits == before


def test_summary_memory_of_a_qbn_layer_is_its_indices_plus_codebook() -> None:
    from flipnet.compress import summary

    conv = BinaryConv2d(64, 64, 3)
    m = nn.Sequential(conv)
    apply_qbn(m, 6)
    row = summary(m, input_size=(1, 64, 5, 5)).layers[0]
    assert row.type == "BinaryConv2d+QBN(k=6)"
    assert row.memory_bits == 64 * 64 * 6 + 64 * 9 == qbn_bits(m)[0].bits


def test_real_weight_binary_convolutions_are_neither_projected_nor_counted_as_bits() -> None:
    # a BinaryConv2d with weight_quantizer=None keeps real weights (binary activations only):
    # its signs are not kernels, QBN must leave it alone and the bit count must not call it 1-bit
    torch.manual_seed(0)
    model = nn.Sequential(BinaryConv2d(2, 8, 3, padding=1, weight_quantizer=None),
                          BinaryConv2d(8, 4, 3, padding=1))
    real = model[0].weight.detach().clone()
    assert list(apply_qbn(model, 2)) == ["1"]
    assert projection(model[0]) is None and torch.equal(model[0].weight.detach(), real)
    rows = qbn_bits(model)
    assert [r.name for r in rows] == ["1", "total_qbn", "total"]
    assert rows[-1].weights == 4 * 8 * 9
    with pytest.raises(ValueError, match="1-bit weights"):
        qbn_bits(nn.Sequential(BinaryConv2d(2, 8, 3, weight_quantizer=None)))
