"""Packed XNOR-popcount layers equal float layers on ±1 data, exactly; BN thresholds equal BN + sign."""

from __future__ import annotations

from decimal import Decimal, getcontext

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flipnet.compress import _kernels, set_kernel_mode
from flipnet.compress.export.fold import bn_sign_reference, fold_bn_threshold
from flipnet.compress.packed import (
    BinaryWeightConv,
    BinaryWeightLinear,
    PackedBinaryConv2d,
    MaxPool2d,
    PackedBinaryLinear,
    ThresholdSign,
    popcount64,
)
from flipnet.layers import BinaryConv2d, BinaryLinear

from flipnet.compress import packed

HAS_C = _kernels.load_library() is not None


@pytest.fixture(autouse=True)
def _restore_kernel_mode():  # type: ignore[no-untyped-def]
    previous = _kernels.mode()
    yield
    set_kernel_mode(previous)
BACKENDS = ["c", "torch", "float", "auto"] if HAS_C else ["torch", "float", "auto"]
IMPLS = [i for i in BACKENDS if i != "auto"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Forces each implementation through set_kernel_mode (``auto``: chosen by timing)."""
    set_kernel_mode(request.param)
    return request.param


def signs(*shape: int, gen: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen).float() * 2 - 1


def reference_conv(x: torch.Tensor, w: torch.Tensor, stride, pads, dilation, pad_value: float) -> torch.Tensor:
    xs = torch.where(x >= 0, 1.0, -1.0)
    return F.conv2d(F.pad(xs, list(pads), value=pad_value), w, None, stride, 0, dilation)


CONV_CASES = [
    # n, c, h, w, o, kernel, stride, padding, dilation, pad_value
    (1, 128, 12, 12, 128, 3, 1, 1, 1, 0.0),
    (2, 70, 9, 7, 33, 3, 2, 1, 1, 1.0),
    (3, 5, 6, 8, 17, (3, 2), 1, (1, 0), 2, -1.0),
    (1, 130, 5, 5, 10, 1, 1, 0, 1, 0.0),
    (2, 64, 7, 7, 20, 3, 1, "same", 1, 0.0),
    (4, 65, 6, 6, 16, 3, 1, "same", 1, 1.0),
    (1, 3, 4, 4, 5, 3, 2, 2, 1, 0.5),
    (2, 200, 5, 4, 31, 2, 1, "same", 1, -1.0),
    (1, 1, 3, 3, 1, 3, 1, "valid", 1, 0.0),
    (5, 8, 1, 1, 3, 1, 1, 0, 1, 0.0),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_packed_conv_equals_float_conv_exactly(case, backend: str) -> None:
    n, c, h, w, o, k, s, pad, d, pv = case
    torch.manual_seed(hash(case) % 2**31)
    kk = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, c, h, w)
    x[0, 0, 0, 0] = 0.0  # sign(0) = +1
    weight = signs(o, c, *kk)
    m = PackedBinaryConv2d.from_signs(weight, s, pad, d, pv)
    ref = reference_conv(x, weight, m.stride, m.pads, m.dilation, pv)
    out = m(x)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)
    assert torch.equal(m.signs(), weight)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3), c=st.integers(1, 140), hw=st.tuples(st.integers(1, 7), st.integers(1, 7)), o=st.integers(1, 40),
    k=st.sampled_from([1, 2, 3]), s=st.integers(1, 2), p=st.integers(0, 2), pv=st.sampled_from([0.0, 1.0, -1.0]),
    seed=st.integers(0, 2**31 - 1), impl=st.sampled_from(IMPLS),
)
def test_packed_conv_property(n, c, hw, o, k, s, p, pv, seed, impl) -> None:
    h, w = hw
    if h + 2 * p < k or w + 2 * p < k:
        return
    g = torch.Generator().manual_seed(seed)
    x = signs(n, c, h, w, gen=g)
    weight = signs(o, c, k, k, gen=g)
    m = PackedBinaryConv2d.from_signs(weight, s, p, 1, pv, impl=impl)
    assert torch.equal(m(x), reference_conv(x, weight, m.stride, m.pads, m.dilation, pv))


@pytest.mark.parametrize("n,f,o", [(1, 4608, 1024), (5, 100, 10), (3, 64, 17), (2, 1, 1), (7, 65, 33)])
def test_packed_linear_equals_float_linear_exactly(n: int, f: int, o: int, backend: str) -> None:
    torch.manual_seed(n * 1000 + f)
    x = torch.randn(n, f)
    weight = signs(o, f)
    m = PackedBinaryLinear.from_signs(weight)
    assert torch.equal(m(x), F.linear(torch.where(x >= 0, 1.0, -1.0), weight))
    assert torch.equal(m.signs(), weight)


def test_packed_linear_keeps_leading_dims(backend: str) -> None:
    x = torch.randn(2, 3, 50)
    weight = signs(7, 50)
    out = PackedBinaryLinear.from_signs(weight)(x)
    assert out.shape == (2, 3, 7)
    assert torch.equal(out, F.linear(torch.where(x >= 0, 1.0, -1.0), weight))


def test_from_binary_layers_match_eval_outputs(backend: str) -> None:
    torch.manual_seed(0)
    conv = BinaryConv2d(20, 12, 3, padding="same", bias=True, input_quantizer="ste_sign", scale="learnable", pad_value=1.0)
    with torch.no_grad():
        conv.scale.uniform_(-2, 2)
        conv.bias.uniform_(-1, 1)
    x = torch.randn(2, 20, 6, 6)
    torch.testing.assert_close(PackedBinaryConv2d.from_binary(conv)(x), conv.eval()(x), rtol=0, atol=0)
    lin = BinaryLinear(33, 9, bias=True, input_quantizer="approx_sign", weight_mode="flip", scale="learnable")
    with torch.no_grad():
        lin.scale.uniform_(0.1, 2)
        lin.bias.uniform_(-1, 1)
    xl = torch.randn(4, 33)
    torch.testing.assert_close(PackedBinaryLinear.from_binary(lin)(xl), lin.eval()(xl), rtol=0, atol=0)
    with pytest.raises(ValueError, match="binary inputs"):
        PackedBinaryConv2d.from_binary(BinaryConv2d(3, 4, 3))
    first = BinaryConv2d(3, 4, 3, padding=1)
    xf = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(BinaryWeightConv.from_binary(first)(xf), first.eval()(xf))
    firstl = BinaryLinear(6, 2)
    torch.testing.assert_close(BinaryWeightLinear.from_binary(firstl)(xf.flatten(1)[:, :6]), firstl.eval()(xf.flatten(1)[:, :6]))


def test_packed_layers_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="only -1 and \\+1"):
        PackedBinaryConv2d.from_signs(torch.zeros(2, 3, 3, 3))
    m = PackedBinaryConv2d.from_signs(signs(2, 3, 3, 3))
    with pytest.raises(ValueError, match="expected input"):
        m(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="too small"):
        m(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="input features"):
        PackedBinaryLinear.from_signs(signs(2, 5))(torch.randn(1, 6))


def test_popcount64_matches_python() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-(2**63), 2**63 - 1, (1000,), generator=g, dtype=torch.int64)
    x[:3] = torch.tensor([0, -1, -(2**63)])
    expected = [bin(v & 0xFFFFFFFFFFFFFFFF).count("1") for v in x.tolist()]
    assert popcount64(x).tolist() == expected


def test_c_kernel_backend_is_available_with_gcc() -> None:
    import shutil

    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler")
    assert _kernels.kernel_backend().startswith("c")


def test_without_a_compiler_layers_fall_back_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kernels, "_compiler", lambda: None)
    monkeypatch.setattr(_kernels, "_LIB", None)
    monkeypatch.setattr(_kernels, "_TRIED", False)
    set_kernel_mode("auto")
    with pytest.warns(RuntimeWarning, match="no working C compiler"):
        assert _kernels.load_library() is None
    assert _kernels.kernel_backend() == "torch"
    w = signs(6, 10, 3, 3)
    x = torch.randn(2, 10, 5, 5)
    assert torch.equal(PackedBinaryConv2d.from_signs(w, 1, 1)(x), reference_conv(x, w, (1, 1), (1, 1, 1, 1), (1, 1), 0.0))
    set_kernel_mode("c")
    with pytest.raises(_kernels.KernelBuildError, match="install gcc"):
        _kernels.load_library()


@pytest.mark.skipif(not hasattr(__import__("os"), "getuid"), reason="POSIX permissions")
def test_temp_folder_fallback_refuses_a_folder_others_can_write(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With an unwritable cache the kernels are built in the temp folder; a pre-existing folder
    there that other users can write must not be used (a planted library would be loaded)."""
    import os
    import tempfile

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FLIPNET_CACHE_DIR", str(blocker / "kernels"))  # mkdir fails: unwritable cache
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    planted = shared / f"flipnet-kernels-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    monkeypatch.setattr(_kernels, "_compiler", lambda: "cc-that-is-never-run")
    monkeypatch.setattr(_kernels, "_compiler_version", lambda cc: "x")
    compiled = []
    monkeypatch.setattr(_kernels, "_compile", lambda cc, flags, target: compiled.append(target) or False)
    assert _kernels._build_and_load() is None
    assert not any(t.parent == planted for t in compiled)
    assert _kernels._private_dir(shared / "fresh") and (shared / "fresh").stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(not HAS_C, reason="no C compiler")
def test_c_kernels_survive_zero_input_features() -> None:
    """K = 0 used to divide by zero (SIGFPE) in fn_bgemm and write before the im2col buffer."""
    lin = PackedBinaryLinear(torch.zeros(3, 0, dtype=torch.int64), 0, impl="c")
    assert torch.equal(lin(torch.zeros(2, 0)), torch.zeros(2, 3))
    conv = PackedBinaryConv2d(torch.zeros(3, 3, 3, 0, dtype=torch.int64), 0, 1, 1, impl="c")
    assert torch.equal(conv(torch.zeros(1, 0, 4, 4)), torch.zeros(1, 3, 4, 4))


# ----------------------------------------------------------------------------- thresholds
def _exact_sign(y: int, gamma: float, beta: float, mean: float, var: float, eps: float, s: float, b: float) -> int | None:
    getcontext().prec = 80
    sigma = (Decimal(var) + Decimal(eps)).sqrt()
    val = Decimal(gamma) * (Decimal(s) * y + Decimal(b) - Decimal(mean)) / sigma + Decimal(beta)
    if abs(val) < Decimal("1e-60") and val != 0:
        return None  # a rounding-level tie: not decidable with finite precision
    return 1 if val >= 0 else -1


finite = st.floats(-50, 50, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(1, 300),
    gamma=st.one_of(finite, st.just(0.0), st.floats(-0.0009765625, 0.0009765625, width=32)),
    beta=st.one_of(finite, st.just(0.0)),
    mean=st.one_of(finite, st.integers(-300, 300).map(float)),
    var=st.floats(0, 1e4, width=32),
    eps=st.sampled_from([1e-3, 1e-5, 0.0]),
    s=st.one_of(st.just(1.0), st.floats(-3, 3, width=32)),
    b=st.one_of(st.just(0.0), st.floats(-5, 5, width=32)),
)
def test_folded_threshold_equals_bn_sign(k, gamma, beta, mean, var, eps, s, b) -> None:
    if var + eps <= 0:
        with pytest.raises(ValueError, match="cannot fold"):
            fold_bn_threshold(k, torch.tensor([gamma]), torch.tensor([beta]), torch.tensor([mean]), torch.tensor([var]), eps)
        return
    t32 = lambda v: torch.tensor([v], dtype=torch.float32)  # noqa: E731
    th, flip = fold_bn_threshold(k, t32(gamma), t32(beta), t32(mean), t32(var), eps, t32(s), t32(b))
    assert -k <= int(th) <= k + 1
    y = torch.arange(-k, k + 1, dtype=torch.float32)
    got = ThresholdSign(th.float(), flip)(y.view(-1, 1))[:, 0]
    f = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    for yi, gi in zip(range(-k, k + 1), got.tolist()):
        want = _exact_sign(yi, f(gamma), f(beta), f(mean), f(var), eps, f(s), f(b))
        if want is not None:
            assert gi == want, (yi, gi, want)


@pytest.mark.parametrize("gamma", [1.0, -1.0, 2.5, -0.25])
def test_threshold_ties_follow_sign_zero_is_plus_one(gamma: float) -> None:
    # beta = 0 and mean = 3: BN output is exactly 0 at y = 3, where sign gives +1 for either gamma sign
    th, flip = fold_bn_threshold(10, torch.tensor([gamma]), torch.tensor([0.0]), torch.tensor([3.0]), torch.tensor([4.0]), 0.0)
    y = torch.arange(-10, 11, dtype=torch.float32).view(-1, 1)
    got = ThresholdSign(th.float(), flip)(y)[:, 0]
    ref = bn_sign_reference(y, torch.tensor([gamma]), torch.tensor([0.0]), torch.tensor([3.0]), torch.tensor([4.0]), 0.0)[:, 0]
    assert torch.equal(got, ref.float())
    assert got[13].item() == 1.0  # y = 3
    assert bool(flip) == (gamma < 0)


@pytest.mark.parametrize("offset", [-9.0, -1.0, -0.5, 0.5, 1.0, 9.0, float("inf"), float("-inf"), float("nan")])
def test_threshold_search_corrects_any_estimate(offset: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The float64 estimate only seeds an exact search: a wrong estimate gives the same thresholds."""
    from flipnet.compress.export import fold as export

    g = torch.Generator().manual_seed(11)
    c, k = 40, 50
    args = (torch.randn(c, generator=g) * 2, torch.randn(c, generator=g), torch.randn(c, generator=g) * 30,
            torch.rand(c, generator=g) * 20 + 0.1, 1e-3, torch.randn(c, generator=g), torch.randn(c, generator=g) * 3)
    expected = fold_bn_threshold(k, *args)
    original = export._threshold_estimate
    monkeypatch.setattr(export, "_threshold_estimate", lambda *a: original(*a) + offset)
    got = fold_bn_threshold(k, *args)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    y = torch.arange(-k, k + 1, dtype=torch.float32).view(-1, 1).expand(-1, c)
    ref = bn_sign_reference(y, args[0], args[1], args[2], args[3], args[4], args[5], args[6])
    assert torch.equal(ThresholdSign(got[0].float(), got[1])(y), ref.float())


def test_threshold_matches_float32_batchnorm_on_many_channels() -> None:
    torch.manual_seed(3)
    c, k = 64, 1152
    bn = torch.nn.BatchNorm2d(c, eps=1e-3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-100, 100)
        bn.running_var.uniform_(1, 400)
        bn.weight.uniform_(-2, 2)
        bn.weight[:4] = 0.0
        bn.bias.uniform_(-3, 3)
    th, flip = fold_bn_threshold(k, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    y = torch.randint(-k, k + 1, (8, c, 5, 5)).float()
    with torch.no_grad():
        ref = torch.where(bn(y) >= 0, 1.0, -1.0)
    assert torch.equal(ThresholdSign(th.float(), flip)(y), ref)


@pytest.mark.parametrize(
    "shape,args",
    [((2, 5, 9, 7), (3, 2)), ((1, 128, 30, 30), (2, 2)), ((3, 4, 10, 10), ((3, 2), (1, 2))), ((1, 2, 6, 6), (2, 2, 1)),
     ((1, 2, 7, 7), (2,)), ((1, 3, 5, 5), (2, 2, 0, 1, False, True))],
)
def test_maxpool_matches_torch(shape, args, backend: str) -> None:
    y = torch.randint(-50, 50, shape).float()
    assert torch.equal(MaxPool2d(*args)(y), torch.nn.MaxPool2d(*args)(y))


def test_channels_last_tensors_give_the_same_results(backend: str) -> None:
    """The C path writes channels-last outputs; every packed module accepts either layout."""
    torch.manual_seed(12)
    x = torch.randn(3, 70, 9, 8)
    w1, w2 = signs(40, 70, 3, 3), signs(24, 40, 3, 3)
    c1 = PackedBinaryConv2d.from_signs(w1, 1, 1, 1, 0.0)
    c2 = PackedBinaryConv2d.from_signs(w2, 2, 1, 1, 1.0)
    y1 = c1(x)
    assert torch.equal(y1, c1(x.contiguous(memory_format=torch.channels_last)))
    ref1 = reference_conv(x, w1, (1, 1), (1, 1, 1, 1), (1, 1), 0.0)
    assert torch.equal(y1, ref1)
    assert torch.equal(c2(y1), reference_conv(ref1, w2, (2, 2), (1, 1, 1, 1), (1, 1), 1.0))
    pool = MaxPool2d(2)
    assert torch.equal(pool(y1), torch.nn.functional.max_pool2d(ref1, 2))
    th = ThresholdSign(torch.randint(-50, 50, (40,)).float(), torch.rand(40) > 0.5)
    assert torch.equal(th(y1), th(ref1.contiguous()))


def test_threshold_sign_backends_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(7)
    y = torch.randint(-20, 21, (3, 9, 4, 5), generator=g).float()
    m = ThresholdSign(torch.randint(-20, 21, (9,), generator=g).float(), torch.rand(9, generator=g) > 0.5)
    expected = torch.where((y >= m.threshold.view(1, -1, 1, 1)) ^ m.flip.view(1, -1, 1, 1), 1.0, -1.0)
    assert torch.equal(m(y), expected)
    set_kernel_mode("torch")
    assert torch.equal(m(y), expected)
    assert torch.equal(m(y[:, :, 0, 0]), expected[:, :, 0, 0])


def test_maxpool_propagates_nan_like_torch(backend: str) -> None:
    y = torch.randn(2, 3, 9, 9)
    y[0, 1, 2, 3] = y[1, 2, 0, 0] = y[1, 0, 4, 4] = float("nan")
    for x in (y, y.contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(MaxPool2d(3, 2)(x), torch.nn.MaxPool2d(3, 2)(x), rtol=0, atol=0, equal_nan=True)


def test_threshold_sign_sees_changed_buffers_after_a_call(backend: str) -> None:
    """load_state_dict (in place) and .double() after a first call must not leave stale kernel inputs."""
    y = torch.tensor([[3.0, -3.0, 0.0]])
    m = ThresholdSign(torch.zeros(3), torch.zeros(3, dtype=torch.bool))
    assert torch.equal(m(y), torch.tensor([[1.0, -1.0, 1.0]]))
    m.load_state_dict({"threshold": torch.tensor([4.0, -4.0, 0.0]), "flip": torch.tensor([True, False, True])})
    assert torch.equal(m(y), torch.tensor([[1.0, 1.0, -1.0]]))
    m.double()
    assert torch.equal(m(y), torch.tensor([[1.0, 1.0, -1.0]]))


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
def test_packed_layers_on_cuda_match_cpu() -> None:
    torch.manual_seed(0)
    w = signs(64, 96, 3, 3)
    x = torch.randn(2, 96, 9, 9)
    m = PackedBinaryConv2d.from_signs(w, 1, 1, 1, 0.0)
    ref = m(x)
    assert torch.equal(m.cuda()(x.cuda()).cpu(), ref)
    lin = PackedBinaryLinear.from_signs(signs(10, 300))
    xl = torch.randn(4, 300)
    assert torch.equal(lin.cuda()(xl.cuda()).cpu(), lin.cpu()(xl))


# ----------------------------------------------------------------------------- implementation choice
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_every_impl_gives_identical_outputs(batch: int) -> None:
    """BinaryNet-like shapes (incl. batch 16, where PyTorch may pick other float conv algorithms),
    both input layouts, scale and bias: every implementation returns the same tensor."""
    g = torch.Generator().manual_seed(batch)
    convs = [
        (PackedBinaryConv2d.from_signs(signs(96, 128, 3, 3, gen=g), 1, "same", 1, 0.0,
                                       torch.rand(96, generator=g) + 0.5, torch.randn(96, generator=g)), (128, 9)),
        (PackedBinaryConv2d.from_signs(signs(20, 70, 3, 3, gen=g), 2, 1, 1, 1.0), (70, 8)),
        (PackedBinaryConv2d.from_signs(signs(16, 65, 2, 2, gen=g), 1, "same", 1, -1.0), (65, 6)),
    ]
    for m, (c, hw) in convs:
        x = torch.randn(batch, c, hw, hw, generator=g)
        x[0, 0, 0, 0] = 0.0
        for xin in (x, x.contiguous(memory_format=torch.channels_last)):
            outs = {}
            for impl in IMPLS:
                m.impl = impl
                outs[impl] = m(xin)
            for impl in IMPLS[1:]:
                assert torch.equal(outs[impl], outs[IMPLS[0]]), impl
    lin = PackedBinaryLinear.from_signs(signs(10, 1024, gen=g), torch.rand(10, generator=g), torch.randn(10, generator=g))
    xl = torch.randn(batch, 1024, generator=g)
    outs = [PackedBinaryLinear(lin.weight_words, 1024, lin.scale, lin.bias, impl=i)(xl) for i in IMPLS]
    assert all(torch.equal(o, outs[0]) for o in outs)


def _fake_timer(monkeypatch: pytest.MonkeyPatch, seconds: dict[str, float]) -> list[str]:
    calls: list[str] = []

    def fake(run, impl: str) -> float:
        run()
        calls.append(impl)
        return seconds[impl]

    monkeypatch.setattr(packed, "_time_impl", fake)
    return calls


@pytest.mark.parametrize("fastest", ["float", "popcount"])
def test_autotune_picks_the_fastest_and_caches_per_bucket(fastest: str, monkeypatch: pytest.MonkeyPatch) -> None:
    set_kernel_mode("auto")
    popcount = "c" if HAS_C else "torch"
    seconds = {popcount: 1e-3, "float": 2e-3} if fastest == "popcount" else {popcount: 2e-3, "float": 1e-3}
    calls = _fake_timer(monkeypatch, seconds)
    w = signs(10, 100)
    m = PackedBinaryLinear.from_signs(w)
    assert m.impl == "auto" and m.tuned == {}
    want = popcount if fastest == "popcount" else "float"
    x = torch.randn(3, 100)
    assert torch.equal(m(x), F.linear(torch.where(x >= 0, 1.0, -1.0), w))
    threads = torch.get_num_threads()
    assert m.tuned == {(4, threads): want}
    assert sorted(set(calls)) == sorted({popcount, "float"}) and len(calls) == 2 + 2 * packed.AUTOTUNE_REPS
    m(torch.randn(4, 100))  # same bucket (3 and 4 → 4): no new timing
    m(torch.randn(2, 5, 100))  # 10 rows → bucket 16
    assert len(calls) == 2 * (2 + 2 * packed.AUTOTUNE_REPS)
    assert m.tuned == {(4, threads): want, (16, threads): want}
    assert m.selected_impl(torch.randn(4, 100)) == want
    assert ("_float_cache" in m.__dict__) == (want == "float")  # float weights are dropped when unused


@pytest.mark.parametrize("float_seconds,timed", [(1.0, 0), (5e-3, 1)])
def test_autotune_drops_a_far_slower_candidate_early(float_seconds: float, timed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """More than 10x slower on the first (warm-up) call: not timed; more than 3x after one round: dropped."""
    set_kernel_mode("auto")
    popcount = "c" if HAS_C else "torch"
    calls = _fake_timer(monkeypatch, {popcount: 1e-3, "float": float_seconds})
    m = PackedBinaryConv2d.from_signs(signs(8, 16, 3, 3), 1, 1)
    m(torch.randn(1, 16, 5, 5))
    assert calls == [popcount, "float"] + [popcount, "float"] * timed
    assert list(m.tuned.values()) == [popcount]
    assert "_float_cache" not in m.__dict__


def test_autotune_never_picks_an_inexact_float_path(monkeypatch: pytest.MonkeyPatch) -> None:
    set_kernel_mode("auto")
    popcount = "c" if HAS_C else "torch"
    calls = _fake_timer(monkeypatch, {popcount: 1.0, "float": 1e-6})
    # a pad value other than 0/±1: float is not even a candidate
    m = PackedBinaryConv2d.from_signs(signs(4, 3, 3, 3), 1, 1, 1, 0.5)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(m(x), reference_conv(x, m.signs(), (1, 1), m.pads, (1, 1), 0.5))
    assert list(m.tuned.values()) == [popcount] and calls == []  # nothing to time
    # a float path whose output differs from the popcount output on the tuning input is excluded
    monkeypatch.setattr(packed, "_sign", lambda t: torch.ones_like(t))
    lin = PackedBinaryLinear.from_signs(signs(5, 70))
    xl = torch.randn(2, 70)
    assert torch.equal(lin(xl), F.linear(torch.where(xl >= 0, 1.0, -1.0), lin.signs()))
    assert list(lin.tuned.values()) == [popcount] and calls == [popcount, "float"]  # the check calls only


def test_impl_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_timer(monkeypatch, {"c": 1.0, "torch": 1.0, "float": 1.0})
    x = torch.randn(2, 40)
    for impl in IMPLS:  # the environment variable forces layers left on "auto"
        set_kernel_mode(impl)
        m = PackedBinaryLinear.from_signs(signs(6, 40))
        assert m.selected_impl(x) == impl
        m(x)
        assert m.tuned == {}
    set_kernel_mode("torch")  # the constructor argument beats the environment
    assert PackedBinaryLinear.from_signs(signs(6, 40), impl="float").selected_impl(x) == "float"
    set_kernel_mode("auto")
    m = PackedBinaryConv2d.from_signs(signs(4, 8, 3, 3), impl="torch")
    assert m.selected_impl(torch.randn(1, 8, 5, 5)) == "torch" and m.tuned == {}
    m.impl = "FLOAT"
    assert m.impl == "float"
    assert calls == []
    with pytest.raises(ValueError, match="impl must be one of"):
        m.impl = "cuda"
    with pytest.raises(ValueError, match="impl must be one of"):
        PackedBinaryLinear.from_signs(signs(2, 3), impl="fast")


def test_autotune_with_real_timing_gives_correct_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    set_kernel_mode("auto")
    torch.manual_seed(5)
    w = signs(10, 1024)
    m = PackedBinaryLinear.from_signs(w)
    for n in (1, 2, 64):
        x = torch.randn(n, 1024)
        assert torch.equal(m(x), F.linear(torch.where(x >= 0, 1.0, -1.0), w))
    assert set(m.tuned.values()) <= set(IMPLS) and len(m.tuned) == 3


def test_float_impl_sign_handles_zeros_nan_and_inf() -> None:
    x = torch.tensor([[0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf"), 1e-30, -1e-30, 3.0, -2.0]])
    assert torch.equal(packed._sign(x), torch.where(x >= 0, 1.0, -1.0))
    w = signs(4, 10)
    outs = [PackedBinaryLinear.from_signs(w, impl=i)(x) for i in IMPLS]
    assert all(torch.equal(o, outs[0]) for o in outs)
    xc = torch.randn(1, 3, 4, 4)
    xc[0, :, 0, 0] = torch.tensor([float("nan"), -0.0, float("-inf")])
    wc = signs(5, 3, 3, 3)
    outs = [PackedBinaryConv2d.from_signs(wc, 1, 1, impl=i)(xc) for i in IMPLS]
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_layers_copy_and_pickle_after_calls() -> None:
    """The per-process caches (ctypes arguments, float weights) are not part of the state."""
    import copy
    import io

    x = torch.randn(2, 8, 5, 5)
    conv = PackedBinaryConv2d.from_signs(signs(6, 8, 3, 3), 1, 1, impl=IMPLS[0])
    lin = PackedBinaryLinear.from_signs(signs(3, 200), impl=IMPLS[0])
    ref, refl = conv(x), lin(x.flatten(1))
    conv.impl = "float"
    conv(x)
    for m, inp, want in ((conv, x, ref), (lin, x.flatten(1), refl)):
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        for clone in (copy.deepcopy(m), torch.load(buf, weights_only=False)):
            assert clone.impl == m.impl and clone.tuned == m.tuned
            assert torch.equal(clone(inp), want)


def test_float_impl_accepts_other_dtypes() -> None:
    x = torch.randn(2, 30, dtype=torch.float64)
    w = signs(4, 30)
    ys = [PackedBinaryLinear.from_signs(w, impl=i)(x) for i in IMPLS]
    assert all(y.dtype == torch.float32 and torch.equal(y, ys[0]) for y in ys)


def test_kernel_mode_is_read_once_and_set_explicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    set_kernel_mode("torch")
    monkeypatch.setenv("FLIPNET_KERNELS", "float")
    assert _kernels.mode() == "torch"  # the environment is read at import, not on every call
    assert set_kernel_mode(None) == "torch" and _kernels.mode() == "float"  # None: read it again
    monkeypatch.setenv("FLIPNET_KERNELS", "nonsense")
    set_kernel_mode(None)
    assert _kernels.mode() == "auto"
    with pytest.raises(ValueError, match="kernel mode must be one of"):
        set_kernel_mode("cuda")
    assert _kernels.mode() == "auto"
