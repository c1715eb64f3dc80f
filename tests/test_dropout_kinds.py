"""Dropout kinds against PAPER.md: train-mode mean and variance, eval identity, errors, registry sync.

Statistical tolerances: a sample of N = 2e6 units x ~ N(c, v) goes through the
module in train mode. The sample mean has standard error sd(y)/sqrt(N); the
sample variance has standard error sqrt((m4 - s^4)/N), m4 the fourth central
moment (both estimated from the sample itself). We allow 5 standard errors:
a false failure has probability below 1e-6 for a normal estimator, and the
seeds are fixed, so the test is deterministic anyway.
"""
from __future__ import annotations

import math

import pytest
import torch

from search import registry
from search.config import DROPOUT_TYPES
from search.trial.dropout.module import VarianceDropout, list_dropout_kinds, make_dropout

# The kinds with the paper's element-wise closed form; the structured kinds (shared masks) are tested
# against their own statistics in tests/test_structured_kinds.py.
ELEMENTWISE = [k for k in list_dropout_kinds() if registry.get("dropout", k).meta["closed_form"] == "elementwise"]

N = 2_000_000
N_SE = 5.0
C, V = 1.5, 0.5  # unit mean and variance (c^2 comparable to v, so both terms of the formula matter)


def closed_form_train_var(kind: str, rate: float, c: float, v: float) -> float:
    """PAPER.md: bernoulli/gaussian (1/p)(c^2 + v) - c^2 with p = 1 - rate; uout v + (beta^2/3)(c^2 + v)."""
    if kind in ("bernoulli", "gaussian"):
        p = 1.0 - rate
        return (c * c + v) / p - c * c
    if kind == "uout":
        return v + rate * rate / 3.0 * (c * c + v)
    raise AssertionError(f"no closed form in PAPER.md for dropout kind {kind!r}: add it here")


def sample(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return C + math.sqrt(V) * torch.randn(N, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("rate", [0.1, 0.5])
@pytest.mark.parametrize("kind", ELEMENTWISE)
def test_train_mean_preserved_and_variance_matches_paper(kind: str, rate: float) -> None:
    x = sample()
    m = make_dropout(kind, rate).train()
    torch.manual_seed(1)
    y = m(x)
    n = y.numel()
    mean = y.mean()
    var = y.var(correction=0)
    m4 = ((y - mean) ** 4).mean()
    se_mean = math.sqrt(float(var) / n)
    se_var = math.sqrt(float(m4 - var * var) / n)
    # Compare with the population values: the y_i are iid draws, so the SEs above already cover x's sampling.
    assert abs(float(mean) - C) < N_SE * se_mean, (kind, rate, float(mean), se_mean)
    want = closed_form_train_var(kind, rate, C, V)
    assert abs(float(var) - want) < N_SE * se_var, (kind, rate, float(var), want, se_var)
    assert want > V  # sanity: the noise adds variance, so the test has something to detect


@pytest.mark.parametrize("kind", list_dropout_kinds())
def test_eval_mode_is_exactly_identity(kind: str) -> None:
    x = torch.randn(4, 3, 5, 5)
    m = make_dropout(kind, 0.5).eval()
    assert isinstance(m, VarianceDropout) and m.kind == kind
    assert torch.equal(m(x), x)


@pytest.mark.parametrize("kind", list_dropout_kinds())
def test_rate_zero_is_identity_in_train_mode(kind: str) -> None:
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(make_dropout(kind, 0.0).train()(x), x)


def test_unknown_kind_names_field_and_allowed_values() -> None:
    with pytest.raises(ValueError, match="dropout_type") as err:
        make_dropout("bernouli", 0.1)
    assert "'bernouli'" in str(err.value)
    for kind in list_dropout_kinds():
        assert kind in str(err.value)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_rate_names_field_and_range(rate: float) -> None:
    with pytest.raises(ValueError, match=r"dropout_rate.*\[0, 1\)"):
        make_dropout(list_dropout_kinds()[0], rate)


def test_config_dropout_types_match_registry() -> None:
    # search.config lists the kinds without importing torch; the two must not drift apart.
    assert sorted(DROPOUT_TYPES) == list_dropout_kinds()
