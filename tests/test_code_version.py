"""Which code produced a result (search.code_version), recorded on runs and rows, and reuse by code version.

The fast tests build small git repositories in a temporary folder. The slow one copies the
project into a fresh repository, sweeps, commits a change and sweeps again: a committed code
change trains again by default, `--reuse any` reuses, and the study reports mixed versions.

Provenance on every node: a copy of the code without `.git` (what a cluster node gets) records
the driver's version from DBN_CODE_VERSION, and a local Ray worker gets it from the driver's
runtime environment.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from search.code_version import (ENV_VAR, CodeVersion, code_columns_from_tags, code_version, compute_code_version,
                                 parse_code_version)

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


# --------------------------------------------------------------------------- the driver's version on every node
def _ship_without_git(dst: Path) -> Path:
    """The project's Python packages and pyproject, as a cluster node gets them: no .git anywhere above."""
    dst.mkdir(parents=True)
    for name in ("search", "spaces", "analysis"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")
    assert subprocess.run(["git", "-C", str(dst), "rev-parse", "--show-toplevel"], capture_output=True).returncode != 0
    return dst


def _node_env(code: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBN_", "RAY_ADDRESS", "GIT_"))}
    env.update(PYTHONPATH=str(code), RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


_REPORT = ("import json, search.code_version as m; v = m.code_version(); "
           "print(json.dumps([m.__file__, v.label, v.commit, v.dirty, v.diff_hash]))")


def _driver_version() -> CodeVersion:
    if not (ROOT / ".git").exists():
        pytest.skip("the project is not a git checkout here: there is no git: version to carry")
    v = compute_code_version(str(ROOT))
    assert v.label.startswith("git:")
    return v


def test_a_copy_without_git_records_the_drivers_version_from_the_environment(tmp_path: Path) -> None:
    import json

    driver = _driver_version()
    code = _ship_without_git(tmp_path / "node")
    # Without the variable the node can only name the package: what a cluster recorded before.
    out = subprocess.run([sys.executable, "-c", _REPORT], cwd=code, env=_node_env(code), capture_output=True,
                         text=True, timeout=60, check=True)
    where, label, commit, _, _ = json.loads(out.stdout)
    assert Path(where).resolve().is_relative_to(code.resolve()), where  # the shipped copy ran, not the checkout
    assert label.startswith("pkg:") and commit == ""
    # With it, the driver's version, field for field.
    out = subprocess.run([sys.executable, "-c", _REPORT], cwd=code, env=_node_env(code, **{ENV_VAR: driver.to_json()}),
                         capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout)[1:] == [driver.label, driver.commit, driver.dirty, driver.diff_hash]


def test_the_env_value_round_trips_and_wins_over_git(monkeypatch: pytest.MonkeyPatch) -> None:
    for v in (CodeVersion(label="git:0123456789ab", commit="0123456789ab" + "c" * 28, package_version="0.1.0"),
              CodeVersion(label="git:0123456789ab+dirty.deadbeef", commit="0123456789ab" + "c" * 28, dirty=True,
                          diff_hash="deadbeef00000000"),
              CodeVersion(label="pkg:0.1.0", package_version="0.1.0")):
        assert parse_code_version(v.to_json()) == v
    v = CodeVersion(label="git:fedcba987654", commit="fedcba987654" + "0" * 28)
    monkeypatch.setenv(ENV_VAR, v.to_json())
    code_version.cache_clear()
    try:
        assert code_version() == v  # this checkout has .git, but the variable is the driver's word
    finally:
        monkeypatch.delenv(ENV_VAR)
        code_version.cache_clear()


_COMMIT = "0123456789ab" + "c" * 28


@pytest.mark.parametrize("raw, why", [
    ("git:0123456789ab", "not JSON"),
    ('["git:0123456789ab"]', "not a JSON object"),
    ('{"commit": "' + _COMMIT + '"}', "no label"),
    ('{"label": "git:0123456789ab", "commit": "' + _COMMIT + '", "branch": "main"}', "unknown key(s) branch"),
    ('{"label": "git:0123", "commit": "' + _COMMIT + '"}', "is neither git:<commit12>"),
    ('{"label": "git:0123456789ab", "commit": "fedcba9876540000000000000000000000000000"}', "not the full hex commit"),
    ('{"label": "git:0123456789ab", "commit": "' + _COMMIT + '", "dirty": "yes"}', "dirty must be a bool"),
    ('{"label": "git:0123456789ab", "commit": "' + _COMMIT + '", "dirty": true}', "contradicts label"),
    ('{"label": "git:0123456789ab+dirty.deadbeef", "commit": "' + _COMMIT + '", "dirty": true, "diff_hash": "x"}',
     "is not the 16 hex chars"),
    ('{"label": "pkg:0.1.0", "commit": "' + _COMMIT + '"}', "a pkg: label has no commit"),
])
def test_a_malformed_env_value_is_one_clear_error(raw: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_code_version(raw)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{ENV_VAR}=") and why in msg, msg
    assert "python -m search.code_version" in msg  # what to set it to instead


@pytest.mark.timeout(120)
def test_a_malformed_env_value_is_refused_before_the_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """search.run: one line, exit 2, nothing written (the driver is never reached)."""
    import search.sweep.driver
    from search.sweep import cli

    def late(*_a: object, **_k: object) -> None:
        raise AssertionError("DBN_CODE_VERSION was not checked before the sweep driver")

    monkeypatch.setattr(search.sweep.driver, "drive", late)
    monkeypatch.setenv(ENV_VAR, '{"label": "git:nothex"}')
    monkeypatch.chdir(tmp_path)
    code_version.cache_clear()
    try:
        rc = cli.main(["--space", "smoke", "--num-cpus", "1"])
    finally:
        monkeypatch.delenv(ENV_VAR)
        code_version.cache_clear()
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {ENV_VAR}=") and "is neither" in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_python_m_search_code_version_prints_the_env_value_and_the_runtime_env() -> None:
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("DBN_")}
    out = subprocess.run([sys.executable, "-m", "search.code_version"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert parse_code_version(out.strip()) == compute_code_version(str(ROOT))
    out = subprocess.run([sys.executable, "-m", "search.code_version", "--runtime-env"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    renv = json.loads(out)  # what `ray job submit --runtime-env-json` takes
    assert list(renv) == ["env_vars"] and parse_code_version(renv["env_vars"][ENV_VAR]) == compute_code_version(str(ROOT))


_WORKER = """
import json, os
from search.code_version import ENV_VAR, code_version

driver = code_version()        # this driver's, from its environment (its copy has no .git either)
del os.environ[ENV_VAR]        # so the worker can have it only from the runtime env the driver gives Ray
from search.sweep.driver import init_ray
init_ray(None, 1)
import ray

@ray.remote(num_cpus=1)
def worker():
    import search.code_version as m
    return m.__file__, m.code_version().label

where, label = ray.get(worker.remote(), timeout=120)
print(json.dumps([driver.label, where, label]))
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_ray_worker_records_the_drivers_version(tmp_path: Path) -> None:
    import json

    from _procs import reap

    driver = _driver_version()
    code = _ship_without_git(tmp_path / "node")
    proc = subprocess.Popen([sys.executable, "-c", _WORKER], cwd=code, start_new_session=True, text=True,
                            env=_node_env(code, **{ENV_VAR: driver.to_json()}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        reap(proc.pid)  # the local Ray's processes, by this session's id
    assert proc.returncode == 0, err[-3000:]
    driver_label, where, worker_label = json.loads(out.strip().splitlines()[-1])
    assert Path(where).resolve().is_relative_to(code.resolve()), where
    assert driver_label == worker_label == driver.label
