"""Planted-data tests of analysis.load and analysis.fit: the fits recover what was planted.

`planted_study` builds trials and layers tables (search.schema's schemas) with a
known shift-vs-d slope, accuracy cost per width, re-estimation gain and noise;
test_report.py and benchmarks/analysis_scale.py reuse it.
"""
from __future__ import annotations

import datetime as dt
import math
import os
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from search.config import TrialConfig
from search.schema import LAYERS_SCHEMA, TRIALS_SCHEMA

CostFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def critical_cost(critical: float = 4.0, cost: float = -0.05) -> CostFn:
    """Dropout costs `cost` below `critical` width and nothing from it on (placement none: 0)."""
    return lambda placement, dtype, rate, width: np.where((placement != "none") & (width < critical), cost, 0.0)


def planted_study(*, widths=(1.0, 2.0, 4.0, 8.0), placements=("none", "pre_bn", "pre_conv", "head"),
                  types=("bernoulli",), rates=(0.5,), seeds=(0, 1, 2, 3), n_layers: int = 6,
                  cost: CostFn | None = None, acc_noise: float = 0.003, reest_gain: float = 0.02,
                  reest_per_shift: float = 0.0, shift_amp: float = 20.0, shift_slope: float = -1.0,
                  shift_noise: float = 0.15, space: str = "planted", rng: int = 0) -> tuple[pa.Table, pa.Table]:
    """Trials and layers tables of a planted grid (placement none gets type bernoulli, rate 0)."""
    g = np.random.default_rng(rng)
    cfgs = [("bernoulli", "none", 0.0)] if "none" in placements else []
    cfgs += [(t, p, r) for p in placements if p != "none" for t in types for r in rates]
    grid = [(c, w, s) for c in cfgs for w in widths for s in seeds]
    n = len(grid)
    dtype = np.array([c[0] for c, _, _ in grid], dtype=object)
    placement = np.array([c[1] for c, _, _ in grid], dtype=object)
    rate = np.array([c[2] for c, _, _ in grid], float)
    width = np.array([w for _, w, _ in grid], float)
    seed = np.array([s for _, _, s in grid], np.int64)
    # Layers: stage grows every n_layers/3 layers; d = 9 x input channels (3x3 conv).
    idx = np.tile(np.arange(n_layers), n)
    trial = np.repeat(np.arange(n), n_layers)
    channels = (16 * width[trial] * 2 ** (idx * 3 // n_layers)).astype(np.int64)
    fan_in = 9 * channels
    fed = np.isin(placement[trial], ["pre_bn", "pre_conv"]) & (idx % 2 == 1)
    excess = shift_amp * fan_in.astype(float) ** shift_slope * np.exp(g.normal(0, shift_noise, idx.size))
    shift = np.where(fed, 1.0 + excess, 1.0 + 0.001 * np.abs(g.normal(size=idx.size)))
    moving = np.exp(g.normal(0, 0.1, idx.size))
    sums = np.bincount(trial, shift, n)
    fed_n = np.bincount(trial, fed, n)
    mean_fed = np.where(fed_n > 0, np.bincount(trial, np.where(fed, shift, 0.0), n) / np.maximum(fed_n, 1), np.nan)
    max_shift = np.zeros(n)
    np.maximum.at(max_shift, trial, shift)
    planted = np.zeros(n) if cost is None else cost(placement, dtype, rate, width)
    seed_effect = g.normal(0, acc_noise, max(seeds) + 1)[seed]
    acc = 0.9 + planted + seed_effect + g.normal(0, acc_noise, n)
    gain = np.where(placement != "none", reest_gain + reest_per_shift * np.nan_to_num(mean_fed - 1.0), 0.0)
    reest = acc + gain + g.normal(0, acc_noise / 3, n)
    base = TrialConfig(backbone="cifar_wrn", depth=10, dataset="digits").to_dict()
    t0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    cfg_id = {c: i for i, c in enumerate(sorted({(c, w) for c, w, _ in grid}))}
    cols = dict(
        run_id=[f"{space}-{i:06d}" for i in range(n)], config_hash=[f"h{cfg_id[(c, w)]:05d}-{s}" for c, w, s in grid],
        space=[space] * n, profile=["quick"] * n, status=["ok"] * n, error=[None] * n,
        finished_at=[t0 + dt.timedelta(seconds=i) for i in range(n)], dropout_type=dtype, dropout_placement=placement,
        dropout_rate=rate, width=width, seed=seed, test_acc=acc, test_loss=1 - acc, test_acc_reest=reest,
        test_loss_reest=1 - reest, train_loss=0.1 * np.ones(n), train_acc=0.99 * np.ones(n), mean_shift=sums / n_layers,
        max_shift=max_shift, mean_shift_fed=mean_fed, mean_shift_reest=np.ones(n), throughput=1000.0 * np.ones(n),
        wall_time_s=np.ones(n), train_time_s=np.ones(n), probe_time_s=0.1 * np.ones(n),
        params=(1000 * width).astype(np.int64), epochs_completed=np.full(n, base["epochs"]), ran_on=["cpu"] * n)
    # Columns a planted study does not plant (mechanism, noise floor, code version) are null, as in old rows.
    trials = pa.table({f.name: pa.array(cols[f.name] if f.name in cols else [base.get(f.name)] * n, f.type)
                       for f in TRIALS_SCHEMA}, schema=TRIALS_SCHEMA)
    lcols = dict(name=[f"bn{i}" for i in range(n_layers)] * n, index=idx,
                 rel_depth=idx / max(n_layers - 1, 1), channels=channels, fan_in=fan_in, fed_by_dropout=fed,
                 moving_var=moving, real_var=moving / shift, shift=shift, shift_channelwise=shift * 1.05,
                 real_mean=np.full(idx.size, 0.1), cos2=np.full(idx.size, 0.3))
    layers = pa.table({f.name: pa.array(lcols[f.name], f.type) if f.name in lcols
                       else trials.column(f.name).take(pa.array(trial)) if f.name in trials.column_names
                       else pa.nulls(idx.size, f.type) for f in LAYERS_SCHEMA}, schema=LAYERS_SCHEMA)
    return trials, layers


def write_study(root: str, trials: pa.Table, layers: pa.Table, space: str = "planted", parts: int = 1) -> None:
    """Write planted tables as `parts` part files per dataset, the layout the driver writes."""
    for name, table in (("trials", trials), ("layers", layers)):
        folder = os.path.join(root, space, name)
        os.makedirs(folder, exist_ok=True)
        bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
        for i in range(parts):
            pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), os.path.join(folder, f"part-{i}.parquet"))


