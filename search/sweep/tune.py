"""The Ray Tune driver: trials scheduled by Tune, searched by grid, random or Optuna.

The trainable runs `run_trial` on a worker and reports per-epoch metrics; a
Tune callback in the driver is the single writer to MLflow and Parquet.
"""
from __future__ import annotations

import errno
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ray import tune
from ray.tune.search import Searcher

from search.config import TrialConfig
from search.results import TrialResult
from search.sweep.errors import Interrupted, ResourceWait, SweepFailed
from search.sweep.tracking import Tracker

__all__ = ["SweepPlan", "SweepOutcome", "run_sweep", "trainable", "DedupSearcher", "PlannedSearcher"]


@dataclass
class SweepPlan:
    """Everything the driver needs, resolved and validated by `search.run`."""

    space: str
    profile: str
    algo: str  # grid | random | optuna
    configs: list[dict[str, Any]]  # grid/random: the trials to run (already de-duplicated)
    samples: int = 0  # optuna: trials to train (proposals x seeds), duplicates not counted
    seeds: int = 1  # optuna: each proposal is trained with seeds 0..seeds-1; the objective is their mean
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    scheduler: str = "fifo"  # fifo | asha
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0
    retries: int = 1
    storage: str = "results"
    tracking_uri: str = "sqlite:///mlflow.db"
    finished: dict[str, str] = field(default_factory=dict)  # config_hash -> run_id already done (reusable)
    scores: dict[str, float] = field(default_factory=dict)  # config_hash -> test_acc of those runs
    study_name: str = ""  # optuna: the study in <storage>/<space>/optuna.db (default space-profile)
    verbose: int = 1
    resource_wait_s: float = 0.0  # > 0: stop if no trial has started after this long (an autoscaling cluster)


@dataclass
class SweepOutcome:
    """What this sweep trained: counts by status, and the first failure's reason."""

    statuses: dict[str, int] = field(default_factory=dict)
    first_error: str = ""
    exhausted: bool = False  # optuna proposed only known configurations many times in a row


def trainable(config: dict[str, Any]) -> None:
    """Tune function trainable: one trial; the last report carries the whole result.

    Only new configurations reach it: grid/random runs get the unfinished ones, and
    `DedupSearcher` answers Optuna's repeated proposals without starting a trial.
    """
    from search.plugins import raise_worker_error

    raise_worker_error()  # a plugin this worker could not import: its own error, before names it registers fail
    cfg = TrialConfig.from_dict(config["cfg"] if "cfg" in config else _strip(config))
    import torch

    from search.trial.runner import run_trial

    ctx = tune.get_context()
    need = ctx.get_trial_resources().required_resources if ctx else {}
    torch.set_num_threads(max(1, int(need.get("CPU", 1))))
    gpu = float(need.get("GPU", 0))
    if 0 < gpu < 1 and torch.cuda.is_available():
        # Ray does not isolate GPU memory: a packed trial that outgrows its share fails alone
        # (and is retried) instead of pushing its neighbours out of memory.
        torch.cuda.set_per_process_memory_fraction(gpu)
    if cfg.data_dir and "://" in cfg.data_dir:
        from search.sweep.staging import stage_and_check

        # Once per node and version of the source, not per trial; the dataset's file check runs on this node's
        # copy (a node whose copy is bad fails its trials with one line naming the URI, issue 30)
        cfg = cfg.replace(data_dir=stage_and_check(cfg.data_dir, cfg.dataset))
    t0 = time.time()
    # The last epoch goes out with the final report below: one Tune iteration per epoch, so Optuna's
    # intermediate values and ASHA's rungs see `epochs` steps, not one more.
    result = run_trial(cfg, report=lambda m: tune.report(dict(m)) if m.get("epoch", 0) < cfg.epochs else None)
    last = result.history[-1] if result.history else {}
    final = {**{k: v for k, v in last.items()}, **result.summary(), "status": result.status,
             "config_hash": cfg.config_hash, "node_ip": _node_ip(), "node_id": _node_id(), "pid": os.getpid(),
             "started_at": t0, "ended_at": time.time(), "torch_threads": torch.get_num_threads(),
             "trial_result": json.dumps(result.to_dict()), "cfg_json": json.dumps(cfg.to_dict())}
    tune.report(final)


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - metadata only
        return ""


