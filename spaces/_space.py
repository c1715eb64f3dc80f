"""The `Space` abstraction: fixed values, ordered axes, conditions, links and profiles.

A Space is declarative and cheap to import (no torch, ray or mlflow; optuna only
inside `Space.suggest`). Every method takes the profile as an argument: the
space stays one object and a profile only overrides some of its values.

Resolution of one trial, in this order (later wins):
    fixed  <-  profile.fixed  <-  one value per axis (in axis order), each followed
    by its links (per-value field overrides)  <-  values forced by inactive conditions.

An axis governed by a condition is visited only when the condition is active
for the partial config built so far; otherwise its field takes the condition's
`otherwise` value and contributes a single point, so the grid never holds
duplicates from irrelevant axes.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, Union

from search.registry import not_allowed

if TYPE_CHECKING:  # pragma: no cover
    import optuna

__all__ = [
    "Axis",
    "Choice",
    "Range",
    "Condition",
    "Profile",
    "Space",
    "SpaceError",
    "dropout_condition",
    "REQUIRED_FIELDS",
    "DEFAULT_PROFILES",
]

# Every trial dict a space produces sets these TrialConfig fields, so a change of
# TrialConfig's defaults never silently changes what a space means.
REQUIRED_FIELDS: tuple[str, ...] = (
    "backbone", "depth", "width", "dropout_type", "dropout_placement", "dropout_rate",
    "dataset", "image_size", "in_chans", "epochs", "batch_size", "lr", "weight_decay", "schedule", "seed",
)
# Every shipped space offers these (a test checks); a space may add more.
DEFAULT_PROFILES: tuple[str, ...] = ("quick", "paper")

Value = Any  # a plain JSON-able value: str, int, float, bool or None


class SpaceError(ValueError):
    """A bad space, profile or axis. The message names the field, the value and what is allowed."""


def _not_allowed(name: str, value: Any, allowed: Sequence[str], where: str = "") -> SpaceError:
    return SpaceError(str(not_allowed(f"field {name!r}", value, allowed, where)))


# ---------------------------------------------------------------------- axes
class Axis:
    """One varied field: grid values for grid search, a distribution for random/Optuna search."""

    def grid_values(self) -> tuple[Value, ...]:
        """The values grid search visits, in order."""
        raise NotImplementedError

    def sample(self, rng: random.Random) -> Value:
        """One random value."""
        raise NotImplementedError

    def suggest(self, trial: "optuna.trial.Trial", name: str) -> Value:
        """One value from Optuna's define-by-run API."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.grid_values())


@dataclass(frozen=True)
class Choice(Axis):
    """A finite list of values, visited in order by grid search; categorical for Optuna."""

    values: tuple[Value, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(self.values))
        if not self.values:
            raise SpaceError("a Choice axis needs at least one value")
        keys = [_key(v) for v in self.values]
        if len(set(keys)) != len(keys):
            raise SpaceError(f"a Choice axis has duplicate values: {self.values!r}")

    def grid_values(self) -> tuple[Value, ...]:
        return self.values

    def sample(self, rng: random.Random) -> Value:
        return self.values[0] if len(self.values) == 1 else rng.choice(self.values)

    def suggest(self, trial: "optuna.trial.Trial", name: str) -> Value:
        # A single value is a constant: no Optuna parameter, nothing to learn.
        return self.values[0] if len(self.values) == 1 else trial.suggest_categorical(name, list(self.values))


@dataclass(frozen=True)
class Range(Axis):
    """A numeric interval [low, high] for random/Optuna search, plus the grid's explicit values.

    `log` samples log-uniformly; `step` quantises (not with log, as in Optuna);
    `integer` draws ints (Optuna's suggest_int) instead of floats.
    """

    low: float
    high: float
    grid: tuple[float, ...]
    log: bool = False
    step: float | None = None
    integer: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(self.grid))
        if not self.low <= self.high:
            raise SpaceError(f"Range low={self.low!r} must be <= high={self.high!r}")
        if self.log and (self.low <= 0 or self.step is not None):
            raise SpaceError(f"Range log=True needs low > 0 and no step (low={self.low!r}, step={self.step!r})")
        if self.step is not None and self.step <= 0:
            raise SpaceError(f"Range step must be > 0, got {self.step!r}")
        if not self.grid:
            raise SpaceError("a Range axis needs at least one grid value")
        for g in self.grid:
            if not self.low <= g <= self.high:
                raise SpaceError(f"Range grid value {g!r} is outside [{self.low!r}, {self.high!r}]")
        if len(set(self.grid)) != len(self.grid):
            raise SpaceError(f"a Range axis has duplicate grid values: {self.grid!r}")

    def grid_values(self) -> tuple[Value, ...]:
        return tuple(int(g) if self.integer else float(g) for g in self.grid)

    def sample(self, rng: random.Random) -> Value:
        if self.step is not None:
            n = int(math.floor((self.high - self.low) / self.step + 1e-9))
            x = self.low + self.step * rng.randint(0, n)
        elif self.log:
            x = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        elif self.integer:
            return rng.randint(int(self.low), int(self.high))
        else:
            x = rng.uniform(self.low, self.high)
        # Rounding keeps 0.1 + 2*0.2 from hashing apart from 0.5.
        return int(round(x)) if self.integer else round(min(max(x, self.low), self.high), 12)

    def suggest(self, trial: "optuna.trial.Trial", name: str) -> Value:
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        x = trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)
        return round(x, 12) if self.step is not None else x


