"""How long analysis takes at scale, and what reading MLflow instead of Parquet would cost.

    python benchmarks/analysis_scale.py                       # 1k and 10k trials x 50 BN layers
    python benchmarks/analysis_scale.py --sizes 1000 --mlflow-runs 0

Writes planted studies (tests/test_analysis_fit.planted_study) to Parquet in a
temporary folder, in two layouts: one part file per trial (what the driver
writes; only up to --per-trial-max trials) and a compacted one (--parts files).
Times load_study, analyse (all fits, --n-boot bootstrap replicates) and the
guidelines. Then, if mlflow is importable, logs --mlflow-runs planted runs
(params, summary metrics, tags; no artifacts) into a temporary sqlite store,
times mlflow.search_runs over them and extrapolates its per-run cost to the
Parquet sizes, and times the whole report (md, tex, figures) on the compacted
layout. Prints figures; asserts nothing. Default run: ~1 min on 2 cores.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from test_analysis_fit import critical_cost, planted_study  # noqa: E402

from analysis.guidelines import analyse, guidelines  # noqa: E402
from analysis.load import load_study  # noqa: E402
from analysis.report import write_report  # noqa: E402

PLACEMENTS = ("none", "pre_bn", "pre_conv", "head")
TYPES = ("bernoulli", "gaussian", "uout")
RATES = (0.1, 0.3, 0.5, 0.7)
WIDTHS = (1.0, 2.0, 4.0, 8.0, 10.0)


def make(n_trials: int, n_layers: int, space: str) -> tuple[pa.Table, pa.Table]:
    """A planted wrn_widths-like grid (37 configurations x 5 widths) with enough seeds for n_trials."""
    per_seed = (1 + 3 * len(TYPES) * len(RATES)) * len(WIDTHS)
    seeds = tuple(range(math.ceil(n_trials / per_seed)))
    trials, layers = planted_study(widths=WIDTHS, placements=PLACEMENTS, types=TYPES, rates=RATES, seeds=seeds,
                                   n_layers=n_layers, cost=critical_cost(4.0, -0.02), reest_per_shift=0.3,
                                   space=space)
    return trials.slice(0, n_trials), layers.slice(0, n_trials * n_layers)  # layers are in trial order


def write(root: str, space: str, trials: pa.Table, layers: pa.Table, parts: int | None) -> float:
    """Write the datasets (parts=None: one file per trial, as the driver does); returns seconds."""
    t0 = time.perf_counter()
    n, per = trials.num_rows, layers.num_rows // max(trials.num_rows, 1)
    for name in ("trials", "layers"):
        os.makedirs(os.path.join(root, space, name), exist_ok=True)
    chunks = n if parts is None else parts
    bounds = np.linspace(0, n, chunks + 1).astype(int)
    for i in range(chunks):
        a, b = bounds[i], bounds[i + 1]
        if b > a:
            name = f"part-{i}.parquet"
            pq.write_table(layers.slice(a * per, (b - a) * per), os.path.join(root, space, "layers", name))
            pq.write_table(trials.slice(a, b - a), os.path.join(root, space, "trials", name))
    return time.perf_counter() - t0


def time_analysis(root: str, space: str, n_boot: int) -> dict[str, float]:
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    study = load_study(space, root=root)
    out["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    a = analyse(study, n_boot=n_boot)
    out["fits"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["guidelines_n"] = len(guidelines(a))
    out["guidelines"] = time.perf_counter() - t0
    out["rows"] = study.layers.num_rows
    return out


def time_mlflow(n_runs: int, tmp: str) -> float | None:
    """Seconds per run of mlflow.search_runs over n_runs planted runs in a sqlite store."""
    try:
        import mlflow
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
    except ImportError:
        print("mlflow not importable: MLflow comparison skipped")
        return None
    uri = f"sqlite:///{os.path.join(tmp, 'mlflow.db')}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("bench", artifact_location=os.path.join(tmp, "mlruns"))
    trials, _ = make(n_runs, 1, "bench")
    rows = trials.to_pylist()
    t0 = time.perf_counter()
    now = int(time.time() * 1000)
    metric_keys = [k for k in ("test_acc", "test_loss", "test_acc_reest", "test_loss_reest", "train_loss", "train_acc",
                               "mean_shift", "max_shift", "mean_shift_fed", "throughput", "wall_time_s")]
    skip = set(metric_keys) | {"run_id", "finished_at", "status", "error", "config_hash", "space", "profile"}
    for r in rows:
        run = client.create_run(exp, tags={"status": "ok", "config_hash": r["config_hash"], "space": "bench"})
        client.log_batch(run.info.run_id,
                         metrics=[Metric(k, float(r[k]) if r[k] is not None else float("nan"), now, 0)
                                  for k in metric_keys],
                         params=[Param(k, str(v)) for k, v in r.items() if k not in skip],
                         tags=[RunTag("profile", "bench")])
        client.set_terminated(run.info.run_id)
    log_s = time.perf_counter() - t0
    mlflow.set_tracking_uri(uri)
    t0 = time.perf_counter()
    df = mlflow.search_runs(experiment_ids=[exp], max_results=100_000)
    search_s = time.perf_counter() - t0
    print(f"mlflow: logged {n_runs} runs in {log_s:.1f} s; search_runs returned {len(df)} rows in {search_s:.2f} s "
          f"({1000 * search_s / max(len(df), 1):.2f} ms/run)")
    return search_s / max(len(df), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="trials per planted study")
    p.add_argument("--layers", type=int, default=50, help="BN layers per trial")
    p.add_argument("--parts", type=int, default=20, help="part files of the compacted layout")
    p.add_argument("--per-trial-max", type=int, default=1000, help="largest size also written one file per trial")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates of the slope CIs")
    p.add_argument("--mlflow-runs", type=int, default=300, help="runs logged to time search_runs (0: skip)")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip timing the whole report")
    args = p.parse_args()
    print(f"{'trials':>7} {'layer rows':>10} {'layout':>10} {'write s':>8} {'load s':>7} {'fits s':>7} "
          f"{'guidelines':>10} {'total s':>8} {'report s':>8}")
    results: dict[tuple[int, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            trials, layers = make(n, args.layers, f"s{n}")
            layouts = [("per-trial", None)] if n <= args.per_trial_max else []
            for layout, parts in layouts + [(f"{args.parts} parts", args.parts)]:
                space = f"s{n}-{'t' if parts is None else 'c'}"
                w = write(tmp, space, trials.set_column(2, "space", pa.array([space] * n)), layers, parts)
                r = time_analysis(tmp, space, args.n_boot)
                total = r["load"] + r["fits"] + r["guidelines"]
                results[(n, layout)] = total
                rep = math.nan
                if args.report and parts is not None:  # whole report: md, tex and 8 figure files
                    t0 = time.perf_counter()
                    write_report(space, tmp, os.path.join(tmp, "report", space), n_boot=args.n_boot)
                    rep = time.perf_counter() - t0
                print(f"{n:>7} {int(r['rows']):>10} {layout:>10} {w:>8.2f} {r['load']:>7.2f} {r['fits']:>7.2f} "
                      f"{int(r['guidelines_n']):>4} {r['guidelines']:>5.2f} {total:>8.2f} {rep:>8.2f}")
        per_run = time_mlflow(args.mlflow_runs, tmp) if args.mlflow_runs > 0 else None
    if per_run is not None:
        for (n, layout), total in results.items():
            est = per_run * n
            print(f"{n} trials ({layout}): mlflow.search_runs alone ~{est:.1f} s (summary metrics only, no layer "
                  f"tables) vs Parquet load + all fits {total:.2f} s: ratio {est / total:.1f}x")


if __name__ == "__main__":
    main()
