"""Which cells of a study still have a wide interval (`search.run --until-ci W`).

The statistic behind adaptive replication: the cells of the accuracy cost (analysis.fit's
`accuracy_cost`) or of the BN re-estimation gain (`bn_reestimation`) whose interval is wider than
W percentage points or missing. search/sweep/adaptive.py decides which seeds to add; the driver
passes this function to it (`more_seeds(..., cells=wide_cells)`), so the sweep floor never
imports the analysis floor.
"""
from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc

from analysis.fit import accuracy_cost, bn_reestimation
from analysis.load import Study
from search.schema import LAYERS_SCHEMA
from search.sweep.adaptive import QUANTITIES, WideCell

__all__ = ["wide_cells"]


def wide_cells(trials: pa.Table, width_pp: float, quantity: str = "cost", level: float = 0.95) -> list[WideCell]:
    """The cells of `quantity` whose `level` interval is wider than `width_pp` or missing."""
    ok = trials.filter(pc.equal(trials.column("status"), "ok")) if trials.num_rows else trials
    study = Study(ok, LAYERS_SCHEMA.empty_table(), ("adaptive",))
    out = []
    if quantity == "cost":
        if ok.num_rows == 0 or "none" not in set(ok.column("dropout_placement").to_pylist()):
            return []
        cells, _ = accuracy_cost(study, level=level)
        for c in cells:
            w = 100 * (c.ci_high - c.ci_low) if c.has_ci else math.nan
            if not (w <= width_pp):
                out.append(WideCell(c.context + (("dropout_type", c.dropout_type),
                                                 ("dropout_placement", c.dropout_placement),
                                                 ("dropout_rate", c.dropout_rate), ("width", c.width)), c.n, w,
                                    c.method))
    elif quantity == "reest":
        rows, _, _ = bn_reestimation(study, level=level)
        for r in rows:
            w = 100 * (r.ci_high - r.ci_low) if r.has_ci else math.nan
            if not (w <= width_pp):
                out.append(WideCell(tuple(r.label), r.n, w, r.method))
    else:
        raise ValueError(f"--until-ci-of {quantity!r} is not allowed (allowed: {', '.join(QUANTITIES)})")
    return out