def _study(trials: pa.Table, layers: pa.Table):
    from analysis.load import Study

    return Study(trials, layers, ("planted",))


# ---------------------------------------------------------------------- fits
def test_shift_slope_recovered_within_ci() -> None:
    from analysis.fit import shift_vs_dim

    fits = shift_vs_dim(_study(*planted_study(shift_slope=-1.0)), n_boot=400, seed=1)
    assert [(f.dropout_placement, f.resample) for f in fits] == [("pre_bn", "trials"), ("pre_conv", "trials")]
    for f in fits:
        lo, hi = f.slope_ci
        assert lo <= -1.0 <= hi, (f.slope, f.slope_ci)
        assert hi - lo < 0.3  # informative, not absurdly wide
        assert f.r2 > 0.8 and f.n == 4 * 4 * 3


def test_critical_width_found() -> None:
    from analysis.fit import accuracy_cost

    cells, critical = accuracy_cost(_study(*planted_study(cost=critical_cost(4.0), acc_noise=0.005)))
    assert len(cells) == 3 * 4 and all(c.method == "paired t" and c.n == 4 for c in cells)
    assert {c.dropout_placement: c.width for c in critical} == {"pre_bn": 4.0, "pre_conv": 4.0, "head": 4.0}
    assert all(c.hurts_below and c.with_ci for c in critical)
    small = [c for c in cells if c.width < 4]
    assert all(c.harm and abs(c.cost + 0.05) < 0.01 for c in small)


def test_critical_width_not_reached_and_one_seed() -> None:
    from analysis.fit import accuracy_cost
    from analysis.guidelines import analyse, guidelines

    study = _study(*planted_study(cost=critical_cost(100.0), placements=("none", "pre_bn")))
    _, critical = accuracy_cost(study)
    assert critical[0].width is None
    assert [g.kind for g in guidelines(analyse(study, n_boot=50)) if g.kind in ("hurts", "critical_width")] == ["hurts"]
    cells, critical = accuracy_cost(_study(*planted_study(cost=critical_cost(4.0), seeds=(0,), acc_noise=0.001)))
    assert all(c.method == "n=1" and math.isnan(c.ci_low) for c in cells)
    assert critical[0].width == 4.0 and not critical[0].with_ci


