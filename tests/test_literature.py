"""The literature comparisons (analysis/literature.py) on planted studies whose answers are known.

Each planted accuracy is 0.9 + the level's planted effect + a seed effect shared by every level of that
seed (sd 3 pp) + trial noise (sd 0.1 pp): a comparison paired by seed recovers the effect to a fraction
of a point, where one that ignored the seeds would carry the seeds' 3 pp spread.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from analysis.literature import PLACEMENT_ORDER
from test_analysis_fit import planted_study

SEEDS = (0, 1, 2, 3, 4)
PLACED = {"none": 0.0, "pre_bn": -0.04, "pre_conv": 0.01, "post_conv": 0.0, "post_bn": -0.02, "post_add": -0.06,
          "pre_pool": 0.005, "head": 0.0}


def _set(t: pa.Table, name: str, values: list, type_: pa.DataType | None = None) -> pa.Table:
    arr = pa.array(values, type_ if name not in t.column_names else t.schema.field(name).type)
    if name in t.column_names:
        return t.set_column(t.column_names.index(name), name, arr)
    return t.append_column(name, arr)


def _accuracy(t: pa.Table, effect: np.ndarray, seed_sd: float = 0.03, noise: float = 0.001) -> pa.Table:
    g = np.random.default_rng(7)
    seed = t.column("seed").to_numpy()
    acc = 0.9 + effect + g.normal(0, seed_sd, max(SEEDS) + 1)[seed] + g.normal(0, noise, t.num_rows)
    return _set(t, "test_acc", acc.tolist())


def placement_study() -> pa.Table:
    trials, _ = planted_study(placements=tuple(PLACED), widths=(1.0,), rates=(0.2,), seeds=SEEDS)
    placement = trials.column("dropout_placement").to_pylist()
    return _accuracy(trials, np.array([PLACED[p] for p in placement]))


def test_each_placement_is_compared_with_none_and_pre_conv_paired_by_seed() -> None:
    from analysis.literature import placement_comparison

    (comp,) = placement_comparison(placement_study())
    assert comp.factor == "dropout_placement" and comp.reference == "pre_conv"
    assert dict(comp.setting) == {"dropout_type": "bernoulli", "dropout_rate": 0.2}
    levels = {lv.label: lv for lv in comp.levels}
    assert [lv.label for lv in comp.levels] == ["none", "pre_bn", "pre_conv", "post_conv", "post_bn", "post_add", "pre_pool",
                                               "head"]  # block order
    for name, effect in PLACED.items():
        lv = levels[name]
        assert lv.n == len(SEEDS)
        vs_none, vs_ref = lv.vs_none["test_acc"], lv.vs_reference["test_acc"]
        if name == "none":
            assert vs_none.n == 0 and math.isnan(vs_none.mean)  # itself: nothing to compare
        else:
            assert vs_none.n == len(SEEDS) and vs_none.method == "t"
            assert vs_none.low <= effect <= vs_none.high, (name, vs_none)
            assert vs_none.high - vs_none.low < 0.01  # paired: the seeds' 3 pp spread cancels
        if name == "pre_conv":
            assert vs_ref.n == 0
        else:
            assert vs_ref.low <= effect - PLACED["pre_conv"] <= vs_ref.high, (name, vs_ref)


def test_pairs_only_over_seeds_both_levels_ran() -> None:
    from analysis.literature import placement_comparison

    t = placement_study()
    keep = [not (p == "post_add" and s >= 3) for p, s in zip(t.column("dropout_placement").to_pylist(),
                                                             t.column("seed").to_pylist())]
    t = t.filter(pa.array(keep))
    t = _set(t, "status", ["failed" if (p == "post_bn" and s == 0) else "ok" for p, s in
                           zip(t.column("dropout_placement").to_pylist(), t.column("seed").to_pylist())])
    levels = {lv.label: lv for lv in placement_comparison(t)[0].levels}
    assert levels["post_add"].n == 3 and levels["post_add"].vs_none["test_acc"].n == 3
    assert levels["post_bn"].n == 4 and levels["post_bn"].vs_reference["test_acc"].n == 4  # failed trials left out
    t2 = t.filter(pa.array([not (p == "post_add" and s >= 1) for p, s in
                            zip(t.column("dropout_placement").to_pylist(), t.column("seed").to_pylist())]))
    lone = {lv.label: lv for lv in placement_comparison(t2)[0].levels}["post_add"].vs_none["test_acc"]
    assert lone.n == 1 and lone.method == "not testable (n = 1)" and math.isnan(lone.low)


def test_no_table_without_a_follow_up_placement() -> None:
    from analysis.literature import placement_comparison, schedule_comparison

    trials, _ = planted_study(placements=("none", "pre_bn", "pre_conv", "head"), widths=(1.0,), seeds=SEEDS)
    assert placement_comparison(trials) == [] and schedule_comparison(trials) == []


SCHEDULED = {("none", None, None): 0.0, ("pre_conv", None, None): 0.0, ("pre_conv", "early", None): 0.02,
             ("pre_conv", "early", "linear"): 0.015, ("pre_conv", "late", None): -0.01}


def schedule_study() -> pa.Table:
    cells = list(SCHEDULED)
    trials, _ = planted_study(placements=("none", "pre_conv"), widths=(1.0,), rates=(0.2,), seeds=SEEDS)
    none, conv = (trials.filter(pa.compute.equal(trials.column("dropout_placement"), p)) for p in ("none", "pre_conv"))
    parts = [none] + [conv] * (len(cells) - 1)
    t = pa.concat_tables(parts)
    cell = [cells[0]] * none.num_rows + [c for c in cells[1:] for _ in range(conv.num_rows)]
    t = _set(t, "dropout_schedule", [c[1] for c in cell], pa.string())
    t = _set(t, "dropout_cutoff", [2.0 if c[1] else None for c in cell], pa.float64())
    t = _set(t, "dropout_decay", [c[2] for c in cell], pa.string())
    t = _set(t, "run_id", [f"r{i}" for i in range(t.num_rows)])
    # The last epoch's rate: 0 without dropout and after early dropout; early dropout fits the training set
    # better than none by 0.05 nats (Liu et al.'s claim, planted), with the seeds' spread shared.
    final = [0.0 if c[0] == "none" or c[1] == "early" else 0.2 for c in cell]
    t = _set(t, "dropout_rate_final", final, pa.float64())
    g = np.random.default_rng(3)
    seed = t.column("seed").to_numpy()
    loss = 0.5 + g.normal(0, 0.05, max(SEEDS) + 1)[seed] - np.where([c[1] == "early" for c in cell], 0.05, 0.0)
    t = _set(t, "train_loss", (loss + g.normal(0, 0.001, t.num_rows)).tolist())
    return _accuracy(t, np.array([SCHEDULED[c] for c in cell]))


def test_each_schedule_is_compared_with_none_and_constant_paired_by_seed() -> None:
    from analysis.literature import schedule_comparison

    (comp,) = schedule_comparison(schedule_study())
    assert comp.factor == "schedule" and comp.reference == "constant"
    assert dict(comp.setting) == {"dropout_placement": "pre_conv", "dropout_type": "bernoulli", "dropout_rate": 0.2}
    levels = {lv.label: lv for lv in comp.levels}
    assert set(levels) == {"none", "constant", "early (cutoff 2)", "early (cutoff 2, linear)", "late (cutoff 2)"}
    for (placement, mode, decay), effect in SCHEDULED.items():
        label = "none" if placement == "none" else {None: "constant"}.get(mode) or next(
            k for k in levels if k.startswith(mode) and (("linear" in k) == (decay == "linear")))
        ref = levels[label].vs_reference["test_acc"]
        if label != "constant":
            assert ref.low <= effect <= ref.high and ref.high - ref.low < 0.01, (label, ref)


@pytest.mark.parametrize("row, want", [
    (dict(dropout_placement="none", dropout_rate=0.0), "none"),
    (dict(dropout_placement="pre_conv", dropout_rate=0.2), "constant"),
    (dict(dropout_placement="pre_conv", dropout_rate=0.2, dropout_schedule="late", dropout_cutoff=33.0), "late (cutoff 33)"),
    (dict(dropout_placement="pre_conv", dropout_rate=0.2, dropout_schedule="early", dropout_cutoff=2.5,
          dropout_decay="linear"), "early (cutoff 2.5, linear)"),
])
def test_schedule_label_names_what_ran(row: dict, want: str) -> None:
    from analysis.literature import schedule_label

    assert schedule_label(row) == want


def test_report_has_a_section_for_each_comparison() -> None:
    from types import SimpleNamespace

    from analysis.load import Study
    from analysis.report import literature_tables

    for trials, key in ((placement_study(), "kim2023"), (schedule_study(), "liu2023")):
        a = SimpleNamespace(study=Study(trials, pa.table({}), ("planted",)), level=0.95)  # what the tables read
        (t,) = literature_tables(a)
        assert t.key == key and t.rows[0][1] == "none" and all(len(r) == len(t.headers) for r in t.rows)
        ref = next(i for i, r in enumerate(t.rows) if r[1] in ("pre_conv", "constant"))
        assert "paired by seed" in t.note
        assert t.rows[0][4] == "n/a" and t.rows[ref][6] == "n/a"  # none vs none, the reference vs itself
        assert all(r[10].startswith("t (detects") for i, r in enumerate(t.rows) if i not in (0, ref))
        if key == "liu2023":  # train loss against none only where the last epoch ran without dropout
            loss = {r[1]: (r[11], r[12]) for r in t.rows}
            assert loss["constant"] == loss["late (cutoff 2)"] == ("n/a (ends with dropout on)", "n/a")
            for early in ("early (cutoff 2)", "early (cutoff 2, linear)"):
                lo, hi = (float(x) for x in loss[early][1].strip("[]").split(","))
                assert lo <= -0.05 <= hi and hi - lo < 0.01, loss[early]


def test_figures_show_each_level_in_block_order_with_its_n() -> None:
    from types import SimpleNamespace

    from analysis import figures
    from analysis.load import Study

    got = []
    for trials in (placement_study(), schedule_study()):
        a = SimpleNamespace(study=Study(trials, pa.table({}), ("planted",)), level=0.95)
        for stem, caption, fig in figures._literature(a):
            ax = fig.axes[0]
            top_down = sorted(zip(ax.get_yticks(), [t.get_text() for t in ax.get_yticklabels()]), reverse=True)
            got.append((stem, [label for _, label in top_down]))
            assert "paired by seed" in caption
            figures.plt.close(fig)
    assert got == [("literature_placements", [f"{p} (n = 5)" for p in ("pre_bn", "pre_conv", "post_conv", "post_bn",
                                                                       "post_add", "pre_pool", "head")]),
                   ("literature_schedules", ["constant (n = 5)", "early (cutoff 2) (n = 5)",
                                             "early (cutoff 2, linear) (n = 5)", "late (cutoff 2) (n = 5)"])]


def test_the_report_renders_the_literature_section(tmp_path) -> None:
    """analysis.report on a planted study with the follow-up placements: the section, its table and figure."""
    from analysis.report import main
    from test_analysis_fit import write_study

    trials, layers = planted_study(placements=tuple(PLACED), widths=(1.0,), rates=(0.2,), seeds=SEEDS)
    write_study(str(tmp_path / "results"), trials, layers)
    out = tmp_path / "out"
    assert main(["--space", "planted", "--root", str(tmp_path / "results"), "--out", str(out), "--n-boot", "100"]) == 0
    md = (out / "report.md").read_text()
    assert "## The follow-up literature: where dropout goes, and when it is on" in md
    assert "**Where one dropout goes in a residual network (Kim et al. 2023)" in md
    assert "(figures/literature_placements.png)" in md and (out / "figures" / "literature_placements.png").is_file()
    assert "Early and late dropout" not in md  # no schedule ran: no such table
    tex = (out / "report.tex").read_text()
    assert "Kim et al. 2023" in tex and "literature_placements" in tex


def test_one_grid_with_both_comparisons_gives_one_table_each() -> None:
    """The literature space's grid: placements at a constant rate plus pre_conv under each schedule."""
    from analysis.literature import placement_comparison, schedule_comparison

    both = pa.concat_tables([placement_study(), schedule_study().filter(
        pa.compute.is_valid(schedule_study().column("dropout_schedule")))], promote_options="default")
    (places,) = placement_comparison(both)
    assert [lv.label for lv in places.levels] == list(PLACEMENT_ORDER) and places.setting == (
        ("dropout_type", "bernoulli"), ("dropout_rate", 0.2))  # the early/late trials are not pre_conv's level
    (scheds,) = schedule_comparison(both)
    assert [lv.label for lv in scheds.levels] == ["none", "constant", "early (cutoff 2)", "early (cutoff 2, linear)",
                                                  "late (cutoff 2)"]
    assert all(lv.n == len(SEEDS) for lv in scheds.levels)
