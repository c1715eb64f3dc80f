"""What a researcher finds in MLflow after a sweep (issue 25), read through a real tracking server's REST API only.

A tiny sweep (the smoke space: 4 trials of 2 epochs on 64 digits, its full report with figures) runs against a
real `mlflow server` on 127.0.0.1 (tests/_mlflow_server.py, the head node's command). Then plain HTTP requests,
as the UI or any non-Python client makes them, no MLflow client:

- `runs/search` lists the trials flat by their tag, and the sweep run's description links the same list;
- `artifacts/list` and `/get-artifact` give the sweep's `report/report.html`, every figure embedded as a
  `data:image/png;base64,` URI holding the very PNG logged beside it, and the figures as MLflow images;
- `metrics/get-history` gives each per-epoch series under `epoch/`, one value per epoch (step = epoch),
  apart from the single-value summaries.
"""
from __future__ import annotations

import base64
import json
import re
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("mlflow")

from _mlflow_server import mlflow_server  # noqa: E402
from _sweeps import _env, _sweep  # noqa: E402

pytestmark = pytest.mark.slow

EPOCHS = 2
ARGS = ["--space", "smoke", "--set", "dropout_type=bernoulli", "--set", f"epochs={EPOCHS}", "--set",
        "train_samples=64", "--num-cpus", "2", "--quiet"]
N_TRIALS = 4  # none + 3 placements, bernoulli
SERIES = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s", "throughput")


def _get(url: str, route: str, **query: str) -> bytes:
    with urllib.request.urlopen(f"{url}{route}?{urllib.parse.urlencode(query)}", timeout=60) as r:
        return r.read()


def _api(url: str, endpoint: str, body: dict[str, Any] | None = None, **query: str) -> dict[str, Any]:
    """One call of MLflow's REST API: GET with `query`, or POST `body` as JSON."""
    if body is None:
        return json.loads(_get(url, f"/api/2.0/mlflow/{endpoint}", **query))
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _metrics(run: dict[str, Any]) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def _search(url: str, experiment_id: str, flt: str, order_by: list[str] | None = None) -> list[dict[str, Any]]:
    body = {"experiment_ids": [experiment_id], "filter": flt, "max_results": 1000, "order_by": order_by or []}
    return _api(url, "runs/search", body).get("runs", [])


def _files(url: str, run_id: str, path: str) -> list[str]:
    listing = _api(url, "artifacts/list", run_id=run_id, path=path)
    return sorted(f["path"] for f in listing.get("files", []))


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The server's URL, the experiment id and the sweep's parent run, after the sweep against it."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        cwd = tmp_path_factory.mktemp("sweep")
        rc, log = _sweep(cwd, ARGS + ["--tracking-uri", url], env=_env(), timeout=800)
        assert rc == 0, log[-4000:]
        assert "note: no report" not in log, log[-3000:]
        exp = _api(url, "experiments/get-by-name", experiment_name="smoke")["experiment"]
        (parent,) = _search(url, exp["experiment_id"], "tags.run_kind = 'sweep'")
        yield {"url": url, "exp": exp["experiment_id"], "parent": parent}


@pytest.mark.timeout(1200)
def test_trials_are_listed_flat_by_tag(swept: dict[str, Any]) -> None:
    url, exp, parent = swept["url"], swept["exp"], swept["parent"]
    sweep_id = parent["info"]["run_id"]
    trials = _search(url, exp, "tags.run_kind = 'trial'", ["metrics.`test_acc` DESC"])
    assert len(trials) == N_TRIALS
    assert all(_tags(r)["run_kind"] == "trial" and _tags(r)["mlflow.parentRunId"] == sweep_id for r in trials)
    accs = [_metrics(r)["test_acc"] for r in trials]
    assert accs == sorted(accs, reverse=True)
    # The sweep run's description links its trials in the UI's runs table, flat (sorted by a metric, not by
    # Created): the link's filter and order, run as the UI runs them, give the same trials in the same order.
    note = _tags(parent)["mlflow.note.content"]
    link = re.search(r"\]\((#/experiments/[^)]+)\)", note).group(1)
    path, query = link[1:].split("?", 1)
    assert path == f"/experiments/{exp}/runs"
    q = {k: v[0] for k, v in urllib.parse.parse_qs(query).items()}
    order = f"{q['orderByKey']} {'ASC' if q['orderByAsc'] == 'true' else 'DESC'}"
    assert q["orderByKey"] != "attributes.start_time"  # the one sort under which the UI folds children
    linked = _search(url, exp, q["searchFilter"], [order])
    assert [r["info"]["run_id"] for r in linked] == [r["info"]["run_id"] for r in trials]


@pytest.mark.timeout(1200)
def test_the_report_is_one_html_page_with_its_figures_embedded(swept: dict[str, Any]) -> None:
    url, sweep_id = swept["url"], swept["parent"]["info"]["run_id"]
    assert "report/report.html" in _files(url, sweep_id, "report")
    page = _get(url, "/get-artifact", path="report/report.html", run_uuid=sweep_id).decode()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) >= 3 and 'src="figures/' not in page, len(embedded)
    pngs = {base64.b64decode(b) for b in embedded}
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    # each embedded figure is one of the report's PNGs logged beside it, byte for byte
    figures = [f for f in _files(url, sweep_id, "report/figures") if f.endswith(".png")]
    logged = {_get(url, "/get-artifact", path=f, run_uuid=sweep_id) for f in figures}
    assert pngs <= logged, (len(pngs), len(logged))
    # and the figures as MLflow images: one PNG and its compressed preview per figure, keyed by its name
    images = _files(url, sweep_id, "images")
    keys = {Path(f).name.split("+step+")[0] for f in images if f.endswith(".png") and "+compressed" not in f}
    assert keys == {Path(f).stem for f in figures}, (keys, figures)
    assert len(images) == 2 * len(figures)
    run = _api(url, "runs/get", run_id=sweep_id)["run"]
    assert _tags(run)["mlflow.loggedImages"] == "True"


@pytest.mark.timeout(1200)
def test_per_epoch_series_are_under_epoch_apart_from_the_summaries(swept: dict[str, Any]) -> None:
    url, exp = swept["url"], swept["exp"]
    for run in _search(url, exp, "tags.run_kind = 'trial'"):
        run_id, metrics = run["info"]["run_id"], _metrics(run)
        assert {f"epoch/{k}" for k in SERIES} <= metrics.keys(), sorted(metrics)
        for key in metrics:
            history = _api(url, "metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
            steps = sorted(int(m.get("step", 0)) for m in history)
            if key.startswith("epoch/"):
                assert steps == list(range(1, EPOCHS + 1)), (key, steps)  # one value per epoch
            else:
                assert steps == [0], (key, steps)  # a summary: one value
        last = {int(m.get("step", 0)): m["value"] for m in
                _api(url, "metrics/get-history", run_id=run_id, metric_key="epoch/test_acc")["metrics"]}[EPOCHS]
        assert metrics["test_acc"] == pytest.approx(last)  # the summary is the last epoch's evaluation
        assert not {"lr", "epoch_time_s", "throughput"} & metrics.keys()  # series only, under epoch/
