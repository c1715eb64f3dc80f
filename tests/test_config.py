"""TrialConfig: validation messages, round trips, and a hash stable across processes."""
from __future__ import annotations

import subprocess
import sys

import pytest

from search.config import ConfigError, TrialConfig, parse_override


def test_round_trip_and_replace() -> None:
    cfg = TrialConfig(width=4, dropout_placement="pre_bn", dropout_rate=0.5)
    again = TrialConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.config_hash == cfg.config_hash
    assert cfg.replace(seed=1).config_hash != cfg.config_hash


def test_hash_ignores_execution_knobs_but_not_experiment_fields() -> None:
    cfg = TrialConfig()
    assert cfg.replace(device="cpu", compile=True, data_dir="/x", num_workers=4).config_hash == cfg.config_hash
    assert cfg.replace(dropout_rate=0.1).config_hash != cfg.config_hash
    assert TrialConfig(width=2).config_hash == TrialConfig(width=2.0).config_hash  # int vs float


def test_hash_stable_across_processes() -> None:
    code = ("from search.config import TrialConfig;"
            "print(TrialConfig(width=2.5, dropout_placement='pre_conv', dropout_rate=0.3).config_hash)")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(s), "PATH": ""}).stdout.strip() for s in (1, 2)}
    assert outs == {TrialConfig(width=2.5, dropout_placement="pre_conv", dropout_rate=0.3).config_hash}
    # The hash is pinned: changing it silently would orphan every stored result.
    assert TrialConfig().config_hash == "ccfedd86282c3105"


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(dropout_rate=1.0), r"field 'dropout_rate' must be in \[0, 1\), got 1.0"),
    (dict(dropout_rate=-0.1), r"field 'dropout_rate' must be in \[0, 1\)"),
    (dict(dropout_placement="pre"), r"field 'dropout_placement' = 'pre' is not allowed \(allowed: none, pre_bn, pre_conv, head, pre_pool, post_conv,"
     r" post_bn, post_add\); did you mean 'pre_bn'"),
    (dict(dropout_type="bernouli"), r"field 'dropout_type' = 'bernouli' .*allowed: bernoulli, gaussian, uout.*did you mean 'bernoulli'"),
    (dict(depth=15), r"field 'depth' = 15 is invalid for backbone 'cifar_wrn': depth must be 6n\+4"),
    (dict(backbone="cifar_resnext", depth=28), r"field 'depth' = 28 .*'cifar_resnext'.*9n\+2"),
    (dict(backbone="resnt18", depth=None), r"field 'backbone' = 'resnt18' is not a timm model.*did you mean resnet18"),
    (dict(backbone="resnet18", depth=16), r"field 'depth' = 16 is only for the registered families"),
    (dict(width=0), r"field 'width' must be > 0"),
    (dict(epochs="3"), r"field 'epochs' expects int, got '3'"),
    (dict(dataset="fmnist"), r"field 'dataset' = 'fmnist' is not allowed \(allowed: digits, synthetic, cifar10, "
                             r"cifar100, imagefolder, fashion_mnist, mnist\)"),
])
def test_bad_values_name_field_value_and_allowed(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        TrialConfig(**kwargs)


def test_unknown_key_suggests() -> None:
    with pytest.raises(ConfigError, match=r"unknown field 'widht'; did you mean width"):
        TrialConfig.from_dict({"widht": 2})


def test_parse_override_types_and_never_evaluates() -> None:
    assert parse_override("width=4") == ("width", 4.0)
    assert parse_override("depth=none") == ("depth", None)
    assert parse_override("nesterov=false") == ("nesterov", False)
    assert parse_override("backbone=__import__('os')") == ("backbone", "__import__('os')")  # a string, not code
    with pytest.raises(ConfigError, match=r"field 'epochs' expects int, got 'ten'"):
        parse_override("epochs=ten")
    with pytest.raises(ConfigError, match=r"unknown field 'epoch'; did you mean epochs"):
        parse_override("epoch=3")
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_override("epochs")


def test_unset_depth_resolves_to_the_family_default() -> None:
    # A depth left unset is the family's default (the registry's), never an error for a stock timm model.
    from search import registry

    assert TrialConfig.from_dict(dict(backbone="resnet18")).depth is None
    for entry in registry.entries("backbone"):
        if not entry.meta.get("stock"):
            assert TrialConfig.from_dict(dict(backbone=entry.name)).depth == entry.meta["default_depth"]
    # ... and the default keeps the hash a config with the depth written out has.
    assert TrialConfig(backbone="cifar_wrn").config_hash == TrialConfig(backbone="cifar_wrn", depth=16).config_hash
