"""The report's figures, PNG and PDF, with matplotlib's Agg backend (the only module importing matplotlib).

- shift vs BN layer index per configuration (the paper's figure), one file per dropout type;
- shift - 1 vs feature dimension d on log axes with the fitted lines and the theory's;
- accuracy vs width per placement with 95% t intervals over seeds;
- BN re-estimation: accuracy before vs after per configuration, and gain vs measured shift;
- the decomposition: the theory's excess variance per BN layer, injected locally vs inherited, beside the
  frozen measurement.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from .fit import mean_ci  # noqa: E402
from .guidelines import Analysis, fmt_width  # noqa: E402
from .load import group_codes  # noqa: E402

__all__ = ["Figure", "write_figures"]

PLACEMENT_ORDER = ("none", "pre_bn", "pre_conv", "head")
COLORS = {"none": "black", "pre_bn": "tab:red", "pre_conv": "tab:blue", "head": "tab:green"}
LAYER_CONTEXT = ("backbone", "depth", "dataset")  # context columns the layers table carries
LEGEND = dict(fontsize=8, framealpha=0.85)  # 8 pt: readable when a panel is printed at a column's width
PLACEMENT_LABELS = {"none": "no dropout", "pre_bn": "dropout before BN (pre_bn)",
                    "pre_conv": "dropout before conv (pre_conv)", "head": "dropout before the classifier (head)"}
# Human axis labels for the columns a figure may put on an axis.
AXIS_LABELS = {"mean_shift_fed": "mean variance shift, BN layers fed by dropout",
               "mean_shift": "mean variance shift over BN layers", "max_shift": "largest variance shift of a BN layer"}


def _ci_text(lo: float, hi: float, nd: int = 2) -> str:
    """" [lo, hi]", or nothing when the interval is undefined (too few points): never "[nan, nan]"."""
    return f" [{lo:.{nd}f}, {hi:.{nd}f}]" if math.isfinite(lo) and math.isfinite(hi) else ""


def _log_ticks_at(axis, values) -> None:
    """Label a log axis at the data's own values when they are few (a short log range has no labelled decade)."""
    vals = sorted({float(v) for v in values if np.isfinite(v) and v > 0})
    if 0 < len(vals) <= 8:
        axis.set_major_locator(FixedLocator(vals))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())


@dataclass(frozen=True)
class Figure:
    """One written figure: `stem`.png and `stem`.pdf under the figures folder."""

    stem: str
    caption: str


def write_figures(a: Analysis, folder: str, *, max_points: int = 4000, seed: int = 0) -> list[Figure]:
    """Write every figure the analysis supports into `folder`; returns what was written."""
    os.makedirs(folder, exist_ok=True)
    figs: list[Figure] = []
    for make in (_shift_by_layer, _shift_vs_dim, _accuracy_vs_width, _reestimation, _decomposition):
        for stem, caption, fig in make(a, max_points=max_points, seed=seed):
            fig.tight_layout()  # once; constrained layout would redo it for every file written
            for ext, kw in (("png", {"dpi": 100}), ("pdf", {})):  # atomically: no half-written figure on a kill
                final = os.path.join(folder, f"{stem}.{ext}")
                tmp = os.path.join(folder, f".{stem}.{ext}.tmp")
                fig.savefig(tmp, format=ext, **kw)
                os.replace(tmp, final)
            plt.close(fig)
            figs.append(Figure(stem, caption))
    return figs


def _grid(rows: int, cols: int, w: float = 3.6, h: float = 3.0, **share: object):
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False, **share)
    return fig, axes


def _ctx_label(key: dict, varying: list[str]) -> str:
    return ", ".join(f"{k}={key[k]}" for k in varying)