def test_null_effect_yields_no_hurting_guideline() -> None:
    from analysis.guidelines import analyse, guidelines

    trials, layers = planted_study(cost=None, shift_slope=0.0, reest_gain=0.0, placements=("none", "pre_bn", "head"),
                                   rng=3)
    a = analyse(_study(trials, layers), n_boot=200)
    gs = guidelines(a)
    assert not [g for g in gs if g.kind in ("critical_width", "hurts", "shift_vs_dim", "bn_reestimation")], gs
    assert all("cost" not in g.text or g.kind == "no_cost" for g in gs)
    assert not any(c.harm for c in a.costs)


def test_reestimation_gain_and_correlation() -> None:
    from analysis.fit import bn_reestimation

    rows, pooled, corr = bn_reestimation(_study(*planted_study(reest_gain=0.01, reest_per_shift=0.5, rng=2)))
    assert len(rows) == 4 * 4  # (none + 3 placements) x 4 widths
    by = {dict(r.label)["dropout_placement"]: r for r in pooled}
    assert by["none"].ci_low <= 0 <= by["none"].ci_high
    assert by["head"].ci_low <= 0.01 <= by["head"].ci_high
    assert by["pre_bn"].gain > 0.01 and by["pre_bn"].p_adj < 0.05
    assert corr is not None and corr.x == "mean_shift_fed" and corr.r > 0.5 and corr.p < 1e-3


def test_factor_importance_ranks_planted_factor_first() -> None:
    from analysis.guidelines import factor_importance

    width_effect = lambda p, t, r, w: 0.04 * np.log2(w) - 0.005 * (p != "none")  # noqa: E731
    rows = factor_importance(_study(*planted_study(cost=width_effect)), "test_acc")
    assert [r.factor for r in rows][:2] == ["width", "dropout_placement"]
    assert rows[0].share > 0.9 and rows[0].p_adj < 1e-6
    placement_effect = lambda p, t, r, w: -0.05 * (p == "pre_bn")  # noqa: E731
    assert factor_importance(_study(*planted_study(cost=placement_effect)))[0].factor == "dropout_placement"


# ---------------------------------------------------------------------- load
def test_load_dedups_on_run_id_keeping_newest(tmp_path) -> None:
    from analysis.load import load_study

    trials, layers = planted_study(placements=("none", "pre_bn"), widths=(1.0, 2.0), seeds=(0, 1))
    write_study(str(tmp_path), trials, layers, parts=2)
    # A resumed sweep wrote run 0 again, later and with another accuracy.
    again = trials.slice(0, 1).set_column(trials.schema.get_field_index("test_acc"), "test_acc", pa.array([0.123]))
    when = TRIALS_SCHEMA.field("finished_at")
    again = again.set_column(again.schema.get_field_index("finished_at"), when,
                             pa.array([dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)], when.type))
    pq.write_table(again, tmp_path / "planted" / "trials" / "part-z.parquet")
    pq.write_table(layers.slice(0, 6), tmp_path / "planted" / "layers" / "part-z.parquet")
    study = load_study("planted", root=str(tmp_path))
    assert study.trials.num_rows == trials.num_rows and study.layers.num_rows == layers.num_rows
    acc = dict(zip(study.trials.column("run_id").to_pylist(), study.trials.column("test_acc").to_pylist()))
    assert acc["planted-000000"] == 0.123
    assert any("duplicate trial rows" in n for n in study.notes)


