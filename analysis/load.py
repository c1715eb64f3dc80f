"""Load one or more spaces' `trials` and `layers` Parquet datasets into a `Study`.

Layout (written by `search.store.ResultStore`): `<root>/<space>/trials/*.parquet`
and `<root>/<space>/layers/*.parquet`, one part file per finished trial (or one
compacted file). Reading, checking and de-duplicating are search.store's (one
implementation for the sweep and for analysis): a foreign or corrupt file is one clear
error naming the file and the column; a run written twice keeps its newest row, and a
configuration trained twice (same config_hash and seed) counts once.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from search.config import TrialConfig
from search.schema import TRIALS_SCHEMA, layers_schema
from search.store import dedup, list_parts, read_parts, resolve_fs

__all__ = ["Study", "load_study", "select_profile", "group_codes", "column_floats", "context_fields", "context_key",
           "varying",
           "DROPOUT_KEYS", "SCHEDULE_FIELDS", "constant_schedule",
           "EXPERIMENT_FIELDS", "ALL_PROFILES", "PYTHON_NAMES"]

ALL_PROFILES = "all"
# How load_study's errors name its arguments: a notebook's keywords; analysis.report passes its CLI flags.
PYTHON_NAMES = {"root": "root=", "tracking_uri": "tracking_uri=", "profile": "profile="}


def _arg(names: dict[str, str], key: str, value: object = None) -> str:
    """`--profile 'x'` for a flag, `profile='x'` for a keyword (the name ends with '=')."""
    name = names.get(key, key)
    if value is None:
        return f"{name}..." if name.endswith("=") else name
    return f"{name}{value!r}" if name.endswith("=") else f"{name} {value!r}"

DROPOUT_KEYS = ("dropout_type", "dropout_placement", "dropout_rate")
# The drop-rate schedule (TrialConfig, issue 29): experiment fields, so context (cells split by them); the
# no-dropout baseline has none, and the per-layer closed-form fits keep constant-rate trials (`constant_schedule`).
SCHEDULE_FIELDS = ("dropout_schedule", "dropout_cutoff", "dropout_decay")
# Fields that change the experiment (TrialConfig's hashed ones); the seed is replication, not a factor.
EXPERIMENT_FIELDS = tuple(f.name for f in dataclasses.fields(TrialConfig) if f.metadata.get("hashed", True))


@dataclass(frozen=True)
class Study:
    """The combined results of one or more spaces.

    Attributes:
        trials: one row per trial (TRIALS_SCHEMA), de-duplicated on run_id.
        layers: one row per trial x BN layer (`search.schema.layers_schema()`: registered per-layer metrics included) of the kept trials.
        spaces: the spaces read, in the order given.
        paths: the dataset folders read.
        notes: what loading had to repair (duplicates dropped, orphan layer rows).
        selection: which profile(s) and sweeps were kept, in one sentence ('' when nothing was filtered).
    """

    trials: pa.Table
    layers: pa.Table
    spaces: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    selection: str = ""

    def column(self, name: str, table: str = "trials") -> np.ndarray:
        """A column as a numpy array (nulls become NaN for numbers, None for strings)."""
        t = self.trials if table == "trials" else self.layers
        col = t.column(name)
        if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
            return col.to_numpy(zero_copy_only=False).astype(float) if col.null_count else col.to_numpy()
        if pa.types.is_boolean(col.type):
            return pc.fill_null(col, False).to_numpy(zero_copy_only=False)
        return np.asarray(col.to_pylist(), dtype=object)

    def ok(self) -> "Study":
        """Only trials with status 'ok' (and their layers): the ones with results to fit."""
        mask = pc.equal(self.trials.column("status"), "ok")
        trials = self.trials.filter(mask)
        layers = self.layers.filter(pc.is_in(self.layers.column("run_id"), value_set=trials.column("run_id")))
        return dataclasses.replace(self, trials=trials, layers=layers)

    def where(self, **equal: object) -> "Study":
        """The trials whose columns equal the values given (e.g. algo="optuna", sweep_id=...), with their layers."""
        keep = pa.array(np.ones(self.trials.num_rows, dtype=bool))
        for name, value in equal.items():
            if name not in self.trials.schema.names:
                raise ValueError(f"where({name}=...): no such trials column (columns: docs/columns.md)")
            keep = pc.and_(keep, pc.fill_null(pc.equal(self.trials.column(name), pa.scalar(value)), False))
        trials = self.trials.filter(keep)
        layers = self.layers.filter(pc.is_in(self.layers.column("run_id"), value_set=trials.column("run_id")))
        return dataclasses.replace(self, trials=trials, layers=layers)

    def sweeps(self) -> pa.Table:
        """One row per sweep: sweep_id, algo, profile, trials and the newest finished_at (trials of no recorded
        sweep, e.g. from older files, are one row with a null sweep_id)."""
        t = self.trials.select(["sweep_id", "algo", "profile", "space", "finished_at", "run_id"])
        return (t.group_by(["space", "profile", "algo", "sweep_id"], use_threads=False)
                .aggregate([("run_id", "count"), ("finished_at", "max")])
                .rename_columns(["space", "profile", "algo", "sweep_id", "trials", "finished_at"])
                .sort_by([("finished_at", "ascending")]))

    def status_counts(self) -> dict[str, int]:
        """Number of trials per status, e.g. {'ok': 10, 'failed': 1}."""
        vc = pc.value_counts(self.trials.column("status")).to_pylist()
        return {str(d["values"]): int(d["counts"]) for d in vc}


def load_study(spaces: str | Sequence[str], root: str = "results", tracking_uri: str | None = None, *,
               profile: str | None = None, names: dict[str, str] | None = None) -> Study:
    """Read and combine the result datasets of one or more spaces (docs/python-api.md).

    Args:
        spaces: a space name or several (their trials and seeds combine into one study).
        root: the results root, search.run's --storage (local path or a pyarrow URI such as s3://bucket/results).
        tracking_uri: when a space has no Parquet yet, rebuild it from this MLflow store
            with `search.tracking.rebuild_parquet`.
        profile: which profile's trials, as analysis.report picks them: None (default) each space's latest
            sweep's profile, a name, or "all" to pool every profile; `Study.selection` says what was kept.
        names: how errors name the arguments (analysis.report passes its flags; default the keywords).

    Raises:
        ValueError: no space given, a space without results (names the paths looked at
            and the command that creates them), or a file that is not a results file
            (names the file and the column).
    """
    flags = {**PYTHON_NAMES, **(names or {})}
    names = [spaces] if isinstance(spaces, str) else list(spaces)
    if not names or any(not isinstance(s, str) or not s for s in names):
        raise ValueError(f"spaces must be one or more non-empty names, got {spaces!r}")
    fs, base = resolve_fs(root)
    trials_parts: list[tuple[str, float]] = []
    layers_parts: list[tuple[str, float]] = []
    paths: list[str] = []
    for space in dict.fromkeys(names):  # a space named twice is read once
        tdir, ldir = f"{base.rstrip('/')}/{space}/trials", f"{base.rstrip('/')}/{space}/layers"
        t_parts, l_parts = list_parts(fs, tdir), list_parts(fs, ldir)
        rebuilt = ""
        if not t_parts and tracking_uri:
            rebuilt = _rebuild(space, tracking_uri, root, flag=flags["tracking_uri"].rstrip("="))
            t_parts, l_parts = list_parts(fs, tdir), list_parts(fs, ldir)
        if not t_parts:
            how = (f"rebuilding from MLflow at {tracking_uri} gave nothing ({rebuilt})" if tracking_uri
                   else f"or pass {_arg(flags, 'tracking_uri')} to rebuild them from MLflow")
            raise ValueError(f"space {space!r}: no trial results under {tdir} (and {ldir}); is {root!r} the "
                             f"sweep's --storage? pass that folder as {_arg(flags, 'root')} (the `report:` line a "
                             f"sweep prints has it), create them with `python -m search.run --space {space}` {how}")
        trials_parts += t_parts
        layers_parts += l_parts
        paths += [tdir, ldir]
    trials = read_parts(fs, trials_parts, TRIALS_SCHEMA, with_file=True)
    _check_rows(trials, dict.fromkeys(names), base, root, tracking_uri, flags)
    layers = read_parts(fs, layers_parts, layers_schema())  # registered per-layer metrics included
    trials, layers, notes = dedup(trials, layers, trials_parts, layers_parts, fs)
    trials, layers = _fill_normalization(trials, _fill_bn_name(layers))
    study = Study(trials, layers, tuple(dict.fromkeys(names)), tuple(paths), tuple(notes))
    study, text = select_profile(study, profile, flag=flags["profile"])
    return dataclasses.replace(study, selection=text)


def _check_rows(trials: pa.Table, spaces: Sequence[str], base: str, root: str, tracking_uri: str | None,
                flags: dict[str, str]) -> None:
    """Raise ValueError for a space whose part files hold no trial row: a report of nothing exited 0 (issue 30).

    `trials` carries `__filename` (read_parts with_file), so the rows are counted per space's folder."""
    files = pc.value_counts(trials.column("__filename")).to_pylist() if trials.num_rows else []
    held = [str(d["values"]) for d in files]
    for space in spaces:
        tdir = f"{base.rstrip('/')}/{space}/trials"
        if not any(f.startswith(tdir + "/") for f in held):
            src = f" (rebuilt from {_arg(flags, 'tracking_uri', tracking_uri)})" if tracking_uri else ""
            raise ValueError(f"space {space!r}: the trials dataset {tdir}{src} holds no trial rows (its part files "
                             f"are empty): nothing to report, nothing was written; run `python -m search.run "
                             f"--space {space} --storage {root}` (or --resume it) until a trial finishes")


