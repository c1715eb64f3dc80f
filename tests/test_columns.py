"""Column metadata declared once (issues 21, 25): the result dataclasses' `column_meta` reaches the Parquet files the
store writes (field descriptions and units, the code version that wrote the file), the MLflow layer table view,
analysis' MECHANISM_COLUMNS and docs/columns.md; a per-layer metric declared once at test time reaches them too."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from search.code_version import code_version
from search.config import TrialConfig
from search.results import LayerShift, TrialResult, column_info, column_meta, column_names
from search.schema import (LAYERS_SCHEMA, OPTIONAL_LAYER_COLUMNS, TRIALS_SCHEMA, layer_rows, layers_schema, main,
                           markdown, trial_row, with_writer)
from search.store import ResultStore
from search.sweep.artifacts import layers_table

ROOT = Path(__file__).resolve().parents[1]


def _layers(n: int = 3) -> list[LayerShift]:
    return [LayerShift(f"bn{i}", i, i / 2, 16, 144, i == 1, 1.0, 1.2, 1.2, 1.25, c_in=0.1, rho=0.3)
            for i in range(n)]


def _write(store: ResultStore, run_id: str, acc: float = 0.5) -> None:
    cfg = TrialConfig()
    layers = _layers()
    res = TrialResult(test_acc=acc, layers=layers, n_test=100, d_cos2_init=2.0,
                      history=[{"epoch": 1.0, "d_cos2": 2.5, "d_cos2_all": 3.0}])
    now = dt.datetime.now(dt.timezone.utc)
    store.write_trial(trial_row(cfg, res, run_id=run_id, space="s", profile="quick", finished_at=now),
                      layer_rows(cfg, layers, run_id=run_id, space="s"))


def _meta(f: pa.Field) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (f.metadata or {}).items()}


def test_every_result_field_is_declared() -> None:
    for cls in (TrialResult, LayerShift):
        for f in dataclasses.fields(cls):
            m = column_info(cls, f.name)
            assert m["description"].strip() and isinstance(m["unit"], str) and m["group"], (cls.__name__, f.name)
            assert m["table"] is False or cls is LayerShift, f.name  # only the layer records have a table view
    assert set(TrialResult.SERIES_META) == set(TrialResult.SERIES_KEYS)
    # The conventions a reader needs, stated where they are declared.
    assert column_info(TrialResult, "test_acc")["unit"] == "fraction" and "[0, 1]" in column_info(
        TrialResult, "test_acc")["description"]
    assert column_info(TrialResult, "throughput")["unit"] == "images/s"
    assert column_info(TrialResult, "wall_time_s")["unit"] == "s" and column_info(TrialResult, "n_probe")["unit"] \
        == "images"
    shift = column_info(LayerShift, "shift")["description"]
    assert ">= 1" in shift and "direction" in shift and "max(real_var / moving_var, moving_var / real_var)" in shift


def test_files_the_store_writes_describe_every_column(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path), "s")
    _write(store, "r1")
    _write(store, "r2", 0.7)
    for name, schema in (("trials", TRIALS_SCHEMA), ("layers", LAYERS_SCHEMA)):
        files = sorted((tmp_path / "s" / name).glob("part-*.parquet"))
        assert len(files) == 2
        got = pq.read_schema(files[0])  # what a pyarrow (or DuckDB) user reads, from the file alone
        assert got.names == schema.names
        for f in got:
            m = _meta(f)
            assert m.get("description", "").strip(), (name, f.name)
            assert "unit" in m and "group" in m, (name, f.name)
        assert got.metadata[b"dbn.dataset"] == name.encode()
        assert got.metadata[b"dbn.written_by"] == code_version().label.encode()
        assert json.loads(got.metadata[b"dbn.written_by_code"])["label"] == code_version().label
        columns = json.loads(got.metadata[b"dbn.columns"])  # the same, for readers of key-value metadata only
        assert list(columns) == schema.names and all(c["description"] for c in columns.values())
    trials = pq.read_schema(sorted((tmp_path / "s" / "trials").glob("*.parquet"))[0])
    assert _meta(trials.field("test_acc"))["unit"] == "fraction"
    assert _meta(trials.field("throughput"))["unit"] == "images/s"
    assert _meta(trials.field("image_size"))["unit"] == "px"  # TrialConfig's declaration
    assert "in config_hash" in _meta(trials.field("width"))["description"]
    assert _meta(trials.field("ran_on"))["description"] == column_info(TrialResult, "device")["description"]
    assert _meta(trials.field("d_cos2_by_epoch"))["description"] == TrialResult.SERIES_META["d_cos2"]["description"]
    layers = pq.read_schema(sorted((tmp_path / "s" / "layers").glob("*.parquet"))[0])
    assert _meta(layers.field("rho"))["description"] == column_info(LayerShift, "rho")["description"]

    # Reading, de-duplication and compaction keep working with (and keep) the metadata.
    t, layer_table, _ = store.read_deduped(replicates=False)  # one configuration twice: two runs kept
    assert t.schema == TRIALS_SCHEMA and t.num_rows == 2 and layer_table.num_rows == 6
    store.compact()
    (compacted,) = (tmp_path / "s" / "trials").glob("*.parquet")
    got = pq.read_schema(compacted)
    assert all(_meta(f).get("description") for f in got) and got.metadata[b"dbn.written_by"]
    assert store.read("trials").num_rows == 2


def test_files_without_metadata_still_load(tmp_path: Path) -> None:
    """A file written before the metadata existed (no field or schema metadata) reads beside a new one."""
    store = ResultStore(str(tmp_path), "s")
    _write(store, "new")
    for name, schema in (("trials", TRIALS_SCHEMA), ("layers", LAYERS_SCHEMA)):
        (new,) = (tmp_path / "s" / name).glob("part-*.parquet")
        old = pq.read_table(new)
        bare = pa.schema([pa.field(f.name, f.type) for f in schema])
        table = pa.Table.from_pylist([{**r, "run_id": "old"} for r in old.to_pylist()], schema=bare)
        pq.write_table(table, tmp_path / "s" / name / "part-old-0.parquet")
        assert pq.read_schema(tmp_path / "s" / name / "part-old-0.parquet").field("run_id").metadata is None
    trials, layers, _ = store.read_deduped(replicates=False)
    assert sorted(trials.column("run_id").to_pylist()) == ["new", "old"] and layers.num_rows == 6
    assert trials.schema.field("test_acc").metadata == TRIALS_SCHEMA.field("test_acc").metadata


def test_writer_metadata_survives_a_bad_code_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import search.code_version as cv

    def broken() -> None:
        raise ValueError("DBN_CODE_VERSION is not a code version")

    monkeypatch.setattr(cv, "code_version", broken)
    table = with_writer(LAYERS_SCHEMA.empty_table())
    assert table.schema.metadata[b"dbn.written_by"] == b"unknown"
    assert table.schema.field("shift").metadata == LAYERS_SCHEMA.field("shift").metadata


def test_mlflow_table_view_shows_the_declared_table_fields() -> None:
    declared = [f.name for f in dataclasses.fields(LayerShift) if f.metadata["table"]]
    table = layers_table(_layers())
    assert list(table) == declared == list(column_names(LayerShift, table=True))
    mechanism = ["c_in", "v_in", "d_cos2", "rho", "shift_frozen", "shift_theory", "excess_local", "excess_inherited"]
    assert set(mechanism) <= set(table)  # the 8 columns the hand-kept list lacked
    assert table["index"] == [0, 1, 2] and table["rho"] == [0.3] * 3
    assert table["v_in"] == [None] * 3  # NaN -> None: JSON has no NaN
    assert "rel_depth" not in table


def test_mechanism_columns_are_the_mechanism_group() -> None:
    from analysis.mechanism import MECHANISM_COLUMNS

    # Same order and meaning as the hand-written tuple it replaced.
    assert MECHANISM_COLUMNS == ("c_in", "v_in", "d_cos2", "rho", "shift_frozen", "shift_theory", "excess_local",
                                 "excess_inherited")


@dataclass
class _WithSpread(LayerShift):
    """A per-layer metric added at test time, declared once."""

    shift_spread: float = field(default=float("nan"), metadata=column_meta(
        "standard deviation over channels of the per-channel shift", group="shift", table=True))


def test_a_per_layer_metric_declared_once_reaches_parquet_mlflow_and_docs(tmp_path: Path) -> None:
    schema = layers_schema(_WithSpread)
    assert schema.names == LAYERS_SCHEMA.names + ["shift_spread"]
    assert "shift_spread" not in OPTIONAL_LAYER_COLUMNS  # LayerShift's own schema is unchanged ...
    assert schema.field("shift_spread").type == pa.float64()
    # ... and a Parquet file of the extended schema describes the new column.
    layers = [_WithSpread(**x.to_dict(), shift_spread=0.1 * i) for i, x in enumerate(_layers())]
    cfg = TrialConfig()
    rows = layer_rows(cfg, layers, run_id="r", space="s")
    path = tmp_path / "layers.parquet"
    pq.write_table(with_writer(pa.Table.from_pylist(rows, schema=schema)), path)
    got = pq.read_schema(path)
    assert _meta(got.field("shift_spread")) == {"description": "standard deviation over channels of the per-channel "
                                                                "shift", "unit": "", "group": "shift"}
    assert pq.read_table(path).column("shift_spread").to_pylist() == pytest.approx([0.0, 0.1, 0.2])
    # The MLflow table view shows it (table=True) ...
    table = layers_table(layers)
    assert list(table)[-1] == "shift_spread" and table["shift_spread"] == pytest.approx([0.0, 0.1, 0.2])
    # ... and the generated column list documents it.
    assert "| `shift_spread` | `double` |  | shift | standard deviation over channels" in markdown(
        layers=schema)
    assert not math.isnan(layers[1].shift_spread)


def test_docs_column_list_is_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    text = (ROOT / "docs" / "columns.md").read_text()
    assert text == markdown(), "regenerate: python -m search.schema --markdown > docs/columns.md"
    assert main(["--markdown"]) == 0
    assert capsys.readouterr().out == text
    for name in TRIALS_SCHEMA.names + LAYERS_SCHEMA.names:
        assert f"| `{name}` |" in text
    assert "docs/columns.md" in (ROOT / "README.md").read_text()
