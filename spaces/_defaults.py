"""Shared numbers of the two standard profiles: tune the laptop budget here, in one place.

`QUICK` must let `wrn_widths --profile quick` (12 trials) finish on a 2-core CPU in
under 15 minutes including Ray start-up: time one WRN-10-4 trial and adjust
`epochs` / `image_size` here. `PAPER` is the paper's CIFAR recipe for GPUs.
"""
from __future__ import annotations

from search import registry

from ._space import Range

__all__ = ["QUICK", "PAPER", "PLACEMENTS", "DROPOUT_TYPES", "PAPER_RATES", "rate_axis"]

# 2-core laptop CPU, scikit-learn's bundled digits (1437 train / 360 test images, 8x8 upscaled).
QUICK: dict = dict(
    dataset="digits",
    image_size=8,  # px: digits' native size; cost grows with its square
    in_chans=1,
    # Timed on 1 core: WRN-10-1 ~10 s, WRN-10-4 ~52 s for 15 epochs; none reaches 98.9%,
    # pre_bn@0.5 90% at width 1 and 96% at width 4 (the width effect the study is about).
    epochs=15,
    batch_size=64,
    lr=0.05,
    weight_decay=5e-4,
    schedule="cosine",
    train_samples=None,  # all 1437
    seed=0,
)

# The paper's CIFAR setting (Zagoruyko & Komodakis' WRN recipe): SGD, Nesterov momentum 0.9,
# lr 0.1 divided at fixed milestones, 200 epochs, batch 128, weight decay 5e-4.
PAPER: dict = dict(
    dataset="cifar10",
    image_size=32,
    in_chans=3,
    epochs=200,
    batch_size=128,
    lr=0.1,
    weight_decay=5e-4,
    schedule="multistep",
    train_samples=None,
    seed=0,
)

# The registered names (search.registry), read once when the spaces register: a kind or placement
# added in search/trial/dropout/ enters the spaces that vary over "all of them" without an edit here.
PLACEMENTS: tuple[str, ...] = registry.names("placement")
DROPOUT_TYPES: tuple[str, ...] = registry.names("dropout")
PAPER_RATES = (0.1, 0.3, 0.5, 0.7)  # the paper's drop ratios (uout: beta)


def rate_axis(grid: tuple[float, ...] = PAPER_RATES, low: float = 0.05, high: float = 0.7) -> Range:
    """Drop rate: the grid's values, and steps of 0.05 in [low, high] for random/Optuna search."""
    return Range(low=low, high=high, step=0.05, grid=grid)