def _fill_bn_name(layers: pa.Table) -> pa.Table:
    """bn_name for rows written before it was recorded: `name`, less the `.1` a pre_bn wrapper adds to the BN
    it feeds (the only registered placement that wraps a BN; a plugin's older rows keep `name`)."""
    if "bn_name" not in layers.schema.names or layers.column("bn_name").null_count == 0:
        return layers
    name = layers.column("name")
    wrapped = pc.and_(pc.and_(pc.equal(layers.column("dropout_placement"), "pre_bn"),
                              pc.fill_null(layers.column("fed_by_dropout"), False)),
                      pc.ends_with(name, ".1"))
    stripped = pc.utf8_slice_codeunits(name, 0, -2)
    guess = pc.if_else(pc.fill_null(wrapped, False), stripped, name)
    i = layers.schema.get_field_index("bn_name")
    return layers.set_column(i, layers.schema.field(i), pc.coalesce(layers.column("bn_name"), guess))


def _fill_normalization(trials: pa.Table, layers: pa.Table) -> tuple[pa.Table, pa.Table]:
    """In a study where some trial names a normalization (groupnorm, none), the others' null (the default,
    TrialConfig stores batchnorm as None) reads `batchnorm`, and so does a layer row's null `norm_type`;
    the tables and captions then say batchnorm, not None. A study of BN trials only is left as it is."""
    if "normalization" not in trials.schema.names or trials.column("normalization").null_count == trials.num_rows:
        return trials, layers
    i = trials.schema.get_field_index("normalization")
    trials = trials.set_column(i, trials.schema.field(i), pc.fill_null(trials.column(i), "batchnorm"))
    if "norm_type" in layers.schema.names:
        j = layers.schema.get_field_index("norm_type")
        layers = layers.set_column(j, layers.schema.field(j), pc.fill_null(layers.column(j), "batchnorm"))
    return trials, layers


