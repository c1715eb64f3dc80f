"""Dropout kinds (torch-free classes in the registry), the module that runs them, and placement surgery.

Importing this package imports no torch; the torch-side names load on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from search.trial.dropout.kinds import (BernoulliKind, ChannelKind, DropBlockKind, DropoutKind, DropPathKind,
                                        GaussianKind, UoutKind)
from search.trial.dropout.placements import PlacementSite

_LAZY = {
    "VarianceDropout": "module", "ModuleDropout": "module", "kind_class": "module", "list_dropout_kinds": "module",
    "make_dropout": "module",
    "apply_placement": "surgery", "block_types": "surgery", "trace_calls": "surgery",
}

__all__ = ["DropoutKind", "BernoulliKind", "GaussianKind", "UoutKind", "ChannelKind", "DropPathKind", "DropBlockKind",
           "PlacementSite", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"search.trial.dropout.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
