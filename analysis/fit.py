"""The study's fits: shift vs feature dimension, accuracy cost vs width, BN re-estimation.

Vectorised numpy over Arrow columns; every random step (the bootstrap) is
seeded. Intervals are two-sided at `level` (0.95): t intervals over seeds for
accuracy, a percentile bootstrap over trials (clusters of layers) for slopes.
`analysis.guidelines.analyse` runs them all and states what they support.
"""
from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

from .theory import closed_form_kinds, placement_cases, predict_layer_shift
from .load import (DROPOUT_KEYS, SCHEDULE_FIELDS, Study, constant_schedule, context_fields, context_key, group_codes,
                   varying)

__all__ = ["ShiftFit", "CostCell", "CriticalWidth", "ReestRow", "Correlation", "MeanTest", "shift_vs_dim",
           "accuracy_cost", "bn_reestimation", "mean_ci", "mean_test", "not_testable", "holm", "MIN_UNITS",
           "accuracy_step"]

MIN_CLUSTERS = 5  # fewer trials than this: bootstrap the layers instead (and say so)
Key = tuple[tuple[str, Any], ...]  # ((field, value), ...) of the context a row belongs to


# ------------------------------------------------------------------ statistics
MIN_UNITS = 3  # fewer independent units than this: no t interval or p (not testable), only the point
POWER = 0.8  # the power at which `MeanTest.mde` is stated