def _strip(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("__")}


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - metadata only
        return ""


class _Abort(tune.Stopper):
    """Stops the whole sweep once the one writer cannot write, or on SIGINT/SIGTERM.

    A failed write (disk full, a permission error on a part file) stops at the first one:
    every later result could not be recorded either.
    """

    def __init__(self, wait_s: float = 0.0) -> None:
        self.error: BaseException | None = None
        self.signal: str = ""  # "SIGINT" | "SIGTERM" once one arrived
        # The bound on waiting for resources: no trial started within wait_s seconds of the start.
        self.wait_s, self.t0, self.started, self.waited_out = wait_s, time.monotonic(), False, False

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        if self.wait_s > 0 and not self.started and time.monotonic() - self.t0 > self.wait_s:
            self.waited_out = True
        return self.error is not None or bool(self.signal) or self.waited_out


def _guarded(method: Any) -> Any:
    """A failed write in a tracking hook stops the sweep instead of raising through Tune.

    Tune logs and swallows callback errors and goes on training, so every later result
    would be thrown away; stopping keeps the traceback for the driver's log.
    """

    @functools.wraps(method)
    def wrapper(self: "TrackingCallback", *a: Any, **k: Any) -> Any:
        if self.abort.error is not None:
            return None
        try:
            return method(self, *a, **k)
        except BrokenPipeError:  # stdout's reader went away: SIGPIPE, a signal like the others, not a failed write
            from search.sweep.signals import mute_closed_outputs

            mute_closed_outputs()
            self.abort.signal = self.abort.signal or "SIGPIPE"
        except Exception as e:  # noqa: BLE001
            self.abort.error = e
            return None

    return wrapper


