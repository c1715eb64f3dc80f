"""What the MLflow UI shows, read back with the stock MlflowClient (no Ray: the Tracker as the driver calls it).

One parent run per sweep, every trial its child, MLflow's own provenance tags, an experiment
description, metrics without duplicates (series by epoch, summaries once), and the per-trial
previews (PNG, log_table JSON) beside layers.parquet; --resume continues under the same parent.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from search.config import TrialConfig  # noqa: E402
from search.results import LayerShift, TrialResult  # noqa: E402
from search.sweep.tracking import Tracker, rebuild_parquet  # noqa: E402

EPOCHS = 3


def _result(seed: int) -> TrialResult:
    layers = [LayerShift(name=f"b{i}.bn", index=i, rel_depth=i / 4, channels=16, fan_in=144, fed_by_dropout=i % 2 == 1,
                         moving_var=1.0, real_var=1.0 + 0.2 * i, shift=1.0 + 0.2 * i, shift_channelwise=1.1)
              for i in range(5)]
    history = [dict(epoch=e, train_loss=1.0 / e, train_acc=0.3 * e, test_loss=1.2 / e, test_acc=0.25 * e + seed / 100,
                    lr=0.1 / e, epoch_time_s=2.0 + e, throughput=500.0 * e) for e in range(1, EPOCHS + 1)]
    images = sum(h["throughput"] * h["epoch_time_s"] for h in history)
    seconds = sum(h["epoch_time_s"] for h in history)
    return TrialResult(test_acc=history[-1]["test_acc"], test_loss=history[-1]["test_loss"], test_acc_reest=0.8,
                       test_loss_reest=0.5, train_loss=history[-1]["train_loss"], train_acc=history[-1]["train_acc"],
                       mean_shift=1.4, max_shift=1.8, mean_shift_fed=1.5, mean_shift_reest=1.02,
                       throughput=images / seconds, wall_time_s=seconds + 1, train_time_s=seconds, probe_time_s=0.45,
                       params=12345, epochs_completed=EPOCHS, history=history, layers=layers)


@pytest.fixture()
def store(tmp_path: Path):
    """A sweep of two trials under one parent, as the driver records it; returns (client, tracker, children)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "smoke", "quick", str(tmp_path / "results"))
    parent = tracker.open_sweep(algo="grid", command="python -m search.run --space smoke", params={"space": "smoke"})
    kids = []
    for seed in (0, 1):
        cfg = TrialConfig(seed=seed, epochs=EPOCHS)
        run_id = tracker.start(cfg, trial_id=f"t{seed}", algo="grid")
        tracker.finish(run_id, cfg, _result(seed))
        kids.append(run_id)
    assert tracker.flush() == []
    from PIL import Image

    report = tmp_path / "report"
    (report / "figures").mkdir(parents=True)
    (report / "report.md").write_text("# smoke\n\n![shift](figures/shift_vs_depth.png)\n")
    Image.new("RGB", (400, 300), (200, 30, 30)).save(report / "figures" / "shift_vs_depth.png")
    tracker.close_sweep("done", {"trials_ok": 2}, files=[], folder=str(report))
    return MlflowClient(tracking_uri=uri), tracker, parent, kids


def test_one_parent_per_sweep_with_every_trial_its_child(store) -> None:
    client, tracker, parent, kids = store
    exp = client.get_experiment_by_name("smoke")
    note = exp.tags["mlflow.note.content"]  # the experiment's description in the UI
    assert "parent run" in note and "child run" in note and "`smoke`" in note
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("run_kind") == "sweep"]
    assert [p.info.run_id for p in parents] == [parent]
    p = parents[0]
    assert p.info.status == "FINISHED" and p.data.tags["command"].startswith("python -m search.run")
    assert p.data.metrics["trials_ok"] == 2 and p.data.params["space"] == "smoke"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.info.run_id for r in children) == sorted(kids)
    for r in [p, *children]:
        tags = r.data.tags
        assert tags["mlflow.user"] and tags["mlflow.source.name"] == "search.run"
        assert tags["mlflow.source.type"] == "LOCAL"
        from search.code_version import code_version

        if code_version().commit:  # from a git checkout: MLflow's own commit tag ("Source" in the UI)
            assert tags["mlflow.source.git.commit"] == code_version().commit


