"""Load one or more spaces' `trials` and `layers` Parquet datasets into a `Study`.

Layout (written by `search.store.ResultStore`): `<root>/<space>/trials/*.parquet`
and `<root>/<space>/layers/*.parquet`, one part file per finished trial (or one
compacted file). Every file is checked against `search.schema` before it is
read, so a foreign or corrupt file is one clear error naming the file and the
column. A run written twice (a resumed sweep) keeps its newest row.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from search.config import TrialConfig
from search.schema import LAYERS_SCHEMA, TRIALS_SCHEMA
from search.store import resolve_fs

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
        t_parts, l_parts = _parts(fs, tdir), _parts(fs, ldir)
        rebuilt = ""
        if not t_parts and tracking_uri:
            rebuilt = _rebuild(space, tracking_uri, root)
            t_parts, l_parts = _parts(fs, tdir), _parts(fs, ldir)
        if not t_parts:
            how = (f"rebuilding from MLflow at {tracking_uri} gave nothing ({rebuilt})" if tracking_uri
                   else "or pass --tracking-uri to rebuild them from MLflow")
            raise ValueError(f"space {space!r}: no trial results under {tdir} (and {ldir}); create them with "
                             f"`python -m search.run --space {space}` {how}")
        trials_parts += t_parts
        layers_parts += l_parts
        paths += [tdir, ldir]
    trials = _read(fs, trials_parts, TRIALS_SCHEMA, with_file=True)
    layers = _read(fs, layers_parts, LAYERS_SCHEMA, with_file=False)
    trials, layers, notes = _dedup(fs, trials, layers, trials_parts, layers_parts)
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


def _parts(fs: pafs.FileSystem, folder: str) -> list[tuple[str, float]]:
    """(path, mtime) of the visible Parquet part files of a dataset folder, oldest first."""
    info = fs.get_file_info(folder)
    if info.type != pafs.FileType.Directory:
        return []
    files = [f for f in fs.get_file_info(pafs.FileSelector(folder, recursive=False))
             if f.type == pafs.FileType.File and f.base_name.endswith(".parquet") and not f.base_name.startswith(".")]
    out = [(f.path, f.mtime.timestamp() if f.mtime is not None else 0.0) for f in files]
    return sorted(out, key=lambda x: (x[1], x[0]))


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    # Same family is castable without loss of meaning (int32 -> int64, ns -> us, large_string);
    # an all-null column (pa.null) is a column nobody filled in.
    if got == want or pa.types.is_null(got):
        return True
    for family in (pa.types.is_integer, pa.types.is_floating, pa.types.is_timestamp):
        if family(want):
            return family(got) or (pa.types.is_floating(want) and pa.types.is_integer(got))
    if pa.types.is_string(want):
        return pa.types.is_string(got) or pa.types.is_large_string(got) or pa.types.is_dictionary(got)
    return False


def _read(fs: pafs.FileSystem, parts: list[tuple[str, float]], schema: pa.Schema, *, with_file: bool) -> pa.Table:
    """Read part files as one table of `schema`, checking every file's columns and types first."""
    if not parts:
        return schema.empty_table()
    what = "trials" if schema is TRIALS_SCHEMA else "layers"
    try:
        fragments = list(ds.dataset([p for p, _ in parts], format="parquet", filesystem=fs).get_fragments())
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{what} dataset: a part file is not readable Parquet: {str(exc).splitlines()[0]}") from None
    needs_cast = False
    checked: list[pa.Schema] = []  # part files of one writer share a schema: check each distinct one once
    for frag in fragments:
        try:
            got = frag.physical_schema
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(f"{frag.path}: not readable Parquet ({str(exc).splitlines()[0]})") from None
        if any(got.equals(c) for c in checked):
            continue
        checked.append(got)
        for f in schema:
            idx = got.get_field_index(f.name)
            if idx < 0:
                raise ValueError(f"{frag.path}: column {f.name!r} is missing (not a {what} file of search.schema)")
            if not _compatible(got.field(idx).type, f.type):
                raise ValueError(f"{frag.path}: column {f.name!r} has type {got.field(idx).type}, "
                                 f"expected {f.type} ({what} schema of search.schema)")
            needs_cast |= got.field(idx).type != f.type
    columns = list(schema.names) + (["__filename"] if with_file else [])
    try:
        if needs_cast:  # per file, so each is cast from its own physical types
            tables = [frag.to_table(columns=schema.names).cast(schema) for frag in fragments]
            table = pa.concat_tables(tables).combine_chunks()
            if with_file:
                names = [frag.path for frag, t in zip(fragments, tables) for _ in range(t.num_rows)]
                table = table.append_column("__filename", pa.array(names, pa.string()))
            return table
        dataset = ds.FileSystemDataset(fragments, schema, ds.ParquetFileFormat(), filesystem=fs)
        return dataset.to_table(columns=columns).combine_chunks()  # one chunk per file would slow every kernel
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{what} dataset: reading failed: {str(exc).splitlines()[0]}") from None


