"""`PlacementSite`: what a placement returns for each dropout module it inserted.

Its own module, torch-free, so the placements (search/trial/dropout/placements.py) and the
surgery helpers they call (surgery.py) both read it without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PlacementSite"]


@dataclass(frozen=True)
class PlacementSite:
    """One inserted dropout module. Paths are module names in the model after surgery.

    A *before-site* (`after` is None) wraps a module P as nn.Sequential(dropout, module): the dropout
    (`P.0`) runs right before its target (`P.1`). An *after-site* wraps a module P as
    nn.Sequential(module, dropout): the dropout (`P.1`) takes exactly the output of `after` (`P.0`).

    Attributes:
        index: block order (execution order), from 0; 0 for a single site (head, pre_pool).
        block: path of the block, '' for a site outside blocks (head, pre_pool).
        module: path of the inserted dropout module.
        target: before-site: path of the module it runs right before. After-site: the first conv, BatchNorm
            or Linear layer called after it (the first layer its noise reaches).
        feeds_bn: path of the first BatchNorm whose input carries its noise, by execution order (None if none).
        fan_in: d = in_channels*kh*kw/groups (in_features for Linear) of the weight layer between the dropout
            and `feeds_bn` (the paper's d; pre_conv, post_bn), None where no weight layer is between them.
        after: after-sites only: path of the module whose output the dropout takes; None for before-sites.
    """

    index: int
    block: str
    module: str
    target: str
    feeds_bn: str | None
    fan_in: int | None
    after: str | None = None
