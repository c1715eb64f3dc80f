"""The mechanism probe (search/trial/mechanism.py): planted cases with known answers, Monte Carlo of each rule,
and the new columns on a real trial of every family."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis.theory import rho_from_variance, shift_case_b
from search import registry
from search.config import TrialConfig
from search.trial.dropout import make_dropout
from search.trial.mechanism import _relu_moments, site_noise_var
from search.trial.probes import measure_variance_shift

pytestmark = pytest.mark.usefixtures("no_onednn")

MECH = ("c_in", "v_in", "d_cos2", "rho", "shift_frozen", "shift_theory", "excess_local", "excess_inherited")


def equicorrelated(n: int, d: int, c: float, v: float, rho: float, gen: torch.Generator) -> torch.Tensor:
    """n draws of d inputs with mean c, variance v and pairwise correlation rho (one shared factor)."""
    shared = torch.randn(n, 1, generator=gen)
    own = torch.randn(n, d, generator=gen)
    return c + math.sqrt(v) * (math.sqrt(rho) * shared + math.sqrt(1 - rho) * own)


def linear_weights(out: int, d: int, gen: torch.Generator) -> torch.Tensor:
    # Positive-leaning weights: D_j = (sum w)^2 / ||w||^2 well above 1, so rho is identifiable.
    return torch.rand(out, d, generator=gen) + 0.1 * torch.randn(out, d, generator=gen)


class Planted(nn.Module):
    """dropout -> Linear(d, out) (-> + shortcut s) -> BN1d; the shortcut is an independent input."""

    def __init__(self, w: torch.Tensor, kind: str, rate: float, shortcut: bool = False) -> None:
        super().__init__()
        self.drop = make_dropout(kind, rate)
        self.fc = nn.Linear(w.shape[1], w.shape[0], bias=False)
        self.fc.weight.data.copy_(w)
        self.bn = nn.BatchNorm1d(w.shape[0])
        self.shortcut, self.d = shortcut, w.shape[1]

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        out = self.fc(self.drop(inp[:, :self.d]))
        if self.shortcut:
            out = out + inp[:, self.d:]
        return self.bn(out)


@pytest.mark.parametrize("kind, rate", [("bernoulli", 0.5), ("gaussian", 0.3), ("uout", 0.6)])
def test_planted_linear_recovers_rho_dcos2_and_the_closed_form(kind: str, rate: float) -> None:
    d, out, c, v, rho = 32, 16, 0.7, 0.5, 0.3
    gen = torch.Generator().manual_seed(0)
    w = linear_weights(out, d, gen)
    batches = [equicorrelated(512, d, c, v, rho, gen) for _ in range(64)]
    model = Planted(w, kind, rate).eval()
    (rec,) = measure_variance_shift(model, batches, None, every=1)
    wd = w.double()
    D = wd.sum(1) ** 2 / (wd * wd).sum(1)
    assert rec.fed_by_dropout and rec.fan_in == d
    assert rec.d_cos2 == pytest.approx(float(D.mean()), rel=1e-9)  # exact: read from the weights
    # 32,768 draws: c and v within ~1% (the shared factor makes them correlate across inputs).
    assert rec.c_in == pytest.approx(c, abs=0.02) and rec.v_in == pytest.approx(v, rel=0.03)
    assert rec.rho == pytest.approx(rho, abs=0.03)
    # The exact form and the paper's rho form agree on equicorrelated inputs; the frozen Monte Carlo matches.
    sq = (wd * wd).sum(1)
    k = site_noise_var(model.drop)
    var_test = v * sq * (1 + rho * (D - 1))
    want = float((var_test + k * (c * c + v) * sq).sum() / var_test.sum())
    assert rec.shift_theory == pytest.approx(want, rel=0.03)
    assert rec.shift_frozen == pytest.approx(want, rel=0.03)
    assert rec.excess_local == pytest.approx(rec.shift_theory - 1, rel=1e-9) and rec.excess_inherited == \
        pytest.approx(0, abs=1e-9)
    if kind == "bernoulli":  # the paper's closed form with the measured rho and d cos^2, per unit, at the mean D
        p = 1 - rate
        paper = 1 / shift_case_b(p, c, v, rho, float(D.mean()), 1.0)
        assert float(paper) == pytest.approx(want, rel=0.05)


def test_shortcut_variance_dilutes_the_shift_as_predicted() -> None:
    d, out, c, v, S = 24, 8, 0.5, 1.0, 3.0
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(out, d, generator=gen) / math.sqrt(d)
    batches = [torch.cat([c + math.sqrt(v) * torch.randn(512, d, generator=gen),
                          math.sqrt(S) * torch.randn(512, out, generator=gen)], 1) for _ in range(64)]
    (rec,) = measure_variance_shift(Planted(w, "bernoulli", 0.5, shortcut=True).eval(), batches, None, every=1)
    sq = float((w * w).sum())
    noise = 1.0 * (c * c + v) * sq  # k = 1 at rate 0.5
    diluted = 1 + noise / (v * sq + S * out)  # the shortcut's variance enters the denominator only
    undiluted = 1 + noise / (v * sq)
    assert undiluted > diluted + 0.5  # the dilution is large here
    assert rec.shift_theory == pytest.approx(diluted, rel=0.02)
    assert rec.shift_frozen == pytest.approx(diluted, rel=0.02)


class Stream(nn.Module):
    """A residual stream with two dropout sites: the second BN inherits the first site's noise."""

    def __init__(self, d: int, gen: torch.Generator) -> None:
        super().__init__()
        self.drop1, self.fc1 = make_dropout("bernoulli", 0.3), nn.Linear(d, d, bias=False)
        self.bn1, self.act = nn.BatchNorm1d(d), nn.ReLU()
        self.drop2, self.fc2 = make_dropout("bernoulli", 0.3), nn.Linear(d, d, bias=False)
        self.bn2 = nn.BatchNorm1d(d)
        for fc in (self.fc1, self.fc2):
            fc.weight.data.copy_(torch.randn(d, d, generator=gen) / math.sqrt(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.fc1(self.drop1(x))
        return self.bn2(h + self.fc2(self.drop2(self.act(self.bn1(h)))))


def test_inherited_noise_down_a_residual_stream_matches_the_frozen_measurement() -> None:
    gen = torch.Generator().manual_seed(2)
    model = Stream(32, gen)
    model.train()
    with torch.no_grad():  # running statistics of the eval-mode BN inputs
        for _ in range(20):
            model.drop1.eval(), model.drop2.eval()
            model(torch.randn(512, 32, generator=gen) + 0.3)
    batches = [torch.randn(512, 32, generator=gen) + 0.3 for _ in range(64)]
    recs = measure_variance_shift(model.eval(), batches, None, every=1)
    first, second = recs
    assert first.excess_inherited == pytest.approx(0, abs=1e-9)
    assert second.excess_inherited > 0.2 and second.excess_local > 0.05
    for r in recs:
        assert r.shift_theory == pytest.approx(r.shift_frozen, rel=0.03)


def test_conv_local_noise_is_conv_of_squares_padding_included() -> None:
    """PAPER.md's exact form at a 3x3 zero-padded conv over correlated, unequal ReLU inputs: Monte Carlo of masks."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4, 1, 10, 10, generator=gen)
    x = F.relu(torch.cat([base + 0.3 * torch.randn(4, 1, 10, 10, generator=gen) * (i + 1) for i in range(6)], 1))
    w = torch.randn(8, 6, 3, 3, generator=gen)
    k = 1.0  # bernoulli 0.5
    pred = k * F.conv2d(x * x, w * w, padding=1)
    draws = torch.stack([F.conv2d(x * (torch.rand(x.shape, generator=gen) < 0.5) * 2.0, w, padding=1)
                         for _ in range(4000)])
    mc = draws.var(0, correction=0)
    assert torch.allclose(mc.mean((0, 2, 3)), pred.mean((0, 2, 3)), rtol=0.05)
    corner, centre = (0, 0), (5, 5)  # the border counts only its inside taps
    assert float(pred[..., corner[0], corner[1]].mean()) < float(pred[..., centre[0], centre[1]].mean())


def test_relu_moments_match_monte_carlo() -> None:
    gen = torch.Generator().manual_seed(4)
    z = torch.tensor([-2.0, -0.5, 0.0, 0.4, 1.5])
    s = torch.tensor([0.3, 1.0, 2.0, 0.5, 0.1])
    n = torch.randn(200_000, 5, generator=gen) * s.sqrt()
    r = F.relu(z + n)
    mean, var = _relu_moments(z, s)
    assert torch.allclose(mean, r.mean(0), atol=0.01)
    assert torch.allclose(var, r.var(0), rtol=0.02, atol=0.002)
    m0, v0 = _relu_moments(z, torch.zeros(5))  # no noise: the eval value, no variance
    assert torch.equal(m0, F.relu(z)) and torch.equal(v0, torch.zeros(5))


def test_dropout_rule_amplifies_upstream_noise_by_one_plus_k() -> None:
    """Var of m (x + n) - x with upstream noise n: (1 + k) Var(n) + k x^2 (masks independent of n)."""
    gen = torch.Generator().manual_seed(5)
    x, s = 1.3, 0.4
    for kind, rate in (("bernoulli", 0.4), ("gaussian", 0.4), ("uout", 0.5)):
        drop = make_dropout(kind, rate).train()
        k = site_noise_var(drop)
        n = torch.randn(400_000, generator=gen) * math.sqrt(s)
        torch.manual_seed(0)
        got = float((drop(x + n) - x).var())
        assert got == pytest.approx((1 + k) * s + k * x * x, rel=0.02), kind


def test_rho_estimator_inverts_the_paper_variance() -> None:
    D = np.array([2.0, 5.0, 9.0])
    sq = np.array([1.0, 0.5, 2.0])
    v, rho = 0.8, 0.25
    assert rho_from_variance(v * sq * (1 + rho * (D - 1)), v, sq, D) == pytest.approx(rho)


def test_mechanism_off_leaves_the_columns_nan_and_none_gives_no_noise() -> None:
    gen = torch.Generator().manual_seed(6)
    w = linear_weights(4, 8, gen)
    batches = [torch.randn(64, 8, generator=gen) for _ in range(4)]
    (off,) = measure_variance_shift(Planted(w, "bernoulli", 0.5).eval(), batches, None, mechanism=False)
    assert all(math.isnan(getattr(off, k)) for k in MECH)
    (quiet,) = measure_variance_shift(Planted(w, "bernoulli", 0.0).eval(), batches, None)
    assert quiet.shift_frozen == quiet.shift_theory == 1.0 and quiet.excess_local == 0.0


FAMILIES = [e.name for e in registry.entries("backbone") if not e.meta.get("stock")]
SMALL = {"cifar_wrn": dict(depth=10, width=0.5), "cifar_preresnet": dict(depth=8, width=0.5),
         "cifar_resnext": dict(depth=11, width=0.125), "cifar_densenet_bc": dict(depth=10, width=0.5)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", ["pre_bn", "pre_conv"])
def test_columns_finite_for_every_fed_layer_of_a_real_trial(family: str, placement: str) -> None:
    from search.trial.runner import run_trial

    size = SMALL.get(family, dict())
    cfg = TrialConfig(backbone=family, dataset="digits", image_size=8, in_chans=1, epochs=1, batch_size=64,
                      train_samples=256, probe_samples=256, dropout_placement=placement, dropout_type="bernoulli",
                      dropout_rate=0.3, device="cpu", **size)
    r = run_trial(cfg)
    fed = [x for x in r.layers if x.fed_by_dropout]
    assert r.status == "ok" and fed
    for x in fed:
        for k in MECH:
            assert math.isfinite(getattr(x, k)), (family, placement, x.name, k)
        assert x.shift_theory == pytest.approx(1 + x.excess_local + x.excess_inherited)
    assert math.isfinite(r.shift_floor) and isinstance(r.bn_unconverged, bool)
