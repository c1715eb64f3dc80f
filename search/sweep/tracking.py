"""MLflow tracking: one run per trial, written by one writer (the driver).

MLflow is the source of truth; `rebuild_parquet` regenerates the Parquet
datasets from it. The driver calls `Tracker` from a Ray Tune callback, so a
sqlite store never sees concurrent writers.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import tempfile
import time
from typing import Any, Iterable

from search.config import TrialConfig, parse_value
from search.results import LayerShift, TrialResult
from search.schema import layer_rows, trial_row
from search.store import ResultStore

__all__ = ["Tracker", "rebuild_parquet", "package_versions", "DONE_STATUSES"]

# A run with one of these statuses is a result: a rerun reuses it instead of training again.
DONE_STATUSES = ("ok", "diverged", "stopped")
_LAYERS_ARTIFACT = "layers.parquet"
_EPOCH_NAMES = {"throughput": "epoch_throughput"}


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on, for reproducibility tags."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("dropout-bn-ablate", "torch", "torchvision", "timm", "ray", "mlflow", "optuna", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        _create_sqlite_store(tracking_uri[len("sqlite:///"):])
    try:
        return MlflowClient(tracking_uri=tracking_uri)
    except Exception as e:  # noqa: BLE001 - sqlalchemy/MLflow errors of a store that cannot be opened
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise OSError(f"--tracking-uri {tracking_uri!r}: the MLflow store cannot be opened ({first}); if a sweep "
                      "was interrupted while creating it and it holds no runs, delete it and run again") from None


def _create_sqlite_store(db: str) -> None:
    """Create a new MLflow sqlite store under a temporary name, then publish it with link(2).

    MLflow migrates a new sqlite file table by table (alembic's sqlite DDL is not
    transactional), so a driver killed or interrupted meanwhile would leave a half-migrated
    mlflow.db that no later run can open. Built aside, the store appears complete or not at all;
    link() never replaces a store another driver published first.
    """
    import contextlib
    import uuid

    from mlflow.tracking import MlflowClient

    db = os.path.abspath(db)
    if os.path.exists(db):
        return
    folder, prefix = os.path.dirname(db), f".{os.path.basename(db)}.init-"
    for name in os.listdir(folder) if os.path.isdir(folder) else []:  # left by a creator that was killed
        pid = name[len(prefix):].split("-")[0] if name.startswith(prefix) else ""
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))
    tmp = os.path.join(os.path.dirname(db), f".{os.path.basename(db)}.init-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        MlflowClient(tracking_uri=f"sqlite:///{tmp}")  # runs the migrations
        with contextlib.suppress(FileExistsError):
            os.link(tmp, db)
    finally:
        for p in (tmp, tmp + "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


def _artifact_location(tracking_uri: str) -> str | None:
    # A local store keeps artifacts beside the database, not in whatever cwd a worker has.
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///"):]
        return "file://" + os.path.join(os.path.dirname(os.path.abspath(db)), "mlruns")
    return None


class Tracker:
    """MLflow runs and Parquet rows for one space's sweep."""

    def __init__(self, tracking_uri: str, space: str, profile: str, root: str) -> None:
        self.tracking_uri, self.space, self.profile = tracking_uri, space, profile
        self.client = _client(tracking_uri)
        exp = self.client.get_experiment_by_name(space)
        if exp is None:
            self.experiment_id = self.client.create_experiment(
                space, artifact_location=_artifact_location(tracking_uri))
        else:
            self.experiment_id = exp.experiment_id
        self.store = ResultStore(root, space)
        self.versions = package_versions()

    # ------------------------------------------------------------- queries
    def runs(self, status: str | None = None) -> list[Any]:
        """All runs of the experiment (optionally with one MLflow lifecycle status)."""
        return _search_all(self.client, self.experiment_id, status)

    def finished(self, algo: str | None = None, profile: str | None = None) -> dict[str, str]:
        """config_hash -> run_id of every run that ended with a result (optionally of one algo and profile)."""
        done = {}
        for r in self.runs("FINISHED"):
            tags = r.data.tags
            if tags.get("status") not in DONE_STATUSES or "config_hash" not in tags:
                continue
            if (algo is None or tags.get("algo") == algo) and (profile is None or tags.get("profile") == profile):
                done[tags["config_hash"]] = r.info.run_id
        return done

    def close_stale(self) -> int:
        """Mark runs left RUNNING by a killed driver as KILLED; returns how many."""
        stale = self.runs("RUNNING")
        # A killed driver may have written a stale run's Parquet rows just before dying.
        self.store.drop_runs({r.info.run_id for r in stale})
        for r in stale:
            self.client.set_tag(r.info.run_id, "status", "killed")
            self.client.set_terminated(r.info.run_id, status="KILLED")
        return len(stale)

    # ------------------------------------------------------------- writing
    def start(self, cfg: TrialConfig, *, trial_id: str = "", algo: str = "") -> str:
        from mlflow.entities import Param, RunTag

        tags = {"space": self.space, "profile": self.profile, "config_hash": cfg.config_hash,
                "status": "running", "trial_id": trial_id, "algo": algo,
                **{f"version.{k}": v for k, v in self.versions.items()}}
        name = (f"{cfg.backbone}-d{cfg.depth}-w{cfg.width:g}-{cfg.dropout_placement}-{cfg.dropout_type}"
                f"-{cfg.dropout_rate:g}-s{cfg.seed}")
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        params = [Param(k, str(v)) for k, v in cfg.to_dict().items()]
        self.client.log_batch(run.info.run_id, params=params, tags=[RunTag("mlflow.runName", name)])
        return run.info.run_id

    def log_epochs(self, run_id: str, history: Iterable[dict[str, float]]) -> None:
        """Per-epoch metrics in one batch (step = epoch)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # The trial-level `throughput` is a summary metric; the per-epoch figure gets its own name.
        metrics = [Metric(_EPOCH_NAMES.get(k, k), float(v), now, int(h["epoch"])) for h in history
                   for k, v in h.items() if k != "epoch" and _finite(v)]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])

    def finish(self, run_id: str, cfg: TrialConfig, result: TrialResult,
               extra_tags: dict[str, str] | None = None) -> None:
        """Log summary metrics and the per-layer artifact, end the run, and write the Parquet rows."""
        from mlflow.entities import Metric, RunTag

        self.log_epochs(run_id, result.history)
        now = int(time.time() * 1000)
        # Keys the epoch series already carry (train_loss, test_acc, ...) are not logged twice.
        in_series = set(result.history[-1]) if result.history else set()
        metrics = [Metric(k, float(v), now, result.epochs_completed) for k, v in result.summary().items()
                   if _finite(v) and (k not in in_series or k in _EPOCH_NAMES)]
        tags = [RunTag("status", result.status)] + [RunTag(k, str(v)) for k, v in (extra_tags or {}).items()]
        if result.error:
            tags.append(RunTag("error", result.error[:5000]))
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        if result.layers:
            self._log_layers(run_id, cfg, result.layers)
        finished_at = dt.datetime.now(dt.timezone.utc)
        # Parquet first: if the driver dies between the two writes, MLflow still says
        # RUNNING, so --resume retrains instead of trusting a half-recorded trial.
        self.store.write_trial(
            trial_row(cfg, result, run_id=run_id, space=self.space, profile=self.profile, finished_at=finished_at),
            layer_rows(cfg, result.layers, run_id=run_id, space=self.space))
        self.client.set_terminated(run_id, status="FINISHED" if result.status != "failed" else "FAILED")

    def _log_layers(self, run_id: str, cfg: TrialConfig, layers: list[LayerShift]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from search.schema import LAYERS_SCHEMA

        table = pa.Table.from_pylist(layer_rows(cfg, layers, run_id=run_id, space=self.space),
                                     schema=LAYERS_SCHEMA)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, _LAYERS_ARTIFACT)
            pq.write_table(table, path)
            self.client.log_artifact(run_id, path)


def _search_all(client: Any, experiment_id: str, status: str | None) -> list[Any]:
    flt = f"attributes.status = '{status}'" if status else ""
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=flt, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def rebuild_parquet(space: str, tracking_uri: str, root: str) -> tuple[int, int]:
    """Regenerate `<root>/<space>/{trials,layers}` from the MLflow experiment `space`.

    Returns:
        (number of trial rows, number of layer rows) written.

    Raises:
        ValueError: no experiment of that name in the tracking store.
    """
    import dataclasses

    import mlflow
    import pyarrow as pa
    import pyarrow.parquet as pq

    from search.schema import LAYERS_SCHEMA, TRIALS_SCHEMA

    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(space)
    if exp is None:
        raise ValueError(f"space {space!r}: no MLflow experiment of that name at {tracking_uri}")
    types = {f.name: str(f.type) for f in dataclasses.fields(TrialConfig)}
    trial_rows, layer_tables = [], []
    for run in _search_all(client, exp.experiment_id, "FINISHED") + _search_all(client, exp.experiment_id, "FAILED"):
        tags, params = run.data.tags, run.data.params
        if "config_hash" not in tags:
            continue
        cfg = TrialConfig.from_dict({k: parse_value(k, types[k], v) for k, v in params.items() if k in types})
        m = run.data.metrics
        result = TrialResult(status=tags.get("status", "failed"), error=tags.get("error"), device=tags.get("device", ""),
                             **{k: m[k] for k in TrialResult.SUMMARY_KEYS if k in m})
        result.params, result.epochs_completed = int(result.params), int(result.epochs_completed)
        end = dt.datetime.fromtimestamp((run.info.end_time or run.info.start_time) / 1000, dt.timezone.utc)
        trial_rows.append(trial_row(cfg, result, run_id=run.info.run_id, space=space,
                                    profile=tags.get("profile", ""), finished_at=end))
        names = [a.path for a in client.list_artifacts(run.info.run_id)]
        if _LAYERS_ARTIFACT in names:
            with tempfile.TemporaryDirectory() as d:
                local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=_LAYERS_ARTIFACT,
                                                            dst_path=d, tracking_uri=tracking_uri)
                layer_tables.append(pq.read_table(local).cast(LAYERS_SCHEMA))
    trials = pa.Table.from_pylist(trial_rows, schema=TRIALS_SCHEMA)
    layers = pa.concat_tables(layer_tables) if layer_tables else LAYERS_SCHEMA.empty_table()
    ResultStore(root, space).replace_all(trials, layers)
    return trials.num_rows, layers.num_rows


def result_from_json(blob: str) -> TrialResult:
    """Decode the TrialResult a Tune worker sent in its final report."""
    return TrialResult.from_dict(json.loads(blob))
