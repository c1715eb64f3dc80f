"""What a trial's MLflow run shows without code: its per-BN-layer shift as a small PNG and a table.

MLflow's UI previews images and tables logged with `log_table`, not Parquet; the
Parquet artifact stays beside them as the exact record `rebuild_parquet` reads.
matplotlib is imported here only (the object API with the Agg canvas: no pyplot
state, no display), once per driver.
"""
from __future__ import annotations

import math
from typing import Any

from search.results import LayerShift, column_names, layer_metrics

__all__ = ["LAYERS_PNG", "LAYERS_TABLE", "layers_table", "write_layers_png"]

LAYERS_PNG = "shift_by_layer.png"
LAYERS_TABLE = "layers.json"  # the extension log_table needs for the UI's table view
# The LayerShift fields declared with table=True (search.results.column_meta), in declaration order.
_TABLE_COLUMNS = column_names(LayerShift, table=True)


def layers_table(layers: list[LayerShift]) -> dict[str, list[Any]]:
    """Column -> values of the BN layers in execution order (the data `MlflowClient.log_table` takes).

    The columns are the table=True fields of the records' class (a LayerShift subclass's own show too), then the
    registered per-layer metrics declared with table=True (search.results.register_layer_metric).
    """
    rows = sorted(layers, key=lambda x: x.index)
    columns = column_names(type(rows[0]), table=True) if rows else _TABLE_COLUMNS
    out = {c: [_plain(getattr(x, c)) for x in rows] for c in columns}
    for e in layer_metrics():
        if e.meta["table"]:
            out[e.name] = [_plain(x.metrics.get(e.name, float("nan"))) for x in rows]
    return out


def _plain(v: Any) -> Any:
    # JSON has no NaN: the UI's table shows None as an empty cell.
    return None if isinstance(v, float) and v != v else v


def write_layers_png(path: str, layers: list[LayerShift], title: str) -> None:
    """Bar chart of the variance shift by BN layer index; layers fed by dropout in red, the rest grey.

    The dashed line at 1 is no shift; the y-axis starts at 0 so bars compare by length.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = sorted(layers, key=lambda x: x.index)
    fig = Figure(figsize=(4.8, 2.8), dpi=200)  # 960 x 560 px: sharp in the MLflow UI's preview
    FigureCanvasAgg(fig)
    # Fixed margins instead of tight_layout: that would draw the figure once more (half the cost).
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.16, top=0.84)
    ax = fig.add_subplot()
    fed = [bool(x.fed_by_dropout) for x in rows]
    values, ylabel, what = [x.shift for x in rows], "variance shift", "BN layer"
    if not any(math.isfinite(v) for v in values):
        # GroupNorm layers have no running statistics, so no shift: their train/eval input-variance ratio
        # (the frozen measurement) is what there is to show (docs/normalization.md).
        values = [x.shift_frozen for x in rows]
        ylabel, what = "train / eval input variance\n(no running statistics)", "norm layer"
    ax.bar([x.index for x in rows], [v if math.isfinite(v) else 0.0 for v in values], width=0.75,
           color=["tab:red" if f else "0.65" for f in fed], edgecolor="none")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xlabel(f"{what} (execution order)")
    ax.set_ylabel(ylabel, fontsize=7 if "\n" in ylabel else None)
    fig.text(0.01, 0.97, title, fontsize=8, va="top")  # not set_title: its auto-placement measures every tick
    ax.set_ylim(bottom=0)
    if len(rows) <= 24:  # an integer tick per layer while they stay readable
        ax.set_xticks([x.index for x in rows])
    ax.tick_params(labelsize=7)
    handles = [Patch(color="tab:red", label="fed by dropout"), Patch(color="0.65", label="not fed")]
    ax.legend(handles=handles if any(fed) else handles[1:], fontsize=7, frameon=False, ncol=2,
              loc="lower right", bbox_to_anchor=(1.0, 1.0), borderaxespad=0.1)
    fig.savefig(path, pil_kwargs={"compress_level": 1})  # a fast, still small file (~20 KB)
