"""Adaptive replication (`search.run --until-ci W`): add seeds only where an interval is still wide.

After a grid or random sweep, the cells of the quantity that matters (the accuracy cost of a
dropout configuration against no dropout at the same width and context, or the BN
re-estimation gain of a configuration) are read back from the store; a cell whose interval
is wider than W percentage points, or that has none yet (fewer than 3 seeds, no spread), gets
one more seed, for the dropout configuration and for its no-dropout baseline alike, so the
pair stays paired by seed. The sweep runs again (finished trials are reused, as always) until
every cell is narrow enough or has `max_seeds` seeds. A rerun of the same command finds every
cell narrow or at its budget and adds nothing.

Which cells are wide is a statistic of the analysis floor (`analysis.adaptive.wide_cells`, from
analysis.fit's `accuracy_cost` and `bn_reestimation`), above this one: the caller passes it in
(`cells=`; the driver, on the application floor, passes `wide_cells`). This module only decides
which seeds to add.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import pyarrow as pa
from search.config import TrialConfig

__all__ = ["QUANTITIES", "WideCell", "CellsFn", "more_seeds", "family_key"]

QUANTITIES = ("cost", "reest")  # the accuracy cost vs no dropout | the BN re-estimation gain
# Fields that identify a configuration apart from its seed (the hashed ones).
_FAMILY_FIELDS = tuple(f.name for f in dataclasses.fields(TrialConfig)
                       if f.metadata.get("hashed", True) and f.name != "seed")


@dataclasses.dataclass(frozen=True)
class WideCell:
    """A cell whose interval is wider than asked (or missing): the fields that select it, and why."""

    fields: tuple[tuple[str, Any], ...]  # context + dropout type, placement, rate + width
    n: int  # seeds it has
    width_pp: float  # its interval's width in percentage points (NaN: none yet)
    method: str


# (trials, width_pp, quantity, level) -> the cells whose interval is wider than width_pp or missing
CellsFn = Callable[[pa.Table, float, str, float], "list[WideCell]"]


def family_key(d: dict[str, Any]) -> tuple:
    """A configuration without its seed (a trial row or a config dict)."""
    return tuple(d.get(k) for k in _FAMILY_FIELDS)


def _matches(cfg: dict[str, Any], fields: dict[str, Any]) -> bool:
    return all(k in cfg and cfg[k] == v for k, v in fields.items())


def more_seeds(configs: list[dict[str, Any]], trials: pa.Table, width_pp: float, *, cells: CellsFn,
               quantity: str = "cost", max_seeds: int = 10,
               level: float = 0.95) -> tuple[list[dict[str, Any]], list[WideCell]]:
    """The trials to add for the wide cells among `configs`' configurations (one more seed each), and the cells.

    `cells(trials, width_pp, quantity, level)` finds the wide cells (`analysis.adaptive.wide_cells`).

    Only the store's trials of these configurations count (other profiles and spaces are left out). A cost cell
    adds its dropout configuration and its no-dropout baseline at the same context and width, with the same new
    seed (the configuration's first missing seed); a configuration that already has `max_seeds` seeds adds
    nothing.
    """
    families: dict[tuple, list[dict[str, Any]]] = {}
    for c in configs:
        families.setdefault(family_key(c), []).append(c)
    if trials.num_rows:
        keys = [family_key(r) for r in trials.select(list(_FAMILY_FIELDS)).to_pylist()]
        trials = trials.filter(pa.array([k in families for k in keys]))
    wide = cells(trials, width_pp, quantity, level)
    seeds: dict[tuple, set[int]] = {k: {int(c["seed"]) for c in v} for k, v in families.items()}
    for r in trials.select(list(_FAMILY_FIELDS) + ["seed"]).to_pylist() if trials.num_rows else []:
        seeds.setdefault(family_key(r), set()).add(int(r["seed"]))
    extra: dict[tuple, dict[str, Any]] = {}
    grown: list[WideCell] = []
    for cell in wide:
        fields = dict(cell.fields)
        primary = [k for k, v in families.items() if _matches(v[0], fields)]
        if quantity == "cost":
            primary = [k for k in primary if families[k][0].get("dropout_placement") != "none"]
        if len(primary) != 1 or len(seeds[primary[0]]) >= max_seeds:
            continue  # not one of this sweep's configurations, or at its seed budget
        k0 = primary[0]
        new = min(set(range(len(seeds[k0]) + 1)) - seeds[k0])  # its first missing seed
        members = [k0]
        if quantity == "cost":  # the baseline at the same context and width, at the same seed: still a pair
            base = {k: v for k, v in fields.items() if k not in ("dropout_type", "dropout_rate")}
            base["dropout_placement"] = "none"
            members += [k for k, v in families.items() if _matches(v[0], base)]
        for k in members:
            if new not in seeds[k]:
                extra[(k, new)] = TrialConfig.from_dict({**families[k][0], "seed": new}).to_dict()
        grown.append(cell)
    for (k, s) in extra:
        seeds[k].add(s)
    return list(extra.values()), grown
