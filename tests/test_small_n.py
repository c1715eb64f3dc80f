"""Statistics that cannot overclaim (issue 23): small n and samples without spread.

A planted study whose paired differences are identical in every seed, with 2 seeds, must give
no p = 0, no zero-width interval, and say "not testable"; with 3+ identical seeds the exact
sign-flip p (2^(1-n)) and still no interval.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pyarrow as pa
import pytest
from test_analysis_fit import _study, critical_cost, planted_study, write_study


def _identical(seeds: tuple[int, ...]) -> tuple[pa.Table, pa.Table]:
    """Accuracies on a 359-image test set (multiples of 1/359), the same cost of 24 images in every seed."""
    trials, layers = planted_study(seeds=seeds, widths=(1.0, 2.0), cost=critical_cost(4.0, -24 / 359), acc_noise=0.0)
    acc = trials.column("test_acc").to_numpy()
    step = np.round(acc * 359) / 359  # every accuracy an exact image count
    i = trials.schema.get_field_index("test_acc")
    trials = trials.set_column(i, trials.schema.field(i), pa.array(step))
    j = trials.schema.get_field_index("test_acc_reest")
    return trials.set_column(j, trials.schema.field(j), pa.array(step + 1 / 359)), layers


def test_mean_test_rules() -> None:
    from analysis.fit import mean_test

    r = mean_test(np.array([-0.0669, -0.0669]))
    assert r.method == "not testable (n = 2)" and math.isnan(r.p) and not r.has_ci
    r = mean_test(np.array([-0.02] * 4))
    assert r.method == "sign-flip" and r.p == pytest.approx(2 ** -3) and not r.has_ci
    assert mean_test(np.zeros(5)).p == 1.0
    r = mean_test(np.array([1.0, 2.0, 4.0]))
    assert r.method == "t" and r.low < r.mean < r.high and r.p > 0 and r.mde > 0


def test_two_identical_seeds_are_not_testable_anywhere(tmp_path) -> None:
    from analysis.fit import accuracy_cost, bn_reestimation
    from analysis.guidelines import analyse, guidelines
    from analysis.report import write_report

    study = _study(*_identical((0, 1)))
    cells, _ = accuracy_cost(study)
    assert cells and all(c.p != 0 and not c.has_ci and "not testable (n = 2)" in c.method for c in cells)
    rows, pooled, _ = bn_reestimation(study)
    assert all(r.p != 0 and (r.has_ci or r.method != "t") and r.ci_low != r.ci_high for r in rows)
    for r in rows:
        assert r.method == "not testable (n = 2)" and not r.has_ci
    text = " ".join(g.text for g in guidelines(analyse(study, n_boot=100)))
    assert "[-6.7, -6.7]" not in text and "CI [+0.3, +0.3]" not in text
    write_study(str(tmp_path / "results"), *_identical((0, 1)))
    write_report("planted", root=str(tmp_path / "results"), out=str(tmp_path / "rep"), figures=False)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "not testable (n = 2)" in md
    assert "[-6.69, -6.69]" not in md and "[+0.28, +0.28]" not in md
    assert not re.search(r"\| 0 \| (paired|welch|t|sign)", md)  # no p = 0 in any table
    assert "One test image is 0.28 pp of accuracy (inferred: accuracies are multiples of 1/359)" in md


def test_identical_seeds_with_n_4_get_the_exact_sign_flip_test() -> None:
    from analysis.fit import accuracy_cost

    cells, _ = accuracy_cost(_study(*_identical((0, 1, 2, 3))), adjust="none")
    hurt = [c for c in cells if c.cost < 0]
    assert hurt and all(c.method == "paired sign-flip" and c.p == pytest.approx(1 / 8) for c in hurt)
    assert all(not c.has_ci and not c.harm for c in hurt)  # 1/8 is all 4 seeds can show: no claim
