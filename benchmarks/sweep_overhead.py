"""Sweep efficiency: how much of the machine the driver keeps busy with trial compute.

    efficiency = sum of the trials' own wall time (run_trial, inside the worker)
                 / (sweep wall time x concurrent slots)

Two wall times are reported: the whole command (Ray start-up, MLflow set-up,
compaction included) and the trial phase (first trial start to last trial end,
from the workers' own timestamps). Target: >= 0.8 on 2 CPUs for the trial phase.

    python benchmarks/sweep_overhead.py [--trials 20] [--epochs 4] [--train-samples 1024] [--slots 2]
    python benchmarks/sweep_overhead.py --tracker-only [--trials 20] [--epochs 4]

`--tracker-only` times the driver's own writes for one trial (search.sweep.tracking.Tracker:
start + finish of a 7-BN-layer result with its artifacts, into a fresh sqlite store), no Ray.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20, help="trials (smoke grid x seeds, rounded up to 10s)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-samples", type=int, default=1024)
    p.add_argument("--slots", type=int, default=2, help="concurrent trials (= CPUs, 1 CPU each)")
    p.add_argument("--tracker-only", action="store_true", help="time Tracker.start + finish per trial, no Ray")
    args = p.parse_args(argv)
    if args.tracker_only:
        return tracker_cost(args.trials, args.epochs)

    seeds = max(1, -(-args.trials // 10))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "search.run", "--space", "smoke", "--seeds", str(seeds),
               "--set", f"epochs={args.epochs}", "--set", f"train_samples={args.train_samples}",
               "--num-cpus", str(args.slots), "--cpus-per-trial", "1", "--quiet"]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,
                             env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        wall = time.perf_counter() - t0
        if out.returncode:
            print(out.stdout[-2000:], out.stderr[-2000:], file=sys.stderr)
            return 1
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        exp = client.get_experiment_by_name("smoke")
        # The trials' runs, not the sweep's parent run (run_kind = sweep).
        runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
                if r.data.tags.get("run_kind") != "sweep"]
    compute = sum(r.data.metrics["wall_time_s"] for r in runs)
    starts = [float(r.data.tags["started_at"]) for r in runs]
    ends = [float(r.data.tags["ended_at"]) for r in runs]
    phase = max(ends) - min(starts)
    n = len(runs)
    print(f"{n} trials of smoke ({args.epochs} epochs, {args.train_samples} images), {args.slots} slots")
    print("timer: trial compute = run_trial wall time in the worker (data, model, training, probes);"
          " sweep wall = whole command, and first trial start -> last trial end")
    print(f"sum of trial compute      {compute:8.1f} s  (mean {compute / n:.2f} s per trial)")
    print(f"command wall              {wall:8.1f} s  -> efficiency {compute / (wall * args.slots):.3f}")
    print(f"trial-phase wall          {phase:8.1f} s  -> efficiency {compute / (phase * args.slots):.3f}"
          f"  (target >= 0.8)")
    print(f"overhead per trial        {(phase * args.slots - compute) / n:8.2f} s  "
          "(trial-phase wall x slots - compute) / trials: Tune + MLflow + Parquet")
    return 0


def tracker_cost(trials: int, epochs: int) -> int:
    """Mean wall time of Tracker.start + Tracker.finish for one trial (the driver's per-trial writes)."""
    from search.config import TrialConfig
    from search.results import LayerShift, TrialResult
    from search.sweep.tracking import Tracker

    layers = [LayerShift(name=f"block{i}.bn", index=i, rel_depth=i / 6, channels=16 * (1 + i // 3),
                         fan_in=144 * (1 + i // 3), fed_by_dropout=i % 2 == 1, moving_var=1.0,
                         real_var=1.0 + 0.3 * (i % 2), shift=1.0 + 0.3 * (i % 2), shift_channelwise=1.1)
              for i in range(7)]
    history = [dict(epoch=e, train_loss=1.0 / e, train_acc=0.5, test_loss=1.1 / e, test_acc=0.5, lr=0.1,
                    epoch_time_s=1.0, throughput=1000.0) for e in range(1, epochs + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "smoke", "quick", f"{tmp}/results")
        if hasattr(tracker, "open_sweep"):  # a sweep's parent run, as the driver opens it
            tracker.open_sweep(algo="grid", command="benchmark", params={})
        times = []
        for seed in range(trials + 1):  # the first is warm-up (imports, first artifact folder)
            cfg = TrialConfig(seed=seed)
            res = TrialResult(test_acc=0.5, test_acc_reest=0.6, mean_shift=1.2, max_shift=1.3, throughput=1000.0,
                              wall_time_s=5.0, train_time_s=float(epochs), params=1234, epochs_completed=epochs,
                              history=history, layers=layers)
            t0 = time.perf_counter()
            run_id = tracker.start(cfg, trial_id=f"t{seed}", algo="grid")
            tracker.finish(run_id, cfg, res)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        if hasattr(tracker, "flush"):  # previews drawn in the background, off the Tune loop
            tracker.flush()
        drain = time.perf_counter() - t0
    import statistics

    t = times[1:]
    print(f"Tracker.start + finish, {len(t)} trials of 7 BN layers, {epochs} epochs each: "
          f"median {statistics.median(t) * 1000:.0f} ms, mean {statistics.mean(t) * 1000:.0f} ms per trial "
          f"that the Tune loop waits; all work incl. background previews {(sum(t) + drain) / len(t) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