def test_load_errors_name_column_file_and_command(tmp_path) -> None:
    from analysis.load import load_study

    with pytest.raises(ValueError, match=r"no trial results under .*nope/trials.*search.run --space nope"):
        load_study("nope", root=str(tmp_path))
    trials, layers = planted_study(placements=("none",), widths=(1.0,), seeds=(0,))
    write_study(str(tmp_path), trials, layers)
    foreign = tmp_path / "planted" / "trials" / "part-foreign.parquet"
    pq.write_table(pa.table({"run_id": ["x"], "accuracy": [0.5]}), foreign)
    with pytest.raises(ValueError, match=r"part-foreign\.parquet: column 'config_hash' is missing"):
        load_study(["planted"], root=str(tmp_path))
    os.remove(foreign)
    bad = trials.set_column(trials.schema.get_field_index("width"), "width", pa.array(["wide"]))
    pq.write_table(bad, tmp_path / "planted" / "trials" / "part-bad.parquet")
    with pytest.raises(ValueError, match=r"part-bad\.parquet: column 'width' has type string, expected double"):
        load_study("planted", root=str(tmp_path))
    (tmp_path / "planted" / "trials" / "part-bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"part-bad\.parquet"):
        load_study("planted", root=str(tmp_path))


def test_theory_beside_the_fit_scalar_or_vectorised(monkeypatch) -> None:
    import analysis.fit
    from analysis.fit import shift_vs_dim

    study = _study(*planted_study(placements=("none", "pre_conv"), widths=(1.0, 2.0), seeds=(0, 1)))
    calls = []

    def scalar(kind, placement, rate, c, v, d, cos2, rho=0.0):  # math.* rejects arrays: forces the per-point path
        calls.append(placement)
        return 1.0 + 20.0 * math.exp(-math.log(d))

    def vectorised(kind, placement, rate, c, v, d, cos2, rho=0.0):  # returns Var_test/Var_train < 1, not the shift
        return 1.0 / (1.0 + d**-0.5)

    for fn, slope in ((scalar, -1.0), (vectorised, -0.5)):
        monkeypatch.setattr(analysis.fit, "predict_layer_shift", fn)
        (fit,) = shift_vs_dim(study, n_boot=100)
        assert fit.theory_slope == pytest.approx(slope, abs=1e-6) and fit.theory_mean > 1.0
        assert fit.cos2_assumed == 0
    assert calls and set(calls) == {"pre_conv"}

    def broken(*args, **kwargs):
        raise RuntimeError("not implemented yet")

    monkeypatch.setattr(analysis.fit, "predict_layer_shift", broken)
    (fit,) = shift_vs_dim(study, n_boot=100)
    assert fit.note == "theory failed: RuntimeError: not implemented yet" and math.isfinite(fit.slope)


def test_load_rebuilds_missing_parquet_from_tracking(tmp_path, monkeypatch) -> None:
    import analysis.load
    import search.sweep.preflight
    import search.sweep.tracking
    from analysis.load import load_study

    calls = []

    def fake_rebuild(space: str, tracking_uri: str, root: str) -> tuple[int, int]:
        calls.append((space, tracking_uri, root))
        if space == "gone":
            raise ValueError(f"space {space!r}: no MLflow experiment of that name at {tracking_uri}")
        trials, layers = planted_study(placements=("none",), widths=(1.0,), seeds=(0,), space=space)
        write_study(root, trials, layers, space=space)
        return trials.num_rows, layers.num_rows

    monkeypatch.setattr(search.sweep.tracking, "rebuild_parquet", fake_rebuild)
    # the store's own checks (it exists, holds the space's trial runs) are tests/test_errors.py's report-tracking-*
    monkeypatch.setattr(search.sweep.preflight, "check_tracking", lambda *a, **k: None)
    monkeypatch.setattr(analysis.load, "_check_experiment", lambda *a, **k: None)
    study = load_study("planted", root=str(tmp_path), tracking_uri="sqlite:///x.db")
    assert calls == [("planted", "sqlite:///x.db", str(tmp_path))] and study.trials.num_rows == 1
    load_study("planted", root=str(tmp_path), tracking_uri="sqlite:///x.db")  # Parquet there now: no rebuild
    assert len(calls) == 1
    with pytest.raises(ValueError, match="no MLflow experiment of that name"):
        load_study("gone", root=str(tmp_path), tracking_uri="sqlite:///x.db")


def test_critical_width_never_starts_at_a_cell_whose_interval_shows_a_cost() -> None:
    """Holm over many cells leaves a -24 pp cost with CI [-34, -15] 'not harmed'; it still cannot be the
    width from which on dropout does not hurt (the fashion study's pre_bn 0.5 at width 1)."""
    from analysis.fit import CostCell, _critical

    def cell(width: float, lo: float, hi: float, harm: bool = False) -> CostCell:
        return CostCell((), "bernoulli", "pre_bn", 0.5, width, 3, (lo + hi) / 2, lo, hi, 0.01, "paired", 0.6, 0.8,
                        p_adj=0.3, harm=harm)

    (cw,) = _critical([cell(1, -0.34, -0.15), cell(2, -0.26, -0.05), cell(3, -0.02, 0.01)], tol=0.005)
    assert cw.width == 3 and cw.hurts_below and cw.below.width == 2
    (cw,) = _critical([cell(1, -0.34, -0.15), cell(2, -0.26, -0.05), cell(3, -0.19, -0.02)], tol=0.005)
    assert cw.width is None  # not reached: it costs at every width tested
    (cw,) = _critical([cell(1, -0.03, 0.01), cell(2, -0.02, 0.01)], tol=0.005)
    assert cw.width == 1 and not cw.hurts_below  # intervals holding 0 everywhere: from the smallest width
