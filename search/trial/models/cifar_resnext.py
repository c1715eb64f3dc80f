"""ResNeXt for CIFAR (Xie et al. 2017; ResNeXt-29 8x64d by default), registered in timm.

Post-activation like the original: conv-BN-ReLU, with the last BN added to the
shortcut before the final ReLU.

    timm.create_model("cifar_resnext", depth=29, cardinality=8, base_width=64, num_classes=10)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from timm.models import generate_default_cfgs, register_model

from search.config import ConfigError

from search.trial.models.cifar_base import CifarNet, build_cifar, check_depth, check_width, cifar_cfg, conv1x1, conv3x3, \
    drop_path_rates, feature, optional_drop_path, scaled

__all__ = ["ResNeXt", "ResNeXtBottleneck", "cifar_resnext"]


class ResNeXtBottleneck(nn.Module):
    """conv1x1(D)-BN-ReLU-gconv3x3(D, groups=C, stride)-BN-ReLU-conv1x1(out)-BN, + shortcut, ReLU.

    `drop_path` > 0 adds timm's DropPath (stochastic depth) on the branch, after its last BN; at 0 there is no module.
    """

    def __init__(self, in_chs: int, out_chs: int, inner: int, cardinality: int, stride: int = 1,
                 drop_path: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv1, self.bn1 = conv1x1(in_chs, inner, **dd), nn.BatchNorm2d(inner, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(inner, inner, stride, groups=cardinality, **dd)
        self.bn2, self.act2 = nn.BatchNorm2d(inner, **dd), nn.ReLU(inplace=True)
        self.conv3, self.bn3 = conv1x1(inner, out_chs, **dd), nn.BatchNorm2d(out_chs, **dd)
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(conv1x1(in_chs, out_chs, stride, **dd), nn.BatchNorm2d(out_chs, **dd))
        self.act3 = nn.ReLU(inplace=True)
        self.drop_path = optional_drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.drop_path is not None:
            out = self.drop_path(out)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.act3(out + shortcut)


class ResNeXt(CifarNet):
    """conv3x3(64w)-BN-ReLU -> 3 stages of (depth-2)/9 blocks -> pool -> fc.

    Stage i (0, 1, 2): inner width D = cardinality * round(base_width * w) * 2^i,
    output round(256 w) * 2^i. At w = 1 this is ResNeXt-29 8x64d (34.4M parameters).
    Features (feature_info): the stem's ReLU and the three stages (strides 1, 1, 2, 4).
    """

    def __init__(self, depth: int = 29, width: float = 1.0, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, cardinality: int = 8, base_width: int = 64, global_pool: str = "avg",
                 drop_path_rate: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        check_depth("cifar_resnext", depth)
        width = check_width("cifar_resnext", width)
        for name, value in (("cardinality", cardinality), ("base_width", base_width)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"argument {name!r} = {value!r} is invalid for cifar_resnext: must be an int >= 1")
        n = (depth - 2) // 9
        dpr = drop_path_rates(drop_path_rate, [n] * 3)
        self.depth, self.width, self.cardinality, self.base_width = depth, width, cardinality, base_width
        group_width = scaled(base_width, width)
        in_chs = scaled(64, width)
        self.stem = nn.Sequential(conv3x3(in_chans, in_chs, **dd), nn.BatchNorm2d(in_chs, **dd), nn.ReLU(inplace=True))
        info = [feature(in_chs, 1, "stem.2")]
        stages = []
        for i in range(3):
            inner, out_chs = cardinality * group_width * 2**i, scaled(256, width) * 2**i
            blocks = []
            for j in range(n):
                blocks.append(ResNeXtBottleneck(in_chs, out_chs, inner, cardinality, 2 if i > 0 and j == 0 else 1,
                                                drop_path=dpr[i][j], **dd))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            info.append(feature(in_chs, 2**i, f"body.{i}"))
        self.body = nn.Sequential(*stages)
        self.pre_head = nn.Identity()  # post-activation: blocks end in ReLU already
        self._init_head(in_chs, num_classes, in_chans, drop_rate, global_pool, info, **dd)
        self._init_weights()


default_cfgs = generate_default_cfgs({"cifar_resnext": cifar_cfg(first_conv="stem.0")})


@register_model
def cifar_resnext(pretrained: bool = False, **kwargs: Any) -> ResNeXt:
    """ResNeXt for 32x32 inputs (depth 9n+2; cardinality 8, base_width 64; width scales all channels).

    Also timm's keywords: num_classes, in_chans, global_pool, drop_rate, drop_path_rate, features_only.
    """
    return build_cifar(ResNeXt, "cifar_resnext", pretrained, **kwargs)
