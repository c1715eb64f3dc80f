"""Arrow schemas of the two result datasets, `trials` and `layers`.

One row per trial (config columns + summary metrics + identifiers) and one row
per trial x BatchNorm layer. Column names are TrialConfig's and LayerShift's
field names. Analysis reads these without MLflow.

Every field carries metadata `description`, `unit` and `group` (bytes), derived from the one
declaration of each column: `column_meta` on the TrialResult / LayerShift fields, TrialConfig's
`help`, and `EXTRA_COLUMNS` below for the columns the schemas add. The schema metadata names the
dataset and repeats the descriptions as JSON (`dbn.columns`, for readers without Arrow's field
metadata); a file the store writes also records the code version that wrote it (`with_writer`).
`python -m search.schema --markdown` prints the column list (docs/columns.md).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Iterable, Mapping

import pyarrow as pa

from search.config import TrialConfig
from search.results import LayerShift, TrialResult, column_info, column_meta, layer_metrics

__all__ = ["TRIALS_SCHEMA", "LAYERS_SCHEMA", "LAYER_CONFIG_COLUMNS", "OPTIONAL_TRIAL_COLUMNS", "OPTIONAL_LAYER_COLUMNS",
           "EXTRA_COLUMNS", "trial_row", "layer_rows", "series_column", "layers_schema", "optional_columns", "with_writer",
           "markdown"]

_ARROW = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_()}
# Schema metadata keys (bytes, as Parquet's key-value metadata holds them).
DATASET_KEY, COLUMNS_KEY, WRITER_KEY, WRITER_CODE_KEY = b"dbn.dataset", b"dbn.columns", b"dbn.written_by", \
    b"dbn.written_by_code"


def _arrow_type(type_text: Any) -> pa.DataType:
    text = type_text.__name__ if isinstance(type_text, type) else str(type_text)  # a module without the
    return _ARROW[text.replace(" | None", "")]  # __future__ import gives classes, not strings


def _column(name: str, type_: pa.DataType, meta: Mapping[str, Any]) -> pa.Field:
    """A pyarrow field carrying its declaration's description, unit and group as field metadata."""
    return pa.field(name, type_, metadata={b"description": meta["description"].encode(),
                                            b"unit": meta.get("unit", "").encode(),
                                            b"group": meta.get("group", "").encode()})


def _schema(dataset: str, fields: list[pa.Field]) -> pa.Schema:
    columns = {f.name: {k.decode(): v.decode() for k, v in f.metadata.items()} for f in fields}
    return pa.schema(fields, metadata={DATASET_KEY: dataset.encode(),
                                       COLUMNS_KEY: json.dumps(columns, separators=(",", ":")).encode()})


def _config_meta(f: dataclasses.Field) -> dict[str, Any]:
    hashed = f.metadata.get("hashed", True)
    where = "trial config, in config_hash" if hashed else "trial config, execution only (not in config_hash)"
    return column_meta(f"{where}: {f.metadata.get('help', '')}",
                       unit=f.metadata.get("unit", ""), group="config" if hashed else "execution")


def series_column(key: str) -> str:
    """The trials column holding the per-epoch series `key` (a TrialResult.SERIES_KEYS key): `<key>_by_epoch`."""
    return f"{key}_by_epoch"


