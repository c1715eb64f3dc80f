"""`python -m search.run --space NAME`: the main command.

Everything the user typed is validated before anything is written or any
trial starts; a mistake is one line on stderr and exit code 2. Heavy imports
(torch, ray, mlflow) happen only after that, so `--list`, `--help` and
`--dry-run` answer at once.

Exit codes (docs/errors.md): 0 done; 1 the sweep ran but every trial it trained failed;
2 bad input, refused before anything ran; 3 a failure during the sweep (one line, and the
full traceback in the log file it names); 128 + n ended by signal n (130 SIGINT, 143 SIGTERM, 129 SIGHUP,
131 SIGQUIT, 138 / 140 SIGUSR1 / SIGUSR2, 141 SIGPIPE), at any phase
(rerun with --resume).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
from typing import Any

from search.config import ConfigError, TrialConfig, parse_override
from search.sweep.signals import exit_code

__all__ = ["main", "build_configs", "resolve_seeds"]

ALGOS = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
REUSE = ("same-code", "any", "none")
EXIT_OK, EXIT_ALL_FAILED, EXIT_USAGE, EXIT_SWEEP_FAILED = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + the signal number, as a shell reports it (every signal: exit_code)
# Every number a user can type is finite and bounded (issue 30): NaN passes every comparison (a sweep asked for
# nan CPUs per trial waited forever holding the lock), and counts no machine can hold used to be accepted.
# Integer flags: (lowest, highest) allowed.
BOUNDS = {"seeds": (1, 1000), "samples": (1, 1_000_000), "retries": (0, 100), "max_concurrent": (0, 100_000),
          "num_cpus": (1, 4096), "search_seed": (0, 2**32 - 1)}
MAX_CPUS_PER_TRIAL, MAX_GPUS_PER_TRIAL = 4096, 64
MAX_RESOURCE_WAIT_S = 7 * 24 * 3600
MAX_TRIALS = 1_000_000  # --samples x --seeds: the trial table is built in memory before anything runs


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.run", description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="list the spaces with axis sizes and trial counts")
    p.add_argument("--space", help="search space name (see --list), or FILE.py:NAME (loads FILE.py as a plugin)")
    p.add_argument("--plugin", action="append", default=[], metavar="PATH_OR_MODULE",
                   help="a .py file or importable module registering spaces, dropout kinds, placements or "
                        "backbones (repeatable; docs/extending.md)")
    p.add_argument("--ablate", nargs="*", default=None, metavar="FIELD=V1,V2",
                   help="one-factor-at-a-time ablation: the baseline plus each factor changed alone; levels "
                        "default to the space's `ablate` and its profile's grid (search/sweep/ablate.py)")
    p.add_argument("--baseline", action="append", default=[], metavar="KEY=VALUE",
                   help="--ablate: a baseline value over the space's declared baseline")
    p.add_argument("--profile", default="quick",
                   help="quick (2-core CPU, digits) | fashion (2-core CPU, Fashion-MNIST; wrn_widths) | "
                        "paper (CIFAR, GPUs); --list shows each space's")
    p.add_argument("--algo", default="grid", help="grid | random | optuna")
    p.add_argument("--samples", type=int, default=None,
                   help="random: configurations drawn; optuna: configurations proposed and trained, each with "
                        "--seeds seeds (default: grid size); not for grid")
    p.add_argument("--scheduler", default="fifo", help="fifo | asha (early-stops weak trials)")
    p.add_argument("--seeds", type=int, default=None,
                   help="repeat every configuration with seeds 0..N-1 (optuna: the objective is their mean; "
                        "default: the profile's seeds, see --list)")
    p.add_argument("--search-seed", type=int, default=None, help="seed of the random/optuna sampler (default 0)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", default="0", help="fraction of a GPU per trial (0.25 packs 4 per GPU)")
    p.add_argument("--max-concurrent", type=int, default=0, help="cap on trials at once (0: as resources allow)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument("--address", default=None, help="a running Ray cluster ('auto' or host:port)")
    p.add_argument("--storage", default="results", help="local path or URI for Ray results and Parquet")
    p.add_argument("--data-dir", default=None, help="where on-disk datasets (CIFAR, imagefolder) live")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrialConfig field")
    p.add_argument("--retries", type=int, default=1, help="retries of a trial that raises")
    p.add_argument("--resource-wait", type=float, default=0.0, metavar="SECONDS",
                   help="with --address: wait up to this long for an autoscaling cluster to add a node that fits "
                        "a trial, then stop (default 0: refuse at once if no node fits)")
    p.add_argument("--until-ci", type=float, default=None, metavar="PP",
                   help="after the sweep, add seeds (paired, resumable) to the cells whose 95%% interval is wider "
                        "than PP percentage points (or has none yet), until none is or --max-seeds is reached")
    p.add_argument("--until-ci-of", default="cost", help="the interval --until-ci narrows: cost (accuracy cost vs "
                   "no dropout, per width) | reest (BN re-estimation gain, per configuration)")
    p.add_argument("--max-seeds", type=int, default=10, help="--until-ci's budget: seeds per configuration at most")
    p.add_argument("--dry-run", action="store_true", help="print the trial table and count; run nothing")
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep (closes its stale runs)")
    p.add_argument("--reuse", default=None,
                   help="which finished trials count as done: same-code (default: only those produced by this "
                        "code version), any (whatever code produced them), none (train everything again)")
    p.add_argument("--force", action="store_true", help="same as --reuse none")
    p.add_argument("--quiet", action="store_true", help="no Ray progress table")
    p.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return p


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"--{name} {value!r} is not allowed (allowed: {', '.join(allowed)})")


def build_configs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The validated trial dicts (grid/random) and the overrides; raises ConfigError/UsageError."""
    from spaces import get_space

    space = get_space(args.space)
    if args.profile not in space.profiles:
        raise UsageError(f"--profile {args.profile!r} is not a profile of space {args.space!r} "
                         f"(allowed: {', '.join(space.profiles)})")
    overrides = dict(parse_override(s) for s in args.set)
    resolve_seeds(args)
    if args.data_dir:
        # A URI stays as typed: each node stages it to local disk (search/staging.py).
        overrides["data_dir"] = args.data_dir if "://" in args.data_dir else os.path.abspath(args.data_dir)
    if args.seeds > 1 and "seed" in overrides:
        raise UsageError(f"--seeds {args.seeds} trains seeds 0..{args.seeds - 1}, so --set seed={overrides['seed']} "
                         "would be ignored; drop one of them")
    search_seed = args.search_seed or 0
    if args.algo == "optuna":
        base = [space.sample(random.Random(search_seed), args.profile)]  # validates overrides once
    elif args.algo == "random":
        rng = random.Random(search_seed)
        base = [space.sample(rng, args.profile) for _ in range(args.samples or space.size(args.profile))]
    else:
        base = space.grid(args.profile)
    configs, seen = [], set()
    for d in base:
        for s in range(args.seeds):
            cfg = TrialConfig.from_dict({**d, **overrides, **({"seed": s} if args.seeds > 1 else {})})
            if cfg.config_hash not in seen:
                seen.add(cfg.config_hash)
                configs.append(cfg.to_dict())
    return configs, overrides