def _rebuild(space: str, tracking_uri: str, root: str, flag: str = "tracking_uri") -> str:
    """Regenerate a space's Parquet from MLflow; returns a reason when nothing came of it.

    Raises OSError/ValueError naming `flag` when the store is not one to read: it does not exist (a mistyped
    URI created an empty store before, issue 30), it is not an MLflow store, or its server does not answer."""
    from search.sweep.preflight import check_tracking

    check_tracking(tracking_uri, reading=True, flag=flag)
    _check_experiment(space, tracking_uri, flag)
    try:
        from search.sweep.tracking import rebuild_parquet  # lazy: mlflow is heavy
    except ImportError as exc:  # pragma: no cover - depends on the installed stack
        return f"search.sweep.tracking is not importable: {exc}"
    try:
        n_trials, _ = rebuild_parquet(space, tracking_uri, root)
    except ValueError as exc:
        return str(exc)
    return "" if n_trials else "the experiment has no finished runs"


def _check_experiment(space: str, tracking_uri: str, flag: str) -> None:
    """Raise ValueError unless the store holds the space's experiment with at least one trial run: a rebuild of
    nothing wrote empty Parquet and the report exited 0 with no trials in it (issue 30)."""
    from mlflow.tracking import MlflowClient  # lazy: mlflow is heavy

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(space)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments(max_results=50) if e.name != "Default")
        raise ValueError(f"space {space!r}: {flag} {tracking_uri!r} has no MLflow experiment of that name "
                         f"(experiments there: {', '.join(names) or 'none'}); nothing was rebuilt: give the store "
                         f"the sweep wrote to, or create the results with `python -m search.run --space {space}`")
    if not client.search_runs([exp.experiment_id], filter_string="tags.config_hash LIKE '%'", max_results=1):
        raise ValueError(f"space {space!r}: the MLflow experiment at {flag} {tracking_uri!r} holds no trial runs; "
                         f"nothing was rebuilt: run `python -m search.run --space {space} --tracking-uri "
                         f"{tracking_uri}` first")
    # The rebuild takes FINISHED and FAILED runs only: with none, it wrote empty Parquet (issue 30)
    if not any(client.search_runs([exp.experiment_id], max_results=1,
                                  filter_string=f"tags.config_hash LIKE '%' AND attributes.status = '{status}'")
               for status in ("FINISHED", "FAILED")):
        raise ValueError(f"space {space!r}: the MLflow experiment at {flag} {tracking_uri!r} holds no finished "
                         f"trial run (every trial run is RUNNING or KILLED); nothing was rebuilt: finish the sweep "
                         f"with `python -m search.run --space {space} --tracking-uri {tracking_uri} --resume`")


