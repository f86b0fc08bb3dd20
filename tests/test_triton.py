"""The Triton XNOR-popcount kernels (flipnet.compress._triton).

Correctness runs on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, which must be set
before triton is imported, hence a subprocess) against the PyTorch reference on random packed
inputs, ragged word counts included. The hardware-popcount variant that a GPU runs is compiled
for sm_90 here (no GPU needed to compile), so a typing or lowering error shows up without one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src"

INTERPRETED = textwrap.dedent(
    r"""
    import os, sys
    assert os.environ.get("TRITON_INTERPRET") == "1"
    try:
        import triton  # noqa: F401
    except Exception as e:
        print(f"SKIP: triton is not importable ({type(e).__name__}: {e})")
        sys.exit(0)
    import torch
    from flipnet.compress import _triton as T
    from flipnet.compress.pack import pack_words
    from flipnet.compress.packed import PackedBinaryConv2d, PackedBinaryLinear, _pack_channels, _xnor_gemm_torch

    if not T.usable_on("cpu"):
        print("SKIP: " + T.status("cpu"))
        sys.exit(0)
    try:  # can the interpreter run a kernel at all here?
        T.xnor_gemm(torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64), 1)
    except Exception as e:
        print(f"SKIP: the Triton interpreter cannot run here ({type(e).__name__}: {str(e)[:200]})")
        sys.exit(0)
    assert "interpreter" in T.status("cpu")

    g = torch.Generator().manual_seed(0)
    def pm1(*shape):
        return torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)

    # 1. GEMM on packed words: ragged K (not a multiple of 32 or 64), M and N around the block sizes
    for m, n, k in [(1, 1, 1), (1, 10, 31), (2, 3, 32), (5, 7, 33), (16, 64, 64), (17, 65, 65), (33, 5, 100),
                    (65, 3, 129), (3, 130, 300), (70, 9, 4608 // 9)]:
        a, w = pm1(m, k), pm1(n, k)
        aw, ww = pack_words(a, dim=1), pack_words(w, dim=1)
        want = a @ w.T
        assert torch.equal(_xnor_gemm_torch(aw, ww, k), want)
        for config in T.CONFIGS:  # every kernel configuration the GPU may choose
            got = T.xnor_gemm(aw, ww, k, config=config)
            assert got.dtype == torch.float32 and got.shape == (m, n)
            assert torch.equal(got, want), (m, n, k, config)
        assert torch.equal(T.xnor_gemm(aw, ww, k), want)
    # random words with zero padding bits (all 64 bits used in the full words)
    for m, n, kw in [(4, 6, 1), (9, 17, 3)]:
        k = kw * 64
        aw = torch.randint(-2**63, 2**63 - 1, (m, kw), generator=g, dtype=torch.int64)
        ww = torch.randint(-2**63, 2**63 - 1, (n, kw), generator=g, dtype=torch.int64)
        for config in T.CONFIGS:
            assert torch.equal(T.xnor_gemm(aw, ww, k, config=config), _xnor_gemm_torch(aw, ww, k)), config

    # 2. packing: 2-d and 4-d in both memory formats, zeros (+1) and NaN (-1), ragged channels
    for shape in [(3, 1), (4, 31), (5, 64), (2, 65), (7, 130)]:
        x = torch.randn(*shape, generator=g)
        x[0, 0] = 0.0
        x[-1, -1] = float("nan")
        assert torch.equal(T.pack_signs(x), _pack_channels(x)), shape
    for shape in [(2, 3, 4, 5), (1, 70, 3, 3), (2, 128, 5, 4)]:
        x = torch.randn(*shape, generator=g)
        x[0, 0, 0, 0] = -0.0
        for xin in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, :, :-1]):
            assert torch.equal(T.pack_signs(xin), _pack_channels(xin)), (shape, xin.stride())

    # 3. the packed layers with impl="triton" against impl="torch"
    for out_f, in_f, batch in [(10, 300, 4), (3, 64, 1), (33, 65, 5)]:
        lin = PackedBinaryLinear.from_signs(pm1(out_f, in_f), torch.rand(out_f, generator=g), torch.randn(out_f, generator=g))
        x = torch.randn(batch, in_f, generator=g)
        lin.impl = "torch"
        want = lin(x)
        lin.impl = "triton"
        assert torch.equal(lin(x), want), (out_f, in_f)
    cases = [  # (O, C, k, stride, padding, dilation, pad value, H)
        (8, 70, 3, 1, "same", 1, 0.0, 6),
        (5, 65, 3, 2, 1, 1, 1.0, 7),
        (6, 33, 2, 1, "same", 1, -1.0, 5),
        (4, 20, 3, 1, 2, 2, 0.0, 6),
        (7, 128, 3, 1, 0, 1, 0.0, 5),
    ]
    for o, c, k, s, p, d, pv, h in cases:
        conv = PackedBinaryConv2d.from_signs(pm1(o, c, k, k), s, p, d, pv, torch.rand(o, generator=g) + 0.5, torch.randn(o, generator=g))
        x = torch.randn(2, c, h, h, generator=g)
        x[0, 0, 0, 0] = 0.0
        for xin in (x, x.contiguous(memory_format=torch.channels_last)):
            conv.impl = "torch"
            want = conv(xin)
            conv.impl = "triton"
            got = conv(xin)
            assert torch.equal(got.contiguous(), want.contiguous()), (o, c, k, s, p, d, pv)

    # 4. a device whose self-test fails gets the kernels switched off (with the reason), not a crash
    import warnings
    assert "self-test passed" in T.status("cpu")
    T._CHECKED.clear()
    T._self_test = lambda device: "planted failure"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not T.usable_on("cpu")
    assert any("planted failure" in str(w.message) for w in caught)
    assert "planted failure" in T.status("cpu")
    print("OK")
    """
)


def test_triton_kernels_match_the_torch_reference_in_the_interpreter() -> None:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(SRC)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout.strip()
    if proc.returncode == 0 and out.startswith("SKIP: "):
        pytest.skip(out[len("SKIP: "):])
    assert proc.returncode == 0 and out.endswith("OK"), f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"


def test_hardware_popcount_kernels_compile_for_hopper() -> None:
    """The variant a GPU runs (libdevice popc) lowers to PTX and a cubin for sm_90 without a GPU."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"this triton has no ahead-of-time compile API ({e})")
    from flipnet.compress import _triton as T

    if not T.available():
        pytest.skip(T.status("cpu"))
    assert T._load()[0].hw_popc, "libdevice.popc should be used outside the interpreter"
    target = GPUTarget("cuda", 90, 32)
    ints = {k: "i32" for k in ("M", "N", "KW", "k_bits", "stride_am", "stride_wn", "stride_om")}
    gemm = ASTSource(fn=T._gemm_kernel, signature={"a_ptr": "*i32", "w_ptr": "*i32", "out_ptr": "*fp32", **ints,
                                                  "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                                                  "HW_POPC": "constexpr"},
                     constexprs={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 4, "HW_POPC": True})
    try:
        compiled = triton.compile(gemm, target=target)
    except Exception as e:  # a missing ptxas or backend is the environment, not the kernel
        if "ptxas" in str(e).lower() or "backend" in str(e).lower():
            pytest.skip(f"cannot compile for CUDA here: {str(e)[:200]}")
        raise
    assert "popc.b32" in compiled.asm["ptx"]
    ints = {k: "i32" for k in ("M", "N", "KW", "k_bits", "stride_om")}
    kmajor = ASTSource(fn=T._gemm_kmajor_kernel, signature={"a_ptr": "*i32", "w_ptr": "*i32", "out_ptr": "*fp32", **ints,
                                                           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "HW_POPC": "constexpr"},
                       constexprs={"BLOCK_M": 128, "BLOCK_N": 128, "HW_POPC": True})
    assert "popc.b32" in triton.compile(kmajor, target=target).asm["ptx"]
    ints = {k: "i32" for k in ("P", "C", "CW", "stride_outer", "stride_inner", "inner", "stride_c")}
    pack = ASTSource(fn=T._pack_kernel, signature={"x_ptr": "*fp32", "out_ptr": "*i32", **ints, "BLOCK_P": "constexpr"},
                     constexprs={"BLOCK_P": 128})
    assert "cubin" in triton.compile(pack, target=target).asm


def test_status_and_forced_impl_off_device() -> None:
    """Without the interpreter the kernels are CUDA-only: a forced impl='triton' on a CPU tensor
    says so in one sentence instead of running something else."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process")
    from flipnet.compress import _triton as T
    from flipnet.compress.packed import PackedBinaryLinear

    assert not T.usable_on("cpu")
    assert isinstance(T.status("cpu"), str) and T.status("cpu")
    lin = PackedBinaryLinear.from_signs(torch.ones(2, 5), impl="triton")
    with pytest.raises(RuntimeError, match="impl='triton' needs Triton and a CUDA tensor"):
        lin(torch.randn(1, 5))
    with pytest.raises(ValueError, match="impl must be one of"):
        PackedBinaryLinear.from_signs(torch.ones(2, 5), impl="cuda")


@pytest.mark.gpu
def test_triton_kernels_on_cuda_match_the_reference() -> None:
    from flipnet.compress import _triton as T
    from flipnet.compress.pack import pack_words
    from flipnet.compress.packed import PackedBinaryConv2d, PackedBinaryLinear, _xnor_gemm_torch

    if not T.usable_on("cuda"):
        pytest.skip(T.status("cuda"))
    g = torch.Generator().manual_seed(0)
    for m, n, k in [(1, 10, 31), (17, 65, 65), (300, 130, 4608), (1024, 1024, 8192)]:
        a = torch.where(torch.rand(m, k, generator=g) < 0.5, -1.0, 1.0)
        w = torch.where(torch.rand(n, k, generator=g) < 0.5, -1.0, 1.0)
        aw, ww = pack_words(a, dim=1).cuda(), pack_words(w, dim=1).cuda()
        want = _xnor_gemm_torch(aw, ww, k)
        assert torch.equal(T.xnor_gemm(aw, ww, k), want), (m, n, k)  # the configuration chosen by timing
        for config in T.CONFIGS:
            assert torch.equal(T.xnor_gemm(aw, ww, k, config=config), want), (m, n, k, config)
        assert torch.equal(T.pack_signs(a.cuda()), aw)
    assert T._TUNED and set(T._TUNED.values()) <= set(T.CONFIGS)
    conv = PackedBinaryConv2d.from_signs(torch.where(torch.rand(64, 96, 3, 3, generator=g) < 0.5, -1.0, 1.0), 1, 1, 1, 0.0).cuda()
    x = torch.randn(3, 96, 9, 9, generator=g).cuda()
    conv.impl = "torch"
    want = conv(x)
    conv.impl = "triton"
    assert torch.equal(conv(x), want)
    conv.impl = "auto"  # chosen by measurement among triton and float: identical either way
    assert torch.equal(conv(x), want) and set(conv.tuned.values()) <= {"triton", "float"}
    lin = PackedBinaryLinear.from_signs(torch.where(torch.rand(10, 300, generator=g) < 0.5, -1.0, 1.0)).cuda()
    xl = torch.randn(4, 300, generator=g).cuda()
    lin.impl = "torch"
    want = lin(xl)
    lin.impl = "triton"
    assert torch.equal(lin(xl), want)
