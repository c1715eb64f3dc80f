"""analysis.figures as a reader sees them: accuracy axes within 0-100%, no empty panel or legend, readable log
ticks, captions that describe the panels drawn, 200+ dpi PNGs and vector PDFs."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from test_analysis_fit import _study, critical_cost, planted_study


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")  # the figures _drawn kept open for inspection


def _drawn(monkeypatch, tmp_path, trials: pa.Table, layers: pa.Table, name: str = "figs"):
    """Run write_figures on a planted study; returns ({stem: (caption, matplotlib figure)}, folder)."""
    import analysis.figures as F
    from analysis.guidelines import analyse

    kept: list = []
    real_close = F.plt.close
    monkeypatch.setattr(F.plt, "close", lambda fig=None: kept.append(fig))  # keep each figure to inspect it
    folder = str(tmp_path / name)
    try:
        written = F.write_figures(analyse(_study(trials, layers), n_boot=100), folder)
    finally:
        monkeypatch.setattr(F.plt, "close", real_close)
    assert len(kept) == len(written)
    return {w.stem: (w.caption, fig) for w, fig in zip(written, kept)}, folder


def _panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_visible()]


def _near_100(placement, dtype, rate, width) -> np.ndarray:
    """Accuracy ~99.5%: with the noise below, some seeds' t intervals reach past 100%."""
    return np.full(len(placement), 0.095)


@pytest.fixture(scope="module")
def near_ceiling():
    trials, layers = planted_study(placements=("none", "pre_bn", "head"), widths=(1.0, 2.0, 4.0), seeds=(0, 1, 2),
                                   n_layers=4, cost=_near_100, acc_noise=0.01, reest_gain=0.0)
    for col in ("test_acc", "test_acc_reest"):  # an accuracy is at most 1
        trials = trials.set_column(trials.schema.get_field_index(col), col, pc.min_element_wise(trials[col], 1.0))
    return trials, layers


def test_accuracy_axes_stay_within_0_and_100(monkeypatch, tmp_path, near_ceiling) -> None:
    from analysis.fit import mean_ci

    trials, layers = near_ceiling
    # The planted study does put interval ends past 100%: otherwise this test would show nothing.
    acc = trials.column("test_acc").to_numpy()
    cells = np.array([f"{p}/{w}" for p, w in zip(trials.column("dropout_placement").to_pylist(),
                                                   trials.column("width").to_pylist())])
    his = [mean_ci(acc[cells == c])[2] for c in set(cells)]
    assert max(h for h in his if np.isfinite(h)) > 1.0
    figs, _ = _drawn(monkeypatch, tmp_path, trials, layers)
    for ax in _panels(figs["accuracy_vs_width"][1]):
        lo, hi = ax.get_ylim()
        assert 0.0 <= lo < hi <= 100.0, (ax.get_title(), lo, hi)
    before_after = _panels(figs["bn_reestimation"][1])[0]
    for lo, hi in (before_after.get_xlim(), before_after.get_ylim()):
        assert 0.0 <= lo < hi <= 100.0


def test_points_at_one_width_are_dodged(monkeypatch, tmp_path, near_ceiling) -> None:
    figs, _ = _drawn(monkeypatch, tmp_path, *near_ceiling)
    for ax in _panels(figs["accuracy_vs_width"][1]):
        xs = [np.asarray(line.get_xdata(), float) for line in ax.lines if len(line.get_xdata()) > 0
              and line.get_linestyle() not in ("None", "")]
        assert len(xs) >= 2
        for a, b in itertools.combinations(xs, 2):  # no two series share an x position
            assert not set(np.round(a, 9)) & set(np.round(b, 9))
        # ...and each stays near its width on the log-2 axis (within a tenth of a doubling)
        for x in xs:
            assert np.all(np.abs(np.log2(x) - np.round(np.log2(x))) < 0.1)


def _sampled_study():
    """Six trials as a sampler draws them: one width, each dropout trial its own (type, rate)."""
    trials, layers = planted_study(placements=("none", "pre_bn", "pre_conv", "head"), widths=(1.0,),
                                   types=("bernoulli", "gaussian", "uout"), rates=(0.1, 0.15, 0.5, 0.55, 0.65),
                                   seeds=(0,), n_layers=6)
    rows = trials.select(["run_id", "dropout_type", "dropout_placement", "dropout_rate"]).to_pylist()
    want = {("bernoulli", "none", 0.0), ("gaussian", "pre_bn", 0.65), ("bernoulli", "head", 0.55),
            ("uout", "head", 0.5), ("gaussian", "pre_conv", 0.1), ("bernoulli", "pre_conv", 0.15)}
    ids = [r["run_id"] for r in rows if (r["dropout_type"], r["dropout_placement"], r["dropout_rate"]) in want]
    assert len(ids) == 6
    keep = pa.array(ids)
    return (trials.filter(pc.is_in(trials.column("run_id"), value_set=keep)),
            layers.filter(pc.is_in(layers.column("run_id"), value_set=keep)))