# ------------------------------------------------------------ table helpers
def column_floats(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64, nulls as NaN; all NaN when `table` has no such column."""
    if name not in table.column_names:
        return np.full(table.num_rows, math.nan)
    return pc.fill_null(pc.cast(table.column(name), pa.float64()), math.nan).to_numpy(zero_copy_only=False)


def group_codes(table: pa.Table, cols: tuple[str, ...] | list[str]) -> tuple[np.ndarray, list[tuple]]:
    """Integer group code per row and the typed key of each group, by the columns' values."""
    if table.num_rows == 0:
        return np.zeros(0, np.int64), []
    parts = [pc.fill_null(pc.cast(table.column(c), pa.string()), "\x00") for c in cols]
    key = parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, "\x1f")
    enc = pc.dictionary_encode(pa.chunked_array(key).combine_chunks())
    codes = enc.indices.to_numpy().astype(np.int64)
    _, first = np.unique(codes, return_index=True)  # codes are 0..G-1 in first-seen order
    rows = table.select(list(cols)).take(pa.array(first)).to_pylist()
    return codes, [tuple(r[c] for c in cols) for r in rows]


def context_fields(trials: pa.Table) -> list[str]:
    """Experiment fields other than the dropout axes, width and seed: what a baseline must match."""
    skip = set(DROPOUT_KEYS) | {"width", "seed"}
    return [f for f in EXPERIMENT_FIELDS if f not in skip and f in trials.schema.names]


def context_key(context: tuple[tuple[str, object], ...]) -> tuple:
    """A sort key for a context ((field, value), ...) whose values may be null beside values (a field at its None
    default in some trials, e.g. normalization): null sorts first, and None is never compared with a str."""
    return tuple((k, v is not None, v if v is not None else 0) for k, v in context)


