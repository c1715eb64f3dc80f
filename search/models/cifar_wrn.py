"""Wide ResNet WRN-depth-k for CIFAR (Zagoruyko & Komodakis 2016), registered in timm.

Also holds the few helpers the other CIFAR families share (depth check, channel
scaling, weight init, a timm-compatible classifier head), so each family file
stays one architecture.

    import search.models, timm
    timm.create_model("cifar_wrn", depth=28, width=10, num_classes=10)   # WRN-28-10
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from search.config import CIFAR_FAMILIES, ConfigError
from search.dropout.placement import register_block

__all__ = ["WideResNet", "WideBasicBlock", "cifar_wrn"]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


# ----------------------------------------------------------------- shared helpers
def check_depth(family: str, depth: int) -> None:
    """Raise ConfigError (a ValueError) unless `depth` follows `family`'s rule."""
    rule, ok = CIFAR_FAMILIES[family]
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


# ------------------------------------------------------------------------- WRN
@register_block(skip=("shortcut",))
class WideBasicBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the shortcut.

    The 1x1 projection (when the shape changes) reads the pre-activated input, as in WRN.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(in_chs, out_chs, stride)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_chs, out_chs)
        self.shortcut = conv1x1(in_chs, out_chs, stride) if stride != 1 or in_chs != out_chs else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.act2(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(CifarNet):
    """WRN-depth-k: conv3x3(16) -> 3 stages of (depth-4)/6 blocks -> BN-ReLU -> pool -> fc.

    Stage channels are round(16k), round(32k), round(64k); the stem keeps 16 channels.
    """

    def __init__(self, depth: int = 16, width: float = 1.0, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        check_depth("cifar_wrn", depth)
        width = check_width("cifar_wrn", width)
        n = (depth - 4) // 6
        chs = [16] + [scaled(c, width) for c in (16, 32, 64)]
        self.depth, self.width = depth, width
        self.stem = conv3x3(in_chans, chs[0])
        stages = []
        for i in range(3):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[
                WideBasicBlock(chs[i] if j == 0 else chs[i + 1], chs[i + 1], stride if j == 0 else 1)
                for j in range(n)
            ]))
        self.body = nn.Sequential(*stages)
        self.pre_head = bn_relu(chs[3])
        self._init_head(chs[3], num_classes, in_chans, drop_rate)
        self._init_weights()


default_cfgs = generate_default_cfgs({"cifar_wrn": cifar_cfg()})


@register_model
def cifar_wrn(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """Wide ResNet WRN-depth-width for 32x32 inputs (depth 6n+4; width = widen factor k, float allowed)."""
    return build_cifar(WideResNet, "cifar_wrn", pretrained, **kwargs)
