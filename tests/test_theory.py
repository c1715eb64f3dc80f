"""analysis.theory: each closed form against a seeded Monte Carlo simulation, its limits, and the mapping
from the framework's vocabulary (kind, placement, rate).

Monte Carlo tolerance: Var_test and Var_train are estimated from independent samples of n draws each, so
log(Delta_hat) has standard error sqrt((k_test - 1)/n + (k_train - 1)/n), k the kurtosis of each sample
(estimated from the sample). We accept |Delta_hat / Delta - 1| < 5 standard errors (a false failure has
probability below 1e-6 for a normal estimator; the seeds are fixed, so it is deterministic anyway).
With n = 1e6 (scalar cases) or 2e5 (case b) that is a relative tolerance of roughly 1% to 3%.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from analysis.theory import (
    paper_shift, predict_delta, predict_layer_shift, shift_case_a, shift_case_b, shift_gaussian, shift_uout,
    shift_uout_case_b, unit_train_var,
)

N_SE = 5.0


def _kurtosis(x: np.ndarray) -> float:
    d = x - x.mean()
    return float((d**4).mean() / (d**2).mean() ** 2)


def assert_ratio(test: np.ndarray, train: np.ndarray, want: float) -> None:
    """Var(test)/Var(train) equals `want` within N_SE standard errors of the log ratio."""
    got = test.var() / train.var()
    se = np.sqrt((_kurtosis(test) - 1) / test.size + (_kurtosis(train) - 1) / train.size)
    assert abs(np.log(got / want)) < N_SE * se, (got, want, se)


def units(rng: np.random.Generator, n: int, c: float, v: float) -> np.ndarray:
    return c + np.sqrt(v) * rng.standard_normal(n)


# ------------------------------------------------------------------ case (a)
@pytest.mark.parametrize("p, c, v", [(0.5, 1.0, 1.0), (0.9, 2.0, 0.5), (0.3, 0.0, 1.0), (0.7, -1.0, 3.0)])
def test_case_a_monte_carlo(p: float, c: float, v: float) -> None:
    rng = np.random.default_rng(0)
    n = 1_000_000
    train = units(rng, n, c, v) * (rng.random(n) < p) / p  # inverted dropout, retain p
    assert_ratio(units(rng, n, c, v), train, float(shift_case_a(p, c, v)))


@pytest.mark.parametrize("p, c, v", [(0.5, 1.0, 1.0), (0.8, 2.0, 0.5)])
def test_gaussian_monte_carlo(p: float, c: float, v: float) -> None:
    rng = np.random.default_rng(1)
    n = 1_000_000
    g = 1.0 + np.sqrt((1 - p) / p) * rng.standard_normal(n)
    assert_ratio(units(rng, n, c, v), units(rng, n, c, v) * g, float(shift_gaussian(p, c, v)))


@pytest.mark.parametrize("beta, c, v", [(0.1, 1.0, 1.0), (0.5, 2.0, 0.5), (0.9, 0.0, 1.0)])
def test_uout_monte_carlo(beta: float, c: float, v: float) -> None:
    rng = np.random.default_rng(2)
    n = 1_000_000
    r = rng.uniform(-beta, beta, n)
    assert_ratio(units(rng, n, c, v), units(rng, n, c, v) * (1 + r), float(shift_uout(beta, c, v)))


# ------------------------------------------------------------------ case (b)
def correlated_units(rng: np.random.Generator, n: int, d: int, c: float, v: float, rho: float) -> np.ndarray:
    """n x d inputs with mean c, variance v and pairwise correlation rho (a common factor)."""
    common = rng.standard_normal((n, 1))
    return c + np.sqrt(v) * (np.sqrt(rho) * common + np.sqrt(1 - rho) * rng.standard_normal((n, d)))


def weight_with_cos2(rng: np.random.Generator, d: int, cos2: float) -> np.ndarray:
    """A weight vector whose cos^2 with the all-ones vector is `cos2` (scaled arbitrarily)."""
    ones = np.ones(d) / np.sqrt(d)
    r = rng.standard_normal(d)
    r -= (r @ ones) * ones
    w = 3.0 * (np.sqrt(cos2) * ones + np.sqrt(1 - cos2) * r / np.linalg.norm(r))
    assert w.sum() ** 2 / (d * w @ w) == pytest.approx(cos2)
    return w


CASE_B = [  # p (or beta), c, v, rho, d, cos2
    (0.5, 1.0, 1.0, 0.3, 16, 0.8),
    (0.9, 0.5, 2.0, 0.6, 8, 0.5),
    (0.7, 0.0, 1.0, 0.1, 32, 1.0),
    (0.5, 2.0, 0.5, 0.0, 16, 0.3),  # rho = 0: d has no effect (equals case (a))
]


@pytest.mark.parametrize("p, c, v, rho, d, cos2", CASE_B)
def test_case_b_monte_carlo(p: float, c: float, v: float, rho: float, d: int, cos2: float) -> None:
    rng = np.random.default_rng(3)
    n = 200_000
    w = weight_with_cos2(rng, d, cos2)
    test = correlated_units(rng, n, d, c, v, rho) @ w
    mask = rng.random((n, d)) < p
    train = (correlated_units(rng, n, d, c, v, rho) * mask / p) @ w
    assert_ratio(test, train, float(shift_case_b(p, c, v, rho, d, cos2)))


@pytest.mark.parametrize("beta, c, v, rho, d, cos2", [(0.5, 1.0, 1.0, 0.3, 16, 0.8), (0.9, 2.0, 0.5, 0.2, 8, 0.6)])
def test_uout_case_b_monte_carlo(beta: float, c: float, v: float, rho: float, d: int, cos2: float) -> None:
    rng = np.random.default_rng(4)
    n = 200_000
    w = weight_with_cos2(rng, d, cos2)
    test = correlated_units(rng, n, d, c, v, rho) @ w
    train = (correlated_units(rng, n, d, c, v, rho) * (1 + rng.uniform(-beta, beta, (n, d)))) @ w
    assert_ratio(test, train, float(shift_uout_case_b(beta, c, v, rho, d, cos2)))


# ------------------------------------------------------------------- limits
def test_limits_and_special_values() -> None:
    p = np.array([0.1, 0.3, 0.5, 0.9, 1.0])
    assert np.allclose(shift_case_a(p, 0.0, 2.0), p)  # c = 0: Delta = p
    beta = np.array([0.0, 0.1, 0.5, 0.9])
    assert np.allclose(shift_uout(beta, 0.0, 1.5), 3.0 / (3.0 + beta**2))
    # p -> 1: no shift, in every form
    assert shift_case_a(1.0, 1.3, 0.7) == pytest.approx(1.0)
    assert shift_case_b(1.0, 1.3, 0.7, 0.2, 10, 0.5) == pytest.approx(1.0)
    assert shift_case_a(1 - 1e-9, 1.3, 0.7) == pytest.approx(1.0, abs=1e-7)
    assert shift_uout(0.0, 1.3, 0.7) == 1.0
    # d cos^2 -> inf with rho > 0: Delta -> 1, monotonically
    dims = np.array([1, 4, 16, 64, 256, 1e4, 1e9])
    delta = shift_case_b(0.5, 1.0, 1.0, 0.3, dims, 0.8)
    assert np.all(np.diff(delta) > 0) and delta[-1] == pytest.approx(1.0, abs=1e-6)
    assert shift_case_b(0.5, 1.0, 1.0, 0.3, np.inf, 1.0) == 1.0
    assert shift_uout_case_b(0.5, 1.0, 1.0, 0.3, 1e9, 1.0) == pytest.approx(1.0, abs=1e-6)
    # rho = 0: case (b) is case (a) for any d; cos^2 = 0 stays finite
    assert np.allclose(shift_case_b(0.6, 1.0, 2.0, 0.0, dims, 0.5), shift_case_a(0.6, 1.0, 2.0))
    assert np.allclose(shift_case_b(0.6, 1.0, 2.0, 0.0, np.inf, 0.5), shift_case_a(0.6, 1.0, 2.0))
    s = unit_train_var("bernoulli", 0.4, 1.0, 2.0)
    assert shift_case_b(0.6, 1.0, 2.0, 0.3, 10, 0.0) == pytest.approx((1 - 0.3) * 2.0 / (s - 0.3 * 2.0))


def test_vectorised_and_paper_shift() -> None:
    p = np.array([0.3, 0.5, 0.9])[:, None]
    c = np.array([0.0, 1.0])[None, :]
    out = shift_case_a(p, c, 1.0)
    assert out.shape == (3, 2) and out[1, 1] == pytest.approx(1.0 / 3.0)
    assert isinstance(shift_case_a(0.5, 0.0, 1.0), np.floating)
    assert paper_shift(0.5) == 2.0 and paper_shift(2.0) == 2.0 and paper_shift(1.0) == 1.0
    assert np.array_equal(paper_shift([0.25, 4.0]), [4.0, 4.0])


def test_predict_layer_shift_maps_the_framework_vocabulary() -> None:
    c, v = np.array([0.0, 0.5, 1.0]), np.array([1.0, 2.0, 0.5])
    d, cos2 = np.array([9.0, 144.0, 576.0]), np.array([0.9, 0.5, 0.2])
    for kind in ("bernoulli", "gaussian"):
        assert np.allclose(predict_layer_shift(kind, "pre_bn", 0.3, c, v), 1 / shift_case_a(0.7, c, v))
        got = predict_layer_shift(kind, "pre_conv", 0.3, c, v, d, cos2, rho=0.2)
        assert np.allclose(got, 1 / shift_case_b(0.7, c, v, 0.2, d, cos2))
    assert np.allclose(predict_layer_shift("uout", "pre_bn", 0.3, c, v), 1 / shift_uout(0.3, c, v))
    assert np.allclose(predict_layer_shift("uout", "pre_conv", 0.3, c, v, d, cos2, 0.2),
                       1 / shift_uout_case_b(0.3, c, v, 0.2, d, cos2))
    for placement in ("head", "none"):
        assert np.array_equal(predict_layer_shift("bernoulli", placement, 0.5, c, v, d, cos2), np.ones(3))
    assert np.array_equal(predict_layer_shift("bernoulli", "pre_bn", 0.0, c, v), np.ones(3))
    assert predict_delta("bernoulli", "pre_bn", 0.5, 0.0, 1.0) == pytest.approx(0.5)
    rates = np.array([0.1, 0.3, 0.5])  # per-layer rates broadcast too
    assert predict_layer_shift("bernoulli", "pre_bn", rates, 0.0, 1.0) == pytest.approx(1 / (1 - rates))


@pytest.mark.parametrize("args, match", [
    (("dropconnect", "pre_bn", 0.1), "dropout_type.*bernoulli, gaussian, uout"),
    (("bernoulli", "after_bn", 0.1), "dropout_placement.*pre_bn"),
    (("bernoulli", "pre_bn", 1.0), r"dropout_rate.*\[0, 1\).*1\.0"),
    (("uout", "pre_bn", -0.1), r"dropout_rate.*-0\.1"),
])
def test_errors_name_the_field(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        predict_layer_shift(*args, 1.0, 1.0)


def test_retain_ratio_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\].*0\.0"):
        shift_case_a([0.5, 0.0], 1.0, 1.0)


def test_no_torch_import() -> None:
    code = "import sys, analysis.theory; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=".").returncode == 0