def test_the_sweeps_description_lists_its_trials_flat(store) -> None:
    """The sweep run's description links the runs table filtered to its trials and sorted by test_acc (a sort
    other than Created: the UI lists children flat); the link's query, run through the client, is those trials."""
    from urllib.parse import parse_qs, urlsplit

    client, tracker, parent, kids = store
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    link = re.search(r"\]\((#/experiments/[^)]+)\)", note).group(1)
    path, query = link[1:].split("?", 1)
    assert urlsplit(path).path == f"/experiments/{tracker.experiment_id}/runs"
    q = {k: v[0] for k, v in parse_qs(query).items()}
    assert q["orderByKey"] == "metrics.`test_acc`" and q["orderByAsc"] == "false"
    order = q["orderByKey"] + (" ASC" if q["orderByAsc"] == "true" else " DESC")
    found = client.search_runs([tracker.experiment_id], q["searchFilter"], order_by=[order])
    assert [r.info.run_id for r in found] == kids[::-1]  # seed 1 has the higher test_acc
    exp_note = client.get_experiment(tracker.experiment_id).tags["mlflow.note.content"]
    assert "tags.run_kind = 'trial'" in exp_note and "sort by a metric" in exp_note


def test_the_reports_figures_are_logged_as_images(store, tmp_path: Path) -> None:
    """Each PNG of the sweep's report is also an MLflow image (key = its name, step 0: the run's image charts)."""
    from PIL import Image

    client, _, parent, _ = store
    run = client.get_run(parent)
    assert run.data.tags["mlflow.loggedImages"] == "True"
    names = [a.path for a in client.list_artifacts(parent, "images")]
    assert len(names) == 2 and all(n.startswith("images/shift_vs_depth+step+0+") for n in names), names
    (png,) = [n for n in names if n.endswith(".png")]
    assert [n for n in names if n.endswith("+compressed.webp")], names
    with Image.open(client.download_artifacts(parent, png, str(tmp_path))) as im:
        assert im.size == (400, 300) and im.getpixel((10, 10)) == (200, 30, 30)
    assert "report/figures/shift_vs_depth.png" in [a.path for a in client.list_artifacts(parent, "report/figures")]


def test_metrics_without_duplicates(store) -> None:
    """The per-epoch series under `epoch/` (one MLflow UI section), every other metric a summary logged once."""
    client, _, _, kids = store
    run = client.get_run(kids[0])
    m = run.data.metrics
    assert "num_params" in m and m["num_params"] == 12345
    for gone in ("params", "epoch_throughput", "train_time_s", "epochs_completed", "throughput", "lr",
                 "epoch_time_s"):
        assert gone not in m, gone
    histories = {k: tuple((h.step, h.value) for h in client.get_metric_history(kids[0], k)) for k in m}
    assert len(set(histories.values())) == len(histories), "two metrics carry the same values"
    series = {k for k in m if k.startswith("epoch/")}
    assert series == {f"epoch/{k}" for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s",
                                             "throughput")}
    history = _result(0).history
    for k in series:  # one point per epoch, step = epoch
        assert histories[k] == tuple((e, h[k[len("epoch/"):]]) for e, h in enumerate(history, 1)), k
    for k in m.keys() - series:  # summaries: once, at step 0
        assert len(histories[k]) == 1 and histories[k][0][0] == 0, k
    for k in ("test_acc", "train_loss", "test_acc_reest", "mean_shift", "max_shift", "wall_time_s"):
        assert m[k] == getattr(_result(0), k), k
    assert "None" not in run.data.params.values()  # unset speed knobs are not logged as the string "None"


def test_per_trial_previews_beside_the_parquet(store, tmp_path: Path) -> None:
    from PIL import Image

    client, tracker, _, kids = store
    run_id = kids[0]
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["layers.json", "layers.parquet",
                                                                      "shift_by_layer.png"]
    png = client.download_artifacts(run_id, "shift_by_layer.png", str(tmp_path))
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 300
    # The table view: registered as a logged table, and read back by MLflow's own loader.
    assert '"layers.json"' in client.get_run(run_id).data.tags["mlflow.loggedArtifacts"]
    import mlflow

    prev = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracker.tracking_uri)  # load_table searches through the fluent API's store
    try:
        df = client.load_table(tracker.experiment_id, "layers.json", run_ids=[run_id], extra_columns=["run_id"])
    finally:
        mlflow.set_tracking_uri(prev)
    assert list(df["index"]) == [0, 1, 2, 3, 4] and list(df["fed_by_dropout"]) == [False, True, False, True, False]
    assert df["shift"].tolist() == pytest.approx([1.0, 1.2, 1.4, 1.6, 1.8])


