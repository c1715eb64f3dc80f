"""The paper's CIFAR grid: four networks x placements x drop ratios x CIFAR-10/100, Bernoulli dropout.

Placements: pre_bn is the paper's Dropout-(a), pre_conv its Dropout-(b), head
its "after all BN" fix; none is the baseline. Each network keeps its own
published training recipe (a link of the backbone axis).
"""
from __future__ import annotations

from ._defaults import PAPER, PAPER_RATES, PLACEMENTS, QUICK, rate_axis
from ._registry import register_space
from ._space import Profile, Space

# PreResNet-110, ResNeXt-29 (8x64d), WRN-28-10, DenseNet-BC (L=100, k=12).
_ARCH = {
    "cifar_preresnet": dict(depth=110, width=1.0),
    "cifar_resnext": dict(depth=29, width=1.0),
    "cifar_wrn": dict(depth=28, width=10.0),
    "cifar_densenet_bc": dict(depth=100, width=1.0),
}
# Each network's published CIFAR recipe (SGD + Nesterov, lr 0.1 divided at fixed milestones).
_RECIPE = {
    "cifar_preresnet": dict(epochs=164, batch_size=128, weight_decay=1e-4),
    "cifar_resnext": dict(epochs=300, batch_size=128, weight_decay=5e-4),
    "cifar_wrn": dict(epochs=200, batch_size=128, weight_decay=5e-4),
    "cifar_densenet_bc": dict(epochs=300, batch_size=64, weight_decay=1e-4),
}
# Shrunken versions for a laptop: one block per stage.
_QUICK_ARCH = {
    "cifar_preresnet": dict(depth=8, width=1.0),
    "cifar_resnext": dict(depth=11, width=0.25),
    "cifar_wrn": dict(depth=10, width=2.0),
    "cifar_densenet_bc": dict(depth=10, width=1.0),
}


@register_space
def paper_cifar() -> Space:
    return Space(
        name="paper_cifar",
        description="the paper's grid: PreResNet/ResNeXt/WRN/DenseNet-BC x placement x drop ratio x CIFAR-10/100",
        fixed=dict(dropout_type="bernoulli"),
        axes=dict(
            backbone=list(_ARCH),
            dataset=["cifar10", "cifar100"],
            dropout_placement=list(PLACEMENTS),
            dropout_rate=rate_axis(PAPER_RATES),
        ),
        links=dict(backbone=_ARCH),
        profiles=dict(
            # 4 networks x digits x (none + 3 placements x 0.5) = 16 trials.
            quick=Profile(
                fixed=QUICK,
                axes=dict(dataset=["digits"], dropout_rate=rate_axis((0.5,))),
                links=dict(backbone=_QUICK_ARCH),
                text="shrunken networks on digits",
            ),
            # 4 networks x 2 datasets x (none + 3 placements x 4 ratios) = 104 trials.
            paper=Profile(fixed=PAPER, links=dict(backbone=_RECIPE), text="paper networks and recipes on CIFAR"),
        ),
    )
