"""The backbone families, registered with their depth rules and the block types placement works on.

Torch-free: a config is validated against these without importing torch or timm. The
paper's CIFAR families are models in timm's registry (search/trial/models/cifar_*.py);
`timm_stock` stands for every other timm model name (validated against timm's own
registry) and lists the timm block classes placement surgery knows.
"""
from __future__ import annotations

from search.registry import register_backbone

__all__: list[str] = []

_M = "search.trial.models"

register_backbone(
    "cifar_wrn", timm_model=True, default_depth=16, depth_rule="6n+4 with n >= 1 (10, 16, 22, 28, 40, ...)",
    depth_ok=lambda d: d >= 10 and (d - 4) % 6 == 0,
    blocks={f"{_M}.cifar_wrn:WideBasicBlock": ("shortcut",)}, paper="WRN-28-10",
)
register_backbone(
    "cifar_preresnet", timm_model=True, default_depth=20,
    depth_rule="6n+2 (basic blocks: 8, 20, 56, 110, ...) or 9n+2 (bottleneck: 29, 47, 164, ...) with n >= 1",
    depth_ok=lambda d: d >= 8 and ((d - 2) % 9 == 0 or (d - 2) % 6 == 0),
    blocks={f"{_M}.cifar_preresnet:PreActBasic": ("shortcut",),
            f"{_M}.cifar_preresnet:PreActBottleneck": ("shortcut",)}, paper="PreResNet-110",
)
register_backbone(
    "cifar_resnext", timm_model=True, default_depth=29, depth_rule="9n+2 with n >= 1 (11, 20, 29, ...)",
    depth_ok=lambda d: d >= 11 and (d - 2) % 9 == 0,
    blocks={f"{_M}.cifar_resnext:ResNeXtBottleneck": ("shortcut",)}, paper="ResNeXt-29 (8x64d)",
)
register_backbone(
    "cifar_densenet_bc", timm_model=True, default_depth=40, depth_rule="6n+4 with n >= 1 (10, 16, 40, 100, ...)",
    depth_ok=lambda d: d >= 10 and (d - 4) % 6 == 0,
    blocks={f"{_M}.cifar_densenet:DenseLayerBC": ()}, paper="DenseNet-BC (L=100, k=12)",
)
# Any other timm model: its own depth, validated against timm's registry when used.
register_backbone(
    "timm_stock", timm_model=True, stock=True, default_depth=None, depth_rule="fixed by the timm model",
    blocks={"timm.models.resnet:BasicBlock": ("downsample", "se"), "timm.models.resnet:Bottleneck": ("downsample", "se"),
            "timm.models.densenet:DenseLayer": ()},
)
