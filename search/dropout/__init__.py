"""Dropout kinds (a registry) and placement surgery that inserts them into a built model."""
from .kinds import (
    BernoulliDropout,
    GaussianDropout,
    UoutDropout,
    VarianceDropout,
    list_dropout_kinds,
    make_dropout,
    register_dropout,
)
from .placement import PlacementSite, apply_placement

__all__ = [
    "BernoulliDropout", "GaussianDropout", "UoutDropout", "VarianceDropout",
    "list_dropout_kinds", "make_dropout", "register_dropout",
    "PlacementSite", "apply_placement",
]
