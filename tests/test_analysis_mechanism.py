"""analysis.mechanism and the report's mechanism sections on planted layers with known answers."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from test_analysis_fit import _study, planted_study, write_study

from analysis.guidelines import analyse, guidelines
from analysis.mechanism import MECHANISM_COLUMNS, mechanism_rows, missing_columns, noise_floor, width_mechanism


def _set(t: pa.Table, name: str, values) -> pa.Table:
    i = t.schema.get_field_index(name)
    return t.set_column(i, t.schema.field(i), pa.array(values, t.schema.field(i).type))


def planted_mechanism(*, theory_slope_same: bool = True, eps: float = 0.03, local: float = 0.75,
                      flagged_seeds: tuple[int, ...] = ()) -> tuple[pa.Table, pa.Table]:
    """Planted study whose fed layers carry shift_frozen = 1 + 20 d^-1 x noise and a known theory.

    theory_slope_same: shift_theory - 1 = (shift_frozen - 1)(1 + eps) (same d-slope), else a constant
    excess (slope 0). Trials whose seed is in `flagged_seeds` are flagged bn_unconverged.
    """
    trials, layers = planted_study(placements=("none", "pre_bn", "pre_conv"), widths=(1.0, 2.0, 4.0),
                                   seeds=(0, 1, 2, 3, 4, 5), n_layers=6, rng=3)
    fed = pc.fill_null(layers.column("fed_by_dropout"), False).to_numpy(zero_copy_only=False)
    d = layers.column("fan_in").to_numpy().astype(float)
    g = np.random.default_rng(7)
    frozen_excess = 20.0 / d * np.exp(g.normal(0, 0.05, d.size))
    theory_excess = frozen_excess * (1 + eps) if theory_slope_same else np.full(d.size, 20.0 / 300)
    nan = np.full(d.size, np.nan)
    cols = dict(shift_frozen=np.where(fed, 1 + frozen_excess, 1.0), shift_theory=np.where(fed, 1 + theory_excess, 1.0),
                excess_local=np.where(fed, local * theory_excess, 0.0),
                excess_inherited=np.where(fed, (1 - local) * theory_excess, 0.0),
                d_cos2=np.where(fed, 3.0, nan), rho=np.where(fed, 0.1, nan), c_in=np.where(fed, 0.4, nan),
                v_in=np.where(fed, 1.0, nan))
    for k, v in cols.items():
        layers = _set(layers, k, v)
    seed = trials.column("seed").to_numpy()
    trials = _set(trials, "bn_unconverged", np.isin(seed, flagged_seeds))
    trials = _set(trials, "shift_floor", np.where(np.isin(seed, flagged_seeds), 1.5, 1.01))
    return trials, layers


def test_theory_beside_measurement_recovers_the_planted_error_and_split() -> None:
    trials, layers = planted_mechanism(eps=0.03, local=0.75)
    study = _study(trials, layers)
    assert missing_columns(study) == []
    rows = mechanism_rows(study)
    assert {(r.dropout_placement) for r in rows} == {"pre_bn", "pre_conv"}
    L = layers.filter(pc.fill_null(layers.column("fed_by_dropout"), False))
    for r in rows:
        sub = L.filter(pc.equal(L.column("dropout_placement"), r.dropout_placement))
        fro, th = sub.column("shift_frozen").to_numpy(), sub.column("shift_theory").to_numpy()
        assert r.n_layers == sub.num_rows and r.n_trials == len(set(sub.column("run_id").to_pylist()))
        assert r.rel_err == pytest.approx(np.median(np.abs(th - fro) / fro), rel=1e-12)
        assert r.rel_err < 0.03 and r.within_target  # eps x excess / shift < eps
        assert r.local_share == pytest.approx(0.75) and r.d_cos2 == 3.0 and r.rho == pytest.approx(0.1)


@pytest.mark.parametrize("same", [True, False])
def test_width_mechanism_tells_an_explained_slope_from_an_unexplained_one(same: bool) -> None:
    study = _study(*planted_mechanism(theory_slope_same=same))
    fits = width_mechanism(study, n_boot=400)
    assert {w.dropout_placement for w in fits} == {"pre_bn", "pre_conv"}
    for w in fits:
        lo, hi = w.measured.slope_ci
        assert w.measured.slope == pytest.approx(-1.0, abs=0.03) and lo < w.measured.slope < hi  # planted: d^-1
        assert w.theory.slope == pytest.approx(-1.0 if same else 0.0, abs=0.05)
        assert w.explained is same
        assert w.diff == pytest.approx(w.theory.slope - w.measured.slope, abs=1e-9)  # same layers (all > 1)
        assert (w.diff_ci[0] <= 0 <= w.diff_ci[1]) is same
    gls = [g for g in guidelines(analyse(study, n_boot=400)) if g.kind == "width_mechanism"]
    assert len(gls) == 2
    phrase = "(the mechanism) accounts for it" if same else "(the mechanism) does not account for it"
    assert all(phrase in g.text and "at the same BN position" in g.text for g in gls), [g.text for g in gls]


def test_flagged_trials_are_out_of_every_fit_and_all_flagged_gives_no_guideline() -> None:
    trials, layers = planted_mechanism(flagged_seeds=(0, 1))
    a = analyse(_study(trials, layers), n_boot=200)
    flagged = int(pc.sum(pc.cast(trials.column("bn_unconverged"), "int64")).as_py())
    assert a.n_flagged == flagged and not a.all_flagged
    assert set(a.study.trials.column("seed").to_pylist()) == {2, 3, 4, 5}  # seeds 0, 1 left out
    assert set(a.study.layers.column("seed").to_pylist()) == {2, 3, 4, 5}
    assert a.floor is not None and len(a.floor.flagged) == flagged
    assert a.floor.floor[0] == pytest.approx((1.5 * 2 + 1.01 * 4) / 6)
    assert guidelines(a)  # the unflagged trials still support statements
    trials, layers = planted_mechanism(flagged_seeds=(0, 1, 2, 3, 4, 5))
    a = analyse(_study(trials, layers), n_boot=200)
    assert a.all_flagged and guidelines(a) == []
    assert any("no guideline is drawn" in n for n in a.notes)


def test_noise_floor_of_the_none_trials() -> None:
    trials, layers = planted_mechanism()
    fl = noise_floor(_study(trials, layers))
    none = trials.filter(pc.equal(trials.column("dropout_placement"), "none"))
    x = none.column("mean_shift").to_numpy()
    assert fl.n_none == none.num_rows and fl.none_shift[0] == pytest.approx(x.mean())
    assert fl.none_shift[1] < x.mean() < fl.none_shift[2] and fl.flagged == []


def test_three_predictions_are_the_closed_form_the_local_identity_and_the_propagation() -> None:
    from analysis.theory import predict_layer_shift

    trials, layers = planted_mechanism(eps=0.03, local=0.75)
    rows = {r.dropout_placement: r for r in mechanism_rows(_study(trials, layers))}
    L = layers.filter(pc.fill_null(layers.column("fed_by_dropout"), False))
    for placement, r in rows.items():
        sub = L.filter(pc.equal(L.column("dropout_placement"), placement))
        d = sub.column("fan_in").to_numpy().astype(float)
        cf = predict_layer_shift("bernoulli", placement, 0.5, 0.4, 1.0, d, 3.0 / d, 0.1)  # planted c, v, D, rho
        assert r.shift_closed_form == pytest.approx(np.median(cf), rel=1e-9)
        loc = sub.column("excess_local").to_numpy()
        assert r.shift_local == pytest.approx(1 + np.median(loc), rel=1e-9)
        assert r.dilution == pytest.approx(np.median(1 - loc / (cf - 1)), rel=1e-9)
        fro = sub.column("shift_frozen").to_numpy()
        assert r.err_closed_form == pytest.approx(np.median(np.abs(cf - fro) / fro), rel=1e-9)
    # Case (a) does not depend on rho or D; case (b) with rho = 0.1 and D = 3 predicts less than case (a).
    assert rows["pre_conv"].shift_closed_form < rows["pre_bn"].shift_closed_form


def test_report_shows_the_mechanism_and_old_results_say_what_is_missing(tmp_path) -> None:
    from analysis.report import write_report

    trials, layers = planted_mechanism(flagged_seeds=(0,))
    write_study(str(tmp_path / "new"), trials, layers)
    out = write_report("planted", root=str(tmp_path / "new"), out=str(tmp_path / "rep_new"), n_boot=200)
    md = open(f"{out}/report.md").read()
    assert "## The noise floor" in md and "## The mechanism: three predictions vs the measurement" in md
    # The three predictions side by side, each named for what it is; "theory" alone names none of them.
    assert "| frozen (measured) | closed form | local identity | propagation |" in md
    assert "| closed form vs paper | local identity vs paper | propagation vs paper | diluted before BN |" in md
    assert "Warning: noise floor" in md and "figures/decomposition.png" in md
    assert (tmp_path / "rep_new" / "figures" / "decomposition.pdf").stat().st_size > 0
    assert "rho = 0)" not in md  # the rho = 0 closed form is gone once the mechanism is measured
    # Old results: the mechanism columns null everywhere.
    for k in MECHANISM_COLUMNS:
        layers = _set(layers, k, [None] * layers.num_rows)
    write_study(str(tmp_path / "old"), trials, layers)
    out = write_report("planted", root=str(tmp_path / "old"), out=str(tmp_path / "rep_old"), n_boot=200)
    md = open(f"{out}/report.md").read()
    assert "columns missing: c_in, v_in, d_cos2, rho, shift_frozen, shift_theory" in md
    assert not (tmp_path / "rep_old" / "figures" / "decomposition.png").exists()


def test_no_closed_form_for_a_placement_without_the_papers_case() -> None:
    """post_add is case (a) in a pre-activation family and (b) in a post-activation one: the closed form is
    n/a there, not the theory's 1 (which the mechanism table would print as a prediction 23% off)."""
    import pyarrow as pa

    from analysis.mechanism import closed_form
    from analysis.theory import predict_layer_shift

    L = pa.table(dict(dropout_type=["bernoulli"] * 3, dropout_placement=["pre_bn", "post_conv", "post_add"],
                      dropout_rate=[0.2] * 3, c_in=[0.4] * 3, v_in=[0.3] * 3, rho=[0.1] * 3, d_cos2=[3.0] * 3,
                      fan_in=[144] * 3))
    got = closed_form(L)
    want_a = float(predict_layer_shift("bernoulli", "pre_bn", 0.2, 0.4, 0.3))
    assert got[0] == pytest.approx(want_a) and got[1] == pytest.approx(want_a)  # post_conv is case (a) too
    assert math.isnan(got[2])
