"""Build and load the C XNOR-popcount kernels (``csrc/bgemm.c``) with ctypes.

The shared library is compiled on first use with the system C compiler (``$CC``, else ``gcc``,
else ``cc``) using ``-O3 -march=native -fopenmp`` (OpenMP is dropped if the compiler lacks it).
It is cached in ``$FLIPNET_CACHE_DIR`` (default ``$XDG_CACHE_HOME/flipnet/kernels`` or
``~/.cache/flipnet/kernels``) under a name keyed by the SHA-256 of the source, the flags, the
compiler version and the CPU flags, so a changed source, compiler or machine triggers a rebuild.
The library is written to a temporary file and renamed into place, so concurrent processes never
load a half-written file.

Without a working compiler (or with ``FLIPNET_KERNELS=torch``, read once at import, or
:func:`set_kernel_mode`) the packed layers use the
pure-PyTorch implementation in :mod:`flipnet.compress.packed`, which gives identical results and
also runs on CUDA. ``FLIPNET_KERNELS=c`` makes a failed build an error instead of a fallback and
makes every packed layer use the C kernels; ``FLIPNET_KERNELS=float`` makes them use float32
``F.linear`` / ``F.conv2d`` on ±1 values; unset (or ``auto``), each packed layer picks its
implementation by timing (see :class:`flipnet.compress.packed.PackedBinaryLinear`).

:func:`fast_function` gives an entry point without ``argtypes`` for hot paths that pass
ready-made ``ctypes`` objects (argument conversion is a large part of a small call's cost).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

__all__ = ["load_library", "kernel_backend", "cache_dir", "fast_function", "mode", "set_kernel_mode", "KernelBuildError"]

_SOURCE = Path(__file__).parent / "csrc" / "bgemm.c"
_BASE_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c11"]
_ABI = 5  # bump with every change of the C entry points
_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_TRIED = False


class KernelBuildError(RuntimeError):
    """The C kernels could not be built although ``FLIPNET_KERNELS=c`` asks for them."""


def cache_dir() -> Path:
    """Folder holding compiled kernels."""
    env = os.environ.get("FLIPNET_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flipnet" / "kernels"


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "gcc", "cc"):
        if cand and shutil.which(cand):
            return cand
    return None


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return cc


def _compile(cc: str, flags: list[str], target: Path) -> bool:
    """Compile to a temporary file in the target folder, then rename it into place."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError:
        return False
    try:
        proc = subprocess.run([cc, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return False
        os.replace(tmp, target)
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _private_dir(path: Path) -> bool:
    """Create ``path`` (mode 0700) if needed; True when it is a folder of ours that others cannot
    write. In a shared temp folder another user could otherwise plant the library we then load."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError:
        return False
    if not hasattr(os, "getuid"):
        return True
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.fn_abi_version.restype = cint
    lib.fn_simd_level.restype = cint
    lib.fn_openmp.restype = cint
    lib.fn_pack_nchw.argtypes = [ptr, i64, i64, i64, ptr, i64, cint]
    lib.fn_pack_nchw.restype = None
    lib.fn_im2col.argtypes = [ptr] + [i64] * 14 + [ctypes.c_uint64, ctypes.c_uint64, ptr, cint]
    lib.fn_im2col.restype = None
    lib.fn_bgemm.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, ptr, cint, cint]
    lib.fn_bgemm.restype = None
    lib.fn_conv2d.argtypes = [ptr] + [i64] * 4 + [ptr] + [i64] * 11 + [ctypes.c_uint64, ctypes.c_uint64, ptr, ptr, cint, cint, ptr, i64, cint]
    lib.fn_conv2d_scratch.argtypes = [i64] * 8
    lib.fn_conv2d_scratch.restype = i64
    lib.fn_conv2d.restype = cint
    lib.fn_linear.argtypes = [ptr, i64, i64, ptr, i64, ptr, cint]
    lib.fn_linear.restype = cint
    lib.fn_threshold.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, cint]
    lib.fn_threshold.restype = None
    lib.fn_maxpool2d.argtypes = [ptr] + [i64] * 10 + [ptr, cint]
    lib.fn_maxpool2d.restype = None
    lib.fn_threshold_nhwc.argtypes = [ptr, i64, i64, ptr, ptr, ptr, cint]
    lib.fn_threshold_nhwc.restype = None
    lib.fn_maxpool2d_nhwc.argtypes = [ptr] + [i64] * 10 + [ptr, cint]
    lib.fn_maxpool2d_nhwc.restype = None
    return lib


def _build_and_load() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        return None
    source = _SOURCE.read_bytes()
    version = _compiler_version(cc)
    for extra in (["-fopenmp"], []):
        flags = _BASE_FLAGS + extra
        key = hashlib.sha256(
            b"\0".join([source, " ".join(flags).encode(), version.encode(), _cpu_fingerprint().encode()])
        ).hexdigest()[:16]
        name = f"flipnet_bgemm_{key}.so"
        target = cache_dir() / name
        if not target.exists() and not _compile(cc, flags, target):
            # an unwritable cache folder (read-only home, sandbox): build in the temp folder instead
            tmp_dir = Path(tempfile.gettempdir()) / f"flipnet-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
            target = tmp_dir / name
            if not _private_dir(tmp_dir) or (not target.exists() and not _compile(cc, flags, target)):
                continue
        try:
            lib = _declare(ctypes.CDLL(str(target)))
        except OSError:
            continue
        if lib.fn_abi_version() == _ABI:
            return lib
    return None


#: Values of ``FLIPNET_KERNELS`` / :func:`set_kernel_mode`.
KERNEL_MODES = ("auto", "c", "torch", "float")


def _parse_mode(value: str | None) -> str:
    m = (value or "auto").strip().lower()
    return m if m in KERNEL_MODES else "auto"


# Read once at import; packed layers consult it on every call (a plain global read).
_MODE = _parse_mode(os.environ.get("FLIPNET_KERNELS"))


def mode() -> str:
    """The kernel mode for packed layers left on ``impl="auto"``: ``"auto"``, ``"c"``, ``"torch"``
    or ``"float"`` (``FLIPNET_KERNELS`` at import, or the last :func:`set_kernel_mode`)."""
    return _MODE


def set_kernel_mode(mode: str | None = None) -> str:
    """Choose the implementation of every packed layer left on ``impl="auto"``; returns the previous mode.

    ``"auto"`` picks per layer by timing, ``"c"`` forces the C kernels (a failed build becomes an
    error), ``"torch"`` the PyTorch word ops (also keeping ``ThresholdSign``/``MaxPool2d`` off the
    C kernels), ``"float"`` float32 ``F.linear``/``F.conv2d`` on ±1 values. ``None`` re-reads the
    ``FLIPNET_KERNELS`` environment variable (unset or unknown: ``"auto"``), which is otherwise
    read once, when flipnet is imported.

    Raises:
        ValueError: an unknown mode.
    """
    global _MODE
    previous = _MODE
    if mode is None:
        _MODE = _parse_mode(os.environ.get("FLIPNET_KERNELS"))
    else:
        value = str(mode).strip().lower()
        if value not in KERNEL_MODES:
            raise ValueError(f"kernel mode must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
        _MODE = value
    return previous


_FAST: dict[tuple[int, str], object] = {}


def fast_function(lib: ctypes.CDLL, name: str, restype: type | None = ctypes.c_int):  # type: ignore[no-untyped-def]
    """``lib.name`` as a function pointer without ``argtypes``: every argument must already be a
    ``ctypes`` object of the C type (``c_void_p``, ``c_int64``, ``c_uint64``, ``c_int``). Cached."""
    key = (id(lib), name)
    fn = _FAST.get(key)
    if fn is None:
        fn = ctypes.CFUNCTYPE(restype)(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value)
        _FAST[key] = fn
    return fn


def load_library() -> ctypes.CDLL | None:
    """The compiled kernel library, or ``None`` where the PyTorch fallback must be used."""
    global _LIB, _TRIED
    wanted = mode()
    if wanted == "torch":
        return None
    if _TRIED:
        if _LIB is None and wanted == "c":
            raise KernelBuildError("the C kernels could not be built; install gcc, or set_kernel_mode('auto') / unset FLIPNET_KERNELS=c")
        return _LIB
    with _LOCK:
        if not _TRIED:
            _LIB = _build_and_load()
            _TRIED = True
            if _LIB is None:
                if wanted == "c":
                    raise KernelBuildError(
                        "the C kernels could not be built; install gcc (or set CC), or set_kernel_mode('auto') / unset FLIPNET_KERNELS=c"
                    )
                warnings.warn(
                    "flipnet: no working C compiler for the packed kernels; using the slower PyTorch "
                    "implementation (set CC or install gcc for the fast path)",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _LIB


def kernel_backend() -> str:
    """``"c-avx512"``, ``"c"`` (portable popcount) or ``"torch"``: what packed CPU layers use."""
    lib = load_library()
    if lib is None:
        return "torch"
    name = "c-avx512" if lib.fn_simd_level() == 512 else "c"
    return name + ("+openmp" if lib.fn_openmp() else "")
