"""From validated arguments to a finished sweep: lock, dedup, Ray, Tune, summary."""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

from search.config import TrialConfig
from search.sweep.lock import SweepLock
from search.sweep.tracking import Tracker

__all__ = ["drive", "init_ray"]


def init_ray(address: str | None, num_cpus: int | None) -> None:
    """Join a cluster (`address`) or start a local Ray with no dashboard (nothing listens off loopback)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    import ray._private.ray_constants as ray_constants

    if address:
        if address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
            # Ray rewrites a loopback address to the LAN IP; a loopback-only cluster is then unreachable.
            ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(address=address, log_to_driver=False, runtime_env=_plugin_env())
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConnectionError(f"--address {address!r}: no Ray cluster reachable there "
                                  f"({str(e).splitlines()[0][:200]})") from None
        return
    # Ray binds its node services to the IP it detects (all interfaces on Linux); a local sweep
    # needs none of them reachable from the network, so keep the node on loopback. There is no
    # public switch for this in Ray 2.x; this is the constant `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` sets.
    ray_constants.ENABLE_RAY_CLUSTER = False
    # address="local": always a fresh local Ray, never a cluster someone else started on this machine.
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
             log_to_driver=False, configure_logging=False, runtime_env=_plugin_env())


def _plugin_env() -> dict[str, Any] | None:
    """The runtime environment that loads the `--plugin`s in every Ray worker (search/plugins.py)."""
    from search.plugins import runtime_env

    return runtime_env() or None


def resolve_auto_gpus(configs: list[dict[str, Any]]) -> float:
    """Measure one training step on a GPU of the cluster and pick the packing fraction."""
    import ray

    from search.sweep.packing import auto_gpus_per_trial

    if ray.cluster_resources().get("GPU", 0) < 1:
        raise ValueError("--gpus-per-trial auto: the Ray cluster has no GPU to measure on; give a number instead")
    return ray.get(ray.remote(num_gpus=1)(auto_gpus_per_trial).remote(configs))


def drive(args: argparse.Namespace, configs: list[dict[str, Any]], overrides: dict[str, Any],
          gpus: float | str) -> int:
    """Run the sweep the arguments describe; returns the exit code."""
    from search.sweep.tune import SweepPlan, run_sweep

    t0 = time.time()
    with SweepLock(args.storage, args.space, args.tracking_uri):
        tracker = Tracker(args.tracking_uri, args.space, args.profile, args.storage)
        stale = tracker.close_stale()
        tracker.store.remove_temporaries()
        if stale:
            print(f"closed {stale} run(s) left RUNNING by an interrupted sweep (marked KILLED); "
                  "they will run again", flush=True)
        finished = {} if args.force else tracker.finished()
        todo = [c for c in configs if TrialConfig.from_dict(c).config_hash not in finished]
        reused = len(configs) - len(todo)
        # Optuna's budget counts only its own earlier samples of this profile, not grid runs of the space.
        sampled = {} if args.force or args.algo != "optuna" else tracker.finished("optuna", args.profile)
        samples = max(0, (args.samples or _grid_size(args)) - len(sampled)) if args.algo == "optuna" else 0
        if reused and args.algo != "optuna":
            print(f"{reused} of {len(configs)} trials already finished in {args.tracking_uri}: reused "
                  "(--force to train them again)", flush=True)
        if todo if args.algo != "optuna" else samples:
            init_ray(args.address, args.num_cpus)
            if gpus == "auto":
                gpus = resolve_auto_gpus(todo or configs)
                print(f"--gpus-per-trial auto: {gpus:.3g} GPU per trial (measured peak memory of one step)")
            plan = SweepPlan(space=args.space, profile=args.profile, algo=args.algo, configs=todo,
                             samples=samples, overrides=overrides, seed=args.search_seed, scheduler=args.scheduler,
                             cpus_per_trial=args.cpus_per_trial, gpus_per_trial=gpus,
                             max_concurrent=args.max_concurrent, retries=args.retries, storage=args.storage,
                             tracking_uri=args.tracking_uri, finished=finished, verbose=0 if args.quiet else 1)
            n = samples if args.algo == "optuna" else len(todo)
            print(f"sweep {args.space!r} (profile {args.profile}, {args.algo}): {n} trial(s) to run, "
                  f"{args.cpus_per_trial:g} CPU + {gpus:g} GPU each", flush=True)
            run_sweep(plan, tracker)
        tracker.store.compact()
        hashes = {TrialConfig.from_dict(c).config_hash for c in configs}
        _summary(tracker, hashes if args.algo != "optuna" else None, args, time.time() - t0)
    return 0


def _grid_size(args: argparse.Namespace) -> int:
    from spaces import get_space

    return get_space(args.space).size(args.profile)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else str(v)


def _summary(tracker: Tracker, hashes: set[str] | None, args: argparse.Namespace, wall: float) -> None:
    """Best and worst configurations of this sweep, and where everything is."""
    import pyarrow.compute as pc

    from search.store import dedup

    t = dedup(tracker.store.read("trials"), "trials")
    if hashes is not None and t.num_rows:
        t = t.filter(pc.is_in(t.column("config_hash"), value_set=_arr(sorted(hashes))))
    rows = t.to_pylist()
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    print(f"\nsweep {args.space!r} done in {wall:.0f}s: "
          + ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) if rows else "\nno finished trials")
    ok = sorted((r for r in rows if r["status"] == "ok" and math.isfinite(r["test_acc"])),
                key=lambda r: -r["test_acc"])
    cols = ("width", "dropout_placement", "dropout_type", "dropout_rate", "seed", "test_acc", "test_acc_reest",
            "mean_shift", "max_shift")
    if ok:
        k = min(5, (len(ok) + 1) // 2)
        for title, part in (("best", ok[:k]), ("worst", ok[-k:][::-1])):
            print(f"\n{title} {k} by test accuracy:")
            print("  " + "  ".join(f"{c:>17}" for c in cols))
            for r in part:
                print("  " + "  ".join(f"{_fmt(r[c]):>17}" for c in cols))
    store = tracker.store
    print(f"\nresults:  {store.path('trials')}  and  {store.path('layers')}  (Parquet)")
    print(f"tracking: {args.tracking_uri}   view: mlflow ui --backend-store-uri {args.tracking_uri}")
    print(f"report:   python -m analysis.report --space {args.space}")


def _arr(values: list[str]) -> Any:
    import pyarrow as pa

    return pa.array(values, pa.string())