@dataclass(frozen=True)
class MeanTest:
    """A mean over independent units (seeds, trials) with its interval, test and what it could detect.

    method: 't' (Student t over the units), 'sign-flip' (every unit equal: the exact sign-flip test
    over 2^n assignments; no interval, since a sample without spread gives no honest width), or
    'not testable (n = k)' (fewer than MIN_UNITS units). `mde`: the smallest |mean| a two-sided
    t test at this n and spread detects with power POWER (NaN where no spread was measured).
    """

    mean: float
    low: float
    high: float
    p: float
    n: int
    method: str
    mde: float = math.nan

    def __iter__(self):  # (mean, low, high, p, n): what `mean_ci` always returned
        return iter((self.mean, self.low, self.high, self.p, self.n))

    @property
    def has_ci(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


def not_testable(n: int) -> str:
    return f"not testable (n = {n})"


def mean_test(x: np.ndarray, level: float = 0.95) -> MeanTest:
    """Mean of the finite values, with a t interval and p (mean = 0) only where the sample carries one.

    n < MIN_UNITS: the point only. Every value equal (no spread): the exact sign-flip p
    (2^(1-n), or 1 for a zero mean) and no interval. Never p = 0 nor a zero-width interval.
    """
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return MeanTest(math.nan, math.nan, math.nan, math.nan, 0, not_testable(0))
    m = float(x.mean())
    if n < MIN_UNITS:
        return MeanTest(m, math.nan, math.nan, math.nan, n, not_testable(n))
    sd = float(x.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(m)):
        return MeanTest(m, math.nan, math.nan, 1.0 if m == 0 else float(2.0 ** (1 - n)), n, "sign-flip")
    se = sd / math.sqrt(n)
    tq = float(stats.t.ppf(0.5 + level / 2, n - 1))
    mde = (tq + float(stats.t.ppf(POWER, n - 1))) * se
    return MeanTest(m, m - tq * se, m + tq * se, float(2 * stats.t.sf(abs(m / se), n - 1)), n, "t", mde)


def mean_ci(x: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float, int]:
    """Mean, t-interval low/high, two-sided p (mean = 0) and n of the finite values (`mean_test`'s rules:
    no interval below MIN_UNITS values or without spread)."""
    return tuple(mean_test(x, level))  # type: ignore[return-value]


def _welch(a: np.ndarray, b: np.ndarray, level: float) -> tuple[float, float, float, float, str, float]:
    """Difference of means a - b with Welch's t interval, p, method and detectable effect (`mean_test`'s rules)."""
    d = float(a.mean() - b.mean())
    if min(a.size, b.size) < MIN_UNITS:
        return d, math.nan, math.nan, math.nan, f"welch, {not_testable(min(a.size, b.size))}", math.nan
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se <= 1e-12 * max(1.0, abs(d)):
        return d, math.nan, math.nan, math.nan, "welch, not testable (no spread)", math.nan
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    tq = float(stats.t.ppf(0.5 + level / 2, df))
    mde = (tq + float(stats.t.ppf(POWER, df))) * se
    return d, d - tq * se, d + tq * se, float(2 * stats.t.sf(abs(d / se), df)), "welch", mde


def accuracy_step(trials: pa.Table) -> tuple[float, str]:
    """What one test image is worth in accuracy (a fraction), and where that comes from.

    From the trials' `n_test` where recorded ('n_test = N'); else inferred from the accuracies, which
    are multiples of 1/N ('inferred'); ('', NaN) when neither tells. Accuracy differences smaller than
    this step cannot be seen, and every cost moves in multiples of it.
    """
    if "n_test" in trials.column_names:
        n = pc.fill_null(pc.cast(trials.column("n_test"), pa.float64()), math.nan).to_numpy(zero_copy_only=False)
        n = np.unique(n[np.isfinite(n) & (n > 0)])
        if n.size:
            return 1.0 / float(n.max()), ("n_test = " + ", ".join(f"{v:.0f}" for v in n))
    acc = np.unique(pc.fill_null(trials.column("test_acc"), math.nan).to_numpy(zero_copy_only=False))
    acc = acc[np.isfinite(acc) & (acc > 0) & (acc < 1)]
    if acc.size == 0:
        return math.nan, ""
    # Each accuracy is k/N for the test set's N: the least common denominator of the reduced fractions.
    n_img = 1
    for x in acc[:200].tolist():
        n_img = math.lcm(n_img, Fraction(x).limit_denominator(100_000).denominator)
        if n_img > 1_000_000:
            return math.nan, ""
    if n_img > 1 and np.allclose(acc * n_img, np.round(acc * n_img), atol=1e-6 * n_img):
        return 1.0 / n_img, f"inferred: accuracies are multiples of 1/{n_img}"
    return math.nan, ""


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count as a test)."""
    p = np.asarray(p, float)
    out = np.full(p.shape, math.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size:
        order = ok[np.argsort(p[ok])]
        adj = np.maximum.accumulate(p[order] * (ok.size - np.arange(ok.size)))
        out[order] = np.minimum(adj, 1.0)
    return out


# ------------------------------------------------------------ shift vs d fit
@dataclass
class ShiftFit:
    """log(shift - 1) = intercept + slope * log(d) over BN layers fed by one dropout configuration."""

    dropout_type: str
    dropout_placement: str
    dropout_rate: float
    n: int  # layers in the fit (shift > 1)
    n_trials: int
    n_dropped: int  # layers with shift <= 1 (log undefined)
    n_dims: int  # distinct d
    slope: float = math.nan
    intercept: float = math.nan
    r2: float = math.nan
    slope_ci: tuple[float, float] = (math.nan, math.nan)
    intercept_ci: tuple[float, float] = (math.nan, math.nan)
    resample: str = "trials"  # the bootstrap unit: 'trials' (clusters of layers) or 'layers'
    shift_mean: float = math.nan
    # The paper's closed form (analysis.theory.predict_layer_shift) over the same layers, fitted like the data:
    # with the measured rho, d cos^2, c_in and v_in of the mechanism probe where recorded, else rho = 0 with the
    # BN input's c and v (older results; `closed_form_inputs` says which).
    theory_mean: float = math.nan  # mean closed-form shift over the same layers
    theory_slope: float = math.nan
    theory_intercept: float = math.nan
    cos2_assumed: int = 0  # layers without a measured cos^2 (the closed form used cos^2 = 1)
    closed_form_inputs: str = ""  # 'measured' (rho, d cos^2, c_in, v_in) | 'rho = 0' | '' (not computed)
    note: str = ""



def _predict(fn: Callable[..., Any], key: tuple, c: np.ndarray, v: np.ndarray, d: np.ndarray,
             cos2: np.ndarray, rho: np.ndarray | None = None) -> np.ndarray:
    """Predicted paper shift per point; arrays at once when the theory accepts them, else one by one."""
    rho = np.zeros_like(c) if rho is None else rho
    try:
        out = np.asarray(fn(*key, c, v, d, cos2, rho), float)
        assert out.shape == c.shape
    except Exception:  # noqa: BLE001 - whatever the array call did wrong: call per point
        out = np.array([_scalar(fn, key, *a) for a in zip(c.tolist(), v.tolist(), d.tolist(), cos2.tolist(),
                                                          rho.tolist())])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.maximum(out, 1.0 / out)  # paper_shift, idempotent if the theory already returns it


def _scalar(fn: Callable[..., Any], key: tuple, *args: float) -> float:
    try:
        return float(fn(*key, *args))
    except (ValueError, ArithmeticError):  # outside the theory's domain
        return math.nan


def _ols(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> tuple[float, float]:
    w = np.ones_like(x) if w is None else w
    sw, sx, sy = w.sum(), (w * x).sum(), (w * y).sum()
    den = sw * (w * x * x).sum() - sx * sx
    if den <= 0:
        return math.nan, math.nan
    slope = (sw * (w * x * y).sum() - sx * sy) / den
    return float(slope), float((sy - slope * sx) / sw)


NO_CLOSED_FORM = ("no closed form at this placement (its masks are shared, not element-wise; docs/theory.md):"
                  " measured only")


def shift_vs_dim(study: Study, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[ShiftFit]:
    """Fit log(shift - 1) against log(fan_in) per (dropout_type, placement, rate).

    Uses BN layers with fed_by_dropout and a finite fan_in > 0; layers with shift <= 1 are
    dropped (counted). The slope/intercept CIs are percentile bootstraps resampling trials
    (each trial's layers together); with fewer than 5 trials, layers are resampled instead.
    """
    L = study.layers
    if L.num_rows == 0:
        return []
    fan = L.column("fan_in")
    mask = pc.and_(pc.and_(pc.fill_null(L.column("fed_by_dropout"), False), pc.is_valid(fan)),
                   pc.not_equal(L.column("dropout_placement"), "none"))
    L = L.filter(pc.and_(mask, constant_schedule(L)))  # dropout_rate is the rate in force (load.constant_schedule)
    L = L.filter(pc.and_(pc.greater(L.column("fan_in"), 0), pc.is_finite(L.column("shift"))))
    if L.num_rows == 0:
        return []
    codes, keys = group_codes(L, DROPOUT_KEYS)
    runs = pc.dictionary_encode(L.column("run_id").combine_chunks()).indices.to_numpy().astype(np.int64)
    d, s = L.column("fan_in").to_numpy().astype(float), L.column("shift").to_numpy()
    c, v, cos2 = (L.column(k).to_numpy() for k in ("real_mean", "real_var", "cos2"))
    # The closed form's inputs: the mechanism probe's measured ones where recorded (the dropout's input c_in,
    # v_in; rho; D = d cos^2 of the feeding weights), else the BN input's c, v with rho = 0 (older results).
    num = lambda k: (pc.fill_null(pc.cast(L.column(k), pa.float64()), math.nan).to_numpy(zero_copy_only=False)  # noqa
                     if k in L.column_names else np.full(L.num_rows, math.nan))
    c_in, v_in, rho_m, dc = num("c_in"), num("v_in"), num("rho"), num("d_cos2")
    measured = np.isfinite(c_in) & np.isfinite(v_in) & np.isfinite(rho_m) & np.isfinite(dc)
    c, v = np.where(measured, c_in, c), np.where(measured, v_in, v)
    cos2, rho = np.where(measured, dc / d, cos2), np.where(measured, rho_m, 0.0)
    theory, rng = predict_layer_shift, np.random.default_rng(seed)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(keys) + 1))
    fits, cases = [], placement_cases()
    for g, key in enumerate(keys):
        rows = order[bounds[g]:bounds[g + 1]]
        fit = _fit_group(key, rows, d, s, runs, rng, n_boot, level)
        if key[0] not in closed_form_kinds(cases.get(key[1])):  # shared masks without a closed form here: said so
            fit.note = f"{fit.note}; {NO_CLOSED_FORM}" if fit.note else NO_CLOSED_FORM
            fits.append(fit)
            continue
        _add_theory(fit, theory, key, d[rows], c[rows], v[rows], cos2[rows], rho[rows])
        fit.closed_form_inputs = "measured" if measured[rows].all() else "rho = 0"
        fits.append(fit)
    return sorted(fits, key=lambda f: (f.dropout_type, f.dropout_placement, f.dropout_rate))


def ols_sufficient(unit: np.ndarray, m: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per resampling unit (m of them), the sums (n, x, y, x^2, xy): a bootstrap replicate of an OLS fit is a
    weighted sum of these rows."""
    return np.stack([np.bincount(unit, w, minlength=m) for w in (np.ones_like(x), x, y, x * x, x * y)], axis=1)


def ols_from_sufficient(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slope, intercept) per row of summed sufficient statistics; NaN where x does not vary."""
    s0, sx, sy, sxx, sxy = sums.T
    with np.errstate(divide="ignore", invalid="ignore"):
        den = s0 * sxx - sx * sx
        b = np.where(den > 1e-12 * np.maximum(s0 * sxx, 1e-300), (s0 * sxy - sx * sy) / den, np.nan)
        return b, (sy - b * sx) / s0


def _fit_group(key: tuple, rows: np.ndarray, d: np.ndarray, s: np.ndarray, runs: np.ndarray,
               rng: np.random.Generator, n_boot: int, level: float) -> ShiftFit:
    up = s[rows] > 1.0
    x, y = np.log(d[rows][up]), np.log(s[rows][up] - 1.0)
    _, cl = np.unique(runs[rows][up], return_inverse=True)
    k = int(cl.max()) + 1 if cl.size else 0
    fit = ShiftFit(*key, n=int(up.sum()), n_trials=k, n_dropped=int((~up).sum()), n_dims=int(np.unique(x).size),
                   shift_mean=float(s[rows].mean()))
    if fit.n < 3 or fit.n_dims < 2:
        fit.note = f"not fitted: {fit.n} layers with shift > 1 over {fit.n_dims} distinct d (need 3 and 2)"
        return fit
    fit.slope, fit.intercept = _ols(x, y)
    resid = y - fit.intercept - fit.slope * x
    sst = float(((y - y.mean()) ** 2).sum())
    fit.r2 = 1.0 - float((resid**2).sum()) / sst if sst > 0 else math.nan
    # Sufficient statistics per resampling unit; a bootstrap replicate is a weighted sum of them.
    unit, fit.resample = (cl, "trials") if k >= MIN_CLUSTERS else (np.arange(x.size), "layers")
    m = int(unit.max()) + 1
    suff = ols_sufficient(unit, m, x, y)
    block = max(1, 4_000_000 // m)  # replicates per block: bounds the weight matrix to ~32 MB
    b, a = ols_from_sufficient(np.vstack([rng.multinomial(m, np.full(m, 1.0 / m), size=min(block, n_boot - i))
                                          @ suff for i in range(0, n_boot, block)]))
    q = [50 * (1 - level), 50 * (1 + level)]
    if np.isfinite(b).sum() >= 0.9 * n_boot:
        fit.slope_ci = tuple(float(t) for t in np.nanpercentile(b, q))  # type: ignore[assignment]
        fit.intercept_ci = tuple(float(t) for t in np.nanpercentile(a, q))  # type: ignore[assignment]
    else:
        fit.note = "bootstrap degenerate (most replicates hold one d): no CI"
    return fit


def _add_theory(fit: ShiftFit, theory: Callable[..., Any], key: tuple, d: np.ndarray, c: np.ndarray,
                v: np.ndarray, cos2: np.ndarray, rho: np.ndarray | None = None) -> None:
    """The closed form at each distinct d (its inputs averaged over the layers with that d), fitted like the data."""
    rho = np.zeros_like(c) if rho is None else rho
    miss = ~np.isfinite(cos2)
    fit.cos2_assumed = int(miss.sum())
    cos2 = np.where(miss, 1.0, cos2)
    dims, inv, cnt = np.unique(d, return_inverse=True, return_counts=True)
    mean = [np.bincount(inv, a) / cnt for a in (c, v, cos2, rho)]
    try:
        pred = _predict(theory, key, mean[0], mean[1], dims, mean[2], mean[3])
    except Exception as exc:  # noqa: BLE001 - a broken theory must not sink the fits: say so beside them
        fit.note = f"theory failed: {type(exc).__name__}: {exc}"
        return
    ok = np.isfinite(pred)
    if ok.any():
        fit.theory_mean = float(np.average(pred[ok], weights=cnt[ok]))
    up = ok & (pred > 1.0 + 1e-12)
    if up.sum() >= 2:
        fit.theory_slope, fit.theory_intercept = _ols(np.log(dims[up]), np.log(pred[up] - 1.0), cnt[up].astype(float))


# -------------------------------------------------------- accuracy vs width
@dataclass
class CostCell:
    """Accuracy of one dropout configuration at one width minus no dropout (placement none), same context."""

    context: Key
    dropout_type: str
    dropout_placement: str
    dropout_rate: float
    width: float
    n: int  # seeds (pairs when paired)
    cost: float  # accuracy difference as a fraction (x100 = percentage points)
    ci_low: float
    ci_high: float
    p: float
    method: str  # paired t | paired sign-flip | paired, not testable (n = 2) | welch | ... | n=1
    acc: float
    acc_none: float
    p_adj: float = math.nan
    harm: bool = False  # significantly below zero and by at least the tolerance (untested cells: on the point)
    mde: float = math.nan  # the smallest |cost| this cell's test detects with power POWER (NaN: no spread seen)

    @property
    def tested(self) -> bool:
        """A p-value exists (else the cell is a point: n = 1, fewer than MIN_UNITS seeds, or no spread)."""
        return math.isfinite(self.p)

    @property
    def has_ci(self) -> bool:
        return math.isfinite(self.ci_low) and math.isfinite(self.ci_high)


@dataclass
class CriticalWidth:
    """Smallest width from which on a configuration's cost is neither significantly below zero (Holm) nor
    wholly below -tol by its own interval."""

    context: Key
    dropout_type: str
    dropout_placement: str
    dropout_rate: float
    width: float | None  # None: not reached in this study (it still hurts at the largest width)
    widths: tuple[float, ...]
    hurts_below: bool  # some smaller width is significantly hurt (so there is a transition)
    with_ci: bool  # every cell from `width` on has an interval; else decided on points
    cell: CostCell | None = None  # the cell at `width` (or the largest width when not reached)
    below: CostCell | None = None  # the hurt cell just below `width`


def _members(codes: np.ndarray) -> list[np.ndarray]:
    """Row indices of each group code 0..G-1."""
    return np.split(np.argsort(codes, kind="stable"), np.cumsum(np.bincount(codes))[:-1]) if codes.size else []


def _by_seed(acc: np.ndarray, seed: np.ndarray, rows: np.ndarray) -> dict[int, float]:
    seeds, inv = np.unique(seed[rows], return_inverse=True)  # a seed run twice (two spaces) counts once
    return dict(zip(seeds.tolist(), (np.bincount(inv, acc[rows]) / np.bincount(inv)).tolist()))


def accuracy_cost(study: Study, *, tol: float = 0.005, level: float = 0.95, adjust: str = "holm"
                  ) -> tuple[list[CostCell], list[CriticalWidth]]:
    """Cost of each dropout configuration vs no dropout at each width, and the critical widths.

    Paired over common seeds when at least two seeds match, else Welch; fewer than MIN_UNITS seeds
    give the point only ("not testable"), and a cost equal on every seed gets the exact sign-flip p
    and no interval (`mean_test`). A cell `harm`s when its p (Holm-adjusted over the tested cells with
    `adjust='holm'`, raw with 'none') is below 1 - level and cost <= -tol; untested cells are decided
    on the point (cost <= -tol) and no guideline rests on them.
    """
    if adjust not in ("holm", "none"):
        raise ValueError(f"adjust = {adjust!r} is not allowed (allowed: holm, none)")
    t = study.trials.filter(pc.is_finite(study.trials.column("test_acc")))
    ctx = context_fields(t)
    codes, keys = group_codes(t, ctx + ["width"] + list(DROPOUT_KEYS))
    acc, seed, members, nc = t.column("test_acc").to_numpy(), t.column("seed").to_numpy(), _members(codes), len(ctx)
    # A no-dropout baseline has no drop-rate schedule: a scheduled cell is matched with its schedule fields unset.
    sched = {i for i, f in enumerate(ctx) if f in SCHEDULE_FIELDS}
    unscheduled = lambda k: tuple(None if i in sched else v for i, v in enumerate(k[:nc + 1]))  # noqa: E731
    base = {unscheduled(k): _by_seed(acc, seed, members[g]) for g, k in enumerate(keys) if k[nc + 2] == "none"}
    cells: list[CostCell] = []
    for g, k in enumerate(keys):
        if k[nc + 2] == "none" or unscheduled(k) not in base:
            continue
        a, b = _by_seed(acc, seed, members[g]), base[unscheduled(k)]
        common = sorted(set(a) & set(b))
        va, vb = np.array(list(a.values())), np.array(list(b.values()))
        if len(common) >= 2:
            r = mean_test(np.array([a[s] - b[s] for s in common]), level)
            cost, lo, hi, p, n, mde = r.mean, r.low, r.high, r.p, r.n, r.mde
            method = f"paired {r.method}"
        elif va.size >= 2 and vb.size >= 2:
            cost, lo, hi, p, method, mde = _welch(va, vb, level)
            n = min(va.size, vb.size)
        else:
            cost, lo, hi, p, n, method, mde = (float(va.mean() - vb.mean()), math.nan, math.nan, math.nan, 1, "n=1",
                                               math.nan)
        cells.append(CostCell(tuple(zip(ctx, k[:nc])), k[nc + 1], k[nc + 2], k[nc + 3], k[nc], n, cost, lo, hi,
                              p, method, float(va.mean()), float(vb.mean()), mde=mde))
    padj = holm(np.array([c.p for c in cells])) if adjust == "holm" else np.array([c.p for c in cells])
    for c, pa_ in zip(cells, padj):
        c.p_adj = float(pa_)
        # A tested cell harms on its (Holm-adjusted) test; an untested one is decided on the point, and says so.
        c.harm = bool(c.cost <= -tol and (c.p_adj < 1 - level if c.tested else True))
    cells.sort(key=lambda c: (context_key(c.context), c.dropout_type, c.dropout_placement, c.dropout_rate, c.width))
    return cells, _critical(cells, tol)


def _not_shown_harmless(c: CostCell, tol: float) -> bool:
    """Harmed (Holm), or its own interval lies wholly below -tol: no width from which on dropout "does not
    hurt" may start at such a cell. Holm guards the claim "hurts" across many cells; the critical width
    claims the opposite, so a cell whose unadjusted interval shows a cost cannot support it."""
    return c.harm or (math.isfinite(c.ci_high) and c.ci_high < -tol)


def _critical(cells: list[CostCell], tol: float = 0.0) -> list[CriticalWidth]:
    series: dict[tuple, list[CostCell]] = {}
    for c in cells:  # cells are sorted by width within a configuration
        series.setdefault((c.context, c.dropout_type, c.dropout_placement, c.dropout_rate), []).append(c)
    out = []
    for key, cs in series.items():
        first = len(cs)  # the first index from which on no cell is harmed or shown costly
        while first > 0 and not _not_shown_harmless(cs[first - 1], tol):
            first -= 1
        reached = first < len(cs)
        tail = cs[first:] if reached else cs[-1:]  # the cells the conclusion rests on
        out.append(CriticalWidth(*key, width=cs[first].width if reached else None,
                                 widths=tuple(c.width for c in cs),
                                 hurts_below=any(_not_shown_harmless(c, tol) for c in cs[:first]),
                                 with_ci=all(c.has_ci for c in tail),
                                 cell=cs[first] if reached else cs[-1], below=cs[first - 1] if first > 0 else None))
    return out


# ---------------------------------------------------------- BN re-estimation
@dataclass
class ReestRow:
    """Accuracy before and after BN re-estimation for one configuration (or one placement pooled)."""

    label: Key  # the configuration's fields, or (('dropout_placement', p),) when pooled
    n: int
    before: float
    after: float
    gain: float
    ci_low: float
    ci_high: float
    p: float
    p_adj: float = math.nan
    method: str = "t"  # mean_test's: t | sign-flip | not testable (n = k)
    mde: float = math.nan

    @property
    def has_ci(self) -> bool:
        return math.isfinite(self.ci_low) and math.isfinite(self.ci_high)


@dataclass
class Correlation:
    """Pearson correlation (Fisher-z CI) and Spearman's rho between the re-estimation gain and the shift."""

    x: str  # the shift column used
    n: int
    r: float
    ci_low: float
    ci_high: float
    p: float
    rho: float
    p_rho: float


def bn_reestimation(study: Study, *, level: float = 0.95) -> tuple[list[ReestRow], list[ReestRow], Correlation | None]:
    """Per-configuration and per-placement gain (test_acc_reest - test_acc), and its correlation with the shift.

    The shift is mean_shift_fed (BN layers fed by dropout) where measured, else mean_shift.
    Pooled rows treat the trials of a placement as one sample; their p are Holm-adjusted.
    """
    before, after = study.trials.column("test_acc").to_numpy(), study.trials.column("test_acc_reest").to_numpy()
    ok = np.isfinite(before) & np.isfinite(after)
    t, before, after = study.trials.filter(pa.array(ok)), before[ok], after[ok]
    if t.num_rows == 0:
        return [], [], None
    fields = context_fields(t)
    label_fields = varying(t, fields) + list(DROPOUT_KEYS) + ["width"]
    codes, keys = group_codes(t, fields + list(DROPOUT_KEYS) + ["width"])
    placement = np.asarray(t.column("dropout_placement").to_pylist(), dtype=object)
    groups = [(tuple((f, dict(zip(fields + list(DROPOUT_KEYS) + ["width"], k))[f]) for f in label_fields), sel)
              for k, sel in zip(keys, _members(codes))]
    rows = sorted((_reest_row(label, sel, before, after, level) for label, sel in groups),
                  key=lambda r: tuple(str(v) for _, v in r.label))
    pooled = [_reest_row((("dropout_placement", pl),), np.flatnonzero(placement == pl), before, after, level)
              for pl in sorted(set(placement))]
    for r, q in zip(pooled, holm(np.array([r.p for r in pooled]))):
        r.p_adj = float(q)
    return rows, pooled, _correlation(t, after - before, placement != "none", level)


def _reest_row(label: Key, sel: np.ndarray, before: np.ndarray, after: np.ndarray, level: float) -> ReestRow:
    r = mean_test(after[sel] - before[sel], level)
    return ReestRow(label, r.n, float(before[sel].mean()), float(after[sel].mean()), r.mean, r.low, r.high, r.p,
                    method=r.method, mde=r.mde)


def _correlation(t: pa.Table, gain: np.ndarray, dropout: np.ndarray, level: float) -> Correlation | None:
    fed, all_ = t.column("mean_shift_fed").to_numpy(), t.column("mean_shift").to_numpy()
    use_fed = np.isfinite(fed[dropout]).mean() >= 0.5 if dropout.any() else False
    x, name = (fed, "mean_shift_fed") if use_fed else (all_, "mean_shift")
    sel = dropout & np.isfinite(x) & np.isfinite(gain)
    n = int(sel.sum())
    if n < 4 or np.ptp(x[sel]) == 0 or np.ptp(gain[sel]) == 0:
        return None
    r, p = stats.pearsonr(x[sel], gain[sel])
    rho, p_rho = stats.spearmanr(x[sel], gain[sel])
    z, half = math.atanh(max(min(r, 0.999999), -0.999999)), stats.norm.ppf(0.5 + level / 2) / math.sqrt(n - 3)
    return Correlation(name, n, float(r), math.tanh(z - half), math.tanh(z + half), float(p), float(rho), float(p_rho))
