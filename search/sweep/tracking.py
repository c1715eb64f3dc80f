"""MLflow tracking: one parent run per sweep, one child run per trial, written by one writer (the driver).

MLflow is the source of truth; `rebuild_parquet` regenerates the Parquet
datasets from it. The driver calls `Tracker` from a Ray Tune callback, so a
sqlite store never sees concurrent writers.

What the MLflow UI shows follows its conventions: the experiment (one per space)
has a description; each sweep is a parent run (`run_kind=sweep`) holding the
command line, the sweep summary and the report; each trial is its child
(`mlflow.parentRunId`) with MLflow's `mlflow.user` / `mlflow.source.*` tags, its
config as params, per-epoch series under `epoch/` (step = epoch), each summary metric once, and
a previewable per-layer view (PNG and table) beside `layers.parquet`.
"""
from __future__ import annotations

import datetime as dt
import math
import os
import re
import tempfile
import time
from typing import Any, Iterable

from search.config import TrialConfig, parse_value
from search.code_version import code_columns_from_tags, code_version
from search.results import LayerShift, TrialResult
from search.schema import layer_rows, trial_row
from search.store import ResultStore, read_parts

__all__ = ["Tracker", "rebuild_parquet", "package_versions", "run_name", "runs_view", "DONE_STATUSES", "KIND_TAG",
           "EPOCH_PREFIX", "epoch_series"]

# A run with one of these statuses is a result: a rerun reuses it instead of training again.
DONE_STATUSES = ("ok", "diverged", "stopped")
_LAYERS_ARTIFACT = "layers.parquet"
# MLflow 3's UI opens an experiment in its GenAI mode (trial pages under "Evaluations") unless this tag says
# it trains models: the experiment is marked as the UI's "custom model development" (its ML mode).
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
KIND_TAG = "run_kind"  # "sweep" on a sweep's parent run, "trial" on each trial's run
# MLflow names that differ from TrialResult's: a metric called `params` reads like MLflow's own params.
_METRIC_NAMES = {"params": "num_params"}
# The per-epoch series are logged as `epoch/<key>` (step = epoch): MLflow's UI draws a metric prefix as a
# section of its own, so the curves stand apart from the single-value summaries (step 0, unprefixed).
# Runs logged before the prefix hold the series unprefixed (`train_loss` with steps 1..n); readers take both.
EPOCH_PREFIX = "epoch/"
# Summary keys the epoch series already determine: not logged as metrics of their own (the sum of
# `epoch/epoch_time_s`, the number of epochs, the images-weighted `epoch/throughput`); rebuild_parquet
# derives them from the series.
_FROM_SERIES = ("throughput", "train_time_s", "epochs_completed")
_EXPERIMENT_NOTE = (
    "Dropout x BatchNorm variance-shift ablation, space `{space}` (python -m search.run --space {space}). "
    "Each sweep is a parent run (run_kind = sweep: command line, summary, report); each trial is a child run "
    "(run_kind = trial) with its config as params, per-epoch series epoch/* (step = epoch), summary metrics, and "
    "artifacts shift_by_layer.png, layers.json (table view) and layers.parquet. "
    "To list trials flat across sweeps, filter with tags.run_kind = 'trial' and sort by a metric such as "
    "test_acc: sorted by Created, the runs table folds each sweep's trials under its parent row "
    "(each sweep's description links its own trials, listed flat).")


def runs_view(experiment_id: str, search_filter: str, order_by: str = "test_acc") -> str:
    """The MLflow UI's runs table of `experiment_id` filtered by `search_filter` and sorted by the metric
    `order_by`, best first, as a link relative to the UI (`#/experiments/...`).

    Sorted by a column other than Created, the UI lists matching child runs flat instead of folding them
    under their parent's row (its runs view nests and fetches parents only when sorted by start time).
    """
    from urllib.parse import quote, urlencode

    query = urlencode({"searchFilter": search_filter, "orderByKey": f"metrics.`{order_by}`", "orderByAsc": "false"},
                      quote_via=quote)
    return f"#/experiments/{experiment_id}/runs?{query}"


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


