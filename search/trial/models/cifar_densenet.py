"""DenseNet-BC for CIFAR (Huang et al. 2017; L=100, k=12 in the paper), registered in timm.

Each dense layer is a bottleneck BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k) whose
output is concatenated to its input; transitions compress channels by 0.5.

    timm.create_model("cifar_densenet_bc", depth=100, num_classes=100)     # k = round(12 * width)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from timm.models import generate_default_cfgs, register_model

from search.config import ConfigError

from search.trial.models.cifar_base import CifarNet, bn_relu, build_cifar, check_depth, check_width, cifar_cfg, conv1x1, conv3x3, \
    feature, scaled

__all__ = ["DenseNetBC", "DenseLayerBC", "Transition", "cifar_densenet_bc"]


class DenseLayerBC(nn.Module):
    """BN-ReLU-conv1x1(bn_size*k)-BN-ReLU-conv3x3(k); returns cat([x, new], channels)."""

    def __init__(self, in_chs: int, growth: int, bn_size: int = 4, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        inner = bn_size * growth
        self.bn1, self.act1 = nn.BatchNorm2d(in_chs, **dd), nn.ReLU(inplace=True)
        self.conv1 = conv1x1(in_chs, inner, **dd)
        self.bn2, self.act2 = nn.BatchNorm2d(inner, **dd), nn.ReLU(inplace=True)
        self.conv2 = conv3x3(inner, growth, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv1(self.act1(self.bn1(x)))
        new = self.conv2(self.act2(self.bn2(new)))
        return torch.cat([x, new], 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1(compressed)-avgpool2."""

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None) -> None:
        super().__init__()
        self.bn, self.act = nn.BatchNorm2d(in_chs, device=device, dtype=dtype), nn.ReLU(inplace=True)
        self.conv, self.pool = conv1x1(in_chs, out_chs, device=device, dtype=dtype), nn.AvgPool2d(2)


class DenseNetBC(CifarNet):
    """conv3x3(2k) -> 3 x [(depth-4)/6 dense layers] with 2 transitions -> BN-ReLU -> pool -> fc.

    Features (feature_info): the stem, dense blocks 1 and 2 (before their transitions), and the pre-head's
    BN-ReLU output (strides 1, 1, 2, 4). No residual branch, so no drop_path_rate (as timm's DenseNet).
    """

    def __init__(self, depth: int = 40, width: float = 1.0, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, growth_rate: int = 12, compression: float = 0.5, global_pool: str = "avg",
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        check_depth("cifar_densenet_bc", depth)
        width = check_width("cifar_densenet_bc", width)
        if not 0.0 < compression <= 1.0:
            raise ConfigError(f"argument 'compression' = {compression!r} is invalid: must be in (0, 1]")
        n = (depth - 4) // 6
        growth = scaled(growth_rate, width)
        self.depth, self.width, self.growth_rate = depth, width, growth
        chs = 2 * growth
        self.stem = conv3x3(in_chans, chs, **dd)
        info = [feature(chs, 1, "stem")]
        body: list[nn.Module] = []
        for i in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayerBC(chs, growth, **dd))
                chs += growth
            body.append(nn.Sequential(*layers))
            if i < 2:
                info.append(feature(chs, 2**i, f"body.{len(body) - 1}"))
                out = max(1, int(chs * compression))
                body.append(Transition(chs, out, **dd))
                chs = out
        self.body = nn.Sequential(*body)
        self.pre_head = bn_relu(chs, **dd)
        info.append(feature(chs, 4, "pre_head.1"))
        self._init_head(chs, num_classes, in_chans, drop_rate, global_pool, info, **dd)
        self._init_weights()


default_cfgs = generate_default_cfgs({"cifar_densenet_bc": cifar_cfg()})


@register_model
def cifar_densenet_bc(pretrained: bool = False, **kwargs: Any) -> DenseNetBC:
    """DenseNet-BC for 32x32 inputs (depth 6n+4; growth rate k = round(12 * width); compression 0.5).

    Also timm's keywords: num_classes, in_chans, global_pool, drop_rate, features_only.
    """
    return build_cifar(DenseNetBC, "cifar_densenet_bc", pretrained, **kwargs)
