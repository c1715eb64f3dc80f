"""search.run (search.sweep.cli)'s command line: listing, dry runs, and bad input (one line, exit 2, nothing written)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.run", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


def test_list_shows_every_space_with_counts(tmp_path: Path) -> None:
    out = _run(tmp_path, "--list")
    assert out.returncode == 0, out.stderr
    for name in ("wrn_widths", "backbones", "paper_cifar", "uout_beta", "smoke"):
        assert f"{name}:" in out.stdout
    assert "quick" in out.stdout and "trials" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_dry_run_prints_table_and_count_and_writes_nothing(tmp_path: Path) -> None:
    out = _run(tmp_path, "--space", "smoke", "--dry-run", "--seeds", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "20 trials (smoke, profile quick, algo grid)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, pattern", [
    (["--space", "wrn_width"], "field 'space' = 'wrn_width' is not allowed (allowed: backbones, literature, paper_cifar, smoke, uout_beta, wrn_widths); did you mean 'wrn_widths'?"),
    (["--space", "smoke", "--profile", "huge"], "'huge'"),
    (["--space", "smoke", "--set", "epochs=ten"], "field 'epochs' expects int, got 'ten'"),
    (["--space", "smoke", "--set", "epoch=1"], "unknown field 'epoch'; did you mean epochs"),
    (["--space", "smoke", "--set", "backbone=resnt18", "--set", "depth=none"], "field 'backbone' = 'resnt18' is not a timm model"),
    (["--space", "smoke", "--set", "depth=12"], "field 'depth' = 12 is invalid for backbone 'cifar_wrn'"),
    (["--space", "smoke", "--set", "dropout_rate=1.5"], "field 'dropout_rate' must be in [0, 1)"),
    (["--space", "smoke", "--algo", "bayes"], "--algo 'bayes' is not allowed (allowed: grid, random, optuna)"),
    (["--space", "smoke", "--gpus-per-trial", "half"], "--gpus-per-trial 'half' must be 'auto' or a number"),
    (["--space", "smoke", "--data-dir", "/nonexistent/cifar"], "--data-dir '/nonexistent/cifar' is not a directory"),
    (["--space", "smoke", "--tracking-uri", "http://127.0.0.1:9/"], "--tracking-uri 'http://127.0.0.1:9/' is not reachable"),
    (["--space", "smoke", "--tracking-uri", "ftp://x"], "--tracking-uri 'ftp://x': unsupported scheme"),
    (["--space", "smoke", "--storage", "/proc/nope"], "--storage '/proc/nope'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, args: list[str], pattern: str) -> None:
    out = _run(tmp_path, *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert pattern in lines[0]
    assert "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []
