"""A live MLflow tracking server as the sweep's tracking store (issue 24), against a real `mlflow server`.

The server is the command ray_cluster.yaml starts on the head node (read from that file, with
this test's database, artifact folder, loopback address, a free port and one worker;
tests/_mlflow_server.py): it serves the artifacts itself, so every run's artifact URI is
`mlflow-artifacts:/...`, resolved against the tracking URI. The same smoke sweep runs against it and against `sqlite:///mlflow.db` in
another folder; both are read back with the stock `mlflow.MlflowClient` and must hold the same
runs (params, tags), the same artifacts per run (and the same layers.parquet), and the same
Parquet rows. Then `--resume` against the server trains nothing, and `analysis.report
--tracking-uri` works, also after the results folder is deleted, when it rebuilds the Parquet
datasets from the server (the rows come back the same).

Every sweep here runs with DBN_CODE_VERSION pinned to this checkout's version when the module
starts: the same code for all of them, whatever changes in the working tree meanwhile.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("mlflow")

from _mlflow_server import mlflow_server  # noqa: E402
from _sweeps import _dataset, _env, _sweep  # noqa: E402

from search.code_version import ENV_VAR, compute_code_version  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# The small smoke sweep of tests/test_cluster.py (10 trials), one epoch: seconds per trial on 2 cores.
ARGS = ["--space", "smoke", "--set", "train_samples=128", "--set", "epochs=1", "--num-cpus", "2", "--quiet"]
GRID = 10
# What must agree between the two stores; trial_id, node_ip, pid and times differ from any run to the next.
TAGS = ("run_kind", "space", "profile", "config_hash", "status", "algo", "code_version", "code.commit",
        "code.dirty", "code.diff_hash", "mlflow.runName", "mlflow.user", "mlflow.source.name",
        "mlflow.source.type", "mlflow.source.git.commit")
METRICS = ("test_acc", "test_loss", "test_acc_reest", "test_loss_reest", "train_loss", "train_acc", "mean_shift",
           "max_shift", "mean_shift_fed", "mean_shift_reest", "params", "epochs_completed")
PREVIEWS = ["layers.json", "layers.parquet", "shift_by_layer.png"]


# --------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 serving its artifacts (tests/_mlflow_server.py)."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


# --------------------------------------------------------------------------- the two sweeps
_VERSION = compute_code_version(str(ROOT))  # the code every sweep of this module records (DBN_CODE_VERSION)


def _sweep_env() -> dict[str, str]:
    return _env(DBN_SWEEP_REPORT="tables", **{ENV_VAR: _VERSION.to_json()})


@pytest.fixture(scope="module")
def sweeps(server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same smoke sweep against the server and against sqlite:///mlflow.db, each in its own folder."""
    out: dict[str, Any] = {"url": server}
    for name, extra in (("server", ["--tracking-uri", server]), ("sqlite", [])):
        cwd = tmp_path_factory.mktemp(f"sweep-{name}")
        rc, log = _sweep(cwd, ARGS + extra, env=_sweep_env(), timeout=600)
        assert rc == 0, log[-4000:]
        assert f"{GRID} trial(s) to run" in log, log[-3000:]
        out[name] = cwd
        out[f"{name}_log"] = log
    # The Parquet rows as the sweep against the server wrote them, before any test changes its folder.
    out["trials"], out["layers"] = _dataset(out["server"] / "results", "trials"), _dataset(out["server"] / "results",
                                                                                              "layers")
    return out


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _uri(sweeps: dict[str, Any], name: str) -> str:
    return sweeps["url"] if name == "server" else f"sqlite:///{sweeps['sqlite'] / 'mlflow.db'}"


def _all_runs(client: Any) -> list[Any]:
    exp = client.get_experiment_by_name("smoke")
    assert exp is not None
    return client.search_runs([exp.experiment_id], max_results=1000)


