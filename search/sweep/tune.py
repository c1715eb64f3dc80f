"""The Ray Tune driver: trials scheduled by Tune, searched by grid, random or Optuna.

The trainable runs `run_trial` on a worker and reports per-epoch metrics; a
Tune callback in the driver is the single writer to MLflow and Parquet.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ray import tune

from search.config import TrialConfig
from search.results import TrialResult
from search.sweep.tracking import Tracker

__all__ = ["SweepPlan", "run_sweep", "trainable"]


@dataclass
class SweepPlan:
    """Everything the driver needs, resolved and validated by `search.run`."""

    space: str
    profile: str
    algo: str  # grid | random | optuna
    configs: list[dict[str, Any]]  # grid/random: the trials to run (already de-duplicated)
    samples: int = 0  # optuna: trials to ask for
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    scheduler: str = "fifo"  # fifo | asha
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0
    retries: int = 1
    storage: str = "results"
    tracking_uri: str = "sqlite:///mlflow.db"
    finished: dict[str, str] = field(default_factory=dict)  # config_hash -> run_id already done
    verbose: int = 1


def trainable(config: dict[str, Any], reused: dict[str, float] | None = None) -> None:
    """Tune function trainable: one trial; the last report carries the whole result.

    `reused` maps config hashes that already finished to their test accuracy: a
    searcher (Optuna) that proposes one of them is told its score, nothing trains.
    """
    cfg = TrialConfig.from_dict(config["cfg"] if "cfg" in config else _strip(config))
    if reused and cfg.config_hash in reused:
        tune.report({"test_acc": reused[cfg.config_hash], "reused": True})
        return
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
        from search.sweep.staging import stage_data_dir

        cfg = cfg.replace(data_dir=stage_data_dir(cfg.data_dir))  # once per node, not per trial
    t0 = time.time()
    result = run_trial(cfg, report=lambda m: tune.report(dict(m)))
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
    """Stops the whole sweep once the one writer cannot write (disk full): nothing else can be recorded."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.error is not None


def _guarded(method: Any) -> Any:
    """A full disk in a tracking hook stops the sweep instead of raising through Tune."""

    @functools.wraps(method)
    def wrapper(self: "TrackingCallback", *a: Any, **k: Any) -> Any:
        if self.abort.error is not None:
            return None
        try:
            return method(self, *a, **k)
        except Exception as e:  # noqa: BLE001
            from search.sweep.lock import disk_full

            if not disk_full(e):
                raise
            self.abort.error = e
            return None

    return wrapper


class TrackingCallback(tune.Callback):
    """The one writer: MLflow runs and Parquet rows, plus a line per finished trial."""

    def __init__(self, plan: SweepPlan, tracker: Tracker, abort: _Abort | None = None) -> None:
        self.plan, self.tracker = plan, tracker
        self.abort = abort or _Abort()
        self.runs: dict[str, str] = {}  # tune trial_id -> MLflow run id
        self.history: dict[str, list[dict[str, float]]] = {}
        self.done = 0
        self.total = len(plan.configs) or plan.samples
        self.meta: dict[str, dict[str, Any]] = {}  # trial_id -> node/pid/time of the final report

    def _cfg(self, trial: Any) -> TrialConfig:
        c = trial.config
        return TrialConfig.from_dict(c["cfg"] if "cfg" in c else _strip(c))

    def _reused(self, trial: Any) -> bool:
        return self._cfg(trial).config_hash in self.plan.finished

    @_guarded
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self._reused(trial):  # its finished run stays the record; no new run
            return
        if trial.trial_id not in self.runs:  # a retried trial keeps its run
            self.runs[trial.trial_id] = self.tracker.start(self._cfg(trial), trial_id=trial.trial_id,
                                                           algo=self.plan.algo)
        self.history[trial.trial_id] = []

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "trial_result" not in result and "epoch" in result:
            self.history.setdefault(trial.trial_id, []).append(
                {k: float(result[k]) for k in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc",
                                                "lr", "epoch_time_s", "throughput") if k in result})

    @_guarded
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        cfg = self._cfg(trial)
        if self._reused(trial):
            self.done += 1
            print(f"[{self.done}/{self.total}] {cfg.config_hash}: already finished, result reused", flush=True)
            return
        if "trial_result" in last:
            result = TrialResult.from_dict(json.loads(last["trial_result"]))
            self.meta[trial.trial_id] = {k: last.get(k) for k in ("node_ip", "node_id", "pid", "started_at",
                                                                  "ended_at")}
        else:  # stopped early by the scheduler: keep the epochs it did
            hist = self.history.get(trial.trial_id, [])
            result = TrialResult(status="stopped", history=hist, epochs_completed=len(hist))
            if hist:
                result.test_acc, result.test_loss = hist[-1].get("test_acc", float("nan")), hist[-1].get("test_loss")
        tags = {k: str(last.get(k, "")) for k in ("node_ip", "node_id", "pid", "started_at", "ended_at",
                                                   "torch_threads")}
        tags["device"] = result.device
        self.tracker.finish(self._run(trial, cfg), cfg, result, extra_tags=tags)
        self._line(cfg, result)

    @_guarded
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        cfg = self._cfg(trial)
        err = _error_line(trial)
        hist = self.history.get(trial.trial_id, [])
        result = TrialResult(status="failed", error=err, history=hist, epochs_completed=len(hist))
        self.tracker.finish(self._run(trial, cfg), cfg, result)
        self._line(cfg, result)

    def _run(self, trial: Any, cfg: TrialConfig) -> str:
        if trial.trial_id not in self.runs:
            self.runs[trial.trial_id] = self.tracker.start(cfg, trial_id=trial.trial_id, algo=self.plan.algo)
        return self.runs[trial.trial_id]

    def _line(self, cfg: TrialConfig, r: TrialResult) -> None:
        self.done += 1
        what = (f"{cfg.backbone} d={cfg.depth} w={cfg.width:g} {cfg.dropout_placement}"
                + ("" if cfg.dropout_placement == "none" else f"/{cfg.dropout_type}@{cfg.dropout_rate:g}")
                + f" seed={cfg.seed}")
        if r.status == "failed":
            msg = f"FAILED: {r.error}"
        else:
            msg = (f"{r.status}  acc {r.test_acc:.3f} -> {r.test_acc_reest:.3f} after BN re-est.  "
                   f"shift mean {r.mean_shift:.3f} max {r.max_shift:.3f}  {r.wall_time_s:.0f}s")
        print(f"[{self.done}/{self.total}] {what}: {msg}", flush=True)


