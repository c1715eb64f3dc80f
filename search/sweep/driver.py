"""From validated arguments to a finished sweep: lock, dedup, Ray, Tune, summary."""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

from search.config import TrialConfig
from search.sweep.errors import Interrupted, Refused
from search.sweep.lock import SweepLock
from search.sweep.signals import DriverSignals, stop_ray
from search.sweep.tracking import Tracker

__all__ = ["drive", "init_ray", "reusable_runs"]


def init_ray(address: str | None, num_cpus: int | None) -> None:
    """Join a cluster (`address`) or start a local Ray with no dashboard (nothing listens off loopback)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    _phase("starting Ray")
    try:
        _init_ray(address, num_cpus)
    finally:
        if DriverSignals.active is not None:
            DriverSignals.active.install()  # ray.init sets handlers of its own (SIGTERM: Ray's, a core dump)


def _phase(what: str) -> None:
    """Name what the driver does now, for the line a signal ends it with (search/sweep/signals.py)."""
    if DriverSignals.active is not None:
        DriverSignals.active.phase = what


def _init_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    import ray._private.ray_constants as ray_constants

    from search.sweep.ray_token import make_private

    runtime_env = _runtime_env()
    if address:
        if address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
            # Ray rewrites a loopback address to the LAN IP; a loopback-only cluster is then unreachable.
            ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConnectionError(f"--address {address!r}: no Ray cluster reachable there "
                                  f"({str(e).splitlines()[0][:200]})") from None
        make_private()  # Ray writes its token file readable by all (0644)
        return
    # Ray binds its node services to the IP it detects (all interfaces on Linux); a local sweep
    # needs none of them reachable from the network, so keep the node on loopback. There is no
    # public switch for this in Ray 2.x; this is the constant `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` sets.
    ray_constants.ENABLE_RAY_CLUSTER = False
    # address="local": always a fresh local Ray, never a cluster someone else started on this machine.
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
             log_to_driver=False, configure_logging=False, runtime_env=runtime_env)
    make_private()  # a new local Ray with token auth writes ~/.ray/auth_token readable by all (0644)


def _runtime_env() -> dict[str, Any] | None:
    """The runtime environment of every Ray worker: the `--plugin`s it loads (search/plugins.py) and this
    driver's code version (DBN_CODE_VERSION, search/code_version.py), which a node's copy of the code,
    shipped without .git, cannot compute itself."""
    from search.code_version import ENV_VAR, code_version
    from search.plugins import runtime_env

    env = dict(runtime_env())
    # A job submitted with DBN_CODE_VERSION in its runtime env already gives it to this driver and every
    # worker; Ray refuses a ray.init runtime env that sets one of the job's variables again.
    if ENV_VAR not in _job_env_vars():
        env["env_vars"] = {**env.get("env_vars", {}), ENV_VAR: code_version().to_json()}
    return env or None


def _job_env_vars() -> dict[str, Any]:
    """The env_vars of the runtime env this driver's Ray job was submitted with (`ray job submit`), else {}."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job manager for a submitted job's driver
    try:
        env_vars = ((json.loads(raw) if raw else {}).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return {}
    return env_vars if isinstance(env_vars, dict) else {}


def resolve_auto_gpus(configs: list[dict[str, Any]]) -> float:
    """Measure one training step on a GPU of the cluster and pick the packing fraction."""
    import ray

    from search.sweep.packing import auto_gpus_per_trial

    if ray.cluster_resources().get("GPU", 0) < 1:
        raise ValueError("--gpus-per-trial auto: the Ray cluster has no GPU to measure on; give a number instead")
    return ray.get(ray.remote(num_gpus=1)(auto_gpus_per_trial).remote(configs))


def drive(args: argparse.Namespace, configs: list[dict[str, Any]], overrides: dict[str, Any],
          gpus: float | str) -> int:
    """Run the sweep the arguments describe; returns the exit code (0, or 1 if every trial it trained failed).

    Raises:
        Refused: found before anything ran (the lock is held, the cluster can never fit a trial).
        Interrupted: SIGINT/SIGTERM during the sweep.
        Exception: any other failure during the sweep (search.run logs it, exit 3).
    """
    from search.sweep.progress import quiet_libraries

    quiet_libraries()  # routine library notices off stderr; warnings and errors stay
    try:
        return _drive(args, configs, overrides, gpus)
    except (KeyboardInterrupt, Interrupted, BrokenPipeError):
        # Stopped by a signal (or stdout's reader gone: SIGPIPE), wherever it was: the Ray this driver started
        # goes with it (its processes were orphaned when the driver ended on a signal outside Tune's loop)
        _phase("stopping Ray")
        if DriverSignals.active is not None:
            DriverSignals.active.raised = True  # a further signal must not cut Ray's stop short (orphans)
        stop_ray()
        raise


def _drive(args: argparse.Namespace, configs: list[dict[str, Any]], overrides: dict[str, Any],
           gpus: float | str) -> int:
    _phase("taking the space's lock")
    if args.address:
        # Joining a cluster is the one check that needs Ray: done before anything is written.
        init_ray(args.address, args.num_cpus)
        _check_cluster(args, configs, gpus)
    lock = SweepLock(args.storage, args.space, args.tracking_uri)
    try:
        lock.__enter__()
    except OSError as e:
        raise Refused(str(e)) from None
    try:
        rc = _drive_locked(args, configs, overrides, gpus)
        if getattr(args, "until_ci", None):
            rc = _until_ci(args, configs, overrides, gpus, rc)
        return rc
    finally:
        lock.__exit__()


def _until_ci(args: argparse.Namespace, configs: list[dict[str, Any]], overrides: dict[str, Any],
              gpus: float | str, rc: int) -> int:
    """`--until-ci W`: one more seed for every cell whose interval is wider than W pp, sweep again, repeat."""
    from analysis.adaptive import wide_cells  # the statistic is analysis's; the driver is the application
    from search.store import ResultStore
    from search.sweep.adaptive import more_seeds

    what = {"cost": "accuracy cost vs no dropout", "reest": "BN re-estimation gain"}[args.until_ci_of]
    rounds = 0
    while rc == 0:
        trials = ResultStore(args.storage, args.space).read_deduped()[0]
        if args.reuse == "same-code" and trials.num_rows:  # other code's trials are not this study's replicates
            import pyarrow.compute as pc

            from search.code_version import code_version

            trials = trials.filter(pc.equal(trials.column("code_version"), code_version().label))
        extra, wide = more_seeds(configs, trials, args.until_ci, quantity=args.until_ci_of,
                                 max_seeds=args.max_seeds, cells=wide_cells)
        if not extra:
            print(f"--until-ci {args.until_ci:g}: every {what} interval is at most {args.until_ci:g} pp wide, or its "
                  f"cell has --max-seeds {args.max_seeds} seeds; {rounds} round(s) added seeds", flush=True)
            break
        rounds += 1
        widths = ", ".join("no interval" if not math.isfinite(c.width_pp) else f"{c.width_pp:.1f} pp" for c in wide[:6])
        print(f"--until-ci {args.until_ci:g}: {len(wide)} {what} cell(s) still wide ({widths}"
              f"{', ...' if len(wide) > 6 else ''}): {len(extra)} trial(s) with one more seed", flush=True)
        configs = configs + extra
        rc = _drive_locked(args, configs, overrides, gpus)
    return rc


def _check_cluster(args: argparse.Namespace, configs: list[dict[str, Any]], gpus: float | str) -> None:
    import ray

    from search.sweep.preflight import check_resources

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    largest = {"CPU": max((n.get("CPU", 0.0) for n in nodes), default=0.0),
               "GPU": max((n.get("GPU", 0.0) for n in nodes), default=0.0)}
    try:
        check_resources(cpus_per_trial=args.cpus_per_trial, gpus_per_trial=gpus, num_cpus=None,
                        address=args.address, configs=configs, cluster=largest)
    except ValueError as e:
        wait = getattr(args, "resource_wait", 0.0) or 0.0
        if wait <= 0:
            raise Refused(f"{e}; on an autoscaling cluster whose node types can fit it, pass --resource-wait "
                          "SECONDS to wait for the autoscaler") from None
        print(f"no node of the cluster fits a trial now ({str(e).split(': ', 1)[-1]}); waiting up to "
              f"--resource-wait {wait:g} s for the autoscaler to add one", flush=True)


def reusable_runs(tracker: Tracker, reuse: str, version: str, algo: str | None = None,
                  profile: str | None = None) -> tuple[dict[str, str], dict[str, float], dict[str, str]]:
    """Finished runs a sweep may reuse under `reuse` (same-code | any | none).

    Returns:
        (config_hash -> run_id reusable, config_hash -> its test_acc, config_hash -> code version of the
        finished runs that were *not* reusable because other code produced them).
    """
    from search.sweep.finished import finished_runs
    from search.sweep.tracking import DONE_STATUSES

    if reuse == "none":
        return {}, {}, {}
    done, scores, other = {}, {}, {}
    for r in finished_runs(tracker.client, tracker.tracking_uri, tracker.experiment_id):
        tags = r.tags
        h = tags.get("config_hash")
        if not h or tags.get("status") not in DONE_STATUSES:
            continue
        if (algo is not None and tags.get("algo") != algo) or (profile is not None and tags.get("profile") != profile):
            continue
        code = tags.get("code_version", "")
        if reuse == "same-code" and code != version:
            other.setdefault(h, code or "unrecorded")
            continue
        done[h] = r.run_id
        scores[h] = r.test_acc
    return done, scores, {h: v for h, v in other.items() if h not in done}


def _drive_locked(args: argparse.Namespace, configs: list[dict[str, Any]], overrides: dict[str, Any],
                  gpus: float | str) -> int:
    from search.code_version import code_version

    t0 = time.time()
    version = code_version().label
    if getattr(args, "ablation_plan", None) is not None:  # only now: a refused sweep writes nothing
        from search.sweep.ablate import write_plan

        write_plan(args.storage, args.space, args.profile, args.ablation_plan)
    _phase("opening the tracking store")
    tracker = Tracker(args.tracking_uri, args.space, args.profile, args.storage)
    try:
        return _drive_tracked(args, configs, overrides, gpus, tracker, t0, version)
    except BaseException as e:
        # Whatever ended the sweep (a signal during Ray's start, the compaction or the end-of-sweep report: KILLED;
        # an error: FAILED), its parent run is closed, never left RUNNING; the trials' runs were closed where
        # they ran
        if tracker.parent_id and not tracker.parent_closed:
            signalled = isinstance(e, (KeyboardInterrupt, Interrupted, BrokenPipeError))
            try:
                tracker.flush()
                tracker.close_sweep("killed" if signalled else "failed", {})
            except Exception:  # noqa: BLE001 - the store itself may be what failed; the next sweep closes it
                pass
        raise


def _drive_tracked(args: argparse.Namespace, configs: list[dict[str, Any]], overrides: dict[str, Any],
                   gpus: float | str, tracker: Tracker, t0: float, version: str) -> int:
    from search.sweep.tune import SweepPlan, run_sweep

    stale = tracker.close_stale()
    tracker.store.remove_temporaries()
    damaged = tracker.store.set_aside_damaged()
    if damaged:
        from search.sweep.tracking import rebuild_parquet

        n_rows, _ = rebuild_parquet(args.space, args.tracking_uri, args.storage)
        where = os.path.dirname(damaged[0][1])
        print(f"{len(damaged)} damaged part file(s) (not readable Parquet, e.g. {damaged[0][0]}) set aside in "
              f"{where}; {args.space}'s datasets rebuilt from MLflow ({n_rows} trial rows)", flush=True)
    if stale:
        print(f"closed {stale} run(s) left RUNNING by an interrupted sweep (marked KILLED); "
              "they will run again", flush=True)
    finished, scores, other_code = reusable_runs(tracker, args.reuse, version)
    hashes = [TrialConfig.from_dict(c).config_hash for c in configs]
    todo = [c for c, h in zip(configs, hashes) if h not in finished]
    reused = len(configs) - len(todo)
    stale_code = sorted({other_code[h] for h in hashes if h in other_code}) if args.algo != "optuna" else []
    if stale_code:
        n = sum(h in other_code for h in hashes)
        print(f"{n} of {len(configs)} trials finished under other code ({', '.join(stale_code)}); this code is "
              f"{version}: trained again (--reuse any to reuse them)", flush=True)
    samples = 0
    if args.algo == "optuna":
        # Optuna's budget, in trials, counts only its own earlier trials of this profile that are reusable.
        sampled, _, _ = reusable_runs(tracker, args.reuse, version, "optuna", args.profile)
        samples = max(0, (args.samples or _grid_size(args)) * args.seeds - len(sampled))
    elif reused:
        print(f"{reused} of {len(configs)} trials already finished in {args.tracking_uri}: reused "
              f"(code {version if args.reuse == 'same-code' else 'any'}; --reuse none to train them again)",
              flush=True)
    outcome = None
    if todo if args.algo != "optuna" else samples:
        init_ray(args.address, args.num_cpus)
        if gpus == "auto":
            gpus = resolve_auto_gpus(todo or configs)
            print(f"--gpus-per-trial auto: {gpus:.3g} GPU per trial (measured peak memory of one step)")
        # Same-code reuse keeps one Optuna study per code version: TPE is not steered by old numbers.
        study = f"{args.space}-{args.profile}" + (f"-{version}" if args.reuse == "same-code" else "")
        plan = SweepPlan(space=args.space, profile=args.profile, algo=args.algo, configs=todo,
                         samples=samples, seeds=args.seeds, overrides=overrides, seed=args.search_seed or 0,
                         scheduler=args.scheduler, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=gpus,
                         max_concurrent=args.max_concurrent, retries=args.retries, storage=args.storage,
                         tracking_uri=args.tracking_uri, finished=finished, scores=scores, study_name=study,
                         verbose=0 if args.quiet else 1, resource_wait_s=getattr(args, "resource_wait", 0.0) or 0.0)
        n = samples if args.algo == "optuna" else len(todo)
        print(f"sweep {args.space!r} (profile {args.profile}, {args.algo}, code {version}): {n} trial(s) to run, "
              f"{args.cpus_per_trial:g} CPU + {gpus:g} GPU each", flush=True)
        # One MLflow parent run per sweep; every trial run below is its child (--resume: the same parent).
        tracker.open_sweep(algo=args.algo, command=_command_line(), params=_sweep_params(args, n, gpus),
                           resume=args.resume)
        try:
            outcome = run_sweep(plan, tracker)
        except BaseException as e:
            tracker.flush()
            tracker.close_sweep("failed" if isinstance(e, Refused) else "killed", {})
            raise
        _phase("recording the last results")
        for line in tracker.flush():  # the per-trial previews drawn in the background
            print(f"warning: MLflow preview not logged: {line}", flush=True)
        if outcome.exhausted:
            print(f"optuna proposed only configurations already trained, many times in a row: the space is "
                  f"exhausted after {sum(outcome.statuses.values())} new trial(s)", flush=True)
    else:
        _close_parent_left_running(tracker, args)
    _phase("compaction")
    tracker.store.compact()
    _phase("the end-of-sweep report")
    summary = _captured(_summary, tracker, set(hashes) if args.algo != "optuna" else None, args, time.time() - t0)
    if tracker.parent_id:
        _close_parent(tracker, args, outcome, summary)
    if outcome is not None and outcome.statuses and set(outcome.statuses) == {"failed"}:
        import sys

        print(f"error: every trial of this sweep failed ({outcome.statuses['failed']} failed; first: "
              f"{outcome.first_error[:300]}); their runs are FAILED in {args.tracking_uri}", file=sys.stderr)
        return 1
    return 0


def _close_parent_left_running(tracker: Tracker, args: argparse.Namespace) -> None:
    """Nothing left to train, and this profile's and algo's latest sweep parent run is still RUNNING (its driver
    was killed, e.g. while compacting): --resume reopens it, and it ends FINISHED with this sweep's summary
    (`_close_parent`); without --resume it is closed KILLED, as `open_sweep` closes it for a new sweep."""
    from search.sweep.tracking import KIND_TAG, _search_all

    flt = f"tags.{KIND_TAG} = 'sweep' and tags.profile = '{args.profile}' and tags.algo = '{args.algo}'"
    mine = sorted(_search_all(tracker.client, tracker.experiment_id, None, flt), key=lambda r: -r.info.start_time)
    running = [r for r in mine if r.info.status == "RUNNING"]
    if not running:
        return
    if args.resume and mine[0].info.status == "RUNNING":
        tracker.open_sweep(algo=args.algo, command=_command_line(), resume=True)  # older RUNNING ones: KILLED
        print(f"the sweep's parent run {tracker.parent_id} was left RUNNING by an interrupted sweep: nothing is left "
              "to train, so it is closed FINISHED with this summary", flush=True)
        return
    for r in running:
        tracker.client.set_tag(r.info.run_id, "status", "killed")
        tracker.client.set_terminated(r.info.run_id, status="KILLED")
    print(f"closed {len(running)} sweep parent run(s) left RUNNING by an interrupted sweep (marked KILLED; "
          "--resume closes the latest FINISHED with its summary)", flush=True)


def _grid_size(args: argparse.Namespace) -> int:
    from spaces import get_space

    return get_space(args.space).size(args.profile)


def _fmt(v: Any, col: str = "") -> str:
    """A summary cell, compact: width 4 and rate 0.5 as typed, accuracies to 4 decimals, shifts to 3."""
    if not isinstance(v, float) or not math.isfinite(v):
        return str(v)
    if col in ("width", "dropout_rate", "seed") or v.is_integer():
        return f"{v:g}"
    return f"{v:.4f}" if "acc" in col else f"{v:.3f}"


# The summary's columns and their short headers: the tables fit 100 columns (tests/test_user_views.py).
SUMMARY_COLUMNS = {"width": "width", "dropout_placement": "placement", "dropout_type": "type",
                   "dropout_rate": "rate", "seed": "seed", "test_acc": "test_acc", "test_acc_reest": "acc_reest",
                   "mean_shift": "mean_shift", "max_shift": "max_shift"}


def _schedule_cell(r: dict[str, Any]) -> str:
    """A drop-rate schedule, compact: '-' (the rate for the whole run), 'early2', 'early2-lin', 'late2.5'."""
    if not r.get("dropout_schedule"):
        return "-"
    return f"{r['dropout_schedule']}{r['dropout_cutoff']:g}" + ("-lin" if r.get("dropout_decay") == "linear" else "")


def _table(rows: list[dict[str, Any]], schedules: bool = False) -> list[str]:
    """Rows of SUMMARY_COLUMNS as aligned lines, each column as wide as its widest cell; with `schedules`
    (some trial of the sweep had one) a schedule column after the rate, so early dropout never reads as
    dropout for the whole run."""
    cells = [[_fmt(r.get(c), c) for c in SUMMARY_COLUMNS] for r in rows]
    heads = list(SUMMARY_COLUMNS.values())
    if schedules:
        at = heads.index("rate") + 1
        heads.insert(at, "schedule")
        for row, r in zip(cells, rows):
            row.insert(at, _schedule_cell(r))
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(heads)]
    left = {1, 2} | ({heads.index("schedule")} if schedules else set())  # names left-aligned, numbers right
    line = lambda vals: "  " + "  ".join(v.ljust(w) if i in left else v.rjust(w)  # noqa: E731
                                          for i, (v, w) in enumerate(zip(vals, widths)))
    return [line(heads).rstrip()] + [line(row).rstrip() for row in cells]


