"""The report's figures, PNG and PDF, with matplotlib's Agg backend (the only module importing matplotlib).

- shift vs BN layer index per configuration (the paper's figure), one file per dropout type;
- shift - 1 vs feature dimension d on log axes (pooled over positions) with the fitted lines and the paper's
  closed form; shift - 1 vs width at each BN position (the width effect where it is identified); D over epochs;
- accuracy vs width per placement with 95% t intervals over seeds;
- BN re-estimation: accuracy before vs after per configuration, and gain vs measured shift;
- the decomposition: the propagation's excess variance per BN layer, injected locally vs inherited, beside the
  frozen measurement.
"""
from __future__ import annotations

import math
import os
import re
import textwrap
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from .fit import mean_ci  # noqa: E402
from .guidelines import Analysis, fmt_width  # noqa: E402
from .literature import PLACEMENT_ORDER, placement_comparison, schedule_comparison  # noqa: E402
from .load import constant_schedule, group_codes  # noqa: E402

__all__ = ["Figure", "write_figures"]

COLORS = {"none": "black", "pre_bn": "tab:red", "pre_conv": "tab:blue", "head": "tab:green", "post_conv": "tab:purple",
          "post_bn": "tab:orange", "post_add": "tab:brown", "pre_pool": "tab:olive"}
MARKERS = ("o", "s", "^", "D", "v", "P")  # per dropout type, where one panel holds several
LAYER_CONTEXT = ("backbone", "depth", "dataset")  # context columns the layers table carries
LEGEND = dict(fontsize=8, framealpha=0.85)  # 8 pt: readable when a panel is printed at a column's width
PLACEMENT_LABELS = {"none": "no dropout", "pre_bn": "dropout before BN (pre_bn)",
                    "pre_conv": "dropout before conv (pre_conv)", "head": "dropout before the classifier (head)",
                    "post_conv": "dropout after conv (post_conv)", "post_bn": "dropout after BN (post_bn)",
                    "post_add": "dropout after the residual add (post_add)",
                    "pre_pool": "dropout before global pooling (pre_pool)"}
# Human axis labels for the columns a figure may put on an axis.
AXIS_LABELS = {"mean_shift_fed": "mean variance shift, BN layers fed by dropout",
               "mean_shift": "mean variance shift over BN layers", "max_shift": "largest variance shift of a BN layer"}


def _ci_text(lo: float, hi: float, nd: int = 2) -> str:
    """" [lo, hi]", or nothing when the interval is undefined (too few points): never "[nan, nan]"."""
    return f" [{lo:.{nd}f}, {hi:.{nd}f}]" if math.isfinite(lo) and math.isfinite(hi) else ""


PNG_DPI = 200  # what a journal asks of raster figures; the PDFs are vector
ACC_RANGE = (0.0, 100.0)  # what a test accuracy in % can be: accuracy axes never show more


def _tick_label(v: float) -> str:
    """A log axis' tick label: the plain number where it is short (0.05, 2, 1152), else a power of ten."""
    if 1e-3 <= abs(v) < 1e5:
        return f"{v:g}"
    e = math.floor(math.log10(abs(v)))
    m = round(v / 10**e, 6)
    return f"$10^{{{e}}}$" if m == 1 else f"${m:g}\\times10^{{{e}}}$"


def _nice_log_ticks(lo: float, hi: float) -> list[float]:
    """At least three ticks in [lo, hi] on a log axis: decades, else 1-3, 1-2-5 or 1..9 per decade, else three
    values spread over the range (two significant digits): a short range still gets several labels."""
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    fine = (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)
    for subs in ((1,), (1, 3), (1, 2, 5), tuple(range(1, 10)), fine):
        ticks = [float(f"{s * 10.0**k:.6g}") for k in range(k0, k1 + 1) for s in subs]
        ticks = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
        # Enough labels, and they span the range: 0.5 ... 1 on an axis running to 1.4 leaves the top unlabelled.
        if len(ticks) >= 3 and ticks[-1] >= hi / 1.3 and ticks[0] <= lo * 1.3:
            step = -(-len(ticks) // 8)  # at most 8, the largest kept
            return ticks[::-1][::step][::-1]
    # Less than a factor ~2: evenly spaced round values (0.9, 1.0, 1.1 ...), as on a linear axis.
    ticks = [float(f"{t:.6g}") for t in MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)]
    return [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9) and t > 0]


