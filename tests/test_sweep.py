"""End-to-end sweeps through the real CLI on a local Ray of 2 CPUs.

Each sweep runs in a subprocess (its own Ray, shut down when it exits) inside
a temporary working directory; assertions read MLflow and Parquet back.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from search.schema import LAYERS_SCHEMA, TRIALS_SCHEMA

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SMALL = ["--set", "train_samples=128", "--num-cpus", "2", "--quiet"]


def sweep(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 420) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    out = subprocess.run([sys.executable, "-m", "search.run", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=timeout, env=full_env)
    return out


def runs(cwd: Path, space: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name(space)
    # Trial runs only: each sweep also has a parent run (run_kind = sweep) holding its summary.
    rs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return [r for r in rs if r.data.tags.get("run_kind") != "sweep"]


def table(cwd: Path, space: str, name: str):
    return ds.dataset(str(cwd / "results" / space / name), format="parquet").to_table()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("smoke")
    out = sweep(cwd, "--space", "smoke", *SMALL)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return cwd, out


def test_smoke_sweep_tracks_every_trial_in_mlflow(smoke: tuple[Path, subprocess.CompletedProcess]) -> None:
    from spaces import get_space

    cwd, out = smoke
    grid = get_space("smoke").grid("quick")
    rs = runs(cwd, "smoke")
    assert len(rs) == len(grid) == 10
    assert {r.info.status for r in rs} == {"FINISHED"}
    assert {r.data.tags["status"] for r in rs} == {"ok"}
    placements = {(r.data.params["dropout_placement"], r.data.params["dropout_type"]) for r in rs}
    assert len(placements) == 10  # every placement x kind
    r = rs[0]
    assert r.data.params["train_samples"] == "128" and r.data.tags["space"] == "smoke"
    assert r.data.tags["profile"] == "quick" and len(r.data.tags["config_hash"]) == 16
    assert r.data.tags["version.torch"] and r.data.tags["version.timm"]
    for key in ("test_acc", "test_acc_reest", "mean_shift", "max_shift", "epoch/throughput", "num_params",
                "n_train", "n_test", "n_probe", "n_reest", "d_cos2_all_init", "d_cos2_all_final"):
        assert key in r.data.metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    assert sorted(a.path for a in client.list_artifacts(r.info.run_id)) == ["layers.json", "layers.parquet",
                                                                           "shift_by_layer.png"]
    assert len(client.get_metric_history(r.info.run_id, "epoch/train_loss")) == 1  # one epoch
    # One parent run for the sweep; every trial is its child; Tune counted one iteration per epoch.
    exp = client.get_experiment_by_name("smoke")
    (parent,) = client.search_runs([exp.experiment_id], "tags.run_kind = 'sweep'")
    assert {x.data.tags["mlflow.parentRunId"] for x in rs} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_ok"] == 10
    assert parent.data.tags["command"].startswith("python -m search.run --space smoke")
    assert "summary.txt" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    # Tune counted one iteration per epoch: the final report is the last epoch's, not one more (tag set from
    # Tune's own training_iteration); and Tune's per-trial logger folders are off (MLflow and Parquet are the record).
    assert {x.data.tags["tune_iterations"] for x in rs} == {"1"}
    assert not list((cwd / "results" / "smoke" / "ray").glob("*/trainable_*/result.json"))
    assert "sweep 'smoke' done" in out.stdout and "best" in out.stdout and "results/smoke/trials" in out.stdout
    # Nothing went wrong, so stderr carries no library notices (store migrations, Ray's auth notice).
    for noise in ("Creating initial MLflow database tables", "alembic", "Token authentication is enabled"):
        assert noise not in out.stderr, out.stderr[-2000:]


def test_smoke_sweep_writes_parquet_datasets(smoke: tuple[Path, subprocess.CompletedProcess]) -> None:
    cwd, _ = smoke
    trials, layers = table(cwd, "smoke", "trials"), table(cwd, "smoke", "layers")
    assert trials.schema.equals(TRIALS_SCHEMA, check_metadata=False)
    assert layers.schema.equals(LAYERS_SCHEMA, check_metadata=False)
    assert trials.num_rows == 10 and len(set(trials.column("config_hash").to_pylist())) == 10
    assert set(trials.column("run_id").to_pylist()) == {r.info.run_id for r in runs(cwd, "smoke")}
    # WRN-10: 1 stem-free block per stage x 3 stages, 2 BN per block + the final BN = 7 BN layers.
    per_trial = {}
    for rid in layers.column("run_id").to_pylist():
        per_trial[rid] = per_trial.get(rid, 0) + 1
    assert set(per_trial.values()) == {7}
    assert len(list((cwd / "results" / "smoke" / "trials").glob("*.parquet"))) == 1  # compacted
    fed = [x for x in layers.to_pylist() if x["fed_by_dropout"]]
    assert fed and all(x["dropout_placement"] in ("pre_bn", "pre_conv") for x in fed)
    # What each stage used (probe_samples None: the whole training set) and D at initialisation and after epoch 1.
    for row in trials.to_pylist():
        assert (row["n_train"], row["n_test"], row["n_probe"], row["n_reest"]) == (128, 359, 128, 128)
        assert row["d_cos2_all_by_epoch"] == [row["d_cos2_all_init"], row["d_cos2_all_final"]]
        fed_here = row["dropout_placement"] in ("pre_bn", "pre_conv")
        assert (row["d_cos2_by_epoch"] is not None) == fed_here, row["dropout_placement"]


def test_rerun_reuses_finished_trials(smoke: tuple[Path, subprocess.CompletedProcess]) -> None:
    cwd, _ = smoke
    out = sweep(cwd, "--space", "smoke", *SMALL)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "10 of 10 trials already finished" in out.stdout
    assert len(runs(cwd, "smoke")) == 10
    assert table(cwd, "smoke", "trials").num_rows == 10


def test_random_and_optuna_paths(tmp_path: Path) -> None:
    out = sweep(tmp_path, "--space", "smoke", "--algo", "random", "--samples", "2", "--search-seed", "3", *SMALL)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert len(runs(tmp_path, "smoke")) == 2
    out = sweep(tmp_path, "--space", "uout_beta", "--algo", "optuna", "--samples", "3",
                "--set", "epochs=1", "--max-concurrent", "2", *SMALL)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rs = runs(tmp_path, "uout_beta")
    assert len(rs) == 3 and {r.data.tags["algo"] for r in rs} == {"optuna"}
    import optuna

    storage = f"sqlite:///{tmp_path / 'results' / 'uout_beta' / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)  # one study (its name carries the code version)
    study = optuna.load_study(study_name=name, storage=storage)
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3
    for t in study.trials:  # the define-by-run space honours the placement condition
        assert t.params["dropout_placement"] in ("pre_bn", "pre_conv")
    # optuna-dashboard's view: the objective's name, and each trial's config hash and MLflow run.
    assert study.metric_names == ["test_acc"]
    by_id = {r.info.run_id: r for r in rs}
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            run = by_id[t.user_attrs["mlflow_run_id"]]
            assert run.data.tags["config_hash"] == t.user_attrs["config_hash"]
    assert f"optuna-dashboard sqlite:///{tmp_path / 'results' / 'uout_beta' / 'optuna.db'}" in out.stdout


def test_report_from_the_real_smoke_sweep(smoke: tuple[Path, subprocess.CompletedProcess]) -> None:
    cwd, _ = smoke
    out = subprocess.run([sys.executable, "-m", "analysis.report", "--space", "smoke", "--n-boot", "200"], cwd=cwd,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rep = cwd / "reports" / "smoke"
    md = (rep / "report.md").read_text()
    assert (rep / "report.tex").read_text().count("\\toprule") >= 1
    pngs = list((rep / "figures").glob("*.png"))
    assert len(pngs) >= 4 and len(list((rep / "figures").glob("*.pdf"))) == len(pngs)
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    # One configuration row per trial of the grid (10), in the setup table.
    table = md.split("**Configurations")[1].split("\n\n")[1]
    rows = [ln for ln in table.splitlines() if ln.startswith("|")][2:]
    assert len(rows) == 10