class TrackingCallback(tune.Callback):
    """The one writer: MLflow runs and Parquet rows, plus a line per finished trial."""

    def __init__(self, plan: SweepPlan, tracker: Tracker, abort: _Abort | None = None) -> None:
        self.plan, self.tracker = plan, tracker
        self.abort = abort or _Abort()
        self.runs: dict[str, str] = {}  # tune trial_id -> MLflow run id
        self.closed: set[str] = set()  # trial ids whose run is FINISHED/FAILED/KILLED
        self.history: dict[str, list[dict[str, float]]] = {}
        self.done = 0
        self.total = len(plan.configs) if plan.algo != "optuna" else plan.samples
        self.configs: dict[str, TrialConfig] = {}  # trial_id -> its parsed config, while it runs
        self.outcome = SweepOutcome()
        from search.sweep.progress import Progress, trial_cost

        epochs = {c.get("epochs") for c in plan.configs} | ({plan.overrides["epochs"]} if "epochs" in plan.overrides
                                                            else set())
        # Grid and random plans know every trial: the ETA weighs what is left by its cost (wide nets last).
        total_cost = sum(trial_cost({**c, **plan.overrides}) for c in plan.configs) if plan.algo != "optuna" else 0.0
        self.progress = Progress(f"{plan.space} ({plan.profile}, {plan.algo})", self.total,
                                 live=None if plan.verbose else False,
                                 epochs=epochs.pop() if len(epochs) == 1 and None not in epochs else 0,
                                 total_cost=total_cost)
        self.searcher: DedupSearcher | None = None  # optuna: told each trial's MLflow run (run_sweep sets it)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self.progress.tick()  # elapsed times and ETA move between events too

    def _cfg(self, trial: Any) -> TrialConfig:
        cfg = self.configs.get(trial.trial_id)
        if cfg is None:  # parsed (validated, hashed) once per trial, not once per event
            c = trial.config
            cfg = self.configs[trial.trial_id] = TrialConfig.from_dict(c["cfg"] if "cfg" in c else _strip(c))
        return cfg

    def _forget(self, trial: Any) -> None:
        """Drop what this trial held once its result is recorded: the driver's memory stays flat in the trial count.

        Tune keeps every trial's last result for the whole sweep (and writes them into its experiment state);
        the final one carries the whole TrialResult as JSON (~50 KB for 50 BN layers), which MLflow and
        Parquet now hold, so only the summary metrics stay with Tune.
        """
        last = getattr(trial, "last_result", None)
        if isinstance(last, dict):
            for key in ("trial_result", "cfg_json"):
                last.pop(key, None)
        self.history.pop(trial.trial_id, None)
        self.configs.pop(trial.trial_id, None)

    def kill_open_runs(self) -> int:
        """Close the runs of trials an interrupt stopped as KILLED (status tag `killed`); returns how many."""
        n = 0
        for trial_id, run_id in self.runs.items():
            if trial_id not in self.closed:
                self.tracker.client.set_tag(run_id, "status", "killed")
                self.tracker.client.set_terminated(run_id, status="KILLED")
                self.closed.add(trial_id)
                n += 1
        return n

    @_guarded
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.abort.started = True  # Tune calls this once the trial's actor holds its resources
        if self.abort.signal:
            return
        if trial.trial_id not in self.runs:  # a retried trial keeps its run
            self.runs[trial.trial_id] = self.tracker.start(self._cfg(trial), trial_id=trial.trial_id,
                                                           algo=self.plan.algo)
            if self.searcher is not None:
                self.searcher.link(self._cfg(trial).config_hash, self.runs[trial.trial_id])
        from search.sweep.progress import trial_cost
        from search.sweep.tracking import run_name

        self.progress.started(trial.trial_id, run_name(self._cfg(trial)),
                              cost=trial_cost(self._cfg(trial).to_dict()) if self.progress.total_cost else 0.0)
        self.history[trial.trial_id] = []

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "trial_result" not in result and "epoch" in result:
            self.history.setdefault(trial.trial_id, []).append(
                {k: float(result[k]) for k in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc",
                                                "lr", "epoch_time_s", "throughput") if k in result})
            self.progress.epoch(trial.trial_id, int(result["epoch"]), result.get("test_acc"))

    @_guarded
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        cfg = self._cfg(trial)
        if self.abort.signal and "trial_result" not in last:
            return  # stopped by the interrupt, not a result: closed as KILLED by the driver
        if "trial_result" in last:
            result = TrialResult.from_dict(json.loads(last["trial_result"]))
        else:  # stopped early by the scheduler: keep the epochs it did
            hist = self.history.get(trial.trial_id, [])
            result = TrialResult(status="stopped", history=hist, epochs_completed=len(hist))
            if hist:
                result.test_acc, result.test_loss = hist[-1].get("test_acc", float("nan")), hist[-1].get("test_loss")
        tags = {k: str(last.get(k, "")) for k in ("node_ip", "node_id", "pid", "torch_threads")}
        tags.update({k: _iso(last.get(k)) for k in ("started_at", "ended_at")})  # ISO 8601, UTC, as people read
        tags["device"] = result.device
        tags["tune_iterations"] = str(last.get("training_iteration", ""))  # Tune's count: one per epoch
        self.tracker.finish(self._run(trial, cfg), cfg, result, extra_tags=tags)
        self.closed.add(trial.trial_id)
        self._line(cfg, result, trial.trial_id)
        self._forget(trial)

    @_guarded
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.abort.signal:
            return  # a worker that died of the same Ctrl-C: interrupted, not failed
        cfg = self._cfg(trial)
        err = _error_line(trial)
        hist = self.history.get(trial.trial_id, [])
        result = TrialResult(status="failed", error=err, history=hist, epochs_completed=len(hist))
        self.tracker.finish(self._run(trial, cfg), cfg, result)
        self.closed.add(trial.trial_id)
        self._line(cfg, result, trial.trial_id)
        self._forget(trial)

    def _run(self, trial: Any, cfg: TrialConfig) -> str:
        if trial.trial_id not in self.runs:
            self.runs[trial.trial_id] = self.tracker.start(cfg, trial_id=trial.trial_id, algo=self.plan.algo)
        return self.runs[trial.trial_id]

    def _line(self, cfg: TrialConfig, r: TrialResult, trial_id: str = "") -> None:
        self.done += 1
        self.outcome.statuses[r.status] = self.outcome.statuses.get(r.status, 0) + 1
        if r.status == "failed" and not self.outcome.first_error:
            self.outcome.first_error = r.error or "trial raised"
        from search.sweep.tracking import run_name

        if r.status == "failed":
            msg = f"FAILED: {r.error}"
        else:
            msg = (f"{r.status}  acc {r.test_acc:.3f} -> {r.test_acc_reest:.3f} after BN re-est.  "
                   f"shift mean {r.mean_shift:.3f} max {r.max_shift:.3f}  {r.wall_time_s:.0f}s")
        self.progress.finished(trial_id, r.status, f"{run_name(cfg)}: {msg}")


