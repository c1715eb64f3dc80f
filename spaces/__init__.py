"""Declarative search spaces over TrialConfig fields, one module per space, in a timm-style registry.

    >>> from spaces import get_space, list_spaces
    >>> space = get_space("wrn_widths")
    >>> space.size("quick"), len(space.grid("quick"))
    (12, 12)

Importing the package registers every space. No torch, ray or mlflow here;
optuna is imported only by the trial object Optuna passes to `Space.suggest`.
"""
from __future__ import annotations

from ._registry import get_space, list_spaces, register_space
from ._space import (
    DEFAULT_PROFILES,
    REQUIRED_FIELDS,
    Axis,
    Choice,
    Condition,
    Profile,
    Range,
    Space,
    SpaceError,
    dropout_condition,
)

# Importing a space module registers its space.
from . import backbones, literature, paper_cifar, smoke, uout_beta, wrn_widths  # noqa: E402,F401  isort: skip

__all__ = [
    "Axis",
    "Choice",
    "Condition",
    "DEFAULT_PROFILES",
    "Profile",
    "REQUIRED_FIELDS",
    "Range",
    "Space",
    "SpaceError",
    "dropout_condition",
    "get_space",
    "list_spaces",
    "register_space",
]
