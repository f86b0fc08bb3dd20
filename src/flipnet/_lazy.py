"""The one lazy-import mechanism of flipnet: names of a package imported on first use (PEP 562).

A package that re-exports heavy names (anything importing torch) declares ``{name: module}`` and
gets module-level ``__getattr__``/``__dir__``; ``import flipnet`` and ``import flipnet.train``
then cost no torch import, which keeps ``flipnet --help`` fast.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_names(package: str, table: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose lazy names come from ``table``.

    ``namespace`` is the package's ``globals()``: a name, once imported, is stored there so later
    look-ups skip ``__getattr__``.
    """

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
