"""The base the paper's CIFAR families share: CifarNet (stem -> body -> pre-head -> pool -> fc, timm's
head interface) and the small helpers every family file uses (depth check, channel scaling,
convs, the timm pretrained_cfg and builder).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from timm.layers import create_classifier
from timm.models import build_model_with_cfg

from search import registry
from search.config import ConfigError

__all__ = ["CifarNet", "check_depth", "check_width", "scaled", "conv3x3", "conv1x1", "cifar_cfg", "build_cifar",
           "bn_relu", "CIFAR_MEAN", "CIFAR_STD"]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def check_depth(family: str, depth: int) -> None:
    """Raise ConfigError (a ValueError) unless `depth` follows `family`'s rule."""
    meta = registry.get("backbone", family).meta
    rule, ok = meta["depth_rule"], meta["depth_ok"]
    if not isinstance(depth, int) or isinstance(depth, bool) or not ok(depth):
        raise ConfigError(f"field 'depth' = {depth!r} is invalid for backbone {family!r}: depth must be {rule}")


def check_width(family: str, width: float) -> float:
    if not isinstance(width, (int, float)) or isinstance(width, bool) or width <= 0:
        raise ConfigError(f"field 'width' = {width!r} is invalid for backbone {family!r}: width must be a number > 0")
    return float(width)


def scaled(channels: float, width: float) -> int:
    """round(channels * width), at least 1: width is a real multiplier, never a silent zero."""
    return max(1, int(round(channels * width)))


def conv3x3(in_chs: int, out_chs: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)


def cifar_cfg(**kwargs: Any) -> dict[str, Any]:
    """timm pretrained_cfg for a CIFAR net: no weights; names the stem conv and classifier."""
    return {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8),
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": CIFAR_MEAN, "std": CIFAR_STD,
        "first_conv": "stem", "classifier": "fc", "license": "apache-2.0", **kwargs,
    }


def build_cifar(cls: type[nn.Module], variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """timm's builder (sets pretrained_cfg etc.); there are no weights to load."""
    if pretrained:
        raise ConfigError(f"{variant!r} has no pretrained weights: pretrained must be False")
    return build_model_with_cfg(cls, variant, pretrained=False, **kwargs)


class CifarNet(nn.Module):
    """Base of the CIFAR families: stem -> body -> pre-head (BN-ReLU or nothing) -> pool -> fc.

    Subclasses set `stem`, `body`, `pre_head` and call `_init_head` then `_init_weights`.
    Provides timm's head interface (get_classifier, reset_classifier, forward_head).
    """

    def _init_head(self, num_features: int, num_classes: int, in_chans: int, drop_rate: float) -> None:
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, float(drop_rate)
        self.num_features = self.head_hidden_size = num_features
        self.global_pool, self.fc = create_classifier(num_features, num_classes, pool_type="avg")

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_head(self.body(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0.0:  # timm's classifier dropout; build_model keeps it at 0
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
