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

    Attributes:
        index: block order (execution order), from 0; 0 for head.
        block: path of the block, '' for head.
        module: path of the inserted dropout module.
        target: path of the module it runs right before.
        feeds_bn: path of the BatchNorm its noise reaches first (None for head).
        fan_in: d = in_channels*kh*kw/groups of the conv between dropout and BN (pre_conv only).
    """

    index: int
    block: str
    module: str
    target: str
    feeds_bn: str | None
    fan_in: int | None