def _dedup(fs: pafs.FileSystem, trials: pa.Table, layers: pa.Table, trials_parts: list[tuple[str, float]],
           layers_parts: list[tuple[str, float]]) -> tuple[pa.Table, pa.Table, list[str]]:
    """One row per run_id (the newest finished_at; ties: the newer file) and that run's layers."""
    notes: list[str] = []
    files = trials.column("__filename")
    order = {p: i for i, (p, _) in enumerate(trials_parts)}  # oldest file first
    n = trials.num_rows
    if pc.count_distinct(trials.column("run_id")).as_py() < n:
        file_rank = np.array([order[p] for p in files.to_pylist()], dtype=np.int64)
        ts = pc.fill_null(trials.column("finished_at").cast(pa.int64()), -(2**62)).to_numpy()
        runs = pc.dictionary_encode(trials.column("run_id")).combine_chunks().indices.to_numpy()
        # lexsort: last key is primary; the last row of each run after sorting is the keeper.
        srt = np.lexsort((file_rank, ts, runs))
        last = np.r_[runs[srt][1:] != runs[srt][:-1], True]
        keep = np.sort(srt[last])
        notes.append(f"{n - keep.size} duplicate trial rows dropped (kept the newest finished_at per run_id)")
        trials = trials.take(pa.array(keep))
    kept_files = {r: os.path.basename(f) for r, f in zip(trials.column("run_id").to_pylist(),
                                                          trials.column("__filename").to_pylist())}
    trials = trials.drop_columns(["__filename"])
    run_ids = trials.column("run_id")
    orphans = layers.num_rows - pc.sum(pc.is_in(layers.column("run_id"), value_set=run_ids)).as_py() \
        if layers.num_rows else 0
    if orphans:
        notes.append(f"{orphans} layer rows without a trial row dropped (a trial interrupted while writing)")
        layers = layers.filter(pc.is_in(layers.column("run_id"), value_set=run_ids))
    if layers.num_rows and pc.count_distinct(
            pc.binary_join_element_wise(layers.column("run_id"), pc.cast(layers.column("index"), pa.string()),
                                        "#")).as_py() < layers.num_rows:
        layers, dropped = _dedup_layers(fs, layers_parts, kept_files, set(run_ids.to_pylist()))
        notes.append(f"{dropped} duplicate layer rows dropped (kept the rows written with the kept trial row)")
    return trials, layers, notes


def _dedup_layers(fs: pafs.FileSystem, parts: list[tuple[str, float]], kept_files: dict[str, str],
                  run_ids: set[str]) -> tuple[pa.Table, int]:
    """Per run, keep the layer rows of one file: the one named like the kept trial's part, else the newest."""
    table = _read(fs, parts, LAYERS_SCHEMA, with_file=True)
    table = table.filter(pc.is_in(table.column("run_id"), value_set=pa.array(sorted(run_ids), pa.string())))
    rank = {p: i for i, (p, _) in enumerate(parts)}  # oldest first
    runs, fnames = table.column("run_id").to_pylist(), table.column("__filename").to_pylist()
    best: dict[str, tuple[tuple[int, int], str]] = {}
    for r, f in zip(runs, fnames):
        score = (int(os.path.basename(f) == kept_files.get(r)), rank.get(f, -1))
        if r not in best or score > best[r][0]:
            best[r] = (score, f)
    keep = np.array([best[r][1] == f for r, f in zip(runs, fnames)])
    out = table.filter(pa.array(keep)).drop_columns(["__filename"])
    return out, table.num_rows - out.num_rows


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