@pytest.mark.parametrize("study", ["grid", "sampled"])
def test_no_empty_panel_and_no_empty_legend(monkeypatch, tmp_path, study) -> None:
    trials, layers = (planted_study(placements=("none", "pre_bn", "pre_conv", "head"), widths=(1.0, 2.0),
                                    types=("bernoulli", "uout"), rates=(0.1, 0.5), seeds=(0, 1, 2), n_layers=4)
                      if study == "grid" else _sampled_study())
    figs, _ = _drawn(monkeypatch, tmp_path, trials, layers)
    assert "accuracy_vs_width" in figs and "shift_vs_dim" in figs
    for stem, (_, fig) in figs.items():
        for ax in _panels(fig):
            assert ax.has_data(), f"{stem}: empty panel {ax.get_title()!r}"
            leg = ax.get_legend()
            assert leg is None or leg.get_texts(), f"{stem}: empty legend in {ax.get_title()!r}"
    acc = _panels(figs["accuracy_vs_width"][1])
    if study == "grid":  # 2 types x 2 rates, every one run: one panel each
        assert len(acc) == 4
    else:  # 5 (type, rate) pairs among 5 dropout trials: one panel, not 15 mostly empty ones
        assert len(acc) == 1
        assert "one panel" in figs["accuracy_vs_width"][0]


def test_log_axes_have_several_labels_that_do_not_collide(monkeypatch, tmp_path) -> None:
    # Widths 1, 2, 3: fan-ins 144, 288, 432, 576, 864, 1152, 1728 (the Fashion study's, whose labels read
    # "8641152"); a flat, narrow shift range (less than a decade: one labelled decade tick at most).
    trials, layers = planted_study(placements=("none", "pre_bn", "pre_conv"), widths=(1.0, 2.0, 3.0), seeds=(0, 1),
                                   n_layers=6, shift_amp=0.5, shift_slope=-0.05, shift_noise=0.05)
    figs, _ = _drawn(monkeypatch, tmp_path, trials, layers)
    fig = figs["shift_vs_dim"][1]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in _panels(fig):
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            assert axis.get_scale() == "log"
            labels = [t for t, v in zip(axis.get_majorticklabels(), axis.get_majorticklocs())
                      if t.get_text() and min(lo, hi) <= v <= max(lo, hi)]
            assert len(labels) >= 2, (ax.get_title(), axis.axis_name, [t.get_text() for t in labels])
            boxes = [t.get_window_extent(renderer) for t in labels]
            for a, b in itertools.combinations(boxes, 2):
                assert not a.overlaps(b), (ax.get_title(), axis.axis_name, [t.get_text() for t in labels])


def test_captions_describe_the_panels_drawn(monkeypatch, tmp_path) -> None:
    trials, layers = planted_study(placements=("none", "pre_bn", "head"), widths=(1.0, 2.0, 4.0), seeds=(0, 1, 2),
                                   n_layers=4, cost=critical_cost(2.0), reest_per_shift=0.3)
    for name, study in (("planted", (trials, layers)), ("sampled", _sampled_study())):
        figs, _ = _drawn(monkeypatch, tmp_path, *study, name=name)
        caption, fig = figs["bn_reestimation"]
        two = len(_panels(fig)) == 2
        assert ("Left:" in caption and "Right:" in caption) == two, caption
        assert ("left" in caption.lower()) == two, caption


def test_png_at_200_dpi_and_vector_pdf(monkeypatch, tmp_path) -> None:
    from PIL import Image

    trials, layers = planted_study(placements=("none", "pre_bn", "head"), widths=(1.0, 2.0), seeds=(0, 1, 2),
                                   n_layers=4)
    figs, folder = _drawn(monkeypatch, tmp_path, trials, layers)
    for stem in figs:
        with Image.open(os.path.join(folder, f"{stem}.png")) as im:
            dpi = im.info.get("dpi", (0, 0))
            assert min(dpi) >= 199.5, (stem, dpi)  # the PNG's pHYs chunk, as written
        pdf = open(os.path.join(folder, f"{stem}.pdf"), "rb").read()
        assert pdf.startswith(b"%PDF-") and b"/Subtype /Image" not in pdf, f"{stem}.pdf holds a raster image"
