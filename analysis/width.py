"""Width effects where they are identified: the same BN position compared across widths, paired by seed.

A network's BN layers differ in fan-in d by stage (d grows 4x across a WRN's three stages) and
by width. Regressing log(shift - 1) on log d over every layer pooled mixes the two: a shift that
depends on the stage alone shows a "width" slope. This module separates them, per configuration
(context + dropout type, placement, rate) and per quantity (the paper's `shift`, the frozen
measurement `shift_frozen`, the propagated prediction `shift_theory`):

- within position: log(q - 1) = a_position + b log d, with a fixed effect per BN position (the
  layer's execution index in one backbone and depth). Within a position d is proportional to the
  width, so b is the width effect alone. Estimated once per seed (every width of that seed), and
  the interval is a t interval over seeds (`analysis.fit.mean_test`: none below 3 seeds).
- across positions: log(q - 1) = a_trial + b log d, a fixed effect per trial, so b is how the
  excess changes from stage to stage at one width (layer position and fan-in together).
- pooled: the plain slope over every layer, labelled as what it is (position and width mixed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .fit import MeanTest, mean_test
from .load import DROPOUT_KEYS, Study, column_floats, context_fields, context_key, group_codes

__all__ = ["WidthEffect", "QUANTITIES", "width_effects", "fe_slope"]

# The quantities whose width dependence is estimated, and what each is (one name, one meaning).
QUANTITIES = {
    "shift": "variance shift (the paper's metric, BN running statistics)",
    "shift_frozen": "frozen measurement (dropout on, BN frozen)",
    "shift_theory": "propagated prediction (the mechanism)",
}


@dataclass
class WidthEffect:
    """The width dependence of one quantity's excess (q - 1) at the BN layers one dropout configuration feeds."""

    context: tuple  # ((field, value), ...) of the context fields
    dropout_type: str
    dropout_placement: str
    dropout_rate: float
    quantity: str  # a key of QUANTITIES
    widths: tuple[float, ...]
    n_positions: int  # BN positions seen at >= 2 widths (what identifies the width effect)
    n_layers: int  # layer rows with q > 1 used
    n_trials: int
    n_dropped: int  # fed layer rows with q <= 1 (log undefined)
    within: MeanTest  # slope b within position (the width effect), over seeds
    across: MeanTest  # slope b across positions at fixed width (stage / fan-in), over seeds
    pooled: float  # slope over every layer pooled (position and width mixed)
    seeds: tuple[int, ...] = ()
    per_seed: tuple[float, ...] = ()  # the within-position slope of each seed
    note: str = ""
    diff: MeanTest | None = field(default=None)  # for shift_theory: its within slope minus shift_frozen's, per seed

    @property
    def verdict(self) -> str:
        """'falls' | 'rises' | 'none detected' | 'not testable'."""
        w = self.within
        if not w.has_ci:
            return "not testable"
        if w.high < 0:
            return "falls"
        if w.low > 0:
            return "rises"
        return "none detected"


def fe_slope(x: np.ndarray, y: np.ndarray, group: np.ndarray) -> float:
    """OLS slope of y on x with a fixed effect per group (both demeaned within group); NaN if x never varies."""
    if x.size == 0:
        return math.nan
    _, g = np.unique(group, return_inverse=True)
    cnt = np.bincount(g)
    xd = x - (np.bincount(g, x) / cnt)[g]
    yd = y - (np.bincount(g, y) / cnt)[g]
    sxx = float((xd * xd).sum())
    if sxx <= 1e-12 * max(1.0, float((x * x).sum())):
        return math.nan
    return float((xd * yd).sum() / sxx)


def _ols_slope(x: np.ndarray, y: np.ndarray) -> float:
    return fe_slope(x, y, np.zeros(x.size, np.int64))


def _fed(study: Study, quantity: str) -> pa.Table:
    L = study.layers
    if L.num_rows == 0 or quantity not in L.column_names:
        return L.slice(0, 0)
    mask = pc.and_(pc.fill_null(L.column("fed_by_dropout"), False),
                   pc.invert(pc.is_in(L.column("dropout_placement"), value_set=pa.array(["none", "head"]))))
    L = L.filter(mask)
    d, q = column_floats(L, "fan_in"), column_floats(L, quantity)
    return L.filter(pa.array(np.isfinite(d) & (d > 0) & np.isfinite(q)))