def _quiet_migrations() -> None:
    """Keep MLflow's and alembic's INFO lines about creating/migrating the store off stderr (warnings stay)."""
    import logging

    for name in ("alembic", "mlflow.store.db.utils", "mlflow.store.db_migrations"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _source_tags() -> dict[str, str]:
    """MLflow's own provenance tags: who ran it and from which entry point ("Created by", "Source" in the UI)."""
    import getpass

    from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no $USER (some containers)
        user = str(os.getuid())
    return {MLFLOW_USER: user, MLFLOW_SOURCE_NAME: "search.run", MLFLOW_SOURCE_TYPE: "LOCAL"}


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    _quiet_migrations()
    # A tracking server's client prints "View run ... at: URL" to stdout on every run it ends (one more
    # request each, and lines through the live display); the sweep says where its runs are once, at the end.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
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
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

        exp = self.client.get_experiment_by_name(space)
        note = _EXPERIMENT_NOTE.format(space=space)
        if exp is None:
            self.experiment_id = self.client.create_experiment(
                space, artifact_location=_artifact_location(tracking_uri),
                tags={MLFLOW_RUN_NOTE: note, EXPERIMENT_KIND: MODEL_TRAINING})
        else:
            self.experiment_id = exp.experiment_id
            if MLFLOW_RUN_NOTE not in exp.tags:  # a store from before descriptions; a user's own note stays
                self.client.set_experiment_tag(self.experiment_id, MLFLOW_RUN_NOTE, note)
            if EXPERIMENT_KIND not in exp.tags:  # a user's own choice stays
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        self.store = ResultStore(root, space)
        self.versions = package_versions()
        self.parent_id: str | None = None  # this sweep's parent run (open_sweep)
        self.parent_closed = False  # close_sweep ended it (a signal after that leaves it as it is)
        self._artifact_uri: dict[str, str] = {}  # run_id -> artifact URI, from create_run (saves a get_run)
        self._algo: dict[str, str] = {}  # run_id -> the algo of the sweep that started it (the trials' `algo`)
        self._previews: Any = None  # one background thread drawing the per-trial PNG and table (see _log_layers)
        self.preview_errors: list[str] = []
        self._written = 0  # trials finished by this tracker (their Parquet part files), for the periodic compaction
        self.compact_every = max(1, int(os.environ.get("DBN_COMPACT_EVERY", "500") or 500))

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
        """Mark trial runs left RUNNING by a killed driver as KILLED; returns how many.

        A sweep's parent run left RUNNING is `open_sweep`'s to close or resume.
        """
        stale = [r for r in self.runs("RUNNING") if r.data.tags.get(KIND_TAG) != "sweep"]
        # A killed driver may have written a stale run's Parquet rows just before dying.
        self.store.drop_runs({r.info.run_id for r in stale})
        for r in stale:
            self.client.set_tag(r.info.run_id, "status", "killed")
            self.client.set_terminated(r.info.run_id, status="KILLED")
        return len(stale)

    # ------------------------------------------------------------- writing
    def open_sweep(self, *, algo: str, command: str, params: dict[str, Any] | None = None,
                   resume: bool = False) -> str:
        """Create this sweep's parent run, or with `resume` reopen the latest one of this profile and algo.

        Every trial run `start` creates afterwards is its child. A parent left RUNNING by a killed
        driver is reopened by `resume`, otherwise marked KILLED. Returns the parent's run id.
        """
        from mlflow.entities import Param, RunTag
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

        flt = f"tags.{KIND_TAG} = 'sweep' and tags.profile = '{self.profile}' and tags.algo = '{algo}'"
        mine = sorted(_search_all(self.client, self.experiment_id, None, flt), key=lambda r: -r.info.start_time)
        if resume and mine:
            self.parent_id = mine[0].info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
            self.client.log_batch(self.parent_id, tags=[RunTag("status", "running"), RunTag("resumed_by", command)])
            mine = mine[1:]
        for r in mine:
            if r.info.status == "RUNNING":
                self.client.set_tag(r.info.run_id, "status", "killed")
                self.client.set_terminated(r.info.run_id, status="KILLED")
        self.parent_closed = False
        if self.parent_id is None:
            tags = {KIND_TAG: "sweep", "space": self.space, "profile": self.profile, "algo": algo, "status": "running",
                    "command": command, **_source_tags(), **code_version().tags(),
                    **{f"version.{k}": v for k, v in self.versions.items()}}
            run = self.client.create_run(self.experiment_id, tags=tags,
                                         run_name=f"sweep-{self.space}-{self.profile}-{algo}-{time.strftime('%m%d-%H%M%S')}")
            self.parent_id = run.info.run_id
            self._artifact_uri[self.parent_id] = run.info.artifact_uri
            self.client.log_batch(self.parent_id, params=[Param(k, str(v)) for k, v in (params or {}).items()],
                                  tags=[RunTag(MLFLOW_RUN_NOTE, self._sweep_note(algo))])
        return self.parent_id

    def _sweep_note(self, algo: str) -> str:
        """The sweep run's description (the run page's "Description"): where its trials and report are."""
        flt = f"tags.mlflow.parentRunId = '{self.parent_id}'"
        return (f"Sweep of space `{self.space}`, profile `{self.profile}`, algorithm `{algo}`.\n\n"
                f"- Its trials, listed flat and best first: [runs table]({runs_view(self.experiment_id, flt)}) "
                f"(filter `{flt}`, sorted by test_acc; sorted by Created, the table folds them under this run).\n"
                "- Its report with the figures: Artifacts, `report/report.html`; the figures also as images "
                "(`images/`).")

    def close_sweep(self, status: str, metrics: dict[str, float], files: Iterable[str] = (),
                    folder: str | None = None) -> None:
        """End the parent run: `status` done | killed | failed, counts as metrics, `files` and `folder` as artifacts.

        Every PNG under `folder` (the report's figures) is also logged as an MLflow image (key: its file name
        without .png, step 0), which the run's chart view shows as images.
        """
        from mlflow.entities import Metric, RunTag

        if self.parent_id is None:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()
                                                       if _finite(v)], tags=[RunTag("status", status)])
        for f in files:
            self.client.log_artifact(self.parent_id, f)
        if folder and os.path.isdir(folder):
            self.client.log_artifacts(self.parent_id, folder, artifact_path=os.path.basename(folder.rstrip("/")))
            self._log_images(folder)
        self.client.set_terminated(self.parent_id, status={"done": "FINISHED", "killed": "KILLED"}.get(status, "FAILED"))
        self.parent_closed = True

    def _log_images(self, folder: str) -> None:
        from PIL import Image

        for d, _, names in sorted(os.walk(folder)):
            for name in sorted(n for n in names if n.endswith(".png")):
                try:
                    with Image.open(os.path.join(d, name)) as im:
                        im.load()
                except OSError:  # not a readable PNG: it stays an artifact like any other file
                    continue
                # MLflow's image keys allow letters, digits, _ - . / and spaces
                key = re.sub(r"[^A-Za-z0-9_\-. ]", "_", name[:-len(".png")])
                self.client.log_image(self.parent_id, im, key=key, step=0)

    def start(self, cfg: TrialConfig, *, trial_id: str = "", algo: str = "") -> str:
        """Create a trial's run (the sweep's child when a parent is open), named by `run_name`; returns its id."""
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = {KIND_TAG: "trial", "space": self.space, "profile": self.profile, "config_hash": cfg.config_hash,
                "status": "running", "trial_id": trial_id, "algo": algo, **_source_tags(),
                **{f"version.{k}": v for k, v in self.versions.items()}, **code_version().tags()}
        if self.parent_id:
            tags[MLFLOW_PARENT_RUN_ID] = self.parent_id
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name(cfg))
        self._artifact_uri[run.info.run_id] = run.info.artifact_uri
        self._algo[run.info.run_id] = algo
        # Only the fields that mean something: unset speed knobs (None) would show as the string "None".
        params = [Param(k, str(v)) for k, v in cfg.to_dict().items() if v is not None]
        self.client.log_batch(run.info.run_id, params=params)
        return run.info.run_id

    def finish(self, run_id: str, cfg: TrialConfig, result: TrialResult,
               extra_tags: dict[str, str] | None = None) -> None:
        """Log metrics and the per-layer artifacts, end the run, and write the Parquet rows.

        Metrics: the epoch series as `epoch/<key>` (step = epoch) and each summary value once (step 0),
        but those the series determine (`_FROM_SERIES`); `params` is logged as `num_params`.
        """
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(EPOCH_PREFIX + k, float(v), now, int(h["epoch"])) for h in result.history
                   for k, v in h.items() if k != "epoch" and _finite(v)]
        metrics += [Metric(_METRIC_NAMES.get(k, k), float(v), now, 0) for k, v in result.summary().items()
                    if _finite(v) and not (k in _FROM_SERIES and metrics)]
        tags = [RunTag("status", result.status)] + [RunTag(k, str(v)) for k, v in (extra_tags or {}).items()]
        if result.error:
            tags.append(RunTag("error", result.error[:5000]))
        for i in range(0, max(len(metrics), 1), 1000):  # MLflow's batch limit; one call for a usual trial
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000], tags=tags if i == 0 else [])
        if result.layers:
            self._log_layers(run_id, cfg, result.layers)
        finished_at = dt.datetime.now(dt.timezone.utc)
        # Parquet first: if the driver dies between the two writes, MLflow still says
        # RUNNING, so --resume retrains instead of trusting a half-recorded trial.
        self.store.write_trial(
            trial_row(cfg, result, run_id=run_id, space=self.space, profile=self.profile, finished_at=finished_at,
                      algo=self._algo.get(run_id), sweep_id=self.parent_id),
            layer_rows(cfg, result.layers, run_id=run_id, space=self.space))
        self.client.set_terminated(run_id, status="FINISHED" if result.status != "failed" else "FAILED")
        self._written += 1
        if self._written % self.compact_every == 0:
            # Folded as the sweep goes: one compaction over 10,000 trials' part files (20,000 small files) held
            # ~8 GB in the driver and took minutes (benchmarks/control_plane.py); over 500 it reads 500 small
            # files and the one compacted file.
            self.store.compact()

    def _log_layers(self, run_id: str, cfg: TrialConfig, layers: list[LayerShift]) -> None:
        """layers.parquet (the record), shift_by_layer.png and layers.json (what the UI previews)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from search.schema import layers_schema

        table = pa.Table.from_pylist(layer_rows(cfg, layers, run_id=run_id, space=self.space),
                                     schema=layers_schema())  # registered per-layer metrics included
        with tempfile.TemporaryDirectory() as d:
            pq.write_table(table, os.path.join(d, _LAYERS_ARTIFACT))
            self._log_folder(run_id, d)
        # The previews are views of the record above, not the record: drawn off the Tune loop (matplotlib
        # and log_table cost about as much as all the rest of a trial's writes), so no slot waits on them.
        if self._previews is None:
            from concurrent.futures import ThreadPoolExecutor

            self._previews = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-previews")
        if layers:  # a model without norm layers (normalization none) has nothing to draw
            self._previews.submit(self._log_previews, run_id, run_name(cfg), list(layers))

    def _log_folder(self, run_id: str, folder: str) -> None:
        uri = self._artifact_uri.get(run_id)
        if uri:  # one copy of the folder, no run lookup (a trial's run is ours since start)
            from mlflow.artifacts import get_artifact_repository

            # The tracking URI of this store, not MLflow's process-wide one: a server's `mlflow-artifacts:`
            # URIs resolve against it (MlflowClient does the same for its own artifact calls).
            get_artifact_repository(uri, tracking_uri=self.tracking_uri).log_artifacts(folder)
        else:
            self.client.log_artifacts(run_id, folder)

    def _log_previews(self, run_id: str, title: str, layers: list[LayerShift]) -> None:
        from search.sweep.artifacts import LAYERS_PNG, LAYERS_TABLE, layers_table, write_layers_png

        try:
            with tempfile.TemporaryDirectory() as d:
                write_layers_png(os.path.join(d, LAYERS_PNG), layers, title)
                self._log_folder(run_id, d)
            self.client.log_table(run_id, layers_table(layers), LAYERS_TABLE)
        except Exception as e:  # noqa: BLE001 - a missing preview loses no result; flush() reports it
            self.preview_errors.append(f"{title}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")

    def flush(self) -> list[str]:
        """Wait for the per-trial previews still being drawn; returns one line per preview that failed."""
        if self._previews is not None:
            self._previews.shutdown(wait=True)
            self._previews = None
        return self.preview_errors


def run_name(cfg: TrialConfig) -> str:
    """A trial's MLflow run name, the name the live display shows: what differs between trials first
    (placement-type-rate-width-seed, `none` without type and rate), then the backbone, e.g.
    `pre_bn-bernoulli-0.5-w4-s0-cifar_wrn-d10`: the runs table's name column shows what tells runs apart."""
    drop = (cfg.dropout_placement if cfg.dropout_placement == "none"
            else f"{cfg.dropout_placement}-{cfg.dropout_type}-{cfg.dropout_rate:g}")
    # Settings left at their default say nothing; a set one tells its trial apart (e.g. early dropout from
    # dropout for the whole run, `pre_conv-bernoulli-0.2-early2-linear-w1-s0-...`).
    if cfg.dropout_block_size is not None:
        drop += f"-b{cfg.dropout_block_size}"
    if cfg.dropout_schedule is not None:
        drop += f"-{cfg.dropout_schedule}{cfg.dropout_cutoff:g}" + (f"-{cfg.dropout_decay}" if cfg.dropout_decay else "")
    if cfg.normalization is not None:
        drop += f"-{cfg.normalization}" + (f"{cfg.norm_groups}" if cfg.norm_groups is not None else "")
    return f"{drop}-w{cfg.width:g}-s{cfg.seed}-{cfg.backbone}-d{cfg.depth}"


