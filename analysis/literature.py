"""The follow-up literature's comparisons, each paired by seed (the `literature` space, issue 29).

- Kim et al. 2023 (UAI), "How to Use Dropout Correctly on Residual Networks with Batch Normalization":
  where in a residual branch and in the head one dropout goes. `placement_comparison` puts every
  placement of the study against no dropout and against their recommended branch position, `pre_conv`
  (dropout after the last BN-ReLU, before the last weight layer).
- Liu et al. 2023 (ICML), "Dropout Reduces Underfitting": early and late dropout against dropout for the
  whole run. `schedule_comparison` puts every drop-rate schedule against no dropout and against the
  constant schedule at the same placement, kind and rate.

A comparison is made only where it is identified: the two trials of a pair share every experiment field
but the factor compared, and the seed (the initial weights and the data order; the dropout masks differ
wherever the sites differ, and a scheduled rate draws its masks its own way). Differences are tested
with `analysis.fit.mean_test` (t over the seeds; no interval below 3 seeds or without spread).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spaces._defaults import FOLLOW_UP_PLACEMENTS

from .fit import MeanTest, mean_test
from .load import EXPERIMENT_FIELDS, column_floats, constant_schedule

__all__ = ["Comparison", "Level", "placement_comparison", "schedule_comparison", "KIM_REFERENCE",
           "FOLLOW_UP_PLACEMENTS", "PLACEMENT_ORDER", "schedule_label", "METRICS"]

# Block order: the paper's placements, then the follow-up literature's (tables and figures list them so).
PLACEMENT_ORDER = ("none", "pre_bn", "pre_conv", "post_conv", "post_bn", "post_add", "pre_pool", "head")
KIM_REFERENCE = "pre_conv"  # Kim et al.'s recommended branch position (their code and ours put it in one place)

# Compared per pair. train_loss is measured in train mode at the rate in force in the last epoch, so it compares
# only trials that end at rate 0 (no dropout, early dropout): `Level.final_rate` says which.
METRICS = ("test_acc", "test_loss", "mean_shift_fed", "train_loss", "dropout_rate_final")
_SCHEDULE_FIELDS = ("dropout_schedule", "dropout_cutoff", "dropout_decay")


@dataclass(frozen=True)
class Level:
    """One level of the factor compared: its trials' means and its paired differences."""

    label: str
    n: int  # seeds with an ok trial at this level
    means: dict[str, float]  # metric -> mean over those seeds

    @property
    def ends_without_dropout(self) -> bool:
        """Every seed's last step ran at rate 0 (no dropout, or early dropout): its train_loss is comparable
        with no dropout's (NaN final rate, as in trials recorded before schedules, counts as not known)."""
        return self.label == "none" or self.means.get("dropout_rate_final") == 0.0
    vs_none: dict[str, MeanTest]  # metric -> level - no dropout, paired by seed
    vs_reference: dict[str, MeanTest]  # metric -> level - the reference level, paired by seed


@dataclass(frozen=True)
class Comparison:
    """A factor's levels within one fixed setting (the fields every compared trial shares)."""

    factor: str
    reference: str
    setting: tuple[tuple[str, Any], ...]  # the shared fields that differ between the study's settings
    levels: list[Level]


def schedule_label(row: dict[str, Any]) -> str:
    """'none', 'constant', or e.g. 'early (cutoff 2, linear)': the schedule a trial had, in words."""
    if row.get("dropout_placement") == "none" or not row.get("dropout_rate"):
        return "none"
    mode = row.get("dropout_schedule") or "constant"
    if mode == "constant":
        return "constant"
    decay = row.get("dropout_decay") or "constant"
    cutoff = row.get("dropout_cutoff")
    parts = [f"cutoff {cutoff:g}"] if isinstance(cutoff, (int, float)) else []
    if decay != "constant":
        parts.append(decay)
    return f"{mode} ({', '.join(parts)})" if parts else mode


def placement_comparison(trials: pa.Table, level: float = 0.95) -> list[Comparison]:
    """Every placement against no dropout and against `pre_conv`, per dropout kind and rate (Kim et al.).

    Returns [] unless the study ran one of `FOLLOW_UP_PLACEMENTS` (the paper's own placements have their
    tables already).
    """
    ok = _ok(trials)
    ok = ok.filter(constant_schedule(ok))  # a placement's level is its dropout for the whole run
    if ok.num_rows == 0 or not set(FOLLOW_UP_PLACEMENTS) & set(ok.column("dropout_placement").to_pylist()):
        return []
    # The setting: every experiment field but the placement, kind, rate and seed; `none` trials join
    # each (kind, rate) setting as its no-dropout level.
    varying = [f for f in EXPERIMENT_FIELDS if f in ok.column_names and f not in
               ("dropout_placement", "dropout_type", "dropout_rate", "dropout_block_size", "seed")]
    return _compare(ok, varying, factor="dropout_placement", reference=KIM_REFERENCE,
                    label=lambda r: r["dropout_placement"],
                    subgroup=lambda r: None if r["dropout_placement"] == "none" else
                    (("dropout_type", r["dropout_type"]), ("dropout_rate", r["dropout_rate"])),
                    level=level)