def test_rebuild_recovers_what_the_series_holds(store, tmp_path: Path) -> None:
    """train_time_s, throughput and epochs_completed are not metrics of their own: rebuild derives them."""
    import pyarrow.compute as pc

    client, tracker, _, kids = store
    before = tracker.store.read("trials").sort_by("run_id")
    n_trials, n_layers = rebuild_parquet("smoke", tracker.tracking_uri, str(tmp_path / "rebuilt"))
    assert (n_trials, n_layers) == (2, 10)  # the parent run is not a trial
    from search.store import ResultStore

    after = ResultStore(str(tmp_path / "rebuilt"), "smoke").read("trials").sort_by("run_id")
    for col in ("train_time_s", "throughput", "epochs_completed", "params", "test_acc", "test_acc_reest"):
        assert after.column(col).to_pylist() == pytest.approx(before.column(col).to_pylist()), col
    assert pc.all(pc.equal(after.column("epochs_completed"), EPOCHS)).as_py()


def _log_before_the_epoch_prefix(client, experiment_id: str, cfg: TrialConfig, result: TrialResult) -> str:
    """A trial run as the Tracker logged it before `epoch/` (2026-12): the series unprefixed (step = epoch), the
    summaries the series did not hold at step 0, train_time_s / throughput / epochs_completed left to the series."""
    import time

    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, tags={"run_kind": "trial", "space": "smoke", "profile": "quick",
                                                 "config_hash": cfg.config_hash, "status": result.status})
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(h["epoch"])) for h in result.history for k, v in h.items() if k != "epoch"]
    held = {x.key for x in metrics}
    metrics += [Metric({"params": "num_params"}.get(k, k), float(v), now, 0) for k, v in result.summary().items()
                if isinstance(v, (int, float)) and v == v and k not in held
                and k not in ("throughput", "train_time_s", "epochs_completed")]
    client.log_batch(run.info.run_id, metrics=metrics,
                     params=[Param(k, str(v)) for k, v in cfg.to_dict().items() if v is not None])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_rebuild_reads_runs_logged_before_the_epoch_prefix(tmp_path: Path) -> None:
    """A store holding both: a run logged with unprefixed series and one with `epoch/` series rebuild the same
    rows (summaries, the times and throughput derived from the series, the D series)."""
    from mlflow.tracking import MlflowClient

    from search.store import ResultStore

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "smoke", "quick", str(tmp_path / "results"))
    result = _result(0)
    result.d_cos2_all_init = 0.5
    for e, h in enumerate(result.history, 1):
        h["d_cos2_all"] = 0.5 + e / 10
    new_cfg, old_cfg = TrialConfig(seed=0, epochs=EPOCHS), TrialConfig(seed=1, epochs=EPOCHS)
    new_id = tracker.start(new_cfg, algo="grid")
    tracker.finish(new_id, new_cfg, result)
    tracker.flush()
    client = MlflowClient(tracking_uri=uri)
    old_id = _log_before_the_epoch_prefix(client, tracker.experiment_id, old_cfg, result)
    assert not any(k.startswith("epoch/") for k in client.get_run(old_id).data.metrics)
    assert rebuild_parquet("smoke", uri, str(tmp_path / "rebuilt"))[0] == 2
    rows = {r["run_id"]: r for r in ResultStore(str(tmp_path / "rebuilt"), "smoke").read("trials").to_pylist()}
    written = ResultStore(str(tmp_path / "results"), "smoke").read("trials").to_pylist()[0]
    for rid in (new_id, old_id):
        for col in ("test_acc", "test_loss", "train_loss", "train_acc", "test_acc_reest", "mean_shift", "wall_time_s",
                    "train_time_s", "throughput", "epochs_completed", "params", "d_cos2_all_init"):
            assert rows[rid][col] == pytest.approx(written[col]), (rid, col)
        assert rows[rid]["d_cos2_all_by_epoch"] == pytest.approx([0.5, 0.6, 0.7, 0.8]), rid


