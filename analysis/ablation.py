"""The one-factor-at-a-time ablation: each change's effect against the baseline, paired by seed.

`search.run --ablate` writes the plan (`<root>/<space>/ablation.json`: the baseline and, per
trial, its factor, level, seed and config hash). Here each one-factor trial is paired with the
baseline trial of the same seed, and three effects are estimated over the seeds: test accuracy,
BN re-estimation gain (accuracy after re-estimation minus before) and mean variance shift.
Intervals are two-sided Student-t on the paired differences (none for a single seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from scipy import stats

from .load import Study

__all__ = ["Effect", "AblationRow", "ablation_rows", "METRICS"]

# name -> how a trial row gives it
def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


METRICS: dict[str, Any] = {
    "test_acc": lambda r: _num(r["test_acc"]),
    "reest_gain": lambda r: _num(r["test_acc_reest"]) - _num(r["test_acc"]),
    "mean_shift": lambda r: _num(r["mean_shift"]),
}


@dataclass(frozen=True)
class Effect:
    """Mean paired difference (variant - baseline) of one metric, its interval and the means."""

    n: int
    baseline: float
    variant: float
    diff: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class AblationRow:
    """One factor at one level: the seeds paired and each metric's effect."""

    space: str
    factor: str
    level: Any
    seeds: tuple[int, ...]
    effects: dict[str, Effect]


def _effect(pairs: list[tuple[float, float]], level: float) -> Effect:
    pairs = [(b, v) for b, v in pairs if math.isfinite(b) and math.isfinite(v)]
    nan = math.nan
    if not pairs:
        return Effect(0, nan, nan, nan, nan, nan)
    b, v = np.array(pairs).T
    d = v - b
    n, mean = d.size, float(d.mean())
    if n < 2:
        return Effect(n, float(b.mean()), float(v.mean()), mean, nan, nan)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return Effect(n, float(b.mean()), float(v.mean()), mean, mean - half, mean + half)


def ablation_rows(study: Study, plan: Mapping[str, Any], level: float = 0.95) -> list[AblationRow]:
    """Per (factor, level) of `plan`, the effect of each metric over the seeds with both trials ok.

    Trials are found by config hash among the study's ok trials; a hash trained more than
    once (--reuse none) counts by its newest row.
    """
    ok = study.ok().trials
    rows: dict[str, dict[str, Any]] = {}
    if ok.num_rows:
        order = np.argsort(np.asarray(ok.column("finished_at").cast("int64").to_numpy(zero_copy_only=False)))
        recs = ok.to_pylist()
        for i in order:  # newest last, so it wins
            rows[recs[i]["config_hash"]] = recs[i]
    trials = plan["trials"]
    base = {t["seed"]: t["config_hash"] for t in trials if t["factor"] == "baseline"}
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for t in trials:
        if t["factor"] != "baseline":
            cells.setdefault((t["factor"], repr(t["level"])), []).append(t)
    out = []
    for (factor, _), group in cells.items():
        seeds = tuple(t["seed"] for t in group if t["config_hash"] in rows and base.get(t["seed"]) in rows)
        effects = {}
        for name, get in METRICS.items():
            pairs = [(get(rows[base[t["seed"]]]), get(rows[t["config_hash"]])) for t in group
                     if t["seed"] in seeds]
            effects[name] = _effect(pairs, level)
        out.append(AblationRow(plan.get("space", ""), factor, group[0]["level"], seeds, effects))
    return out
