"""Models: timm registration of the CIFAR families, width scaling, stems, build_model's
seeding and class count, ImageNet-size forward/backward, and the configuration errors."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from search.config import ConfigError, TrialConfig, family_names
from search.trial.models import (
    CIFAR_BACKBONES, STOCK_BACKBONES, SUPPORTED_BACKBONES, build_model, family_of, resolve_num_classes,
)
from search.trial.models.stock import create_stock, width_kwargs

pytestmark = pytest.mark.usefixtures("no_onednn")



def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):  # shapes only: paper-size nets cost nothing
        return timm.create_model(name, pretrained=False, **kwargs)


def test_cifar_families_are_in_timms_registry() -> None:
    assert set(timm.list_models("cifar_*")) >= set(family_names())
    model = timm.create_model("cifar_wrn", depth=16, width=4, num_classes=10)
    assert isinstance(model, nn.Module) and n_params(model) == 2_748_890  # WRN-16-4: 2.7M
    assert model.pretrained_cfg["classifier"] == "fc" and model.get_classifier() is model.fc
    model.reset_classifier(5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("name", CIFAR_BACKBONES)
def test_cifar_family_timm_interface(name: str) -> None:
    model = meta_model(name, num_classes=7, in_chans=1)
    cfg = model.pretrained_cfg
    assert isinstance(model.get_submodule(cfg["classifier"]), nn.Linear)
    assert model.get_submodule(cfg["first_conv"]).in_channels == 1
    assert model.num_classes == 7 and model.fc.out_features == 7
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("name, kwargs, params", [
    ("cifar_wrn", dict(depth=28, width=10), 36_479_194),  # WRN-28-10: 36.5M
    ("cifar_densenet_bc", dict(depth=100), 769_162),  # DenseNet-BC L=100 k=12: 0.8M
    ("cifar_resnext", dict(depth=29), 34_426_698),  # ResNeXt-29 8x64d: 34.4M
    ("cifar_preresnet", dict(depth=164), 1_703_258),  # PreResNet-164 (bottleneck): 1.7M
    ("cifar_preresnet", dict(depth=110), 1_730_522),  # He et al.'s PreResNet-110 (basic): 1.7M
])
def test_paper_sizes_match_the_literature(name: str, kwargs: dict, params: int) -> None:
    assert n_params(meta_model(name, num_classes=10, **kwargs)) == params


@pytest.mark.parametrize("name", CIFAR_BACKBONES)
def test_params_grow_with_width_cifar(name: str) -> None:
    counts = [n_params(meta_model(name, width=w)) for w in (0.5, 1.0, 1.5, 2.0)]
    assert counts == sorted(counts) and len(set(counts)) == 4


@pytest.mark.parametrize("name", STOCK_BACKBONES)
def test_params_grow_with_width_stock(name: str) -> None:
    with torch.device("meta"):
        counts = [n_params(create_stock(name, num_classes=10, **width_kwargs(name, w))) for w in (0.25, 0.5, 1.0)]
        default = n_params(timm.create_model(name, pretrained=False, num_classes=10))
    assert counts == sorted(counts) and len(set(counts)) == 3
    assert counts[-1] == default  # width 1 is timm's model unchanged
    assert width_kwargs(name, 1.0) == {}


def test_width_scales_timm_knobs() -> None:
    assert width_kwargs("resnet50", 0.5) == {"channels": (32, 64, 128, 256)}
    assert width_kwargs("wide_resnet50_2", 2.0) == {"channels": (128, 256, 512, 1024)}
    assert width_kwargs("densenet121", 0.5) == {"growth_rate": 16}


@pytest.mark.parametrize("name", SUPPORTED_BACKBONES)
def test_family_of(name: str) -> None:
    family = family_of(name)
    assert family == name if name in family_names() else family in ("resnet", "densenet")


def test_cifar_stem_auto_below_64px() -> None:
    small = build_model(TrialConfig(backbone="resnet18", depth=None, width=0.25, image_size=32))
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity) and isinstance(small.bn1, nn.BatchNorm2d)
    big = build_model(TrialConfig(backbone="resnet18", depth=None, width=0.25, image_size=64))
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)
    forced = build_model(TrialConfig(backbone="densenet121", depth=None, width=0.25, image_size=224, stem="cifar"))
    assert forced.features.conv0.stride == (1, 1) and isinstance(forced.features.pool0, nn.Identity)
    assert small.drop_rate == 0.0  # timm's own classifier dropout stays off


@pytest.mark.parametrize("name", STOCK_BACKBONES)
def test_forward_backward_224(name: str) -> None:
    cfg = TrialConfig(backbone=name, depth=None, width=0.25, image_size=224, dropout_placement="pre_bn",
                      dropout_rate=0.1, num_classes=5)
    model = build_model(cfg).train()
    out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 5)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_in_chans_one() -> None:
    model = build_model(TrialConfig(backbone="cifar_densenet_bc", depth=10, in_chans=1, dropout_placement="pre_conv"))
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    stock = build_model(TrialConfig(backbone="resnet18", depth=None, width=0.25, in_chans=1))
    assert stock(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("backbone, depth", [("cifar_wrn", 10), ("resnet18", None)])
def test_same_seed_same_weights(backbone: str, depth: int | None) -> None:
    cfg = TrialConfig(backbone=backbone, depth=depth, width=0.5, seed=7, dropout_placement="pre_bn")
    a, b = build_model(cfg).state_dict(), build_model(cfg).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = build_model(cfg.replace(seed=8)).state_dict()
    weights = [k for k in a if k.endswith("weight") and a[k].dim() > 1]
    assert weights and all(not torch.equal(a[k], c[k]) for k in weights)


def test_num_classes_resolution() -> None:
    cfg = TrialConfig(dataset="cifar100")
    assert resolve_num_classes(cfg) == 100 and resolve_num_classes(cfg, 3) == 3
    assert resolve_num_classes(cfg.replace(num_classes=4)) == 4
    assert build_model(TrialConfig(backbone="cifar_wrn", depth=10, dataset="cifar100")).fc.out_features == 100
    with pytest.raises(ValueError, match="field 'num_classes' is None and dataset 'imagefolder'"):
        build_model(TrialConfig(dataset="imagefolder"))
    assert build_model(TrialConfig(dataset="imagefolder", depth=10), num_classes=6).fc.out_features == 6


def test_dropout_sites_attribute() -> None:
    model = build_model(TrialConfig(backbone="cifar_wrn", depth=10, dropout_placement="head"))
    assert isinstance(model.dropout_sites, list) and model.dropout_sites[0].module == "fc.0"
    assert build_model(TrialConfig(depth=10)).dropout_sites == []


# ------------------------------------------------------------------------ errors
def test_unknown_backbone() -> None:
    with pytest.raises(ConfigError, match="field 'backbone' = 'resnet_19' is not a timm model"):
        TrialConfig(backbone="resnet_19", depth=None)
    with pytest.raises(ValueError, match="field 'backbone' = 'resnet_19'"):
        family_of("resnet_19")


@pytest.mark.parametrize("name, depth", [
    ("cifar_wrn", 17), ("cifar_preresnet", 12), ("cifar_resnext", 28), ("cifar_densenet_bc", 41), ("cifar_wrn", 4),
])
def test_bad_depth_for_family(name: str, depth: int) -> None:
    with pytest.raises(ValueError, match=rf"field 'depth' = {depth} is invalid for backbone '{name}': depth must be"):
        timm.create_model(name, depth=depth)


def test_preresnet_forced_block_must_fit_depth() -> None:
    with pytest.raises(ValueError, match="field 'depth' = 29 is invalid for cifar_preresnet with block='basic'"):
        timm.create_model("cifar_preresnet", depth=29, block="basic")
    with pytest.raises(ValueError, match="argument 'block' = 'wide' is not allowed"):
        timm.create_model("cifar_preresnet", depth=20, block="wide")


def test_width_not_supported() -> None:
    cfg = TrialConfig(backbone="convnext_atto", depth=None, width=2.0)
    with pytest.raises(ValueError, match=r"field 'width' = 2.0 is not supported for backbone 'convnext_atto'"
                                         r" \(timm family 'convnext'\).*resnet18"):
        build_model(cfg)
    assert build_model(cfg.replace(width=1.0))(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_width_too_small() -> None:
    with pytest.raises(ValueError, match="field 'width' is too small for backbone 'resnext50_32x4d'"):
        build_model(TrialConfig(backbone="resnext50_32x4d", depth=None, width=0.05))
    with pytest.raises(ValueError, match="field 'width' = 0 is invalid"):
        timm.create_model("cifar_wrn", width=0)


def test_cifar_stem_unsupported_family() -> None:
    with pytest.raises(ValueError, match="field 'stem' = 'cifar' is not supported for backbone 'convnext_atto'"):
        build_model(TrialConfig(backbone="convnext_atto", depth=None, stem="cifar"))