def schedule_comparison(trials: pa.Table, level: float = 0.95) -> list[Comparison]:
    """Every drop-rate schedule against no dropout and against `constant`, per placement, kind and rate
    (Liu et al.). Returns [] unless the study ran a schedule other than constant."""
    ok = _ok(trials)
    if ok.num_rows == 0 or "dropout_schedule" not in ok.column_names:
        return []
    modes = {m for m in ok.column("dropout_schedule").to_pylist() if m not in (None, "constant")}
    if not modes:
        return []
    varying = [f for f in EXPERIMENT_FIELDS if f in ok.column_names and f not in
               ("dropout_placement", "dropout_type", "dropout_rate", "dropout_block_size", "seed",
                *_SCHEDULE_FIELDS)]
    comps = _compare(ok, varying, factor="schedule", reference="constant", label=schedule_label,
                     subgroup=lambda r: None if schedule_label(r) == "none" else
                     (("dropout_placement", r["dropout_placement"]), ("dropout_type", r["dropout_type"]),
                      ("dropout_rate", r["dropout_rate"])),
                     level=level)
    # Only the dropout settings a schedule other than constant ran at (the others compare placements).
    return [c for c in comps if any(lv.label not in ("none", "constant") for lv in c.levels)]


# ----------------------------------------------------------------------- helpers
def _ok(trials: pa.Table) -> pa.Table:
    if trials.num_rows == 0 or "status" not in trials.column_names:
        return trials.slice(0, 0)
    return trials.filter(pc.equal(trials.column("status"), "ok"))


def _compare(t: pa.Table, fields: list[str], *, factor: str, reference: str, label: Callable[[dict], str],
             subgroup: Callable[[dict], tuple | None], level: float) -> list[Comparison]:
    rows = t.select([c for c in dict.fromkeys([*fields, "dropout_placement", "dropout_type", "dropout_rate",
                                               "seed", *_SCHEDULE_FIELDS]) if c in t.column_names]).to_pylist()
    values = {m: column_floats(t, m) for m in METRICS}
    for i, r in enumerate(rows):
        r["_i"] = i
    shared = [f for f in fields if len({repr(r.get(f)) for r in rows}) > 1]  # what tells settings apart
    settings: dict[tuple, list[dict]] = {}
    for r in rows:
        settings.setdefault(tuple((f, r.get(f)) for f in shared), []).append(r)
    out = []
    for setting, members in sorted(settings.items(), key=lambda kv: repr(kv[0])):
        none = [r for r in members if subgroup(r) is None]
        groups: dict[tuple, list[dict]] = {}
        for r in members:
            if (g := subgroup(r)) is not None:
                groups.setdefault(g, []).append(r)
        for g, grows in sorted(groups.items(), key=lambda kv: repr(kv[0])):
            by_level: dict[str, list[dict]] = {"none": none} if none else {}
            for r in grows:
                by_level.setdefault(label(r), []).append(r)
            seeds = {lv: _per_seed(rs, values) for lv, rs in by_level.items()}
            ref = seeds.get(reference, {})
            base = seeds.get("none", {})
            levels = []
            for lv in sorted(seeds, key=lambda s: (s != "none", _rank(s), s)):
                per = seeds[lv]
                means = {m: float(np.mean([v[m] for v in per.values()])) if per else math.nan for m in METRICS}
                levels.append(Level(lv, len(per), means,
                                    {m: _paired(per, base, m, level) for m in METRICS},
                                    {m: _paired(per, ref, m, level) for m in METRICS}))
            out.append(Comparison(factor, reference, setting + g, levels))
    return out


def _rank(label: str) -> int:
    """Placements in block order; schedules as constant, early, late (by their label's first word)."""
    order = (*PLACEMENT_ORDER, "constant", "early", "late")
    word = label.split(" ")[0]
    return order.index(word) if word in order else len(order)


def _per_seed(rows: list[dict], values: dict[str, np.ndarray]) -> dict[int, dict[str, float]]:
    """seed -> metric -> value (a seed run twice, e.g. reused by two profiles, counts once: its mean)."""
    acc: dict[int, dict[str, list[float]]] = {}
    for r in rows:
        d = acc.setdefault(int(r["seed"]), {m: [] for m in values})
        for m, col in values.items():
            d[m].append(float(col[r["_i"]]))
    return {s: {m: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for m, v in d.items()}
            for s, d in acc.items()}


def _paired(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], metric: str,
            level: float) -> MeanTest:
    """a - b over the seeds both have (an empty test where a is b or nothing pairs)."""
    if a is b:
        return mean_test(np.zeros(0), level)
    common = sorted(set(a) & set(b))
    return mean_test(np.array([a[s][metric] - b[s][metric] for s in common]), level)
