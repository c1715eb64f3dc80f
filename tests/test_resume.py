"""A driver killed with SIGKILL mid-sweep: --resume finishes it without retraining or losing anything."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ARGS = ["--space", "smoke", "--set", "train_samples=128", "--set", "epochs=2", "--num-cpus", "2", "--quiet"]


def _runs(cwd: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    return client.search_runs([exp.experiment_id], max_results=1000)


def _parts(cwd: Path) -> int:
    folder = cwd / "results" / "smoke" / "trials"
    return len(list(folder.glob("part-*.parquet"))) if folder.exists() else 0


def test_resume_after_sigkill(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "search.run", *ARGS], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while _parts(tmp_path) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, no clean-up
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = {r.info.run_id: r for r in _runs(tmp_path)}
    done_before = {r.info.run_id for r in before.values() if r.info.status == "FINISHED"}
    assert 1 <= len(done_before) < 10

    out = subprocess.run([sys.executable, "-m", "search.run", *ARGS, "--resume"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=420)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    runs = _runs(tmp_path)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    ok = [r for r in runs if r.info.status == "FINISHED" and r.data.tags["status"] == "ok"]
    hashes = [r.data.tags["config_hash"] for r in ok]
    assert len(hashes) == len(set(hashes)) == 10  # every trial finished exactly once
    assert done_before <= {r.info.run_id for r in ok}  # finished trials were reused, not retrained
    trials = ds.dataset(str(tmp_path / "results" / "smoke" / "trials"), format="parquet").to_table()
    assert sorted(trials.column("config_hash").to_pylist()) == sorted(hashes)
    assert set(trials.column("run_id").to_pylist()) == {r.info.run_id for r in ok}
    layers = ds.dataset(str(tmp_path / "results" / "smoke" / "layers"), format="parquet").to_table()
    assert set(layers.column("run_id").to_pylist()) == {r.info.run_id for r in ok}
    assert layers.num_rows == 7 * 10