def _log_ticks_at(ax, which: str, values=()) -> None:
    """Readable labelled ticks on a log axis, set once the axis' limits are final.

    At the data's own values when they are few (e.g. the tested fan-ins), else at 1-2-5 style values; labels
    that would collide with their neighbour are left out (their tick stays, unlabelled): never "8641152".
    """
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    if not (lo > 0 and hi > lo):
        return
    vals = sorted({float(v) for v in values if np.isfinite(v) and lo <= v <= hi})
    if not 2 <= len(vals) <= 12:
        vals = _nice_log_ticks(lo, hi)
    box = ax.get_window_extent()
    # in points, less what tight_layout takes later for labels
    length = 0.85 * (box.width if which == "x" else box.height) * 72.0 / ax.figure.dpi
    size = axis.get_ticklabels()[0].get_fontsize() if axis.get_ticklabels() else 10.0
    span = math.log10(hi) - math.log10(lo)

    def room(u: float, v: float) -> bool:  # the two labels' half-widths (x) or one label height (y), plus a gap
        vis = lambda t: len(re.sub(r"[$\\{}]|times", "", _tick_label(t)))  # noqa: E731
        need = 0.6 * size * (vis(u) + vis(v)) / 2 + 0.5 * size if which == "x" else 1.3 * size
        return (math.log10(v) - math.log10(u)) / span * length >= need

    keep: list[float] = []
    for v in vals:
        if not keep or room(keep[-1], v):
            keep.append(v)
        elif len(keep) > 1 and v == vals[-1] and room(keep[-2], v):
            keep[-1] = v  # the largest value labelled rather than its crowded neighbour
    axis.set_major_locator(FixedLocator(keep))
    axis.set_major_formatter(FuncFormatter(lambda v, _: _tick_label(v)))
    axis.set_minor_locator(FixedLocator([v for v in vals if v not in keep]))
    axis.set_minor_formatter(NullFormatter())


def _clip_axis(ax, which: str, lo: float, hi: float) -> None:
    """Limit an axis to what its quantity can be (an accuracy in %: 0-100), not what an interval reaches."""
    get, put = (ax.get_xlim, ax.set_xlim) if which == "x" else (ax.get_ylim, ax.set_ylim)
    a, b = get()
    put(max(a, lo), min(b, hi))


def _dodge(n: int, tested: list[float]) -> list[float]:
    """Multiplicative x offsets (log-2 axis) of n series at one width, centred: they do not overlap."""
    gaps = np.diff(np.log2(sorted(set(tested)))) if len(set(tested)) > 1 else np.array([1.0])
    step = min(0.06, 0.3 * float(gaps.min()) / max(n - 1, 1))
    return [2.0 ** ((k - (n - 1) / 2) * step) for k in range(n)]


@dataclass(frozen=True)
class Figure:
    """One written figure: `stem`.png and `stem`.pdf under the figures folder."""

    stem: str
    caption: str


def write_figures(a: Analysis, folder: str, *, max_points: int = 4000, seed: int = 0) -> list[Figure]:
    """Write every figure the analysis supports into `folder`; returns what was written."""
    os.makedirs(folder, exist_ok=True)
    figs: list[Figure] = []
    for make in (_shift_by_layer, _shift_vs_width, _d_cos2_vs_epoch, _shift_vs_dim, _accuracy_vs_width, _reestimation,
                 _decomposition, _literature):
        for stem, caption, fig in make(a, max_points=max_points, seed=seed):
            fig.tight_layout()  # once; constrained layout would redo it for every file written
            # PNG at PNG_DPI (report.md); PDF vector (report.tex). Atomically: no half-written figure on a kill.
            for ext, kw in (("png", {"dpi": PNG_DPI}), ("pdf", {})):
                final = os.path.join(folder, f"{stem}.{ext}")
                tmp = os.path.join(folder, f".{stem}.{ext}.{os.getpid()}-{os.urandom(4).hex()}.tmp")  # own name
                fig.savefig(tmp, format=ext, **kw)
                os.replace(tmp, final)
            plt.close(fig)
            figs.append(Figure(stem, caption))
    return figs