def constant_schedule(table: pa.Table) -> pa.Array:
    """Row mask: the trial's dropout ran at one rate throughout (dropout_schedule null or 'constant', as every row
    of a file written before schedules existed).

    The per-layer fits against the closed form pool rows by DROPOUT_KEYS and take dropout_rate as the rate the
    sites held when the probe ran; a scheduled trial's sites ended at another rate (early dropout: 0) after
    another history, so those fits leave its layers out; its cells (the schedule is context) report it.
    """
    if "dropout_schedule" not in table.column_names:
        return pa.array(np.ones(table.num_rows, dtype=bool))
    return pc.fill_null(pc.equal(table.column("dropout_schedule"), "constant"), True).combine_chunks()


def varying(trials: pa.Table, fields: list[str]) -> list[str]:
    """The fields with more than one distinct value in the table."""
    return [f for f in fields if trials.num_rows and pc.count_distinct(trials.column(f), mode="all").as_py() > 1]


def select_profile(study: Study, profile: str | None = None, *, flag: str = "--profile") -> tuple[Study, str]:
    """The trials of one profile per space, so a report never pools e.g. digits with Fashion-MNIST.

    Args:
        study: the loaded study (every profile its spaces hold).
        profile: a profile name; None: each space's latest sweep (the profile of its newest trial);
            "all": every profile, pooled (asked for explicitly).
        flag: how the sentence and errors name the choice (`--profile` for a CLI, `profile=` in Python).

    Returns:
        The filtered study (layers follow their trials) and one sentence saying which profile was reported.

    Raises:
        ValueError: a named profile with no trials (one line listing the profiles there are).
    """
    kw = flag.endswith("=")  # a keyword (profile=) or a flag (--profile)
    opt = lambda v: f"{flag}{v}" if kw else f"{flag} {v}"  # noqa: E731
    t = study.trials
    spaces = t.column("space").to_pylist()
    profiles = [p or "" for p in t.column("profile").to_pylist()]
    when = pc.fill_null(t.column("finished_at").cast(pa.int64()), -(2**62)).to_pylist() if t.num_rows else []
    held: dict[str, dict[str, int]] = {}  # space -> profile -> newest finished_at
    for sp, pr, ts in zip(spaces, profiles, when):
        held.setdefault(sp, {})[pr] = max(ts, held.get(sp, {}).get(pr, ts))
    show = lambda prs: ", ".join(p or "(none recorded)" for p in sorted(prs))  # noqa: E731
    if profile == ALL_PROFILES or not held:
        names = sorted({p for prs in held.values() for p in prs})
        return study, f"Profiles: all, pooled as asked ({show(names) or 'none'})."
    if profile is None:
        chosen = {sp: max(prs, key=prs.get) for sp, prs in held.items()}
        how = "the latest sweep's"
    else:
        chosen = {sp: profile for sp, prs in held.items() if profile in prs}
        if not chosen:
            there = "; ".join(f"{sp}: {show(prs)}" for sp, prs in held.items())
            raise ValueError(f"{_arg({'p': flag}, 'p', profile)}: no trials of that profile in {', '.join(held)} "
                             f"(profiles there: {there}; or {opt(repr(ALL_PROFILES) if kw else ALL_PROFILES)})")
        how = "as asked"
    keep = np.array([chosen.get(sp) == pr for sp, pr in zip(spaces, profiles)], dtype=bool)
    trials = t.filter(pa.array(keep))
    layers = study.layers.filter(pc.is_in(study.layers.column("run_id"), value_set=trials.column("run_id")))
    left = sorted({f"{sp}/{p or '(none recorded)'}" for sp, prs in held.items() for p in prs if chosen.get(sp) != p})
    text = "Profile: " + "; ".join(f"{sp} {pr or '(none recorded)'}" for sp, pr in chosen.items()) + f" ({how}"
    text += (f"; not pooled with {', '.join(left)}: pass {opt('NAME')} or "
             f"{opt(repr(ALL_PROFILES) if kw else ALL_PROFILES)})." if left else ").")
    return dataclasses.replace(study, trials=trials, layers=layers), text
