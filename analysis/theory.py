"""Closed forms of the variance shift (PAPER.md, "Formulas"), vectorised over numpy arrays.

Notation as the paper: p is the RETAIN ratio (the user-facing drop rate is
1 - p), a unit x has mean c and variance v, d is the fan-in of the weight
layer between dropout and BN, cos2 = cos^2 of the angle between its weight
vector and all-ones, rho the pairwise correlation of its inputs.

Every `shift_*` returns Delta = Var_test / Var_train (< 1 for Bernoulli
dropout); `paper_shift` turns it into the empirical metric max(Delta, 1/Delta)
that `search.probes` measures. All functions broadcast their arguments like
numpy ufuncs and return a numpy array (a numpy scalar for scalar input).

Case (b) in general: X = sum_i w_i y_i with y_i the noisy units. With unit
train variance s = Var_train(y_i) and k = d cos^2:

    Var_test  ∝ v rho k + v (1 - rho)
    Var_train ∝ v rho k + s - v rho

so for rho = 0 case (b) equals case (a) whatever d is: the fan-in only damps
the shift through correlated inputs (rho > 0).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from search import registry

__all__ = [
    "shift_case_a", "shift_case_b", "shift_gaussian", "shift_uout", "shift_uout_case_b",
    "unit_train_var", "paper_shift", "predict_delta", "predict_layer_shift",
    "closed_form_kinds", "placement_cases", "noise_var", "rho_from_variance", "exact_train_var",
]



def closed_form_kinds(case: str | None = None) -> tuple[str, ...]:
    """Registered dropout kinds with an element-wise closed form (search.registry); with case='a', also the
    kinds whose closed form holds for case (a) only (closed_form='case_a': masks shared across elements, whose
    one-element marginal is all a BN's per-channel moments see; docs/theory.md, "Structured kinds")."""
    ok = ("elementwise", "case_a") if case == "a" else ("elementwise",)
    return tuple(e.name for e in registry.entries("dropout") if e.meta.get("closed_form") in ok)


def placement_cases() -> dict[str, str | None]:
    """Registered placement -> the closed form that applies ('a', 'b'; None feeds no BN: Delta = 1)."""
    return {e.name: e.meta.get("case") for e in registry.entries("placement")}


def noise_var(kind: str, rate: ArrayLike) -> np.ndarray:
    """Variance of kind's multiplier at user-facing `rate` (E[m] = 1): 1/p - 1 for bernoulli and
    gaussian, beta^2/3 for uout; read from the kind's class in the registry.

    Raises:
        ValueError: a kind without an element-wise closed form, or rate outside [0, 1).
    """
    rate = _rate(kind, rate, case="a")  # the one-element variance: defined for case (a)-only kinds too
    cls = registry.get("dropout", kind, field_name="dropout_type").obj
    return _out(np.asarray(np.vectorize(cls.noise_var, otypes=[float])(rate)))

ArrayLike = Any  # float | np.ndarray | sequences thereof


def _out(x: np.ndarray) -> np.ndarray:
    return x[()] if x.ndim == 0 else x  # numpy scalar for scalar input, like ufuncs


def _bad(x: np.ndarray, mask: np.ndarray) -> str:
    """The offending values, briefly (arrays may be long)."""
    bad = np.unique(np.broadcast_to(x, mask.shape)[mask])
    return ", ".join(repr(float(b)) for b in bad[:5]) + (", ..." if bad.size > 5 else "")


def _retain(p: ArrayLike) -> np.ndarray:
    p = np.asarray(p, dtype=float)
    if np.any((p <= 0) | (p > 1)):
        raise ValueError(f"retain ratio p must be in (0, 1], got {_bad(p, (p <= 0) | (p > 1))}")
    return p


def _beta(beta: ArrayLike) -> np.ndarray:
    beta = np.asarray(beta, dtype=float)
    if np.any(beta < 0):
        raise ValueError(f"uout beta must be >= 0, got {_bad(beta, beta < 0)}")
    return beta


def _through_weights(s: np.ndarray, v: np.ndarray, rho: ArrayLike, d: ArrayLike, cos2: ArrayLike) -> np.ndarray:
    """Delta after a weight layer, given unit train variance s (module docstring)."""
    rho, k = np.asarray(rho, float), np.asarray(d, float) * np.asarray(cos2, float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # Multiplied through by k = d cos^2 so k = 0 stays finite; k = inf is the limit 1 (if rho != 0).
        test = v * rho * k + v * (1.0 - rho)
        train = v * rho * k + s - v * rho
        out = test / train
        limit = np.where(rho != 0, 1.0, v / s)
        return np.where(np.isinf(k), limit, out)


def shift_case_a(p: ArrayLike, c: ArrayLike, v: ArrayLike) -> np.ndarray:
    """Dropout directly before BN (Dropout-(a)).

    Delta(p) = v / ((1/p)(c^2 + v) - c^2)   (= p when c = 0).

    Args:
        p: retain ratio in (0, 1].
        c, v: mean and variance of the unit entering dropout.

    Returns:
        Var_test / Var_train.

    Raises:
        ValueError: p outside (0, 1].
    """
    p = _retain(p)
    c, v = np.asarray(c, float), np.asarray(v, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _out(np.asarray(v / ((c * c + v) / p - c * c)))


def shift_case_b(p: ArrayLike, c: ArrayLike, v: ArrayLike, rho: ArrayLike, d: ArrayLike,
                 cos2: ArrayLike) -> np.ndarray:
    """Dropout -> weight layer of fan-in d -> BN (Dropout-(b)).

    Delta(p, d) = [v rho + v(1 - rho)/(d cos^2)]
                  / [v rho + ((1/p - 1) c^2 + v (1/p - rho))/(d cos^2)]

    Tends to 1 as p -> 1 or (for rho > 0) as d cos^2 -> inf; equals case (a) when rho = 0.

    Args:
        p: retain ratio in (0, 1].
        c, v, rho: shared mean, variance and pairwise correlation of the layer's inputs.
        d: fan-in of the weight layer.
        cos2: cos^2 between its weight vector and the all-ones vector.

    Raises:
        ValueError: p outside (0, 1].
    """
    p = _retain(p)
    c, v = np.asarray(c, float), np.asarray(v, float)
    return _out(np.asarray(_through_weights((c * c + v) / p - c * c, v, rho, d, cos2)))


def shift_gaussian(p: ArrayLike, c: ArrayLike, v: ArrayLike) -> np.ndarray:
    """Gaussian dropout x*g, g ~ N(1, (1-p)/p), directly before BN.

    Var_train = (c^2 + v)(1 + (1-p)/p) - c^2 = Bernoulli's, so Delta is case (a)'s.

    Raises:
        ValueError: p outside (0, 1].
    """
    return shift_case_a(p, c, v)


def shift_uout(beta: ArrayLike, c: ArrayLike, v: ArrayLike) -> np.ndarray:
    """Uout x(1 + r), r ~ U(-beta, beta), directly before BN.

    Delta = v / (v + (beta^2/3)(c^2 + v))   (= 3/(3 + beta^2) when c = 0).

    Raises:
        ValueError: beta < 0.
    """
    beta = _beta(beta)
    c, v = np.asarray(c, float), np.asarray(v, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _out(np.asarray(v / (v + beta * beta / 3.0 * (c * c + v))))


def shift_uout_case_b(beta: ArrayLike, c: ArrayLike, v: ArrayLike, rho: ArrayLike, d: ArrayLike,
                      cos2: ArrayLike) -> np.ndarray:
    """Uout -> weight layer -> BN: case (b)'s derivation with Uout's unit variance.

    Delta = [v rho k + v(1 - rho)] / [v rho k + v(1 - rho) + (beta^2/3)(c^2 + v)],  k = d cos^2.

    Raises:
        ValueError: beta < 0.
    """
    beta = _beta(beta)
    c, v = np.asarray(c, float), np.asarray(v, float)
    return _out(np.asarray(_through_weights(v + beta * beta / 3.0 * (c * c + v), v, rho, d, cos2)))


def unit_train_var(kind: str, rate: ArrayLike, c: ArrayLike, v: ArrayLike) -> np.ndarray:
    """Train-mode variance of one unit (mean c, variance v) after dropout `kind` at user-facing `rate`.

    bernoulli, gaussian: (1/p)(c^2 + v) - c^2 with p = 1 - rate; uout: v + (rate^2/3)(c^2 + v).

    Raises:
        ValueError: unknown kind, or rate outside [0, 1).
    """
    k = noise_var(kind, rate)
    c, v = np.asarray(c, float), np.asarray(v, float)
    return _out(np.asarray(v + k * (c * c + v)))


def paper_shift(delta: ArrayLike) -> np.ndarray:
    """The empirical metric from Delta: max(Delta, 1/Delta) (1 = no shift)."""
    delta = np.asarray(delta, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _out(np.asarray(np.maximum(delta, 1.0 / delta)))


def _rate(kind: str, rate: ArrayLike, case: str | None = None) -> np.ndarray:
    kinds = closed_form_kinds(case)
    if kind not in kinds:
        where = f" for case ({case})" if case else ""
        raise ValueError(f"field 'dropout_type' = {kind!r} has no closed form{where} (allowed: {', '.join(kinds)})")
    rate = np.asarray(rate, float)
    if np.any((rate < 0) | (rate >= 1)):
        raise ValueError(f"field 'dropout_rate' must be in [0, 1), got {_bad(rate, (rate < 0) | (rate >= 1))}")
    return rate


def predict_delta(kind: str, placement: str, rate: ArrayLike, c: ArrayLike, v: ArrayLike, d: ArrayLike = np.nan,
                  cos2: ArrayLike = np.nan, rho: ArrayLike = 0.0) -> np.ndarray:
    """Var_test / Var_train at a BN layer from the framework's vocabulary.

    pre_bn -> case (a) (`shift_case_a`, `shift_uout`); pre_conv -> case (b)
    (`shift_case_b`, `shift_uout_case_b`); head / none -> 1.

    Args:
        kind: dropout_type ('bernoulli', 'gaussian', 'uout').
        placement: dropout_placement ('pre_bn', 'pre_conv', 'head', 'none').
        rate: user-facing drop rate: p = 1 - rate (bernoulli, gaussian); beta = rate (uout).
        c, v: mean and variance of the units entering dropout.
        d, cos2: fan-in and cos^2 of the weight layer (pre_conv only).
        rho: pairwise correlation of that layer's inputs (pre_conv only). The default
            0 makes pre_conv equal pre_bn: pass a measured or assumed rho to see d act.

    Raises:
        ValueError: unknown kind or placement, or rate outside [0, 1).
    """
    cases = placement_cases()
    if placement not in cases:
        raise ValueError(f"field 'dropout_placement' = {placement!r} is not allowed"
                         f" (allowed: {', '.join(cases)})")
    case = cases[placement]
    rate = _rate(kind, rate, case)  # case (b) needs element-wise masks; case (a) only one element's marginal
    if case is None:
        shape = np.broadcast_shapes(rate.shape, np.shape(c), np.shape(v))
        return _out(np.ones(shape))
    c, v = np.asarray(c, float), np.asarray(v, float)
    s = unit_train_var(kind, rate, c, v)  # the kind's closed form, from its registered noise variance
    if case == "a":
        with np.errstate(divide="ignore", invalid="ignore"):
            return _out(np.asarray(v / s))
    return _out(np.asarray(_through_weights(s, v, rho, d, cos2)))


def predict_layer_shift(kind: str, placement: str, rate: ArrayLike, c: ArrayLike, v: ArrayLike,
                        d: ArrayLike = np.nan, cos2: ArrayLike = np.nan, rho: ArrayLike = 0.0) -> np.ndarray:
    """Predicted empirical shift max(Delta, 1/Delta) of a BN layer fed by dropout; see `predict_delta`.

    Vectorised: pass arrays of per-layer c, v, d, cos2 (e.g. LayerShift.real_mean,
    real_var, fan_in, cos2) to predict a whole model at once.

    Raises:
        ValueError: unknown kind or placement, or rate outside [0, 1).
    """
    return paper_shift(predict_delta(kind, placement, rate, c, v, d, cos2, rho))


# ------------------------------------------------ case (b) from measured quantities (PAPER.md)
def rho_from_variance(var_out: ArrayLike, v: float, sq: ArrayLike, D: ArrayLike) -> float:
    """Effective input correlation from eval-mode output variances (the probe's estimator).

    Model: Var(Wx)_j = v ||w_j||^2 (1 + rho (D_j - 1)), D_j = (sum_i w_ji)^2 / ||w_j||^2, for inputs
    of equal variance v and equal pairwise correlation rho. Least squares over output units j of
    b_j = Var_j - v ||w_j||^2 on a_j = v ||w_j||^2 (D_j - 1): rho = sum a b / sum a^2. Real inputs
    are neither equal-variance nor equicorrelated, and a conv's zero padding drops border taps: the
    estimate is the rho that makes the paper's model reproduce the measured variances.

    Args:
        var_out: per-unit eval-mode variance of the weight layer's output.
        v: the mean variance of its inputs.
        sq: per-unit ||w_j||^2.
        D: per-unit D_j (= d cos^2 theta_j).

    Returns:
        rho (NaN when every D_j = 1 leaves it unidentified).
    """
    var_out, sq, D = (np.asarray(a, float) for a in (var_out, sq, D))
    a, b = v * sq * (D - 1.0), var_out - v * sq
    ok = np.isfinite(a) & np.isfinite(b)
    den = float((a[ok] ** 2).sum())
    return float((a[ok] * b[ok]).sum() / den) if den > 0 else float("nan")


def exact_train_var(var_test: ArrayLike, k: ArrayLike, sq_moment: ArrayLike) -> np.ndarray:
    """PAPER.md's exact form: Var_train(X_j) = Var_test(X_j) + k sum_i w_ji^2 E[x_i^2].

    Args:
        var_test: eval-mode variance of the unit.
        k: the kind's noise variance (`noise_var`).
        sq_moment: sum_i w_ji^2 E[x_i^2] (for a conv: the mean of conv2d(x^2, w^2); case (a): E[x^2]).
    """
    return _out(np.asarray(np.asarray(var_test, float) + np.asarray(k, float) * np.asarray(sq_moment, float)))