AxisLike = Union[Axis, Sequence[Value]]


def _as_axis(name: str, axis: AxisLike) -> Axis:
    if isinstance(axis, Axis):
        return axis
    if isinstance(axis, (str, bytes)) or not isinstance(axis, Sequence):
        raise SpaceError(f"axis {name!r} must be an Axis or a list of values, got {axis!r}")
    return Choice(tuple(axis))


# ---------------------------------------------------------------- conditions
@dataclass(frozen=True)
class Condition:
    """Fields that matter only for some configs.

    `when(partial)` reads only the fields named in `on` (fixed values or earlier
    axes); while it is False the fields in `fields` are forced to `otherwise`
    and, if they are axes, not varied.
    """

    on: tuple[str, ...]
    when: Callable[[Mapping[str, Any]], bool]
    otherwise: Mapping[str, Value]
    text: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "on", tuple(self.on))
        object.__setattr__(self, "otherwise", dict(self.otherwise))

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.otherwise)


def dropout_condition() -> Condition:
    """Dropout type and rate matter only when dropout is placed somewhere."""
    return Condition(
        on=("dropout_placement",),
        when=lambda c: c["dropout_placement"] != "none",
        otherwise={"dropout_type": "bernoulli", "dropout_rate": 0.0},
        text="dropout_type/dropout_rate only when dropout_placement != none",
    )


# ------------------------------------------------------------------ profiles
Links = Mapping[str, Mapping[Value, Mapping[str, Value]]]


@dataclass(frozen=True)
class Profile:
    """Overrides of a space for one scale of study.

    `fixed` overrides fixed values; `axes` replaces axes of the same name (a new
    name is appended as a new axis); `links` merges, per axis value, over the
    space's links. `seeds` is how many replicates (seeds 0..seeds-1) `search.run`
    trains of each configuration when `--seeds` is not given; seed 0 is the
    profile's own trial, so its config hash does not change with `seeds`.
    """

    fixed: Mapping[str, Value] = field(default_factory=dict)
    axes: Mapping[str, AxisLike] = field(default_factory=dict)
    links: Links = field(default_factory=dict)
    text: str = ""
    seeds: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise SpaceError(f"field 'seeds' = {self.seeds!r} is not allowed (allowed: an integer >= 1)")


@dataclass(frozen=True)
class _Resolved:
    fixed: dict[str, Value]
    axes: dict[str, Axis]
    links: dict[str, dict[Value, dict[str, Value]]]


