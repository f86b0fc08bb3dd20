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


def test_the_recipe_reference_lists_every_registered_data_set_and_model() -> None:
    """docs/recipes.md names the registries' contents in the data.name and model.name rows."""
    from flipnet.data import list_datasets
    from flipnet.models import list_models

    text = (DOCS / "recipes.md").read_text(encoding="utf-8")
    data_row = re.search(r"flipnet\.data\.list_datasets\(\)`: ([^;]+);", text)
    model_row = re.search(r"flipnet\.models\.list_models\(\)`: ([^;]+);", text)
    assert data_row and model_row
    public = lambda names: sorted(n for n in names if not n.startswith("_"))  # noqa: E731 (tests register _names)
    assert sorted(re.findall(r"`(\w+)`", data_row.group(1))) == public(list_datasets())
    assert sorted(re.findall(r"`(\w+)`", model_row.group(1))) == public(list_models())


def test_the_augment_row_says_what_true_means_for_each_data_set() -> None:
    """``augment: true`` on digits is refused (no default); the reference must not promise shifts."""
    from flipnet.data.base import augment_policy

    text = (DOCS / "recipes.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `augment`"))
    assert augment_policy("digits").default == ()
    assert "digits: none, so `true` is refused" in row
