"""The same dropout axes across CNN families: the paper's CIFAR networks and stock timm models.

Depth is tied to the backbone (each CIFAR family has its own depth rule; stock
timm models fix their own, depth=None), so it is a link of the backbone axis.
"""
from __future__ import annotations

from ._defaults import DROPOUT_TYPES, PAPER, PLACEMENTS, QUICK, rate_axis
from ._registry import register_space
from ._space import Profile, Space

_CIFAR = ("cifar_wrn", "cifar_preresnet", "cifar_resnext", "cifar_densenet_bc")
_STOCK = ("resnet18", "resnet50", "resnext50_32x4d", "densenet121", "wide_resnet50_2")

# backbone -> architecture at paper scale: WRN-28-10, PreResNet-110, ResNeXt-29 (8x64d), DenseNet-BC (L=100, k=12).
_PAPER_ARCH = {
    "cifar_wrn": dict(depth=28, width=10.0),
    "cifar_preresnet": dict(depth=110, width=1.0),
    "cifar_resnext": dict(depth=29, width=1.0),
    "cifar_densenet_bc": dict(depth=100, width=1.0),
    **{name: dict(depth=None, width=1.0) for name in _STOCK},
}
# Laptop scale: one block per stage, narrow (width is a channel multiplier; ResNeXt 8x16d).
_QUICK_ARCH = {
    "cifar_wrn": dict(depth=10, width=1.0),
    "cifar_preresnet": dict(depth=8, width=1.0),
    "cifar_resnext": dict(depth=11, width=0.25),
    "cifar_densenet_bc": dict(depth=10, width=1.0),
    "resnet18": dict(depth=None, width=1.0),
}


@register_space
def backbones() -> Space:
    return Space(
        name="backbones",
        description="dropout placement x type x rate across CIFAR families and stock timm CNNs",
        fixed=dict(),
        axes=dict(
            backbone=[*_CIFAR, *_STOCK],
            dropout_placement=list(PLACEMENTS),
            dropout_type=list(DROPOUT_TYPES),
            dropout_rate=rate_axis(),
        ),
        links=dict(backbone=_PAPER_ARCH),
        profiles=dict(
            # 5 backbones x (none + 3 placements x bernoulli@0.5) = 20 trials.
            quick=Profile(
                fixed=QUICK,
                axes=dict(backbone=list(_QUICK_ARCH), dropout_type=["bernoulli"], dropout_rate=rate_axis((0.5,))),
                links=dict(backbone=_QUICK_ARCH),
                text="small CIFAR families + resnet18 on digits",
            ),
            # 9 backbones x (none + 3 placements x 3 types x 4 rates) = 333 trials.
            paper=Profile(fixed=PAPER, text="paper-size CIFAR families + ImageNet-style timm CNNs on CIFAR-10"),
        ),
    )
