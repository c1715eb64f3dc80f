"""Adaptive replication, `search.run --until-ci W` (issue 23): seeds go only where an interval is wide.

The planner is tested on planted trials whose cells are wide or narrow by construction; the
whole loop runs once end to end on the smoke space (4 trials a seed), and a rerun adds none.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from _sweeps import KILL_ARGS, _dataset, _runs, _sweep
from test_analysis_fit import planted_study

from search.config import TrialConfig


def _configs(trials: pa.Table) -> list[dict]:
    fields = [f for f in TrialConfig.__dataclass_fields__ if f in trials.column_names]
    return [TrialConfig.from_dict({k: r[k] for k in fields}).to_dict() for r in trials.select(fields).to_pylist()]


def test_only_wide_cells_get_a_seed_and_their_baseline_too() -> None:
    from analysis.adaptive import wide_cells
    from search.sweep.adaptive import more_seeds

    # 3 seeds; pre_bn costs -5 pp with noise 0.1 pp (narrow), pre_conv -5 pp with noise 4 pp (wide).
    trials, _ = planted_study(placements=("none", "pre_bn", "pre_conv"), widths=(1.0, 2.0), seeds=(0, 1, 2),
                              acc_noise=0.0005)
    acc = trials.column("test_acc").to_numpy().copy()
    pl = np.asarray(trials.column("dropout_placement").to_pylist())
    acc[pl == "pre_conv"] += np.random.default_rng(0).normal(0, 0.04, (pl == "pre_conv").sum())
    i = trials.schema.get_field_index("test_acc")
    trials = trials.set_column(i, trials.schema.field(i), pa.array(acc))
    configs = _configs(trials)
    extra, wide = more_seeds(configs, trials, 2.0, max_seeds=5, cells=wide_cells)
    assert {dict(c.fields)["dropout_placement"] for c in wide} == {"pre_conv"} and len(wide) == 2
    assert sorted((c["dropout_placement"], c["width"], c["seed"]) for c in extra) == [
        ("none", 1.0, 3), ("none", 2.0, 3), ("pre_conv", 1.0, 3), ("pre_conv", 2.0, 3)]
    # At the budget nothing is added, and a narrow enough W adds nothing either.
    assert more_seeds(configs, trials, 2.0, max_seeds=3, cells=wide_cells)[0] == []
    assert more_seeds(configs, trials, 99.0, max_seeds=5, cells=wide_cells)[0] == []


def test_cells_without_an_interval_are_wide() -> None:
    from analysis.adaptive import wide_cells
    from search.sweep.adaptive import more_seeds

    trials, _ = planted_study(placements=("none", "pre_bn"), widths=(1.0,), seeds=(0,))
    extra, wide = more_seeds(_configs(trials), trials, 50.0, max_seeds=3, cells=wide_cells)
    assert len(wide) == 1 and wide[0].n == 1 and sorted(c["seed"] for c in extra) == [1, 1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_until_ci_sweeps_until_narrow_and_a_rerun_adds_none(tmp_path: Path) -> None:
    args = KILL_ARGS + ["--until-ci", "100", "--max-seeds", "3"]
    rc, out = _sweep(tmp_path, args, timeout=800)
    assert rc == 0, out
    # 1 seed -> no interval anywhere -> seed 1 -> still none (n = 2) -> seed 2 -> every interval <= 100 pp.
    assert out.count("still wide") == 2 and "every accuracy cost vs no dropout interval is at most 100 pp" in out
    # --quiet: none of Ray Tune's boilerplate (issue 25)
    for line in ("Configuration for experiment", "View detailed results", "tensorboard", "Search algorithm"):
        assert line not in out, line
    seeds = sorted(r["seed"] for r in _dataset(tmp_path / "results", "trials").to_pylist())
    assert seeds == [0] * 4 + [1] * 4 + [2] * 4
    runs = len(_runs(tmp_path))
    rc, out = _sweep(tmp_path, args, timeout=400, log="rerun.log")
    assert rc == 0 and "still wide" not in out and "0 round(s) added seeds" in out, out
    assert len(_runs(tmp_path)) == runs  # nothing trained again
