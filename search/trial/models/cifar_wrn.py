"""Wide ResNet WRN-depth-k for CIFAR (Zagoruyko & Komodakis 2016), registered in timm.

    import search.trial.models, timm  # importing registers the families
    timm.create_model("cifar_wrn", depth=28, width=10, num_classes=10)   # WRN-28-10
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from timm.models import generate_default_cfgs, register_model

from search.trial.models.cifar_base import CifarNet, bn_relu, build_cifar, check_depth, check_width, cifar_cfg, \
    conv1x1, conv3x3, drop_path_rates, feature, optional_drop_path, scaled

__all__ = ["WideResNet", "WideBasicBlock", "cifar_wrn"]


class WideBasicBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the shortcut.

    The 1x1 projection (when the shape changes) reads the pre-activated input, as in WRN.
    `drop_path` > 0 adds timm's DropPath (stochastic depth) on the residual branch; at 0 there is no module.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_path: float = 0.0, device=None,
                 dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.bn1 = nn.BatchNorm2d(in_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(in_chs, out_chs, stride, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_chs, out_chs, **dd)
        self.shortcut = conv1x1(in_chs, out_chs, stride, **dd) if stride != 1 or in_chs != out_chs else None
        self.drop_path = optional_drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.act2(self.bn2(self.conv1(out))))
        if self.drop_path is not None:
            out = self.drop_path(out)
        return out + shortcut


class WideResNet(CifarNet):
    """WRN-depth-k: conv3x3(16) -> 3 stages of (depth-4)/6 blocks -> BN-ReLU -> pool -> fc.

    Stage channels are round(16k), round(32k), round(64k); the stem keeps 16 channels.
    Features (feature_info): the stem, stages 1 and 2, and the pre-head's BN-ReLU output (strides 1, 1, 2, 4).
    """

    def __init__(self, depth: int = 16, width: float = 1.0, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, global_pool: str = "avg", drop_path_rate: float = 0.0, device=None,
                 dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        check_depth("cifar_wrn", depth)
        width = check_width("cifar_wrn", width)
        n = (depth - 4) // 6
        chs = [16] + [scaled(c, width) for c in (16, 32, 64)]
        dpr = drop_path_rates(drop_path_rate, [n] * 3)
        self.depth, self.width = depth, width
        self.stem = conv3x3(in_chans, chs[0], **dd)
        stages = []
        for i in range(3):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[
                WideBasicBlock(chs[i] if j == 0 else chs[i + 1], chs[i + 1], stride if j == 0 else 1,
                               drop_path=dpr[i][j], **dd)
                for j in range(n)
            ]))
        self.body = nn.Sequential(*stages)
        self.pre_head = bn_relu(chs[3], **dd)
        info = [feature(chs[0], 1, "stem"), feature(chs[1], 1, "body.0"), feature(chs[2], 2, "body.1"),
                feature(chs[3], 4, "pre_head.1")]
        self._init_head(chs[3], num_classes, in_chans, drop_rate, global_pool, info, **dd)
        self._init_weights()


default_cfgs = generate_default_cfgs({"cifar_wrn": cifar_cfg()})


@register_model
def cifar_wrn(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """Wide ResNet WRN-depth-width for 32x32 inputs (depth 6n+4; width = widen factor k, float allowed).

    Also timm's keywords: num_classes, in_chans, global_pool, drop_rate, drop_path_rate, features_only.
    """
    return build_cifar(WideResNet, "cifar_wrn", pretrained, **kwargs)