def _iso(epoch: Any) -> str:
    """A Unix time as ISO 8601 in UTC to the millisecond (2026-12-06T20:44:01.123+00:00); '' when unknown."""
    import datetime as dt

    if not isinstance(epoch, (int, float)) or not math.isfinite(epoch):
        return ""
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="milliseconds")


def _error_line(trial: Any) -> str:
    path = getattr(trial, "error_file", None) or ""
    text = ""
    try:
        text = open(path).read() if path and os.path.exists(path) else str(getattr(trial, "error_msg", "") or "")
    except OSError:
        pass
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "trial raised")[:1000]


class PlannedSearcher(Searcher):
    """Hands Tune the planned configurations of a grid or random sweep, one per trial, in order.

    Tune's `grid_search` over a list of whole configurations deep-copies that list for every trial it
    creates (ray.tune.search.variant_generator._grid_search_generator), so a sweep's set-up grew with the
    square of its size: 0.65 ms a trial at 100 trials, 9 ms at 1,000, 66 ms at 10,000 (11 driver minutes;
    docs/performance.md).
    Here each trial costs one list index. Nothing is pickled into Tune's experiment state: a sweep resumes
    from MLflow (`--resume`), never from Tune's checkpoint.
    """

    def __init__(self, configs: list[dict[str, Any]], *, metric: str, mode: str) -> None:
        super().__init__(metric=metric, mode=mode)
        self.configs, self.next = configs, 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.next >= len(self.configs):
            return Searcher.FINISHED
        self.next += 1
        return {"cfg": self.configs[self.next - 1]}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        return None

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        return None


class DefineByRun:
    """Optuna's define-by-run space for a Space; a module-level class so Tune can checkpoint it."""

    def __init__(self, space: str, profile: str, overrides: dict[str, Any]) -> None:
        self.space, self.profile, self.overrides = space, profile, dict(overrides)

    def __call__(self, trial: Any) -> dict[str, Any]:
        from spaces import get_space

        config = {**get_space(self.space).suggest(trial, self.profile), **self.overrides}
        # optuna-dashboard shows user attributes per trial: the proposal's config hash (seed as proposed)
        # and, once its run exists, the MLflow run id (DedupSearcher.link, by config hash).
        trial.set_user_attr("config_hash", TrialConfig.from_dict(config).config_hash)
        return config


def optuna_db_path(storage: str, space: str) -> str:
    """Where a sweep's Optuna study lives: <storage>/<space>/optuna.db (a local file even for a remote storage)."""
    return os.path.join(_local_root(storage), space, "optuna.db")


