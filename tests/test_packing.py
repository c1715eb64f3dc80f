"""--gpus-per-trial auto, with a stubbed memory reading (no GPU needed)."""
from __future__ import annotations

import pytest

from search.config import TrialConfig
from search.sweep.packing import CUDA_CONTEXT_BYTES, HEADROOM, auto_gpus_per_trial, gpu_fraction

GiB = 2**30


def test_fraction_is_largest_k_that_fits() -> None:
    # 80 GiB GPU, 3 GiB peak: need 3*1.25 + ctx per trial -> floor(80 / need) trials, capped at 8.
    need = 3 * GiB * HEADROOM + CUDA_CONTEXT_BYTES
    k = int(80 * GiB // need)
    assert gpu_fraction(3 * GiB, 80 * GiB) == pytest.approx(1 / min(k, 8))
    assert gpu_fraction(20 * GiB, 80 * GiB) == pytest.approx(1 / 3)  # 25.6 GiB each -> 3 fit
    assert gpu_fraction(100 * 2**20, 80 * GiB) == pytest.approx(1 / 8)  # tiny trials: capped


def test_packing_never_exceeds_memory() -> None:
    for peak_gib in (0.5, 1, 2, 5, 9.9, 17, 30, 60):
        f = gpu_fraction(int(peak_gib * GiB), 80 * GiB)
        k = round(1 / f)
        assert k * (peak_gib * GiB * HEADROOM + CUDA_CONTEXT_BYTES) <= 80 * GiB


def test_one_trial_too_big_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"--gpus-per-trial auto: one trial needs ~.*GiB but the GPU has 16.0 GiB"):
        gpu_fraction(20 * GiB, 16 * GiB)


def test_auto_measures_the_largest_config_per_backbone() -> None:
    seen = []

    def fake_measure(cfg: TrialConfig) -> tuple[int, int]:
        seen.append(cfg.width)
        return int(cfg.width * GiB), 80 * GiB  # memory grows with width

    configs = [TrialConfig(width=w).to_dict() for w in (1, 4, 2)]
    f = auto_gpus_per_trial(configs, measure=fake_measure)
    assert seen == [4.0]
    assert f == gpu_fraction(4 * GiB, 80 * GiB)


def test_resident_data_counts_cifar_and_its_padded_copy() -> None:
    from search.sweep.packing import resident_data_bytes

    cfg = TrialConfig(dataset="cifar10", data_dir="/nowhere")
    # 60k images x 3 x (32^2 + 40^2) bytes: the uint8 set plus its 4-px padded training copy.
    assert resident_data_bytes(cfg) == 60_000 * 3 * (32 * 32 + 40 * 40)
    assert resident_data_bytes(cfg.replace(dataset="imagefolder", num_classes=10)) == 0