# The columns the schemas add beside the dataclasses' fields, declared here once. `status` and `error` are
# TrialResult's, `ran_on` is TrialResult.device (where the trial ran; the config's `device` is what it asked for).
EXTRA_COLUMNS: dict[str, dict[str, Any]] = {
    "run_id": column_meta("MLflow run id of the trial: the key joining trials, layers and the MLflow run",
                          group="provenance"),
    "config_hash": column_meta("16 hex chars of SHA-256 over the canonical JSON of the config's experiment "
                               "fields (TrialConfig.config_hash): one configuration, one hash", group="provenance"),
    "space": column_meta("the search space (spaces/), also the name of the MLflow experiment", group="provenance"),
    "profile": column_meta("the space's profile the sweep ran (quick, fashion, ...); a report never pools "
                           "profiles unless asked", group="provenance"),
    "finished_at": column_meta("when the driver recorded the finished trial (UTC)", group="provenance"),
    "algo": column_meta("the search algorithm of the sweep that ran the trial: grid, random or optuna; null in "
                        "files written before it was recorded", group="provenance"),
    "sweep_id": column_meta("MLflow run id of the sweep's parent run (run_kind = sweep): one sweep, one id "
                            "(--resume keeps it); null for a trial run outside a sweep or in older files",
                            group="provenance"),
    # The code that produced the row (search.code_version): `code_version` is the label reuse compares.
    "code_version": column_meta("the code version that produced the row: git:<commit12>[+dirty.<diff8>] or "
                                "pkg:<version> (search.code_version); what --reuse same-code compares",
                                group="provenance"),
    "code_commit": column_meta("full git commit of that code; null outside a checkout", group="provenance"),
    "code_dirty": column_meta("that code had uncommitted changes to tracked files or untracked source files; null "
                              "outside a checkout", group="provenance"),
}
ID_FIELDS = [
    _column("run_id", pa.string(), EXTRA_COLUMNS["run_id"]),
    _column("config_hash", pa.string(), EXTRA_COLUMNS["config_hash"]),
    _column("space", pa.string(), EXTRA_COLUMNS["space"]),
    _column("profile", pa.string(), EXTRA_COLUMNS["profile"]),
    _column("status", pa.string(), column_info(TrialResult, "status")),
    _column("error", pa.string(), column_info(TrialResult, "error")),
    _column("finished_at", pa.timestamp("us", tz="UTC"), EXTRA_COLUMNS["finished_at"]),
    _column("algo", pa.string(), EXTRA_COLUMNS["algo"]),
    _column("sweep_id", pa.string(), EXTRA_COLUMNS["sweep_id"]),
]
CONFIG_FIELDS = [_column(f.name, _arrow_type(f.type), _config_meta(f)) for f in dataclasses.fields(TrialConfig)]
# Types from TrialResult's annotations (float, int, bool; `int | None` for counts a stage may not have made).
_RESULT_TYPES = {f.name: str(f.type) for f in dataclasses.fields(TrialResult)}
METRIC_FIELDS = [_column(k, _arrow_type(_RESULT_TYPES[k]), column_info(TrialResult, k))
                 for k in TrialResult.SUMMARY_KEYS]
# Per-epoch series kept whole (TrialResult.SERIES_KEYS): value 0 at initialisation, value e after epoch e.
SERIES_FIELDS = [_column(series_column(k), pa.list_(pa.float64()), TrialResult.SERIES_META[k])
                 for k in TrialResult.SERIES_KEYS]
CODE_FIELDS = [_column("code_version", pa.string(), EXTRA_COLUMNS["code_version"]),
               _column("code_commit", pa.string(), EXTRA_COLUMNS["code_commit"]),
               _column("code_dirty", pa.bool_(), EXTRA_COLUMNS["code_dirty"])]
TRIALS_SCHEMA = _schema("trials", ID_FIELDS + CONFIG_FIELDS + METRIC_FIELDS + SERIES_FIELDS
                        + [_column("ran_on", pa.string(), column_info(TrialResult, "device"))] + CODE_FIELDS)


# Config columns repeated on every layer row so analysis groups without a join. The drop-rate schedule's
# fields say which rate the sites held as training ended (early dropout: 0, not dropout_rate).
LAYER_CONFIG_COLUMNS = (
    "backbone", "depth", "width", "dropout_type", "dropout_placement", "dropout_rate", "dataset", "seed",
    "dropout_schedule", "dropout_cutoff", "dropout_decay",
)