def reachable_configs(args: argparse.Namespace, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """Every grid point of the space with the overrides: each backbone, width, placement, kind and
    dataset any algorithm can reach (categorical axes), for preflight to build and check."""
    from spaces import get_space

    return [TrialConfig.from_dict({**d, **overrides}).to_dict() for d in get_space(args.space).grid(args.profile)]


def resolve_seeds(args: argparse.Namespace) -> int:
    """Set `args.seeds` when --seeds was not given: the profile's seeds (spaces.Profile.seeds), or 1 when
    `--set seed=N` pins the seed or the space/profile is unknown (build_configs then names the mistake)."""
    if args.seeds is None:
        from spaces import get_space

        pinned = any(s.split("=", 1)[0].strip() == "seed" for s in args.set)
        try:
            space = get_space(args.space)
        except ValueError:
            space = None
        ok = space is not None and args.profile in space.profiles and not pinned
        args.seeds = space.seeds(args.profile) if ok else 1
    return args.seeds


def _list_spaces() -> None:
    from spaces import get_space, list_spaces

    for name in list_spaces():
        s = get_space(name)
        print(f"{name}: {s.description}")
        for prof in s.profiles:
            sizes = " x ".join(f"{k}={v}" for k, v in s.axis_sizes(prof).items())
            n, k = s.size(prof), s.seeds(prof)
            count = f"{n:>5} trials" if k == 1 else f"{n:>5} configurations x {k} seeds = {n * k} trials"
            print(f"  {prof:<6} {count}   axes: {sizes}")


def _print_table(configs: list[dict[str, Any]]) -> None:
    cols = ["backbone", "depth", "width", "dropout_placement", "dropout_type", "dropout_rate", "dataset", "epochs",
            "seed"]
    # Any other field the trials differ in (a schedule, a normalization, a recipe field) gets a column too, after
    # the dropout ones: two rows never read the same while they are different trials.
    extra = [k for k in dict.fromkeys(k for c in configs for k in c)
             if k not in cols and len({repr(c.get(k)) for c in configs}) > 1]
    cols[6:6] = extra
    rows = [["hash"] + cols] + [[TrialConfig.from_dict(c).config_hash] + [str(c.get(k)) for k in cols] for c in configs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]  # each column as wide as its widest cell
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def _gpus(value: str) -> float | str:
    if value == "auto":
        return "auto"
    try:
        g = float(value)
    except ValueError:
        raise UsageError(f"--gpus-per-trial {value!r} must be 'auto' or a number >= 0 (e.g. 0.25)") from None
    if not (math.isfinite(g) and 0 <= g <= MAX_GPUS_PER_TRIAL):
        raise UsageError(f"--gpus-per-trial {value!r} is not allowed (allowed: 'auto' or a number >= 0 and "
                         f"<= {MAX_GPUS_PER_TRIAL})")
    return g


def _validate(args: argparse.Namespace) -> None:
    _choice("algo", args.algo, ALGOS)
    _choice("scheduler", args.scheduler, SCHEDULERS)
    for name, (lo, hi) in BOUNDS.items():
        v = getattr(args, name)
        if v is not None and not lo <= v <= hi:
            raise UsageError(f"--{name.replace('_', '-')} {v} is not allowed (allowed: >= {lo} and <= {hi})")
    if args.samples is not None and args.seeds is not None and args.samples * args.seeds > MAX_TRIALS:
        raise UsageError(f"--samples {args.samples} x --seeds {args.seeds} = {args.samples * args.seeds} trials is not "
                         f"allowed (allowed: at most {MAX_TRIALS} trials in one sweep)")
    if not (math.isfinite(args.cpus_per_trial) and 0 < args.cpus_per_trial <= MAX_CPUS_PER_TRIAL):
        raise UsageError(f"--cpus-per-trial {args.cpus_per_trial:g} is not allowed (allowed: > 0 and "
                         f"<= {MAX_CPUS_PER_TRIAL})")
    _gpus(args.gpus_per_trial)
    if args.data_dir and "://" not in args.data_dir and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir!r} is not a directory")
    if args.resume and args.force:
        raise UsageError("--resume and --force exclude each other: --resume keeps finished trials, --force retrains them")
    if args.reuse is not None:
        _choice("reuse", args.reuse, REUSE)
        if args.force and args.reuse != "none":
            raise UsageError(f"--force means --reuse none, which contradicts --reuse {args.reuse}; drop one of them")
        if args.resume and args.reuse == "none":
            raise UsageError("--resume and --reuse none exclude each other: --resume keeps finished trials")
    args.reuse = "none" if args.force else (args.reuse or "same-code")
    if not (math.isfinite(args.resource_wait) and 0 <= args.resource_wait <= MAX_RESOURCE_WAIT_S):
        raise UsageError(f"--resource-wait {args.resource_wait:g} is not allowed (allowed: seconds >= 0 and "
                         f"<= {MAX_RESOURCE_WAIT_S})")
    if args.resource_wait > 0 and not args.address:
        raise UsageError(f"--resource-wait {args.resource_wait:g} is for a cluster (--address): a local Ray's "
                         "resources are known and checked before anything runs")
    if args.until_ci is not None:
        if not (math.isfinite(args.until_ci) and 0 < args.until_ci <= 100):
            raise UsageError(f"--until-ci {args.until_ci:g} is not allowed (allowed: percentage points in (0, 100])")
        _choice("until-ci-of", args.until_ci_of, ("cost", "reest"))
        if args.algo == "optuna" or args.ablate is not None:
            raise UsageError("--until-ci is for --algo grid or random: it adds seeds to the cells of a fixed set "
                             "of configurations")
        if not 3 <= args.max_seeds <= 1000:
            raise UsageError(f"--max-seeds {args.max_seeds} is not allowed (allowed: 3 to 1000; an interval needs "
                             "3 seeds)")
    if args.algo == "grid":
        if args.samples is not None:
            raise UsageError(f"--samples {args.samples} is for --algo random or optuna; grid search trains every "
                             "grid point (see --dry-run)")
        if args.search_seed is not None:
            raise UsageError(f"--search-seed {args.search_seed} is for --algo random or optuna; grid search draws "
                             "nothing")


