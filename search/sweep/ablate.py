"""One-factor-at-a-time ablation: a baseline trial, then each factor changed alone, x seeds.

    python -m search.run --space wrn_widths --ablate --dry-run
    python -m search.run --space wrn_widths --ablate width=1,2 dropout_rate=0.3 --baseline width=4 --seeds 3

The baseline is the space's declared `baseline` (spaces.Space) with `--baseline KEY=VALUE`
over it. `--ablate FIELD=V1,V2 ...` names the factors and their levels; a bare `--ablate`
ablates every axis, at the space's `ablate` levels where it declares them and at the
profile's grid values otherwise (the baseline's own value left out). Each trial is `space.point(profile, {**baseline, factor: level})` (links
and conditions apply, so a placement of 'none' also resets type and rate), then `--set`.
A variant equal to the baseline or to an earlier variant is dropped. Finished trials are
reused by configuration hash like in any sweep. The plan is written as
`<storage>/<space>/ablation.json`, which `analysis.report` reads for its "ablation" section.
Torch-free.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from search.config import ConfigError, TrialConfig, parse_override, parse_value
from search.registry import did_you_mean

__all__ = ["AblationTrial", "plan", "parse_levels", "ablation_configs", "print_plan", "write_plan", "read_plan",
           "PLAN_FILE"]

PLAN_FILE = "ablation.json"
BASELINE = "baseline"


@dataclass(frozen=True)
class AblationTrial:
    """One trial of the plan: the baseline (factor 'baseline') or one factor at one level."""

    factor: str
    level: Any
    seed: int
    config: dict[str, Any]

    @property
    def config_hash(self) -> str:
        return TrialConfig.from_dict(self.config).config_hash


def parse_levels(specs: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """`['width=1,2', 'dropout_type=uout']` -> {'width': (1.0, 2.0), 'dropout_type': ('uout',)}, typed by TrialConfig.

    Raises:
        ConfigError: a spec without '=', an unknown field, a value of the wrong type, no levels.
    """
    types = {f.name: str(f.type) for f in dataclasses.fields(TrialConfig)}
    out: dict[str, tuple[Any, ...]] = {}
    for spec in specs:
        key, sep, rest = (x.strip() for x in spec.partition("="))
        if not sep:
            raise ConfigError(f"--ablate {spec!r} must look like FIELD=V1,V2")
        if key not in types:
            raise ConfigError(f"--ablate {spec!r}: unknown field {key!r}{did_you_mean(key, list(types))} "
                              f"(allowed: {', '.join(types)})")
        raw = [v.strip() for v in rest.split(",")]
        if not any(raw):
            raise ConfigError(f"--ablate {spec!r}: give levels, e.g. {key}=a,b")
        out[key] = tuple(parse_value(key, types[key], v) for v in raw if v)
    return out


def plan(space: Any, profile: str, *, baseline: Mapping[str, Any] | None = None,
         levels: Mapping[str, Sequence[Any]] | None = None, overrides: Mapping[str, Any] | None = None,
         seeds: int = 1) -> list[AblationTrial]:
    """The baseline and one-factor trials of `space` at `profile`, x `seeds` (validated TrialConfigs).

    Args:
        baseline: values over the space's declared baseline.
        levels: factor -> levels; these factors only (default: every axis, at the space's `ablate`
            levels or the profile's grid).
        overrides: `--set` values applied to every trial (they may not name a factor).
        seeds: 1 keeps the baseline's seed; N > 1 runs seeds 0..N-1.

    Raises:
        ConfigError: no baseline, a bad baseline or level, an override of a factor.
    """
    base_values = {**(space.baseline or {}), **(baseline or {})}
    if not base_values:
        raise ConfigError(f"space {space.name!r} declares no baseline: pass --baseline KEY=VALUE for each axis "
                          f"({', '.join(space.axis_sizes(profile))})")
    overrides = dict(overrides or {})
    grid_levels = {k: tuple(a.grid_values()) for k, a in space._resolve(profile).axes.items()}
    # Explicit levels name the factors; otherwise every axis (at the space's levels, else its grid).
    factors: dict[str, tuple[Any, ...]] = dict(levels) if levels else {**grid_levels, **dict(space.ablate or {})}
    clash = sorted(set(levels or {}) & set(overrides))
    if clash:
        raise ConfigError(f"--set {', '.join(clash)}: an ablated factor cannot also be fixed by --set; "
                          "change the baseline with --baseline instead")
    try:
        base = space.point(profile, base_values)
    except ValueError as e:
        raise ConfigError(f"baseline: {e}") from None
    seed_list = list(range(seeds)) if seeds > 1 else [base.get("seed", 0)]

    def config(values: dict[str, Any], s: int, what: str) -> dict[str, Any]:
        merged = {**values, **overrides, **({"seed": s} if seeds > 1 else {})}
        try:
            return TrialConfig.from_dict(merged).to_dict()
        except ConfigError as e:
            raise ConfigError(f"{what}: {e}") from None

    out: list[AblationTrial] = []
    seen = {_key(config(base, seed_list[0], BASELINE))}
    variants: list[tuple[str, Any, dict[str, Any]]] = []
    for factor, lv in factors.items():
        if factor in overrides:
            continue  # a grid axis the user fixed with --set is not a factor of this ablation
        for level in lv:
            if factor in base and _same(base[factor], level):
                continue
            try:
                cfg = space.point(profile, {**base_values, factor: level})
            except ValueError as e:
                raise ConfigError(f"--ablate {factor}={level!r}: {e}") from None
            k = _key(config(cfg, seed_list[0], f"--ablate {factor}={level!r}"))
            if k not in seen:  # e.g. a kind change while the baseline places no dropout
                seen.add(k)
                variants.append((factor, level, cfg))
    for s in seed_list:
        out.append(AblationTrial(BASELINE, None, s, config(base, s, BASELINE)))
    for factor, level, cfg in variants:
        for s in seed_list:
            out.append(AblationTrial(factor, level, s, config(cfg, s, f"--ablate {factor}={level!r}")))
    return out


def _same(a: Any, b: Any) -> bool:
    return a == b and type(a) is type(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == b)


def _key(cfg: dict[str, Any]) -> str:
    return TrialConfig.from_dict(cfg).config_hash


# ------------------------------------------------------------------------- CLI glue
def ablation_configs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], list[AblationTrial]]:
    """The configs, overrides and plan of `search.run --ablate` (grid algo only).

    Raises:
        ConfigError: see `plan`; --algo other than grid.
    """
    from spaces import get_space

    if args.algo != "grid":
        raise ConfigError(f"--ablate runs a fixed plan: --algo {args.algo!r} is not allowed with it (allowed: grid)")
    space = get_space(args.space)
    if args.profile not in space.profiles:
        raise ConfigError(f"--profile {args.profile!r} is not a profile of space {args.space!r} "
                          f"(allowed: {', '.join(space.profiles)})")
    overrides = dict(parse_override(s) for s in args.set)
    baseline = dict(parse_override(s) for s in getattr(args, "baseline", []) or [])
    seeds = args.seeds
    if seeds is None:  # --seeds not given: the profile's replicates where spaces declare them
        seeds = space.seeds(args.profile) if callable(getattr(space, "seeds", None)) else 1
    trials = plan(space, args.profile, baseline=baseline, levels=parse_levels(args.ablate or []),
                  overrides=overrides, seeds=seeds)
    return [t.config for t in trials], overrides, trials


def print_plan(trials: Sequence[AblationTrial]) -> None:
    """The dry-run table: one line per trial, the factor and level that differ from the baseline."""
    cols = ["width", "dropout_placement", "dropout_type", "dropout_rate", "seed"]
    print(f"{'hash':<17} {'factor':<18} {'level':<10} " + " ".join(f"{c:<17}" for c in cols))
    for t in trials:
        level = "" if t.factor == BASELINE else str(t.level)
        print(f"{t.config_hash:<17} {t.factor:<18} {level:<10} " + " ".join(f"{t.config[c]!s:<17}" for c in cols))
    factors = list(dict.fromkeys(t.factor for t in trials if t.factor != BASELINE))
    seeds = len({t.seed for t in trials})
    n_var = sum(1 for t in trials if t.factor != BASELINE) // max(seeds, 1)
    print(f"{len(trials)} trials: baseline + {n_var} one-factor changes ({', '.join(factors) or 'none'}) "
          f"x {seeds} seed(s)")


def plan_dict(space: str, profile: str, trials: Sequence[AblationTrial]) -> dict[str, Any]:
    """The JSON-able plan analysis reads: the baseline, the factors and each trial's hash."""
    base = next(t.config for t in trials if t.factor == BASELINE)
    return {"space": space, "profile": profile, "baseline": base,
            "trials": [{"factor": t.factor, "level": t.level, "seed": t.seed, "config_hash": t.config_hash}
                       for t in trials]}


def write_plan(storage: str, space: str, profile: str, trials: Sequence[AblationTrial]) -> str:
    """Write `<storage>/<space>/ablation.json` (atomically); returns its path."""
    from search.store import resolve_fs

    fs, base = resolve_fs(storage)
    folder = f"{base.rstrip('/')}/{space}"
    fs.create_dir(folder, recursive=True)
    path, tmp = f"{folder}/{PLAN_FILE}", f"{folder}/.{PLAN_FILE}.tmp"
    with fs.open_output_stream(tmp) as fh:
        fh.write(json.dumps(plan_dict(space, profile, trials), indent=1, default=str).encode())
    fs.move(tmp, path)
    return path


def read_plan(root: str, space: str) -> dict[str, Any] | None:
    """The ablation plan stored for `space` under `root`, or None if it never ran an ablation.

    Raises:
        ValueError: the file exists but is not a plan.
    """
    import pyarrow.fs as pafs

    from search.store import resolve_fs

    fs, base = resolve_fs(root)
    path = f"{base.rstrip('/')}/{space}/{PLAN_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        try:
            plan_ = json.loads(fh.read().decode())
        except ValueError as e:
            raise ValueError(f"{path}: not an ablation plan ({e})") from None
    if not isinstance(plan_, dict) or not {"baseline", "trials"} <= set(plan_):
        raise ValueError(f"{path}: not an ablation plan (needs 'baseline' and 'trials')")
    return plan_
