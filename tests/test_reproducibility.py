"""Reproducibility: one config and seed give the same numbers, bit for bit, and every run
records what it needs to be reproduced (config hash, package versions).

- `search.trial.run_trial` run twice in separate processes (different PYTHONHASHSEED) gives
  the same TrialResult JSON, per-layer shifts included; only timings may differ.
- A trial inside a sweep (Ray worker, 1 CPU -> 1 torch thread) gives the same numbers as
  run_trial in a plain process with one thread.
- Every MLflow run carries config_hash (recomputable from its params) and version.* tags.

CPU only. The number of torch threads changes float summation order, so results are
reproducible for a given thread count (docs/reliability.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
TIMINGS = {"wall_time_s", "train_time_s", "probe_time_s", "throughput", "epoch_time_s"}
# The smoke space forced to one dropout: 2 configurations (its 'none' row keeps rate 0).
SWEEP_ARGS = ["--space", "smoke", "--set", "dropout_placement=pre_bn", "--set", "dropout_type=gaussian",
              "--set", "epochs=2", "--set", "train_samples=128", "--num-cpus", "2", "--quiet"]

_RUN_TRIAL = r'''
import json, sys
import torch
torch.set_num_threads(1)
from search.config import TrialConfig
from search.trial.runner import run_trial
cfg = TrialConfig.from_dict(json.loads(sys.argv[1]))
result = run_trial(cfg)
print(json.dumps({"config_hash": cfg.config_hash, "result": result.to_dict()}))
'''


def _config() -> dict[str, Any]:
    """The smoke space's pre_bn/gaussian/0.5 trial with the sweep's overrides (as the CLI builds it)."""
    from search.config import TrialConfig
    from spaces import get_space

    (d,) = [d for d in get_space("smoke").grid("quick")
            if (d["dropout_placement"], d["dropout_type"]) == ("pre_bn", "gaussian")]
    return TrialConfig.from_dict({**d, "epochs": 2, "train_samples": 128}).to_dict()


def _strip(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in TIMINGS}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBN_")}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}, **extra)
    return env


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """run_trial of one config in two fresh processes at once, with different hash seeds."""
    cwd = tmp_path_factory.mktemp("repro")
    blob = json.dumps(_config())
    procs = [subprocess.Popen([PY, "-c", _RUN_TRIAL, blob], cwd=cwd, env=_env(PYTHONHASHSEED=seed),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in ("0", "12345")]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_same_config_and_seed_give_identical_results(two_runs: list[dict[str, Any]]) -> None:
    a, b = (_strip(r["result"]) for r in two_runs)
    assert a["status"] == "ok" and len(a["layers"]) == 7 and len(a["history"]) == 2
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # bit for bit, NaNs included
    assert [x["shift"] for x in a["layers"]] == [x["shift"] for x in b["layers"]]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_config_hash_is_stable_across_processes(two_runs: list[dict[str, Any]]) -> None:
    from search.config import TrialConfig

    assert two_runs[0]["config_hash"] == two_runs[1]["config_hash"] == TrialConfig.from_dict(_config()).config_hash


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("repro-sweep")
    out = subprocess.run([PY, "-m", "search.run", *SWEEP_ARGS], cwd=cwd, env=_env(), capture_output=True, text=True,
                         timeout=400, start_new_session=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return cwd


def _runs(cwd: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    # Trial runs only: each sweep also has a parent run (run_kind = sweep) holding its summary.
    return [r for r in client.search_runs([exp.experiment_id], max_results=100)
            if r.data.tags.get("run_kind") != "sweep"]


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_every_run_stores_its_config_hash_and_package_versions(sweep: Path) -> None:
    import dataclasses

    import pyarrow.dataset as ds

    from search.config import TrialConfig, parse_value

    types = {f.name: str(f.type) for f in dataclasses.fields(TrialConfig)}
    runs = _runs(sweep)
    assert len(runs) == 2
    for r in runs:
        tags = r.data.tags
        cfg = TrialConfig.from_dict({k: parse_value(k, types[k], v) for k, v in r.data.params.items()})
        assert tags["config_hash"] == cfg.config_hash  # the params alone rebuild the hash
        for pkg in ("torch", "timm", "ray", "mlflow", "torchvision", "optuna", "numpy"):
            assert tags[f"version.{pkg}"] == metadata.version(pkg), pkg
    trials = ds.dataset(str(sweep / "results" / "smoke" / "trials"), format="parquet").to_table()
    assert sorted(trials.column("config_hash").to_pylist()) == sorted(r.data.tags["config_hash"] for r in runs)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_sweep_trial_reproduces_a_standalone_run(sweep: Path, two_runs: list[dict[str, Any]]) -> None:
    """The trial the sweep ran on a Ray worker equals run_trial in a plain process, bit for bit."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    ref = two_runs[0]
    (run,) = [r for r in _runs(sweep) if r.data.tags["config_hash"] == ref["config_hash"]]
    res = ref["result"]
    m = run.data.metrics
    for key in ("test_acc", "test_loss", "test_acc_reest", "test_loss_reest", "mean_shift", "max_shift",
                "mean_shift_fed", "mean_shift_reest", "train_loss", "train_acc"):
        assert m[key] == res[key], (key, m[key], res[key])
    layers = ds.dataset(str(sweep / "results" / "smoke" / "layers"), format="parquet").to_table()
    mine = layers.filter(pc.equal(layers.column("run_id"), run.info.run_id)).sort_by("index").to_pylist()
    assert [(x["name"], x["shift"], x["moving_var"], x["real_var"]) for x in mine] == \
        [(x["name"], x["shift"], x["moving_var"], x["real_var"]) for x in res["layers"]]


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_runs_record_what_else_changes_the_numbers(sweep: Path) -> None:
    """Beyond the config: the code version, the Python version and the torch thread count (1 vs 2
    threads give different numbers on CPU) must be on the run to reproduce it."""
    import platform

    missing = []
    for r in _runs(sweep):
        tags = r.data.tags
        if tags.get("version.python") != platform.python_version():
            missing.append("version.python")
        if tags.get("version.dropout-bn-ablate") != metadata.version("dropout-bn-ablate"):
            missing.append("version.dropout-bn-ablate")
        if tags.get("torch_threads") != "1":  # 1 CPU per trial -> 1 thread (search.sweep.tune.trainable)
            missing.append("torch_threads")
    assert not missing, f"runs lack tags: {sorted(set(missing))}"
