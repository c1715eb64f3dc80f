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
        for name in ("gpu_throughput", "packing", "probe_cost", "paper_grid_cost", "_common"):
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


def test_paper_grid_cost_prints_network_table_and_projection(bench, capsys) -> None:
    mod = bench("paper_grid_cost")
    common = bench("_common")
    rows = mod.main(["--device", "cpu", "--threads", "1", "--only", "cifar_wrn", "--n-train", "32", "--n-test", "16"])
    text = capsys.readouterr().out
    assert text.startswith("paper_grid_cost: 26 grid trials over 1 networks") and "device: cpu" in text
    table = common.parse_markdown_table(text, "network")
    assert [r["network"] for r in table] == ["cifar_wrn-10-1"]  # shrunk on CPU; the recipe's batch capped at 16
    r = table[0]
    assert r["batch"] == "16" and _positive(r["eager img/s"]) and _positive(r["probe block s"])
    assert _positive(r["probe % of epoch"]) and _positive(r["eval s/epoch"])
    for col in ("graphed img/s", "hand img/s", "busy graphed", "MFU graphed", "auto k", "packed img/s"):
        assert r[col] == "n/a", col  # CUDA only
    proj = {p["setting"]: p for p in common.parse_markdown_table(text, "setting")}
    assert list(proj) == ["eager, one trial per GPU", "graphed, one trial per GPU", "graphed, packed at auto k"]
    eager = proj["eager, one trial per GPU"]
    # The printed hours are the closed form of the measured rates: 26 trials of 200 epochs.
    row = rows[0]
    assert row["epochs"] == 200 and row["trials"] == 26
    trial = 200 * (50_000 / row["eager"]["rate"] + row["eager"]["eval_s"] * 10_000 / 16) \
        + row["eager"]["probe_s"] + row["eager"]["eval_s"] * (10_000 / 16 - 1)
    assert _num(eager["GPU-hours (1 GPU, sum)"]) == pytest.approx(26 * trial / 3600, rel=0.01, abs=0.06)
    assert _num(eager["wall h on 8 GPUs"]) == pytest.approx(max(26 * trial / 8, trial) / 3600, rel=0.01, abs=0.06)
    assert proj["graphed, packed at auto k"]["GPU-hours (1 GPU, sum)"] == "n/a"
    assert "targets:" in text and "grid <= 32 GPU-hours packed" in text


def test_paper_grid_projection_counts_packing(bench) -> None:
    # Hand-made measurements: 1000 img/s alone, 3000 img/s aggregate at k = 4, 1 s eval, 10 s probes.
    mod = bench("paper_grid_cost")
    m = dict(rate=1000.0, eval_s=1.0, probe_s=10.0, status="ok")
    row = dict(trials=10, epochs=100, n_test=10_000, k=4, eager=m, graphed=m,
               pack=dict(aggregate=3000.0, status="ok"))
    alone = 100 * (50 + 1) + 10  # seconds per trial
    assert mod.trial_seconds(row, "eager") == alone
    proj = {r[0]: r for r in mod.project([row])}
    assert _num(proj["graphed, one trial per GPU"][1]) == pytest.approx(10 * alone / 3600, abs=0.05)
    packed = proj["graphed, packed at auto k"]
    assert _num(packed[1]) == pytest.approx(10 * alone / 3 / 3600, abs=0.05)  # speed-up 3
    # Each packed trial takes k / speed-up = 4/3 as long; 8 GPUs split the GPU-hours.
    assert _num(packed[3]) == pytest.approx(alone * 4 / 3 / 3600, abs=0.005)
    assert _num(packed[2]) == pytest.approx(max(10 * alone / 3 / 8, alone * 4 / 3) / 3600, abs=0.05)


def test_paper_grid_cost_reports_a_failed_network_and_goes_on(bench, capsys, monkeypatch) -> None:
    mod = bench("paper_grid_cost")
    real = mod.measure

    def measure(net, args):
        if net["backbone"] == "cifar_resnext":
            raise RuntimeError("field 'cuda_graphs' = 'on' but the training step cannot be captured: x")
        return real(net, args)

    monkeypatch.setattr(mod, "measure", measure)
    rows = mod.main(["--device", "cpu", "--threads", "1", "--only", "cifar_resnext,cifar_wrn", "--n-train", "32",
                     "--n-test", "16"])
    text = capsys.readouterr().out
    assert [r["backbone"] for r in rows] == ["cifar_wrn"]
    assert "FAILED cifar_resnext-11-0.25: RuntimeError: field 'cuda_graphs'" in text
    assert "not measured (their trials are left out of the projection): cifar_resnext-11-0.25" in text
    assert "projected cost of paper_cifar --profile paper (26 trials;" in text
