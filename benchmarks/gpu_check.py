#!/usr/bin/env python
"""GPU validation kit: everything GPU-side in flipnet, measured by one command of under 10 minutes.

    python benchmarks/gpu_check.py [--device cuda] [--out DIR] [--budget-s 540] [--smoke]

Sections, in this order, each with its own time cap (a share of what is left of the budget, so
time a section does not use goes to the later ones):

1. ``environment`` -- GPU, driver, PyTorch/CUDA/cuDNN/Triton versions, free memory, and the
   dense matmul rate in bf16, TF32 and fp32 (TF32 off), timed with CUDA events.
2. ``tests`` -- ``pytest -m gpu`` on the test files that hold GPU tests, in a subprocess; the
   outcome of every test comes from its JUnit XML (or, after a timeout, from the ``-v`` lines).
3. ``agreement`` -- one BinaryNet + Bop run (batch 50, fp32, TF32 off, deterministic cuDNN) on the
   GPU and on the CPU from the same start and the same batches, step by step: the fraction of
   identical binary weights over the steps and both loss curves. Then the fast modes (CUDA graphs,
   channels-last, TF32, bf16 autocast, compile, and all of them together) against the GPU fp32
   run, each with its verdict: ``identical``, ``rounding`` (the first step's loss differs by no
   more than the precision's rounding and training goes on alike) or ``mismatch``.
4. ``epoch_time`` -- BinaryNet images/s at batch 50, 256 and 1024 for eager, compile, CUDA graphs
   and compile + CUDA graphs in fp32, TF32 and bf16, next to the FLOP bound from the measured
   matmul rate; the float twin beside it; 1 vs 3 vectorised seeds. Configurations run in order
   of importance until the cap; the rest are listed as not run.
5. ``fast_run`` -- the time-to-91 % candidate (recipe ``fast91_cifar10``) with 3 vectorised seeds
   for as many epochs as the cap allows, checkpointed so that a second call continues it; the
   accuracy curve and the projected time to the recipe's end. Needs CIFAR-10: the first folder
   of ``--data``, ``<repo>/data/cifar10``, ``<repo>/data``, ``$FLIPNET_DATA`` that holds the
   pickles or the offline JPEG folder (``cifar10_jpgs.tar.gz`` + ``labels_51000.npy``, decoded
   once into ``--state-dir``); without one the section says so and is skipped.
6. ``packed_inference`` -- the exported BinaryNet on packed layers (XNOR-popcount; on CUDA the
   Triton kernels where they win) against the bf16 float model at batch 1, 64 and 1024, whole
   network and per layer, with the implementation each packed layer chose.

``DIR/report.json`` and ``DIR/report.md`` are rewritten atomically after every measurement, so a
crash, a kill or a timeout keeps everything done so far. A section that raises is recorded with
its error and the kit goes on. A watchdog ends the process shortly after the budget, marking the
running section ``timeout``. Statuses: ``ok``, ``failed`` (ran and found a problem: a failing
test, a mismatch), ``error`` (raised), ``timeout``, ``skipped`` (with the reason), ``pending``
(never reached).

``--smoke`` runs every section on the CPU with tiny models in well under a minute (the default
test suite does, so the kit cannot rot); ``--sections`` runs a subset.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "benchmarks", REPO / "src"):  # check this checkout's code, installed or not
    if _p.is_dir() and str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

KIT_VERSION = 1
SECTIONS: tuple[tuple[str, float], ...] = (
    # name, share of the budget (re-normalised over the sections still to run)
    ("environment", 0.04),
    ("tests", 0.16),
    ("agreement", 0.17),
    ("epoch_time", 0.27),
    ("fast_run", 0.26),
    ("packed_inference", 0.10),
)
SECTION_NAMES = tuple(n for n, _ in SECTIONS)
RESERVE_S = 8.0  # kept back from the budget for the final report write
FAST_RECIPE = "fast91_cifar10"
TARGET_ACC = 0.91


# ============================================================================ report
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    return str(v)


class Report:
    """``report.json`` + ``report.md``, rewritten atomically on every :meth:`write`."""

    def __init__(self, out: Path, meta: dict[str, Any], names: tuple[str, ...]) -> None:
        self.out = out
        self.lock = threading.RLock()
        self.data: dict[str, Any] = {
            "kit": meta,
            "sections": [{"name": n, "status": "pending"} for n in names],
        }
        self.md: dict[str, list[str]] = {n: [] for n in names}

    def section(self, name: str) -> dict[str, Any]:
        for s in self.data["sections"]:
            if s["name"] == name:
                return s
        raise KeyError(name)

    def write(self) -> None:
        with self.lock:
            self.data["kit"]["updated"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
            _atomic_write(self.out / "report.json", json.dumps(_jsonable(self.data), indent=1) + "\n")
            _atomic_write(self.out / "report.md", self.markdown())

    def markdown(self) -> str:
        k = self.data["kit"]
        lines = [
            "# flipnet GPU validation kit report",
            "",
            f"Started {k.get('started')}, last written {k.get('updated')}; device `{k.get('device')}`"
            f"{' (smoke mode: tiny CPU configs, not measurements)' if k.get('smoke') else ''}; budget {k.get('budget_s')} s.",
            f"Command: `{k.get('command')}`",
            "",
            "| section | status | time (s) | cap (s) | note |",
            "|---|---|---:|---:|---|",
        ]
        for s in self.data["sections"]:
            note = s.get("error") or s.get("note") or ""
            note = note.splitlines()[0][:160] if note else ""
            lines.append(f"| {s['name']} | {s['status']} | {_fmt(s.get('elapsed_s'), 1)} | {_fmt(s.get('cap_s'), 0)} | {note} |")
        for s in self.data["sections"]:
            lines += ["", f"## {s['name']}: {s['status']}", ""]
            if s.get("error"):
                lines += ["```", str(s.get("traceback") or s["error"]).rstrip()[-3000:], "```", ""]
            lines += self.md.get(s["name"], [])
        return "\n".join(lines) + "\n"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan"
        if v != 0 and abs(v) < 0.5 * 10**-digits:
            return f"{v:.2e}"
        return f"{v:,.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]], digits: int = 3) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(v, digits) for v in r) + " |")
    return out


# ============================================================================ context
class Ctx:
    """What a section sees: arguments, device, its deadline, its report entry and shared results."""

    def __init__(self, args: argparse.Namespace, report: Report) -> None:
        self.args = args
        self.report = report
        self.smoke: bool = args.smoke
        self.device_name: str = args.device
        self.shared: dict[str, Any] = {}
        self.children: list[subprocess.Popen] = []
        self.deadline = math.inf
        self.name = ""
        self.sec: dict[str, Any] = {}
        self.md: list[str] = []

    @property
    def result(self) -> dict[str, Any]:
        return self.sec.setdefault("result", {})

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def update(self) -> None:
        self.sec["elapsed_s"] = time.monotonic() - self.sec.get("_t0", time.monotonic())
        self.report.write()

    def device(self) -> Any:
        import torch

        return torch.device(self.device_name)

    def is_cuda(self) -> bool:
        return self.device_name.startswith("cuda")


class SectionSkipped(Exception):
    """Raised by a section that cannot run here (the message says why)."""


class SectionFailed(Exception):
    """Raised by a section that ran and found a problem (the message says what)."""


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench(fn: Callable[[], Any], device: Any, reps: int = 10, warmup: int = 2, max_s: float = 5.0) -> float:
    """Median seconds per call (CUDA events on CUDA), at most about ``max_s`` of timing."""
    from epoch_time import Timer

    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.monotonic()
    for _ in range(reps):
        with Timer(device) as t:
            fn()
        times.append(t.seconds)
        if time.monotonic() - start > max_s:
            break
    return statistics.median(times)


# ============================================================================ 1 environment
def sec_environment(ctx: Ctx) -> None:
    import torch

    from epoch_time import measure_matmul_rate

    r = ctx.result
    r["python"] = sys.version.split()[0]
    r["platform"] = platform.platform()
    r["cpu_count"] = os.cpu_count()
    r["torch_threads"] = torch.get_num_threads()
    r["torch"] = torch.__version__
    r["cuda_runtime"] = torch.version.cuda
    r["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        import triton

        r["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001 - any import failure is a fact to report
        r["triton"] = f"not importable: {type(e).__name__}: {e}"
    try:
        import flipnet

        r["flipnet"] = getattr(flipnet, "__version__", "?")
        r["flipnet_path"] = str(Path(flipnet.__file__).parent)
    except Exception as e:  # noqa: BLE001
        r["flipnet"] = f"not importable: {e}"
    try:
        r["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                         text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        r["git_commit"] = None
    r["source_digest"] = _source_digest()  # identifies the code where the copy has no .git
    dev = ctx.device()
    ctx.md += [f"- torch {r['torch']}, CUDA runtime {r['cuda_runtime']}, cuDNN {r['cudnn']}, triton {r['triton']}, "
               f"Python {r['python']}, {r['cpu_count']} CPUs",
               f"- flipnet from `{r.get('flipnet_path')}`, commit {r['git_commit']}, source digest {r['source_digest']}"]
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        free, total = torch.cuda.mem_get_info(dev)
        r["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "total_memory_gib": props.total_memory / 2**30,
            "free_memory_gib": free / 2**30,
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            r["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
            r["driver"] = out.stdout.split(",")[1].strip() if out.stdout.count(",") >= 1 else None
        except (OSError, subprocess.SubprocessError) as e:
            r["nvidia_smi"] = f"unavailable: {e}"
        g = r["gpu"]
        ctx.md += [f"- GPU **{g['name']}** (compute capability {g['capability']}, {g['multiprocessors']} SMs), driver "
                   f"{r.get('driver')}, memory {g['total_memory_gib']:.1f} GiB, free {g['free_memory_gib']:.1f} GiB"]
    else:
        r["gpu"] = None
        ctx.md += ["- no GPU: device is the CPU"]
    ctx.update()
    n = 256 if ctx.smoke else (8192 if dev.type == "cuda" else 1024)
    seconds = 0.2 if ctx.smoke else 1.0
    rates: dict[str, float] = {}
    r["matmul_size"] = n
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True), ("fp32", torch.float32, False)):
        if name == "tf32" and dev.type != "cuda":
            rates[name] = rates.get("fp32") or measure_matmul_rate(dev, torch.float32, n, seconds, 3)
            continue
        rates[name] = measure_matmul_rate(dev, dtype, n, seconds, 3, tf32=tf32)
        r["matmul_tflops"] = {k: v / 1e12 for k, v in rates.items()}
        ctx.update()
    r["matmul_tflops"] = {k: v / 1e12 for k, v in rates.items()}
    ctx.shared["rates"] = rates
    ctx.md += ["", f"Dense {n}x{n} matmul, best of 3 windows ({'CUDA events' if dev.type == 'cuda' else 'wall clock'}):", ""]
    ctx.md += _table(["precision", "TFLOP/s"], [[k, v / 1e12] for k, v in rates.items()])
    if dev.type != "cuda":
        ctx.md += ["", "(TF32 exists on CUDA only; the CPU row repeats fp32.)"]


def _source_digest() -> str:
    """sha256 (first 16 hex digits) of every ``.py``/``.c``/``.yaml`` file under src/, benchmarks/ and tests/."""
    import hashlib

    h = hashlib.sha256()
    for top in ("src", "benchmarks", "tests"):
        for f in sorted((REPO / top).rglob("*")):
            if f.suffix in (".py", ".c", ".yaml") and f.is_file() and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(REPO)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


# ============================================================================ 2 tests
_VERBOSE_LINE = re.compile(r"^(\S+::\S+?)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def gpu_test_files() -> list[str]:
    """Test files that hold ``@pytest.mark.gpu`` tests, relative to the repository root."""
    out = []
    for p in sorted((REPO / "tests").glob("test_*.py")):
        try:
            if "mark.gpu" in p.read_text(encoding="utf-8"):
                out.append(str(p.relative_to(REPO)))
        except OSError:
            continue
    return out


def parse_junit(path: Path) -> list[dict[str, Any]]:
    """One dict per test case: ``test``, ``outcome``, ``time_s``, ``message``."""
    root = ET.parse(path).getroot()
    cases = []
    for tc in root.iter("testcase"):
        outcome, message = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or child.text or "").strip()
                break
        cls = tc.get("classname", "")
        cases.append({"test": f"{cls}::{tc.get('name')}" if cls else str(tc.get("name")), "outcome": outcome,
                      "time_s": float(tc.get("time") or 0.0), "message": message[:500]})
    return cases


def sec_tests(ctx: Ctx) -> None:
    files = gpu_test_files()
    if ctx.smoke:
        files = files[:1]
    if not files:
        raise SectionFailed("no test file holds a @pytest.mark.gpu test")
    junit = ctx.args.out / "tests_junit.xml"
    if junit.exists():
        junit.unlink()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-v", "-rA",
           f"--junitxml={junit}", *files]
    import importlib.util

    if importlib.util.find_spec("pytest_timeout") is not None:  # one hanging test must not eat the section
        cmd[3:3] = ["--timeout", str(int(max(60, min(180, ctx.left() / 2))))]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    r = ctx.result
    r["command"] = " ".join(cmd[1:])
    r["files"] = files
    timeout = max(5.0, ctx.left() - 3.0)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    ctx.children.append(proc)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        out, _ = proc.communicate()
    finally:
        ctx.children.remove(proc)
    r["exit_code"] = proc.returncode
    r["output_tail"] = out[-4000:]
    if junit.is_file():
        cases = parse_junit(junit)
        r["source"] = "junitxml"
    else:
        cases = [{"test": m.group(1), "outcome": m.group(2).lower(), "time_s": None, "message": ""}
                 for m in map(_VERBOSE_LINE.match, out.splitlines()) if m]
        r["source"] = "pytest -v output (no JUnit file)"
    r["cases"] = cases
    counts: dict[str, int] = {}
    for c in cases:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    r["counts"] = counts
    ctx.md += [f"`pytest {r['command'].split(' ', 2)[-1]}` (exit {proc.returncode}): "
               + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), ""]
    ctx.md += _table(["test", "outcome", "time (s)", "message"],
                     [[c["test"], c["outcome"], c["time_s"], c["message"].splitlines()[0][:120] if c["message"] else ""]
                      for c in cases], 2)
    if timed_out:
        raise TimeoutError(f"pytest ran past the section cap ({timeout:.0f} s); outcomes so far are listed")
    bad = counts.get("failed", 0) + counts.get("error", 0)
    if bad or proc.returncode not in (0, 5):
        raise SectionFailed(f"{bad} GPU test(s) failed or errored (pytest exit {proc.returncode})")
    if not ctx.is_cuda():
        ctx.sec["note"] = "no CUDA here: every GPU test skips"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        try:
            proc.kill()
        except OSError:
            pass


# ============================================================================ 3 agreement
def _agreement_batches(n_steps: int, batch: int, seed: int = 0) -> list[tuple[Any, Any]]:
    """Fixed batches of the seeded synthetic CIFAR-shaped data set (a learnable rule)."""
    from flipnet.data import load_dataset, scale_images

    bundle = load_dataset("synthetic", num_train=n_steps * batch, num_test=batch, shape=(3, 32, 32),
                          num_classes=10, seed=seed)
    x, y = bundle.split("train")
    return [(scale_images(x[i * batch:(i + 1) * batch]), y[i * batch:(i + 1) * batch].long()) for i in range(n_steps)]


def _binary_weights(model: Any) -> list[Any]:
    from flipnet.layers import binary_parameters

    return binary_parameters(model)


def _snapshot(model: Any) -> Any:
    """The binary weights' signs as one flat bool tensor (on the model's device)."""
    import torch

    return torch.cat([(p.detach() > 0).flatten() for p in _binary_weights(model)])


class _Det:
    """Deterministic fp32 on CUDA inside the block: cuDNN deterministic, no autotuning, TF32 off."""

    def __enter__(self) -> _Det:
        import torch

        from epoch_time import fp32_precision

        self._old = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        self._prec = fp32_precision(False)
        self._prec.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        self._prec.__exit__(*exc)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = self._old


def _fresh(init: Any, device: Any, channels_last: bool = False) -> tuple[Any, Any]:
    from epoch_time import optimizer_for
    from flipnet.train.fast import prepare_model

    model = prepare_model(copy.deepcopy(init), device, channels_last)
    return model, optimizer_for("binarynet", model)


#: (name, make_train_step options, channels_last, precision, expected verdict)
FAST_MODES: tuple[tuple[str, dict[str, Any], bool, str, str], ...] = (
    ("cuda_graphs", {"cuda_graphs": True}, False, "fp32", "identical"),
    ("channels_last", {}, True, "fp32", "rounding"),
    ("tf32", {}, False, "tf32", "rounding"),
    ("bf16", {"amp": True}, False, "bf16", "rounding"),
    ("compile", {"compile": True}, False, "fp32", "rounding"),
    ("bf16+channels_last+compile+cuda_graphs", {"amp": True, "compile": True, "cuda_graphs": True}, True, "bf16", "rounding"),
)
#: largest relative difference of the first step's loss (same weights) that counts as rounding. bf16
#: rounds the pre-activations, so a few signs near zero flip and move the loss more than 2**-8.
ROUNDING_TOL = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 0.2}


def _reference_run(init: Any, dev: Any, batches: list[tuple[Any, Any]], snap_at: set[int], *, capturable: bool,
                   snaps_on_cpu: bool) -> tuple[list[float], dict[int, Any]]:
    """Eager fp32 run from ``init``: per-step batch-mean losses and sign snapshots at ``snap_at``."""
    import torch
    import torch.nn.functional as F

    from flipnet.train.fast import make_train_step, tensorize_hyperparameters

    model, opt = _fresh(init, dev)
    if capturable:
        tensorize_hyperparameters(opt)  # the same Adam numerics (capturable) as under CUDA graphs
    step = make_train_step(model, opt, F.cross_entropy)
    losses, snaps = [], {}
    for i, (x, y) in enumerate(batches):
        loss, _ = step(x, y)
        losses.append(loss / y.shape[0])
        if i + 1 in snap_at:
            snap = _snapshot(model)
            snaps[i + 1] = snap.cpu() if snaps_on_cpu else snap
    return [float(v) for v in torch.stack(losses).cpu()], snaps


def sec_agreement(ctx: Ctx) -> None:
    """GPU vs CPU from the same start (the CPU run in a thread, overlapping the fast-mode runs on
    the GPU), then each fast mode against the GPU fp32 run."""
    import torch
    import torch.nn.functional as F

    from epoch_time import build_model, fp32_precision
    from flipnet.train.fast import make_train_step, tensorize_hyperparameters

    dev = ctx.device()
    smoke = ctx.smoke
    filters, dense = (8, 32) if smoke else (128, 1024)
    batch = 8 if smoke else 50
    n_steps = 6 if smoke else ctx.args.agreement_steps
    check_every = 2 if smoke else 10
    r = ctx.result
    r.update({"model": f"binarynet filters={filters} dense_units={dense}", "batch": batch, "steps": n_steps,
              "optimizer": "bop gamma=1e-4 threshold=1e-8 + adam lr=1e-2",
              "data": "synthetic 3x32x32 (seeded prototypes + noise), the same batches everywhere",
              "settings": "fp32, TF32 off, cuDNN deterministic, no cudnn.benchmark"})
    batches = _agreement_batches(n_steps, batch)
    init = build_model("binarynet", filters, dense, seed=0)
    n_weights = sum(p.numel() for p in _binary_weights(init))
    r["binary_weights"] = n_weights
    snap_at = sorted({1, n_steps} | set(range(check_every, n_steps + 1, check_every)))
    dev_batches = [(x.to(dev), y.to(dev)) for x, y in batches]
    cpu = torch.device("cpu")
    deadline = ctx.deadline - 2.0
    with _Det():
        # -- the GPU fp32 runs: plain (against the CPU) and with capturable Adam (against the fast modes)
        t_ref = time.monotonic()
        gpu_loss, gpu_snaps = _reference_run(init, dev, dev_batches, set(snap_at), capturable=False, snaps_on_cpu=True)
        ref_loss, ref_snaps = _reference_run(init, dev, dev_batches, set(snap_at), capturable=True, snaps_on_cpu=False)
        ref_s = (time.monotonic() - t_ref) / 2
        r["reference_seconds"] = ref_s

        # -- the CPU run, in a thread, compared with the plain GPU run at the same steps
        rows: list[dict[str, Any]] = []
        r["gpu_vs_cpu"] = rows  # filled by the CPU thread; rows are appended whole
        failure: list[BaseException] = []
        stop = threading.Event()

        def cpu_run() -> None:
            try:
                m_cpu, o_cpu = _fresh(init, cpu)
                s_cpu = make_train_step(m_cpu, o_cpu, F.cross_entropy)
                for i, (x, y) in enumerate(batches):
                    if stop.is_set() or time.monotonic() > deadline:
                        break
                    l_cpu, _ = s_cpu(x, y)
                    row: dict[str, Any] = {"step": i + 1, "loss_cpu": float(l_cpu) / batch, "loss_gpu": gpu_loss[i]}
                    if i + 1 in gpu_snaps:
                        row["identical_fraction"] = float((_snapshot(m_cpu) == gpu_snaps[i + 1]).double().mean())
                    rows.append(row)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                failure.append(e)

        worker = threading.Thread(target=cpu_run, name="gpu_check-cpu-run", daemon=True)
        worker.start()

        # -- fast modes vs the GPU fp32 run (main thread, while the CPU run goes on)
        modes: list[dict[str, Any]] = []
        r["fast_modes"] = modes
        for name, opts, channels_last, precision, expected in FAST_MODES:
            entry: dict[str, Any] = {"mode": name, "precision": precision, "channels_last": channels_last, "expected": expected}
            modes.append(entry)
            need = 1.5 * ref_s + 1.0 + ((25.0 if dev.type == "cuda" else 60.0) if opts.get("compile") else 0.0)
            if smoke and opts.get("compile"):
                entry["verdict"] = "not run"
                entry["note"] = "smoke mode: compiling on a CPU takes tens of seconds"
                continue
            if deadline - time.monotonic() < need:
                entry["verdict"] = "not run"
                entry["note"] = f"section cap reached ({max(0.0, deadline - time.monotonic()):.0f} s left, about {need:.0f} s needed)"
                continue
            t0 = time.monotonic()
            try:
                with fp32_precision(precision == "tf32"):
                    if opts.get("compile"):
                        torch._dynamo.reset()
                    model, opt = _fresh(init, dev, channels_last)
                    tensorize_hyperparameters(opt)
                    step = make_train_step(model, opt, F.cross_entropy, amp_dtype=torch.bfloat16 if opts.get("amp") else None,
                                           compile=bool(opts.get("compile")), cuda_graphs=bool(opts.get("cuda_graphs")))
                    entry["ran_as"] = step.mode
                    losses, fractions = [], {}
                    for i, (x, y) in enumerate(dev_batches):
                        loss, _ = step(x, y)
                        losses.append(loss / batch)
                        if i + 1 in ref_snaps:
                            fractions[i + 1] = float((_snapshot(model) == ref_snaps[i + 1]).double().mean())
                    losses = [float(v) for v in torch.stack(losses).cpu()]
                    del model, opt, step
            except Exception as e:  # noqa: BLE001 - one mode failing must not hide the others
                entry["verdict"] = "error"
                entry["error"] = f"{type(e).__name__}: {e}"[:1000]
                ctx.update()
                continue
            entry.update({"verdict": "pending (judged after the CPU run)", "seconds": time.monotonic() - t0,
                          "losses": losses, "identical_fraction": fractions,
                          "first_step_loss_rel_diff": _rel(losses[0], ref_loss[0]),
                          "final_identical_fraction": fractions[n_steps],
                          "final_loss_gap": abs(_tail_mean(losses) - _tail_mean(ref_loss))})
            ctx.update()
        worker.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        stop.set()
        worker.join(timeout=30.0)
    if failure:
        raise failure[0]
    if not rows:
        raise TimeoutError("the CPU run did not finish one step within the cap")

    # -- GPU vs CPU
    r["gpu_vs_cpu"] = rows
    checked = [x for x in rows if "identical_fraction" in x]
    sm = r["gpu_vs_cpu_summary"] = {
        "steps": len(rows),
        "devices": [str(dev), "cpu"],
        "first_step_loss_rel_diff": _rel(rows[0]["loss_gpu"], rows[0]["loss_cpu"]),
        "final_identical_fraction": checked[-1]["identical_fraction"] if checked else None,
        "mean_loss_last_10pct": {"gpu": _tail_mean([x["loss_gpu"] for x in rows]), "cpu": _tail_mean([x["loss_cpu"] for x in rows])},
    }
    baseline_gap = abs(sm["mean_loss_last_10pct"]["gpu"] - sm["mean_loss_last_10pct"]["cpu"])
    ctx.md += [f"BinaryNet ({r['model']}), batch {batch}, {r['optimizer']}; {r['settings']}; {r['data']}.", "",
               f"**{dev} vs CPU** from the same start: {sm['steps']} of {n_steps} steps on the CPU within the cap "
               f"(the GPU ran all {n_steps}); first-step loss relative difference {_fmt(sm['first_step_loss_rel_diff'], 2)}; "
               f"identical binary weights at the last check {_fmt(sm['final_identical_fraction'], 6)}.", ""]
    ctx.md += _table(["step", "loss GPU", "loss CPU", "identical binary weights"],
                     [[x["step"], x["loss_gpu"], x["loss_cpu"], x["identical_fraction"]] for x in checked], 6)
    if dev.type != "cuda":
        ctx.md += ["", "(No GPU: both sides ran on the CPU, so this only exercises the code.)"]

    # -- verdicts of the fast modes (they need the GPU-vs-CPU gap as the scale of rounding)
    for m in modes:
        if "losses" in m:
            m["final_loss_tolerance"] = _loss_tolerance(ref_loss, baseline_gap)
            m["verdict"] = _verdict(m["losses"], ref_loss, m["identical_fraction"], m["precision"], baseline_gap)
            m["as_expected"] = m["verdict"] == m["expected"] or (m["expected"] == "rounding" and m["verdict"] == "identical")
    ctx.md += ["", f"**Fast modes vs the {dev} fp32 run** ({n_steps} steps, same start, same batches). "
               f"Verdict `rounding`: the first step (same weights) differs by at most the precision's rounding "
               f"(relative {ROUNDING_TOL}) and the mean loss over the last 10 % of steps stays within "
               f"0.05 + 3 x the GPU-vs-CPU gap ({baseline_gap:.4f}) + 2 standard errors of the reference's batch losses "
               "there (a heuristic: read the curves in report.json). "
               "Bop flips a weight when |m| crosses the threshold, so any rounding difference flips a few weights "
               "differently and the trajectories then drift apart: a falling identical fraction is expected for every "
               "mode that does not give identical numbers.", ""]
    ctx.md += _table(["mode", "ran as", "expected", "verdict", "first-step loss rel. diff", "identical binary weights at end",
                      "final loss gap", "tolerance", "note"],
                     [[m["mode"], m.get("ran_as", ""), m["expected"], m["verdict"], m.get("first_step_loss_rel_diff"),
                       m.get("final_identical_fraction"), m.get("final_loss_gap"), m.get("final_loss_tolerance"),
                       m.get("error") or m.get("note", "")] for m in modes], 6)
    unexpected = [m["mode"] for m in modes if m.get("as_expected") is False and m["verdict"] == "rounding"]
    if unexpected and not smoke:  # e.g. graph replay not bit-identical to eager: rounding-sized, reported, not failed
        ctx.sec["note"] = f"rounding-sized differences where identical numbers were expected: {', '.join(unexpected)}"
    bad = [m["mode"] for m in modes if m["verdict"] in ("mismatch", "error")]
    if smoke and bad:  # tiny models on a CPU: the verdicts exercise the code, they judge nothing
        ctx.sec["note"] = f"smoke mode, verdicts not judged (would flag: {', '.join(bad)})"
    elif bad:
        raise SectionFailed(f"fast modes not as expected: {', '.join(bad)}")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _tail_mean(xs: list[float]) -> float:
    k = max(1, len(xs) // 10)
    return statistics.fmean(xs[-k:])


def _loss_tolerance(ref: list[float], baseline_gap: float) -> float:
    k = max(1, len(ref) // 10)
    tail = ref[-k:]
    stderr = statistics.stdev(tail) / math.sqrt(k) if k > 1 else 0.0
    return 0.05 + 3 * baseline_gap + 2 * stderr


def _verdict(losses: list[float], ref: list[float], fractions: dict[int, float], precision: str, baseline_gap: float) -> str:
    if losses == ref and all(v == 1.0 for v in fractions.values()):
        return "identical"
    if (_rel(losses[0], ref[0]) <= ROUNDING_TOL[precision]
            and abs(_tail_mean(losses) - _tail_mean(ref)) <= _loss_tolerance(ref, baseline_gap)):
        return "rounding"
    return "mismatch"


# ============================================================================ 4 epoch time
def _epoch_plan(smoke: bool, cuda: bool) -> list[tuple[str, str, str, int, int]]:
    """``(model, precision, mode, seeds, batch)`` in order of importance."""
    if smoke:
        return [("binarynet", "fp32", "eager", 1, 8), ("binarynet", "bf16", "eager", 1, 8),
                ("binarynet", "fp32", "cuda_graphs", 1, 8), ("float", "fp32", "eager", 1, 8),
                ("binarynet", "fp32", "eager", 3, 8), ("binarynet", "fp32", "compile", 1, 8)]
    batches = (50, 256, 1024)
    plan: list[tuple[str, str, str, int, int]] = []
    add = plan.append
    for mode in ("eager", "cuda_graphs"):
        for b in batches:
            add(("binarynet", "bf16", mode, 1, b))
    add(("binarynet", "bf16", "compile+cuda_graphs", 1, 256))  # the fast run's configuration
    for b in (50, 256):
        for mode in ("eager", "cuda_graphs"):
            add(("binarynet", "bf16", mode, 3, b))
    for prec in ("tf32", "fp32"):
        for mode in ("eager", "cuda_graphs"):
            for b in batches:
                add(("binarynet", prec, mode, 1, b))
    for mode in ("eager", "cuda_graphs"):
        for b in batches:
            add(("float", "bf16", mode, 1, b))
    for mode in ("compile+cuda_graphs", "compile"):
        for b in (50, 1024, 256):
            if (mode, b) != ("compile+cuda_graphs", 256):
                add(("binarynet", "bf16", mode, 1, b))
    add(("binarynet", "bf16", "compile+cuda_graphs", 3, 256))
    for prec in ("tf32", "fp32"):
        for b in batches:
            add(("float", prec, "eager", 1, b))
            add(("float", prec, "cuda_graphs", 1, b))
    for prec in ("tf32", "fp32"):
        for mode in ("compile+cuda_graphs", "compile"):
            for b in batches:
                add(("binarynet", prec, mode, 1, b))
    for mode in ("compile+cuda_graphs", "compile"):
        for b in batches:
            add(("float", "bf16", mode, 1, b))
    if not cuda:
        plan = [p for p in plan if "cuda_graphs" not in p[2]]
    return plan


def sec_epoch_time(ctx: Ctx) -> None:
    import torch

    from epoch_time import markdown, measure_matmul_rate, model_flops, rate_dtype, time_config

    dev = ctx.device()
    smoke = ctx.smoke
    filters, dense = (4, 16) if smoke else (128, 1024)
    warmup, steps = (1, 1) if smoke else ((5, 20) if dev.type == "cuda" else (1, 2))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rates = dict(ctx.shared.get("rates") or {})
    for p in ("fp32", "tf32", "bf16"):
        if p not in rates:
            dtype, tf32 = rate_dtype(p)
            rates[p] = measure_matmul_rate(dev, dtype, 256 if smoke else 8192, 0.3, 3, tf32=tf32)
    flops = {k: model_flops(k, filters, dense, dev) for k in ("binarynet", "float")}
    r = ctx.result
    r.update({"model": f"binarynet filters={filters} dense_units={dense}", "warmup_steps": warmup, "timed_steps": steps,
              "forward_macs_per_image": {k: v[0] for k, v in flops.items()},
              "train_flop_per_image": {k: v[1] for k, v in flops.items()},
              "matmul_tflops": {k: v / 1e12 for k, v in rates.items()}, "channels_last": dev.type == "cuda",
              "data": "random device-resident batches (no input pipeline)"})
    rows: list[Any] = []
    not_run: list[str] = []
    r["rows"] = []
    r["not_run"] = not_run
    plan = [c for c in _epoch_plan(smoke, dev.type == "cuda") if c[2] in ctx.args.epoch_modes]
    for kind, prec, mode, seeds, batch in plan:
        label = f"{kind} {prec} {mode} seeds={seeds} batch={batch}"
        need = 3.0 if smoke else (40.0 if "compile" in mode else (4.0 + batch / 256))
        if smoke and "compile" in mode:
            not_run.append(f"{label} (smoke mode: compiling on a CPU takes tens of seconds)")
            continue
        if ctx.left() < need:
            not_run.append(f"{label} (cap: {max(ctx.left(), 0):.0f} s left)")
            continue
        try:
            row = time_config(kind, mode, batch, prec, seeds=seeds, filters=filters, dense_units=dense, device=dev,
                              channels_last=dev.type == "cuda", warmup=warmup, steps=steps, bound=rates[prec] / flops[kind][1])
        except Exception as e:  # noqa: BLE001 - one configuration failing must not stop the rest
            not_run.append(f"{label} (error: {type(e).__name__}: {str(e)[:300]})")
            ctx.update()
            continue
        rows.append(row)
        r["rows"].append(row.as_dict())
        ctx.update()
    # 1 vs 3 seeds: time per step ratio at the same per-member batch
    ratios = []
    for a in rows:
        if a.seeds == 3:
            one = [b for b in rows if b.seeds == 1 and (b.model, b.precision, b.mode, b.batch) == (a.model, a.precision, a.mode, a.batch)]
            if one:
                ratios.append({"model": a.model, "precision": a.precision, "mode": a.mode, "batch": a.batch,
                               "step_time_ratio_3_over_1": one[0].images_per_s * 3 / a.images_per_s})
    r["seeds_ratio"] = ratios
    ctx.md += [f"{r['model']}; {warmup} warm-up + {steps} timed steps per row on random device-resident batches; "
               f"bound = matmul rate of the row's precision / {flops['binarynet'][1] / 1e9:.4g} GFLOP per training image "
               f"(BinaryNet; float twin {flops['float'][1] / 1e9:.4g}). Seeds > 1: that many members as one wide network, "
               "images/s over all members.", "", markdown(rows)]
    if ratios:
        ctx.md += ["", "Step time of 3 vectorised seeds over 1 seed (same per-member batch):", ""]
        ctx.md += _table(["model", "precision", "mode", "batch", "time(3 seeds) / time(1 seed)"],
                         [[x["model"], x["precision"], x["mode"], x["batch"], x["step_time_ratio_3_over_1"]] for x in ratios], 2)
    if not_run:
        ctx.md += ["", "Not run: " + "; ".join(not_run)]
    if not rows:
        if all("(cap:" in x or "smoke mode" in x for x in not_run):
            raise TimeoutError("the cap ended the section before any configuration was timed")
        raise SectionFailed("no configuration could be timed")


# ============================================================================ 5 fast run
def find_cifar10(explicit: Path | None) -> tuple[Path | None, list[str]]:
    """The first folder holding CIFAR-10 pickles or the offline JPEG folder, and where it looked."""
    from flipnet.data.cifar10 import BATCHES_DIR, is_offline_folder

    cands: list[Path] = []
    if explicit is not None:
        cands.append(explicit)
    cands += [REPO / "data" / "cifar10", REPO / "data"]
    env = os.environ.get("FLIPNET_DATA", "").strip()
    if env:
        cands += [Path(env) / "cifar10", Path(env)]
    looked = []
    for c in cands:
        looked.append(str(c))
        if not c.is_dir():
            continue
        if is_offline_folder(c) or (c / BATCHES_DIR / "data_batch_1").is_file() or (c / "data_batch_1").is_file():
            return c, looked
    return None, looked


def _member_loss(out: Any, y: Any) -> Any:
    import torch.nn.functional as F

    s, b = y.shape
    return F.cross_entropy(out.reshape(s * b, -1).float(), y.reshape(s * b), reduction="sum") / b


def _member_metrics(out: Any, y: Any, loss: Any) -> tuple[Any, Any]:
    import torch.nn.functional as F

    s, b = y.shape
    per = F.cross_entropy(out.reshape(s * b, -1).float(), y.reshape(s * b), reduction="none").reshape(s, b).sum(1)
    return per, (out.argmax(dim=2) == y).sum(dim=1)


def _build_fast_run(cfg: Any, seeds: list[int], dev: Any) -> dict[str, Any]:
    """The recipe's run for each seed, as one wide network, with its loaders and schedules.

    Data, model (``model.init`` included), optimizer and schedules come from the trainer's
    builders (:mod:`flipnet.train.build`), so the members are what ``flipnet train`` would train;
    where that module is missing, the same pieces are put together from the registries directly.
    """
    import torch

    try:
        from flipnet.train.ensemble import SeedEnsemble, SeedOptimizer
    except ImportError:  # before the move out of flipnet.train.multi
        from flipnet.train.multi import SeedEnsemble, SeedOptimizer

    try:
        from flipnet.train import build as B
    except ImportError:
        B = None
    channels_last = dev.type == "cuda"
    if B is not None:
        bundle = B.build_data(cfg)
    else:
        from flipnet.data import load_dataset, split_validation

        bundle = split_validation(load_dataset(cfg.data.name, root=cfg.data.root, **dict(cfg.data.options)), cfg.data.val_size)
    models = []
    for s in seeds:
        torch.manual_seed(s)
        if B is not None:
            m = B.build_model(cfg, bundle.num_classes, bundle.input_shape)
        else:
            from flipnet.models import create_model

            m = create_model(cfg.model.name, num_classes=bundle.num_classes, in_channels=bundle.in_channels, **dict(cfg.model.kwargs))
        models.append(m.to(dev))
    ensemble = SeedEnsemble(models, channels_last=channels_last)
    if B is not None:
        opts = [B.build_optimizer(cfg, m) for m in models]
    else:
        from epoch_time import make_optimizer

        o = cfg.optim
        opts = [make_optimizer(m, o.binary, dict(o.binary_kwargs), o.real, dict(o.real_kwargs)) for m in models]
    ensemble.sync_modes()
    seed_opt = SeedOptimizer(ensemble, opts, grad_clip=getattr(cfg.train, "grad_clip", None))
    from flipnet.data import make_loader

    loaders = [make_loader(bundle, "train", cfg.data.batch_size, train=True, device=dev, augment=cfg.data.augment,
                           seed=s, drop_last=True) for s in seeds]
    evals = {}
    for split in ("val", "test"):
        try:
            x, _ = bundle.split(split)
        except (ValueError, KeyError):
            continue
        if x is not None and len(x):
            evals[split] = make_loader(bundle, split, cfg.data.eval_batch_size, train=False, device=dev, augment=False, seed=0)
    steps_per_epoch = len(loaders[0])
    scheds = []
    for opt in opts:
        if B is not None:
            scheds.append(B.build_schedules(cfg, opt, steps_per_epoch))
        else:
            from flipnet.optim.schedules import scheduler_from_dict

            scheds.append([scheduler_from_dict(opt, {"key": sc.key, "type": sc.type, "route": sc.route, "unit": sc.unit,
                                                     **dict(sc.params)}, epochs=cfg.train.epochs, steps_per_epoch=steps_per_epoch)
                           for sc in cfg.optim.schedules])
    return {"models": models, "ensemble": ensemble, "opts": opts, "seed_opt": seed_opt, "loaders": loaders,
            "evals": evals, "scheds": scheds, "steps_per_epoch": steps_per_epoch, "channels_last": channels_last,
            "builders": "flipnet.train.build" if B is not None else "registries (no flipnet.train.build)",
            "bundle": bundle}


def _fast_state(run: dict[str, Any], epoch: int, curve: list[dict[str, Any]], train_s: float, key: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": key,
        "epoch": epoch,
        "curve": json.dumps(curve),
        "train_s": train_s,
        "models": [m.state_dict() for m in run["models"]],
        "optimizers": [o.state_dict() for o in run["opts"]],
        "schedulers": [[s.state_dict() for s in member] for member in run["scheds"]],
    }


def _load_fast_state(run: dict[str, Any], state: dict[str, Any]) -> None:
    for m, sd in zip(run["models"], state["models"]):
        m.load_state_dict(sd)
    for o, sd in zip(run["opts"], state["optimizers"]):
        o.load_state_dict(sd)
    for member, sds in zip(run["scheds"], state["schedulers"]):
        for s, sd in zip(member, sds):
            s.load_state_dict(sd)
    run["ensemble"].check_links()


def _save(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _evaluate(run: dict[str, Any], loader: Any, amp_dtype: Any, dev: Any) -> list[float]:
    """Accuracy of every member on one split."""
    import torch

    ens = run["ensemble"]
    ens.eval()
    hits = torch.zeros(ens.num_members, device=dev, dtype=torch.float64)
    n = 0
    try:
        with torch.no_grad():
            for x, y in loader:
                ctx = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else torch.autocast(dev.type, enabled=False)
                with ctx:
                    out = ens(x, shared=True)
                hits += (out.argmax(dim=2) == y.unsqueeze(0)).sum(dim=1)
                n += y.shape[0]
    finally:
        ens.train()
    return [float(v) / max(n, 1) for v in hits.cpu()]


def sec_fast_run(ctx: Ctx) -> None:
    import contextlib

    with contextlib.ExitStack() as stack:
        _fast_run(ctx, stack)


def _fast_run(ctx: Ctx, stack: Any) -> None:
    import torch

    from epoch_time import fp32_precision
    from flipnet.train.config import load_config
    from flipnet.train.fast import make_train_step

    dev = ctx.device()
    smoke = ctx.smoke
    cuda = dev.type == "cuda"
    r = ctx.result
    seeds = [0, 1, 2]
    state_dir: Path = ctx.args.state_dir
    ckpt_path = state_dir / "fast_run" / ("checkpoint_smoke.pt" if smoke else "checkpoint.pt")
    found, looked = find_cifar10(ctx.args.data)
    r["cifar10"] = str(found) if found else None
    r["cifar10_looked_in"] = looked
    if not smoke and not cuda:
        raise SectionSkipped("the fast run needs a CUDA GPU (one CPU epoch of BinaryNet x 3 seeds takes hours); CIFAR-10 "
                             + (f"found at {found}" if found else "not found (looked in " + ", ".join(looked) + ")"))
    if smoke:
        cfg = load_config(FAST_RECIPE, [
            "data.name=synthetic", "data.options={num_train: 120, num_test: 50, shape: [3, 32, 32], num_classes: 10}",
            "data.val_size=20", "model.kwargs={filters: 4, dense_units: 16}", "data.batch_size=20",
            "data.eval_batch_size=50", "train.epochs=4", "train.precision=fp32"])
        r["data"] = "synthetic 100 train / 20 val / 50 test images (smoke mode); CIFAR-10 " + (f"found at {found}" if found else "not found")
        per_call_epochs = 2
    else:
        if found is None:
            raise SectionSkipped(
                "CIFAR-10 not found (looked in " + ", ".join(looked) + "). Copy the offline folder "
                "(cifar10_jpgs.tar.gz + labels_51000.npy, e.g. /work/shared/data/cifar10) to <repo>/data/cifar10 "
                "and carry that path, or pass --data DIR")
        from flipnet.data.cifar10 import is_offline_folder

        overrides = [f"data.root={json.dumps(str(found))}"]
        if is_offline_folder(found):  # decoded once into the state folder, which a second call reuses
            overrides.append(f"data.options={{cache_dir: {json.dumps(str(state_dir / 'cifar10'))}}}")
        cfg = load_config(FAST_RECIPE, overrides)
        per_call_epochs = cfg.train.epochs
    precision = str(getattr(cfg.train, "precision", "bf16" if getattr(cfg.train, "amp", False) else "fp32"))
    amp_dtype = torch.bfloat16 if cuda and precision in ("bf16", "auto") else None
    tf32 = cuda and precision == "tf32"
    use_compile = cuda if str(cfg.train.compile) == "auto" else bool(cfg.train.compile)
    use_graphs = cuda and bool(getattr(cfg.train, "cuda_graphs", True))
    if smoke:
        use_compile = False  # compiling on a CPU takes tens of seconds
    key = {"recipe": FAST_RECIPE, "seeds": seeds, "model": dict(cfg.model.kwargs), "batch": cfg.data.batch_size,
           "epochs": cfg.train.epochs, "val_size": cfg.data.val_size, "device": dev.type, "smoke": smoke}
    r.update({"recipe": FAST_RECIPE, "seeds": seeds, "epochs_total": cfg.train.epochs, "batch_size": cfg.data.batch_size,
              "precision": "bf16" if amp_dtype is not None else ("tf32" if tf32 else "fp32"), "compile": use_compile,
              "cuda_graphs": use_graphs, "checkpoint": str(ckpt_path), "target_acc": TARGET_ACC})
    if tf32:
        stack.enter_context(fp32_precision(True))
    t_build = time.monotonic()
    run = _build_fast_run(cfg, seeds, dev)
    bundle = run.pop("bundle")
    try:  # the trainer's resolution of train.precision, where it exists
        from flipnet.train.build import select_precision
    except ImportError:
        select_precision = None
    if select_precision is not None:
        chosen = select_precision(precision, dev, run["models"][0])
        amp_dtype = chosen.amp_dtype
        r["precision"] = chosen.name
        r["precision_reason"] = getattr(chosen, "reason", "")
        if getattr(chosen, "int8", False):
            chosen.apply(run["ensemble"])
        if chosen.name == "tf32" and cuda and not tf32:
            stack.enter_context(fp32_precision(True))
    r["build_s"] = time.monotonic() - t_build
    r["builders"] = run["builders"]
    r["splits"] = {k: len(bundle.split(k)[0]) for k in ("train", "val", "test") if k == "train" or k in run["evals"]}
    if not smoke:
        r["data"] = f"CIFAR-10 from {found} ({bundle.info.get('source', 'pickles')}); splits {r['splits']}"
    ctx.update()
    start_epoch, curve, train_s = 0, [], 0.0
    r["resumed_from_epoch"] = None
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=dev, weights_only=True)
        if state.get("key") == key:
            _load_fast_state(run, state)
            start_epoch, curve, train_s = int(state["epoch"]), json.loads(state["curve"]), float(state["train_s"])
            r["resumed_from_epoch"] = start_epoch
        else:
            r["checkpoint_ignored"] = f"{ckpt_path} is of another configuration ({state.get('key')})"
    if use_compile:
        torch._dynamo.reset()
    step_fn = make_train_step(run["ensemble"], run["seed_opt"], _member_loss, amp_dtype=amp_dtype,
                              compile=use_compile, cuda_graphs=use_graphs, metrics_fn=_member_metrics)
    r["ran_as"] = step_fn.mode
    r["build_s"] = time.monotonic() - t_build
    r["curve"] = curve
    ctx.update()
    epoch = start_epoch
    epoch_times: list[float] = []
    last_save = time.monotonic()
    stop_epoch = min(cfg.train.epochs, start_epoch + per_call_epochs)
    s = len(seeds)
    while epoch < stop_epoch:
        if epoch_times:  # the first epoch of a call includes compilation: estimate from the others
            est = statistics.median(epoch_times[1:] or epoch_times)
            need = est * 1.2 + 15.0
        else:
            est, need = float("nan"), (60.0 if cuda and not smoke else 1.0)
        if ctx.left() < need:
            r["stopped"] = f"section cap: {max(ctx.left(), 0):.0f} s left, the next epoch needs about {need:.0f} s"
            break
        for ld in run["loaders"]:
            ld.set_epoch(epoch)
        sums = torch.zeros(2, s, device=dev, dtype=torch.float64)
        n = 0
        step_scheds = [sc for member in run["scheds"] for sc in member if getattr(sc, "unit", "step") == "step"]
        t0 = time.monotonic()
        for batches in zip(*run["loaders"]):
            x = torch.stack([b[0] for b in batches])
            y = torch.stack([b[1] for b in batches])
            loss_sum, hits = step_fn(x, y)
            sums[0] += loss_sum
            sums[1] += hits
            n += y.shape[1]
            for sc in step_scheds:
                sc.step()
        _sync(dev)
        dt = time.monotonic() - t0
        for member in run["scheds"]:
            for sc in member:
                if getattr(sc, "unit", "step") == "epoch":
                    sc.step()
        t1 = time.monotonic()
        accs = {split: _evaluate(run, loader, amp_dtype, dev) for split, loader in run["evals"].items()}
        eval_s = time.monotonic() - t1
        epoch += 1
        train_s += dt
        epoch_times.append(dt)
        tot = sums.cpu().tolist()
        if not all(math.isfinite(v) for v in tot[0]):
            raise SectionFailed(f"the training loss became NaN/inf in epoch {epoch}")
        curve.append({"epoch": epoch, "train_s": dt, "eval_s": eval_s, "cumulative_train_s": train_s,
                      "first_of_call": len(epoch_times) == 1, "train_loss": [v / n for v in tot[0]],
                      "train_acc": [v / n for v in tot[1]],
                      **{f"{k}_acc": v for k, v in accs.items()}, **{f"mean_{k}_acc": statistics.fmean(v) for k, v in accs.items()}})
        ctx.update()
        if time.monotonic() - last_save > 60.0 or smoke:
            _save(_fast_state(run, epoch, curve, train_s, key), ckpt_path)
            last_save = time.monotonic()
    if epoch > start_epoch:
        _save(_fast_state(run, epoch, curve, train_s, key), ckpt_path)
    r["epochs_done"] = epoch
    r["graph_replays"] = step_fn.graph_replays
    _fast_summary(ctx, cfg, curve, start_epoch)
    if epoch == start_epoch and epoch < cfg.train.epochs:
        raise TimeoutError(r.get("stopped") or "no epoch was trained in this call")


def _fast_summary(ctx: Ctx, cfg: Any, curve: list[dict[str, Any]], start_epoch: int) -> None:
    """Time to the target: the first epoch whose mean *validation* accuracy reaches it (test
    accuracy when the recipe holds out no validation split), with the test accuracy there."""
    r = ctx.result
    total = cfg.train.epochs
    sel = "val" if curve and "mean_val_acc" in curve[0] else "test"
    r["target_judged_on"] = sel
    reached = next((c for c in curve if c.get(f"mean_{sel}_acc", -1.0) >= TARGET_ACC), None)
    steady = [c["train_s"] for c in curve if not c.get("first_of_call")] or [c["train_s"] for c in curve]
    per_epoch = statistics.median(steady) if steady else None
    r["seconds_per_epoch"] = per_epoch
    if curve and per_epoch is not None:
        # one uninterrupted run: the first epoch (with compilation and capture) plus steady epochs
        r["projected_recipe_s"] = curve[0]["train_s"] + per_epoch * (total - 1)
    if reached is not None:
        r["time_to_target_s"] = reached["cumulative_train_s"]
        r["target_reached_at_epoch"] = reached["epoch"]
        r["test_acc_at_target"] = reached.get("mean_test_acc")
        verdict = (f"mean {sel} accuracy reached {TARGET_ACC:.0%} at epoch {reached['epoch']} after "
                   f"{reached['cumulative_train_s']:.0f} s of training (each call's first epoch includes compilation); "
                   f"mean test accuracy there {_fmt(reached.get('mean_test_acc'), 4)}")
    else:
        done = curve[-1]["epoch"] if curve else 0
        last = (f", mean {sel} accuracy {curve[-1].get(f'mean_{sel}_acc', float('nan')):.4f}, test "
                f"{curve[-1].get('mean_test_acc', float('nan')):.4f}") if curve else ""
        verdict = (f"{TARGET_ACC:.0%} not reached in {done} of {total} epochs{last}; at {_fmt(per_epoch, 1)} s per epoch "
                   f"one uninterrupted run of the recipe's {total} epochs takes about {_fmt(r.get('projected_recipe_s'), 0)} s "
                   f"of training (whether it reaches {TARGET_ACC:.0%} is not known until it has run)")
    r["verdict"] = verdict
    ctx.md += [f"Recipe `{FAST_RECIPE}`, seeds {r['seeds']} as one wide network, batch {r['batch_size']}, "
               f"{r['precision']}, compile {r['compile']}, CUDA graphs {r['cuda_graphs']} (ran as {r.get('ran_as')}); "
               f"built with {r.get('builders')}; data: {r.get('data')}; checkpoint `{r['checkpoint']}`"
               + (f"; resumed from epoch {start_epoch}" if start_epoch else "") + ".", "",
               f"**{verdict}.** The first epoch of each call includes compilation and graph capture; evaluation time "
               "is not counted.", ""]
    splits = [k for k in ("val", "test") if curve and f"{k}_acc" in curve[0]]
    ctx.md += _table(["epoch", "train s", "cumulative s", "train loss (mean)"]
                     + [f"{k} acc per seed" for k in splits] + [f"mean {k} acc" for k in splits],
                     [[c["epoch"], c["train_s"], c["cumulative_train_s"], statistics.fmean(c["train_loss"])]
                      + [" / ".join(f"{a:.4f}" for a in c[f"{k}_acc"]) for k in splits]
                      + [c[f"mean_{k}_acc"] for k in splits] for c in curve], 4)
    if r.get("stopped"):
        ctx.md += ["", f"Stopped: {r['stopped']}. Run the kit again on the same machine (same `--state-dir`) to continue "
                   "from the checkpoint (e.g. `--sections fast_run`)."]


# ============================================================================ 6 packed inference
def _randomize_bn(model: Any, seed: int = 0) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 3)
            m.running_var.copy_(torch.rand(n, generator=g) * 20 + 1)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.5)


def sec_packed_inference(ctx: Ctx) -> None:
    import torch
    import torch.nn.functional as F

    from epoch_time import build_model, fp32_precision
    from flipnet.compress import export_model, load_exported
    from flipnet.compress import _triton as tri
    from flipnet.compress.packed import PackedBinaryConv2d, PackedBinaryLinear, _PackedBase

    dev = ctx.device()
    smoke = ctx.smoke
    cuda = dev.type == "cuda"
    filters, dense = (8, 32) if smoke else (128, 1024)
    batches = [1, 8] if smoke else [1, 64, 1024]
    r = ctx.result
    r["triton"] = tri.status(dev)
    model = build_model("binarynet", filters, dense, seed=0)
    from flipnet.optim import prepare_model_for

    prepare_model_for(model, binary="bop", real="adam")  # flip mode: the weights become exactly ±1
    _randomize_bn(model)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "binarynet.safetensors"
        export_model(model, path)
        packed = load_exported(path, device=dev).eval()
    ref = copy.deepcopy(model).to(dev).eval()
    fast = copy.deepcopy(model).to(dev).eval()
    if cuda:
        fast = fast.to(memory_format=torch.channels_last)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if cuda else torch.autocast(dev.type, enabled=False)
    r["model"] = f"binarynet filters={filters} dense_units={dense}, exported and reloaded (BatchNorm folded into thresholds)"
    r["float_reference"] = "the same model in eval mode, " + ("bf16 autocast + channels_last" if cuda else "fp32 (no bf16 autocast on CPU)")
    rows: list[dict[str, Any]] = []
    layer_rows: list[dict[str, Any]] = []
    r["whole_network"] = rows
    r["layers"] = layer_rows
    g = torch.Generator().manual_seed(1)
    for b in batches:
        if ctx.left() < (3.0 if smoke else 8.0):
            r.setdefault("not_run", []).append(f"batch {b} (cap)")
            continue
        x = (torch.rand(b, 3, 32, 32, generator=g) * 2 - 1).to(dev)
        with torch.inference_mode():
            packed(x)  # first call: every packed layer picks its implementation by timing
            with fp32_precision(False):  # compare without TF32 rounding in the real-input first layer
                want = ref(x)
                got = packed(x)
            agree = float((want.argmax(1) == got.argmax(1)).float().mean())
            max_diff = float((want - got).abs().max())
            t_packed = _bench(lambda: packed(x), dev, reps=5 if smoke else 20)
            with amp:
                t_bf16 = _bench(lambda: fast(x), dev, reps=5 if smoke else 20)
        chosen = {}
        for name, m in packed.named_modules():
            if isinstance(m, _PackedBase):
                chosen[name] = sorted(set(m.tuned.values())) or [m.impl]
        rows.append({"batch": b, "packed_ms": t_packed * 1e3, "bf16_ms": t_bf16 * 1e3, "speedup_vs_bf16": t_bf16 / t_packed,
                     "argmax_agreement_with_fp32": agree, "max_abs_diff_vs_fp32": max_diff, "impl": chosen})
        ctx.update()
        # per layer: each packed layer on its real input, every implementation, against bf16 on ±1 values
        inputs: dict[str, Any] = {}
        hooks = [m.register_forward_pre_hook(lambda mod, a, n=name: inputs.__setitem__(n, a[0].detach().clone()))
                 for name, m in packed.named_modules() if isinstance(m, (PackedBinaryConv2d, PackedBinaryLinear))]
        with torch.inference_mode():
            packed(x)
        for h in hooks:
            h.remove()
        for name, m in packed.named_modules():
            if name not in inputs or ctx.left() < 2.0:
                continue
            xin = inputs[name]
            row: dict[str, Any] = {"batch": b, "layer": name, "kind": type(m).__name__, "shape": list(xin.shape)}
            saved = m.impl
            outs = {}
            try:
                with torch.inference_mode():
                    for impl in _layer_impls(dev, tri):
                        if impl == "torch" and cuda and b > 64:
                            continue  # the PyTorch word-op fallback is far behind on a GPU and slow to time
                        try:
                            m.impl = impl
                            outs[impl] = m(xin)
                            row[f"{impl}_ms"] = _bench(lambda: m(xin), dev, reps=3 if smoke else 10, max_s=2.0) * 1e3
                        except Exception as e:  # noqa: BLE001 - record and go on
                            row[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    base = outs.get("torch", outs.get("float"))
                    row["all_equal"] = base is not None and all(torch.equal(o, base) for o in outs.values())
                    xs = torch.where(xin >= 0, 1.0, -1.0)
                    w = m.signs().to(dev)
                    if cuda:
                        xs, w = xs.to(torch.bfloat16), w.to(torch.bfloat16)
                        if isinstance(m, PackedBinaryConv2d):
                            xs = xs.contiguous(memory_format=torch.channels_last)
                            w = w.contiguous(memory_format=torch.channels_last)
                    if isinstance(m, PackedBinaryConv2d):
                        left, right, top, bottom = m.pads
                        fn = lambda: F.conv2d(F.pad(xs, [left, right, top, bottom]) if any(m.pads) else xs, w, None, m.stride, 0, m.dilation)  # noqa: E731
                    else:
                        fn = lambda: F.linear(xs, w)  # noqa: E731
                    row["bf16_ms" if cuda else "float32_ms"] = _bench(fn, dev, reps=3 if smoke else 10, max_s=2.0) * 1e3
            finally:
                m.impl = saved
            layer_rows.append(row)
        ctx.update()
    ctx.md += [f"{r['model']}; float reference: {r['float_reference']}. Triton: {r['triton']}.", "",
               "Whole network (median per call; the packed layers chose their implementation by timing on the first call):", ""]
    ctx.md += _table(["batch", "packed ms", "float ms", "float / packed", "argmax agreement vs fp32", "max |diff| vs fp32", "implementations chosen"],
                     [[x["batch"], x["packed_ms"], x["bf16_ms"], x["speedup_vs_bf16"], x["argmax_agreement_with_fp32"],
                       x["max_abs_diff_vs_fp32"], ", ".join(sorted({i for v in x["impl"].values() for i in v}))] for x in rows], 3)
    if layer_rows:
        impls = _layer_impls(dev, tri)
        ref_col = "bf16_ms" if cuda else "float32_ms"
        ctx.md += ["", f"Per binary layer (ms per call; `{ref_col}`: F.conv2d/F.linear on the ±1 input and weights):", ""]
        ctx.md += _table(["batch", "layer", "input"] + [f"{i} ms" for i in impls] + [ref_col.replace("_ms", " ms"), "all equal"],
                         [[x["batch"], x["layer"], "x".join(map(str, x["shape"]))] + [x.get(f"{i}_ms", x.get(f"{i}_error", "")) for i in impls]
                          + [x.get(ref_col), x.get("all_equal")] for x in layer_rows], 3)
    if not rows:
        raise TimeoutError("the cap ended the section before any batch size was measured")
    bad = [f"batch {x['batch']}" for x in rows if x["argmax_agreement_with_fp32"] < 0.99]
    bad += [f"{x['layer']} at batch {x['batch']}" for x in layer_rows if x.get("all_equal") is False]
    if bad:
        raise SectionFailed("packed outputs disagree: " + ", ".join(bad))


def _layer_impls(dev: Any, tri: Any) -> list[str]:
    impls = ["torch", "float"]
    if dev.type == "cpu":
        impls.insert(0, "c")
    if tri.usable_on(dev):
        impls.append("triton")
    return impls


# ============================================================================ driver
SECTION_FUNCS: dict[str, Callable[[Ctx], None]] = {
    "environment": sec_environment,
    "tests": sec_tests,
    "agreement": sec_agreement,
    "epoch_time": sec_epoch_time,
    "fast_run": sec_fast_run,
    "packed_inference": sec_packed_inference,
}


def _run_section(ctx: Ctx, name: str, cap: float) -> None:
    sec = ctx.report.section(name)
    ctx.name, ctx.sec = name, sec
    ctx.md = ctx.report.md[name]
    ctx.md.clear()
    sec["status"] = "running"
    sec["cap_s"] = cap
    sec["_t0"] = time.monotonic()
    ctx.deadline = time.monotonic() + cap
    ctx.report.write()
    try:
        SECTION_FUNCS[name](ctx)
        sec["status"] = "ok"
    except SectionSkipped as e:
        sec["status"], sec["note"] = "skipped", str(e)
    except SectionFailed as e:
        sec["status"], sec["note"] = "failed", str(e)
    except TimeoutError as e:
        sec["status"], sec["note"] = "timeout", str(e)
    except Exception as e:  # noqa: BLE001 - a section that raises is recorded and the kit goes on
        sec["status"] = "error"
        sec["error"] = f"{type(e).__name__}: {e}"
        sec["traceback"] = traceback.format_exc()[-6000:]
    finally:
        sec["elapsed_s"] = time.monotonic() - sec.pop("_t0")
        _free_memory()
        ctx.report.write()
        note = (sec.get("error") or sec.get("note") or "").splitlines()
        print(f"[gpu_check] {name}: {sec['status']} ({sec['elapsed_s']:.1f} s of {cap:.0f} s)"
              + (f" -- {note[0][:200]}" if note else ""), flush=True)


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def _watchdog(ctx: Ctx, seconds: float) -> threading.Timer:
    def fire() -> None:
        with ctx.report.lock:
            for s in ctx.report.data["sections"]:
                if s["status"] == "running":
                    s["status"] = "timeout"
                    s["note"] = "the kit's budget ran out during this section; the watchdog ended the process"
                    s["elapsed_s"] = time.monotonic() - s.pop("_t0", time.monotonic())
            ctx.report.data["kit"]["ended_by_watchdog"] = True
            try:
                ctx.report.write()
                print("[gpu_check] budget spent: the watchdog ends the kit\n" + _headline(ctx.report.data), flush=True)
            finally:
                for p in list(ctx.children):
                    _kill_group(p)
                os._exit(124)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


def _headline(data: dict[str, Any]) -> str:
    """A few lines with the main figures of each section that has them."""
    by = {s["name"]: s.get("result") or {} for s in data["sections"]}
    out = []
    env = by.get("environment", {})
    if env.get("matmul_tflops"):
        gpu = (env.get("gpu") or {}).get("name", "cpu")
        out.append(f"environment: {gpu}; matmul TFLOP/s " + ", ".join(f"{k} {v:.1f}" for k, v in env["matmul_tflops"].items()))
    if by.get("tests", {}).get("counts"):
        out.append("tests: " + ", ".join(f"{v} {k}" for k, v in sorted(by["tests"]["counts"].items())))
    ag = by.get("agreement", {})
    if ag.get("gpu_vs_cpu_summary"):
        sm = ag["gpu_vs_cpu_summary"]
        out.append(f"agreement: GPU vs CPU identical binary weights {sm.get('final_identical_fraction')} after {sm.get('steps')} steps; "
                   + ", ".join(f"{m['mode']} {m.get('verdict')}" for m in ag.get("fast_modes", [])))
    rows = by.get("epoch_time", {}).get("rows") or []
    if rows:
        best = max(rows, key=lambda x: x["images_per_s"] / max(1, x["seeds"]))
        out.append(f"epoch_time: {len(rows)} rows; fastest per seed {best['model']} {best['precision']} {best['mode']} "
                   f"batch {best['batch']}: {best['images_per_s'] / best['seeds']:,.0f} images/s ({best['epoch_s'] / best['seeds']:.1f} s/epoch)")
    fr = by.get("fast_run", {})
    if fr.get("verdict"):
        out.append(f"fast_run: {fr['verdict']}")
    pk = by.get("packed_inference", {}).get("whole_network") or []
    if pk:
        out.append("packed_inference: float/packed time " + ", ".join(f"batch {x['batch']} {x['speedup_vs_bf16']:.2f}x" for x in pk))
    return "\n".join(out)


def _resolve_device(name: str, smoke: bool) -> str:
    if smoke:
        return "cpu"
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Sections: " + ", ".join(SECTION_NAMES))
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check", help="folder of report.json / report.md")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="checkpoint of the fast run and the decoded CIFAR-10 (default: runs/gpu_check_state in the repo)")
    p.add_argument("--data", type=Path, default=None, help="CIFAR-10 folder (pickles or the offline JPEG folder)")
    p.add_argument("--budget-s", type=float, default=540.0, help="total seconds for all sections")
    p.add_argument("--smoke", action="store_true", help="every section on the CPU with tiny configs (under a minute)")
    p.add_argument("--sections", default=",".join(SECTION_NAMES), help="comma list of sections to run, in the kit's order")
    p.add_argument("--agreement-steps", type=int, default=300, help="steps of the GPU-vs-CPU run (fewer if the cap ends it)")
    p.add_argument("--epoch-modes", default="eager,cuda_graphs,compile,compile+cuda_graphs",
                   help="modes the epoch_time section times, e.g. compile,compile+cuda_graphs for a second call")
    args = p.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SECTION_NAMES]
    if bad or not wanted:
        p.error(f"unknown section(s) {bad}; valid: {', '.join(SECTION_NAMES)}")
    args.sections = [s for s in SECTION_NAMES if s in wanted]
    if not args.budget_s > RESERVE_S + 1:
        p.error(f"--budget-s must be more than {RESERVE_S + 1:.0f}")
    if args.agreement_steps < 1:
        p.error("--agreement-steps must be at least 1")
    from epoch_time import MODES

    args.epoch_modes = [m.strip() for m in args.epoch_modes.split(",") if m.strip()]
    bad = [m for m in args.epoch_modes if m not in MODES]
    if bad or not args.epoch_modes:
        p.error(f"unknown --epoch-modes {bad}; valid: {', '.join(MODES)}")
    if args.state_dir is None:
        args.state_dir = REPO / "runs" / "gpu_check_state"
    return args


def main(argv: list[str] | None = None) -> int:
    t_start = time.monotonic()
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.device = _resolve_device(args.device, args.smoke)
    meta = {"version": KIT_VERSION, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": args.device,
            "smoke": args.smoke, "budget_s": args.budget_s, "sections": args.sections, "host": platform.node(),
            "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}
    report = Report(args.out, meta, SECTION_NAMES)
    for name in SECTION_NAMES:
        if name not in args.sections:
            report.section(name).update(status="skipped", note="not selected (--sections)")
    ctx = Ctx(args, report)
    report.write()
    dog = _watchdog(ctx, args.budget_s + 20.0)
    try:
        if args.smoke:
            import torch

            torch.set_num_threads(min(2, torch.get_num_threads()))
        todo = list(args.sections)
        shares = dict(SECTIONS)
        for i, name in enumerate(todo):
            left = args.budget_s - RESERVE_S - (time.monotonic() - t_start)
            weight = sum(shares[n] for n in todo[i:])
            cap = max(1.0, left * shares[name] / weight)
            _run_section(ctx, name, cap)
    finally:
        dog.cancel()
    report.data["kit"]["total_s"] = time.monotonic() - t_start
    report.write()
    statuses = {s["name"]: s["status"] for s in report.data["sections"]}
    print(f"gpu_check: {args.out / 'report.md'}: " + ", ".join(f"{k} {v}" for k, v in statuses.items()), flush=True)
    if not args.smoke:  # the headline numbers, for a terminal that shows only the output's tail
        print(_headline(report.data), flush=True)
    return 0 if all(v in ("ok", "skipped") for v in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
