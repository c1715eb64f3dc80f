"""Tracker against a real sqlite MLflow store: what counts as finished, and the store's creation."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from search.config import TrialConfig  # noqa: E402
from search.results import TrialResult  # noqa: E402
from search.sweep.tracking import Tracker  # noqa: E402


def _run(tracker: Tracker, seed: int, algo: str, status: str = "ok") -> str:
    cfg = TrialConfig(seed=seed)
    run_id = tracker.start(cfg, algo=algo)
    tracker.finish(run_id, cfg, TrialResult(status=status, test_acc=0.5, epochs_completed=1))
    return cfg.config_hash


def test_finished_filters_by_algo_and_profile(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    grid = Tracker(uri, "smoke", "quick", str(tmp_path / "results"))
    g = [_run(grid, 0, "grid"), _run(grid, 1, "grid")]
    failed = _run(grid, 2, "optuna", status="failed")
    o = _run(grid, 3, "optuna")
    other = Tracker(uri, "smoke", "paper", str(tmp_path / "results"))
    p = _run(other, 4, "optuna")

    assert set(grid.finished()) == {*g, o, p}  # a failed trial is not a result
    assert failed not in grid.finished()
    # The Optuna budget of profile quick counts its own sample only (the driver's --resume arithmetic).
    assert set(grid.finished("optuna", "quick")) == {o}
    assert set(grid.finished("optuna")) == {o, p}
    assert set(grid.finished(profile="paper")) == {p}


def test_new_sqlite_store_is_published_whole(tmp_path: Path) -> None:
    """The store is migrated under a temporary name and linked into place: no temporaries remain."""
    db = tmp_path / "mlflow.db"
    dead = tmp_path / ".mlflow.db.init-999999999-abcdef"  # left by a creator that was killed (no such pid)
    dead.write_bytes(b"half")
    Tracker(f"sqlite:///{db}", "smoke", "quick", str(tmp_path / "results"))
    tables = {t for (t,) in sqlite3.connect(db).execute("select name from sqlite_master where type='table'")}
    assert {"alembic_version", "runs", "experiments"} <= tables
    assert not any(t.startswith("_alembic_tmp_") for t in tables)
    assert [f for f in os.listdir(tmp_path) if ".init-" in f or f.endswith("-journal")] == []


def test_part_files_are_compacted_as_the_sweep_goes(tmp_path: Path) -> None:
    """Every `compact_every` finished trials the Parquet part files are folded: a 10,000-trial sweep never
    leaves 20,000 small files for one compaction at its end (benchmarks/control_plane.py)."""
    t = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "smoke", "quick", str(tmp_path / "results"))
    t.compact_every = 3
    hashes = [_run(t, seed, "grid") for seed in range(7)]
    files = sorted(p.name for p in (tmp_path / "results" / "smoke" / "trials").iterdir())
    # 7 = 3 + 3 + 1: compacted after the 3rd and the 6th trial into one file, then the 7th trial's own part
    assert len(files) == 2 and sum(f.startswith("part-compact-") for f in files) == 1, files
    trials = t.store.read_deduped()[0]
    assert sorted(trials.column("config_hash").to_pylist()) == sorted(hashes)  # nothing lost, nothing twice


@pytest.mark.parametrize("changes, want", [
    ({}, "none-w1-s0-cifar_wrn-d10"),
    (dict(dropout_placement="pre_conv", dropout_rate=0.2), "pre_conv-bernoulli-0.2-w1-s0-cifar_wrn-d10"),
    (dict(dropout_placement="pre_conv", dropout_rate=0.2, dropout_schedule="early", dropout_cutoff=2.0),
     "pre_conv-bernoulli-0.2-early2-w1-s0-cifar_wrn-d10"),
    (dict(dropout_placement="pre_conv", dropout_rate=0.2, dropout_schedule="early", dropout_cutoff=2.0,
          dropout_decay="linear"), "pre_conv-bernoulli-0.2-early2-linear-w1-s0-cifar_wrn-d10"),
    (dict(dropout_placement="pre_conv", dropout_rate=0.2, dropout_schedule="late", dropout_cutoff=2.5),
     "pre_conv-bernoulli-0.2-late2.5-w1-s0-cifar_wrn-d10"),
    (dict(normalization="groupnorm", norm_groups=8), "none-groupnorm8-w1-s0-cifar_wrn-d10"),
    (dict(dropout_placement="pre_conv", dropout_type="dropblock", dropout_rate=0.1, dropout_block_size=3),
     "pre_conv-dropblock-0.1-b3-w1-s0-cifar_wrn-d10"),
])
def test_run_names_tell_every_setting_apart(changes: dict, want: str) -> None:
    """The live display and MLflow's name column: early dropout never reads as dropout for the whole run."""
    from search.config import TrialConfig
    from search.sweep.tracking import run_name

    assert run_name(TrialConfig(backbone="cifar_wrn", depth=10, epochs=6, **changes)) == want