def _grid(rows: int, cols: int, w: float = 3.6, h: float = 3.0, **share: object):
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False, **share)
    return fig, axes


def _ctx_label(key: dict, varying: list[str]) -> str:
    """'k=v, ...' of the context fields that vary, a field at its None default (no schedule) left out."""
    return ", ".join(f"{k}={key[k]}" for k in varying if key[k] is not None)


def _shift_by_layer(a: Analysis, **_: object):
    L = a.study.layers
    if L.num_rows == 0:
        return
    # A scheduled trial's sites ended training at another rate after another history (early dropout: 0):
    # averaged into its placement's line it would blur that line (load.constant_schedule).
    constant = constant_schedule(L)
    left_out = L.num_rows - pc.sum(constant).as_py()
    L = L.filter(constant)
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
    widths = sorted({r["width"] for r in rows})
    cmap = plt.get_cmap("viridis")
    styles = ["-", "--", ":", "-."]
    for dtype in types:
        # The placements this type was run at (a sampled study need not run every one): no empty panel.
        placements = [p for p in PLACEMENT_ORDER if any(r["dropout_placement"] == p and (
            p == "none" or r["dropout_type"] == dtype) for r in rows)]
        fig_fed = fig_rates = False
        all_rates = {r["dropout_rate"] for r in rows if r["dropout_type"] == dtype and r["dropout_placement"] != "none"}
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
            fig_rates |= len(rates) > 1
            any_fed = False
            for (ctx, rate, width), pts in series.items():
                x, y, fed = zip(*sorted(pts))
                color = cmap(widths.index(width) / max(len(widths) - 1, 1))
                label = f"width {fmt_width(width)}" + (f", rate {rate:g}" if len(all_rates) > 1 and pl != "none"
                                                       else "") + (
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
            fig_fed |= any_fed
            if len(series) <= 12:
                ax.legend(handles=handles, **LEGEND)
        for row in axes:
            row[0].set_ylabel("variance shift\n(mean over seeds)")
        lines = [w for w, on in (("colour: width", len(widths) > 1), ("style: rate", fig_rates),
                                 ("the rate in the legend", len(all_rates) > 1 and not fig_rates)) if on]
        yield (f"shift_by_layer_{dtype}", f"Variance shift at each BN layer, {dtype} dropout, one panel per "
               "placement on one y-scale; lines: mean over seeds" + (f" ({', '.join(lines)})" if lines else "")
               + ("; red rings: BN layers fed by dropout" if fig_fed else "")
               + "; dashed: no shift (1)" + ("; trials with an early or late drop-rate schedule left out (their "
                                               "sites ended at another rate)" if left_out else ""), fig)


def _d_cos2_vs_epoch(a: Analysis, **_: object):
    """D (every BN layer with a feeding weight layer) against epochs, one line per placement and width."""
    from .dcos2 import epoch_series

    series = epoch_series(a.study, "d_cos2_all")
    if not series or max(len(v[0]) for v in series.values()) < 2:
        return
    widths = sorted({k[1] for k in series})
    placements = [p for p in PLACEMENT_ORDER if any(k[0] == p for k in series)]
    ncol = min(len(placements), 2)
    fig, axes = _grid(-(-len(placements) // ncol), ncol, w=3.4, h=2.6, sharey=True)
    for ax in axes.flat[len(placements):]:
        ax.set_visible(False)
    cmap = plt.get_cmap("viridis")
    for ax, pl in zip(axes.flat, placements):
        for (p, w, ep), runs in sorted(series.items()):
            if p != pl:
                continue
            arr = np.array([r for r in runs if len(r) == len(runs[0])], float)
            m = np.nanmean(arr, axis=0)
            x = np.arange(m.size)
            color = cmap(0.85 * widths.index(w) / max(len(widths) - 1, 1))
            ax.plot(x, m, "-o", ms=3, lw=1, color=color, label=f"width {fmt_width(w)} (n = {arr.shape[0]})")
            if arr.shape[0] >= 2:
                ax.fill_between(x, np.nanmin(arr, axis=0), np.nanmax(arr, axis=0), color=color, alpha=0.15, lw=0)
        ax.set_title(PLACEMENT_LABELS.get(pl, pl), fontsize=9)
        ax.set_xlabel("epoch (0: initialisation)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(**LEGEND)
    for row in axes:
        row[0].set_ylabel("D = d cos²θ\n(mean over BN layers)")
    yield ("d_cos2_vs_epoch", "D = d cos^2(theta) of the weights feeding BN (every BN layer with one) against "
           "epochs, per placement; lines: mean over seeds, bands: min to max over seeds (n per legend)", fig)


def _shift_vs_width(a: Analysis, **_: object):
    """Excess shift against width at each BN position (mean over seeds): the width effect where it is identified."""
    effs = [e for e in a.width_effects if e.quantity == "shift"]
    if not effs:
        return
    L = a.study.layers
    L = L.filter(pc.and_(pc.fill_null(L.column("fed_by_dropout"), False), pc.greater(L.column("shift"), 1.0)))
    ncol = min(len(effs), 2)
    fig, axes = _grid(-(-len(effs) // ncol), ncol, w=3.6, h=2.9)
    for ax in axes.flat[len(effs):]:
        ax.set_visible(False)
    cmap = plt.get_cmap("viridis")
    for ax, e in zip(axes.flat, effs):
        where = dict(e.context, dropout_type=e.dropout_type, dropout_placement=e.dropout_placement,
                     dropout_rate=e.dropout_rate)
        sub = L.filter(_match(L, {k: v for k, v in where.items() if k in L.column_names}))
        agg = sub.group_by(["index", "width"]).aggregate([("shift", "mean")]).to_pylist()
        positions = sorted({r["index"] for r in agg})
        for i, p in enumerate(positions):
            pts = sorted((r["width"], r["shift_mean"] - 1.0) for r in agg if r["index"] == p)
            if len(pts) < 2:
                continue
            x, y = zip(*pts)
            color = cmap(0.85 * i / max(len(positions) - 1, 1))
            ax.plot(x, y, "-o", ms=3, lw=1, color=color)
            ax.annotate(f"BN #{p}", (x[-1], y[-1]), xytext=(4, 0), textcoords="offset points", fontsize=7,
                        color=color, va="center")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_ticks_at(ax, "x", e.widths)
        _log_ticks_at(ax, "y")
        w = e.within
        est = (f"within position: d^{w.mean:+.2f} [{w.low:+.2f}, {w.high:+.2f}], n = {w.n} seeds" if w.has_ci
               else f"within position: d^{w.mean:+.2f}, {w.method}")
        ax.set_title(f"{e.dropout_type} {e.dropout_rate:g}, {e.dropout_placement}\n{est}", fontsize=8)
        ax.set_xlabel("width (widen factor)")
        ax.set_ylabel("excess shift (shift - 1)")
        ax.set_xlim(right=ax.get_xlim()[1] * 1.35)  # room for the position labels at the line ends
    yield ("shift_vs_width", "Excess variance shift (shift - 1) against width at each BN position a dropout feeds "
           "(one line per position, mean over seeds), log axes: the width effect where it is identified. Titles: the "
           "within-position slope with its 95% t interval over seeds", fig)


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
            inputs = "measured rho, d cos²θ" if f.closed_form_inputs == "measured" else "rho = 0"
            ax.plot(xs, np.exp(f.theory_intercept) * xs**f.theory_slope, "--", color=color, lw=1,
                    label=f"paper's closed form ({inputs}): slope {f.theory_slope:.2f}")
    extra = 0.0  # inches the legends below the panels take
    for i, t in enumerate(types):
        row, legend_lines = [], 0
        for j, pl in enumerate(placements):
            ax = axes[i][j]
            if not ax.has_data():  # no fit of this type at this placement (e.g. a sampled study): no empty panel
                fig.delaxes(ax)
                continue
            row.append(ax)
            ax.set_xscale("log")
            ax.set_yscale("log")
            # Labelled ticks at the tested d (a short log range has no labelled decade) and 1-2-5 values of the
            # shift, neighbours that would collide left unlabelled.
            _log_ticks_at(ax, "x", d)
            _log_ticks_at(ax, "y")
            ax.set_title(f"{t} dropout, placement {pl}", fontsize=9)
            ax.set_xlabel("feature dimension d (fan-in)")
            # Below the panel, wrapped to its width: the fits' labels are long, and inside they would cover points.
            handles, labels = ax.get_legend_handles_labels()
            labels = [textwrap.fill(lb, 42, subsequent_indent="  ") for lb in labels]
            ax.legend(handles, labels, **dict(LEGEND, loc="upper center", bbox_to_anchor=(0.5, -0.2)))
            legend_lines = max(legend_lines, sum(lb.count("\n") + 1 for lb in labels))
        if row:
            row[0].set_ylabel("excess variance shift (shift - 1)")
        extra += 0.3 + 0.16 * legend_lines
    fig.set_figheight(fig.get_figheight() + extra)  # room for the legends below the panels
    yield ("shift_vs_dim", "Excess variance shift (shift - 1) against the feature dimension d, log axes, BN layers "
           "fed by dropout of every position and width pooled (stage and width mixed: the width effect alone is "
           f"in the within-position figure); solid: least-squares fit ({a.level:.0%} bootstrap CI of the slope); "
           "dashed: the paper's closed form over the same layers (its inputs in the legend)", fig)


def _acc_layout(combos: list[tuple]) -> tuple[list[list[tuple]], int, str]:
    """accuracy_vs_width's panels: lists of (type, rate) combinations, the columns, and what a panel is.

    Facets only over what varies and never an empty panel: a full grid of types x rates, one panel each;
    up to four combinations of a sparse study (sampled rates), one panel per combination; more, one panel for all.
    """
    types, rates = sorted({c[0] for c in combos}), sorted({c[1] for c in combos})
    if not combos:
        return [[]], 1, ""
    if len(combos) == len(types) * len(rates) and len(combos) <= 8:  # rows: types, columns: rates
        varies = [w for w, n in (("dropout type", len(types)), ("rate", len(rates))) if n > 1]
        ncol = min(len(rates), 3) if len(rates) > 1 else min(len(types), 2)  # a page's width at a legible size
        return [[c] for c in combos], ncol, "one panel per " + " and ".join(varies) if varies else ""
    if len(combos) <= 4:
        return [[c] for c in combos], min(len(combos), 2), "one panel per (dropout type, rate) in the study"
    return [combos], 1, (f"its {len(combos)} (dropout type, rate) combinations in one panel, too sparse for a "
                         "panel each (colour: placement, marker: dropout type)")


def _accuracy_vs_width(a: Analysis, **_: object):
    t = a.study.trials.filter(pc.is_finite(a.study.trials.column("test_acc")))
    if t.num_rows == 0:
        return
    ctx_codes, ctx_keys = group_codes(t, a.context) if a.context else (np.zeros(t.num_rows, np.int64), [()])
    for ci, ckey in enumerate(ctx_keys):
        sub = t.filter(pa.array(ctx_codes == ci))
        codes, keys = group_codes(sub, ["dropout_type", "dropout_placement", "dropout_rate", "width"])
        acc = sub.column("test_acc").to_numpy()
        summary = {k: mean_ci(acc[codes == g], a.level) for g, k in enumerate(keys)}
        tested = sorted({k[3] for k in summary})
        combos = sorted({(k[0], k[2]) for k in summary if k[1] != "none"})
        types = sorted({c[0] for c in combos})
        panels, ncol, how = _acc_layout(combos)
        merged = len(panels[0]) > 1
        fig, axes = _grid(-(-len(panels) // ncol), ncol, w=6.0 if merged else 3.6)
        for ax in axes.flat[len(panels):]:
            fig.delaxes(ax)  # a grid cell with nothing to show is not drawn
        bars = missing = 0
        for ax, panel in zip(axes.flat, panels):
            series = [("none", None, None)] if any(k[1] == "none" for k in summary) else []
            series += [(pl, ty, r) for ty, r in panel for pl in PLACEMENT_ORDER[1:]
                       if any(k[1] == pl and (k[0], k[2]) == (ty, r) for k in summary)]
            shifts = _dodge(len(series), tested)
            for (pl, ty, r), shift in zip(series, shifts):
                pts = sorted((k[3], v) for k, v in summary.items()
                             if k[1] == pl and (pl == "none" or (k[0], k[2]) == (ty, r)))
                w = np.array([p[0] for p in pts]) * shift  # dodged: series at one width do not overlap
                m, lo, hi = (np.array([100 * p[1][i] for p in pts]) for i in range(3))
                ok = np.isfinite(lo) & np.isfinite(hi)
                bars, missing = bars + int(ok.sum()), missing + int((~ok).sum())
                lo, hi = np.clip(lo, *ACC_RANGE), np.clip(hi, *ACC_RANGE)  # an interval past 100% is not shown
                err = np.where(ok, np.maximum(np.vstack([m - lo, hi - m]), 0.0), 0.0)
                label = pl if not merged or pl == "none" else f"{pl}, {ty} {r:g}"
                marker = MARKERS[types.index(ty) % len(MARKERS)] if merged and ty in types else "o"
                ax.errorbar(w, m, yerr=err, color=COLORS[pl], marker=marker, ms=3, capsize=2, lw=1, label=label)
            ax.set_xscale("log", base=2)
            pad = max(0.3, 0.1 * (math.log2(tested[-1]) - math.log2(tested[0])))
            ax.set_xlim(tested[0] * 2**-pad, tested[-1] * 2**pad)
            ax.set_xticks(tested, [fmt_width(w) for w in tested])
            ax.xaxis.set_minor_formatter(NullFormatter())
            _clip_axis(ax, "y", *ACC_RANGE)
            ax.set_title("no dropout only" if not panel else "every dropout configuration" if merged else
                         f"{panel[0][0]} dropout, rate {panel[0][1]:g}", fontsize=9)
            ax.set_xlabel("width multiplier")
            handles, _ = ax.get_legend_handles_labels()
            if merged and len(handles) > 10:  # one entry per placement and per type instead of per series
                handles = [Line2D([], [], color=COLORS[p], marker="o", ms=3, lw=1, label=p) for p in PLACEMENT_ORDER
                           if any(s[0] == p for s in series)]
                handles += [Line2D([], [], color="grey", marker=MARKERS[i % len(MARKERS)], ms=3, ls="none",
                                   label=ty) for i, ty in enumerate(types)]
            if handles:  # one panel of many series: the legend beside it, off the points
                ax.legend(handles=handles, **(dict(LEGEND, loc="upper left", bbox_to_anchor=(1.02, 1.0))
                                              if merged else LEGEND))
        for r in range(0, len(panels), ncol):
            axes.flat[r].set_ylabel("test accuracy (%)")
        label = _ctx_label(dict(zip(a.context, ckey)), a.context)
        stem = "accuracy_vs_width" + (f"_{ci + 1}" if len(ctx_keys) > 1 else "")
        interval = (f"bars: {a.level:.0%} t intervals over seeds, cut at 0 and 100%"
                    + (" (none where too few seeds or no spread)" if missing else "") if bars else
                    "no interval bars (too few seeds per point, or no spread)")
        yield (stem, f"Test accuracy against width per placement{' (' + label + ')' if label else ''}"
               + (f"; {how}" if how else "") + ("; black: no dropout, the same in every panel" if len(panels) > 1
                                                and series and series[0][0] == "none" else "")
               + f"; points at one width are set slightly apart so none hides another; {interval}", fig)


def _reestimation(a: Analysis, **_: object):
    if not a.reest:
        return
    fig, axes = _grid(1, 2 if a.correlation is not None else 1, w=4.0, h=3.6)
    ax = axes[0][0]
    for pl in PLACEMENT_ORDER:
        rows = [r for r in a.reest if dict(r.label).get("dropout_placement") == pl]
        if rows:
            ax.scatter([100 * r.before for r in rows], [100 * r.after for r in rows], s=14, color=COLORS[pl], label=pl)
    lims = [max(min(ax.get_xlim()[0], ax.get_ylim()[0]), ACC_RANGE[0]),
            min(max(ax.get_xlim()[1], ax.get_ylim()[1]), ACC_RANGE[1])]  # one square scale, within 0-100%
    ax.plot(lims, lims, color="grey", lw=0.8)
    ax.set_xlim(lims)
    ax.set_ylim(lims)
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
    left = "test accuracy before vs after, per configuration (mean over seeds; grey diagonal: no change)"
    if a.correlation is None:
        caption = f"BN re-estimation: {left}"
    else:
        caption = (f"BN re-estimation. Left: {left}. Right: the accuracy gain of each dropout trial against its "
                   f"{AXIS_LABELS.get(a.correlation.x, a.correlation.x.replace('_', ' '))}; Pearson's r"
                   + (f" and its {a.level:.0%} CI" if _ci_text(a.correlation.ci_low, a.correlation.ci_high) else "")
                   + " in the panel title")
    yield ("bn_reestimation", caption, fig)


def _decomposition(a: Analysis, **_: object):
    """Per configuration (at its narrowest width): the propagation's excess split into local and inherited."""
    if not a.mechanism:
        return
    L = a.study.layers
    L = L.filter(pc.is_in(L.column("dropout_placement"), value_set=pa.array(["pre_bn", "pre_conv"])))
    L = L.filter(pc.is_finite(pc.fill_null(L.column("shift_theory"), float("nan"))))
    if L.num_rows == 0:
        return
    keys = ["backbone", "dropout_type", "dropout_placement", "dropout_rate"]
    every = sorted({tuple(r[k] for k in keys) for r in L.select(keys).to_pylist()},
                   key=lambda c: (c[0], PLACEMENT_ORDER.index(c[2]), c[1], c[3]))
    configs = every[:8]
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
    yield ("decomposition", "The propagation's excess variance at each BN layer (shift_theory - 1), split into the part "
           "the dropout feeding that layer injects (dark) and the part inherited from earlier dropouts down the "
           "residual stream or concatenation (light); dots: the frozen measurement; narrowest width of each "
           "configuration, mean over seeds" + (f"; the first {len(configs)} of {len(every)} configurations"
                                               if len(every) > len(configs) else ""), fig)


def _match(t: pa.Table, where: dict) -> pa.Array:
    """Rows whose columns equal `where`'s values; a None value matches a null (a field left at its default,
    e.g. no drop-rate schedule or normalization)."""
    mask = pa.array(np.ones(t.num_rows, dtype=bool))
    for k, v in where.items():
        m = pc.is_null(t.column(k)) if v is None else pc.fill_null(pc.equal(t.column(k), v), False)
        mask = pc.and_(mask, m)
    return mask


def _literature(a: Analysis, **_: object):
    """The literature comparisons (analysis/literature.py): each level's accuracy minus no dropout's and minus the
    reference's, paired by seed, with the t interval where the pairs carry one."""
    for comps, stem, what in ((placement_comparison(a.study.trials, a.level), "literature_placements", "placement"),
                              (schedule_comparison(a.study.trials, a.level), "literature_schedules", "schedule")):
        for i, c in enumerate(comps):
            levels = [lv for lv in c.levels if lv.label != "none"]
            fig, axes = _grid(1, 2, w=3.9, h=0.9 + 0.32 * len(levels), sharey=True)
            y = np.arange(len(levels))[::-1]
            for ax, side, ref in ((axes[0][0], "vs_none", "no dropout"), (axes[0][1], "vs_reference", c.reference)):
                for yi, lv in zip(y, levels):
                    m = getattr(lv, side)["test_acc"]
                    color = COLORS.get(lv.label, "tab:blue") if what == "placement" else "tab:blue"
                    if math.isfinite(m.low):
                        ax.errorbar(100 * m.mean, yi, xerr=[[100 * (m.mean - m.low)], [100 * (m.high - m.mean)]],
                                    fmt="o", color=color, ms=4, capsize=2, lw=1)
                    elif math.isfinite(m.mean):  # a point without an interval: hollow, so it never reads as one
                        ax.plot(100 * m.mean, yi, "o", mfc="white", color=color, ms=4)
                ax.axvline(0, color="grey", lw=0.8)
                ax.set_xlabel(f"test accuracy minus {ref} (pp)")
                ax.tick_params(labelsize=8)
            axes[0][0].set_yticks(y, [f"{lv.label} (n = {lv.n})" for lv in levels])
            setting = ", ".join(f"{k}={v}" for k, v in c.setting)
            fig.suptitle(setting, fontsize=8)
            suffix = f"_{i}" if len(comps) > 1 else ""
            yield (f"{stem}{suffix}", f"Each {what} against no dropout (left) and against {c.reference} (right): "
                   f"test accuracy difference paired by seed, mean and {a.level:.0%} t interval over the seeds "
                   f"(hollow: fewer than 3 pairs or no spread, no interval); {setting}", fig)
