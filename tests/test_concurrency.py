"""Nothing lost when two processes touch one space at once (issue 30): every writer of a space's Parquet
datasets (sweep, compaction, rebuild from MLflow, repair) holds the space's lock; a reader never takes a
compaction for damage; two reports into one --out do not share temporary files.

The races run for real: two processes at once, each held at the instant that matters by a small hook
(a process holding the lock, a rebuild paused inside its MLflow read, a report paused before its first
rename), so the tests do not depend on timing. docs/reliability.md, section 8, lists them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from _sweeps import KILL_ARGS, PY, _env, _finish, _runs, _tree

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "data" / "legacy_smoke"  # a 4-trial smoke sweep: mlflow.db and its Parquet
REPORT = ["-m", "analysis.report", "--space", "smoke", "--root", "results", "--tracking-uri", "sqlite:///mlflow.db",
          "--out", "reports", "--no-figures"]

# Holds the space's lock as a sweep does (search.sweep.lock.SweepLock) until told, then writes one trial's
# part files, as a sweep's next finished trial would.
_HOLDER = r'''
import datetime as dt, sys
from search.config import TrialConfig
from search.results import LayerShift, TrialResult
from search.schema import layer_rows, trial_row
from search.store import ResultStore
from search.sweep.lock import SweepLock

with SweepLock("results", "smoke", "sqlite:///mlflow.db"):
    print("held", flush=True)
    sys.stdin.readline()
    cfg, layers = TrialConfig(), [LayerShift("bn0", 0, 0.0, 16, 144, False, 1.0, 1.1, 1.1, 1.1)]
    row = trial_row(cfg, TrialResult(test_acc=0.5, layers=layers), run_id="new-run", space="smoke", profile="quick",
                    finished_at=dt.datetime.now(dt.timezone.utc))
    ResultStore("results", "smoke").write_trial(row, layer_rows(cfg, layers, run_id="new-run", space="smoke"))
    print("written", flush=True)
'''

# analysis.report whose MLflow reads, once it holds the lock for its rebuild, wait for the file DBN_TEST_GO: a
# rebuild paused while it holds the lock (its reads before, checking the store holds trial runs, go on).
_SLOW_MLFLOW = r'''
import os, sys, time
from mlflow.tracking import MlflowClient
real = MlflowClient.search_runs
def rebuilding():
    try:
        with open(os.path.join("results", "smoke", ".sweep.lock")) as fh:
            return fh.read() == f"{os.getpid()} rebuild"
    except OSError:
        return False
def search_runs(self, *a, **k):
    if not rebuilding():
        return real(self, *a, **k)
    deadline = time.time() + 300
    while not os.path.exists(os.environ["DBN_TEST_GO"]) and time.time() < deadline:
        time.sleep(0.05)
    return real(self, *a, **k)
MlflowClient.search_runs = search_runs
from analysis.report import main
sys.exit(main(sys.argv[1:]))
'''

# analysis.report paused at its first rename into --out (DBN_TEST_MARK says so) until DBN_TEST_GO exists.
_PAUSED_REPORT = r'''
import os, sys, time
out, real, paused = os.path.abspath(os.environ["DBN_TEST_OUT"]), os.replace, []
def replace(src, dst, *a, **k):
    if not paused and os.path.abspath(str(dst)).startswith(out + os.sep):
        paused.append(dst)
        open(os.environ["DBN_TEST_MARK"], "w").close()
        deadline = time.time() + 300
        while not os.path.exists(os.environ["DBN_TEST_GO"]) and time.time() < deadline:
            time.sleep(0.05)
    return real(src, dst, *a, **k)
os.replace = replace
from analysis.report import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """A copy of the legacy 4-trial study."""
    shutil.copytree(LEGACY, tmp_path / "study")
    return tmp_path / "study"


def _wait_for(cond, timeout: float = 180, what: str = "") -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _one_line(stderr: str, prefix: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr[-3000:]
    return lines[0]


@pytest.mark.timeout(300)
def test_a_rebuild_while_a_sweep_holds_the_lock_refuses_and_deletes_nothing(study: Path) -> None:
    """analysis.report on a space without Parquet rebuilds it from MLflow. While another process holds the
    space's lock (a sweep that has not finished a trial yet) it must not: it used to write an old snapshot
    and delete the part files it listed, the sweep's new ones among them. Now: exit 2, one line naming the
    holder, nothing written; the holder's part file, written afterwards, stays."""
    shutil.rmtree(study / "results" / "smoke")  # MLflow holds the space; its Parquet is not there (yet)
    holder = subprocess.Popen([PY, "-c", _HOLDER], cwd=study, env=_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _tree(study)
        out = subprocess.run([PY, *REPORT], cwd=study, env=_env(), capture_output=True, text=True, timeout=240)
        assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
        line = _one_line(out.stderr, "analysis.report: error: ")
        assert "a sweep of this space is running" in line and f"pid {holder.pid}" in line, line
        assert "nothing was rebuilt" in line and ".sweep.lock" in line, line
        assert _tree(study) == before, "the refused rebuild wrote or deleted something"
        assert not (study / "reports").exists()
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "written"
    finally:
        rc = _finish(holder, 120)
    assert rc == 0
    from search.store import read_space

    trials = read_space(str(study / "results"), "smoke")[0]
    assert trials.column("run_id").to_pylist() == ["new-run"]  # the holder's result is there, once


@pytest.mark.timeout(600)
def test_a_sweep_started_while_a_rebuild_runs_is_refused_and_the_rebuild_completes(study: Path) -> None:
    """The other order: a rebuild holds the lock through its MLflow read (paused there); a sweep of the same
    space started meanwhile exits 2 with one line saying the results are being rebuilt, and writes nothing.
    The rebuild then completes: every finished run of MLflow is in Parquet once, and the report is written."""
    shutil.rmtree(study / "results" / "smoke")
    go = study.parent / "go"
    env = _env(DBN_TEST_GO=str(go))
    report = subprocess.Popen([PY, "-c", _SLOW_MLFLOW, *REPORT[2:]], cwd=study, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lock = study / "results" / "smoke" / ".sweep.lock"
        _wait_for(lambda: lock.exists() and lock.read_text().endswith("rebuild") or report.poll() is not None,
                  what="the rebuild to take the lock")
        assert report.poll() is None, report.communicate()
        assert lock.read_text() == f"{report.pid} rebuild"
        runs = sorted(r.info.run_id for r in _runs(study))
        before = _tree(study)
        sweep = subprocess.run([PY, "-m", "search.run", *KILL_ARGS], cwd=study, env=_env(), capture_output=True,
                               text=True, timeout=400)
        assert sweep.returncode == 2, (sweep.returncode, sweep.stdout[-2000:], sweep.stderr[-2000:])
        line = _one_line(sweep.stderr, "error: ")
        assert "this space's results are being rebuilt from MLflow" in line and f"pid {report.pid}" in line, line
        assert "nothing was written" in line, line
        assert _tree(study) == before and not (study / "results" / "smoke" / "trials").exists()
        go.touch()
        out, err = report.communicate(timeout=300)
    finally:
        go.touch()
        _finish(report, 60)
    assert report.returncode == 0, (out[-2000:], err[-2000:])
    assert sorted(r.info.run_id for r in _runs(study)) == runs  # the refused sweep trained nothing
    from search.store import read_space

    trials = read_space(str(study / "results"), "smoke")[0]
    assert sorted(trials.column("run_id").to_pylist()) == runs and len(runs) == 4
    assert (study / "reports" / "report.md").exists()


# Writes a trial and compacts, again and again, as sweeps and their end-of-sweep compaction do.
_COMPACTOR = r'''
import sys
sys.path.insert(0, sys.argv[3])
from test_store import _write
from search.store import ResultStore
store = ResultStore(sys.argv[1], "s")
for i in range(int(sys.argv[2])):
    _write(store, f"c{i:03d}", 0.5, width=1 + i)  # configurations of their own: replicates are not merged
    _write(store, f"d{i:03d}", 0.6, width=500 + i)
    store.compact()
    print(i, flush=True)
'''


@pytest.mark.timeout(300)
def test_a_reader_during_compaction_never_calls_it_damage(tmp_path: Path) -> None:
    """A reader lists the part files, a compaction publishes its file and deletes them, the reader opens what
    it listed: it used to say 'a part file is not readable Parquet' (damaged) and the report exited 2. Now a
    file that vanished is listed again: every read succeeds and sees every trial written before it started."""
    from search.store import read_space

    rounds = 40
    proc = subprocess.Popen([PY, "-c", _COMPACTOR, str(tmp_path), str(rounds), str(ROOT / "tests")], cwd=tmp_path,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    reads, seen = 0, set()
    try:
        while proc.poll() is None:
            if not (tmp_path / "s" / "trials").exists():
                time.sleep(0.01)
                continue
            ids = set(read_space(str(tmp_path), "s")[0].column("run_id").to_pylist())  # raises if it thinks damage
            assert seen <= ids, f"a read lost trials an earlier read saw: {sorted(seen - ids)}"
            seen, reads = ids, reads + 1
        out, err = proc.communicate()
    finally:
        _finish(proc, 60)
    assert proc.returncode == 0, err[-2000:]
    assert reads >= 5, f"only {reads} reads overlapped the compactions"
    final = read_space(str(tmp_path), "s")[0]
    assert final.num_rows == 2 * rounds
    assert len(os.listdir(tmp_path / "s" / "trials")) == 1  # compacted


def test_a_listing_made_stale_by_a_compaction_is_read_again(tmp_path: Path) -> None:
    """The same race, made deterministic: the listing is taken, the compaction runs, then the read."""
    from test_store import _write

    from search.schema import TRIALS_SCHEMA
    from search.store import ResultStore, list_parts, read_parts, resolve_fs

    store = ResultStore(str(tmp_path), "s")
    for i in range(3):
        _write(store, f"r{i}", 0.5)
    fs, _ = resolve_fs(str(tmp_path))
    parts = list_parts(fs, store.path("trials"))
    assert len(parts) == 3
    store.compact()
    table = read_parts(fs, parts, TRIALS_SCHEMA)
    assert sorted(table.column("run_id").to_pylist()) == ["r0", "r1", "r2"]
    assert [os.path.basename(p) for p, _ in parts] == os.listdir(store.path("trials"))  # updated in place
    # A file that is there and is not Parquet is still damage, named.
    (Path(store.path("trials")) / "part-x.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    with pytest.raises(ValueError, match="not readable Parquet"):
        read_parts(fs, list_parts(fs, store.path("trials")), TRIALS_SCHEMA)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("figures", [False, True], ids=["tables", "figures"])
def test_two_reports_into_one_out_folder_both_succeed(study: Path, figures: bool) -> None:
    """Report A is paused at its first rename into --out; report B writes the same files meanwhile and ends;
    then A goes on. With one temporary name per file, B used to rename A's half of it away (A: exit 2).
    Now both exit 0, the files are whole, and no temporary file is left."""
    out_dir, go, mark = study / "reports", study.parent / "go", study.parent / "paused"
    args = ["--space", "smoke", "--root", "results", "--out", str(out_dir)] + ([] if figures else ["--no-figures"])
    env = _env(DBN_TEST_OUT=str(out_dir), DBN_TEST_GO=str(go), DBN_TEST_MARK=str(mark))
    a = subprocess.Popen([PY, "-c", _PAUSED_REPORT, *args], cwd=study, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: mark.exists() or a.poll() is not None, timeout=240, what="report A to pause")
        assert a.poll() is None, a.communicate()
        b = subprocess.run([PY, "-m", "analysis.report", *args], cwd=study, env=_env(), capture_output=True,
                           text=True, timeout=300)
        go.touch()
        a_out, a_err = a.communicate(timeout=300)
    finally:
        go.touch()
        _finish(a, 60)
    assert b.returncode == 0, b.stderr[-2000:]
    assert a.returncode == 0, a_err[-2000:]
    left = [str(p) for p in out_dir.rglob("*") if p.name.endswith(".tmp")]
    assert not left, left
    md = (out_dir / "report.md").read_text(encoding="utf-8")
    assert "smoke" in md and (out_dir / "report.tex").read_text(encoding="utf-8").strip()
    if figures:
        pngs = sorted(out_dir.joinpath("figures").glob("*.png"))
        assert pngs and all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)


@pytest.mark.timeout(600)
def test_two_sweeps_on_one_tracking_server_do_not_both_write(tmp_path: Path) -> None:
    """Two drivers of one space on one http tracking server, each with its own --storage, at once (issue 30: an
    http store took no lock, so both trained and wrote the same experiment). The lock is the server's identity
    and the space: the second driver, given the same server spelled `http://localhost:PORT/`, exits 2 with one
    line naming the server and the first driver's pid, and writes nothing (its working directory stays empty);
    the first one finishes, its 4 trials in MLflow and Parquet once each; the lock is free afterwards."""
    import fcntl
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from _mlflow_server import mlflow_server
    from _sweeps import N_KILL_TRIALS, _popen
    from mlflow.tracking import MlflowClient

    (tmp_path / "srv").mkdir()
    a_dir, b_dir, locks = tmp_path / "a", tmp_path / "b", tmp_path / "locks"
    a_dir.mkdir()
    b_dir.mkdir()
    env = _env(DBN_LOCK_DIR=str(locks))
    with mlflow_server(tmp_path / "srv") as url:
        port = url.rsplit(":", 1)[1]
        a = _popen(a_dir, [*KILL_ARGS, "--tracking-uri", url], env, tmp_path / "a.log")
        try:
            held = lambda: [p for p in locks.glob("mlflow-*.smoke.lock") if p.read_text() == f"{a.pid} sweep"]  # noqa: E731
            _wait_for(lambda: held() or a.poll() is not None, timeout=300, what="sweep A to take the server's lock")
            assert a.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
            b = subprocess.run([PY, "-m", "search.run", *KILL_ARGS, "--tracking-uri", f"http://localhost:{port}/"],
                               cwd=b_dir, env=env, capture_output=True, text=True, timeout=400)
            assert b.returncode == 2, (b.returncode, b.stdout[-2000:], b.stderr[-2000:])
            line = _one_line(b.stderr, "error: ")
            assert (f"another sweep of this space is running against the tracking server http://localhost:{port}/"
                    in line and f"pid {a.pid}" in line and "then use --resume" in line), line
            assert list(b_dir.iterdir()) == []  # nothing written: no results/, no logs, no lock beside it
            rc = _finish(a, 400)
        finally:
            _finish(a, 60)
        assert rc == 0, (tmp_path / "a.log").read_text()[-3000:]
        client = MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name("smoke")
        trials = client.search_runs([exp.experiment_id], filter_string="tags.config_hash LIKE '%'")
        assert len(trials) == N_KILL_TRIALS and {r.info.status for r in trials} == {"FINISHED"}
        assert len({r.data.tags["config_hash"] for r in trials}) == N_KILL_TRIALS  # each trained once
    from search.store import read_space

    rows = read_space(str(a_dir / "results"), "smoke")[0]
    assert sorted(rows.column("run_id").to_pylist()) == sorted(r.info.run_id for r in trials)
    (lock,) = locks.glob("mlflow-*.smoke.lock")
    with open(lock) as fh:  # released with its driver: the next sweep may take it
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_tracking_servers_lock_is_keyed_by_its_normalized_uri_and_space(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One server spelled several ways is one lock per space; another host, port, path or space is another; a
    lock folder others can write is refused (they could hold or fake any sweep's lock)."""
    from search.lock import SweepLock, lock_paths, tracking_identity

    same = ["http://127.0.0.1:5000", "http://LOCALHOST:5000/", "http://user:pw@localhost:5000//?x=1#y",
            "http://[::1]:5000/"]
    assert {tracking_identity(u) for u in same} == {"http://localhost:5000/"}
    assert tracking_identity("https://MLflow.Example.org/team/") == "https://mlflow.example.org:443/team"
    assert tracking_identity("http://example.org") == "http://example.org:80/"
    assert tracking_identity("sqlite:///mlflow.db") is None
    monkeypatch.setenv("DBN_LOCK_DIR", str(tmp_path / "locks"))
    server = lambda uri, space="smoke": lock_paths(str(tmp_path / "r"), space, uri)[0]  # noqa: E731
    assert {server(u) for u in same} == {server(same[0])}
    for other in ("http://localhost:5001", "http://example.org:5000", "http://localhost:5000/team"):
        assert server(other) != server(same[0])
    assert server(same[0], "other") != server(same[0])
    import search.lock

    with SweepLock(str(tmp_path / "r1"), "smoke", same[0]):  # a second --storage, the same server: refused
        held, search.lock._HELD = search.lock._HELD, {}  # as another process would: it does not hold the lock
        try:
            with pytest.raises(OSError, match=r"^another sweep of this space is running against the tracking server "
                                              r"http://localhost:5000/ \(lock .*mlflow-localhost-5000-\w+\.smoke\."
                                              rf"lock, pid {os.getpid()}\)"):
                SweepLock(str(tmp_path / "r2"), "smoke", same[1]).__enter__()
        finally:
            search.lock._HELD = held
    assert not (tmp_path / "r2").exists()  # refused before its --storage was touched
    (tmp_path / "locks").chmod(0o777)
    with pytest.raises(OSError, match=r"the lock folder .* mode 777: only this user .* may write there; set "
                                      r"DBN_LOCK_DIR"):
        SweepLock(str(tmp_path / "r3"), "smoke", same[0]).__enter__()
    assert not (tmp_path / "r3").exists()
