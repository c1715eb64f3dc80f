"""Optuna's TPE sampler with stepped floats stored as the space declares them (imported only by --algo optuna).

`low + k * step` in binary floating point gives 0.6500000000000001 for a rate of 0.65 in steps of 0.05;
Optuna would store (and optuna-dashboard show) that. `Range.suggest` rounds the same way (12 decimals), so
the stored parameter and the trial's configuration agree. A module-level class: Tune pickles the searcher.
"""
from __future__ import annotations

from typing import Any

import optuna

__all__ = ["StepRoundingTPE", "round_step"]


def round_step(value: Any, dist: Any) -> Any:
    """A stepped float rounded to 12 decimals (the space's values); anything else unchanged."""
    if isinstance(dist, optuna.distributions.FloatDistribution) and dist.step is not None:
        return round(float(value), 12)
    return value


class StepRoundingTPE(optuna.samplers.TPESampler):
    """TPESampler whose stepped float samples are rounded before Optuna stores them."""

    def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
        return round_step(super().sample_independent(study, trial, name, dist), dist)

    def sample_relative(self, study: Any, trial: Any, space: dict[str, Any]) -> dict[str, Any]:
        out = super().sample_relative(study, trial, space)
        return {k: round_step(v, space[k]) if k in space else v for k, v in out.items()}
