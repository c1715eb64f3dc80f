"""A tiny space for tests and CI: every placement and every paper dropout kind (closed form), seconds per trial."""
from __future__ import annotations

from ._defaults import DROPOUT_TYPES, PLACEMENTS, rate_axis
from ._registry import register_space
from ._space import Profile, Space

# WRN-10-1 on 8 px digits, 256 images, 1 epoch: none + 3 placements x 3 kinds = 10 trials.
_TINY = dict(
    backbone="cifar_wrn", depth=10, width=1.0, dataset="digits", image_size=8, in_chans=1,
    train_samples=256, epochs=1, batch_size=64, lr=0.05, weight_decay=5e-4, schedule="cosine", seed=0,
)


@register_space
def smoke() -> Space:
    return Space(
        name="smoke",
        description="tiny end-to-end check: every placement x every paper dropout kind, 1 epoch on 256 digits",
        fixed=_TINY,
        axes=dict(
            dropout_placement=list(PLACEMENTS),
            dropout_type=list(DROPOUT_TYPES),
            dropout_rate=rate_axis((0.5,)),
        ),
        # Both profiles are the same tiny thing, so `--profile paper` works here too.
        profiles=dict(quick=Profile(text="tiny"), paper=Profile(text="tiny (same as quick)")),
    )
