"""Width effects where they are identified (analysis.width): planted studies whose answer is known.

A shift that depends on the BN position (stage) alone must show no within-position width
effect, while the pooled fan-in slope (stage and width mixed) is clearly non-zero; a planted
true width effect must be recovered within its interval.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from test_analysis_fit import _study, planted_study, write_study


def _set(t: pa.Table, name: str, values) -> pa.Table:
    i = t.schema.get_field_index(name)
    return t.set_column(i, t.schema.field(i), pa.array(values, t.schema.field(i).type))


def stage_only(seeds=(0, 1, 2, 3), widths=(1.0, 2.0, 4.0, 8.0), width_slope: float = 0.0, noise: float = 0.05,
               rng: int = 3) -> tuple[pa.Table, pa.Table]:
    """WRN-like planted study: the excess of a fed BN is 20 (stage fan-in at width 1)^-0.5 x width^width_slope."""
    trials, layers = planted_study(placements=("none", "pre_conv"), widths=widths, seeds=seeds, n_layers=6, rng=rng)
    fed = pc.fill_null(layers.column("fed_by_dropout"), False).to_numpy(zero_copy_only=False)
    idx = layers.column("index").to_numpy()
    width = layers.column("width").to_numpy()
    stage_d = 9 * 16 * 2.0 ** (idx * 3 // 6)  # fan-in at width 1: grows 4x over the three stages
    g = np.random.default_rng(rng + 1)
    excess = 20.0 * stage_d ** -0.5 * width ** width_slope * np.exp(g.normal(0, noise, idx.size))
    return trials, _set(layers, "shift", np.where(fed, 1.0 + excess, 1.0))


def _effect(study, quantity="shift"):
    from analysis.width import width_effects

    effs = [e for e in width_effects(study) if e.quantity == quantity and e.dropout_placement == "pre_conv"]
    assert len(effs) == 1
    return effs[0]


def test_a_stage_only_shift_shows_no_width_effect_but_a_pooled_slope() -> None:
    # Over 20 independent planted studies a 95% interval covers the true 0 about 19 times.
    effs = [_effect(_study(*stage_only(rng=r))) for r in range(20)]
    covered = sum(e.within.low <= 0 <= e.within.high for e in effs)
    assert covered >= 17, [(e.within.low, e.within.high) for e in effs]
    e = effs[3]
    assert e.within.method == "t" and e.within.n == 4 and e.n_positions == 3
    assert e.within.low <= 0 <= e.within.high and e.verdict == "none detected"
    assert abs(e.within.mean) < 0.05
    # Pooled over positions and widths the slope is clearly negative: the stage effect leaks into it.
    assert e.pooled < -0.1
    # Across positions at fixed width it is the planted stage slope, -0.5.
    assert e.across.mean == pytest.approx(-0.5, abs=0.05)


@pytest.mark.parametrize("slope", [-0.4, 0.3])
def test_a_true_width_effect_is_recovered(slope: float) -> None:
    effs = [_effect(_study(*stage_only(width_slope=slope, rng=r))) for r in range(10)]
    assert sum(e.within.low <= slope <= e.within.high for e in effs) >= 8
    assert all(e.verdict == ("falls" if slope < 0 else "rises") for e in effs)


def test_two_seeds_are_not_testable() -> None:
    e = _effect(_study(*stage_only(seeds=(0, 1))))
    assert not e.within.has_ci and e.within.method == "not testable (n = 2)" and e.verdict == "not testable"


def test_guidelines_claim_no_width_effect_and_label_the_pooled_slope() -> None:
    from analysis.guidelines import analyse, guidelines

    gl = guidelines(analyse(_study(*stage_only()), n_boot=200))
    width = [g for g in gl if g.kind == "width_effect"]
    assert width and all("no width effect" in g.text for g in width), [g.text for g in gl]
    pooled = [g for g in gl if g.kind == "shift_vs_dim"]
    assert pooled and all("pooled" in g.text and "not a width effect" in g.text for g in pooled)
    assert not any(g.kind == "shift_vs_dim" and "falls with the feature dimension d as" in g.text
                   and "pooled" not in g.text for g in gl)


def test_the_report_shows_within_and_pooled(tmp_path) -> None:
    from analysis.report import write_report

    write_study(str(tmp_path / "results"), *stage_only())
    write_report("planted", root=str(tmp_path / "results"), out=str(tmp_path / "rep"), figures=False)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Width at the same BN position" in md and "within position" in md and "pooled" in md
