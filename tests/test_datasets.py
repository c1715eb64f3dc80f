"""Datasets are a registry category: adding one is one file (a `register_dataset` call and its reader).

The names TrialConfig allows, the classes a model gets, whether flips are drawn, preflight's file
check and the memory estimate of `--gpus-per-trial auto` all come from the registration; a dataset
registered at test time, from a plugin file, runs a trial through `run_trial`.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from search import registry
from search.config import ConfigError, TrialConfig

# One file: a plugin adding a 3-class dataset of 8x8 grey images (a bar at a class-dependent row).
STRIPES = textwrap.dedent('''
    from search import register_dataset

    CHECKED = []

    def check(data_dir):
        CHECKED.append(data_dir)

    @register_dataset("stripes", classes=3, channels=1, flip=False, images=120, check=check)
    def stripes(cfg):
        import torch

        gen = torch.Generator().manual_seed(0)
        y = torch.arange(120) % 3
        x = (40 * torch.rand(120, 1, 8, 8, generator=gen)).to(torch.uint8)
        for k in range(3):
            x[y == k, :, 2 + 2 * k, :] = 250   # class k: a bright row at 2 + 2k
        return x[:96], y[:96], x[96:], y[96:]
''')


@pytest.fixture
def stripes(tmp_path: Path):
    from search import plugins

    path = tmp_path / "stripes_plugin.py"
    path.write_text(STRIPES)
    plugin = plugins.load_plugin(str(path))
    yield plugin
    plugins.unload(plugin.name)


def test_the_builtin_datasets_are_the_registry_and_the_allowed_list() -> None:
    import search.config

    names = registry.names("dataset")
    assert names == ("digits", "synthetic", "cifar10", "cifar100", "imagefolder", "fashion_mnist", "mnist")
    assert search.config.DATASETS == names
    assert search.config.DATASET_CLASSES == {"digits": 10, "synthetic": 10, "cifar10": 10, "cifar100": 100,
                                             "fashion_mnist": 10, "mnist": 10}
    flips = {e.name for e in registry.entries("dataset") if e.meta["flip"]}
    assert flips == {"cifar10", "cifar100", "imagefolder", "fashion_mnist"}
    with pytest.raises(ConfigError) as e:
        TrialConfig(dataset="svhn")
    assert str(e.value).startswith("field 'dataset' = 'svhn' is not allowed (allowed: digits, synthetic, cifar10")


def test_a_dataset_registered_by_one_file_runs_a_trial(stripes) -> None:
    from search.trial.data import load_data
    from search.trial.runner import run_trial

    assert stripes.registered == (("dataset", "stripes"),)
    cfg = TrialConfig(dataset="stripes", backbone="cifar_wrn", depth=10, width=1, image_size=8, in_chans=1,
                      epochs=1, batch_size=32, device="cpu")
    assert cfg.plugins == stripes.identity  # its source enters the config hash, as a kind's does
    bundle = load_data(cfg, "cpu", reuse=False)
    assert (bundle.num_classes, bundle.n_train, bundle.n_test) == (3, 96, 24)
    assert bundle.train.flip is False  # from the registration (flip=False)
    r = run_trial(cfg)
    assert r.status == "ok" and r.epochs_completed == 1 and r.n_train == 96 and r.n_test == 24
    assert len(r.layers) == 7 and 0.0 <= r.test_acc <= 1.0


def test_preflight_classes_and_packing_read_the_registration(stripes, tmp_path: Path) -> None:
    import sys

    from search.sweep.packing import resident_data_bytes
    from search.sweep.preflight import check_trials
    from search.trial.models.build import resolve_num_classes

    cfg = TrialConfig(dataset="stripes", depth=10, image_size=8, in_chans=1, data_dir=str(tmp_path))
    assert resolve_num_classes(cfg) == 3
    assert resident_data_bytes(cfg) == 120 * (8 * 8 + 10 * 10)  # images x (image + its 1-pixel padded copy)
    check_trials([cfg.to_dict()])
    assert sys.modules[stripes.name].CHECKED == [str(tmp_path)]


def test_a_registration_is_checked_and_unregistering_removes_the_name() -> None:
    with pytest.raises(registry.RegistryError, match=r"dataset 'bad' channels = 2 is not allowed \(allowed: 1, 3\)"):
        registry.register_dataset("bad", lambda cfg: None, classes=2, channels=2, flip=False)
    registry.register_dataset("tmp_ds", lambda cfg: None, classes=2, channels=3, flip=True)
    try:
        assert TrialConfig(dataset="tmp_ds").dataset == "tmp_ds"
    finally:
        registry.unregister("dataset", "tmp_ds")
    with pytest.raises(ConfigError, match="field 'dataset' = 'tmp_ds' is not allowed"):
        TrialConfig(dataset="tmp_ds")


@pytest.mark.parametrize("case, message", [
    ("none", "its reader returned NoneType; allowed: a tuple (x_train, y_train, x_test, y_test)"),
    ("float images", "x_train of torch.float32 (4, 1, 8, 8); allowed: uint8 [N, C, H, W]"),
    ("labels short", "y_train of torch.int64 (3,); allowed: integer labels [N] with N = 4"),
    ("labels out of range", "y_train labels 0..3; allowed: 0..2 (classes=3)"),
])
def test_a_reader_returning_the_wrong_thing_is_one_line(case: str, message: str) -> None:
    import torch

    from search.trial.data import load_data

    x, y = torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    returned = {"none": None, "float images": (x.float(), y) * 2, "labels short": (x, y[:3]) * 2,
                "labels out of range": (x, torch.arange(4)) * 2}[case]
    registry.register_dataset("bad_reader", lambda cfg: returned, classes=3, channels=1, flip=False)
    try:
        cfg = TrialConfig(dataset="bad_reader", image_size=8, in_chans=1, device="cpu")
        with pytest.raises(ValueError) as e:
            load_data(cfg, "cpu", reuse=False)
        assert str(e.value).startswith("dataset 'bad_reader': its reader returned") and message in str(e.value)
        assert "\n" not in str(e.value)
    finally:
        registry.unregister("dataset", "bad_reader")
