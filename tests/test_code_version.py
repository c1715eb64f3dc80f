"""Which code produced a result (search.code_version), recorded on runs and rows, and reuse by code version.

The fast tests build small git repositories in a temporary folder. The slow one copies the
project into a fresh repository, sweeps, commits a change and sweeps again: a committed code
change trains again by default, `--reuse any` reuses, and the study reports mixed versions.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from search.code_version import CodeVersion, code_columns_from_tags, code_version, compute_code_version

ROOT = Path(__file__).resolve().parents[1]
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout.strip()


def _repo(path: Path) -> Path:
    path.mkdir(parents=True)
    _git(path, "init", "-q")
    (path / "mod.py").write_text("x = 1\n")
    (path / ".gitignore").write_text("ignored.py\n")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "first")
    return path


def test_clean_checkout_is_its_commit(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "r")
    v = compute_code_version(str(repo))
    head = _git(repo, "rev-parse", "HEAD")
    assert v.commit == head and not v.dirty and v.diff_hash == ""
    assert v.label == f"git:{head[:12]}"


def test_uncommitted_changes_are_dirty_and_hashed_by_content(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "r")
    (repo / "mod.py").write_text("x = 2\n")
    a = compute_code_version(str(repo))
    (repo / "mod.py").write_text("x = 3\n")
    b = compute_code_version(str(repo))
    assert a.dirty and b.dirty and a.commit == b.commit
    assert a.diff_hash != b.diff_hash and a.label != b.label
    assert a.label == f"git:{a.commit[:12]}+dirty.{a.diff_hash[:8]}"
    (repo / "mod.py").write_text("x = 2\n")
    assert compute_code_version(str(repo)) == a  # the same change, the same version


def test_untracked_source_counts_but_data_and_ignored_files_do_not(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "r")
    clean = compute_code_version(str(repo))
    (repo / "notes.txt").write_text("data\n")
    (repo / "ignored.py").write_text("y = 1\n")
    assert compute_code_version(str(repo)) == clean
    (repo / "new_module.py").write_text("z = 1\n")
    v = compute_code_version(str(repo))
    assert v.dirty and v.commit == clean.commit


def test_a_new_commit_is_a_new_version(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "r")
    first = compute_code_version(str(repo))
    (repo / "mod.py").write_text("x = 2\n")
    _git(repo, "commit", "-q", "-am", "fix")
    second = compute_code_version(str(repo))
    assert not second.dirty and second.commit != first.commit and second.label != first.label


def test_outside_a_checkout_the_package_version(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    v = compute_code_version(str(plain))
    assert v.commit == "" and not v.dirty and v.label.startswith("pkg:")
    # An installed copy inside some other repository is not that repository's commit.
    outer = _repo(tmp_path / "outer")
    (outer / "site" / "pkg").mkdir(parents=True)
    assert compute_code_version(str(outer / "site" / "pkg")).label.startswith("pkg:")


def test_tags_columns_and_round_trip() -> None:
    v = CodeVersion(label="git:0123456789ab+dirty.deadbeef", commit="0123456789ab" + "0" * 28, dirty=True,
                    diff_hash="deadbeef00000000", package_version="0.1.0")
    tags = v.tags()
    assert tags["code_version"] == v.label and tags["code.dirty"] == "true"
    assert tags["mlflow.source.git.commit"] == v.commit  # MLflow's own field for the commit
    assert code_columns_from_tags(tags) == v.columns() == {"code_version": v.label, "code_commit": v.commit,
                                                             "code_dirty": True}
    assert code_columns_from_tags({}) == {"code_version": None, "code_commit": None, "code_dirty": None}


def test_this_project_version_is_cached_and_in_every_trials_row() -> None:
    from search.config import TrialConfig
    from search.results import TrialResult
    from search.schema import OPTIONAL_TRIAL_COLUMNS, TRIALS_SCHEMA, trial_row

    assert code_version() is code_version()
    for name in ("code_version", "code_commit", "code_dirty"):
        assert name in TRIALS_SCHEMA.names and name in OPTIONAL_TRIAL_COLUMNS  # older files load with nulls
    row = trial_row(TrialConfig(), TrialResult(), run_id="r", space="s", profile="p", finished_at=None)
    assert row["code_version"] == code_version().label


# --------------------------------------------------------------------------- end to end
ONE_TRIAL = ["--space", "smoke", "--set", "dropout_placement=none", "--set", "dropout_type=bernoulli",
             "--set", "dropout_rate=0", "--set", "epochs=1", "--set", "train_samples=64", "--num-cpus", "2",
             "--quiet"]


def _copy_project(dst: Path) -> Path:
    """The project's code (as it is now) in a fresh git repository: a checkout whose commits the test makes."""
    for name in ("search", "spaces", "analysis"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _git(dst, "init", "-q")
    _git(dst, "add", "-A")
    _git(dst, "commit", "-q", "-m", "copy")
    return dst


def _sweep(code: Path, cwd: Path, *extra: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBN_", "RAY_ADDRESS"))}
    env.update(PYTHONPATH=str(code), RAY_USAGE_STATS_ENABLED="0", DBN_SWEEP_REPORT="off")
    out = subprocess.run([sys.executable, "-m", "search.run", *ONE_TRIAL, *extra], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=400)
    return out.returncode, out.stdout + out.stderr


def _finished(cwd: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'")
    return [r for r in runs if "config_hash" in r.data.tags]  # trial runs, not a sweep's parent run


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_committed_code_change_trains_again_unless_reuse_any(tmp_path: Path) -> None:
    import pyarrow.dataset as ds

    from analysis.report import code_versions_lines

    code, cwd = _copy_project(tmp_path / "code"), tmp_path / "work"
    cwd.mkdir()
    first = compute_code_version(str(code))
    rc, log = _sweep(code, cwd)
    assert rc == 0 and "1 trial(s) to run" in log, log[-3000:]
    (code / "search" / "trial" / "train.py").write_text((code / "search" / "trial" / "train.py").read_text()
                                                         + "\n# a fix\n")
    _git(code, "commit", "-q", "-am", "a fix in the trainer")
    second = compute_code_version(str(code))
    assert second.label != first.label and not second.dirty

    # Another configuration under the new code: the study now mixes two code versions.
    rc, log = _sweep(code, cwd, "--set", "seed=1")
    assert rc == 0, log[-3000:]
    from analysis.load import load_study

    lines = "\n".join(code_versions_lines(load_study("smoke", root=str(cwd / "results")).trials))
    assert first.label in lines and second.label in lines and "mixed code versions" in lines

    # The first configuration again: its result came from other code, so it trains again by default.
    rc, log = _sweep(code, cwd)
    assert rc == 0 and f"finished under other code ({first.label})" in log and "1 trial(s) to run" in log, log[-3000:]
    runs = _finished(cwd)
    by_code = sorted(r.data.tags["code_version"] for r in runs)
    assert by_code == sorted([first.label, second.label, second.label])
    assert all(r.data.tags["mlflow.source.git.commit"] == (first if r.data.tags["code_version"] == first.label
                                                           else second).commit for r in runs)

    # --reuse any: the finished run is the result, whatever code made it; nothing trains.
    rc, log = _sweep(code, cwd, "--reuse", "any")
    assert rc == 0 and "1 of 1 trials already finished" in log and "trial(s) to run" not in log, log[-3000:]
    assert len(_finished(cwd)) == 3
    rows = ds.dataset(str(cwd / "results" / "smoke" / "trials"), format="parquet").to_table()
    assert set(rows.column("code_version").to_pylist()) == {first.label, second.label}
    assert set(rows.column("code_commit").to_pylist()) == {first.commit, second.commit}
