"""Stock timm CNNs: width scaling where timm's constructors allow it, and a CIFAR stem.

Width: timm's ResNet family (resnet*, resnext*, wide_resnet*) takes per-stage
`channels`; DenseNet takes `growth_rate`. We scale the model's own values, read
from a parameter-free build on the meta device, so every variant keeps its shape.
Other timm models accept only width 1.

CIFAR stem (stem='cifar', or 'auto' below 64 px): the 7x7/2 conv and the max-pool
become a 3x3 stride-1 conv and an Identity; the stem BN stays.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from search.config import ConfigError, family_names

__all__ = ["STOCK_BACKBONES", "WIDTH_FAMILIES", "CIFAR_STEM_FAMILIES", "timm_family", "width_kwargs",
           "resolve_stem", "create_stock"]

# The stock backbones tested end to end (any timm model name is accepted).
STOCK_BACKBONES = ("resnet18", "resnet50", "resnext50_32x4d", "densenet121", "wide_resnet50_2")
# timm modules (families) whose constructors take a width knob, and the knob.
WIDTH_FAMILIES = {"resnet": "channels", "densenet": "growth_rate"}
CIFAR_STEM_FAMILIES = ("resnet", "densenet")
CIFAR_STEM_BELOW = 64  # px: 'auto' picks the CIFAR stem for smaller images


def timm_family(name: str) -> str:
    """The timm module defining model `name` ('resnet', 'densenet', 'convnext', ...).

    Raises:
        ConfigError: `name` is not in timm's registry.
    """
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"field 'backbone' = {name!r} is not a timm model nor a registered family"
                          f" ({', '.join(family_names())})")
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def width_kwargs(name: str, width: float) -> dict[str, Any]:
    """Constructor kwargs that scale timm model `name` by `width` ({} at width 1).

    Does not touch the random state (the probe build lives on the meta device).

    Raises:
        ConfigError: width != 1 for a family without a width knob.
    """
    if width == 1.0:
        return {}
    family = timm_family(name)
    if family not in WIDTH_FAMILIES:
        raise ConfigError(
            f"field 'width' = {width!r} is not supported for backbone {name!r} (timm family {family!r}): width"
            f" scaling needs a registered family ({', '.join(family_names())}) or a timm"
            f" {'/'.join(WIDTH_FAMILIES)} backbone (e.g. {', '.join(STOCK_BACKBONES)}); use width=1")
    import timm

    with torch.device("meta"):
        base = timm.create_model(name, pretrained=False, num_classes=2)
    if family == "resnet":
        stages = [getattr(base, f["module"]) for f in base.feature_info[1:]]
        planes = [f["num_chs"] // type(s[0]).expansion for f, s in zip(base.feature_info[1:], stages)]
        return {"channels": tuple(_scaled(p, width) for p in planes)}
    layer = next(m for n, m in base.named_modules() if n.endswith("denselayer1"))
    return {"growth_rate": _scaled(layer.conv2.out_channels, width)}


def resolve_stem(stem: str, image_size: int) -> str:
    """'cifar' or 'imagenet'; 'auto' is 'cifar' below CIFAR_STEM_BELOW pixels."""
    if stem == "auto":
        return "cifar" if image_size < CIFAR_STEM_BELOW else "imagenet"
    return stem


def create_stock(name: str, *, num_classes: int, in_chans: int = 3, stem: str = "imagenet",
                 image_size: int = 224, **kwargs: Any) -> nn.Module:
    """timm.create_model(name) without weights and without timm's own dropout, plus the stem.

    Args:
        name: a timm model name.
        num_classes, in_chans: as timm.
        stem: 'auto' | 'cifar' | 'imagenet' (see module docstring).
        image_size: input side, for stem='auto'.
        **kwargs: extra constructor kwargs (e.g. from `width_kwargs`).

    Raises:
        ConfigError: stem='cifar' for a family without a known stem, or a width that
            leaves a layer with no channels.
    """
    import timm

    family = timm_family(name)
    choice = resolve_stem(stem, image_size)
    if choice == "cifar" and family not in CIFAR_STEM_FAMILIES and stem == "cifar":
        raise ConfigError(
            f"field 'stem' = 'cifar' is not supported for backbone {name!r} (timm family {family!r}):"
            f" the CIFAR stem exists for timm {'/'.join(CIFAR_STEM_FAMILIES)} backbones; use stem='imagenet' or 'auto'")
    # drop_rate=0: timm's classifier dropout would confound the placements under study.
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                              drop_rate=0.0, **kwargs)
    empty = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.numel() == 0]
    if empty:
        raise ConfigError(f"field 'width' is too small for backbone {name!r} ({kwargs}): layer {empty[0]!r}"
                          " would have no channels; use a larger width")
    if choice == "cifar" and family in CIFAR_STEM_FAMILIES:
        _cifar_stem(model, family)
    return model


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _stride1(conv: nn.Conv2d, kernel: int) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, conv.out_channels, kernel, stride=1, padding=kernel // 2,
                    groups=conv.groups, bias=conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new.to(device=conv.weight.device, dtype=conv.weight.dtype)


def _cifar_stem(model: nn.Module, family: str) -> None:
    """Replace the first conv (7x7/2, or a deep stem's first 3x3/2) by a 3x3/1 conv; pool -> Identity."""
    if family == "resnet":
        owner, conv_name, pool_owner, pool_name = model, "conv1", model, "maxpool"
    else:  # densenet
        owner, conv_name, pool_owner, pool_name = model.features, "conv0", model.features, "pool0"
    stem = getattr(owner, conv_name)
    if isinstance(stem, nn.Sequential):  # deep stem: its first conv carries the stride
        owner, conv_name = stem, "0"
    setattr(owner, conv_name, _stride1(getattr(owner, conv_name), 3))
    setattr(pool_owner, pool_name, nn.Identity())
    for info in getattr(model, "feature_info", []):  # the stem no longer reduces by 4
        info["reduction"] = max(1, info["reduction"] // 4)
