"""Parquet result store: part files read back, de-duplication, compaction, stale-run removal."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow.parquet as pq

from search.config import TrialConfig
from search.results import LayerShift, TrialResult
from search.schema import LAYERS_SCHEMA, TRIALS_SCHEMA, layer_rows, trial_row
from search.store import ResultStore


def _write(store: ResultStore, run_id: str, acc: float, width: float = 1.0) -> None:
    cfg = TrialConfig(width=width)
    layers = [LayerShift(f"bn{i}", i, i / 2, 16, 144, i == 1, 1.0, 1.2, 1.2, 1.25) for i in range(3)]
    res = TrialResult(test_acc=acc, layers=layers)
    now = dt.datetime.now(dt.timezone.utc)
    store.write_trial(trial_row(cfg, res, run_id=run_id, space="s", profile="quick", finished_at=now),
                      layer_rows(cfg, layers, run_id=run_id, space="s"))


def test_write_read_compact_and_drop(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path), "s")
    _write(store, "r1", 0.5)
    _write(store, "r2", 0.7, width=2)
    _write(store, "r2", 0.8, width=2)  # the same run written twice (a retried write)
    trials = store.read("trials")
    assert trials.schema == TRIALS_SCHEMA and trials.num_rows == 3
    assert store.read("layers").num_rows == 9
    store.compact()
    files = sorted(p.name for p in (tmp_path / "s" / "trials").iterdir())
    assert len(files) == 1 and not any(n.startswith(".") for n in files)
    t = pq.read_table(tmp_path / "s" / "trials" / files[0])
    assert sorted(t.column("run_id").to_pylist()) == ["r1", "r2"]
    assert dict(zip(t.column("run_id").to_pylist(), t.column("test_acc").to_pylist()))["r2"] == 0.8  # last wins
    layers = store.read("layers")
    assert layers.schema == LAYERS_SCHEMA and layers.num_rows == 6
    _write(store, "r3", 0.9)
    store.drop_runs({"r3"})
    assert "r3" not in store.read("trials").column("run_id").to_pylist()


def test_empty_store_reads_empty_tables(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "nothing"), "s")
    assert store.read("trials").num_rows == 0 and store.read("layers").num_rows == 0
    store.compact()  # nothing to do, creates nothing
    assert not (tmp_path / "nothing").exists()
