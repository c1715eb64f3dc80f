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


def test_replacement_writes_layers_piecewise_and_swaps_only_when_finished(tmp_path: Path) -> None:
    """A rebuild's new datasets: layer rows in bounded part files, the old parts gone only once all is written."""
    import pytest

    store = ResultStore(str(tmp_path), "s")
    _write(store, "old", 0.5)
    new = ResultStore(str(tmp_path / "src"), "s")
    for i in range(5):
        _write(new, f"r{i}", 0.1 * i)
    trials, layers = new.read("trials"), new.read("layers")  # 5 trials, 15 layer rows
    with pytest.raises(RuntimeError):
        with store.replacing(rows_per_file=4) as r:
            r.add_layers(layers.slice(0, 9))
            raise RuntimeError("MLflow went away mid-rebuild")
    assert store.read("trials").column("run_id").to_pylist() == ["old"]  # untouched, no new piece left
    assert not any(p.name.startswith("part-rebuild-") for p in (tmp_path / "s" / "layers").iterdir())
    with store.replacing(rows_per_file=4) as r:
        for k in range(5):
            r.add_layers(layers.slice(3 * k, 3))  # one trial's 3 layer rows at a time
        r.finish(trials)
    parts = sorted(p.name for p in (tmp_path / "s" / "layers").iterdir())
    assert len(parts) == 3 and all(p.startswith("part-rebuild-") for p in parts)  # 6 + 6 + 3 rows
    assert [pq.read_table(tmp_path / "s" / "layers" / p).num_rows for p in parts] == [6, 6, 3]
    assert sorted(store.read("trials").column("run_id").to_pylist()) == [f"r{i}" for i in range(5)]
    assert store.read("layers").num_rows == 15