# --------------------------------------------------------------------- space
@dataclass(frozen=True)
class Space:
    """A declarative search space over TrialConfig fields.

    Attributes:
        name: registry name.
        description: one sentence on what the space studies.
        fixed: field values common to all trials.
        axes: ordered field -> Axis (a plain list is a Choice); the first axis varies slowest.
        conditions: fields that matter only for some configs (default: the dropout condition).
        links: axis -> value -> field overrides applied when the axis takes that value
            (e.g. backbone -> its valid depth).
        profiles: profile name -> Profile; every shipped space has `quick` and `paper`.
        baseline: optional field values of the reference trial of a one-factor-at-a-time
            ablation (`search.run --ablate`): one value per axis (non-axis fields allowed too).
        ablate: optional field -> levels to try one at a time against the baseline; a field
            not named here is tried at its profile's grid values (search/sweep/ablate.py).
    """

    name: str
    description: str
    fixed: Mapping[str, Value]
    axes: Mapping[str, AxisLike]
    profiles: Mapping[str, Profile]
    conditions: tuple[Condition, ...] = field(default_factory=lambda: (dropout_condition(),))
    links: Links = field(default_factory=dict)
    baseline: Mapping[str, Value] | None = None
    ablate: Mapping[str, Sequence[Value]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fixed", dict(self.fixed))
        if self.baseline is not None:
            object.__setattr__(self, "baseline", dict(self.baseline))
        if self.ablate is not None:
            for k, levels in self.ablate.items():
                if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
                    raise SpaceError(f"space {self.name!r}: ablate[{k!r}] must be a non-empty list of levels, "
                                     f"got {levels!r}")
            object.__setattr__(self, "ablate", {k: tuple(v) for k, v in self.ablate.items()})
        object.__setattr__(self, "axes", {k: _as_axis(k, a) for k, a in self.axes.items()})
        object.__setattr__(self, "profiles", dict(self.profiles))
        object.__setattr__(self, "conditions", tuple(self.conditions))
        if not self.profiles:
            raise SpaceError(f"space {self.name!r} declares no profiles")
        for prof in self.profiles:
            self._check(prof, self._resolve(prof))

    # -------------------------------------------------------------- public
    def grid(self, profile: str) -> list[dict[str, Value]]:
        """All grid trials: flat config dicts for `TrialConfig.from_dict`.

        Deterministic (axis order, first axis slowest) and de-duplicated after
        conditions and links.

        Raises:
            SpaceError: unknown profile.
        """
        r = self._resolve(profile)
        out: list[dict[str, Value]] = []
        seen: set[str] = set()
        for cfg in self._expand(r, dict(r.fixed), list(r.axes)):
            k = _key(cfg)
            if k not in seen:
                seen.add(k)
                out.append(cfg)
        return out

    def seeds(self, profile: str) -> int:
        """Replicates per configuration that `search.run` trains by default (the profile's `seeds`).

        Raises:
            SpaceError: unknown profile.
        """
        self._resolve(profile)  # the one check (and message) for an unknown profile
        return self.profiles[profile].seeds

    def axis_sizes(self, profile: str) -> dict[str, int]:
        """Grid values per axis, before conditions (their product bounds `size`)."""
        return {k: len(a) for k, a in self._resolve(profile).axes.items()}

    def size(self, profile: str) -> int:
        """Number of grid trials after conditions; equals `len(grid(profile))`."""
        return len(self.grid(profile))

    def sample(self, rng: random.Random, profile: str) -> dict[str, Value]:
        """One random trial honouring the conditions (inactive axes are not drawn)."""
        return self._walk(self._resolve(profile), lambda name, axis: axis.sample(rng))

    def suggest(self, trial: "optuna.trial.Trial", profile: str) -> dict[str, Value]:
        """One trial from Optuna's define-by-run API.

        Axes are suggested in order, so a condition's deciding axis (e.g. the
        placement) comes first and the fields it governs are suggested only when
        active. Single-valued axes are constants, not Optuna parameters.
        """
        return self._walk(self._resolve(profile), lambda name, axis: axis.suggest(trial, name))

    def point(self, profile: str, values: Mapping[str, Value]) -> dict[str, Value]:
        """One trial from explicit values: fixed, then each axis's value (with its links), then conditions.

        Every active axis must get a value; `values` may also set non-axis fields.

        Raises:
            SpaceError: unknown profile, or an active axis without a value.
        """
        r = self._resolve(profile)
        cfg = dict(r.fixed)
        for name in r.axes:
            if name in values:
                cfg = self._set(r, cfg, name, values[name])
            elif self._active(name, cfg):
                raise SpaceError(f"space {self.name!r}, profile {profile!r}: no value for axis {name!r} "
                                 f"(given: {', '.join(values) or 'none'})")
        cfg.update({k: v for k, v in values.items() if k not in r.axes})
        return self._forced(cfg)

    def describe(self, profile: str) -> str:
        """A one-line summary: size, axes, conditions and the key fixed values."""
        r = self._resolve(profile)
        axes = " x ".join(f"{k}({len(a)})" for k, a in r.axes.items())
        conds = "; ".join(c.text for c in self.conditions if c.text)
        keys = ("backbone", "depth", "width", "dataset", "image_size", "epochs", "batch_size", "lr")
        linked_fields = {a: sorted({f for o in pv.values() for f in o}) for a, pv in r.links.items()}
        skip = set(r.axes).union(*linked_fields.values())
        fixed = " ".join(f"{k}={r.fixed[k]}" for k in keys if k in r.fixed and k not in skip)
        linked = "".join(f"; {a} sets {', '.join(fs)}" for a, fs in linked_fields.items())
        return (f"{self.name}[{profile}]: {self.size(profile)} trials = {axes}"
                f"{'; ' + conds if conds else ''}{linked}; {fixed}")

    # ------------------------------------------------------------- helpers
    def _resolve(self, profile: str) -> _Resolved:
        if profile not in self.profiles:
            raise _not_allowed("profile", profile, list(self.profiles), f" for space {self.name!r}")
        p = self.profiles[profile]
        axes = dict(self.axes)
        axes.update({k: _as_axis(k, a) for k, a in p.axes.items()})
        links: dict[str, dict[Value, dict[str, Value]]] = {}
        for src in (self.links, p.links):
            for axis, per_value in src.items():
                for value, over in per_value.items():
                    links.setdefault(axis, {}).setdefault(value, {}).update(over)
        fixed = {**self.fixed, **p.fixed}
        return _Resolved(fixed={k: v for k, v in fixed.items() if k not in axes}, axes=axes, links=links)

    def _check(self, profile: str, r: _Resolved) -> None:
        where = f"space {self.name!r}, profile {profile!r}"
        order = list(r.axes)
        for axis, per_value in r.links.items():
            if axis not in r.axes:
                raise SpaceError(f"{where}: links on {axis!r}, which is not an axis (axes: {', '.join(order)})")
            for value, over in per_value.items():  # values a profile leaves out are simply unused
                clash = sorted(set(over) & set(r.axes))
                if clash:
                    raise SpaceError(f"{where}: links of {axis}={value!r} set axes {clash}; link fixed fields only")
        for c in self.conditions:
            for f in c.on:
                if f in r.axes:
                    late = [g for g in c.fields if g in r.axes and order.index(g) < order.index(f)]
                    if late:
                        raise SpaceError(f"{where}: axis {f!r} decides {late} and must come before them")
                elif f not in r.fixed and not any(f in o for pv in r.links.values() for o in pv.values()):
                    raise SpaceError(f"{where}: condition reads {f!r}, which is neither fixed nor an axis")
        covered = set(r.fixed) | set(r.axes) | {f for c in self.conditions for f in c.fields}
        for axis, per_value in r.links.items():  # a field every value of the axis links counts as set
            sets = [set(per_value.get(v, {})) for v in r.axes[axis].grid_values()]
            covered |= set.intersection(*sets)
        missing = [f for f in REQUIRED_FIELDS if f not in covered]
        if missing:
            raise SpaceError(f"{where}: sets no value for required fields {missing}")

    def _governing(self, name: str) -> list[Condition]:
        return [c for c in self.conditions if name in c.otherwise]

    def _active(self, name: str, partial: Mapping[str, Value]) -> bool:
        return all(c.when(partial) for c in self._governing(name))

    def _forced(self, cfg: dict[str, Value]) -> dict[str, Value]:
        for c in self.conditions:
            if not c.when(cfg):
                cfg.update(c.otherwise)
        return cfg

    def _set(self, r: _Resolved, cfg: dict[str, Value], name: str, value: Value) -> dict[str, Value]:
        cfg = {**cfg, name: value}
        cfg.update(r.links.get(name, {}).get(value, {}))
        return cfg

    def _expand(self, r: _Resolved, cfg: dict[str, Value], todo: list[str]) -> Iterator[dict[str, Value]]:
        if not todo:
            yield self._forced(dict(cfg))
            return
        name, rest = todo[0], todo[1:]
        if not self._active(name, cfg):
            yield from self._expand(r, cfg, rest)  # forced at the leaf: one point, no duplicates
            return
        for value in r.axes[name].grid_values():
            yield from self._expand(r, self._set(r, cfg, name, value), rest)

    def _walk(self, r: _Resolved, pick: Callable[[str, Axis], Value]) -> dict[str, Value]:
        cfg = dict(r.fixed)
        for name, axis in r.axes.items():
            if self._active(name, cfg):
                cfg = self._set(r, cfg, name, pick(name, axis))
        return self._forced(cfg)


def _key(value: Any) -> str:
    """Canonical text of a value or config, for de-duplication (1 and 1.0 alike)."""

    def norm(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, Mapping):
            return {str(k): norm(x) for k, x in v.items()}
        return v

    return json.dumps(norm(value), sort_keys=True, separators=(",", ":"), default=str)

