"""The report's table of the registered per-layer metrics (search.results.register_layer_metric).

A metric declared once reaches the `layers` dataset as its own column; this module reads those
columns back: per configuration, the median over its BN layers of every metric declared with
`report=True`, with the metric's unit in the header and its description in the note. A study
without registered metrics has no such table (the report then looks as before).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

from search.results import layer_metrics

from .load import column_floats

__all__ = ["CONFIG_KEYS", "layer_metric_rows"]

# What one row of the table is: a configuration of the layers dataset (its config columns).
CONFIG_KEYS = ("backbone", "dropout_type", "dropout_placement", "dropout_rate", "width")


def layer_metric_rows(layers: pa.Table) -> tuple[list[str], list[list[str]], str] | None:
    """(headers, rows, note) of the per-layer metrics table, or None when no registered metric is in `layers`.

    Each row is one configuration (CONFIG_KEYS), with the number of BN-layer rows and, per metric, the median
    of its finite values over those rows (n/a where none is finite).
    """
    shown = [e for e in layer_metrics() if e.meta.get("report", True) and e.name in layers.column_names]
    if not shown or layers.num_rows == 0:
        return None
    cols = {k: layers.column(k).to_pylist() for k in CONFIG_KEYS}
    values = {e.name: column_floats(layers, e.name) for e in shown}
    groups: dict[tuple, list[int]] = {}
    for i in range(layers.num_rows):
        groups.setdefault(tuple(cols[k][i] for k in CONFIG_KEYS), []).append(i)
    rows = []
    for key in sorted(groups, key=lambda k: tuple(str(v) for v in k)):
        idx = groups[key]
        row = [str(key[0]), str(key[1]), str(key[2]), f"{key[3]:g}", f"{key[4]:g}", str(len(idx))]
        for e in shown:
            v = values[e.name][idx]
            v = v[np.isfinite(v)]
            row.append(_fmt(float(np.median(v))) if v.size else "n/a")
        rows.append(row)
    headers = ["backbone", "type", "placement", "rate / beta", "width", "layers"] + [
        f"{e.name} ({e.meta['unit']})" if e.meta.get("unit") else e.name for e in shown]
    note = ("Median over the BN layers of each configuration (trials with status ok). " + " ".join(
        f"{e.name}: {e.meta['description']}." for e in shown))
    return headers, rows, note


def _fmt(x: Any) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.4g}"
