"""The search package: the contracts of a study (torch-free) and its two jobs.

    search/config.py, results.py, schema.py, store.py, registry.py   contracts (no torch)
    search/trial/   the science of one trial: data, models, dropout, train, probes
    search/sweep/   the orchestration of a sweep: CLI, preflight, lock, Tune, MLflow, Parquet

The plugin API (docs/architecture.md, "Where to add X") is importable from here:
`register_dropout`, `register_placement`, `register_backbone`, `register_space`, `register_dataset`,
`register_layer_metric` (a per-layer metric: Parquet column, MLflow table view, report),
`DropoutKind`, `PlacementSite`, `TrialConfig`; `VarianceDropout` (an nn.Module) and the
surgery helpers load torch on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from search.config import ConfigError, TrialConfig
from search.registry import (register_backbone, register_dataset, register_dropout, register_placement,
                             register_space)
from search.results import LayerProbe, register_layer_metric

_LAZY = {
    "DropoutKind": "search.trial.dropout.kinds",
    "PlacementSite": "search.trial.dropout.placements",
    "VarianceDropout": "search.trial.dropout.module",
    "make_dropout": "search.trial.dropout.module",
    "per_block": "search.trial.dropout.surgery",
    "wrap_before": "search.trial.dropout.surgery",
    "wrap_classifier": "search.trial.dropout.surgery",
    "trace_calls": "search.trial.dropout.surgery",
    "run_trial": "search.trial.runner",
}

__all__ = ["ConfigError", "TrialConfig", "register_backbone", "register_dataset", "register_dropout",
           "register_placement", "register_space", "register_layer_metric", "LayerProbe", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
