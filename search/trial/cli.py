"""`python -m search.trial`: one trial from the command line, no Ray (the application floor).

The science is `search.trial.runner.run_trial`; this module adds what a command line needs on top of
it: the flags (one per TrialConfig field), `--plugin` (loaded and checked here, above the trial
floor), the printed summary and the `--json` file.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from search.config import ConfigError, TrialConfig, parse_value
from search.plugins import load_plugins
from search.trial import runner
from search.trial.runner import format_result

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    import dataclasses

    p = argparse.ArgumentParser(
        prog="python -m search.trial",
        description="Run one trial (no Ray needed) and print its summary and per-layer variance shift.",
    )
    p.add_argument("--plugin", action="append", default=[], metavar="PATH_OR_MODULE",
                   help="a .py file or importable module registering dropout kinds, placements or backbones "
                        "(repeatable; docs/extending.md)")
    for f in dataclasses.fields(TrialConfig):
        if f.metadata.get("auto"):  # set from the registry (plugins), never typed
            continue
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, metavar=str(f.type).upper().replace(" | NONE", ""),
                       default=None, help=f"{f.metadata.get('help', '')} (default: {f.default!r})")
    p.add_argument("--layers", action="store_true", help="print the per-BN-layer table")
    p.add_argument("--json", metavar="PATH", help="also write the full result as JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _config_from_args(ns: argparse.Namespace) -> TrialConfig:
    import dataclasses

    values: dict[str, Any] = {}
    for f in dataclasses.fields(TrialConfig):
        raw = getattr(ns, f.name, None)
        if raw is not None:
            values[f.name] = parse_value(f.name, str(f.type), raw)
    return TrialConfig.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    """Run one trial from `argv`; 0 done, 1 the trial failed, 2 bad input (one line on stderr)."""
    ns = _parser().parse_args(argv)
    try:
        load_plugins(ns.plugin, check=True)
        cfg = _config_from_args(ns)
        _check_json_path(ns.json)
        cfg = _preflight(cfg)
    except (ConfigError, ValueError, OSError) as e:  # bad input, found before any data is loaded
        if ns.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = runner.run_trial(cfg, report=lambda m: print(
            f"  epoch {int(m['epoch']):>3}  train loss {m['train_loss']:.4f}  test acc {m['test_acc']:.4f}  "
            f"{m['throughput']:,.0f} img/s", flush=True))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if ns.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_result(cfg, result, layers=ns.layers))
    if ns.json:
        _write_json_atomic(ns.json, {"config": cfg.to_dict(), "config_hash": cfg.config_hash,
                                     "result": result.to_dict()})
    return 0 if result.status != "failed" else 1


def _preflight(cfg: TrialConfig) -> TrialConfig:
    """search.run's checks for one trial, before any data is loaded (issue 30: a bad combination ended in a
    75-line traceback after loading the data): the dataset's files by their headers, the model built on the
    meta device and run forward once (a placement the backbone cannot take, an input too small for it), a
    `--data-dir` URI's folder and this machine's staging folder; a URI is then staged as a sweep's trial does.
    Returns `cfg`, with a URI's data_dir replaced by the staged copy. Raises ValueError/OSError (one line)."""
    from search.sweep.preflight import check_trials

    check_trials([cfg.to_dict()])  # a URI's files are checked once staged (run_trial's reader)
    if cfg.data_dir and "://" in cfg.data_dir:
        from search.sweep.staging import check_data_uri, stage_and_check

        check_data_uri(cfg.data_dir, stage_here=True)
        # The dataset's file check on the staged copy, as every sweep trial runs it: one line naming the URI.
        cfg = cfg.replace(data_dir=stage_and_check(cfg.data_dir, cfg.dataset))
    return cfg


def _check_json_path(path: str | None) -> None:
    """Refuse a --json path that cannot be written, before training rather than after: its folder must exist,
    and the path must be new or a regular file (a rename over a device replaced it; search/outputs.py)."""
    import os

    from search.outputs import check_output_file

    if not path:
        return
    if os.path.isdir(path):
        raise ValueError(f"--json {path!r} is a directory; give a file name")
    try:
        real = check_output_file(path, "--json")
    except OSError as e:  # FileNotFoundError: the folder; OSError: not a regular file
        raise ValueError(str(e)) from None
    folder = os.path.dirname(real)
    if not os.access(folder, os.W_OK) or (os.path.exists(real) and not os.access(real, os.W_OK)):
        raise ValueError(f"--json {path!r} is not writable")


def _write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    """Write beside the target, then rename: an interrupted write never leaves half a JSON file; never over
    anything but a regular file (checked again just before the rename)."""
    import json

    from search.outputs import write_text_atomic

    write_text_atomic(path, json.dumps(payload, indent=1, default=float), "--json")


if __name__ == "__main__":
    sys.exit(main())
