"""Storage that is unwritable, full before the sweep, or filling up during it: one clear line, exit 2,
nothing written (or, mid-sweep, nothing finished lost). docs/reliability.md has the table.
"""
from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from _procs import reap
from _sweeps import (BN_LAYERS, KILL_ARGS, N_KILL_TRIALS, PY, SPACE, _env, _finish, _sweep, _runs, _dataset, _one_error_line,
                     _tree)

pytestmark = [pytest.mark.slow]


def _mount_tmpfs(path: Path, size: str, readonly: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip() or out.returncode})")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _refused_before_training(cwd: Path, args: list[str], env: dict[str, str] | None = None,
                             watch: tuple[Path, ...] = ()) -> str:
    """Run the CLI; it must exit 2 with one line on stderr and write nothing (cwd and `watch` unchanged)."""
    before = {p: _tree(p) for p in (cwd, *watch)}
    out = subprocess.run([PY, "-m", "search.run", *args], cwd=cwd, env=env or _env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, (out.returncode, out.stdout[-1500:], out.stderr[-1500:])
    line = _one_error_line(out.stderr)
    assert "Traceback" not in out.stderr
    assert {p: _tree(p) for p in (cwd, *watch)} == before, "something was written"
    return line


SMALL = ["--space", SPACE, "--set", "epochs=1", "--set", "train_samples=64", "--num-cpus", "2", "--quiet"]


@pytest.mark.timeout(120)
def test_storage_below_a_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    line = _refused_before_training(cwd, [*SMALL, "--storage", str(tmp_path / "file.txt" / "sub")], watch=(tmp_path,))
    assert "--storage" in line and "is a file, not a directory" in line


@pytest.mark.timeout(120)
def test_unwritable_storage_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "ro"
    if os.geteuid() == 0:  # permissions do not bind root: a read-only mount does
        _mount_tmpfs(target, "300m", readonly=True)
    else:
        target.mkdir()
        target.chmod(0o500)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    try:
        line = _refused_before_training(cwd, [*SMALL, "--storage", str(target / "results")])
        assert "--storage" in line and "not writable" in line
    finally:
        if os.geteuid() == 0:
            _umount(target)
        else:
            target.chmod(0o700)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("what", ["storage", "tracking"])
def test_full_disk_is_refused_before_training(tmp_path: Path, what: str) -> None:
    full = tmp_path / "full"
    _mount_tmpfs(full, "1m")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    try:
        extra = (["--storage", str(full / "results")] if what == "storage"
                 else ["--tracking-uri", f"sqlite:///{full / 'mlflow.db'}"])
        line = _refused_before_training(cwd, [*SMALL, *extra], watch=(full,))
        assert "MiB free" in line and "need at least 200 MiB" in line
    finally:
        _umount(full)


@pytest.mark.timeout(120)
def test_min_free_bytes_can_be_raised_from_the_environment(tmp_path: Path) -> None:
    """Where no tmpfs can be mounted (CI without root), a full disk is simulated by asking for more free
    space than any disk has: DBN_MIN_FREE_BYTES (proposed; search.sweep.preflight.MIN_FREE_BYTES has no knob)."""
    env = _env(DBN_MIN_FREE_BYTES=str(2**60))
    proc = subprocess.Popen([PY, "-m", "search.run", *SMALL], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 90
    while proc.poll() is None and not (tmp_path / "mlflow.db").exists() and time.time() < deadline:
        time.sleep(0.1)
    started = proc.poll() is None
    if started:
        os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    reap(proc.pid)
    assert not started, "DBN_MIN_FREE_BYTES is ignored: the sweep started"
    assert proc.returncode == 2 and "MiB free" in err, err[-1500:]


@dataclass
class DiskFull:
    cwd: Path
    rc: int
    log: str
    err: str
    resume_rc: int
    resume_log: str


@pytest.fixture(scope="module")
def disk_fills(tmp_path_factory: pytest.TempPathFactory):
    """Storage and MLflow store on a 256 MiB tmpfs that fills up once the first trial has started."""
    mnt = tmp_path_factory.mktemp("diskfull") / "mnt"
    _mount_tmpfs(mnt, "256m")
    try:
        cwd = mnt / "work"
        cwd.mkdir()
        proc = subprocess.Popen([PY, "-m", "search.run", *KILL_ARGS], cwd=cwd, env=_env(),
                                stdout=open(mnt.parent / "out.log", "w"), stderr=open(mnt.parent / "err.log", "w"),
                                start_new_session=True)
        deadline = time.time() + 200
        while proc.poll() is None and time.time() < deadline:  # until the first run exists
            try:
                con = sqlite3.connect(f"file:{cwd / 'mlflow.db'}?mode=ro", uri=True)
                if con.execute("select count(*) from runs").fetchone()[0]:
                    break
            except sqlite3.Error:
                pass
            time.sleep(0.1)
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 2**16)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        rc = _finish(proc, 300)
        (mnt / "filler").unlink()
        resume_rc, resume_log = _sweep(cwd, KILL_ARGS + ["--resume"], log="resume.log")
        yield DiskFull(cwd, rc, (mnt.parent / "out.log").read_text(), (mnt.parent / "err.log").read_text(),
                       resume_rc, resume_log)
    finally:
        _umount(mnt)


@pytest.mark.timeout(700)
def test_disk_full_mid_sweep_is_one_clear_line(disk_fills: DiskFull) -> None:
    d = disk_fills
    # MLflow's and Tune's loggers may print what they caught on the way; the driver's last word must be
    # one line saying what happened and what to do, with the code of a failure during the sweep (3; 2 is
    # bad input found before anything ran).
    last = [ln for ln in d.err.strip().splitlines() if ln.strip()][-1]
    assert d.rc == 3 and last.startswith("error: "), f"rc {d.rc}, last line of stderr: {last!r}"
    assert ("No space left" in last or "disk is full" in last) and "--resume" in last, last


@pytest.mark.timeout(700)
def test_resume_after_freeing_space_completes_the_sweep(disk_fills: DiskFull) -> None:
    d = disk_fills
    assert d.resume_rc == 0, d.resume_log[-3000:]
    runs = _runs(d.cwd)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    ok = [r.data.tags["config_hash"] for r in runs if r.info.status == "FINISHED" and r.data.tags["status"] == "ok"]
    assert len(ok) == len(set(ok)) == N_KILL_TRIALS
    trials = _dataset(d.cwd / "results", "trials")
    assert sorted(trials.column("config_hash").to_pylist()) == sorted(ok)


def test_damaged_part_file_is_set_aside_and_rebuilt_from_mlflow(tmp_path: Path) -> None:
    """A truncated part file (the compacted one: every row of the space) would make every later read fail.
    The next sweep moves it to <space>/damaged/, rebuilds the datasets from MLflow, says so in one line,
    and trains nothing again."""
    rc, log = _sweep(tmp_path, KILL_ARGS)
    assert rc == 0, log[-2000:]
    before = _dataset(tmp_path / "results", "trials")
    assert before.num_rows == N_KILL_TRIALS
    (part,) = sorted((tmp_path / "results" / SPACE / "trials").glob("*.parquet"))
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])  # truncated: no footer
    runs_before = {r.info.run_id for r in _runs(tmp_path)}
    rc, log = _sweep(tmp_path, KILL_ARGS, log="second.log")
    assert rc == 0, log[-2000:]
    lines = [ln for ln in log.splitlines() if "damaged part file" in ln]
    assert len(lines) == 1 and "set aside in" in lines[0] and f"rebuilt from MLflow ({N_KILL_TRIALS} trial rows)" in lines[0], log
    assert (tmp_path / "results" / SPACE / "damaged" / f"trials-{part.name}").read_bytes() == data[: len(data) // 2]
    after = _dataset(tmp_path / "results", "trials")
    assert sorted(after.column("run_id").to_pylist()) == sorted(before.column("run_id").to_pylist())
    assert {r.info.run_id for r in _runs(tmp_path)} == runs_before  # nothing trained again
    assert _dataset(tmp_path / "results", "layers").num_rows == before.num_rows * BN_LAYERS
