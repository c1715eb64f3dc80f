"""Sweep efficiency: how much of the machine the driver keeps busy with trial compute.

    efficiency = sum of the trials' own wall time (run_trial, inside the worker)
                 / (sweep wall time x concurrent slots)

Two wall times are reported: the whole command (Ray start-up, MLflow set-up,
compaction included) and the trial phase (first trial start to last trial end,
from the workers' own timestamps). Target: >= 0.8 on 2 CPUs for the trial phase.

    python benchmarks/sweep_overhead.py [--trials 20] [--epochs 4] [--train-samples 1024] [--slots 2]
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
    args = p.parse_args(argv)

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
        runs = client.search_runs([exp.experiment_id], max_results=1000)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
