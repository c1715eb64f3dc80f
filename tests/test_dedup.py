"""No configuration is trained twice, whatever the searcher proposes (search.sweep.tune.DedupSearcher).

Optuna proposed `pre_bn/gaussian@0.65` and `none` twice each in `--samples 6` and both were
trained and counted as replicates. The wrapper answers a repeated proposal from the known
result (a trial finished before, or running in this sweep), trains each proposal with
`--seeds` seeds and tells Optuna their mean; Tune's trial count is what trains.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
from ray.tune.search import Searcher

from search.config import TrialConfig
from search.sweep.tune import DedupSearcher

BASE = dict(backbone="cifar_wrn", depth=10, dataset="digits", image_size=8, in_chans=1)
A = {**BASE, "dropout_placement": "none"}
B = {**BASE, "dropout_placement": "pre_bn", "dropout_type": "gaussian", "dropout_rate": 0.5}
C = {**BASE, "dropout_placement": "head", "dropout_type": "uout", "dropout_rate": 0.5}


def _h(cfg: dict[str, Any], seed: int | None = None) -> str:
    return TrialConfig.from_dict({**cfg, **({} if seed is None else {"seed": seed})}).config_hash


class Scripted(Searcher):
    """An inner searcher that proposes a fixed list, then FINISHED, and records what it is told."""

    def __init__(self, proposals: list[dict[str, Any]]) -> None:
        super().__init__(metric="test_acc", mode="max")
        self.proposals = list(proposals)
        self.asked: dict[str, dict[str, Any]] = {}
        self.told: dict[str, Any] = {}

    def suggest(self, trial_id: str) -> dict[str, Any] | str:
        if not self.proposals:
            return Searcher.FINISHED
        self.asked[trial_id] = p = self.proposals.pop(0)
        return dict(p)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.told[trial_id] = "FAIL" if error else (result or {}).get("test_acc")

    def told_for(self, cfg: dict[str, Any]) -> list[Any]:
        return [v for pid, v in self.told.items() if self.asked[pid] == cfg]


def _wrap(inner: Searcher, **kw: Any) -> DedupSearcher:
    return DedupSearcher(inner, metric="test_acc", mode="max", **kw)


def test_a_proposal_running_in_this_sweep_is_not_started_again_and_gets_its_result() -> None:
    inner = Scripted([A, B, A, C])
    s = _wrap(inner)
    got = [s.suggest(f"t{i}") for i in range(3)]
    assert [_h(g) for g in got] == [_h(A), _h(B), _h(C)]  # the second A got no trial
    assert s.repeats == 1 and inner.told == {}  # A's duplicate waits for A's result
    s.on_trial_complete("t0", {"test_acc": 0.5})
    assert inner.told_for(A) == [0.5, 0.5]  # the original and the repeated proposal
    s.on_trial_complete("t1", {"test_acc": 0.25})
    s.on_trial_complete("t2", {"test_acc": 0.75})
    assert inner.told_for(B) == [0.25] and inner.told_for(C) == [0.75]
    assert s.suggest("t3") == Searcher.FINISHED


def test_a_proposal_finished_before_is_answered_at_once_without_a_trial() -> None:
    inner = Scripted([A, B])
    s = _wrap(inner, known={_h(A): 0.9})
    assert _h(s.suggest("t0")) == _h(B)
    assert inner.told_for(A) == [0.9]


def test_seeds_train_each_proposal_n_times_and_the_objective_is_their_mean() -> None:
    inner = Scripted([A, A])
    s = _wrap(inner, seeds=2)
    first, second = s.suggest("t0"), s.suggest("t1")
    assert (first["seed"], second["seed"]) == (0, 1) and _h(first) == _h(A, 0) and _h(second) == _h(A, 1)
    assert s.suggest("t2") == Searcher.FINISHED  # the repeated A brings nothing new; then the list ends
    s.on_trial_complete("t0", {"test_acc": 0.4})
    assert inner.told == {}  # the mean needs both seeds
    s.on_trial_complete("t1", {"test_acc": 0.6})
    assert inner.told_for(A) == [pytest.approx(0.5), pytest.approx(0.5)]


def test_a_failed_seed_fails_the_proposal_and_known_seeds_are_not_retrained() -> None:
    inner = Scripted([B, C])
    s = _wrap(inner, seeds=2, known={_h(B, 0): 0.3})  # seed 0 finished in an earlier sweep
    t = s.suggest("t0")
    assert _h(t) == _h(B, 1)
    s.on_trial_complete("t0", None, error=True)
    assert inner.told_for(B) == ["FAIL"]


def test_a_searcher_that_only_repeats_itself_ends_the_sweep() -> None:
    inner = Scripted([A] * 50)
    s = _wrap(inner, known={_h(A): 0.5}, max_repeats=10)
    assert s.suggest("t0") == Searcher.FINISHED and s.exhausted
    assert len(inner.told) == 10 and set(inner.told.values()) == {0.5}


def test_optuna_through_the_wrapper_never_proposes_a_trained_config_twice() -> None:
    """The real OptunaSearch over the smoke space: 12 trials of a space with few distinct configurations."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from search.sweep.tune import DefineByRun

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    inner = OptunaSearch(space=DefineByRun("smoke", "quick", {}), metric="test_acc", mode="max",
                         sampler=optuna.samplers.TPESampler(seed=0))
    s = _wrap(inner)

    def score(h: str) -> float:  # a deterministic result per configuration
        return int(h[:6], 16) / 16**6

    hashes = []
    for i in range(12):
        cfg = s.suggest(f"t{i}")
        if cfg == Searcher.FINISHED:
            break
        hashes.append(h := TrialConfig.from_dict(cfg).config_hash)
        s.on_trial_complete(f"t{i}", {"test_acc": score(h)})
    assert len(hashes) == len(set(hashes)) >= 4
    study = inner._ot_study
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) >= len(hashes)  # repeated proposals were told too, not left running
    assert len(done) > len(hashes), "the smoke space is small: TPE repeats itself within 12 proposals"
    for t in done:
        cfg = DefineByRun("smoke", "quick", {})(optuna.trial.FixedTrial(t.params))
        assert t.value == pytest.approx(score(TrialConfig.from_dict(cfg).config_hash))


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_optuna_sweep_trains_each_config_once_with_seeds_and_counts_what_runs(tmp_path: Path) -> None:
    """`--algo optuna --samples 3 --seeds 2`: 6 trials, each (config, seed) once; Optuna sees the seed mean."""
    import subprocess
    import sys

    import optuna
    import pyarrow.dataset as ds
    from _sweeps import _env, _runs

    from search.sweep.tune import DefineByRun

    args = ["--space", "smoke", "--algo", "optuna", "--samples", "3", "--seeds", "2", "--set", "epochs=1",
            "--set", "train_samples=64", "--num-cpus", "2", "--quiet", "--reuse", "any"]
    out = subprocess.run([sys.executable, "-m", "search.run", *args], cwd=tmp_path,
                         env=_env(DBN_SWEEP_REPORT="off"), capture_output=True,
                         text=True, timeout=800)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    counters = re.findall(r"^\[(\d+)/(\d+)\]", out.stdout, re.M)
    assert counters == [(str(k), "6") for k in range(1, 7)], counters  # counts what actually runs
    runs = [r for r in _runs(tmp_path) if r.info.status == "FINISHED" and "config_hash" in r.data.tags]
    hashes = [r.data.tags["config_hash"] for r in runs]
    assert len(runs) == 6 and len(set(hashes)) == 6, hashes
    rows = ds.dataset(str(tmp_path / "results" / "smoke" / "trials"), format="parquet").to_table()
    assert sorted(rows.column("config_hash").to_pylist()) == sorted(hashes)  # no Parquet copy of any trial
    acc = {r.data.tags["config_hash"]: r.data.metrics["test_acc"] for r in runs}
    study = optuna.load_study(study_name=f"smoke-quick", storage=f"sqlite:///{tmp_path}/results/smoke/optuna.db")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) >= 3
    for t in done:
        cfg = DefineByRun("smoke", "quick", {"epochs": 1, "train_samples": 64})(optuna.trial.FixedTrial(t.params))
        seeds = [acc[TrialConfig.from_dict({**cfg, "seed": s}).config_hash] for s in (0, 1)]
        assert t.value == pytest.approx(sum(seeds) / 2) and math.isfinite(t.value)
