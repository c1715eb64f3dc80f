"""benchmarks/control_plane.py at its smallest size (100 synthetic trials through the real search.run path).

A smoke test of the benchmark's shape only: it runs end to end (sweep, --resume that finds everything
finished, rebuild from MLflow, analysis.report) and prints its table; no timing is asserted (the figures
are in docs/performance.md). What is asserted is what the path must have done: one MLflow run per trial
plus the sweep's parent, every trial's rows in Parquet, artifacts per run.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_control_plane_smallest_size_prints_its_table(tmp_path: Path) -> None:
    out_json = tmp_path / "cp.json"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "control_plane.py"), "--sizes", "100",
                          "--json", str(out_json)], capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (r,) = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert r["size"] == 100 and r["backend"] == "sqlite"
    rows = r["rows_per_trial"]
    assert rows["runs"] == pytest.approx(1.01)  # 100 trial runs and the sweep's parent run
    assert rows["params"] >= 15 and rows["tags"] >= 15 and rows["latest_metrics"] >= 20
    assert rows["metrics"] >= 10 * 8  # 10 epochs of series, each step a row
    for key in ("command_s", "phase_s", "ms_per_trial", "driver_peak_mib", "artifact_bytes_per_trial",
                "parquet_bytes_per_trial", "resume_s", "rebuild_s", "report_s", "report_peak_mib"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    lines = out.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| trials |"))
    cells = [c.strip() for c in lines[head + 2].strip("|").split("|")]
    assert cells[0] == "100" and len(cells) == len(lines[head].strip("|").split("|"))
    assert any("resume" in line and "100 trials" in line for line in lines)  # the per-step lines
