"""WRN widths x dropout placement x type x rate: where does in-block dropout stop hurting?

The paper's explanation predicts the variance shift shrinks as the feature
dimension d grows; this space varies the WRN widen factor k to fit that.
"""
from __future__ import annotations

from ._defaults import DROPOUT_TYPES, FASHION, FASHION_RATES, FASHION_WIDTHS, PAPER, PLACEMENTS, QUICK, rate_axis
from ._registry import register_space
from ._space import Profile, Space


@register_space
def wrn_widths() -> Space:
    return Space(
        name="wrn_widths",
        description="WRN across widen factors x dropout placement x type x rate (the width-vs-shift study)",
        fixed=dict(backbone="cifar_wrn", depth=28),
        axes=dict(
            width=[1.0, 2.0, 4.0, 8.0, 10.0],
            dropout_placement=list(PLACEMENTS),
            dropout_type=list(DROPOUT_TYPES),
            dropout_rate=rate_axis(),
        ),
        profiles=dict(
            # 3 widths x (none + 3 placements x bernoulli@0.5) = 12 configurations x 2 seeds = 24 trials
            # on a 2-core CPU: two seeds give every accuracy cost an interval.
            quick=Profile(
                fixed=dict(QUICK, depth=10),
                axes=dict(width=[1.0, 2.0, 4.0], dropout_type=["bernoulli"], dropout_rate=rate_axis((0.5,))),
                text="WRN-10-{1,2,4} on digits",
                seeds=2,
            ),
            # Real images: 3 widths x (none + 3 placements x {bernoulli, uout} x 2 rates) = 39 configurations
            # x 3 seeds = 117 trials, sized for <= 60 minutes on a 2-core CPU (FASHION in _defaults.py; width 4
            # would cost a third more, measured there).
            fashion=Profile(
                fixed=dict(FASHION, depth=10),
                axes=dict(width=list(FASHION_WIDTHS), dropout_placement=["none", "pre_bn", "pre_conv", "head"],
                          dropout_type=["bernoulli", "uout"], dropout_rate=rate_axis(FASHION_RATES)),
                text="WRN-10-{1,2,3} on Fashion-MNIST (16 px, 3000 training images, 3 epochs)",
                seeds=3,
            ),
            # The width question at a longer schedule (issue 22): WRN-10-{1,2,4,8} x {none, pre_bn, pre_conv}
            # x Bernoulli 0.5 on Fashion-MNIST for 10 epochs x 3 seeds = 36 trials; measured at 15 epochs a trial
            # costs 35 / 72 / 177 / 589 CPU-s at widths 1 / 2 / 4 / 8, so ~45 min on 2 cores.
            width=Profile(
                fixed=dict(FASHION, depth=10, epochs=10),
                axes=dict(width=[1.0, 2.0, 4.0, 8.0], dropout_placement=["none", "pre_bn", "pre_conv"],
                          dropout_type=["bernoulli"], dropout_rate=rate_axis((0.5,))),
                text="WRN-10-{1,2,4,8} on Fashion-MNIST (16 px, 3000 training images, 10 epochs)",
                seeds=3,
            ),
            # ... and over training: epochs 3 / 10 / 30 at widths 1 and 2 (the 10-epoch trials are the width
            # profile's, reused), 3 seeds: 36 trials, 24 new, ~20 min on 2 cores.
            epochs=Profile(
                fixed=dict(FASHION, depth=10),
                axes=dict(width=[1.0, 2.0], dropout_placement=["none", "pre_bn", "pre_conv"],
                          dropout_type=["bernoulli"], dropout_rate=rate_axis((0.5,)), epochs=[3, 10, 30]),
                text="WRN-10-{1,2} on Fashion-MNIST for 3, 10 and 30 epochs (16 px, 3000 training images)",
                seeds=3,
            ),
            # 5 widths x (none + 3 placements x 3 types x 4 rates) = 185 trials.
            paper=Profile(fixed=dict(PAPER, depth=28), text="WRN-28-{1,2,4,8,10} on CIFAR-10, 200 epochs"),
        ),
        # `--ablate`: WRN-k with Dropout-(a) at 0.5 is the reference; width, placement, kind and rate
        # change one at a time (width and placement over the profile's grid, kind and rate as listed).
        baseline=dict(width=4.0, dropout_placement="pre_bn", dropout_type="bernoulli", dropout_rate=0.5),
        ablate=dict(dropout_type=list(DROPOUT_TYPES), dropout_rate=[0.1, 0.3, 0.5]),
    )
