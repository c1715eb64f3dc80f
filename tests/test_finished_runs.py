"""The finished-runs index (search/sweep/finished.py): its sqlite query gives exactly what MLflow's API gives."""
from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from search.config import TrialConfig  # noqa: E402
from search.results import TrialResult  # noqa: E402
from search.sweep.finished import finished_runs  # noqa: E402
from search.sweep.tracking import Tracker  # noqa: E402


def _store(tmp_path: Path) -> tuple[str, Tracker, dict[str, str]]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri, "smoke", "quick", str(tmp_path / "results"))
    other = Tracker(uri, "other_space", "quick", str(tmp_path / "results"))  # another experiment: not listed
    ids = {}
    for seed, status, acc in ((0, "ok", 0.75), (1, "diverged", math.nan), (2, "failed", 0.1), (3, "ok", 0.5)):
        cfg = TrialConfig(seed=seed)
        ids[status if seed != 3 else "deleted"] = run = t.start(cfg, algo="grid")
        t.finish(run, cfg, TrialResult(status=status, test_acc=acc, epochs_completed=1))
    t.client.delete_run(ids["deleted"])  # deleted in the UI: not a result any more
    ids["running"] = t.start(TrialConfig(seed=4), algo="optuna")  # never finished
    cfg = TrialConfig(seed=5)
    run = other.start(cfg, algo="grid")
    other.finish(run, cfg, TrialResult(status="ok", test_acc=0.9, epochs_completed=1))
    return uri, t, ids


def _view(records: list) -> dict[str, tuple]:
    return {r.run_id: (r.tags, "nan" if math.isnan(r.test_acc) else r.test_acc) for r in records}


def test_sqlite_query_equals_search_runs(tmp_path: Path) -> None:
    uri, t, ids = _store(tmp_path)
    fast = finished_runs(t.client, uri, t.experiment_id)
    api = finished_runs(t.client, uri, t.experiment_id, via_api=True)
    assert _view(fast) == _view(api)
    # What a reuse decision needs, per run: FINISHED and active only, with its tags and test accuracy.
    got = _view(fast)
    assert set(got) == {ids["ok"], ids["diverged"]}  # failed ends FAILED; deleted, running, other space: not listed
    assert got[ids["ok"]][1] == 0.75 and got[ids["diverged"]][1] == "nan"
    tags = got[ids["ok"]][0]
    assert tags["status"] == "ok" and tags["algo"] == "grid" and tags["profile"] == "quick"
    assert tags["config_hash"] == TrialConfig(seed=0).config_hash and tags["code_version"]


def test_unknown_schema_falls_back_to_the_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store whose tables the query does not fit (another MLflow's schema) is read through search_runs."""
    import search.sweep.finished as finished

    uri, t, ids = _store(tmp_path)
    real = finished._from_sqlite

    def misfit(path: str, experiment_id: str) -> list:
        sqlite3.connect(f"file:{path}?mode=ro", uri=True).execute("select no_such_column from runs")
        return real(path, experiment_id)

    monkeypatch.setattr(finished, "_from_sqlite", misfit)
    with pytest.raises(sqlite3.OperationalError):
        misfit(str(tmp_path / "mlflow.db"), t.experiment_id)
    assert set(_view(finished.finished_runs(t.client, uri, t.experiment_id))) == {ids["ok"], ids["diverged"]}
