"""Fault injection for reliability tests: make chosen trials fail in chosen ways, from outside the product.

tests/_inject/sitecustomize.py wraps `search.trial.runner.run_trial` with `maybe_inject`
in every process of a test's sweep (tests put tests/_inject and tests/ on PYTHONPATH, see
`fault_env`). Off unless the environment variable DBN_FAULTS is set, e.g.

    DBN_FAULTS="raise:dropout_placement=head"              every head trial raises
    DBN_FAULTS="raise-once:dropout_type=uout"              raises on the first attempt only
    DBN_FAULTS="oom:width=2.0;kill:dropout_type=gaussian"  simulated CUDA OOM; the worker process dies

`*-once` faults remember their first attempt in DBN_FAULT_STATE (a directory),
so the retry succeeds. DBN_GATHER=N makes every trial wait at its start (up to
DBN_GATHER_TIMEOUT seconds, default 120) until N trials have started, and record
how many it saw in DBN_FAULT_STATE/gather/: proof that N trials ran at once,
whatever the machine's load does to their start-up. Nothing here runs in a normal sweep.
"""
from __future__ import annotations

import os
import signal
from typing import Any

__all__ = ["maybe_inject", "InjectedFault", "wrap_run_trial", "fault_pythonpath"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def fault_pythonpath(root: str) -> str:
    """PYTHONPATH that makes a subprocess (and its Ray workers) load the injector: the project, tests/_inject, tests/."""
    return os.pathsep.join([root, os.path.join(_HERE, "_inject"), _HERE])


def wrap_run_trial(module: Any) -> None:
    """Replace `module.run_trial` by one that first applies the matching DBN_FAULTS rule.

    The 'nan' fault trains at lr=1e6 (the largest lr TrialConfig allows), so the loss diverges (status 'diverged'); the trial
    is still recorded under the configuration the sweep asked for.
    """
    real = module.run_trial

    def run_trial(cfg: Any, report: Any = None) -> Any:
        from search.config import TrialConfig

        cfg = cfg if isinstance(cfg, TrialConfig) else TrialConfig.from_dict(cfg)
        if maybe_inject(cfg) == "nan":
            cfg = cfg.replace(lr=1e6)
        return real(cfg, report)

    module.run_trial = run_trial

KINDS = ("raise", "oom", "kill", "nan")


class InjectedFault(RuntimeError):
    """Raised by an injected `raise` fault."""


def _matches(cfg: Any, cond: str) -> bool:
    key, _, value = cond.partition("=")
    have = getattr(cfg, key.strip(), None)
    return str(have) == value.strip()


def maybe_inject(cfg: Any) -> str | None:
    """Apply the first DBN_FAULTS rule matching `cfg`; returns 'nan' for the caller to apply, else None."""
    if os.environ.get("DBN_GATHER"):
        _gather(int(os.environ["DBN_GATHER"]), float(os.environ.get("DBN_GATHER_TIMEOUT") or 120))
    spec = os.environ.get("DBN_FAULTS", "")
    for rule in filter(None, (r.strip() for r in spec.split(";"))):
        kind, _, cond = rule.partition(":")
        once = kind.endswith("-once")
        kind = kind.removesuffix("-once")
        if kind not in KINDS or not _matches(cfg, cond):
            continue
        if once and _seen(cfg, rule):
            continue
        if kind == "raise":
            raise InjectedFault(f"injected fault for {cond}")
        if kind == "oom":
            raise RuntimeError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected for {cond})")
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return kind
    return None


def _seen(cfg: Any, rule: str) -> bool:
    """True if this (rule, config) already fired once; records the first firing."""
    state = os.environ.get("DBN_FAULT_STATE")
    if not state:
        return False
    os.makedirs(state, exist_ok=True)
    import hashlib

    mark = os.path.join(state, f"{hashlib.sha1(rule.encode()).hexdigest()[:8]}-{cfg.config_hash}")
    try:
        fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return True
    os.close(fd)
    return False


def _gather(n: int, timeout: float) -> None:
    """A barrier across trial processes: arrive, wait until `n` have arrived, write how many were seen."""
    import time
    import uuid

    folder = os.path.join(os.environ.get("DBN_FAULT_STATE") or ".", "gather")
    os.makedirs(folder, exist_ok=True)
    me = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    open(os.path.join(folder, f"arrived-{me}"), "w").close()
    deadline = time.time() + timeout
    while (seen := sum(f.startswith("arrived-") for f in os.listdir(folder))) < n and time.time() < deadline:
        time.sleep(0.05)
    with open(os.path.join(folder, f"left-{me}"), "w") as fh:
        fh.write(str(seen))
