"""Placement surgery (placeholder: being written)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PlacementSite:
    pass


def apply_placement(model, placement, kind, rate):  # noqa: D103
    raise NotImplementedError
