"""Results written before the registry change (tests/data/legacy_smoke: a 4-trial smoke sweep's mlflow.db and
Parquet, made by the code of commit ac4b5f3) still load, report, and are reused by --resume."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from search.config import TrialConfig

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "data" / "legacy_smoke"
# The legacy sweep: `--space smoke --set dropout_type=bernoulli --set train_samples=64` (4 trials).
ARGS = ["--space", "smoke", "--set", "dropout_type=bernoulli", "--set", "train_samples=64", "--num-cpus", "2",
        "--quiet"]


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    shutil.copytree(LEGACY, tmp_path / "study")
    return tmp_path / "study"


def test_legacy_results_load_with_the_hashes_todays_code_computes(legacy: Path) -> None:
    from analysis.load import load_study

    study = load_study("smoke", root=str(legacy / "results"))
    assert study.trials.num_rows == 4 and set(study.trials.column("status").to_pylist()) == {"ok"}
    assert study.layers.num_rows == 4 * 7  # WRN-10: 7 BN layers per trial
    rows = study.trials.to_pylist()
    for r in rows:  # every stored hash is what today's TrialConfig computes from the stored config
        cfg = TrialConfig.from_dict({k: r[k] for k in TrialConfig.field_names() if k in r and r[k] is not None
                                     or k == "depth"})
        assert cfg.config_hash == r["config_hash"]


def test_legacy_results_report(legacy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from analysis.report import main

    monkeypatch.chdir(legacy)
    assert main(["--space", "smoke", "--out", str(legacy / "reports")]) == 0
    md = (legacy / "reports" / "smoke" / "report.md")
    md = md if md.exists() else next((legacy / "reports").rglob("report.md"))
    text = md.read_text(encoding="utf-8")
    assert "smoke" in text
    # The old store predates the mechanism probe: its sections say which columns are missing.
    assert "predate the mechanism probe (columns missing: c_in, v_in, d_cos2, rho, shift_frozen" in text
    assert "## The mechanism: three predictions vs the measurement" in text and "columns missing:" in text.split("## The mechanism")[1]
    assert "## The noise floor" in text


@pytest.mark.slow
def test_legacy_store_is_resumed_without_training_again(legacy: Path) -> None:
    """--resume against the old mlflow.db: the four finished trials are found by hash and reused (the old runs
    carry no code version, so `--reuse any` says to take them as they are)."""
    env = {"PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "search.run", *ARGS, "--resume", "--reuse", "any"], cwd=legacy,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "4 of 4" in text or "nothing to run" in text.lower() or "already finished" in text.lower(), text[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{legacy / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id], "tags.config_hash != ''")
    assert len(runs) == 4  # nothing trained again
