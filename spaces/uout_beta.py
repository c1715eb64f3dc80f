"""Uout's beta against Bernoulli's drop rate, in-block: which shifts BN's variance less?"""
from __future__ import annotations

from ._defaults import PAPER, QUICK, rate_axis
from ._registry import register_space
from ._space import Profile, Space

_RATES = (0.05, 0.1, 0.2, 0.3, 0.5)


@register_space
def uout_beta() -> Space:
    return Space(
        name="uout_beta",
        description="Uout beta vs Bernoulli drop rate, dropout before BN (a) and before conv (b), WRN",
        fixed=dict(backbone="cifar_wrn", depth=28, width=10.0),
        axes=dict(
            dropout_placement=["pre_bn", "pre_conv"],
            dropout_type=["bernoulli", "uout"],
            dropout_rate=rate_axis(_RATES, high=0.5),
        ),
        profiles=dict(
            # 2 placements x 2 types x 3 rates = 12 trials.
            quick=Profile(fixed=dict(QUICK, depth=10, width=2.0),
                          axes=dict(dropout_rate=rate_axis((0.1, 0.3, 0.5), high=0.5)), text="WRN-10-2 on digits"),
            # 2 placements x 2 types x 5 rates = 20 trials.
            paper=Profile(fixed=dict(PAPER, depth=28, width=10.0), text="WRN-28-10 on CIFAR-10"),
        ),
    )
