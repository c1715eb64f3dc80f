"""D = d cos^2(theta) tracked over training, and the sample counts a trial's stages used (issue 22).

A real 2-epoch WRN-10-1 on digits: `d_cos2`/`d_cos2_all` at every epoch of the history, the values at
initialisation equal to D computed by hand from the same freshly built model, the last epoch's equal to the
probe's per-layer `d_cos2`; n_train / n_test / n_probe / n_reest as configured; all of it in the trials
Parquet row and the MLflow run (Tracker, as the sweep's driver calls it), and back from MLflow by rebuild;
results written before these columns existed still load, with nulls.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from search.config import TrialConfig
from search.results import TrialResult
from search.schema import OPTIONAL_TRIAL_COLUMNS, TRIALS_SCHEMA, series_column
from search.trial.runner import _first, run_trial

ROOT = Path(__file__).resolve().parents[1]
TINY = TrialConfig(backbone="cifar_wrn", depth=10, width=1, dataset="digits", image_size=8, in_chans=1, epochs=2,
                   batch_size=64, lr=0.05, device="cpu", seed=3)
FED = TINY.replace(dropout_placement="pre_conv", dropout_rate=0.5, probe_samples=128)  # two whole batches
NONE = TINY  # no dropout, probe_samples None: the whole training set
DIGITS_TRAIN, DIGITS_TEST = 1438, 359  # the bundled digits' fixed 80/20 split
NEW_COLUMNS = ("d_cos2_init", "d_cos2_final", "d_cos2_all_init", "d_cos2_all_final", "n_train", "n_test", "n_probe",
               "n_reest", "d_cos2_by_epoch", "d_cos2_all_by_epoch")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fed() -> TrialResult:
    return run_trial(FED)


@pytest.fixture(scope="module")
def none() -> TrialResult:
    return run_trial(NONE)


def d_by_hand(cfg: TrialConfig) -> tuple[float, float]:
    """(mean D over the dropout-fed BN layers, over every BN layer) of the model run_trial builds for `cfg`,
    before training: each BN's feeding weight layer found with plain hooks, D_j = (sum_i w_ji)^2 / sum_i w_ji^2
    in numpy, averaged over units j, then over layers."""
    from search.trial.data import load_data
    from search.trial.models import build_model
    from search.trial.train import seed_everything

    seed_everything(cfg.seed)  # as run_trial: seed, data, model
    data = load_data(cfg, "cpu")
    model = build_model(cfg, num_classes=data.num_classes)
    calls: list[tuple[str, nn.Module]] = []
    hooks = []
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            hooks.append(m.register_forward_pre_hook(lambda mod, a: calls.append(("bn", mod))))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(lambda mod, a, o: calls.append(("w", mod))))
        elif "dropout" in type(m).__name__.lower() and getattr(m, "rate", getattr(m, "p", 0.0)) > 0:
            hooks.append(m.register_forward_hook(lambda mod, a, o: calls.append(("drop", mod))))
    model.eval()
    with torch.no_grad():
        model(next(iter(data.train_eval))[0][:2])
    for h in hooks:
        h.remove()
    fed, every, last_w, dropped = [], [], None, False
    for kind, mod in calls:
        if kind == "w":
            last_w = mod
        elif kind == "drop":
            dropped = True
        else:
            w = last_w.weight.detach().double().numpy().reshape(last_w.weight.shape[0], -1)
            d = float(np.mean(w.sum(1) ** 2 / (w * w).sum(1)))
            every.append(d)
            if dropped:
                fed.append(d)
            dropped = False
    assert len(every) == 7  # WRN-10: every BN has a feeding conv
    return (float(np.mean(fed)) if fed else math.nan), float(np.mean(every))


def test_d_is_in_the_history_at_every_epoch(fed: TrialResult) -> None:
    assert fed.status == "ok" and fed.epochs_completed == 2 and len(fed.history) == 2
    for h in fed.history:
        assert math.isfinite(h["d_cos2"]) and math.isfinite(h["d_cos2_all"]), h
    assert (fed.d_cos2_final, fed.d_cos2_all_final) == (fed.history[-1]["d_cos2"], fed.history[-1]["d_cos2_all"])
    assert fed.series("d_cos2") == [fed.d_cos2_init] + [h["d_cos2"] for h in fed.history]
    assert fed.series("d_cos2_all") == [fed.d_cos2_all_init] + [h["d_cos2_all"] for h in fed.history]
    assert fed.d_cos2_final != fed.d_cos2_init  # the weights moved


def test_d_at_initialisation_is_d_computed_by_hand_from_the_same_model(fed: TrialResult) -> None:
    by_hand_fed, by_hand_all = d_by_hand(FED)
    assert fed.d_cos2_init == pytest.approx(by_hand_fed, abs=1e-6, rel=0)
    assert fed.d_cos2_all_init == pytest.approx(by_hand_all, abs=1e-6, rel=0)
    assert 0.5 < fed.d_cos2_init < 2.0  # ~1 at initialisation (issue 22)


def test_d_after_the_last_epoch_is_the_probes_d_cos2(fed: TrialResult, none: TrialResult) -> None:
    """The mean of the per-layer `d_cos2` the mechanism probe writes, over the fed layers and over all."""
    fed_layers = [x.d_cos2 for x in fed.layers if x.fed_by_dropout]
    assert len(fed_layers) == 3  # pre_conv: one per block
    assert fed.d_cos2_final == pytest.approx(float(np.mean(fed_layers)), abs=1e-9, rel=0)
    for r in (fed, none):
        assert r.d_cos2_all_final == pytest.approx(float(np.mean([x.d_cos2 for x in r.layers])), abs=1e-9, rel=0)


def test_without_dropout_fed_bn_only_the_all_layer_d_is_defined(none: TrialResult) -> None:
    assert none.status == "ok" and not any(x.fed_by_dropout for x in none.layers)
    assert math.isnan(none.d_cos2_init) and math.isnan(none.d_cos2_final)
    assert all(math.isnan(h["d_cos2"]) for h in none.history) and none.series("d_cos2") is None
    assert none.d_cos2_all_init == pytest.approx(d_by_hand(NONE)[1], abs=1e-6, rel=0)
    assert len(none.series("d_cos2_all")) == 3 and all(map(math.isfinite, none.series("d_cos2_all")))


def test_sample_counts_are_what_each_stage_used(fed: TrialResult, none: TrialResult) -> None:
    assert (fed.n_train, fed.n_test, fed.n_probe, fed.n_reest) == (DIGITS_TRAIN, DIGITS_TEST, 128, 128)
    # probe_samples None is the paper's protocol: the probes and re-estimation see the whole training set.
    assert (none.n_train, none.n_test, none.n_probe, none.n_reest) == (DIGITS_TRAIN, DIGITS_TEST,) + (DIGITS_TRAIN,) * 2
    capped = TINY.replace(train_samples=300)
    from search.trial.data import load_data

    data = load_data(capped, "cpu")
    assert data.n_train == 300
    for n, seen in ((100, 128), (128, 128), (299, 300), (10**6, 300), (None, 300)):  # whole batches, n_train at most
        probe = _first(data.train_eval, n)
        assert sum(len(x) for x, _ in probe) == seen and probe.seen == seen, n


def test_the_new_columns_leave_config_hashes_alone() -> None:
    assert not set(NEW_COLUMNS) & set(TrialConfig.field_names())  # results, not experiment fields
    assert set(NEW_COLUMNS) <= set(OPTIONAL_TRIAL_COLUMNS) and set(NEW_COLUMNS) <= set(TRIALS_SCHEMA.names)
    assert series_column("d_cos2") == "d_cos2_by_epoch"


def test_parquet_and_mlflow_carry_them_and_rebuild_restores_them(fed: TrialResult, none: TrialResult,
                                                                 tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from search.store import ResultStore
    from search.sweep.tracking import Tracker, rebuild_parquet

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "smoke", "quick", str(tmp_path / "results"))
    tracker.open_sweep(algo="grid", command="test", params={"space": "smoke"})
    runs = {}
    for cfg, result in ((FED, fed), (NONE, none)):
        run_id = tracker.start(cfg, trial_id=cfg.dropout_placement, algo="grid")
        tracker.finish(run_id, cfg, result)
        runs[run_id] = result
    assert tracker.flush() == []
    tracker.close_sweep("done", {"trials_ok": 2}, files=[])

    client = MlflowClient(tracking_uri=uri)
    for run_id, result in runs.items():
        metrics = client.get_run(run_id).data.metrics
        for k in ("n_train", "n_test", "n_probe", "n_reest", "d_cos2_all_init", "d_cos2_all_final"):
            assert metrics[k] == getattr(result, k), k
        steps = {h.step: h.value for h in client.get_metric_history(run_id, "epoch/d_cos2_all")}
        assert steps == {e: h["d_cos2_all"] for e, h in enumerate(result.history, 1)}
    fed_id = next(r for r, x in runs.items() if x is fed)
    assert [h.step for h in client.get_metric_history(fed_id, "epoch/d_cos2")] == [1, 2]
    assert client.get_run(fed_id).data.metrics["d_cos2_init"] == fed.d_cos2_init

    def rows(root: Path) -> dict[str, dict]:
        return {r["run_id"]: r for r in ResultStore(str(root), "smoke").read("trials").to_pylist()}

    written = rows(tmp_path / "results")
    assert rebuild_parquet("smoke", uri, str(tmp_path / "rebuilt"))[0] == 2
    rebuilt = rows(tmp_path / "rebuilt")
    for run_id, result in runs.items():
        for source in (written[run_id], rebuilt[run_id]):
            for k in NEW_COLUMNS[:8]:
                want, got = getattr(result, k), source[k]
                if isinstance(want, float) and math.isnan(want):  # the none trial's d_cos2_*: NaN, never logged
                    assert got is None or math.isnan(got), k
                else:
                    assert got == want and type(got) is type(want), k
            for k in TrialResult.SERIES_KEYS:
                assert source[series_column(k)] == result.series(k), k
    assert rebuilt[fed_id]["d_cos2_by_epoch"] == [fed.d_cos2_init, *(h["d_cos2"] for h in fed.history)]
    assert next(r for r in rebuilt.values() if r["run_id"] != fed_id)["d_cos2_by_epoch"] is None


def test_results_written_before_the_columns_load_and_rebuild_with_nulls(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from search.store import ResultStore
    from search.sweep.tracking import rebuild_parquet

    legacy = tmp_path / "legacy"
    shutil.copytree(ROOT / "tests" / "data" / "legacy_smoke", legacy)
    old = ResultStore(str(legacy / "results"), "smoke").read("trials")
    assert old.num_rows == 4
    for k in NEW_COLUMNS:
        assert old.column(k).null_count == 4, k
    assert rebuild_parquet("smoke", f"sqlite:///{legacy / 'mlflow.db'}", str(tmp_path / "rebuilt"))[0] == 4
    rebuilt = ResultStore(str(tmp_path / "rebuilt"), "smoke").read("trials").to_pylist()
    for k in NEW_COLUMNS:  # a float metric the run never logged comes back NaN, as every other one does
        assert all(r[k] is None or (k.endswith(("_init", "_final")) and math.isnan(r[k])) for r in rebuilt), k