def _shift_by_layer(a: Analysis, **_: object):
    L = a.study.layers
    if L.num_rows == 0:
        return
    keys = list(LAYER_CONTEXT) + ["dropout_type", "dropout_placement", "dropout_rate", "width", "index"]
    L = L.set_column(L.schema.get_field_index("fed_by_dropout"), "fed_by_dropout",
                     pc.fill_null(L.column("fed_by_dropout"), False))
    agg = L.group_by(keys).aggregate([("shift", "mean"), ("fed_by_dropout", "max")]).sort_by(
        [(k, "ascending") for k in keys])
    rows = agg.to_pylist()
    ctx_vary = [k for k in LAYER_CONTEXT if len({r[k] for r in rows}) > 1]
    types = sorted({r["dropout_type"] for r in rows if r["dropout_placement"] != "none"}) or ["bernoulli"]
    placements = [p for p in PLACEMENT_ORDER if any(r["dropout_placement"] == p for r in rows)]
    widths = sorted({r["width"] for r in rows})
    cmap = plt.get_cmap("viridis")
    styles = ["-", "--", ":", "-."]
    for dtype in types:
        # One y-scale for all panels: the placements compare by height at a glance. Two panels a row:
        # the figure stays near a page's width, so its 8-pt text is still ~6 pt in the PDF.
        ncol = min(len(placements), 2)
        fig, axes = _grid(-(-len(placements) // ncol), ncol, w=3.4, h=2.6, sharey=True)
        for ax in axes.flat[len(placements):]:
            ax.set_visible(False)
        for ax, pl in zip(axes.flat, placements):
            sel = [r for r in rows if r["dropout_placement"] == pl and (pl == "none" or r["dropout_type"] == dtype)]
            series: dict[tuple, list[tuple[int, float, bool]]] = {}
            for r in sel:
                series.setdefault((tuple(r[k] for k in ctx_vary), r["dropout_rate"], r["width"]), []).append(
                    (r["index"], r["shift_mean"], bool(r["fed_by_dropout_max"])))
            rates = sorted({k[1] for k in series})
            any_fed = False
            for (ctx, rate, width), pts in series.items():
                x, y, fed = zip(*sorted(pts))
                color = cmap(widths.index(width) / max(len(widths) - 1, 1))
                label = f"width {fmt_width(width)}" + (f", rate {rate:g}" if len(rates) > 1 else "") + (
                    f", {'/'.join(map(str, ctx))}" if ctx else "")
                ax.plot(x, y, styles[rates.index(rate) % 4], color=color, marker=".", label=label, lw=1)
                fx = [xi for xi, f in zip(x, fed) if f]
                if fx:  # the BN layers dropout feeds: a ring around their points
                    any_fed = True
                    ax.scatter(fx, [yi for yi, f in zip(y, fed) if f], s=46, facecolors="none",
                               edgecolors="tab:red", linewidths=1.2, zorder=3)
            ax.axhline(1.0, color="grey", lw=0.6, ls="--")
            ax.set_title(PLACEMENT_LABELS.get(pl, pl), fontsize=9)
            ax.set_xlabel("BN layer (execution order)")
            ax.xaxis.get_major_locator().set_params(integer=True)
            handles, _ = ax.get_legend_handles_labels()
            if any_fed:
                handles.append(Line2D([], [], ls="none", marker="o", ms=7, mfc="none", mec="tab:red",
                                      label="fed by dropout"))
            if len(series) <= 12:
                ax.legend(handles=handles, **LEGEND)
        for row in axes:
            row[0].set_ylabel("variance shift\n(mean over seeds)")
        yield (f"shift_by_layer_{dtype}", f"Variance shift at each BN layer, {dtype} dropout, one panel per "
               "placement on one y-scale; lines: width (colour) and rate (style), mean over seeds; red rings: BN "
               "layers fed by dropout; dashed: no shift (1)", fig)


def _shift_vs_dim(a: Analysis, *, max_points: int, seed: int):
    fits = [f for f in a.shift_fits if math.isfinite(f.slope)]
    if not fits:
        return
    L = a.study.layers
    L = L.filter(pc.and_(pc.and_(pc.fill_null(L.column("fed_by_dropout"), False), pc.is_valid(L.column("fan_in"))),
                         pc.greater(L.column("shift"), 1.0)))
    types = sorted({f.dropout_type for f in fits})
    placements = [p for p in PLACEMENT_ORDER if any(f.dropout_placement == p for f in fits)]
    rates = sorted({f.dropout_rate for f in fits})
    cmap = plt.get_cmap("plasma")
    codes, keys = group_codes(L, ["dropout_type", "dropout_placement", "dropout_rate"])
    d, s = L.column("fan_in").to_numpy().astype(float), L.column("shift").to_numpy()
    rng = np.random.default_rng(seed)
    fig, axes = _grid(len(types), len(placements))
    for f in fits:
        ax = axes[types.index(f.dropout_type)][placements.index(f.dropout_placement)]
        color = cmap(0.85 * rates.index(f.dropout_rate) / max(len(rates) - 1, 1))
        g = keys.index((f.dropout_type, f.dropout_placement, f.dropout_rate)) if (
            f.dropout_type, f.dropout_placement, f.dropout_rate) in keys else -1
        rows = np.flatnonzero(codes == g)
        if rows.size > max_points // max(len(fits), 1):  # a readable, small file
            rows = rng.choice(rows, max_points // max(len(fits), 1), replace=False)
        ax.scatter(d[rows], s[rows] - 1.0, s=6, alpha=0.35, color=color)
        xs = np.geomspace(d[rows].min() if rows.size else 1, d[rows].max() if rows.size else 10, 20)
        ax.plot(xs, np.exp(f.intercept) * xs**f.slope, color=color, lw=1.5,
                label=f"rate {f.dropout_rate:g}: slope {f.slope:.2f}{_ci_text(*f.slope_ci)}")
        if math.isfinite(f.theory_slope):
            ax.plot(xs, np.exp(f.theory_intercept) * xs**f.theory_slope, "--", color=color, lw=1,
                    label=f"theory: slope {f.theory_slope:.2f}")
    for i, t in enumerate(types):
        for j, pl in enumerate(placements):
            ax = axes[i][j]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())  # minor labels on a short log range overlap
            ax.xaxis.set_minor_formatter(NullFormatter())
            _log_ticks_at(ax.xaxis, d)  # the tested d themselves, else a short range shows no label at all
            ax.set_title(f"{t} dropout, placement {pl}", fontsize=9)
            ax.set_xlabel("feature dimension d (fan-in)")
            ax.legend(**LEGEND)
        axes[i][0].set_ylabel("excess variance shift (shift - 1)")
    yield ("shift_vs_dim", "Excess variance shift (shift - 1) against the feature dimension d, log axes, BN layers "
           "fed by dropout; solid: least-squares fit (95% bootstrap CI of the slope); dashed: theory", fig)


def _accuracy_vs_width(a: Analysis, **_: object):
    t = a.study.trials.filter(pc.is_finite(a.study.trials.column("test_acc")))
    if t.num_rows == 0:
        return
    ctx_codes, ctx_keys = group_codes(t, a.context) if a.context else (np.zeros(t.num_rows, np.int64), [()])
    for ci, ckey in enumerate(ctx_keys):
        sub = t.filter(pa.array(ctx_codes == ci))
        drop = sub.filter(pc.not_equal(sub.column("dropout_placement"), "none"))
        types = sorted(set(drop.column("dropout_type").to_pylist())) or ["bernoulli"]
        rates = sorted(set(drop.column("dropout_rate").to_pylist())) or [0.0]
        fig, axes = _grid(len(types), len(rates))
        codes, keys = group_codes(sub, ["dropout_type", "dropout_placement", "dropout_rate", "width"])
        acc = sub.column("test_acc").to_numpy()
        summary = {k: mean_ci(acc[codes == g], a.level) for g, k in enumerate(keys)}
        for i, dtype in enumerate(types):
            for j, rate in enumerate(rates):
                ax = axes[i][j]
                for pl in PLACEMENT_ORDER:
                    pts = sorted((k[3], v) for k, v in summary.items()
                                 if k[1] == pl and (pl == "none" or (k[0] == dtype and k[2] == rate)))
                    if not pts:
                        continue
                    w = np.array([p[0] for p in pts])
                    m = np.array([100 * p[1][0] for p in pts])
                    lo = np.array([100 * p[1][1] for p in pts])
                    hi = np.array([100 * p[1][2] for p in pts])
                    err = np.where(np.isfinite(lo), np.vstack([m - lo, hi - m]), 0.0)
                    ax.errorbar(w, m, yerr=err, color=COLORS[pl], marker="o", ms=3, capsize=2, lw=1, label=pl)
                ax.set_xscale("log", base=2)
                tested = sorted({k[3] for k in summary})
                ax.set_xticks(tested, [fmt_width(w) for w in tested])
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.set_title(f"{dtype} dropout, rate {rate:g}", fontsize=9)
                ax.set_xlabel("width multiplier")
                ax.legend(**LEGEND)
            axes[i][0].set_ylabel("test accuracy (%)")
        label = _ctx_label(dict(zip(a.context, ckey)), a.context)
        stem = "accuracy_vs_width" + (f"_{ci + 1}" if len(ctx_keys) > 1 else "")
        yield (stem, f"Test accuracy against width per placement{' (' + label + ')' if label else ''}; "
               f"bars: {a.level:.0%} t intervals over seeds (none where n = 1)", fig)


def _reestimation(a: Analysis, **_: object):
    if not a.reest:
        return
    fig, axes = _grid(1, 2 if a.correlation is not None else 1, w=4.0, h=3.6)
    ax = axes[0][0]
    for pl in PLACEMENT_ORDER:
        rows = [r for r in a.reest if dict(r.label).get("dropout_placement") == pl]
        if rows:
            ax.scatter([100 * r.before for r in rows], [100 * r.after for r in rows], s=14, color=COLORS[pl], label=pl)
    lims = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
    ax.plot(lims, lims, color="grey", lw=0.8)
    ax.set_xlabel("test accuracy before (%)")
    ax.set_ylabel("after BN re-estimation (%)")
    ax.set_title("per configuration (mean over seeds)", fontsize=9)
    ax.legend(**LEGEND)
    if a.correlation is not None:
        c, t = a.correlation, a.study.trials
        x, b, aft = t.column(c.x).to_numpy(), t.column("test_acc").to_numpy(), t.column("test_acc_reest").to_numpy()
        pl = np.asarray(t.column("dropout_placement").to_pylist(), dtype=object)
        ax = axes[0][1]
        for p in PLACEMENT_ORDER[1:]:
            sel = (pl == p) & np.isfinite(x) & np.isfinite(aft - b)
            if sel.any():
                ax.scatter(x[sel], 100 * (aft - b)[sel], s=8, color=COLORS[p], label=p, alpha=0.6)
        ax.set_xlabel(AXIS_LABELS.get(c.x, c.x.replace("_", " ")))
        ax.set_ylabel("accuracy gain from re-estimation (pp)")
        ax.set_title(f"Pearson r = {c.r:.2f}{_ci_text(c.ci_low, c.ci_high)}, n = {c.n}", fontsize=9)
        ax.legend(**LEGEND)
    yield ("bn_reestimation", "BN re-estimation: accuracy before vs after per configuration (left, diagonal = no "
           "change) and the gain against the measured shift per dropout trial (right)", fig)


def _decomposition(a: Analysis, **_: object):
    """Per configuration (at its narrowest width): the theory's excess split into local and inherited."""
    if not a.mechanism:
        return
    L = a.study.layers
    L = L.filter(pc.is_in(L.column("dropout_placement"), value_set=pa.array(["pre_bn", "pre_conv"])))
    L = L.filter(pc.is_finite(pc.fill_null(L.column("shift_theory"), float("nan"))))
    if L.num_rows == 0:
        return
    keys = ["backbone", "dropout_type", "dropout_placement", "dropout_rate"]
    configs = sorted({tuple(r[k] for k in keys) for r in L.select(keys).to_pylist()},
                     key=lambda c: (c[0], PLACEMENT_ORDER.index(c[2]), c[1], c[3]))[:8]
    ncol = min(len(configs), 2)
    fig, axes = _grid(-(-len(configs) // ncol), ncol, w=3.6, h=2.6)
    for ax in axes.flat[len(configs):]:
        ax.set_visible(False)
    for ax, cfg in zip(axes.flat, configs):
        sub = L.filter(_match(L, dict(zip(keys, cfg))))
        width = min(sub.column("width").to_pylist())
        sub = sub.filter(pc.equal(sub.column("width"), width))
        agg = sub.group_by(["index"]).aggregate([("excess_local", "mean"), ("excess_inherited", "mean"),
                                                 ("shift_frozen", "mean"), ("fed_by_dropout", "max")]).sort_by("index")
        idx = np.asarray(agg.column("index").to_pylist())
        loc = np.nan_to_num(pc.fill_null(agg.column("excess_local_mean"), 0.0).to_numpy(zero_copy_only=False))
        inh = np.nan_to_num(pc.fill_null(agg.column("excess_inherited_mean"), 0.0).to_numpy(zero_copy_only=False))
        fro = pc.fill_null(agg.column("shift_frozen_mean"), float("nan")).to_numpy(zero_copy_only=False) - 1.0
        ax.bar(idx, loc, color=COLORS[cfg[2]], label="injected here (local)")
        ax.bar(idx, inh, bottom=loc, color=COLORS[cfg[2]], alpha=0.35, label="inherited from earlier dropouts")
        ax.plot(idx, fro, "k.", ms=5, label="measured (shift_frozen - 1)")
        ax.set_title(f"{cfg[0]} w{fmt_width(width)}, {cfg[1]} {cfg[3]:g}, {cfg[2]}", fontsize=9)
        ax.set_xlabel("BN layer (execution order)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("excess / eval-mode variance")
    first = axes.flat[0]
    lo, hi = first.get_ylim()
    first.set_ylim(lo, lo + 2.0 * (hi - lo))  # headroom: the legend sits above the bars, not on them
    first.legend(loc="upper right", **LEGEND)
    yield ("decomposition", "The theory's excess variance at each BN layer (shift_theory - 1), split into the part "
           "the dropout feeding that layer injects (dark) and the part inherited from earlier dropouts down the "
           "residual stream or concatenation (light); dots: the frozen measurement; narrowest width of each "
           "configuration, mean over seeds", fig)


def _match(t: pa.Table, where: dict) -> pa.Array:
    mask = None
    for k, v in where.items():
        m = pc.equal(t.column(k), v)
        mask = m if mask is None else pc.and_(mask, m)
    return mask
