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
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from search.config import TrialConfig
from search.schema import LAYERS_SCHEMA, TRIALS_SCHEMA
from search.store import dedup, list_parts, read_parts, resolve_fs

__all__ = ["Study", "load_study", "group_codes", "context_fields", "varying", "DROPOUT_KEYS", "EXPERIMENT_FIELDS"]

DROPOUT_KEYS = ("dropout_type", "dropout_placement", "dropout_rate")
# Fields that change the experiment (TrialConfig's hashed ones); the seed is replication, not a factor.
EXPERIMENT_FIELDS = tuple(f.name for f in dataclasses.fields(TrialConfig) if f.metadata.get("hashed", True))


@dataclass(frozen=True)
class Study:
    """The combined results of one or more spaces.

    Attributes:
        trials: one row per trial (TRIALS_SCHEMA), de-duplicated on run_id.
        layers: one row per trial x BN layer (LAYERS_SCHEMA) of the kept trials.
        spaces: the spaces read, in the order given.
        paths: the dataset folders read.
        notes: what loading had to repair (duplicates dropped, orphan layer rows).
    """

    trials: pa.Table
    layers: pa.Table
    spaces: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

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
        return Study(trials, layers, self.spaces, self.paths, self.notes)

    def status_counts(self) -> dict[str, int]:
        """Number of trials per status, e.g. {'ok': 10, 'failed': 1}."""
        vc = pc.value_counts(self.trials.column("status")).to_pylist()
        return {str(d["values"]): int(d["counts"]) for d in vc}


def load_study(spaces: str | Sequence[str], root: str = "results", tracking_uri: str | None = None) -> Study:
    """Read and combine the result datasets of one or more spaces.

    Args:
        spaces: a space name or several (their trials and seeds combine into one study).
        root: the results root (local path or a pyarrow URI such as s3://bucket/results).
        tracking_uri: when a space has no Parquet yet, rebuild it from this MLflow store
            with `search.tracking.rebuild_parquet`.

    Raises:
        ValueError: no space given, a space without results (names the paths looked at
            and the command that creates them), or a file that is not a results file
            (names the file and the column).
    """
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
            rebuilt = _rebuild(space, tracking_uri, root)
            t_parts, l_parts = list_parts(fs, tdir), list_parts(fs, ldir)
        if not t_parts:
            how = (f"rebuilding from MLflow at {tracking_uri} gave nothing ({rebuilt})" if tracking_uri
                   else "or pass --tracking-uri to rebuild them from MLflow")
            raise ValueError(f"space {space!r}: no trial results under {tdir} (and {ldir}); create them with "
                             f"`python -m search.run --space {space}` {how}")
        trials_parts += t_parts
        layers_parts += l_parts
        paths += [tdir, ldir]
    trials = read_parts(fs, trials_parts, TRIALS_SCHEMA, with_file=True)
    layers = read_parts(fs, layers_parts, LAYERS_SCHEMA)
    trials, layers, notes = dedup(trials, layers, trials_parts, layers_parts, fs)
    return Study(trials, layers, tuple(dict.fromkeys(names)), tuple(paths), tuple(notes))


def _rebuild(space: str, tracking_uri: str, root: str) -> str:
    """Regenerate a space's Parquet from MLflow; returns a reason when nothing came of it."""
    try:
        from search.sweep.tracking import rebuild_parquet  # lazy: mlflow is heavy
    except ImportError as exc:  # pragma: no cover - depends on the installed stack
        return f"search.sweep.tracking is not importable: {exc}"
    try:
        n_trials, _ = rebuild_parquet(space, tracking_uri, root)
    except ValueError as exc:
        return str(exc)
    return "" if n_trials else "the experiment has no finished runs"


# ------------------------------------------------------------ table helpers
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


def varying(trials: pa.Table, fields: list[str]) -> list[str]:
    """The fields with more than one distinct value in the table."""
    return [f for f in fields if trials.num_rows and pc.count_distinct(trials.column(f), mode="all").as_py() > 1]
