"""A per-layer metric declared once (`register_layer_metric`) reaches every place a per-layer column shows.

The metric is registered at test time, computed by the shift probe of a real trial (`run_trial`),
carried through the result's JSON (what a Tune worker reports), logged by the tracker, and then
found in: the `layers` Parquet dataset the store writes (with its description and unit as field
metadata), MLflow's `layers.parquet` record and its `layers.json` table view, and the report's
"Per-layer metrics" table (analysis.report.write_report).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from search import LayerProbe, register_layer_metric, registry
from search.config import TrialConfig
from search.results import LayerShift, TrialResult

DESCRIPTION = "standard deviation over channels of the per-channel max(real / moving, moving / real)"


def _spread(p: LayerProbe) -> float:
    if p.real_var is None or p.moving_var is None:
        return float("nan")
    ok = (p.real_var > 0) & (p.moving_var > 0)
    ratio = np.maximum(p.real_var[ok] / p.moving_var[ok], p.moving_var[ok] / p.real_var[ok])
    return float(ratio.std()) if ratio.size else float("nan")


@pytest.fixture
def spread():
    register_layer_metric("shift_spread", description=DESCRIPTION, unit="ratio", group="shift")(_spread)
    yield "shift_spread"
    registry.unregister("layer_metric", "shift_spread")


def test_a_metric_is_checked_when_declared() -> None:
    with pytest.raises(registry.RegistryError, match="layer_metric 'shift' is already a column of the layers"):
        register_layer_metric("shift", description="again")(_spread)
    with pytest.raises(registry.RegistryError, match="layer_metric 'x2': description is empty"):
        register_layer_metric("x2", description=" ")(_spread)
    assert "x2" not in registry.names("layer_metric")


def test_a_per_layer_metric_declared_once_reaches_parquet_mlflow_and_the_report(spread, tmp_path: Path) -> None:
    import mlflow

    from analysis.report import write_report
    from search.schema import LAYERS_SCHEMA, layers_schema, markdown
    from search.sweep.artifacts import layers_table
    from search.sweep.tracking import Tracker
    from search.trial.runner import run_trial

    # The probe computes it at every BN layer of a real trial, and it survives the worker's JSON report.
    results = []
    for placement, rate in (("none", 0.0), ("pre_bn", 0.5)):
        cfg = TrialConfig(backbone="cifar_wrn", depth=10, width=1, dataset="digits", image_size=8, in_chans=1,
                          epochs=1, batch_size=64, device="cpu", dropout_placement=placement, dropout_rate=rate)
        r = TrialResult.from_dict(json.loads(json.dumps(run_trial(cfg).to_dict())))
        assert r.status == "ok" and len(r.layers) == 7
        assert all(np.isfinite(x.metrics[spread]) and x.metrics[spread] >= 0 for x in r.layers)
        results.append((cfg, r))
    assert LAYERS_SCHEMA.names == layers_schema(metrics=False).names  # the built-in schema is unchanged
    assert spread in layers_schema().names and f"| `{spread}` | `double` | ratio | shift | {DESCRIPTION} |" in markdown()

    # The sweep's one writer: MLflow run + Parquet rows, as the driver's callback logs a finished trial.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "lm", "quick", str(tmp_path / "results"))
    run_ids = []
    for cfg, r in results:
        run_ids.append(tracker.start(cfg))
        tracker.finish(run_ids[-1], cfg, r)
    assert tracker.flush() == []

    # 1. Parquet: the store's part files carry the column, its values and its description.
    (part, *_) = sorted((tmp_path / "results" / "lm" / "layers").glob("*.parquet"))
    field = pq.read_schema(part).field(spread)
    assert field.metadata[b"description"].decode() == DESCRIPTION and field.metadata[b"unit"] == b"ratio"
    stored = pq.read_table(tmp_path / "results" / "lm" / "layers").sort_by([("run_id", "ascending"),
                                                                           ("index", "ascending")])
    want = {(rid, x.index): x.metrics[spread] for rid, (_, r) in zip(run_ids, results) for x in r.layers}
    got = {(a, b): c for a, b, c in zip(*(stored.column(k).to_pylist() for k in ("run_id", "index", spread)))}
    assert got == pytest.approx(want)

    # 2. MLflow: the run's layers.parquet record and the layers.json table view the UI shows.
    client = mlflow.MlflowClient(uri)
    d = client.download_artifacts(run_ids[1], "", str(tmp_path / "artifacts"))
    assert pq.read_schema(Path(d) / "layers.parquet").field(spread).metadata[b"description"].decode() == DESCRIPTION
    view = json.loads((Path(d) / "layers.json").read_text())
    column = view["columns"].index(spread)
    assert [row[column] for row in view["data"]] == pytest.approx([x.metrics[spread] for x in results[1][1].layers])
    assert layers_table(results[1][1].layers)[spread] == pytest.approx(
        [x.metrics[spread] for x in results[1][1].layers])

    # 3. The report: its per-layer metrics table, with the unit in the header and the description in the note.
    out = write_report("lm", str(tmp_path / "results"), str(tmp_path / "report"), figures=False)
    text = (Path(out) / "report.md").read_text()
    assert "## Per-layer metrics" in text and f"| {spread} (ratio) |" in text and DESCRIPTION in text
    section = text.split("## Per-layer metrics")[1].split("\n## ")[0]
    med = float(np.median([x.metrics[spread] for x in results[1][1].layers]))
    assert f"| cifar_wrn | bernoulli | pre_bn | 0.5 | 1 | 7 | {med:.4g} |" in section


def test_without_registered_metrics_nothing_changes() -> None:
    from search.schema import LAYERS_SCHEMA, layers_schema

    assert registry.names("layer_metric") == ()
    assert layers_schema() == LAYERS_SCHEMA
    layer = LayerShift("bn", 0, 0.0, 4, None, False, 1.0, 1.0, 1.0, 1.0)
    assert LayerShift.from_dict(layer.to_dict()) == layer and layer.to_dict().keys() == {
        f for f in LayerShift.__dataclass_fields__}
