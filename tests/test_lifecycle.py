"""A sweep's parent run is closed on every path (issue 30): `--resume` with nothing left to train used to
say "4 of 4 reused" and exit 0 while the parent run a killed driver left RUNNING stayed RUNNING, with no
summary. tests/test_kill_chain.py checks the same after a real SIGKILL during compaction.

The store is built in-process (a parent run and the 4 trials of the tiny smoke sweep, finished, part files
not compacted: the state a driver killed in its compaction leaves); then the real CLI runs. Nothing trains,
so no Ray starts.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from _sweeps import KILL_ARGS, N_KILL_TRIALS, _client, _runs, _sweep

SPACE = "smoke"


def _killed_store(cwd: Path) -> str:
    """Every trial of KILL_ARGS finished, the sweep's parent run left RUNNING; returns the parent's run id."""
    from search.results import LayerShift, TrialResult
    from search.sweep import cli
    from search.sweep.tracking import Tracker

    args = cli._parser().parse_args(KILL_ARGS)
    cli._validate(args)
    configs, _ = cli.build_configs(args)
    assert len(configs) == N_KILL_TRIALS
    tracker = Tracker(f"sqlite:///{cwd / 'mlflow.db'}", SPACE, "quick", str(cwd / "results"))
    parent = tracker.open_sweep(algo="grid", command="python -m search.run " + " ".join(KILL_ARGS),
                                params={"space": SPACE})
    from search.config import TrialConfig

    for i, d in enumerate(configs):
        cfg = TrialConfig.from_dict(d)
        layers = [LayerShift(f"bn{k}", k, k / 2, 16, 144, k == 1, 1.0, 1.2, 1.2, 1.25) for k in range(2)]
        run_id = tracker.start(cfg, trial_id=str(i), algo="grid")
        tracker.finish(run_id, cfg, TrialResult(test_acc=0.5 + i / 100, layers=layers))
    assert tracker.flush() == []
    return parent  # no close_sweep, no compaction: the driver died here


def _parents(cwd: Path) -> dict[str, object]:
    client = _client(cwd)
    exp = client.get_experiment_by_name(SPACE)
    return {r.info.run_id: r for r in client.search_runs([exp.experiment_id], "tags.run_kind = 'sweep'")}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("resume", [True, False], ids=["resume", "rerun"])
def test_nothing_to_train_closes_the_parent_left_running(tmp_path: Path, resume: bool) -> None:
    parent = _killed_store(tmp_path)
    assert len(list((tmp_path / "results" / SPACE / "trials").glob("*.parquet"))) == N_KILL_TRIALS
    rc, log = _sweep(tmp_path, KILL_ARGS + (["--resume"] if resume else []) + ["--reuse", "any"])
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log
    assert f"{N_KILL_TRIALS} of {N_KILL_TRIALS} trials already finished" in log and "trial(s) to run" not in log
    parents = _parents(tmp_path)
    assert list(parents) == [parent], "no new parent run when nothing runs"
    p = parents[parent]
    if resume:  # reopened and closed as the sweep it is, with its summary
        assert (f"the sweep's parent run {parent} was left RUNNING by an interrupted sweep: nothing is left to "
                "train, so it is closed FINISHED with this summary") in log, log[-3000:]
        assert p.info.status == "FINISHED" and p.data.tags["status"] == "done"
        client = _client(tmp_path)
        assert "summary.txt" in [a.path for a in client.list_artifacts(parent)]
        text = Path(client.download_artifacts(parent, "summary.txt", str(tmp_path))).read_text()
        assert f"sweep '{SPACE}' done" in text and f"{N_KILL_TRIALS} ok" in text
    else:  # a new sweep of the same configurations: the stale parent is closed KILLED, as open_sweep does
        assert "closed 1 sweep parent run(s) left RUNNING by an interrupted sweep (marked KILLED" in log, log[-3000:]
        assert p.info.status == "KILLED" and p.data.tags["status"] == "killed"
    runs = _runs(tmp_path)
    assert len(runs) == N_KILL_TRIALS and all(r.info.status == "FINISHED" for r in runs)  # nothing trained again
    assert len(list((tmp_path / "results" / SPACE / "trials").glob("*.parquet"))) == 1  # compacted


@pytest.mark.timeout(400)
def test_a_second_resume_leaves_the_closed_parent_alone(tmp_path: Path) -> None:
    """Once closed, a parent stays as it is: a later --resume with nothing to train reopens nothing."""
    parent = _killed_store(tmp_path)
    assert _sweep(tmp_path, KILL_ARGS + ["--resume", "--reuse", "any"])[0] == 0
    end = _parents(tmp_path)[parent].info.end_time
    rc, log = _sweep(tmp_path, KILL_ARGS + ["--resume", "--reuse", "any"], log="again.log")
    assert rc == 0 and "parent run" not in log, log[-3000:]
    p = _parents(tmp_path)[parent]
    assert p.info.status == "FINISHED" and p.info.end_time == end
