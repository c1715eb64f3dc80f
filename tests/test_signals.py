"""Every signal that would end the driver, at every phase, ends it one way (issue 30): one line, exit 128 + n,
the parent run and every trial run closed (never RUNNING), every finished trial in Parquet once, and no
process of the Ray it started left (search/sweep/signals.py).

SIGINT and SIGTERM inside Tune's loop are tests/test_interrupts.py's. Here: SIGHUP, SIGQUIT, SIGUSR1,
SIGUSR2, SIGTERM and SIGPIPE, during preflight, right after Ray's start, inside Tune's loop, inside the
compaction and during the end-of-sweep report. The driver sends the signal to itself at the chosen instant
(`_SIGNAL_HOOK`, as test_kill_chain's kill hook does), so the phase is certain; SIGPIPE comes for real, from
stdout's reader closing its end of the pipe. Leftover Ray processes are found by the driver's session id
(tests/_procs.py), never by name.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _procs import session_pids
from _sweeps import KILL_ARGS, N_KILL_TRIALS, PY, SPACE, _client, _dataset, _env, _finish, _popen, _terminal_signals

# Runs search.run after arranging for the driver to send itself DBN_TEST_SIGNAL at DBN_TEST_SIGNAL_AT; the
# file DBN_TEST_SIGNAL_MARK proves it was sent.
_SIGNAL_HOOK = r'''
import os, signal, sys
point, sig = os.environ["DBN_TEST_SIGNAL_AT"], signal.Signals[os.environ["DBN_TEST_SIGNAL"]]

def send():
    with open(os.environ["DBN_TEST_SIGNAL_MARK"], "w") as fh:
        fh.write(point)
    os.kill(os.getpid(), sig)

if point == "preflight":  # every check of the trials, before the lock and anything written
    import search.sweep.preflight as pf
    real_check = pf.check_trials
    def check_trials(*a, **k):
        send()
        return real_check(*a, **k)
    pf.check_trials = check_trials
elif point == "ray_started":  # ray.init has started the local Ray's processes, init_ray has not returned
    import ray
    real_init = ray.init
    def init(*a, **k):
        out = real_init(*a, **k)
        send()
        return out
    ray.init = init
elif point == "compaction":  # the compacted file is published, the parts it replaces not yet deleted
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        out = real_replace(src, dst, *a, **k)
        if "/part-compact-" in str(dst):
            send()
        return out
    os.replace = replace
elif point == "report":  # the end-of-sweep report is being written (after the compaction)
    import analysis.report
    real_report = analysis.report.write_report
    def write_report(*a, **k):
        send()
        return real_report(*a, **k)
    analysis.report.write_report = write_report
elif point == "training":  # the first trial's MLflow run exists and it trains
    from search.sweep.tracking import Tracker
    real_start = Tracker.start
    def start(self, *a, **k):
        run_id = real_start(self, *a, **k)
        send()
        return run_id
    Tracker.start = start
else:
    raise SystemExit(f"unknown signal point {point!r}")

from search.sweep.cli import main
sys.exit(main(sys.argv[1:]))
'''

# 4 trials; DBN_COMPACT_EVERY=2 so that the sweep compacts (the end-of-sweep compaction of 4 parts)
ARGS = KILL_ARGS


def _parents(cwd: Path) -> list:
    client = _client(cwd)
    exp = client.get_experiment_by_name(SPACE)
    return [r for r in client.search_runs([exp.experiment_id], max_results=100)
            if r.data.tags.get("run_kind") == "sweep"] if exp else []


def _trials(cwd: Path) -> list:
    if not (cwd / "mlflow.db").exists():
        return []
    client = _client(cwd)
    exp = client.get_experiment_by_name(SPACE)
    return [r for r in client.search_runs([exp.experiment_id], max_results=100)
            if "config_hash" in r.data.tags] if exp else []


def _no_ray_left(sid: int, grace: float = 5.0) -> list[int]:
    """The processes of the driver's session (Ray's, once the driver is gone) still there after `grace` s."""
    deadline = time.time() + grace
    while session_pids(sid) and time.time() < deadline:
        time.sleep(0.2)
    return session_pids(sid)


def _signalled(tmp_path: Path, point: str, name: str, args: list[str] = ARGS, **env: str) -> tuple[int, str, Path]:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    mark = tmp_path / "sent"
    proc = _popen(cwd, args, _env(DBN_TEST_SIGNAL_AT=point, DBN_TEST_SIGNAL=name, DBN_TEST_SIGNAL_MARK=str(mark),
                                  DBN_SWEEP_REPORT="tables", **env), tmp_path / "driver.log", hook=_SIGNAL_HOOK)
    try:
        rc = proc.wait(timeout=400)
        left = _no_ray_left(proc.pid)
    finally:
        _finish(proc, 30)  # reaps whatever is left, so a failure does not leak processes into other tests
    log = (tmp_path / "driver.log").read_text()
    assert mark.exists(), f"the signal was never sent at {point}:\n{log[-3000:]}"
    assert not left, f"processes of the driver's Ray left after {name} at {point}: {left}\n{log[-2000:]}"
    return rc, log, cwd


def _last_line(log: str) -> str:
    return [ln for ln in log.strip().splitlines() if ln.strip()][-1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sighup_during_preflight_ends_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    rc, log, cwd = _signalled(tmp_path, "preflight", "SIGHUP")
    assert rc == 129, log[-3000:]
    assert _last_line(log) == "interrupted by SIGHUP before the sweep started: nothing was trained", log[-2000:]
    assert sorted(os.listdir(cwd)) == [], "a sweep stopped in preflight wrote something"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigusr1_right_after_ray_started_stops_ray_and_leaves_no_run_running(tmp_path: Path) -> None:
    rc, log, cwd = _signalled(tmp_path, "ray_started", "SIGUSR1")
    assert rc == 128 + signal.SIGUSR1, log[-3000:]
    line = _last_line(log)
    assert line.startswith("interrupted by SIGUSR1 during starting Ray: ") and "rerun with --resume" in line, line
    assert not [r for r in _parents(cwd) + _trials(cwd) if r.info.status == "RUNNING"]
    assert _dataset(cwd / "results", "trials") is None  # nothing trained


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("point, name", [("compaction", "SIGQUIT"), ("report", "SIGTERM")])
def test_a_signal_after_training_closes_the_parent_killed_and_keeps_every_trial(tmp_path: Path, point: str,
                                                                                 name: str) -> None:
    """Compaction and the end-of-sweep report run after Tune's loop: a signal there ended the driver with the
    parent run RUNNING (SIGQUIT: a core dump). Now: one line, 128 + n, the parent KILLED, the 4 finished
    trials FINISHED in MLflow and in Parquet once each."""
    rc, log, cwd = _signalled(tmp_path, point, name)
    assert rc == exit_code(name), log[-3000:]
    phase = {"compaction": "compaction", "report": "the end-of-sweep report"}[point]
    line = _last_line(log)
    assert line.startswith(f"interrupted by {name} during {phase}: finished trials are saved"), line
    parents = _parents(cwd)
    assert [p.info.status for p in parents] == ["KILLED"], [p.info.status for p in parents]
    trials = _trials(cwd)
    assert len(trials) == N_KILL_TRIALS and {r.info.status for r in trials} == {"FINISHED"}
    table = _dataset(cwd / "results", "trials")
    from search.store import read_space

    kept = read_space(str(cwd / "results"), SPACE)[0]  # de-duplicated as every reader reads it
    assert sorted(kept.column("run_id").to_pylist()) == sorted(r.info.run_id for r in trials)
    assert table is not None and table.num_rows >= N_KILL_TRIALS


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigusr2_while_training_closes_every_run_killed(tmp_path: Path) -> None:
    """Inside Tune's loop a signal other than SIGINT/SIGTERM stops the tuner as they do: the running trials'
    runs and the parent KILLED, the line, 140."""
    rc, log, cwd = _signalled(tmp_path, "training", "SIGUSR2")
    assert rc == 128 + signal.SIGUSR2, log[-3000:]
    line = _last_line(log)
    assert line.startswith("interrupted by SIGUSR2: ") and "closed as KILLED" in line, line
    runs = _parents(cwd) + _trials(cwd)
    assert runs and not [r for r in runs if r.info.status == "RUNNING"], [r.info.status for r in runs]
    assert [p.info.status for p in _parents(cwd)] == ["KILLED"]
    finished = sorted(r.info.run_id for r in _trials(cwd) if r.info.status == "FINISHED")
    table = _dataset(cwd / "results", "trials")
    assert sorted(set(table.column("run_id").to_pylist()) if table is not None else []) == finished


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stdout_reader_gone_is_sigpipe_141_with_runs_closed(tmp_path: Path) -> None:
    """`search.run ... | head -1`: stdout's reader goes away after the first line. The next write is SIGPIPE
    (Python ignored it, so the driver died of a BrokenPipeError wherever it wrote, runs left RUNNING). Now:
    one line on stderr, exit 141, no run RUNNING, every trial MLflow has FINISHED in Parquet."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = [a for a in ARGS if a != "--quiet"]  # a line per finished trial: writes after the reader left
    proc = subprocess.Popen([PY, "-m", "search.run", *args], cwd=cwd, env=_env(DBN_SWEEP_REPORT="tables"),
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "stderr.log", "w"),
                            start_new_session=True, preexec_fn=_terminal_signals)
    try:
        first = proc.stdout.readline()
        proc.stdout.close()  # `head -1` exits
        rc = proc.wait(timeout=400)
        left = _no_ray_left(proc.pid)
    finally:
        _finish(proc, 30)
    err = (tmp_path / "stderr.log").read_text()
    assert first and rc == 141, (first, rc, err[-3000:])
    assert not left, left
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("interrupted by")]
    assert len(lines) == 1 and lines[0].startswith("interrupted by SIGPIPE"), err[-3000:]
    runs = _parents(cwd) + _trials(cwd)
    assert not [r for r in runs if r.info.status == "RUNNING"], [r.info.status for r in runs]
    finished = sorted(r.info.run_id for r in _trials(cwd) if r.info.status == "FINISHED")
    table = _dataset(cwd / "results", "trials")
    assert sorted(set(table.column("run_id").to_pylist()) if table is not None else []) == finished