def width_effects(study: Study, quantities: tuple[str, ...] = tuple(QUANTITIES), level: float = 0.95
                  ) -> list[WidthEffect]:
    """Within-position, across-position and pooled slopes per configuration tried at >= 2 widths.

    Context fields (from the trials: backbone, depth, dataset, epochs, ...) and the dropout axes
    define a configuration; the seed pairs its widths. Quantities whose column is missing or
    null (older results) are skipped.
    """
    t = study.trials
    if t.num_rows == 0:
        return []
    ctx = context_fields(t)
    ctx_codes, ctx_keys = group_codes(t, ctx)
    run_ctx = dict(zip(t.column("run_id").to_pylist(), ctx_codes.tolist()))
    out: list[WidthEffect] = []
    slopes: dict[tuple, WidthEffect] = {}
    for quantity in quantities:
        L = _fed(study, quantity)
        if L.num_rows == 0:
            continue
        runs = L.column("run_id").to_pylist()
        cc = np.array([run_ctx.get(r, -1) for r in runs], np.int64)
        L = L.append_column("_ctx", pa.array(cc))
        codes, keys = group_codes(L, ["_ctx", *DROPOUT_KEYS])
        q, d = column_floats(L, quantity), column_floats(L, "fan_in")
        width, seed, pos = column_floats(L, "width"), column_floats(L, "seed"), column_floats(L, "index")
        run = np.unique(np.asarray(runs, dtype=object), return_inverse=True)[1]
        for g, key in enumerate(keys):
            if key[0] < 0:
                continue
            rows = np.flatnonzero(codes == g)
            widths = tuple(sorted(set(width[rows].tolist())))
            if len(widths) < 2:
                continue
            up = rows[q[rows] > 1.0]
            x, y = np.log(d[up]), np.log(q[up] - 1.0)
            # A position identifies the width effect only where it is seen at two widths or more.
            pw = {p: len(set(width[up][pos[up] == p].tolist())) for p in np.unique(pos[up])}
            seeds = sorted(set(seed[up].tolist()))
            within, across, used = [], [], []
            for s in seeds:
                m = seed[up] == s
                if len(set(width[up][m].tolist())) < 2:
                    continue
                b = fe_slope(x[m], y[m], pos[up][m])
                if math.isfinite(b):
                    within.append(b)
                    used.append(int(s))
                    across.append(fe_slope(x[m], y[m], run[up][m]))
            eff = WidthEffect(
                context=tuple(zip(ctx, ctx_keys[key[0]])), dropout_type=key[1], dropout_placement=key[2],
                dropout_rate=key[3], quantity=quantity, widths=widths,
                n_positions=sum(1 for v in pw.values() if v >= 2), n_layers=int(up.size),
                n_trials=len(set(run[up].tolist())), n_dropped=int(rows.size - up.size),
                within=mean_test(np.array(within), level), across=mean_test(np.array(across), level),
                pooled=_ols_slope(x, y), seeds=tuple(used), per_seed=tuple(within))
            if len(within) < len(seeds):
                eff.note = (f"{len(seeds) - len(within)} seed(s) without two widths at a common position were "
                            "left out")
            slopes[(key[0], *key[1:], quantity)] = eff
            out.append(eff)
    # The propagation's width slope against the frozen measurement's, paired by seed.
    for k, eff in slopes.items():
        if eff.quantity != "shift_theory":
            continue
        fro = slopes.get((*k[:-1], "shift_frozen"))
        if fro is None:
            continue
        by_seed = dict(zip(fro.seeds, fro.per_seed))
        eff.diff = mean_test(np.array([b - by_seed[s] for s, b in zip(eff.seeds, eff.per_seed) if s in by_seed]),
                             level)
    return sorted(out, key=lambda e: (context_key(e.context), e.dropout_type, e.dropout_placement, e.dropout_rate,
                                      list(QUANTITIES).index(e.quantity)))