def layers_schema(layer_cls: type = LayerShift, *, metrics: bool = True) -> pa.Schema:
    """The `layers` schema: ids, LAYER_CONFIG_COLUMNS, every field of `layer_cls` with its column_meta, then
    (metrics=True) one float64 column per registered per-layer metric (search.results.register_layer_metric).

    LAYERS_SCHEMA is LayerShift's without registered metrics; the store and the tracker call this at write and
    read time, so a metric registered later (a plugin, a test) is in the files they write.
    """
    extra = [_column(e.name, pa.float64(), e.meta) for e in layer_metrics()] if metrics else []
    return _schema("layers", [f for f in ID_FIELDS if f.name in ("run_id", "config_hash", "space")]
                   + [f for f in CONFIG_FIELDS if f.name in LAYER_CONFIG_COLUMNS]
                   + [_column(f.name, _arrow_type(f.type), column_info(layer_cls, f.name))
                      for f in dataclasses.fields(layer_cls)] + extra)


LAYERS_SCHEMA = layers_schema(metrics=False)


def with_writer(table: pa.Table) -> pa.Table:
    """`table` with the code version of this process in its schema metadata: the store's files record which
    code wrote them (`dbn.written_by`: the label; `dbn.written_by_code`: search.code_version's JSON). Each
    row's own `code_*` columns say which code produced the row (a compaction or rebuild writes older rows).
    """
    try:
        from search.code_version import code_version

        cv = code_version()
        label, full = cv.label, cv.to_json()
    except Exception:  # noqa: BLE001 - a bad DBN_CODE_VERSION never costs a result file its rows
        label, full = "unknown", "{}"
    meta = dict(table.schema.metadata or {})
    meta.update({WRITER_KEY: label.encode(), WRITER_CODE_KEY: full.encode()})
    return table.replace_schema_metadata(meta)


def trial_row(cfg: TrialConfig, result: TrialResult, *, run_id: str, space: str, profile: str,
              finished_at: Any, code: Mapping[str, Any] | None = None, algo: str | None = None,
              sweep_id: str | None = None) -> dict[str, Any]:
    """One `trials` row as a dict matching TRIALS_SCHEMA (`algo`, `sweep_id`: the sweep that ran it).

    `code` holds the code_* columns (default: this process's `search.code_version`); a row
    rebuilt from MLflow passes the run's own (`code_columns_from_tags`).
    """
    row: dict[str, Any] = dict(run_id=run_id, config_hash=cfg.config_hash, space=space, profile=profile,
                               status=result.status, error=result.error, finished_at=finished_at,
                               algo=algo or None, sweep_id=sweep_id or None)
    row.update(cfg.to_dict())
    row.update(result.summary())
    row.update({series_column(k): result.series(k) for k in TrialResult.SERIES_KEYS})
    row["ran_on"] = result.device
    if code is None:
        from search.code_version import code_version

        code = code_version().columns()
    row.update({f.name: code.get(f.name) for f in CODE_FIELDS})
    return row


def layer_rows(cfg: TrialConfig, layers: Iterable[LayerShift], *, run_id: str, space: str) -> list[dict[str, Any]]:
    """The `layers` rows of one trial, matching `layers_schema()` (registered metrics included)."""
    base = {"run_id": run_id, "config_hash": cfg.config_hash, "space": space}
    base.update({k: getattr(cfg, k) for k in LAYER_CONFIG_COLUMNS})
    return [{**base, **layer.to_dict()} for layer in layers]