class DedupSearcher(Searcher):
    """Wraps a searcher (Optuna) so that no configuration is trained twice, and seeds are averaged.

    Each proposal of the inner searcher is expanded into its seeded configurations
    (seeds 0..N-1, or the proposal as is when N = 1). One whose config_hash (seed included)
    finished before, or is running in this sweep, gets no Tune trial: its score is reported
    back to the inner searcher (at once, or when the running one completes). The inner searcher
    is told the mean test accuracy over a proposal's seeds; a proposal with a failed seed is
    told FAIL. So Tune's trial count is exactly what trains: the progress counter is true.

    After `max_repeats` proposals in a row that bring nothing new (a small space the searcher
    has exhausted), suggest() returns FINISHED and the sweep ends early.

    Each proposal's Optuna trial is told what it is, as user attributes: `mlflow_run_id` (and
    `mlflow_run_ids`, one per seed) of the runs its score comes from, set when a run starts (`link`)
    and before its value is told; a proposal that trained nothing itself also gets `reused_from`
    (the run it reuses) and, when an earlier trial of this sweep proposed the same configuration,
    `duplicate_of` (that trial's number): optuna-dashboard can tell a configuration from its repeats.
    """

    def __init__(self, inner: Searcher, *, metric: str, mode: str, seeds: int = 1,
                 known: dict[str, float] | None = None, max_repeats: int = 100,
                 run_ids: dict[str, str] | None = None) -> None:
        super().__init__(metric=metric, mode=mode)
        self.inner, self.seeds, self.max_repeats = inner, max(1, seeds), max_repeats
        self.known: dict[str, float] = dict(known or {})  # config_hash -> score (nan: failed / no score)
        self.run_ids: dict[str, str] = dict(run_ids or {})  # config_hash -> its MLflow run (finished or started)
        self.owner: dict[str, str] = {}  # config_hash -> the proposal that queued it for training
        self.first: dict[tuple[str, ...], str] = {}  # a proposal's seeded hashes -> the first proposal of them
        self.user_attrs: dict[str, dict[str, Any]] = {}  # proposal -> the user attributes told to its trial
        self.running: dict[str, str] = {}  # config_hash -> Tune trial id training it
        self.trial_hash: dict[str, str] = {}  # Tune trial id -> config_hash
        self.queue: list[tuple[str, dict[str, Any]]] = []  # seeded configs waiting for a Tune trial
        self.proposals: dict[str, list[str]] = {}  # inner trial id -> its seeded config hashes
        self.waiting: dict[str, set[str]] = {}  # config_hash -> inner trial ids waiting for its score
        self.repeats = 0  # proposals answered without training (duplicates)
        self.exhausted = False

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        import uuid

        streak = 0
        while not self.queue:
            if streak >= self.max_repeats:
                self.exhausted = True
                return Searcher.FINISHED
            pid = f"proposal-{uuid.uuid4().hex[:12]}"
            params = self.inner.suggest(pid)
            if params is None or params == Searcher.FINISHED:
                return params
            hashes, queued = [], {h for h, _ in self.queue}
            for seed in range(self.seeds):
                cfg = {**params, **({"seed": seed} if self.seeds > 1 else {})}
                h = TrialConfig.from_dict(cfg).config_hash
                hashes.append(h)
                if h not in self.known and h not in self.running and h not in queued:
                    self.queue.append((h, cfg))
                    queued.add(h)
                    self.owner[h] = pid
            self.proposals[pid] = hashes
            self.first.setdefault(tuple(hashes), pid)
            for h in hashes:
                self.waiting.setdefault(h, set()).add(pid)
            if not self.queue:
                streak += 1
                self.repeats += 1
            self._maybe_tell(pid)
        h, cfg = self.queue.pop(0)
        self.running[h], self.trial_hash[trial_id] = trial_id, h
        return cfg

    def link(self, config_hash: str, run_id: str) -> None:
        """The MLflow run training `config_hash` exists: its proposal's trial carries the run id from now on."""
        self.run_ids[config_hash] = run_id
        pid = self.owner.get(config_hash)
        if pid is not None and pid in self.proposals:
            self._tell_attrs(pid, self._run_attrs(self.proposals[pid]))

    def _run_attrs(self, hashes: list[str]) -> dict[str, Any]:
        ids = [self.run_ids[h] for h in hashes if h in self.run_ids]
        return {"mlflow_run_id": ids[0], "mlflow_run_ids": ids} if ids else {}

    def _tell_attrs(self, pid: str, attrs: dict[str, Any]) -> None:
        """Record `attrs` for the proposal and set them on its Optuna trial (OptunaSearch keeps it until told)."""
        if not attrs:
            return
        self.user_attrs.setdefault(pid, {}).update(attrs)
        trial = getattr(self.inner, "_ot_trials", {}).get(pid)
        if trial is not None:
            for k, v in attrs.items():
                trial.set_user_attr(k, v)

    def _maybe_tell(self, pid: str) -> None:
        hashes = self.proposals.get(pid)
        if hashes is None or any(h not in self.known for h in hashes):
            return
        scores = [self.known[h] for h in hashes]
        attrs = self._run_attrs(hashes)
        if not any(self.owner.get(h) == pid for h in hashes):  # trained nothing itself: a reused result
            attrs["reused_from"] = attrs.get("mlflow_run_id", "")
            first = self.first.get(tuple(hashes))
            trial = getattr(self.inner, "_ot_trials", {}).get(first) if first not in (None, pid) else None
            if first not in (None, pid):
                attrs["duplicate_of"] = trial.number if trial is not None else first
        self._tell_attrs(pid, attrs)
        del self.proposals[pid]
        for h in hashes:
            self.waiting.get(h, set()).discard(pid)
        if all(math.isfinite(v) for v in scores):
            self.inner.on_trial_complete(pid, {self.metric: sum(scores) / len(scores)})
        else:
            self.inner.on_trial_complete(pid, None, error=True)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return None  # the objective is the mean over seeds, known only at the end

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        h = self.trial_hash.pop(trial_id, None)
        if h is None:
            return
        self.running.pop(h, None)
        v = (result or {}).get(self.metric)
        self.known[h] = float(v) if not error and isinstance(v, (int, float)) else float("nan")
        for pid in list(self.waiting.pop(h, ())):
            self._maybe_tell(pid)

    def save(self, checkpoint_path: str) -> None:
        self.inner.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.inner.restore(checkpoint_path)