def _search_all(client: Any, experiment_id: str, status: str | None, extra: str = "") -> list[Any]:
    flt = " and ".join(([f"attributes.status = '{status}'"] if status else []) + ([extra] if extra else []))
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=flt, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def epoch_series(client: Any, run: Any, key: str) -> dict[int, float]:
    """{epoch: value} of a trial run's per-epoch series `key` (e.g. "test_acc"): `epoch/<key>`, or for a run
    logged before the prefix, the unprefixed metric's steps from 1 on (its step-0 value, if any, a summary)."""
    metrics = run.data.metrics
    if EPOCH_PREFIX + key in metrics:
        return {h.step: h.value for h in client.get_metric_history(run.info.run_id, EPOCH_PREFIX + key)}
    if key in metrics:
        return {h.step: h.value for h in client.get_metric_history(run.info.run_id, key) if h.step > 0}
    return {}


def _from_series(client: Any, run: Any) -> dict[str, float]:
    """The summary values `finish` leaves to the epoch series: train time, throughput, epochs completed.

    A run logged before that (with its own `throughput` summary metric and no epoch times) keeps its values.
    """
    m = run.data.metrics
    if not {"epoch_time_s", EPOCH_PREFIX + "epoch_time_s"} & m.keys() or "train_time_s" in m:
        return {}
    by_step = {key: epoch_series(client, run, key) for key in ("epoch_time_s", "throughput")}
    dts = by_step["epoch_time_s"]
    seconds = sum(dts.values())
    images = sum(dts[s] * by_step["throughput"].get(s, math.nan) for s in dts)
    return {"train_time_s": seconds, "epochs_completed": float(len(dts)),
            "throughput": images / seconds if seconds > 0 else math.nan}


