"""Ctrl-C (SIGINT) and SIGTERM stop a sweep cleanly: running trials closed as KILLED, nothing finished lost.

Before: Tune swallowed SIGINT, so the driver printed "sweep done" and exited 0 with runs left
RUNNING; SIGTERM reached Ray's C++ handler and aborted with a core dump (exit 134). Now the
driver stops the tuner through its stopper, closes the runs of the trials it stopped, says
"interrupted ..., rerun with --resume" and exits 128 + the signal number.

One chain in a module fixture: a sweep whose trials wait at a barrier (DBN_GATHER, from
tests/_faults.py) is interrupted with SIGINT to its process group (what a terminal sends);
`--resume` is started the same way and stopped with SIGTERM to the driver alone (what a
scheduler sends); a last `--resume` completes the sweep.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from _sweeps import KILL_ARGS, N_KILL_TRIALS, _dataset, _env, _finish, _popen, _runs, _sweep

pytestmark = pytest.mark.slow


@dataclass
class Stage:
    rc: int
    log: str
    runs: list  # MLflow trial runs right after the driver exited
    rows: int  # Parquet trial rows then


@dataclass
class Chain:
    cwd: Path
    sigint: Stage
    sigterm: Stage
    resume_rc: int
    resume_log: str


def _interrupted(cwd: Path, args: list[str], sig: int, group: bool, log: str) -> Stage:
    state = cwd / f"state-{log}"
    # Every trial waits at its start for 99 others: trials are running, none can finish.
    env = _env(DBN_GATHER="99", DBN_GATHER_TIMEOUT="300", DBN_FAULT_STATE=str(state), DBN_SWEEP_REPORT="off")
    proc = _popen(cwd, args, env, cwd / log)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        gather = state / "gather"
        if gather.is_dir() and any(p.name.startswith("arrived-") for p in gather.iterdir()):
            break
        time.sleep(0.5)
    time.sleep(2)  # let the driver record the run of every trial that started
    if group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    rc = _finish(proc, 200)
    table = _dataset(cwd / "results", "trials")
    return Stage(rc, (cwd / log).read_text(), _trial_runs(cwd), 0 if table is None else table.num_rows)


def _trial_runs(cwd: Path) -> list:
    return [r for r in _runs(cwd) if "config_hash" in r.data.tags]  # not the sweeps' parent runs


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    cwd = tmp_path_factory.mktemp("interrupts")
    sigint = _interrupted(cwd, KILL_ARGS, signal.SIGINT, group=True, log="sigint.log")
    sigterm = _interrupted(cwd, KILL_ARGS + ["--resume"], signal.SIGTERM, group=False, log="sigterm.log")
    rc, log = _sweep(cwd, KILL_ARGS + ["--resume"], env=_env(DBN_SWEEP_REPORT="off"), log="resume.log")
    return Chain(cwd, sigint, sigterm, rc, log)


def _last_line(log: str) -> str:
    return [ln for ln in log.strip().splitlines() if ln.strip()][-1]


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("which, code, name", [("sigint", 130, "SIGINT"), ("sigterm", 143, "SIGTERM")])
def test_interrupt_exits_with_the_signal_code_and_says_resume(chain: Chain, which: str, code: int,
                                                             name: str) -> None:
    s: Stage = getattr(chain, which)
    assert s.rc == code, (s.rc, s.log[-3000:])
    last = _last_line(s.log)
    assert last.startswith(f"interrupted by {name}:") and "rerun with --resume" in last, last
    assert "sweep 'smoke' done" not in s.log and "core dumped" not in s.log and "Traceback" not in s.log


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("which", ["sigint", "sigterm"])
def test_interrupt_closes_every_running_trial_as_killed(chain: Chain, which: str) -> None:
    s: Stage = getattr(chain, which)
    assert s.runs, "the interrupted sweep started no trial"
    assert not [r for r in s.runs if r.info.status == "RUNNING"], "trial runs left RUNNING"
    killed = [r for r in s.runs if r.info.status == "KILLED"]
    assert killed and all(r.data.tags.get("status") == "killed" for r in killed)
    # An interrupted trial is not a result: no FINISHED run and no Parquet row for it.
    assert not [r for r in s.runs if r.info.status == "FINISHED"]
    assert s.rows == 0


@pytest.mark.timeout(1200)
def test_resume_after_interrupts_trains_each_trial_once(chain: Chain) -> None:
    assert chain.resume_rc == 0, chain.resume_log[-3000:]
    assert not [r for r in _runs(chain.cwd) if r.info.status == "RUNNING"]  # parent runs included
    runs = _trial_runs(chain.cwd)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    hashes = [r.data.tags["config_hash"] for r in finished]
    assert len(finished) == N_KILL_TRIALS and len(set(hashes)) == N_KILL_TRIALS
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    rows = _dataset(chain.cwd / "results", "trials")
    assert sorted(rows.column("config_hash").to_pylist()) == sorted(hashes)
