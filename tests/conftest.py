"""Shared fixtures: small thread counts (2-core machines), no GPU needed, no network."""
from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _threads() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover - analysis-only environments
        return
    torch.set_num_threads(2)
