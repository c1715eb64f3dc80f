"""The paper's CIFAR grid: four networks x placements x drop ratios x CIFAR-10/100, Bernoulli dropout.

Placements: pre_bn is the paper's Dropout-(a), pre_conv its Dropout-(b), head
its "after all BN" fix; none is the baseline. In the `paper` profile each network
keeps its own published training recipe (a link of the backbone axis), all SGD
with momentum 0.9 from lr 0.1, batch 128 unless said, random crop + flip:
- WRN-28-10: Zagoruyko & Komodakis' own code (szagoruyko/wide-residual-networks,
  scripts/train_cifar.sh with train.lua): 200 epochs, Nesterov, lr x0.2 as 1-based
  epochs 60, 120 and 160 begin (train.lua's onStartEpoch), i.e. after 59, 119 and
  159 completed epochs (`lr_milestones` counts completed epochs, as torch's
  MultiStepLR), weight decay 5e-4 on every tensor (optim.sgd over the flattened
  parameters, BN's included), crops padded by reflection (randomcrop_type=reflection).
- PreResNet-110, ResNeXt-29 (8x64d), DenseNet-BC (L=100, k=12):
  bearpaw/pytorch-classification (TRAINING.md's commands for cifar.py): lr x0.1
  after epochs 81 and 122 of 164 (PreResNet) or 150 and 225 of 300 (ResNeXt,
  DenseNet at batch 64), weight decay 1e-4 (5e-4 ResNeXt) on every tensor
  (optim.SGD(model.parameters())), no Nesterov, crops padded with zeros.
The `quick` profile keeps the framework's defaults (cosine, Nesterov, no decay
on BN and biases, zero padding).
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
# Each network's published CIFAR recipe (sources in the module docstring); lr 0.1, momentum 0.9 and
# multistep come from PAPER. lr_factor is left at its default (0.1) where the recipe divides by 10.
_BEARPAW = dict(nesterov=False, weight_decay_norm_bias=True)  # optim.SGD(model.parameters(), momentum=0.9)
_RECIPE = {
    "cifar_preresnet": dict(epochs=164, batch_size=128, weight_decay=1e-4, lr_milestones="81,122", **_BEARPAW),
    "cifar_resnext": dict(epochs=300, batch_size=128, weight_decay=5e-4, lr_milestones="150,225", **_BEARPAW),
    "cifar_wrn": dict(epochs=200, batch_size=128, weight_decay=5e-4, lr_milestones="59,119,159", lr_factor=0.2,
                      nesterov=True, weight_decay_norm_bias=True, crop_padding="reflect"),
    "cifar_densenet_bc": dict(epochs=300, batch_size=64, weight_decay=1e-4, lr_milestones="150,225", **_BEARPAW),
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