def _summary(tracker: Tracker, hashes: set[str] | None, args: argparse.Namespace, wall: float) -> None:
    """Best and worst configurations of this sweep, and where everything is."""
    import pyarrow.compute as pc

    t = tracker.store.read_deduped()[0]
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
    if ok:
        k = min(5, (len(ok) + 1) // 2)
        for title, part in (("best", ok[:k]), ("worst", ok[-k:][::-1])):
            print(f"\n{title} {k} by test accuracy:")
            print("\n".join(_table(part, schedules=any(r.get("dropout_schedule") for r in ok))))
    store = tracker.store
    print(f"\nresults:  {store.path('trials')}  and  {store.path('layers')}  (Parquet)")
    # A tracking server is its own UI; a sqlite store is viewed with `mlflow ui`.
    view = (args.tracking_uri if args.tracking_uri.startswith(("http://", "https://"))
            else f"mlflow ui --backend-store-uri {args.tracking_uri}")
    print(f"tracking: {args.tracking_uri}   view: {view}")
    print(f"report:   {_report_command(args)}")
    if args.algo == "optuna":
        from search.sweep.tune import optuna_db_path

        db = optuna_db_path(args.storage, args.space)
        print(f"optuna:   {db}   view: optuna-dashboard sqlite:///{db}")


def _report_command(args: argparse.Namespace) -> str:
    """The report command for this sweep's results, runnable as printed from any folder (absolute paths)."""
    import shlex

    storage = args.storage if "://" in args.storage else os.path.abspath(args.storage)
    cmd = ["python", "-m", "analysis.report", "--space", args.space, "--storage", storage]
    uri = args.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative to this folder
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if args.tracking_uri != "sqlite:///mlflow.db":  # the default: the report needs no MLflow when Parquet is there
        cmd += ["--tracking-uri", uri]
    return " ".join(shlex.quote(c) for c in cmd)


def _command_line() -> str:
    """The command as typed (for the parent run), e.g. `python -m search.run --space smoke --quiet`."""
    import shlex
    import sys

    return " ".join(["python -m search.run"] + [shlex.quote(a) for a in sys.argv[1:]])


def _sweep_params(args: argparse.Namespace, trials: int, gpus: float) -> dict[str, Any]:
    """The parent run's params: what defines the sweep (not a trial's config: those are the children's)."""
    keys = ("space", "profile", "algo", "samples", "seeds", "search_seed", "scheduler", "cpus_per_trial",
            "max_concurrent", "retries", "storage")
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    return {**out, "gpus_per_trial": gpus, "trials_to_run": trials, "set": " ".join(args.set) or "-"}


def _captured(fn: Any, *a: Any) -> str:
    """Run `fn`, printing what it prints, and return that text too."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*a)
    print(buf.getvalue(), end="", flush=True)
    return buf.getvalue()


def _close_parent(tracker: Tracker, args: argparse.Namespace, outcome: Any, summary: str) -> None:
    """End the sweep's parent run with summary.txt, the report (report.md, report.tex, figures) and counts."""
    import tempfile

    statuses = dict(outcome.statuses) if outcome is not None else {}
    metrics = {f"trials_{s}": float(n) for s, n in statuses.items()}
    ok = tracker.store.read_deduped()[0] if statuses.get("ok") else None
    if ok is not None and ok.num_rows:
        import pyarrow.compute as pc

        acc = pc.max(pc.filter(ok.column("test_acc"), pc.equal(ok.column("status"), "ok"))).as_py()
        if acc is not None:
            metrics["best_test_acc"] = float(acc)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "summary.txt")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(summary.lstrip("\n"))
        report = None
        # DBN_SWEEP_REPORT: full (default) | tables (no figures: ~1 s instead of ~8 s of CPU) | off
        how = os.environ.get("DBN_SWEEP_REPORT", "full")
        if how in ("full", "tables") and ("://" not in args.storage or args.storage.startswith("file://")):
            try:  # the study's report as it stands after this sweep (all of the space's trials)
                from analysis.report import write_report

                import warnings

                with warnings.catch_warnings():  # matplotlib's notices belong to no one reading the terminal
                    warnings.simplefilter("ignore")
                    report = write_report(args.space, args.storage.replace("file://", ""),
                                          os.path.join(d, "report"), figures=how == "full")
            except Exception as e:  # noqa: BLE001 - the sweep's results stand without a report
                print(f"note: no report attached to the sweep's MLflow run ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''})", flush=True)
        tracker.close_sweep("done", metrics, files=[path], folder=report)


def _arr(values: list[str]) -> Any:
    import pyarrow as pa

    return pa.array(values, pa.string())