def test_resume_continues_under_the_same_parent(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(uri, "smoke", "quick", str(tmp_path / "results"))
    parent = first.open_sweep(algo="grid", command="python -m search.run --space smoke")
    # The driver is killed here: the parent stays RUNNING. --resume reopens it; its new trials are its children.
    again = Tracker(uri, "smoke", "quick", str(tmp_path / "results"))
    assert again.open_sweep(algo="grid", command="python -m search.run --space smoke --resume", resume=True) == parent
    cfg = TrialConfig(seed=5)
    run_id = again.start(cfg, algo="grid")
    again.finish(run_id, cfg, TrialResult(test_acc=0.5, epochs_completed=1))
    again.flush()
    again.close_sweep("done", {})
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(parent).info.status == "FINISHED"
    # A sweep without --resume starts a parent of its own; another algo never shares one.
    fresh = Tracker(uri, "smoke", "quick", str(tmp_path / "results"))
    assert fresh.open_sweep(algo="grid", command="x") != parent
    other = Tracker(uri, "smoke", "quick", str(tmp_path / "results"))
    assert other.open_sweep(algo="optuna", command="x", resume=True) not in (parent, fresh.parent_id)
    # close_stale closes trial runs only: the parents are open_sweep's to handle.
    assert other.close_stale() == 0


def test_progress_lines_when_not_a_tty() -> None:
    from search.sweep.progress import Progress

    out = io.StringIO()
    p = Progress("smoke (quick, grid)", 2, stream=out)
    assert p.live is False  # a StringIO is not a terminal: no redraws, no escape codes
    p.started("a", "cifar_wrn-d10-w1-pre_bn-bernoulli-0.5-s0")
    p.epoch("a", 1, 0.5)
    p.finished("a", "ok", "cifar_wrn-d10-w1-pre_bn-bernoulli-0.5-s0: ok")
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[1/2] cifar_wrn-d10-w1-pre_bn-bernoulli-0.5-s0: ok  (ETA ")
    assert "\x1b" not in out.getvalue()


def test_progress_redraws_in_place_on_a_tty() -> None:
    from search.sweep.progress import Progress

    out = io.StringIO()
    p = Progress("smoke (quick, grid)", 3, stream=out, live=True, epochs=4, min_interval=0.0)
    p.started("a", "run-a")
    p.started("b", "run-b")
    p.epoch("b", 2, 0.61)
    block = p.lines()
    assert block[0].startswith("smoke (quick, grid) [") and "0/3 done, 2 running, 1 pending" in block[0]
    assert block[1].startswith("  run-a  epoch 0/4") and block[2].startswith("  run-b  epoch 2/4  test acc 0.610")
    p.finished("a", "ok", "run-a: ok")
    p.close()
    text = out.getvalue()
    # Each redraw first moves the cursor up over the previous block and clears it (ESC[nF ESC[J).
    assert "\x1b[3F\x1b[J" in text and "[1/3] run-a: ok\n" in text
    assert text.endswith("\x1b[J") or text.endswith("\n")


def test_eta_weighs_the_trials_left_by_their_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    """A grid whose wide trials come last: the ETA after the narrow ones is at their cost's pace, not their
    count's (the fashion study showed 'ETA 5:42' with 15 minutes of width-3 trials still to run)."""
    from search.sweep import progress as prog

    narrow, wide = dict(width=1.0, depth=10, image_size=16, epochs=3), dict(width=3.0, depth=10, image_size=16,
                                                                             epochs=3)
    assert prog.trial_cost(wide) == pytest.approx(3 * prog.trial_cost(narrow))
    now = [1000.0]
    monkeypatch.setattr(prog.time, "time", lambda: now[0])
    costs = [prog.trial_cost(c) for c in (narrow, narrow, wide)]
    p = prog.Progress("t", 3, stream=io.StringIO(), live=False, total_cost=sum(costs))
    p.started("a", "a", cost=costs[0])
    now[0] += 10.0
    p.finished("a", "ok", "a: ok")
    assert p.eta() == pytest.approx(10.0 * (1 + 3))  # one narrow and one wide (3 narrow) left, at 10 s each
    q = prog.Progress("t", 3, stream=io.StringIO(), live=False)  # no costs: every trial counts the same
    q.t0 = p.t0
    q.started("a", "a")
    q.finished("a", "ok", "a: ok")
    assert q.eta() == pytest.approx(10.0 * 2)


def _red_pixels(path) -> int:
    """Pixels of the preview in matplotlib's tab:red (the bars of layers fed by dropout)."""
    import numpy as np
    from PIL import Image

    px = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(px - np.array([214, 39, 40])).sum(axis=2) < 30).sum())


def test_a_groupnorm_trials_preview_draws_its_frozen_measurement(tmp_path) -> None:
    """GroupNorm layers have no running statistics (shift NaN): the preview draws their train/eval input-variance
    ratio instead of empty bars; without either there is nothing red to draw."""
    import dataclasses

    from search.results import LayerShift
    from search.sweep.artifacts import write_layers_png

    req = {f.name: 0 for f in dataclasses.fields(LayerShift) if f.default is dataclasses.MISSING
           and f.default_factory is dataclasses.MISSING}
    rows = [LayerShift(**dict(req, name=f"gn{i}", index=i, fed_by_dropout=True, shift=float("nan"),
                              shift_frozen=1.3, norm_type="groupnorm")) for i in range(4)]
    write_layers_png(str(tmp_path / "gn.png"), rows, "groupnorm trial")
    blank = [dataclasses.replace(r, shift_frozen=float("nan")) for r in rows]
    write_layers_png(str(tmp_path / "blank.png"), blank, "nothing measured")
    # Only the legend's red patch (~560 px) where nothing is drawn; the bars cover ~200,000 px.
    assert _red_pixels(tmp_path / "gn.png") > 50_000 and _red_pixels(tmp_path / "blank.png") < 2_000
