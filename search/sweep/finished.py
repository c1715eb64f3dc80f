"""The finished runs of a space's MLflow experiment, read at a cost that stays small at 10,000 trials.

Every sweep starts by asking which configurations already have a result (`--resume`, de-duplication).
MLflow's `search_runs` answers with whole runs, every param, tag and latest metric of each: 7-15 ms a
run on a sqlite store, so 1-2.5 minutes for a 10,000-trial study before anything trains
(benchmarks/control_plane.py). A decision needs five tags and one metric per run. On a sqlite store
they are read from MLflow's own tables in one query; on any other store (a tracking server) through
`search_runs`. Both give the same records (tests/test_finished_runs.py compares them on a real store,
so a change of MLflow's schema fails there, and a store whose schema the query does not fit falls
back to `search_runs` at run time).
"""
from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from typing import Any

__all__ = ["FinishedRun", "finished_runs"]

_TAGS = ("config_hash", "status", "algo", "profile", "code_version")


@dataclass(frozen=True)
class FinishedRun:
    """One MLflow run with lifecycle status FINISHED: what deciding to reuse it needs."""

    run_id: str
    tags: dict[str, str]  # the _TAGS it has
    test_acc: float  # NaN when not logged


def finished_runs(client: Any, tracking_uri: str, experiment_id: str, *, via_api: bool = False) -> list[FinishedRun]:
    """Every active FINISHED run of the experiment (sweep parent runs included: callers filter by tag).

    Args:
        client: an MlflowClient bound to `tracking_uri` (used for any store but sqlite).
        via_api: always use `search_runs` (the reference the sqlite query is tested against).
    """
    if tracking_uri.startswith("sqlite:///") and not via_api:
        try:
            return _from_sqlite(tracking_uri[len("sqlite:///"):], experiment_id)
        except sqlite3.DatabaseError:
            pass  # a schema this query does not know (another MLflow version): the API below always works
    from search.sweep.tracking import _search_all

    out = []
    for r in _search_all(client, experiment_id, "FINISHED"):
        acc = r.data.metrics.get("test_acc")
        out.append(FinishedRun(r.info.run_id, {k: v for k, v in r.data.tags.items() if k in _TAGS},
                               float(acc) if isinstance(acc, (int, float)) else math.nan))
    return out


def _from_sqlite(path: str, experiment_id: str) -> list[FinishedRun]:
    """The same records from MLflow's tables (runs, tags, latest_metrics), read-only, in two queries."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        runs = "select run_uuid from runs where experiment_id = ? and status = 'FINISHED' and lifecycle_stage = 'active'"
        tags: dict[str, dict[str, str]] = {r: {} for (r,) in db.execute(runs, (int(experiment_id),))}
        marks = ",".join("?" * len(_TAGS))
        for run, key, value in db.execute(f"select run_uuid, key, value from tags where key in ({marks}) and "
                                          f"run_uuid in ({runs})", (*_TAGS, int(experiment_id))):
            tags[run][key] = value
        acc: dict[str, float] = {}
        for run, value, is_nan in db.execute(f"select run_uuid, value, is_nan from latest_metrics where "
                                             f"key = 'test_acc' and run_uuid in ({runs})", (int(experiment_id),)):
            acc[run] = math.nan if is_nan else float(value)
    finally:
        db.close()
    return [FinishedRun(r, t, acc.get(r, math.nan)) for r, t in tags.items()]
