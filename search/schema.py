"""Arrow schemas of the two result datasets, `trials` and `layers`.

One row per trial (config columns + summary metrics + identifiers) and one row
per trial x BatchNorm layer. Column names are TrialConfig's and LayerShift's
field names. Analysis reads these without MLflow.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import pyarrow as pa

from search.config import TrialConfig
from search.results import LayerShift, TrialResult

__all__ = ["TRIALS_SCHEMA", "LAYERS_SCHEMA", "LAYER_CONFIG_COLUMNS", "trial_row", "layer_rows", "check_schema"]

_ARROW = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_()}


def _arrow_type(type_text: str) -> pa.DataType:
    return _ARROW[str(type_text).replace(" | None", "")]


ID_FIELDS = [
    pa.field("run_id", pa.string()),  # MLflow run id
    pa.field("config_hash", pa.string()),
    pa.field("space", pa.string()),
    pa.field("profile", pa.string()),
    pa.field("status", pa.string()),  # ok | diverged | failed
    pa.field("error", pa.string()),
    pa.field("finished_at", pa.timestamp("us", tz="UTC")),
]
CONFIG_FIELDS = [pa.field(f.name, _arrow_type(f.type)) for f in dataclasses.fields(TrialConfig)]
METRIC_FIELDS = [
    pa.field(k, pa.int64() if k in ("params", "epochs_completed") else pa.float64())
    for k in TrialResult.SUMMARY_KEYS
]
# `ran_on` is where the trial ran (e.g. cuda:0); `device` is what the config asked for.
TRIALS_SCHEMA = pa.schema(ID_FIELDS + CONFIG_FIELDS + METRIC_FIELDS + [pa.field("ran_on", pa.string())])

# Config columns repeated on every layer row so analysis groups without a join.
LAYER_CONFIG_COLUMNS = (
    "backbone", "depth", "width", "dropout_type", "dropout_placement", "dropout_rate", "dataset", "seed",
)
LAYERS_SCHEMA = pa.schema(
    [pa.field("run_id", pa.string()), pa.field("config_hash", pa.string()), pa.field("space", pa.string())]
    + [f for f in CONFIG_FIELDS if f.name in LAYER_CONFIG_COLUMNS]
    + [pa.field(f.name, _arrow_type(f.type)) for f in dataclasses.fields(LayerShift)]
)


def trial_row(cfg: TrialConfig, result: TrialResult, *, run_id: str, space: str, profile: str,
              finished_at: Any) -> dict[str, Any]:
    """One `trials` row as a dict matching TRIALS_SCHEMA."""
    row: dict[str, Any] = dict(run_id=run_id, config_hash=cfg.config_hash, space=space, profile=profile,
                               status=result.status, error=result.error, finished_at=finished_at)
    row.update(cfg.to_dict())
    row.update(result.summary())
    row["ran_on"] = result.device
    return row


def layer_rows(cfg: TrialConfig, layers: Iterable[LayerShift], *, run_id: str, space: str) -> list[dict[str, Any]]:
    """The `layers` rows of one trial, matching LAYERS_SCHEMA."""
    base = {"run_id": run_id, "config_hash": cfg.config_hash, "space": space}
    base.update({k: getattr(cfg, k) for k in LAYER_CONFIG_COLUMNS})
    return [{**base, **layer.to_dict()} for layer in layers]


def check_schema(table: pa.Table, schema: pa.Schema, what: str) -> None:
    """Raise ValueError naming the first missing or mistyped column of a results table."""
    for f in schema:
        if f.name not in table.schema.names:
            raise ValueError(f"{what}: column {f.name!r} is missing (expected the {what} schema of search.schema)")
        got = table.schema.field(f.name).type
        if got != f.type and not (pa.types.is_null(got)):
            raise ValueError(f"{what}: column {f.name!r} has type {got}, expected {f.type}")