def _search_alg(plan: SweepPlan, metric: str, mode: str) -> DedupSearcher | None:
    if plan.algo != "optuna":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from search.sweep.progress import quiet_libraries
    from search.sweep.sampler import StepRoundingTPE

    quiet_libraries()  # Optuna's ExperimentalWarning (set_metric_names) off the terminal
    define_by_run = DefineByRun(plan.space, plan.profile, plan.overrides)

    store = os.path.join(_local_root(plan.storage), plan.space)
    os.makedirs(store, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{os.path.join(store, 'optuna.db')}")
    # Created here, then loaded by OptunaSearch: the stored metric name is what optuna-dashboard shows
    # for the objective (instead of "Objective 0").
    study_name = plan.study_name or f"{plan.space}-{plan.profile}"
    study = optuna.create_study(storage=storage, study_name=study_name, direction=f"{mode}imize",
                                load_if_exists=True)
    study.set_metric_names([metric])
    # optuna-dashboard shows the study's user attributes: what it searched and where its runs are.
    for k, v in {"space": plan.space, "profile": plan.profile, "mlflow_experiment": plan.space,
                 "mlflow_tracking_uri": plan.tracking_uri, "seeds_per_proposal": plan.seeds}.items():
        study.set_user_attr(k, v)
    inner = OptunaSearch(space=define_by_run, metric=metric, mode=mode, storage=storage,
                         study_name=study_name, sampler=StepRoundingTPE(seed=plan.seed))
    known = {h: plan.scores.get(h, float("nan")) for h in plan.finished}
    return DedupSearcher(inner, metric=metric, mode=mode, seeds=plan.seeds, known=known, run_ids=plan.finished)


def _local_root(storage: str) -> str:
    if "://" in storage and not storage.startswith("file://"):
        # Optuna's RDB file needs a local disk; keep it beside the driver.
        return os.path.abspath("results")
    return os.path.abspath(storage.replace("file://", ""))


def run_sweep(plan: SweepPlan, tracker: Tracker) -> SweepOutcome:
    """Run the planned trials with Ray Tune.

    Returns:
        What this sweep trained (statuses, the first failure).

    Raises:
        Interrupted: SIGINT/SIGTERM arrived; the running trials' runs are closed as KILLED.
        ResourceWait: `plan.resource_wait_s` passed and no trial had started (the cluster never fit one).
        OSError: ENOSPC, the disk filled up while recording results.
        SweepFailed: another error while recording results (the sweep stopped at the first).
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    metric, mode = "test_acc", "max"
    abort = _Abort(plan.resource_wait_s)
    resources = {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial}
    fn = tune.with_resources(trainable, resources)
    scheduler = (ASHAScheduler(time_attr="training_iteration", grace_period=1, reduction_factor=2)
                 if plan.scheduler == "asha" else FIFOScheduler())
    search_alg = _search_alg(plan, metric, mode)
    tune_config = tune.TuneConfig(
        metric=metric, mode=mode, num_samples=plan.samples if plan.algo == "optuna" else len(plan.configs),
        scheduler=scheduler, search_alg=search_alg or PlannedSearcher(plan.configs, metric=metric, mode=mode),
        max_concurrent_trials=plan.max_concurrent or None, reuse_actors=True)
    storage = plan.storage if "://" in plan.storage else os.path.abspath(plan.storage)
    callback = TrackingCallback(plan, tracker, abort)
    callback.searcher = search_alg
    run_config = tune.RunConfig(
        name=f"{plan.space}-{plan.profile}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=f"{storage.rstrip('/')}/{plan.space}/ray",
        callbacks=[callback], stop=abort,
        failure_config=tune.FailureConfig(max_failures=plan.retries),
        # Tune's own status table stays off: search.sweep.progress draws the display (plan.verbose: live block).
        verbose=0, log_to_file=True)
    # Ray's newer output engine prints its "Configuration for experiment" box, the results path and a TensorBoard
    # hint even at verbose=0; the legacy engine at verbosity 0 prints nothing (ray/tune/experimental/output.py).
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # Tune's own per-trial loggers (result.json, progress.csv, TensorBoard events) copy every report, the
    # final one with the whole TrialResult, into a folder per trial: ~160 KB and 5 files a trial that
    # nothing reads (MLflow and Parquet are the record; benchmarks/control_plane.py, docs/performance.md).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # ...so the ExperimentAnalysis Tune builds at the end of fit() finds no per-trial files to read back and says so,
    # once per trial, as a warning about files deliberately not written (it also used to read all of them back).
    import logging

    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # Tune's experiment state (every trial so far, saved again and again) is for restoring a Tune run, which a
    # sweep never does: at most one save every 10 minutes instead of Tune's "auto" (up to 5% of the wall time).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "600")
    if search_alg is None and "TUNE_MAX_PENDING_TRIALS_PG" not in os.environ:
        # Tune queues one pending trial for any searcher but its own grid/random generator (200, or 1.1 x the
        # cluster's CPUs): PlannedSearcher's trials get the grid's queue, or they start one at a time and
        # fractional-GPU trials never fill the GPUs (tests/test_cluster.py packs 8 on 2).
        import ray

        os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(max(200, int(ray.cluster_resources().get("CPU", 1.0) * 1.1)))
    tuner = tune.Tuner(fn, tune_config=tune_config, run_config=run_config)
    with _stop_on_signals(abort):
        try:
            tuner.fit()
        finally:
            callback.progress.close()
    callback.outcome.exhausted = bool(search_alg and search_alg.exhausted)
    if abort.signal:
        killed = callback.kill_open_runs()
        raise Interrupted(abort.signal, f"{callback.done} trial(s) finished and kept, {killed} running trial(s) "
                          "closed as KILLED")
    if abort.waited_out:
        raise ResourceWait(f"no trial could start within --resource-wait {plan.resource_wait_s:g} s: the cluster "
                           f"never offered {plan.cpus_per_trial:g} CPU + {plan.gpus_per_trial:g} GPU on one node "
                           "(`ray status` shows its nodes and pending demands); nothing was trained")
    if abort.error is not None:
        from search.sweep.lock import disk_full

        first = (str(abort.error).strip().splitlines() or [""])[0][:300]
        if disk_full(abort.error):
            raise OSError(errno.ENOSPC, f"the disk is full while recording results ({first}); free space, then "
                          "rerun with --resume") from abort.error
        raise SweepFailed(f"recording a result failed, so the sweep stopped at the first failed write "
                          f"({type(abort.error).__name__}: {first})") from abort.error
    return callback.outcome


class _stop_on_signals:
    """While Tune's loop runs, the first signal of any kind that would end the driver (SIGINT, SIGTERM, SIGHUP,
    SIGQUIT, SIGUSR1/2, SIGPIPE) stops the tuner through the stopper instead of killing the driver mid-write;
    a second one raises at once (`search.sweep.signals.DriverSignals`, which search.run installs for the
    driver's whole life; outside search.run it is installed here for the loop only).

    Tune's own SIGINT handler ends the loop but returns as if the sweep were done, and a
    SIGTERM reached Ray's C++ handler (a core dump, exit 134).
    """

    def __init__(self, abort: _Abort) -> None:
        from search.sweep.signals import DriverSignals

        self.own = DriverSignals.active is None
        self.guard = DriverSignals() if self.own else DriverSignals.active
        self.stopping = self.guard.stopping(abort)

    def __enter__(self) -> "_stop_on_signals":
        self.stopping.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.__exit__(*exc)
        if self.own:
            self.guard.restore()
