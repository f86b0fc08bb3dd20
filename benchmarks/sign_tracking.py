"""Overhead of sign tracking (``train.track_signs``).

Two measurements:

1. Per step, in one process: the median (and minimum) time of one training step
   (``trainer.train_step`` on a fixed batch) against the time of the tracker's
   ``on_step_end`` for the same model, interleaved ``--steps`` times. On a shared machine this
   is the robust number: both are timed under the same load, and the minimum is the unloaded
   cost.
2. End to end: the same recipe (same seed, same data order) trained with
   ``train.track_signs=false`` and ``true``, alternating ``--repeats`` times, comparing the
   median epoch time (``time_s``; first epoch dropped). Noisy when other jobs share the CPU.
   It also checks that tracking does not change training: both runs must end with identical
   weights.

Default: binary-weight ResNet-20 (``mode=bwn``, latent weights trained with Adam) on the
scikit-learn digits at CPU scale. Example::

    python benchmarks/sign_tracking.py --epochs 4 --repeats 3 --threads 1
    python benchmarks/sign_tracking.py --recipe sun_yao_resnet20_bwn --epochs 2 train.device=cuda

"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _run(recipe: str, overrides: list[str], track: bool, out: Path, name: str) -> tuple[list[float], int, dict]:
    from flipnet.train import Trainer, load_config

    cfg = load_config(recipe, [*overrides, f"train.track_signs={'true' if track else 'false'}",
                               f"output.dir={out}", f"output.name={name}", "train.progress=false",
                               "train.plots=false", "train.tensorboard=false"])
    from flipnet.analysis.flips import SignTracker

    trainer = Trainer(cfg, callbacks=[SignTracker()] if track else [])
    trainer.fit()
    from flipnet.train import read_metrics

    rows = read_metrics(trainer.run_dir)
    times = [float(r["time_s"]) for r in rows]
    state = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items() if isinstance(v, torch.Tensor)}
    return times, trainer.steps_per_epoch, state


def _per_step(recipe: str, overrides: list[str], steps: int, out: Path) -> None:
    from flipnet.analysis.flips import SignTracker
    from flipnet.train import Trainer, load_config

    cfg = load_config(recipe, [*overrides, "train.track_signs=false", f"output.dir={out}", "output.name=per_step",
                               "train.progress=false", "train.plots=false", "train.tensorboard=false"])
    trainer = Trainer(cfg)
    tracker = SignTracker(out_dir=out / "signs")
    tracker.on_train_start(trainer)
    x, y = next(iter(trainer.train_loaders[0]))
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    t_step, t_track = [], []
    for i in range(steps + 5):
        sync()
        t0 = time.perf_counter()
        trainer.train_step(x, y)
        sync()
        t1 = time.perf_counter()
        tracker.on_step_end(trainer)
        sync()
        t2 = time.perf_counter()
        if i >= 5:  # warm-up
            t_step.append(t1 - t0)
            t_track.append(t2 - t1)
    t_snap = []
    for i in range(5):  # the per-epoch cost: read the counters, pack and write one snapshot
        t0 = time.perf_counter()
        tracker.on_epoch_end(trainer, {})
        t_snap.append(time.perf_counter() - t0)
    n_weights = sum(w.numel() for w in tracker._weights)
    print(f"per step ({len(tracker.layers)} binary layers, {n_weights} binary weights, batch {len(y)}, "
          f"{trainer.device}): train step median {1e3 * statistics.median(t_step):.3f} ms "
          f"(min {1e3 * min(t_step):.3f}); tracker median {1e3 * statistics.median(t_track):.3f} ms "
          f"(min {1e3 * min(t_track):.3f}); overhead median "
          f"{100 * statistics.median(t_track) / statistics.median(t_step):.2f}%, "
          f"min/min {100 * min(t_track) / min(t_step):.2f}%; per-epoch snapshot {1e3 * statistics.median(t_snap):.1f} ms "
          f"(= {statistics.median(t_snap) / statistics.median(t_step):.2f} train steps)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="sun_yao_digits_bwn", help="recipe name or path (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="steps of the per-step measurement (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="extra key=value recipe overrides")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = [f"train.epochs={args.epochs}", *args.overrides]
    per_epoch: dict[bool, list[float]] = {False: [], True: []}
    steps = 0
    with tempfile.TemporaryDirectory() as tmp:
        _per_step(args.recipe, overrides, args.steps, Path(tmp))
        for r in range(args.repeats):
            states = {}
            for track in (False, True) if r % 2 == 0 else (True, False):
                t0 = time.perf_counter()
                times, steps, state = _run(args.recipe, overrides, track, Path(tmp), f"r{r}_{int(track)}")
                per_epoch[track] += times[1:] if len(times) > 1 else times
                states[track] = state
                print(f"repeat {r} track_signs={track}: {time.perf_counter() - t0:.2f}s total, "
                      f"epochs {['%.3f' % t for t in times]}", flush=True)
            same = all(torch.equal(states[False][k], states[True][k]) for k in states[False])
            if not same:
                print("ERROR: tracking changed the trained weights", file=sys.stderr)
                return 1
    off = statistics.median(per_epoch[False])
    on = statistics.median(per_epoch[True])
    print(f"\nend to end: recipe {args.recipe}, {steps} steps/epoch, {args.threads} thread(s), "
          f"{len(per_epoch[False])} timed epochs each")
    print(f"median epoch time  without tracking: {off:.4f}s   with tracking: {on:.4f}s")
    print(f"per step: {1e3 * off / steps:.3f} ms vs {1e3 * on / steps:.3f} ms; "
          f"overhead {100 * (on - off) / off:+.2f}%  (identical final weights: yes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
