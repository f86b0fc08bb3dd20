"""The GPU validation kit (benchmarks/gpu_check.py): its CPU smoke mode runs every section, so the
kit that a rare GPU slot depends on cannot rot between slots."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "benchmarks" / "gpu_check.py"
SECTIONS = ["environment", "tests", "agreement", "epoch_time", "fast_run", "packed_inference"]


def _run_kit(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, str(KIT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    out = Path(args[args.index("--out") + 1])
    assert (out / "report.json").is_file(), proc.stderr[-3000:]
    return proc, json.loads((out / "report.json").read_text())


def _kit_module():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", KIT)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_smoke_mode_runs_every_section(tmp_path: Path) -> None:
    out, state = tmp_path / "out", tmp_path / "state"
    proc, report = _run_kit("--smoke", "--out", str(out), "--state-dir", str(state), "--budget-s", "300")
    sections = report["sections"]
    assert [s["name"] for s in sections] == SECTIONS
    detail = {s["name"]: (s["status"], s.get("error") or s.get("note")) for s in sections}
    assert all(s["status"] == "ok" for s in sections), detail
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    by = {s["name"]: s for s in sections}
    for s in sections:
        assert s["elapsed_s"] >= 0 and s["cap_s"] > 0
    assert report["kit"]["smoke"] is True and report["kit"]["device"] == "cpu"
    assert set(by["environment"]["result"]["matmul_tflops"]) == {"bf16", "tf32", "fp32"}
    tests = by["tests"]["result"]
    assert tests["source"] == "junitxml" and tests["cases"] and all(c["outcome"] == "skipped" for c in tests["cases"])
    agree = by["agreement"]["result"]
    assert agree["gpu_vs_cpu_summary"]["final_identical_fraction"] == 1.0  # CPU against CPU here
    assert [m["mode"] for m in agree["fast_modes"]][0] == "cuda_graphs"
    assert agree["fast_modes"][0]["verdict"] == "identical"  # ran eagerly: the same numbers
    rows = by["epoch_time"]["result"]["rows"]
    assert {r["model"] for r in rows} == {"binarynet", "float"} and {r["seeds"] for r in rows} == {1, 3}
    assert all(r["images_per_s"] > 0 for r in rows)
    fast = by["fast_run"]["result"]
    assert [c["epoch"] for c in fast["curve"]] == [1, 2] and fast["resumed_from_epoch"] is None
    assert len(fast["curve"][0]["test_acc"]) == 3 and fast["projected_recipe_s"] > 0
    packed = by["packed_inference"]["result"]
    assert [r["batch"] for r in packed["whole_network"]] == [1, 8]
    assert all(r["argmax_agreement_with_fp32"] == 1.0 for r in packed["whole_network"])
    assert packed["layers"] and all(r["all_equal"] for r in packed["layers"])
    md = (out / "report.md").read_text()
    for name in SECTIONS:
        assert f"## {name}: ok" in md
    headline = _kit_module()._headline(report)
    assert [line.split(":")[0] for line in headline.splitlines()] == SECTIONS

    # a second call continues the fast run from its checkpoint
    _, again = _run_kit("--smoke", "--sections", "fast_run", "--out", str(out), "--state-dir", str(state))
    by = {s["name"]: s for s in again["sections"]}
    assert by["fast_run"]["status"] == "ok" and by["environment"]["status"] == "skipped"
    fast = by["fast_run"]["result"]
    assert fast["resumed_from_epoch"] == 2 and [c["epoch"] for c in fast["curve"]] == [1, 2, 3, 4]


def test_a_section_that_raises_is_recorded_and_the_kit_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kit = _kit_module()

    def broken(ctx) -> None:
        ctx.result["partial"] = 1
        ctx.update()
        raise RuntimeError("boom")

    def fine(ctx) -> None:
        ctx.result["value"] = 2

    monkeypatch.setitem(kit.SECTION_FUNCS, "environment", broken)
    monkeypatch.setitem(kit.SECTION_FUNCS, "tests", fine)
    rc = kit.main(["--smoke", "--sections", "environment,tests", "--out", str(tmp_path), "--state-dir", str(tmp_path / "s")])
    report = json.loads((tmp_path / "report.json").read_text())
    by = {s["name"]: s for s in report["sections"]}
    assert rc == 1
    assert by["environment"]["status"] == "error" and "boom" in by["environment"]["error"]
    assert by["environment"]["result"] == {"partial": 1} and "RuntimeError" in by["environment"]["traceback"]
    assert by["tests"]["status"] == "ok" and by["tests"]["result"] == {"value": 2}
    assert by["agreement"]["status"] == "skipped"
    assert "## environment: error" in (tmp_path / "report.md").read_text()


def test_caps_share_the_budget_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time
    import types

    kit = _kit_module()
    for name in kit.SECTION_NAMES:
        monkeypatch.setitem(kit.SECTION_FUNCS, name, lambda ctx: None)
    # a clock that stands still: no time passes between sections, however loaded the machine is
    monkeypatch.setattr(kit, "time", types.SimpleNamespace(monotonic=lambda: 1000.0, strftime=time.strftime))
    kit.main(["--smoke", "--budget-s", "108", "--out", str(tmp_path), "--state-dir", str(tmp_path / "s")])
    report = json.loads((tmp_path / "report.json").read_text())
    caps = [s["cap_s"] for s in report["sections"]]
    shares = [w for _, w in kit.SECTIONS]
    left = 108 - kit.RESERVE_S
    # nothing used: each cap is its share of what is left (later shares re-normalised), the last gets it all
    for i, (cap, share) in enumerate(zip(caps, shares)):
        assert cap == pytest.approx(left * share / sum(shares[i:]), rel=1e-9)
    assert caps[-1] == pytest.approx(left, rel=1e-9) and caps[0] < caps[1] < caps[-1]


def test_junit_parsing_and_gpu_test_discovery(tmp_path: Path) -> None:
    kit = _kit_module()
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok" time="0.5"/>'
        '<testcase classname="tests.test_a" name="test_bad[x]" time="1.0"><failure message="assert 1 == 2">tb</failure></testcase>'
        '<testcase classname="tests.test_b" name="test_skip" time="0"><skipped message="needs a CUDA GPU"/></testcase>'
        '<testcase classname="tests.test_b" name="test_err" time="0"><error message="fixture broke"/></testcase>'
        "</testsuite></testsuites>"
    )
    cases = kit.parse_junit(xml)
    assert [(c["test"], c["outcome"]) for c in cases] == [
        ("tests.test_a::test_ok", "passed"), ("tests.test_a::test_bad[x]", "failed"),
        ("tests.test_b::test_skip", "skipped"), ("tests.test_b::test_err", "error"),
    ]
    assert cases[1]["message"] == "assert 1 == 2" and cases[0]["time_s"] == 0.5
    files = kit.gpu_test_files()
    assert "tests/test_fast_step.py" in files and "tests/test_triton.py" in files
    assert "tests/test_gpu_check.py" not in files


def test_cifar10_is_found_in_the_ignored_data_folder_or_reported_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kit = _kit_module()
    monkeypatch.setattr(kit, "REPO", tmp_path)
    monkeypatch.delenv("FLIPNET_DATA", raising=False)
    found, looked = kit.find_cifar10(None)
    assert found is None and str(tmp_path / "data" / "cifar10") in looked
    offline = tmp_path / "data" / "cifar10"
    offline.mkdir(parents=True)
    (offline / "cifar10_jpgs.tar.gz").write_bytes(b"")
    (offline / "labels_51000.npy").write_bytes(b"")
    assert kit.find_cifar10(None)[0] == offline
    other = tmp_path / "elsewhere" / "cifar-10-batches-py"
    other.mkdir(parents=True)
    (other / "data_batch_1").write_bytes(b"")
    assert kit.find_cifar10(other.parent)[0] == other.parent


def test_fast_mode_verdicts() -> None:
    kit = _kit_module()
    ref = [2.3, 2.1, 1.9, 1.8, 1.7, 1.6, 1.5, 1.5, 1.4, 1.4]
    same = {1: 1.0, 10: 1.0}
    assert kit._verdict(list(ref), ref, same, "fp32", 0.0) == "identical"
    # the first step within fp32 rounding, the end within tolerance, weights drifting apart: rounding
    near = [ref[0] * (1 + 5e-5)] + [v + 0.01 for v in ref[1:]]
    assert kit._verdict(near, ref, {1: 1.0, 10: 0.7}, "fp32", 0.0) == "rounding"
    # the same first-step difference is too large for fp32 but fine for bf16
    off = [ref[0] * 1.01] + ref[1:]
    assert kit._verdict(off, ref, {1: 1.0, 10: 0.9}, "fp32", 0.0) == "mismatch"
    assert kit._verdict(off, ref, {1: 1.0, 10: 0.9}, "bf16", 0.0) == "rounding"
    # training that ends elsewhere is a mismatch, unless the GPU-vs-CPU gap says such drift is rounding
    drift = list(ref[:-1]) + [ref[-1] + 0.5]
    assert kit._verdict(drift, ref, {1: 1.0, 10: 0.5}, "fp32", 0.0) == "mismatch"
    assert kit._verdict(drift, ref, {1: 1.0, 10: 0.5}, "fp32", 0.2) == "rounding"
    assert kit._loss_tolerance(ref, 0.1) == pytest.approx(0.05 + 0.3)
