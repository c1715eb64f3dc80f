"""The GPU benchmarks run on CPU with the tiniest settings and print well-formed tables with finite ratios.

They exist so the scripts cannot silently rot: each main() runs in this process
(packing's own workers are subprocesses, as on a GPU) and its printed Markdown
table is parsed back.
"""
from __future__ import annotations

import importlib
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """Import benchmarks/<name>.py by name (the folder is not a package); restore torch's thread count."""
    sys.path.insert(0, str(BENCH))
    threads = torch.get_num_threads()
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        torch.set_num_threads(threads)
        # The scripts also put their folder on sys.path; leave no trace for the other test files.
        sys.path[:] = [p for p in sys.path if p != str(BENCH)]
        for name in ("gpu_throughput", "packing", "probe_cost", "_common"):
            sys.modules.pop(name, None)


def _num(cell: str) -> float:
    return float(cell.replace(",", ""))


def _positive(cell: str) -> bool:
    v = _num(cell)
    return math.isfinite(v) and v > 0


TINY = ["--device", "cpu", "--threads", "1", "--image-size", "8", "--n-train", "48", "--n-test", "16"]


def test_gpu_throughput_prints_finite_ratios(bench, capsys) -> None:
    mod = bench("gpu_throughput")
    common = bench("_common")
    mod.main(TINY + ["--models", "cifar_wrn:10:1,resnet18:none:0.25", "--batch-sizes", "16", "--warmup-epochs", "1",
                     "--epochs", "1", "--rounds", "1", "--workers", "1"])
    text = capsys.readouterr().out
    assert "timer: time.perf_counter per epoch" in text and "excluding evaluation" in text
    assert text.startswith("gpu_throughput") and "device: cpu" in text
    rows = common.parse_markdown_table(text, "model")
    assert [r["model"] for r in rows] == ["cifar_wrn-10-1", "resnet18-x0.25"]
    for r in rows:
        assert r["batch"] == "16"
        for col in ("trainer img/s", "plain img/s", "dataloader img/s", "trainer/plain", "trainer/dataloader",
                    "train GFLOP/img"):
            assert _positive(r[col]), (col, r)
        assert r["MFU"] == "n/a"  # no peak FLOP/s on CPU
    assert "target trainer/plain >= 0.95" in text and "target trainer/dataloader >= 1.5" in text


def test_packing_runs_separate_processes(bench, capsys) -> None:
    mod = bench("packing")
    common = bench("_common")
    rows = mod.main(TINY + ["--ks", "1,2", "--depth", "10", "--width", "1", "--batch-size", "16", "--epochs", "1",
                            "--warmup-epochs", "0", "--timeout", "120"])
    text = capsys.readouterr().out
    table = common.parse_markdown_table(text, "k")
    assert [r["k"] for r in table] == ["1", "2"]
    for r in table:
        assert r["status"] == "ok", r
        assert _positive(r["aggregate img/s"]) and _positive(r["per-trial img/s"]) and _positive(r["speed-up vs k=1"])
        assert r["GPU busy"] == "n/a"
    assert table[0]["speed-up vs k=1"] == "1.00"
    assert "--gpus-per-trial auto: n/a (needs CUDA)" in text and "out of memory: none" in text
    assert not any(r["oom"] for r in rows)


def test_probe_cost_prints_fraction_of_epoch(bench, capsys) -> None:
    mod = bench("probe_cost")
    common = bench("_common")
    mod.main(TINY + ["--depth", "10", "--width", "1", "--batch-size", "16", "--probe-batch", "32"])
    text = capsys.readouterr().out
    rows = {r["variant"]: r for r in common.parse_markdown_table(text, "variant")}
    assert _positive(rows["run_trial probe_time_s"]["% of epoch"])
    for name in ("same calls, cold (first call)", "same calls, warm (repeat)", "what-if: probe batch 32"):
        for col in ("measure s", "reestimate s", "eval after s", "measure after s", "block s", "% of epoch"):
            assert _positive(rows[name][col]), (name, col)
    assert rows["what-if: bf16 autocast"]["block s"] == "n/a"  # CUDA only
    assert "target block <= 10% of an epoch" in text


def test_helpers(bench) -> None:
    c = bench("_common")
    assert c.peak_for_name("NVIDIA H100 80GB HBM3") == ("H100", 989e12)
    assert c.peak_for_name("NVIDIA H100 PCIe")[1] == 756e12
    assert c.peak_for_name("NVIDIA H200")[1] == 989e12
    assert c.peak_for_name("NVIDIA A100-SXM4-80GB")[1] == 312e12
    assert c.peak_for_name("Tesla T4") == (None, None)
    assert c.parse_model_spec("resnet18") == ("resnet18", None, 1.0)
    assert c.parse_model_spec("cifar_wrn:28:10") == ("cifar_wrn", 28, 10.0)
    clock = c.EpochClock(torch.device("cpu"))
    batches = [(torch.zeros(4, 1), torch.zeros(4)), (torch.zeros(2, 1), torch.zeros(2))]
    loader = c.TimedLoader(batches, clock)
    assert len(loader) == 2
    for _ in range(2):
        list(loader)
    for _ in loader:
        break  # an abandoned pass (divergence) is not recorded
    assert len(clock.spans) == 2 and clock.seconds(skip=1)[1] == 6


def test_busy_sampler_reads_nvidia_smi(bench, tmp_path, monkeypatch) -> None:
    # A stand-in nvidia-smi that streams a utilisation line every 20 ms, as `-lms` does.
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nwhile true; do echo 40; echo '[N/A]'; sleep 0.02; done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    sampler = bench("packing").BusySampler(20, "0")
    t0 = time.time()
    sampler.start()
    time.sleep(0.3)
    sampler.stop()
    assert sampler.source.startswith("nvidia-smi")
    assert sampler.busy(t0, time.time()) == pytest.approx(0.40)
    assert sampler.busy(t0 - 10, t0 - 5) is None