def _error_line(trial: Any) -> str:
    path = getattr(trial, "error_file", None) or ""
    text = ""
    try:
        text = open(path).read() if path and os.path.exists(path) else str(getattr(trial, "error_msg", "") or "")
    except OSError:
        pass
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "trial raised")[:1000]


class DefineByRun:
    """Optuna's define-by-run space for a Space; a module-level class so Tune can checkpoint it."""

    def __init__(self, space: str, profile: str, overrides: dict[str, Any]) -> None:
        self.space, self.profile, self.overrides = space, profile, dict(overrides)

    def __call__(self, trial: Any) -> dict[str, Any]:
        from spaces import get_space

        return {**get_space(self.space).suggest(trial, self.profile), **self.overrides}


def _search_alg(plan: SweepPlan, metric: str, mode: str) -> Any:
    if plan.algo != "optuna":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    define_by_run = DefineByRun(plan.space, plan.profile, plan.overrides)

    store = os.path.join(_local_root(plan.storage), plan.space)
    os.makedirs(store, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{os.path.join(store, 'optuna.db')}")
    return OptunaSearch(space=define_by_run, metric=metric, mode=mode, storage=storage,
                        study_name=f"{plan.space}-{plan.profile}",
                        sampler=optuna.samplers.TPESampler(seed=plan.seed))


def _local_root(storage: str) -> str:
    if "://" in storage and not storage.startswith("file://"):
        # Optuna's RDB file needs a local disk; keep it beside the driver.
        return os.path.abspath("results")
    return os.path.abspath(storage.replace("file://", ""))


def _reused_scores(plan: SweepPlan, tracker: Tracker) -> dict[str, float]:
    """config_hash -> test accuracy of the trials that already finished (for Optuna's proposals)."""
    if plan.algo != "optuna" or not plan.finished:
        return {}
    t = tracker.store.read("trials")
    acc = dict(zip(t.column("config_hash").to_pylist(), t.column("test_acc").to_pylist()))
    return {h: float(acc.get(h, float("nan"))) for h in plan.finished}


def _reporter(plan: SweepPlan) -> Any:
    """A compact live table: the axes that vary and the headline metrics, every 20 s."""
    from ray.tune import CLIReporter

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the classic reporter honours column choices
    prefix = "" if plan.algo == "optuna" else "cfg/"
    params = {f"{prefix}{k}": short for k, short in (
        ("backbone", "backbone"), ("width", "width"), ("dropout_placement", "placement"),
        ("dropout_type", "type"), ("dropout_rate", "rate"), ("seed", "seed"))}
    metrics = {"epoch": "epoch", "train_loss": "train loss", "test_acc": "test acc", "throughput": "img/s"}
    return CLIReporter(parameter_columns=params, metric_columns=metrics, max_report_frequency=20,
                       max_progress_rows=30, sort_by_metric=False)


def run_sweep(plan: SweepPlan, tracker: Tracker) -> Any:
    """Run the planned trials with Ray Tune; returns Tune's ResultGrid."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    metric, mode = "test_acc", "max"
    abort = _Abort()
    resources = {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial}
    fn = tune.with_resources(tune.with_parameters(trainable, reused=_reused_scores(plan, tracker)), resources)
    if plan.algo == "optuna":
        param_space: dict[str, Any] = {}
        num_samples = plan.samples
    else:
        param_space = {"cfg": tune.grid_search(plan.configs)}
        num_samples = 1
    scheduler = (ASHAScheduler(time_attr="training_iteration", grace_period=1, reduction_factor=2)
                 if plan.scheduler == "asha" else FIFOScheduler())
    tune_config = tune.TuneConfig(
        metric=metric, mode=mode, num_samples=num_samples, scheduler=scheduler,
        search_alg=_search_alg(plan, metric, mode), max_concurrent_trials=plan.max_concurrent or None,
        reuse_actors=True)
    storage = plan.storage if "://" in plan.storage else os.path.abspath(plan.storage)
    run_config = tune.RunConfig(
        progress_reporter=_reporter(plan),
        name=f"{plan.space}-{plan.profile}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=f"{storage.rstrip('/')}/{plan.space}/ray",
        callbacks=[TrackingCallback(plan, tracker, abort)], stop=abort,
        failure_config=tune.FailureConfig(max_failures=plan.retries),
        verbose=plan.verbose, log_to_file=True)
    tuner = tune.Tuner(fn, param_space=param_space, tune_config=tune_config, run_config=run_config)
    grid = tuner.fit()
    if abort.error is not None:
        first = (str(abort.error).strip().splitlines() or [""])[0][:300]
        raise OSError(errno.ENOSPC, f"the disk is full while recording results ({first}); free space, then rerun "
                      "with --resume")
    return grid

