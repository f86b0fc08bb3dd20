"""Understanding binary networks: sign dynamics, primary subnetworks, kernel statistics.

Tools to test, on any flipnet model, the three claims of Sun & Yao, "Weights having stable signs
are important: finding primary subnetworks and kernels to compress binary weight networks":

* :mod:`flipnet.analysis.scaling` -- scaling factors barely matter next to signs
  (:func:`scaling_study`);
* :mod:`flipnet.analysis.flips` -- signs settle early (:class:`SignTracker`, :func:`analyze_run`)
  and :mod:`flipnet.analysis.primary` -- the early signs form a trainable "primary binary
  subnetwork" (:func:`primary_experiment`);
* :mod:`flipnet.analysis.kernels` -- binary 3×3 kernels concentrate on few of the 512 patterns
  (:func:`kernel_codes`, :func:`kernel_stats`, :func:`coverage_curve`), which
  :mod:`flipnet.compress.qbn` turns into sub-bit compression and :mod:`flipnet.analysis.qbn_sweep`
  measures (:func:`qbn_sweep`).

The kernel codes themselves are :mod:`flipnet.compress.codes` (analysis sits above compress).
See ``docs/analysis.md``.
"""

from __future__ import annotations

from .flips import SignTracker, analyze_run, list_snapshots, read_snapshot, sign_dynamics
from .kernels import coverage_curve, kernel_codes, kernel_stats
from .primary import primary_experiment
from .qbn_sweep import qbn_sweep
from .scaling import scaling_study

__all__ = [
    "SignTracker",
    "analyze_run",
    "sign_dynamics",
    "read_snapshot",
    "list_snapshots",
    "kernel_codes",
    "kernel_stats",
    "coverage_curve",
    "primary_experiment",
    "qbn_sweep",
    "scaling_study",
]
