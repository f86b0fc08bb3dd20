"""Every ``flipnet train`` command in docs/recipes.md, data.md, schedules.md and results.md is a
valid recipe + overrides (parsed and validated as the CLI would, without training)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from flipnet.train.config import list_recipes, load_config

DOCS = Path(__file__).resolve().parent.parent / "docs"
FILES = ["recipes.md", "data.md", "schedules.md", "results.md"]


def _commands() -> list[tuple[str, str]]:
    out = []
    for name in FILES:
        text = (DOCS / name).read_text(encoding="utf-8")
        for match in re.finditer(r"flipnet train ([^`|\n;]+)", text):
            words = shlex.split(match.group(1).split("#")[0])
            if words and words[0] in list_recipes():
                out.append((name, " ".join(shlex.quote(w) for w in words)))
    return sorted(set(out))


COMMANDS = _commands()


def test_the_docs_have_commands() -> None:
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize(("doc", "command"), COMMANDS)
def test_documented_train_command_is_a_valid_recipe(doc: str, command: str) -> None:
    words = shlex.split(command)
    recipe, rest = words[0], words[1:]
    overrides = []
    skip = False
    for w in rest:
        if skip:
            skip = False
            continue
        if w in ("--out", "--resume"):
            skip = True
            continue
        if w.startswith("--") or "$" in w:
            continue
        overrides.append(w)
    load_config(recipe, overrides)
