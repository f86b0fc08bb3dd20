"""The Python examples in README.md and docs/*.md run as written (issue #10: docs never rot).

Every fenced ```` ```python ```` block is executed, in the order of its file, in one namespace per
file (so a later block may use names an earlier block of the same file defined, as a reader
would). All blocks run in ONE child process inside a temporary folder: files the examples write
(``runs/``, ``shuffle.safetensors``) land there, and registrations they make (a codec, an
optimizer) cannot leak into the other tests' registries.

Convention for doc authors: a block that cannot run on its own -- a fragment that uses names the
reader supplies (``model``, ``loader``), a signature listing, something that needs a GPU, a data
set that is not shipped, or minutes of compute -- is preceded by the line

    <!-- no-test -->

(an HTML comment, invisible in the rendered page) directly above its opening fence. Everything
else must run on a CPU in seconds. The whole module takes ~15-30 s on 2 loaded cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_TEST = "<!-- no-test -->"
FENCE = re.compile(r"^(`{3,})(\S*)\s*$")


def _blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(first code line number, code, skipped) for each ```python block of ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != fence:
            j += 1
        if lang in ("python", "py"):
            skipped = i > 0 and lines[i - 1].strip() == NO_TEST
            out.append((i + 2, "\n".join(lines[i + 1:j]) + "\n", skipped))
        i = j + 1
    return out


BLOCKS = [(p.relative_to(ROOT).as_posix(), line, code, skipped)
          for p in DOC_FILES for line, code, skipped in _blocks(p)]

# Runs in the child: one namespace per file, stdout of each block captured, first error per block.
_RUNNER = r"""
import contextlib, io, json, sys, traceback
blocks = json.load(sys.stdin)
spaces, results = {}, []
for name, line, code in blocks:
    ns = spaces.setdefault(name, {"__name__": "__docs_example__"})
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"{name}:{line}", "exec"), ns)   # our own documentation
        error = None
    except BaseException as exc:                             # reported per block below
        error = "".join(traceback.format_exception(exc)[-6:])
    results.append({"name": name, "line": line, "error": error, "stdout": out.getvalue()[-20000:]})
sys.__stdout__.write("\n@@RESULTS@@" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], dict]:
    todo = [(name, line, code) for name, line, code, skipped in BLOCKS if not skipped]
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(todo), text=True,
                          capture_output=True, cwd=tmp_path_factory.mktemp("docs_examples"),
                          env=env, timeout=600)
    assert "@@RESULTS@@" in proc.stdout, f"example runner crashed:\n{proc.stderr[-3000:]}"
    rows = json.loads(proc.stdout.rsplit("@@RESULTS@@", 1)[1])
    return {(r["name"], r["line"]): r for r in rows}


def test_blocks_are_found() -> None:
    names = {name for name, *_ in BLOCKS}
    assert {"README.md", "docs/layers.md", "docs/training.md"} <= names
    assert sum(not skipped for *_, skipped in BLOCKS) >= 10


def test_marker_parsing(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("a\n\n```python\nprint(1)\n```\n<!-- no-test -->\n```python\nmodel\n```\n"
                   "```bash\nls\n```\n````python\nx = '```'\n````\n", encoding="utf-8")
    assert _blocks(doc) == [(4, "print(1)\n", False), (8, "model\n", True), (14, "x = '```'\n", False)]


@pytest.mark.parametrize("name,line", [(n, ln) for n, ln, _, skipped in BLOCKS if not skipped],
                         ids=[f"{n}:{ln}" for n, ln, _, skipped in BLOCKS if not skipped])
def test_example_runs(results: dict[tuple[str, int], dict], name: str, line: int) -> None:
    row = results[(name, line)]
    assert row["error"] is None, (
        f"the example at {name}:{line} fails (fix it, or mark it {NO_TEST!r} if it cannot run on its "
        f"own):\n{row['error']}")


def test_printed_results_match_the_docs(results: dict[tuple[str, int], dict]) -> None:
    """A few outputs the docs state in comments, checked so that a wrong number fails too."""
    out = {key: row["stdout"] for key, row in results.items()}
    by_file: dict[str, str] = {}
    for (name, _), text in out.items():
        by_file[name] = by_file.get(name, "") + text
    assert "tensor([-1.,  1.]" in by_file["README.md"]
    assert "Conv2d BinaryConv2d" in by_file["docs/convert.md"]
    assert "16 ['conv1', 'fc', 'layer2.0.downsample.0'" in by_file["docs/convert.md"]
    assert "{1: 10985472, 32: 209610} 2.11 MiB 20.25x 92.4%" in by_file["docs/convert.md"]
    assert "['2.weight', '5.weight']" in by_file["docs/layers.md"]
    assert "tensor([0.0707, 1.0000, 0.7864])" in by_file["docs/quantizers.md"]
    summary_doc = (ROOT / "docs" / "summary.md").read_text(encoding="utf-8")
    table = re.search(r"```\n(Model: Sequential.*?)```", summary_doc, flags=re.S)
    assert table and table.group(1).strip() == by_file["docs/summary.md"].strip()