def exit_code(name: str) -> int:
    return 128 + int(signal.Signals[name])


def test_driver_signals_are_taken_and_handed_back_and_an_ignored_one_stays_ignored() -> None:
    """search.run's main takes every signal that would end the driver and hands them back as they were (it runs
    inside tests and notebooks); one its parent ignored (SIGHUP under nohup) stays ignored; outside Tune's loop
    a signal raises Signalled (a KeyboardInterrupt) naming the signal and the phase, and during the clean-up
    that follows, a second one is ignored."""
    from search.sweep.signals import CAUGHT, DriverSignals, Signalled

    before = {sig: signal.getsignal(sig) for sig in CAUGHT}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        guard = DriverSignals().install()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert all(signal.getsignal(sig) == guard._handler for sig in CAUGHT if sig != signal.SIGHUP)
        guard.phase = "compaction"
        with pytest.raises(Signalled) as e:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1)
        assert isinstance(e.value, KeyboardInterrupt) and (e.value.name, e.value.phase) == ("SIGUSR1", "compaction")
        os.kill(os.getpid(), signal.SIGUSR2)  # during the clean-up: ignored, not raised
        time.sleep(0.2)
        guard.restore()
        assert {sig: signal.getsignal(sig) for sig in CAUGHT if sig != signal.SIGHUP} == \
            {sig: h for sig, h in before.items() if sig != signal.SIGHUP}
        assert DriverSignals.active is None
    finally:
        for sig, h in before.items():
            signal.signal(sig, h)


def test_list_into_a_closed_pipe_is_sigpipe_141_not_a_traceback(tmp_path: Path) -> None:
    """`search.run --list | head -1`: a BrokenPipeError before any sweep was a traceback (or 'error: [Errno 32]',
    exit 2, as if the input were bad). Now one line on stderr and 141."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line: the first write meets the closed pipe, always
    proc = subprocess.Popen([PY, "-m", "search.run", "--list"], cwd=tmp_path, env=_env(), stdout=write,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_terminal_signals)
    os.close(write)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err[-3000:]
    assert err.strip() == "interrupted by SIGPIPE before the sweep started: nothing was trained", err[-3000:]
