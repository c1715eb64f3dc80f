"""Shared fixtures: one torch thread (2-core machines), no GPU needed, no network."""
from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# The report a sweep attaches to its MLflow parent run costs ~8 s of CPU: only the tests of it ask for it.
os.environ.setdefault("DBN_SWEEP_REPORT", "off")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _threads() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover - analysis-only environments
        return
    torch.set_num_threads(1)  # tiny nets: a 2nd thread buys little and thrashes when Ray workers share the cores


@pytest.fixture
def no_onednn():
    # oneDNN builds a kernel per new conv shape (seconds for DenseNet's many shapes on these
    # CPUs); the native kernels give the same results and run one-off forwards far faster.
    # Training loops reuse their shapes, where oneDNN is ~2x faster: so this is opt-in.
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    prev = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = prev
