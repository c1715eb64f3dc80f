"""A plugin (docs/extending.md): spatial dropout, dropout after the first conv, and a space using spatial dropout
before global pooling (the built-in `pre_pool`).

    python -m search.run --plugin examples/plugin_spatial.py --space spatial_pool --dry-run
    python -m search.run --space examples/plugin_spatial.py:spatial_pool --profile tiny --num-cpus 2
    python -m analysis.report --plugin examples/plugin_spatial.py --space spatial_pool

Nothing here imports torch at module level: registering costs nothing, and `--dry-run`
stays fast. tests/test_plugins.py runs this file as a plugin.
"""
from __future__ import annotations

from typing import Any, Callable

from search import DropoutKind, PlacementSite, register_dropout, register_placement
from spaces import Profile, Range, Space, register_space


@register_dropout("spatial")
class SpatialKind(DropoutKind):
    """Channel-wise (spatial) dropout: one Bernoulli(1 - rate) mask per (sample, channel), scaled by 1/(1 - rate).

    Every position of a channel shares its multiplier, so the noise is not i.i.d. per element
    and the element-wise closed form of the variance shift does not apply: closed_form = None
    (the report shows measurements only). On (N, C) inputs (before a classifier) it is
    ordinary element-wise dropout.
    """

    closed_form = None

    def noise(self, x: Any) -> Any:
        import torch

        keep = 1.0 - self.rate
        shape = x.shape[:2] + (1,) * (x.dim() - 2)  # (N, C, 1, 1): shared across H and W
        return torch.bernoulli(torch.full(shape, keep, dtype=x.dtype, device=x.device)) / keep


@register_placement("post_stem", case="a", paper="one dropout on the output of the network's first conv")
def post_stem(model: Any, make: Callable[[], Any], *,
              input_size: tuple[int, int, int] | None = None) -> list[PlacementSite]:
    """One dropout right after the first conv (timm's pretrained_cfg['first_conv']): an after-site, whose
    target, first fed BN and fan-in `wrap_after` reads off one traced forward."""
    from search.trial.dropout.surgery import wrap_after

    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if not first:
        raise ValueError(f"field 'dropout_placement' = 'post_stem': backbone {type(model).__name__!r} names no "
                         "first conv in its pretrained_cfg (allowed for it: head, none, pre_pool)")
    return [wrap_after(model, first, make, input_size=input_size)]


@register_space
def spatial_pool() -> Space:
    return Space(
        name="spatial_pool",
        description="spatial vs element-wise dropout, inside blocks (pre_bn) or before global pooling (pre_pool)",
        fixed=dict(backbone="cifar_wrn", depth=10, dataset="digits", image_size=8, in_chans=1, epochs=15,
                   batch_size=64, lr=0.05, weight_decay=5e-4, schedule="cosine", seed=0),
        axes=dict(
            width=[1.0, 2.0],
            dropout_placement=["none", "pre_bn", "pre_pool"],
            dropout_type=["bernoulli", "spatial"],
            dropout_rate=Range(low=0.1, high=0.5, step=0.1, grid=(0.3,)),
        ),
        profiles=dict(
            quick=Profile(text="WRN-10-{1,2} on digits, 15 epochs"),
            paper=Profile(fixed=dict(dataset="cifar10", image_size=32, in_chans=3, depth=28, epochs=200,
                                     batch_size=128, lr=0.1, schedule="multistep"), text="WRN-28 on CIFAR-10"),
            # Two trials in seconds: spatial dropout in the blocks and before the pooling.
            tiny=Profile(fixed=dict(epochs=1, train_samples=64, probe_samples=64),
                         axes=dict(width=[1.0], dropout_placement=["pre_bn", "pre_pool"], dropout_type=["spatial"]),
                         text="2 trials, 1 epoch on 64 digits"),
        ),
        baseline=dict(width=1.0, dropout_placement="pre_pool", dropout_type="spatial", dropout_rate=0.3),
        ablate=dict(dropout_rate=[0.1, 0.5]),
    )