def rebuild_parquet(space: str, tracking_uri: str, root: str) -> tuple[int, int]:
    """Regenerate `<root>/<space>/{trials,layers}` from the MLflow experiment `space`.

    Returns:
        (number of trial rows, number of layer rows) written.

    Raises:
        ValueError: no experiment of that name in the tracking store.
        OSError: another process (a sweep) holds the space's writer lock; nothing was written.
    """
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(space)
    if exp is None:
        raise ValueError(f"space {space!r}: no MLflow experiment of that name at {tracking_uri}")
    # The space's writer lock from before the MLflow read to the swap: the snapshot then holds every run whose
    # part files it deletes (a sweep's new trials were lost otherwise; issue 30). Re-entrant for the driver's
    # repair; while a sweep holds it, OSError says so and nothing is written.
    with ResultStore(root, space).lock("rebuild"):
        return _rebuild_locked(client, exp, space, root)


def _rebuild_locked(client: Any, exp: Any, space: str, root: str) -> tuple[int, int]:
    import dataclasses

    import pyarrow as pa
    import pyarrow.fs as pafs

    from search.schema import TRIALS_SCHEMA, layers_schema

    types = {f.name: str(f.type) for f in dataclasses.fields(TrialConfig)}

    def one(run: Any) -> tuple[dict[str, Any], Any] | None:
        """A run's trial row and its layers.parquet as a table (None: no layers); None for a non-trial run."""
        tags, params = run.data.tags, run.data.params
        if "config_hash" not in tags:
            return None
        cfg = TrialConfig.from_dict({k: parse_value(k, types[k], v) for k, v in params.items() if k in types})
        # Summaries are the unprefixed metrics. A run logged before `epoch/` has no summary of its own for a key
        # its series held (train_loss, test_acc, ...): the unprefixed series' latest value, the last epoch's, is it.
        m = {**run.data.metrics, **_from_series(client, run)}
        m.update({k: m[name] for k, name in _METRIC_NAMES.items() if name in m})
        result = TrialResult(status=tags.get("status", "failed"), error=tags.get("error"), device=tags.get("device", ""),
                             **{k: m[k] for k in TrialResult.SUMMARY_KEYS if k in m})
        result.params, result.epochs_completed = int(result.params), int(result.epochs_completed)
        # The series kept whole in Parquet (d_cos2_by_epoch, ...): from the runs' epoch series
        result.restore_series(lambda k, r=run: epoch_series(client, r, k))
        end = dt.datetime.fromtimestamp((run.info.end_time or run.info.start_time) / 1000, dt.timezone.utc)
        row = trial_row(cfg, result, run_id=run.info.run_id, space=space, profile=tags.get("profile", ""),
                        finished_at=end, code=code_columns_from_tags(tags), algo=tags.get("algo"),
                        sweep_id=tags.get("mlflow.parentRunId"))
        names = [a.path for a in client.list_artifacts(run.info.run_id)]
        if _LAYERS_ARTIFACT not in names:
            return row, None
        with tempfile.TemporaryDirectory() as d:
            # Through the client bound to `tracking_uri` (a server's mlflow-artifacts: URIs resolve against it)
            local = client.download_artifacts(run.info.run_id, _LAYERS_ARTIFACT, dst_path=d)
            # read_parts: an artifact from before a column was added still conforms (nulls)
            return row, read_parts(pafs.LocalFileSystem(), [(local, 0.0)], layers_schema())

    runs = _search_all(client, exp.experiment_id, "FINISHED") + _search_all(client, exp.experiment_id, "FAILED")
    trial_rows, n_layers = [], 0
    # Each run costs a few round trips (its series, its artifact list, its layers.parquet): four at once, in
    # order, at most 32 fetched ahead; each run's layers go to the new dataset as they come, so the rebuild
    # never holds all runs' artifacts (benchmarks/control_plane.py, docs/performance.md).
    with ResultStore(root, space).replacing() as new:
        for got in _in_order(one, runs, workers=4, ahead=32):
            if got is None:
                continue
            trial_rows.append(got[0])
            if got[1] is not None:
                new.add_layers(got[1])
                n_layers += got[1].num_rows
        trials = pa.Table.from_pylist(trial_rows, schema=TRIALS_SCHEMA)
        new.finish(trials)
    return trials.num_rows, n_layers


def _in_order(fn: Any, items: list[Any], *, workers: int, ahead: int) -> Iterable[Any]:
    """fn over items on `workers` threads, results yielded in the items' order, at most `ahead` pending."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rebuild") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
