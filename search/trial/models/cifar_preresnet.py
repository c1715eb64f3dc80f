"""Pre-activation ResNet for CIFAR (He et al. 2016, "Identity Mappings"), registered in timm.

Depth 6n+2 below 164 builds basic blocks (PreResNet-110 as in the paper), 9n+2 otherwise
builds bottleneck blocks (pass
block="basic" to force basic where both rules hold, e.g. He et al.'s PreResNet-110).

    timm.create_model("cifar_preresnet", depth=164, num_classes=100)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from timm.models import generate_default_cfgs, register_model

from search.config import ConfigError

from search.trial.models.cifar_wrn import WideBasicBlock
from search.trial.models.cifar_base import (CifarNet, bn_relu, build_cifar, check_depth, check_width, cifar_cfg, conv1x1,
                        conv3x3, drop_path_rates, feature, optional_drop_path, scaled)

__all__ = ["PreResNet", "PreActBasic", "PreActBottleneck", "cifar_preresnet"]

BLOCKS = ("basic", "bottleneck")


class PreActBasic(WideBasicBlock):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3; the projection shortcut reads the pre-activated input.

    He et al.'s pre-activation basic block is WRN's block (WRN widened it): one implementation.
    """

    expansion = 1


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x planes); DropPath on the branch if drop_path > 0."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, drop_path: float = 0.0, device=None,
                 dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        out_chs = planes * self.expansion
        self.bn1, self.act1 = nn.BatchNorm2d(in_chs, **dd), nn.ReLU(inplace=True)
        self.conv1 = conv1x1(in_chs, planes, **dd)
        self.bn2, self.act2 = nn.BatchNorm2d(planes, **dd), nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, stride, **dd)
        self.bn3, self.act3 = nn.BatchNorm2d(planes, **dd), nn.ReLU(inplace=True)
        self.conv3 = conv1x1(planes, out_chs, **dd)
        self.shortcut = conv1x1(in_chs, out_chs, stride, **dd) if stride != 1 or in_chs != out_chs else None
        self.drop_path = optional_drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.act2(self.bn2(self.conv1(out))))
        out = self.conv3(self.act3(self.bn3(out)))
        if self.drop_path is not None:
            out = self.drop_path(out)
        return out + shortcut


def block_type(depth: int, block: str | None = None) -> str:
    """He et al.'s choice: basic (6n+2) up to depth 110 (20, 32, 44, 56, 110), bottleneck (9n+2)
    from 164 on (164, 1001) or when 6n+2 does not fit (29, 47, ...); `block` forces one.

    Raises:
        ConfigError: depth fits neither rule, or not the forced block's rule.
    """
    check_depth("cifar_preresnet", depth)
    if block is None:
        basic_fits = (depth - 2) % 6 == 0
        return "basic" if basic_fits and not (depth >= 164 and (depth - 2) % 9 == 0) else "bottleneck"
    if block not in BLOCKS:
        raise ConfigError(f"argument 'block' = {block!r} is not allowed (allowed: {', '.join(BLOCKS)}, or None)")
    step = 9 if block == "bottleneck" else 6
    if (depth - 2) % step:
        raise ConfigError(f"field 'depth' = {depth!r} is invalid for cifar_preresnet with block={block!r}:"
                          f" depth must be {step}n+2")
    return block


class PreResNet(CifarNet):
    """conv3x3(16w) -> 3 stages (planes 16w, 32w, 64w; n blocks each) -> BN-ReLU -> pool -> fc.

    Features (feature_info): the stem, stages 1 and 2, and the pre-head's BN-ReLU output (strides 1, 1, 2, 4).
    """

    def __init__(self, depth: int = 20, width: float = 1.0, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, block: str | None = None, global_pool: str = "avg",
                 drop_path_rate: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        kind = block_type(depth, block)
        width = check_width("cifar_preresnet", width)
        block_cls = PreActBottleneck if kind == "bottleneck" else PreActBasic
        n = (depth - 2) // (9 if kind == "bottleneck" else 6)
        dpr = drop_path_rates(drop_path_rate, [n] * 3)
        self.depth, self.width, self.block = depth, width, kind
        in_chs = scaled(16, width)
        self.stem = conv3x3(in_chans, in_chs, **dd)
        info = [feature(in_chs, 1, "stem")]
        stages = []
        for i, planes in enumerate(scaled(c, width) for c in (16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(block_cls(in_chs, planes, 2 if i > 0 and j == 0 else 1, drop_path=dpr[i][j], **dd))
                in_chs = planes * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
            info.append(feature(in_chs, 2**i, f"body.{i}" if i < 2 else "pre_head.1"))
        self.body = nn.Sequential(*stages)
        self.pre_head = bn_relu(in_chs, **dd)
        self._init_head(in_chs, num_classes, in_chans, drop_rate, global_pool, info, **dd)
        self._init_weights()


default_cfgs = generate_default_cfgs({"cifar_preresnet": cifar_cfg()})


@register_model
def cifar_preresnet(pretrained: bool = False, **kwargs: Any) -> PreResNet:
    """Pre-activation ResNet for 32x32 inputs (depth 9n+2 bottleneck or 6n+2 basic; width scales all channels).

    Also timm's keywords: num_classes, in_chans, global_pool, drop_rate, drop_path_rate, features_only.
    """
    return build_cifar(PreResNet, "cifar_preresnet", pretrained, **kwargs)