# The columns of the first results ever written (v0.1, tests/data/legacy_smoke): required in every file.
# Every column added since is optional by construction: a file written before it existed still loads
# (search.store reads it as nulls), so a study's old results stay readable whatever is added later.
_V1_TRIAL_COLUMNS = (
    "run_id", "config_hash", "space", "profile", "status", "error", "finished_at", "backbone", "depth", "width",
    "dropout_type", "dropout_placement", "dropout_rate", "dataset", "image_size", "in_chans", "stem", "num_classes",
    "train_samples", "epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "schedule",
    "warmup_epochs", "label_smoothing", "augment", "seed", "device", "data_dir", "channels_last", "amp", "compile",
    "num_workers", "test_acc", "test_loss", "test_acc_reest", "test_loss_reest", "train_loss", "train_acc",
    "mean_shift", "max_shift", "mean_shift_fed", "mean_shift_reest", "throughput", "wall_time_s", "train_time_s",
    "probe_time_s", "params", "epochs_completed", "ran_on",
)
_V1_LAYER_COLUMNS = (
    "run_id", "config_hash", "space", "backbone", "depth", "width", "dropout_type", "dropout_placement",
    "dropout_rate", "dataset", "seed", "name", "index", "rel_depth", "channels", "fan_in", "fed_by_dropout",
    "moving_var", "real_var", "shift", "shift_channelwise", "real_mean", "cos2",
)
OPTIONAL_TRIAL_COLUMNS: tuple[str, ...] = tuple(n for n in TRIALS_SCHEMA.names if n not in _V1_TRIAL_COLUMNS)
OPTIONAL_LAYER_COLUMNS: tuple[str, ...] = tuple(n for n in LAYERS_SCHEMA.names if n not in _V1_LAYER_COLUMNS)


def optional_columns(dataset: str) -> tuple[str, ...]:
    """The columns of `dataset` ('trials' or 'layers') a file may lack: every one added after v0.1, and every
    registered per-layer metric (read as nulls from a file written before it was registered)."""
    if dataset == "trials":
        return OPTIONAL_TRIAL_COLUMNS
    return OPTIONAL_LAYER_COLUMNS + tuple(e.name for e in layer_metrics())


def markdown(trials: pa.Schema = TRIALS_SCHEMA, layers: pa.Schema | None = None) -> str:
    """docs/columns.md: every column of both datasets with its type, unit, group and description (layers: the
    registered per-layer metrics included)."""
    layers = layers_schema() if layers is None else layers
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")  # no table break, emphasis, tag

    out = ["# Columns of the result datasets", "",
           "Generated by `python -m search.schema --markdown > docs/columns.md` from the one declaration of each",
           "column (`column_meta` on the fields of `search/results.py`, TrialConfig's `help`, `EXTRA_COLUMNS` in",
           "`search/schema.py`); tests/test_columns.py fails when this file is out of date. Every Parquet file of",
           "`<storage>/<space>/{trials,layers}/` carries the same text as field metadata, and its schema metadata",
           "names the code version that wrote it:", "",
           "```python",
           "import pyarrow.parquet as pq",
           "schema = pq.read_schema(path)  # a part file of results/<space>/trials/ or layers/",
           "schema.field('test_acc').metadata  # {b'description': ..., b'unit': b'fraction', b'group': b'accuracy'}",
           "schema.metadata[b'dbn.written_by']  # b'git:<commit12>' or b'git:<commit12>+dirty.<diff8>'",
           "```", "",
           "DuckDB reads the same as the file's key-value metadata (`dbn.columns` holds every column's",
           "description and unit as JSON): `SELECT decode(key), decode(value) FROM parquet_kv_metadata(path)`.", ""]
    for name, schema in (("trials", trials), ("layers", layers)):
        out += [f"## `{name}`", "", "| column | type | unit | group | description |", "| --- | --- | --- | --- | --- |"]
        for f in schema:
            m = {k.decode(): v.decode() for k, v in (f.metadata or {}).items()}
            same = name == "layers" and f.name in trials.names and trials.field(f.name).equals(f, check_metadata=True)
            text = "as in `trials`" if same else cell(m.get("description", ""))
            out.append(f"| `{f.name}` | `{f.type}` | {m.get('unit', '')} | {m.get('group', '')} | {text} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m search.schema", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the column list (docs/columns.md)")
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.print_help()
        return 2
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
