"""Helpers of the fault tests (test_kill_chain, test_trial_faults, test_storage_faults): run the real
CLI in a subprocess, in its own session and working directory, and read MLflow and Parquet back."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
from _faults import fault_pythonpath
from _procs import reap

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
SPACE = "smoke"
# 4 trials (none + 3 placements, bernoulli), 1 epoch on 64 digits: seconds each.
KILL_ARGS = ["--space", SPACE, "--set", "dropout_type=bernoulli", "--set", "epochs=1", "--set", "train_samples=64",
             "--num-cpus", "2", "--quiet"]
N_KILL_TRIALS = 4
BN_LAYERS = 7  # WRN-10: 3 blocks x 2 BN + the final BN
# What MLflow holds per trial: the epoch series under `epoch/` (step = epoch, throughput among them) and each
# summary value once (step 0) but those the series give (search/sweep/tracking.py; TrialResult's `params` is
# `num_params` there).
EPOCH_SERIES = tuple(f"epoch/{k}" for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s",
                                            "throughput"))
SUMMARY = ("test_acc", "test_loss", "train_loss", "train_acc", "test_acc_reest", "test_loss_reest", "mean_shift",
           "max_shift", "mean_shift_reest", "wall_time_s", "probe_time_s", "num_params")


# --------------------------------------------------------------------------- helpers
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBN_")}
    # tests/_inject + tests/ on the path: faults are injected from outside the product (tests/_faults.py).
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": fault_pythonpath(str(ROOT))}, **extra)
    return env


def _popen(cwd: Path, args: list[str], env: dict[str, str], log: Path, hook: str | None = None) -> subprocess.Popen:
    cmd = [PY, "-c", hook, *args] if hook else [PY, "-m", "search.run", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_terminal_signals)


def _terminal_signals() -> None:
    """The sweep gets SIGINT as from a terminal: a test run started in the background (`cmd &`, nohup) hands its
    children SIGINT ignored, and Python then never raises KeyboardInterrupt (the Ctrl-C tests failed so)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -999
    finally:
        reap(proc.pid)


def _sweep(cwd: Path, args: list[str], env: dict[str, str] | None = None, timeout: float = 400,
           log: str = "sweep.log") -> tuple[int, str]:
    proc = _popen(cwd, args, env or _env(), cwd / log)
    rc = _finish(proc, timeout)
    return rc, (cwd / log).read_text()


def _client(cwd: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")


def _runs(cwd: Path, space: str = SPACE) -> list:
    if not (cwd / "mlflow.db").exists():
        return []
    client = _client(cwd)
    exp = client.get_experiment_by_name(space)
    # Trial runs only: each sweep also has a parent run (run_kind = sweep) holding its summary.
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return [r for r in runs if r.data.tags.get("run_kind") != "sweep"]


def _dataset(root: Path, name: str, space: str = SPACE):
    folder = root / space / name
    files = sorted(str(p) for p in folder.glob("*.parquet") if not p.name.startswith(".")) if folder.exists() else []
    return ds.dataset(files, format="parquet").to_table() if files else None


def _grid_hashes(**overrides: Any) -> dict[tuple[str, str], str]:
    """(placement, type) -> config_hash of the smoke grid with `overrides`, as the CLI computes it."""
    from search.config import TrialConfig
    from spaces import get_space

    out = {}
    for d in get_space(SPACE).grid("quick"):
        cfg = TrialConfig.from_dict({**d, **overrides})
        out[(cfg.dropout_placement, cfg.dropout_type)] = cfg.config_hash
    return out


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr[-3000:]}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []
