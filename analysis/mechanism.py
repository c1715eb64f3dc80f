"""The mechanism in a study's results: the paper's shift, the frozen measurement and the theory side by side,
the local / inherited decomposition, the noise floor, and whether width acts through the theory.

Reads the mechanism columns of the layers dataset (search/trial/mechanism.py, docs/theory.md). Results
written before those columns existed load with them null; `missing_columns` names them and the report
says so instead of drawing a table from nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from search.results import LayerShift, column_names

from .fit import ShiftFit, _fit_group, mean_ci, ols_from_sufficient, ols_sufficient
from .load import DROPOUT_KEYS, Study, column_floats, constant_schedule, group_codes

__all__ = ["MECHANISM_COLUMNS", "TARGET", "MechanismRow", "NoiseFloor", "WidthMechanism", "missing_columns",
           "fed_layers", "mechanism_rows", "noise_floor", "width_mechanism", "closed_form"]

# The LayerShift fields of group "mechanism" (search.results.column_meta), in declaration order.
MECHANISM_COLUMNS = column_names(LayerShift, group="mechanism")
TARGET = 0.05  # issue 13: median |theory - frozen| / frozen over dropout-fed layers
GROUP = ("backbone",) + DROPOUT_KEYS


def fed_layers(study: Study) -> pa.Table:
    """BN layers a dropout feeds directly (placement pre_bn / pre_conv), with a finite frozen measurement, of
    trials whose dropout ran at one rate (load.constant_schedule: the closed form reads dropout_rate).

    GroupNorm layers (norm_type groupnorm) are not among them: no running statistics, so no paper's shift to
    compare with and no propagation through them (shift_theory NaN); the report's notes say so.
    """
    L = study.layers
    if L.num_rows == 0:
        return L
    mask = pc.and_(pc.fill_null(L.column("fed_by_dropout"), False),
                   pc.invert(pc.is_in(L.column("dropout_placement"), value_set=pa.array(["none", "head"]))))
    if "norm_type" in L.column_names:  # null: batchnorm (files written before the column)
        mask = pc.and_(mask, pc.fill_null(pc.not_equal(L.column("norm_type"), "groupnorm"), True))
    return L.filter(pc.and_(mask, constant_schedule(L)))


def missing_columns(study: Study) -> list[str]:
    """Mechanism columns null (or NaN) on every dropout-fed layer: results older than the mechanism probe."""
    L = fed_layers(study)
    if L.num_rows == 0:
        return []
    out = []
    for k in MECHANISM_COLUMNS:
        if k not in L.column_names:
            out.append(k)
            continue
        col = L.column(k)
        if col.null_count == L.num_rows or not pc.any(pc.is_finite(pc.fill_null(col, math.nan))).as_py():
            out.append(k)
    return out


def _median(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else math.nan


# ------------------------------------------------------------ side by side
@dataclass
class MechanismRow:
    """Medians over the dropout-fed BN layers of one (backbone, type, placement, rate)."""

    backbone: str
    dropout_type: str
    dropout_placement: str
    dropout_rate: float
    n_layers: int
    n_trials: int
    shift: float  # the paper's metric, from BN's running variance
    shift_frozen: float  # measured with BN frozen: what the theory predicts exactly
    shift_theory: float
    rel_err: float  # median |theory - frozen| / frozen
    rel_err_p90: float
    local_share: float  # median of excess_local / (excess_local + excess_inherited)
    d_cos2: float
    rho: float
    # The three predictions side by side (docs/theory.md): the paper's closed form from the measured rho, d cos^2,
    # c_in and v_in; the exact local identity (the feeding dropout's noise alone: 1 + excess_local); the full
    # propagation (shift_theory). Each against the frozen measurement and against the paper's metric (medians).
    shift_closed_form: float = math.nan
    shift_local: float = math.nan
    err_closed_form: float = math.nan  # |closed form - frozen| / frozen
    err_local: float = math.nan
    err_vs_paper: tuple[float, float, float] = (math.nan, math.nan, math.nan)  # closed, local, propagation vs shift
    dilution: float = math.nan  # median share of the closed form's excess that does not reach BN (shortcut etc.)

    @property
    def within_target(self) -> bool:
        return math.isfinite(self.rel_err) and self.rel_err <= TARGET


def mechanism_rows(study: Study) -> list[MechanismRow]:
    """One row per (backbone, type, placement, rate) over fed layers with finite frozen and theory shifts."""
    L = fed_layers(study)
    if L.num_rows == 0 or missing_columns(study):
        return []
    fro, th = column_floats(L, "shift_frozen"), column_floats(L, "shift_theory")
    keep = np.isfinite(fro) & np.isfinite(th) & (fro > 0)
    L = L.filter(pa.array(keep))
    if L.num_rows == 0:
        return []
    codes, keys = group_codes(L, GROUP)
    fro, th, s = column_floats(L, "shift_frozen"), column_floats(L, "shift_theory"), column_floats(L, "shift")
    loc, inh = column_floats(L, "excess_local"), column_floats(L, "excess_inherited")
    dc, rho = column_floats(L, "d_cos2"), column_floats(L, "rho")
    cf = closed_form(L)
    local = 1.0 + loc
    runs = np.asarray(L.column("run_id").to_pylist(), dtype=object)
    err = np.abs(th - fro) / fro
    with np.errstate(divide="ignore", invalid="ignore"):
        share = loc / (loc + np.nan_to_num(inh))
        dilution = 1.0 - loc / (cf - 1.0)
    rows = []
    for g, key in enumerate(keys):
        m = codes == g
        e = err[m]
        rel = lambda p, ref: _median(np.abs(p[m] - ref[m]) / ref[m])  # noqa: E731
        rows.append(MechanismRow(*key, n_layers=int(m.sum()), n_trials=len(set(runs[m])), shift=_median(s[m]),
                                 shift_frozen=_median(fro[m]), shift_theory=_median(th[m]), rel_err=_median(e),
                                 rel_err_p90=float(np.percentile(e, 90)), local_share=_median(share[m]),
                                 d_cos2=_median(dc[m]), rho=_median(rho[m]), shift_closed_form=_median(cf[m]),
                                 shift_local=_median(local[m]), err_closed_form=rel(cf, fro), err_local=rel(local, fro),
                                 err_vs_paper=(rel(cf, s), rel(local, s), rel(th, s)),
                                 dilution=_median(dilution[m])))
    return sorted(rows, key=lambda r: (r.backbone, r.dropout_type, r.dropout_placement, r.dropout_rate))


def closed_form(L: pa.Table) -> np.ndarray:
    """The paper's closed form per fed layer from the measured inputs: case (a) for pre_bn, case (b) for pre_conv
    with rho, D = d cos^2 (so cos^2 = D / d), c_in and v_in of the dropout's input (NaN where any is missing or
    the kind has no closed form)."""
    from .theory import closed_form_kinds, placement_cases, predict_layer_shift

    out = np.full(L.num_rows, math.nan)
    if L.num_rows == 0:
        return out
    c, v, rho, dc, d = (column_floats(L, k) for k in ("c_in", "v_in", "rho", "d_cos2", "fan_in"))
    codes, keys = group_codes(L, DROPOUT_KEYS)
    kinds, cases = closed_form_kinds(), placement_cases()
    for g, (kind, placement, rate) in enumerate(keys):
        m = codes == g
        # A kind without the closed form, or a placement with no case of the paper's (post_add: case (a) in a
        # pre-activation family, (b) in a post-activation one; the theory's 1 there would read as a prediction).
        if kind not in kinds or cases.get(placement) is None:
            continue
        try:
            with np.errstate(divide="ignore", invalid="ignore"):
                out[m] = predict_layer_shift(kind, placement, rate, c[m], v[m], d[m], dc[m] / d[m], rho[m])
        except ValueError:
            continue  # outside the closed form's domain: no prediction
    return out


# -------------------------------------------------------------- noise floor
@dataclass
class NoiseFloor:
    """The study's floor: what BN's running statistics show with no dropout noise at all."""

    n_none: int  # ok trials with placement none
    none_shift: tuple[float, float, float]  # mean over those trials of mean_shift, t-interval
    none_shift_reest: float  # ... after BN re-estimation
    floor: tuple[float, float, float]  # mean over all trials of shift_floor (layers no dropout reaches), interval
    n_trials: int
    flagged: list[str] = field(default_factory=list)  # "config (seed s)" of trials with bn_unconverged
    limit: float = math.nan


def noise_floor(study: Study, level: float = 0.95) -> NoiseFloor | None:
    """The floor from `none` trials and every trial's `shift_floor`; None when the study has no trials."""
    from search.results import FLOOR_LIMIT

    t = study.trials
    if t.num_rows == 0:
        return None
    none = t.filter(pc.equal(t.column("dropout_placement"), "none"))
    m, lo, hi, _, _ = mean_ci(column_floats(none, "mean_shift"), level) if none.num_rows else (math.nan,) * 3 + (0, 0)
    fm, flo, fhi, _, _ = mean_ci(column_floats(t, "shift_floor"), level)
    flag = pc.fill_null(t.column("bn_unconverged"), False).to_numpy(zero_copy_only=False)
    flagged = [f"{r['backbone']} w{r['width']:g} {r['dropout_placement']}"
               + (f" {r['dropout_type']} {r['dropout_rate']:g}" if r["dropout_placement"] != "none" else "")
               + f" seed {r['seed']}" for r in t.filter(pa.array(flag)).to_pylist()]
    return NoiseFloor(int(none.num_rows), (m, lo, hi), _median(column_floats(none, "mean_shift_reest")) if none.num_rows
                      else math.nan, (fm, flo, fhi), int(t.num_rows), flagged, FLOOR_LIMIT)


# ------------------------------------------------------- width, explained
@dataclass
class WidthMechanism:
    """shift_frozen - 1 vs feature dimension d, measured and as the theory predicts it, per configuration."""

    backbone: str
    dropout_type: str
    dropout_placement: str
    dropout_rate: float
    widths: list[float]
    measured: ShiftFit  # log(shift_frozen - 1) = a + b log d, bootstrap over trials
    theory: ShiftFit  # the same fit of shift_theory, over the same layers and replicates
    rho: float  # median over the layers
    d_cos2: tuple[float, float]  # median at the smallest and the largest width
    diff: float = math.nan  # b theory - b measured over the layers where both excesses are > 0
    diff_ci: tuple[float, float] = (math.nan, math.nan)  # paired bootstrap over trials

    @property
    def explained(self) -> bool | None:
        """True: the paired interval of (theory - measured) slope holds 0; None: no interval."""
        lo, hi = self.diff_ci
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return None
        return lo <= 0.0 <= hi


def _paired_slope_diff(x: np.ndarray, y1: np.ndarray, y2: np.ndarray, unit: np.ndarray, rng: np.random.Generator,
                       n_boot: int, level: float) -> tuple[float, tuple[float, float]]:
    """OLS slope of y2 on x minus that of y1 on x, with a percentile bootstrap resampling `unit`s (trials)."""
    m = int(unit.max()) + 1
    suffs = [ols_sufficient(unit, m, x, y) for y in (y1, y2)]

    def slopes(w: np.ndarray) -> np.ndarray:  # w: (replicates, units) multiplicities
        return ols_from_sufficient(w @ suffs[1])[0] - ols_from_sufficient(w @ suffs[0])[0]

    point = float(slopes(np.ones((1, m)))[0])
    reps = slopes(rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot).astype(float))
    if m < 2 or np.isfinite(reps).sum() < 0.9 * n_boot:
        return point, (math.nan, math.nan)
    q = [50 * (1 - level), 50 * (1 + level)]
    lo, hi = np.nanpercentile(reps, q)
    return point, (float(lo), float(hi))


def width_mechanism(study: Study, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[WidthMechanism]:
    """Fit the frozen and the theoretical excess shift against d for every configuration tried at >= 2 widths."""
    L = fed_layers(study)
    if L.num_rows == 0 or missing_columns(study):
        return []
    L = L.filter(pc.and_(pc.is_valid(L.column("fan_in")), pc.greater(pc.fill_null(L.column("fan_in"), 0), 0)))
    fro, th = column_floats(L, "shift_frozen"), column_floats(L, "shift_theory")
    L = L.filter(pa.array(np.isfinite(fro) & np.isfinite(th)))
    if L.num_rows == 0:
        return []
    codes, keys = group_codes(L, GROUP)
    runs = pc.dictionary_encode(L.column("run_id").combine_chunks()).indices.to_numpy().astype(np.int64)
    d, fro, th = column_floats(L, "fan_in"), column_floats(L, "shift_frozen"), column_floats(L, "shift_theory")
    width, rho, dc = column_floats(L, "width"), column_floats(L, "rho"), column_floats(L, "d_cos2")
    out = []
    for g, key in enumerate(keys):
        rows = np.flatnonzero(codes == g)
        widths = sorted(set(width[rows].tolist()))
        if len(widths) < 2:
            continue
        fits = [_fit_group(key[1:], rows, d, s, runs, np.random.default_rng(seed + g), n_boot, level)
                for s in (fro, th)]
        lo_w, hi_w = rows[width[rows] == widths[0]], rows[width[rows] == widths[-1]]
        w = WidthMechanism(key[0], *key[1:], widths=widths, measured=fits[0], theory=fits[1],
                           rho=_median(rho[rows]), d_cos2=(_median(dc[lo_w]), _median(dc[hi_w])))
        both = rows[(fro[rows] > 1.0) & (th[rows] > 1.0)]
        if both.size >= 3 and np.unique(d[both]).size >= 2:
            _, unit = np.unique(runs[both], return_inverse=True)
            w.diff, w.diff_ci = _paired_slope_diff(np.log(d[both]), np.log(fro[both] - 1.0), np.log(th[both] - 1.0),
                                                   unit, np.random.default_rng(seed + 7919 * (g + 1)), n_boot, level)
        out.append(w)
    return out