def _files(client: Any, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of a run, recursively (the stock client's listing)."""
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _files(client, run_id, f.path) if f.is_dir else [f.path]
    return sorted(out)


def _store(client: Any) -> tuple[Any, dict[str, Any]]:
    """(the sweep's parent run, config_hash -> trial run)."""
    runs = _all_runs(client)
    parents = [r for r in runs if r.data.tags.get("run_kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    assert len(parents) == 1 and len(trials) == GRID and len(runs) == GRID + 1, [r.data.tags.get("run_kind")
                                                                                   for r in runs]
    by_hash = {r.data.tags["config_hash"]: r for r in trials}
    assert len(by_hash) == GRID
    return parents[0], by_hash


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-12)
    return a == b


def _rows(table: Any) -> dict[str, dict[str, Any]]:
    return {r["config_hash"]: r for r in table.to_pylist()}


# --------------------------------------------------------------------------- tests
@pytest.mark.timeout(1500)
def test_a_sweep_against_the_server_records_what_sqlite_records(sweeps: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    assert f"tracking: {sweeps['url']}   view: {sweeps['url']}" in sweeps["server_log"]
    assert "View run" not in sweeps["server_log"]  # MLflow's per-run URL lines stay off the sweep's output
    srv, sql = _client(_uri(sweeps, "server")), _client(_uri(sweeps, "sqlite"))
    (srv_parent, srv_trials), (sql_parent, sql_trials) = _store(srv), _store(sql)
    assert srv_trials.keys() == sql_trials.keys()

    # The parent runs: the sweep's params, tags and artifacts (summary.txt and the report's files).
    assert srv_parent.info.status == sql_parent.info.status == "FINISHED"
    assert srv_parent.data.params == sql_parent.data.params
    for k in ("status", "profile", "algo", "code_version", "mlflow.user"):
        assert srv_parent.data.tags[k] == sql_parent.data.tags[k], k
    assert srv_parent.data.tags["code_version"] == _VERSION.label
    parent_files = _files(srv, srv_parent.info.run_id)
    assert "summary.txt" in parent_files and "report/report.md" in parent_files, parent_files
    assert parent_files == _files(sql, sql_parent.info.run_id)
    assert srv_parent.info.artifact_uri.startswith("mlflow-artifacts:"), srv_parent.info.artifact_uri

    for h, s in srv_trials.items():
        q = sql_trials[h]
        assert s.info.status == q.info.status == "FINISHED"
        assert s.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the server, not a path here
        assert s.data.params == q.data.params, h
        for k in TAGS:
            assert s.data.tags.get(k) == q.data.tags.get(k), (h, k)
        for k in (k for k in q.data.tags if k.startswith("version.")):
            assert s.data.tags.get(k) == q.data.tags[k], (h, k)
        assert s.data.tags["mlflow.parentRunId"] == srv_parent.info.run_id
        assert q.data.tags["mlflow.parentRunId"] == sql_parent.info.run_id
        assert s.data.metrics.keys() == q.data.metrics.keys(), h
        for k in ("test_acc", "test_acc_reest", "mean_shift", "num_params"):
            assert _same(s.data.metrics[k], q.data.metrics[k]), (h, k)
        # The artifacts: the same files, and the same per-layer record behind them.
        assert _files(srv, s.info.run_id) == _files(sql, q.info.run_id) == PREVIEWS, h
        tables = []
        for client, run in ((srv, s), (sql, q)):
            d = sweeps["server"].parent / f"dl-{run.info.run_id}"
            tables.append(pq.read_table(client.download_artifacts(run.info.run_id, "layers.parquet", str(d)))
                          .drop(["run_id"]).to_pylist())
            shutil.rmtree(d)
        assert len(tables[0]) == len(tables[1]) > 0
        for a, b in zip(*tables):
            assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a), (h, a, b)

    # The Parquet datasets: the same configurations, metrics and code version, row for row.
    srv_rows = _rows(sweeps["trials"])
    sql_rows = _rows(_dataset(sweeps["sqlite"] / "results", "trials"))
    assert srv_rows.keys() == sql_rows.keys() == srv_trials.keys()
    for h, a in srv_rows.items():
        b = sql_rows[h]
        assert a["run_id"] == srv_trials[h].info.run_id and b["run_id"] == sql_trials[h].info.run_id
        for k in METRICS + ("status", "code_version", "code_commit", "code_dirty"):
            assert _same(a[k], b[k]), (h, k, a[k], b[k])
    counts = [sorted(_layer_counts(t)) for t in (sweeps["layers"], _dataset(sweeps["sqlite"] / "results", "layers"))]
    assert counts[0] == counts[1] and len(counts[0]) == GRID


def _layer_counts(layers: Any) -> list[tuple[str, int]]:
    """(config_hash, number of BN-layer rows) per trial of a layers dataset."""
    counts: dict[str, int] = {}
    for h in layers.column("config_hash").to_pylist():
        counts[h] = counts.get(h, 0) + 1
    return list(counts.items())


@pytest.mark.timeout(900)
def test_resume_against_the_server_trains_nothing_again(sweeps: dict[str, Any]) -> None:
    cwd = sweeps["server"]
    srv = _client(sweeps["url"])
    before = sorted(r.info.run_id for r in _all_runs(srv))
    rc, log = _sweep(cwd, ARGS + ["--tracking-uri", sweeps["url"], "--resume"], env=_sweep_env(), timeout=600,
                     log="resume.log")
    assert rc == 0, log[-4000:]
    assert f"{GRID} of {GRID} trials already finished in {sweeps['url']}: reused" in log, log[-3000:]
    assert "trial(s) to run" not in log and not re.search(r"\[\d+/\d+\]", log), log[-3000:]
    assert sorted(r.info.run_id for r in _all_runs(srv)) == before  # no new run, trial or parent
    rows = _dataset(cwd / "results", "trials")
    assert sorted(rows.column("run_id").to_pylist()) == sorted(sweeps["trials"].column("run_id").to_pylist())


def _report(cwd: Path, url: str, out: str) -> tuple[int, str]:
    proc = subprocess.run([PY, "-m", "analysis.report", "--space", "smoke", "--root", "results", "--tracking-uri", url,
                           "--out", out, "--no-figures", "--n-boot", "200"], cwd=cwd, env=_sweep_env(),
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.timeout(900)
def test_report_and_rebuild_from_the_server(sweeps: dict[str, Any]) -> None:
    cwd, url = sweeps["server"], sweeps["url"]
    rc, log = _report(cwd, url, "reports/first")
    assert rc == 0, log[-3000:]
    assert (cwd / "reports" / "first" / "report.md").is_file()

    # MLflow is the source of truth: without the results folder, the report rebuilds it from the server.
    shutil.rmtree(cwd / "results")
    rc, log = _report(cwd, url, "reports/rebuilt")
    assert rc == 0, log[-3000:]
    assert (cwd / "reports" / "rebuilt" / "report.md").is_file()
    before, after = _rows(sweeps["trials"]), _rows(_dataset(cwd / "results", "trials"))
    assert after.keys() == before.keys() and len(after) == GRID
    for h, a in after.items():
        b = before[h]
        for k in ("run_id", "status", "profile", *METRICS, "code_version", "code_commit", "code_dirty"):
            assert _same(a[k], b[k]), (h, k, a[k], b[k])
    assert sorted(_layer_counts(_dataset(cwd / "results", "layers"))) == sorted(_layer_counts(sweeps["layers"]))
