"""Arrow schemas of the two result datasets, `trials` and `layers`.

One row per trial (config columns + summary metrics + identifiers) and one row
per trial x BatchNorm layer. Column names are TrialConfig's and LayerShift's
field names. Analysis reads these without MLflow.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import pyarrow as pa

from search.config import TrialConfig
from search.results import LayerShift, TrialResult

__all__ = ["TRIALS_SCHEMA", "LAYERS_SCHEMA", "LAYER_CONFIG_COLUMNS", "OPTIONAL_TRIAL_COLUMNS", "OPTIONAL_LAYER_COLUMNS",
           "trial_row", "layer_rows", "series_column"]

_ARROW = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_()}


def _arrow_type(type_text: str) -> pa.DataType:
    return _ARROW[str(type_text).replace(" | None", "")]


def series_column(key: str) -> str:
    """The trials column holding the per-epoch series `key` (a TrialResult.SERIES_KEYS key): `<key>_by_epoch`."""
    return f"{key}_by_epoch"


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
# Types from TrialResult's annotations (float, int, bool; `int | None` for counts a stage may not have made).
_RESULT_TYPES = {f.name: str(f.type) for f in dataclasses.fields(TrialResult)}
METRIC_FIELDS = [pa.field(k, _arrow_type(_RESULT_TYPES[k])) for k in TrialResult.SUMMARY_KEYS]
# Per-epoch series kept whole (TrialResult.SERIES_KEYS): value 0 at initialisation, value e after epoch e.
SERIES_FIELDS = [pa.field(series_column(k), pa.list_(pa.float64())) for k in TrialResult.SERIES_KEYS]
# `ran_on` is where the trial ran (e.g. cuda:0); `device` is what the config asked for.
# The code that produced the row (search.code_version): `code_version` is the label reuse compares.
CODE_FIELDS = [pa.field("code_version", pa.string()), pa.field("code_commit", pa.string()),
               pa.field("code_dirty", pa.bool_())]
TRIALS_SCHEMA = pa.schema(ID_FIELDS + CONFIG_FIELDS + METRIC_FIELDS + SERIES_FIELDS
                          + [pa.field("ran_on", pa.string())] + CODE_FIELDS)


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
              finished_at: Any, code: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One `trials` row as a dict matching TRIALS_SCHEMA.

    `code` holds the code_* columns (default: this process's `search.code_version`); a row
    rebuilt from MLflow passes the run's own (`code_columns_from_tags`).
    """
    row: dict[str, Any] = dict(run_id=run_id, config_hash=cfg.config_hash, space=space, profile=profile,
                               status=result.status, error=result.error, finished_at=finished_at)
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
    """The `layers` rows of one trial, matching LAYERS_SCHEMA."""
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
