"""The follow-up literature's comparisons in one grid (issue 29): where one dropout goes, and when it is on.

- Kim et al. 2023 (UAI), "How to Use Dropout Correctly on Residual Networks with Batch Normalization":
  one dropout per residual branch before its last weight layer (our `pre_conv`), against the other
  branch positions (`pre_bn`, after the branch's last conv `post_conv` or BN `post_bn`, after the
  residual add `post_add`) and the head positions (`pre_pool`, their element-wise dropout on the feature
  map before global pooling; `head`, before the classifier).
- Liu et al. 2023 (ICML), "Dropout Reduces Underfitting": dropout for the whole run against early
  dropout (the rate until the cutoff epoch, then 0; constant or decreasing linearly per step) and late
  dropout (0 until the cutoff, then the rate), at Kim et al.'s branch position.

The grid: no dropout, each placement with dropout for the whole run, and `pre_conv` under each schedule
(the schedule fields are set only there), so both comparisons share the no-dropout and the
`pre_conv`-constant trials, seed by seed. `analysis.report` puts them in the tables "kim2023" and
"liu2023" (analysis/literature.py).
"""
from __future__ import annotations

from ._defaults import FASHION, FOLLOW_UP_PLACEMENTS, PAPER, QUICK, rate_axis
from ._registry import register_space
from ._space import Condition, Profile, Space, dropout_condition

_PLACEMENTS = ["none", "pre_bn", "pre_conv", *FOLLOW_UP_PLACEMENTS, "head"]
_SCHEDULED = "pre_conv"  # Kim et al.'s branch position: where the schedules are compared

_CONDITIONS = (
    dropout_condition(),
    Condition(on=("dropout_placement",), when=lambda c: c["dropout_placement"] == _SCHEDULED,
              otherwise={"dropout_schedule": None, "dropout_cutoff": None, "dropout_decay": None},
              text=f"dropout_schedule only at {_SCHEDULED}"),
    Condition(on=("dropout_schedule",), when=lambda c: c.get("dropout_schedule") in ("early", "late"),
              otherwise={"dropout_cutoff": None}, text="dropout_cutoff only for early/late"),
    # Liu et al.'s linear schedule decreases the early rate to 0 at the cutoff; late dropout is constant.
    Condition(on=("dropout_schedule",), when=lambda c: c.get("dropout_schedule") == "early",
              otherwise={"dropout_decay": None}, text="dropout_decay only for early"),
)


@register_space
def literature() -> Space:
    return Space(
        name="literature",
        description="Kim et al. 2023's dropout positions and Liu et al. 2023's early/late dropout, paired by seed",
        fixed=dict(backbone="cifar_wrn", depth=10, width=1.0, dropout_type="bernoulli"),
        axes=dict(
            dropout_placement=_PLACEMENTS,
            dropout_rate=rate_axis((0.2,)),
            dropout_schedule=[None, "early", "late"],  # None: the rate for the whole run (hashes as before)
            dropout_cutoff=[2.0],
            dropout_decay=[None, "linear"],
        ),
        conditions=_CONDITIONS,
        profiles=dict(
            # 1 + 7 placements + 3 more schedules at pre_conv = 11 configurations on digits, 1 seed: ~3 min.
            quick=Profile(fixed=dict(QUICK, epochs=6), text="WRN-10-1 on digits, 6 epochs, cutoff 2"),
            # The study of docs/results.md: 11 configurations x 6 seeds = 66 trials (WRN-10-1, 16 px, 3000 images;
            # 10,000 test images after every epoch). Measured on 2 cores: 44 trials in 997 s with other jobs
            # loading the machine, 22 in 185 s idle.
            fashion=Profile(fixed=dict(FASHION, epochs=6),
                            text="WRN-10-1 on Fashion-MNIST (16 px, 3000 training images, 6 epochs, cutoff 2)",
                            seeds=6),
            # WRN-28-10 on CIFAR-10 for 200 epochs; Liu et al.'s cutoff is 50 of 300 epochs on ImageNet (1/6).
            paper=Profile(fixed=dict(PAPER, depth=28, width=10.0),
                          axes=dict(dropout_rate=rate_axis((0.1, 0.3)), dropout_cutoff=[33.0]),
                          text="WRN-28-10 on CIFAR-10, 200 epochs, cutoff 33"),
        ),
    )
