"""One-factor-at-a-time ablation (search/sweep/ablate.py) and the report's ablation section.

The plan is checked against its definition (each trial differs from the baseline in one factor,
plus what the space's condition forces); the end-to-end test runs a small ablation on a local Ray
and checks the report's table against paired differences computed here from the Parquet trials.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from scipy import stats

from search.config import TrialConfig
from search.sweep import cli
from search.sweep.ablate import plan
from spaces import get_space

PY = sys.executable
DROPOUT_FORCED = {"dropout_type", "dropout_rate"}  # what placement=none resets (spaces.dropout_condition)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def differing(a: dict, b: dict) -> set[str]:
    return {k for k in a if a[k] != b[k] and k != "plugins"}


def test_wrn_widths_dry_run_lists_the_baseline_and_one_factor_trials(capsys: pytest.CaptureFixture) -> None:
    rc, out, err = run_cli(["--space", "wrn_widths", "--ablate", "--dry-run"], capsys)
    assert rc == 0, err
    lines = out.strip().splitlines()
    rows = [line.split() for line in lines[1:-1]]
    assert rows[0][1] == "baseline"
    space = get_space("wrn_widths")
    seeds = space.seeds("quick") if callable(getattr(space, "seeds", None)) else 1  # the profile's replicates
    trials = plan(space, "quick", seeds=seeds)
    assert [r[0] for r in rows] == [t.config_hash for t in trials]
    # The profile's grid minus the baseline's value for width and placement; the declared levels for the rest.
    got = {(r[1], r[2]) for r in rows if r[1] != "baseline"}
    assert got == {("width", "1.0"), ("width", "2.0"), ("dropout_placement", "none"), ("dropout_placement", "pre_conv"),
                   ("dropout_placement", "head"), ("dropout_type", "gaussian"), ("dropout_type", "uout"),
                   ("dropout_rate", "0.1"), ("dropout_rate", "0.3")}
    assert lines[-1].startswith(f"{10 * seeds} trials: baseline + 9 one-factor changes")


def test_each_trial_changes_one_factor_and_seeds_pair() -> None:
    space = get_space("wrn_widths")
    trials = plan(space, "quick", seeds=3, overrides={"epochs": 2})
    base = {t.seed: t.config for t in trials if t.factor == "baseline"}
    assert sorted(base) == [0, 1, 2]
    for t in trials:
        assert t.config["epochs"] == 2
        if t.factor == "baseline":
            continue
        diff = differing(t.config, base[t.seed])
        allowed = {t.factor, *(DROPOUT_FORCED if (t.factor, t.level) == ("dropout_placement", "none") else ())}
        assert t.factor in diff and diff <= allowed, (t.factor, t.level, diff)
    # Finished grid trials are reused by hash: WRN-10-1 pre_bn bernoulli@0.5 is also a grid trial of the space.
    grid = {TrialConfig.from_dict(c).config_hash for c in space.grid("quick")}
    one = plan(space, "quick")
    assert {t.config_hash for t in one if t.factor in ("width", "dropout_placement")} <= grid


@pytest.mark.parametrize("argv, want", [
    (["--space", "wrn_widths", "--ablate", "--algo", "random"], "--algo 'random' is not allowed with it"),
    (["--space", "smoke", "--ablate"], "space 'smoke' declares no baseline: pass --baseline KEY=VALUE"),
    (["--space", "wrn_widths", "--ablate", "width=1", "--set", "width=2"], "an ablated factor cannot also be fixed"),
    (["--space", "wrn_widths", "--ablate", "widht=1"], "unknown field 'widht'; did you mean 'width'?"),
    (["--space", "wrn_widths", "--ablate", "dropout_type=foo"], "field 'dropout_type' = 'foo' is not allowed"),
    (["--space", "wrn_widths", "--ablate", "--baseline", "width=-1"], "baseline: field 'width' must be > 0"),
])
def test_bad_ablation_input_is_one_line(argv: list[str], want: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    rc, out, err = run_cli(argv + ["--dry-run"], capsys)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and want in err, err
    rc, _, err = run_cli(argv + ["--storage", str(tmp_path / "r")], capsys)  # not dry: still nothing written
    assert rc == 2 and not (tmp_path / "r").exists(), err


def t_interval(d: np.ndarray) -> tuple[float, float]:
    half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    return d.mean() - half, d.mean() + half


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_small_ablation_and_its_report_table(tmp_path: Path) -> None:
    args = ["--space", "smoke", "--ablate", "dropout_placement=none,head", "--baseline", "dropout_placement=pre_bn",
            "--baseline", "dropout_type=bernoulli", "--baseline", "dropout_rate=0.5", "--seeds", "2",
            "--set", "train_samples=64", "--num-cpus", "2", "--quiet"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([PY, "-m", "search.run", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    planned = json.loads((tmp_path / "results" / "smoke" / "ablation.json").read_text())
    assert [(t["factor"], t["level"], t["seed"]) for t in planned["trials"]] == [
        ("baseline", None, 0), ("baseline", None, 1), ("dropout_placement", "none", 0),
        ("dropout_placement", "none", 1), ("dropout_placement", "head", 0), ("dropout_placement", "head", 1)]

    # Reuse by hash whatever the code version (files may change between the two runs while developing).
    reuse = ["--reuse", "any"] if "--reuse" in cli._parser().format_help() else []
    again = subprocess.run([PY, "-m", "search.run", *args, *reuse], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300, env=env)
    assert again.returncode == 0 and "6 of 6 trials already finished" in again.stdout, again.stdout + again.stderr

    trials = ds.dataset(str(tmp_path / "results" / "smoke" / "trials"), format="parquet").to_table().to_pylist()
    by_hash = {r["config_hash"]: r for r in trials}
    assert set(by_hash) == {t["config_hash"] for t in planned["trials"]} and len(trials) == 6
    assert {r["status"] for r in trials} == {"ok"}

    from analysis.load import load_study
    from analysis.report import ablation_table, main

    table = ablation_table(load_study("smoke", root=str(tmp_path / "results")), str(tmp_path / "results"))
    assert table is not None and [r[1:3] for r in table.rows] == [["dropout_placement", "none"],
                                                                 ["dropout_placement", "head"]]
    base = {t["seed"]: by_hash[t["config_hash"]] for t in planned["trials"] if t["factor"] == "baseline"}
    for row in table.rows:
        var = {t["seed"]: by_hash[t["config_hash"]] for t in planned["trials"] if t["level"] == row[2]}
        metrics = {
            "acc": lambda r: r["test_acc"],
            "gain": lambda r: r["test_acc_reest"] - r["test_acc"],
            "shift": lambda r: r["mean_shift"],
        }
        d = {k: np.array([f(var[s]) - f(base[s]) for s in (0, 1)]) for k, f in metrics.items()}
        assert row[3] == "2"
        assert row[4] == f"{100 * np.mean([base[s]['test_acc'] for s in (0, 1)]):.2f}"
        assert row[5] == f"{100 * np.mean([var[s]['test_acc'] for s in (0, 1)]):.2f}"
        assert row[6] == f"{100 * d['acc'].mean():+.2f}"
        lo, hi = t_interval(d["acc"])
        assert row[7] == f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"
        assert row[8] == f"{100 * d['gain'].mean():+.2f}"
        assert row[10] == f"{d['shift'].mean():+.3f}"
        lo, hi = t_interval(d["shift"])
        assert row[11] == f"[{lo:+.3f}, {hi:+.3f}]"

    rc = main(["--space", "smoke", "--root", str(tmp_path / "results"), "--out", str(tmp_path / "rep"),
               "--no-figures", "--n-boot", "100"])
    assert rc == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## One-factor-at-a-time ablation" in md and "| smoke | dropout_placement | head | 2 |" in md