def main(argv: list[str] | None = None) -> int:
    """Run `python -m search.run`; returns the exit code (see the module docstring)."""
    args = _parser().parse_args(argv)
    from search.sweep.signals import DriverSignals

    # Every signal that would end the driver ends it with one line and 128 + its number, runs closed and Ray
    # stopped, from here to the end (search/sweep/signals.py); handed back as it was when main returns.
    guard = DriverSignals().install()
    try:
        rc = _main(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit (which says exit 120)
        return rc
    except BrokenPipeError:  # stdout's reader went away before the sweep started (`--list | head -1`): SIGPIPE
        from search.sweep.signals import mute_closed_outputs

        guard.raised = True
        mute_closed_outputs()
        try:
            print("interrupted by SIGPIPE before the sweep started: nothing was trained", file=sys.stderr)
        except OSError:
            pass
        return exit_code("SIGPIPE")
    finally:
        guard.restore()


def _main(args: argparse.Namespace) -> int:
    try:
        from search.plugins import load_cli_plugins

        # Kinds and backbones pass their contract (torch) unless only listing or printing the plan.
        load_cli_plugins(args, check=not (args.list or args.dry_run))
        if args.list:
            _list_spaces()
            return EXIT_OK
        if not args.space:
            raise UsageError("--space is required (see --list)")
        _validate(args)
        resolve_seeds(args)
        gpus = _gpus(args.gpus_per_trial)
        ablation = None
        if args.ablate is not None:
            from search.sweep.ablate import ablation_configs, print_plan

            configs, overrides, ablation = ablation_configs(args)
        else:
            configs, overrides = build_configs(args)
        if args.dry_run and ablation is not None:
            print_plan(ablation)
            return EXIT_OK
        if args.dry_run:
            if args.algo == "optuna":
                print(f"optuna: {args.samples or 'grid-size'} configurations proposed by TPE from space "
                      f"{args.space!r}, each with {args.seeds} seed(s); e.g. the first:")
            _print_table(configs)
            print(f"{len(configs)} trials ({args.space}, profile {args.profile}, algo {args.algo})")
            return EXIT_OK
        from search.code_version import code_version
        from search.sweep.preflight import (check_address, check_environment, check_resources, check_storage,
                                            check_tracking, check_trials)

        code_version()  # recorded on every run; a malformed DBN_CODE_VERSION is refused here, before any write
        check_storage(args.storage)
        check_tracking(args.tracking_uri)
        check_environment(args.address)
        check_address(args.address)
        check_resources(cpus_per_trial=args.cpus_per_trial, gpus_per_trial=gpus, num_cpus=args.num_cpus,
                        address=args.address, configs=configs)
        # Preflight every family and dataset the space can reach, not only the trials drawn so far:
        # Optuna proposes its later configurations during the sweep.
        check_trials(configs + ([] if args.algo == "grid" else reachable_configs(args, overrides)))
        if args.data_dir and "://" in args.data_dir:
            from search.sweep.staging import check_data_uri

            check_data_uri(args.data_dir, stage_here=not args.address)  # a local Ray's trials stage here
            if not args.address:
                _check_staged(args.data_dir, configs + ([] if args.algo == "grid" else
                                                        reachable_configs(args, overrides)))
        args.ablation_plan = ablation  # written by the driver once it holds the sweep's lock
    except BrokenPipeError:
        raise  # SIGPIPE, not bad input (main says so)
    except (ConfigError, UsageError, ValueError, FileNotFoundError, ConnectionError, PermissionError,
            OSError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:  # Ctrl-C, or any signal DriverSignals turns into Signalled
        name = getattr(e, "name", "SIGINT")
        print(f"interrupted by {name} before the sweep started: nothing was trained", file=sys.stderr)
        return exit_code(name)
    return _drive(args, configs, overrides, gpus)


def _check_staged(uri: str, configs: list[dict[str, Any]]) -> None:
    """Stage a --data-dir URI on this machine (a local Ray's trials would, each in turn) and run the datasets'
    file checks on the copy, so a missing or corrupt file is one line before the sweep, not every trial's
    failure (issue 30). Raises ValueError naming the URI and the staged copy."""
    from search.sweep.preflight import check_data_files
    from search.sweep.staging import stage_data_dir

    local = stage_data_dir(uri)
    try:
        check_data_files([{**c, "data_dir": local} for c in configs if c.get("data_dir") == uri])
    except (ValueError, OSError) as e:
        raise ValueError(f"--data-dir {uri!r} (staged at {local}): {e}") from None


def _drive(args: argparse.Namespace, configs: list[dict[str, Any]], overrides: dict[str, Any],
           gpus: float | str) -> int:
    """The sweep itself: a failure here is not the user's input (exit 3, traceback in a log file)."""
    from search.sweep import driver
    from search.sweep.errors import Interrupted, Refused

    try:
        return driver.drive(args, configs, overrides, gpus)
    except Refused as e:  # found before anything ran (another sweep holds the lock, a cluster too small)
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:
        print(f"interrupted by {e.name}: {e.detail}; rerun with --resume to complete the sweep", file=sys.stderr)
        return exit_code(e.name)
    except (KeyboardInterrupt, BrokenPipeError) as e:  # a signal outside Tune's loop, or a second one in it
        from search.sweep.signals import mute_closed_outputs

        name = "SIGPIPE" if isinstance(e, BrokenPipeError) else getattr(e, "name", "SIGINT")
        if name == "SIGPIPE":
            mute_closed_outputs()  # the output whose reader went away: the last line goes to stderr if it can
        where = f" during {e.phase}" if getattr(e, "phase", "") else ""
        print(f"interrupted by {name}{where}: finished trials are saved, the sweep's open runs are closed KILLED and "
              "its Ray stopped; rerun with --resume to complete the sweep", file=sys.stderr)
        return exit_code(name)
    except Exception as e:  # noqa: BLE001 - any failure during the sweep: one line, the traceback in a log
        if args.debug:
            raise
        from search.sweep.errors import write_crash_log
        from search.lock import disk_full

        log = write_crash_log(args.storage, args.space, e)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if disk_full(e):
            print(f"error: the disk is full ({first}): free space on --storage {args.storage!r} / --tracking-uri "
                  f"{args.tracking_uri!r}, then rerun with --resume (log: {log})", file=sys.stderr)
        else:
            print(f"error: the sweep failed while running ({type(e).__name__}: {first}); finished trials are kept; "
                  f"full traceback in {log}; rerun with --resume once fixed", file=sys.stderr)
        return EXIT_SWEEP_FAILED


if __name__ == "__main__":
    sys.exit(main())
