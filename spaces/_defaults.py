"""Shared numbers of the standard profiles: tune the laptop budget here, in one place.

`QUICK` must let `wrn_widths --profile quick` (12 configurations x 2 seeds) finish on a
2-core CPU in under 10 minutes including Ray start-up: time one WRN-10-4 trial and adjust
`epochs` / `image_size` here. `FASHION` sizes the real-image study (`--profile fashion`,
<= 60 minutes on 2 cores with 3 seeds; the measurement is below). `PAPER` is the paper's
CIFAR recipe for GPUs.
"""
from __future__ import annotations

from search import registry

from ._space import Range

__all__ = ["QUICK", "FASHION", "FASHION_RATES", "FASHION_WIDTHS", "PAPER", "PLACEMENTS", "FOLLOW_UP_PLACEMENTS", "DROPOUT_TYPES", "PAPER_RATES", "rate_axis"]

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

# Fashion-MNIST (60,000 real 28x28 training images; Debian: apt-get install dataset-fashion-mnist) on a
# 2-core CPU: 3 widths x 13 configurations x 3 seeds = 117 trials, one trial per core.
# Measured (08:00 UTC 2026-12-02, a shared 2-core AMD EPYC VM): one trial on 1 thread, `python -m
# search.trial --backbone cifar_wrn --depth 10 --dataset fashion_mnist --in-chans 1 --image-size 16
# --augment false --lr 0.05 --batch-size 32 --train-samples 3000 --epochs 3 --probe-samples 1000
# --width K [...]`, process CPU seconds by /usr/bin/time: WRN-10-1 none 22 s (81.3% test acc),
# WRN-10-3 pre_conv@0.5 62 s. At 2 epochs x 4500 images: WRN-10-2 pre_bn/uout@0.5 39 s, WRN-10-4
# pre_conv@0.5 87 s; one more 10,000-image test pass (+4 s, +12 s) puts them at ~43 s and ~99 s here.
# Projected: 39 trials per width x (22 + 43 + 62) s = 4950 CPU-s / 2 cores = 41 min, + Ray start-up
# and the driver's MLflow writes (~3 min) = ~44 min. Width 4 in place of 3 would be ~53 min before
# overhead: too close to 60. The whole test set is evaluated after every epoch (4 passes a trial,
# ~40% of its cost), so few epochs over more images pay: WRN-10-1 at 3 x 3000 cost what 2 x 4500 did
# (22 s) for 81.3% vs 79.8%; 6 x 2000 at batch 64 cost 26 s for 80.1%; batch 64 at 3 x 3000 gave 75.4%.
FASHION: dict = dict(
    dataset="fashion_mnist",
    image_size=16,  # px, from 28: a 28 px step costs 3x as much (WRN-10-4: 78 vs 237 img/s per core)
    in_chans=1,
    train_samples=3000,  # a fixed subset (the same images in every trial)
    probe_samples=1000,  # training images the shift probes and BN re-estimation see
    epochs=3,
    batch_size=32,
    lr=0.05,
    weight_decay=5e-4,
    schedule="cosine",
    augment=False,  # 3 epochs underfit; crops would only slow convergence
    seed=0,
)
FASHION_WIDTHS = (1.0, 2.0, 3.0)
FASHION_RATES = (0.1, 0.5)  # bernoulli: drop rate; uout: beta (uout 0.5 adds the noise variance of bernoulli ~0.08)

# The paper profiles' shared CIFAR setting: SGD, Nesterov momentum 0.9, lr 0.1, multistep (x0.1 at 50% and
# 75% of the steps unless lr_milestones / lr_factor say otherwise), 200 epochs, batch 128, weight decay 5e-4
# on conv and linear weights. paper_cifar's paper profile sets each network's published recipe over it
# (milestones, factor, Nesterov, decay on BN and biases, crop padding: spaces/paper_cifar.py).
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
# added in search/trial/dropout/ enters the spaces that vary over "all of them" without an edit here,
# except the follow-up literature's positions (Kim et al. 2023, issue 29): the `literature` space names
# those, so every shipped space keeps its grid and its pinned hashes (tests/data/config_hashes.json).
FOLLOW_UP_PLACEMENTS: tuple[str, ...] = ("post_conv", "post_bn", "post_add", "pre_pool")
PLACEMENTS: tuple[str, ...] = tuple(n for n in registry.names("placement") if n not in FOLLOW_UP_PLACEMENTS)
# The kinds the shipped spaces vary: the paper's, those with its element-wise closed form. The structured
# kinds (channel, droppath, dropblock; issue 29) are named by the spaces that study them, so every shipped
# space keeps its trials and their pinned hashes (tests/data/config_hashes.json).
DROPOUT_TYPES: tuple[str, ...] = tuple(e.name for e in registry.entries("dropout")
                                       if e.meta.get("closed_form") == "elementwise")
PAPER_RATES = (0.1, 0.3, 0.5, 0.7)  # the paper's drop ratios (uout: beta)


def rate_axis(grid: tuple[float, ...] = PAPER_RATES, low: float = 0.05, high: float = 0.7) -> Range:
    """Drop rate: the grid's values, and steps of 0.05 in [low, high] for random/Optuna search."""
    return Range(low=low, high=high, step=0.05, grid=grid)
