"""`build_model(cfg)`: the registered backbone family (or any timm model), then dropout placement, then the
normalization axis (search/trial/models/normalization.py).

Importing this module registers `cifar_wrn`, `cifar_preresnet`, `cifar_resnext` and
`cifar_densenet_bc` with timm, so `timm.create_model` serves both kinds.
"""
from __future__ import annotations

import torch
from torch import nn

from search import registry
from search.config import ConfigError, TrialConfig, backbone_family
from search.trial.dropout.placements import PlacementSite
from search.trial.dropout.surgery import apply_placement

from search.trial.models import cifar_densenet, cifar_preresnet, cifar_resnext, cifar_wrn  # noqa: F401  (registers with timm)
from search.trial.models.cifar_densenet import DenseNetBC
from search.trial.models.cifar_preresnet import PreResNet
from search.trial.models.cifar_resnext import ResNeXt
from search.trial.models.cifar_wrn import WideResNet
from search.trial.models.normalization import apply_normalization
from search.trial.models.stock import STOCK_BACKBONES, create_stock, timm_family, width_kwargs

__all__ = [
    "SUPPORTED_BACKBONES", "CIFAR_BACKBONES", "STOCK_BACKBONES", "build_model", "family_of", "resolve_num_classes",
    "WideResNet", "PreResNet", "ResNeXt", "DenseNetBC", "PlacementSite",
]

CIFAR_BACKBONES: tuple[str, ...] = tuple(e.name for e in registry.entries("backbone") if e.name.startswith("cifar_"))
# Tested end to end with every placement; other timm names work where timm's model does.
SUPPORTED_BACKBONES: tuple[str, ...] = CIFAR_BACKBONES + STOCK_BACKBONES


def family_of(backbone: str) -> str:
    """The architecture family: the CIFAR family name itself, or the timm module that defines the model.

    e.g. 'cifar_wrn' -> 'cifar_wrn'; 'resnext50_32x4d' -> 'resnet'; 'densenet121' -> 'densenet'.

    Raises:
        ConfigError: unknown backbone.
    """
    entry = backbone_family(backbone)
    if entry is not None:
        return backbone
    return timm_family(backbone)


def resolve_num_classes(cfg: TrialConfig, num_classes: int | None = None) -> int:
    """Explicit `num_classes`, else cfg.num_classes, else the dataset's class count.

    Raises:
        ConfigError: none of the three is known (e.g. imagefolder without num_classes).
    """
    if num_classes is not None:
        return int(num_classes)
    if cfg.num_classes is not None:
        return cfg.num_classes
    classes = {e.name: e.meta["classes"] for e in registry.entries("dataset") if e.meta["classes"] is not None}
    if cfg.dataset in classes:
        return classes[cfg.dataset]
    known = ", ".join(f"{k}={v}" for k, v in classes.items())
    raise ConfigError(f"field 'num_classes' is None and dataset {cfg.dataset!r} has no fixed class count"
                      f" (known: {known}): set num_classes")


def build_model(cfg: TrialConfig, num_classes: int | None = None) -> nn.Module:
    """Build cfg.backbone with weights seeded by cfg.seed, insert dropout per cfg, then swap its BatchNorms
    per cfg.normalization.

    Same cfg gives bit-identical weights. The inserted sites are stored as
    `model.dropout_sites` (a list of PlacementSite); the paths of the BatchNorms the normalization replaced
    as `model.replaced_norms` (empty under batchnorm). The swap comes after the placement, so every site's
    `feeds_bn` names the layer now at that path (a GroupNorm or an Identity).

    Args:
        cfg: the trial's configuration.
        num_classes: overrides cfg.num_classes and the dataset's count (e.g. counted from disk).

    Raises:
        ConfigError / ValueError: a configuration the model cannot honour (width, stem,
            placement), each naming the field, the value and what is allowed.
    """
    import timm

    classes = resolve_num_classes(cfg, num_classes)
    family = backbone_family(cfg.backbone)
    if family is not None:
        torch.manual_seed(cfg.seed)
        kwargs = dict(num_classes=classes, in_chans=cfg.in_chans, depth=cfg.depth, width=cfg.width)
        if family.obj is not None:  # a builder (e.g. a plugin's backbone)
            model = family.obj(**kwargs)
        else:
            model = timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    else:
        extra = width_kwargs(cfg.backbone, cfg.width)  # before seeding; it draws no random numbers anyway
        torch.manual_seed(cfg.seed)
        model = create_stock(cfg.backbone, num_classes=classes, in_chans=cfg.in_chans, stem=cfg.stem,
                             image_size=cfg.image_size, **extra)
    sites = apply_placement(model, cfg.dropout_placement, cfg.dropout_type, cfg.dropout_rate,
                            block_size=cfg.dropout_block_size)
    model.dropout_sites = sites
    model.replaced_norms = apply_normalization(model, cfg.normalization, cfg.norm_groups)
    return model
