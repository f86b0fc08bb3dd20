"""Understanding binary networks: sign dynamics, primary subnetworks, kernel statistics.

Tools to test, on any flipnet model, the three claims of Sun & Yao, "Weights having stable signs
are important: finding primary subnetworks and kernels to compress binary weight networks":

* :mod:`flipnet.analysis.scaling` -- scaling factors barely matter next to signs
  (:func:`scaling_study`);
* :mod:`flipnet.analysis.flips` -- signs settle early (:class:`SignTracker`, :func:`analyze_run`)
  and :mod:`flipnet.analysis.primary` -- the early signs form a trainable "primary binary
  subnetwork" (:func:`primary_experiment`);
* :mod:`flipnet.analysis.kernels` -- binary 3×3 kernels concentrate on few of the 512 patterns
  (:func:`kernel_codes`, :func:`kernel_histogram`, :func:`kernel_stats`), which
  :mod:`flipnet.compress.qbn` turns into sub-bit compression.

Sub-modules are imported on first use, so ``import flipnet.analysis`` stays cheap. See
``docs/analysis.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "SignTracker",
    "analyze_run",
    "sign_dynamics",
    "read_snapshot",
    "list_snapshots",
    "encode_kernels",
    "decode_kernels",
    "kernel_codes",
    "kernel_histogram",
    "kernel_stats",
    "coverage_curve",
    "primary_experiment",
    "scaling_study",
]

_LAZY: dict[str, str] = {
    "SignTracker": "flips",
    "analyze_run": "flips",
    "sign_dynamics": "flips",
    "read_snapshot": "flips",
    "list_snapshots": "flips",
    "encode_kernels": "kernels",
    "decode_kernels": "kernels",
    "kernel_codes": "kernels",
    "kernel_histogram": "kernels",
    "kernel_stats": "kernels",
    "coverage_curve": "kernels",
    "primary_experiment": "primary",
    "scaling_study": "scaling",
}


def __getattr__(name: str) -> Any:
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'flipnet.analysis' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
