"""D = d cos^2(theta) over training and across widths (the paper's width mechanism needs D to grow with width).

Reads the trials' D columns (search/results.py): `d_cos2_init` / `d_cos2_final` and the per-epoch
lists `d_cos2_by_epoch` over the BN layers dropout feeds, and the `d_cos2_all*` twins over every
BN layer with a feeding weight layer (defined for no-dropout trials too). Per configuration
and width: D at initialisation and at the end with t intervals over seeds; per configuration:
the width exponent of the final D (log D on log width, one slope per seed, t over seeds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .fit import MeanTest, mean_test
from .load import DROPOUT_KEYS, Study, column_floats, context_fields, context_key, group_codes

__all__ = ["DRow", "DWidth", "d_rows", "d_width", "VARIANTS"]

VARIANTS = {"d_cos2": "BN layers fed by dropout", "d_cos2_all": "every BN layer with a feeding weight layer"}


@dataclass
class DRow:
    """D of one configuration at one width: at initialisation and after training, over seeds."""

    context: tuple
    dropout_type: str
    dropout_placement: str
    dropout_rate: float
    width: float
    variant: str  # a key of VARIANTS
    init: MeanTest
    final: MeanTest
    epochs: int


@dataclass
class DWidth:
    """log D_final = a + b log width per seed; b over seeds."""

    context: tuple
    dropout_type: str
    dropout_placement: str
    dropout_rate: float
    variant: str
    widths: tuple[float, ...]
    slope: MeanTest


def d_rows(study: Study, level: float = 0.95) -> list[DRow]:
    """Per configuration, width and variant: D at initialisation and at the end (t over seeds)."""
    t = study.trials
    if t.num_rows == 0 or "d_cos2_all_final" not in t.column_names:
        return []
    ctx = context_fields(t)
    codes, keys = group_codes(t, ctx + list(DROPOUT_KEYS) + ["width"])
    ep = column_floats(t, "epochs_completed")
    out = []
    for variant in VARIANTS:
        ini, fin = column_floats(t, f"{variant}_init"), column_floats(t, f"{variant}_final")
        for g, k in enumerate(keys):
            m = codes == g
            if not np.isfinite(fin[m]).any():
                continue
            n = len(ctx)
            out.append(DRow(tuple(zip(ctx, k[:n])), k[n], k[n + 1], k[n + 2], k[n + 3], variant,
                            mean_test(ini[m], level), mean_test(fin[m], level), int(np.nanmax(ep[m]))))
    return sorted(out, key=lambda r: (r.variant, context_key(r.context), r.dropout_type, r.dropout_placement, r.dropout_rate,
                                      r.width))


def d_width(study: Study, level: float = 0.95) -> list[DWidth]:
    """The width exponent of the final D per configuration tried at >= 2 widths, one slope per seed."""
    t = study.trials
    if t.num_rows == 0 or "d_cos2_all_final" not in t.column_names:
        return []
    ctx = context_fields(t)
    codes, keys = group_codes(t, ctx + list(DROPOUT_KEYS))
    width, seed = column_floats(t, "width"), column_floats(t, "seed")
    out = []
    for variant in VARIANTS:
        fin = column_floats(t, f"{variant}_final")
        for g, k in enumerate(keys):
            m = (codes == g) & np.isfinite(fin) & (fin > 0)
            widths = tuple(sorted(set(width[m].tolist())))
            if len(widths) < 2:
                continue
            slopes = []
            for s in sorted(set(seed[m].tolist())):
                ms = m & (seed == s)
                x, y = np.log(width[ms]), np.log(fin[ms])
                if np.unique(x).size >= 2:
                    slopes.append(float(np.polyfit(x, y, 1)[0]))
            n = len(ctx)
            out.append(DWidth(tuple(zip(ctx, k[:n])), k[n], k[n + 1], k[n + 2], variant, widths,
                              mean_test(np.array(slopes), level)))
    return out


def epoch_series(study: Study, variant: str = "d_cos2_all") -> dict[tuple, list[list[float]]]:
    """(placement, width, epochs) -> the per-seed D series (index 0: initialisation)."""
    t = study.trials
    col = f"{variant}_by_epoch"
    if t.num_rows == 0 or col not in t.column_names:
        return {}
    out: dict[tuple, list[list[float]]] = {}
    for r in t.select(["dropout_placement", "width", "epochs", col]).to_pylist():
        if r[col]:
            out.setdefault((r["dropout_placement"], r["width"], r["epochs"]), []).append(
                [math.nan if v is None else float(v) for v in r[col]])
    return out
