"""The Parquet result datasets: `<root>/<space>/trials/` and `<root>/<space>/layers/`.

The one implementation of listing, reading, checking and de-duplicating them, shared by
the sweep (which writes them) and analysis (which reads them).

Each finished trial is written as its own part file, atomically (a temporary name,
then a rename), so a killed driver never leaves a half-written file that a reader
would see. `compact` folds the parts into one file per dataset. `root` is a local path
or a URI that pyarrow's filesystems understand (s3://, gs://, file://).

De-duplication, one rule everywhere (`dedup`): one trial row per run_id (the newest
finished_at; ties: the newer file), then one per (config_hash, seed), the newest, so a
configuration trained twice (--force, a deleted mlflow.db) is never counted as two
replicates; layer rows follow the kept trial rows.
"""
from __future__ import annotations

import contextlib
import os
import time
import uuid
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from search.schema import TRIALS_SCHEMA, layers_schema, optional_columns, with_writer

__all__ = ["ResultStore", "resolve_fs", "list_parts", "read_parts", "dedup", "read_space"]

Part = tuple[str, float]  # (path, mtime)
# Times a reader lists a dataset again when files it listed vanished before it read them: a compaction or a
# rebuild (each under the space's lock) publishes its new file before it deletes the ones it replaces.
_RELISTS = 5
def resolve_fs(root: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or a URI."""
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), os.path.abspath(root)


def list_parts(fs: pafs.FileSystem, folder: str) -> list[Part]:
    """(path, mtime) of the visible Parquet part files of a dataset folder, oldest first (ties: by name)."""
    info = fs.get_file_info(folder)
    if info.type != pafs.FileType.Directory:
        return []
    for attempt in range(_RELISTS + 1):
        try:  # a file deleted between the folder's listing and its stat (a compaction) is listed again
            entries = fs.get_file_info(pafs.FileSelector(folder, recursive=False, allow_not_found=True))
            break
        except FileNotFoundError:
            if attempt == _RELISTS:
                raise
    files = [f for f in entries
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


def _name(schema: pa.Schema) -> str:
    return "trials" if schema.equals(TRIALS_SCHEMA) else "layers"


def read_parts(fs: pafs.FileSystem, parts: list[Part], schema: pa.Schema, *, with_file: bool = False) -> pa.Table:
    """Read part files as one table of `schema`, checking every file's columns and types first.

    A column listed in search.schema's `optional_columns` that a file lacks (written
    before the column existed) is read as nulls. A listed file that is gone when it is read
    was compacted or rebuilt away meanwhile (its rows are in the file that replaced it): the
    folders are listed again and read again, and `parts` (a list) is updated in place so the
    caller's de-duplication ranks the files actually read. Only a file that exists and is not
    readable Parquet is called damaged.

    Raises:
        ValueError: a file that is not readable Parquet, lacks a required column or has a
            column of an incompatible type (names the file and the column).
    """
    current = list(parts)
    for attempt in range(_RELISTS + 1):
        try:
            table = _read_parts(fs, current, schema, with_file=with_file)
        except ValueError:
            if not any(fs.get_file_info(p).type == pafs.FileType.NotFound for p, _ in current):
                raise  # every listed file is there: the error is the file's own
            if attempt == _RELISTS:
                raise ValueError(f"{_name(schema)} dataset: part files kept vanishing while being read ({_RELISTS + 1}"
                                 " listings): another process is compacting or rebuilding it; read again") from None
            folders = dict.fromkeys(p.rsplit("/", 1)[0] for p, _ in current)
            current = [part for folder in folders for part in list_parts(fs, folder)]
            continue
        if isinstance(parts, list) and current != parts:
            parts[:] = current
        return table
    raise AssertionError("unreachable")


def _read_parts(fs: pafs.FileSystem, parts: list[Part], schema: pa.Schema, *, with_file: bool) -> pa.Table:
    if not parts:
        table = schema.empty_table()
        return table.append_column("__filename", pa.array([], pa.string())) if with_file else table
    what = _name(schema)
    optional = set(optional_columns(what))  # registered per-layer metrics included
    try:
        fragments = list(ds.dataset([p for p, _ in parts], format="parquet", filesystem=fs).get_fragments())
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{what} dataset: a part file is not readable Parquet: {str(exc).splitlines()[0]}; the "
                         "space's next search.run sets it aside and rebuilds the datasets from MLflow") from None
    uniform = True
    checked: list[pa.Schema] = []  # part files of one writer share a schema: check each distinct one once
    for frag in fragments:
        try:
            got = frag.physical_schema
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(f"{frag.path}: not readable Parquet ({str(exc).splitlines()[0]}); the space's next "
                             "search.run sets it aside and rebuilds the datasets from MLflow") from None
        if any(got.equals(c) for c in checked):
            continue
        checked.append(got)
        for f in schema:
            idx = got.get_field_index(f.name)
            if idx < 0:
                if f.name in optional:
                    uniform = False
                    continue
                raise ValueError(f"{frag.path}: column {f.name!r} is missing (not a {what} file of search.schema)")
            if not _compatible(got.field(idx).type, f.type):
                raise ValueError(f"{frag.path}: column {f.name!r} has type {got.field(idx).type}, "
                                 f"expected {f.type} ({what} schema of search.schema)")
            uniform &= got.field(idx).type == f.type
    try:
        if not uniform:  # per file, each cast from its own physical types, missing optional columns as nulls
            tables = [_conform(frag.to_table(columns=[n for n in schema.names if n in frag.physical_schema.names]),
                               schema) for frag in fragments]
            table = pa.concat_tables(tables).combine_chunks()
            if with_file:
                names = [frag.path for frag, t in zip(fragments, tables) for _ in range(t.num_rows)]
                table = table.append_column("__filename", pa.array(names, pa.string()))
            return table
        columns = list(schema.names) + (["__filename"] if with_file else [])
        dataset = ds.FileSystemDataset(fragments, schema, ds.ParquetFileFormat(), filesystem=fs)
        return dataset.to_table(columns=columns).combine_chunks()  # one chunk per file would slow every kernel
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{what} dataset: reading failed: {str(exc).splitlines()[0]}") from None


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    cols = [table.column(f.name).cast(f.type) if f.name in table.schema.names
            else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def dedup(trials: pa.Table, layers: pa.Table, trials_parts: list[Part], layers_parts: list[Part],
          fs: pafs.FileSystem | None = None, *, replicates: bool = True) -> tuple[pa.Table, pa.Table, list[str]]:
    """The one de-duplication rule (module docstring). `trials` must carry `__filename` (read_parts with_file).

    Args:
        replicates: also keep one run per (config_hash, seed) (readers); compaction passes
            False, so it removes only copies of one run and every run MLflow holds stays on disk.

    Returns:
        (trials without `__filename`, their layer rows, notes on what was dropped).
    """
    notes: list[str] = []
    order = {p: i for i, (p, _) in enumerate(trials_parts)}  # oldest file first
    rules = [(("run_id",), "the newest finished_at per run_id")]
    if replicates:
        rules.append((("config_hash", "seed"), "the newest run per configuration and seed: a configuration trained"
                                               " twice is one replicate, not two"))
    for keys, why in rules:
        n = trials.num_rows
        if n == 0:
            break
        group = _codes(trials, keys)
        if np.unique(group).size == n:
            continue
        file_rank = np.array([order.get(p, -1) for p in trials.column("__filename").to_pylist()], dtype=np.int64)
        ts = pc.fill_null(trials.column("finished_at").cast(pa.int64()), -(2**62)).to_numpy()
        srt = np.lexsort((file_rank, ts, group))  # last key is primary; the last row of each group is kept
        last = np.r_[group[srt][1:] != group[srt][:-1], True]
        keep = np.sort(srt[last])
        notes.append(f"{n - keep.size} duplicate trial rows dropped (kept {why})")
        trials = trials.take(pa.array(keep))
    kept_files = dict(zip(trials.column("run_id").to_pylist(),
                          (os.path.basename(f) for f in trials.column("__filename").to_pylist())))
    trials = trials.drop_columns(["__filename"])
    run_ids = trials.column("run_id")
    if layers.num_rows:
        inside = pc.is_in(layers.column("run_id"), value_set=run_ids)
        dropped = layers.num_rows - pc.sum(inside).as_py()
        if dropped:
            notes.append(f"{dropped} layer rows of no kept trial dropped (a duplicate, or a trial interrupted "
                         "while writing)")
            layers = layers.filter(inside)
    if layers.num_rows and np.unique(_codes(layers, ("run_id", "index"))).size < layers.num_rows:
        layers, n = _dedup_layers(fs or pafs.LocalFileSystem(), layers_parts, kept_files, set(run_ids.to_pylist()))
        notes.append(f"{n} duplicate layer rows dropped (kept the rows written with the kept trial row)")
    if "__filename" in layers.schema.names:
        layers = layers.drop_columns(["__filename"])
    return trials, layers, notes


def _codes(table: pa.Table, keys: tuple[str, ...]) -> np.ndarray:
    parts = [pc.fill_null(pc.cast(table.column(k), pa.string()), "\x00") for k in keys]
    key = parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, "\x1f")
    return pc.dictionary_encode(pa.chunked_array(key).combine_chunks()).indices.to_numpy().astype(np.int64)


def _dedup_layers(fs: pafs.FileSystem, parts: list[Part], kept_files: dict[str, str],
                  run_ids: set[str]) -> tuple[pa.Table, int]:
    """Per run, keep the layer rows of one file: the one named like the kept trial's part, else the newest."""
    table = read_parts(fs, parts, layers_schema(), with_file=True)
    table = table.filter(pc.is_in(table.column("run_id"), value_set=pa.array(sorted(run_ids), pa.string())))
    rank = {p: i for i, (p, _) in enumerate(parts)}  # oldest first
    runs, fnames = table.column("run_id").to_pylist(), table.column("__filename").to_pylist()
    best: dict[str, tuple[tuple[int, int], str]] = {}
    for r, f in zip(runs, fnames):
        score = (int(os.path.basename(f) == kept_files.get(r)), rank.get(f, -1))
        if r not in best or score > best[r][0]:
            best[r] = (score, f)
    keep = np.array([best[r][1] == f for r, f in zip(runs, fnames)], dtype=bool)
    out = table.filter(pa.array(keep)).drop_columns(["__filename"])
    return out, table.num_rows - out.num_rows


def read_space(root: str, space: str) -> tuple[pa.Table, pa.Table, list[str], list[str]]:
    """One space's de-duplicated (trials, layers), the notes of what was dropped, and the folders read."""
    fs, base = resolve_fs(root)
    tdir, ldir = f"{base.rstrip('/')}/{space}/trials", f"{base.rstrip('/')}/{space}/layers"
    t_parts, l_parts = list_parts(fs, tdir), list_parts(fs, ldir)
    trials = read_parts(fs, t_parts, TRIALS_SCHEMA, with_file=True)
    layers = read_parts(fs, l_parts, layers_schema())
    trials, layers, notes = dedup(trials, layers, t_parts, l_parts, fs)
    return trials, layers, notes, [tdir, ldir]


class ResultStore:
    """Writes one space's `trials` and `layers` datasets (and reads them back de-duplicated)."""

    def __init__(self, root: str, space: str) -> None:
        self.root, self.space = root, space
        self.fs, base = resolve_fs(root)
        self.base = f"{base.rstrip('/')}/{space}"
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, dataset: str) -> str:
        return f"{self.base}/{dataset}"

    def lock(self, purpose: str = "write") -> Any:
        """The space's writer lock (search/lock.py), which every writer of these datasets holds: the
        sweep for its whole run, a rebuild from MLflow, and each method below that changes files. Re-entrant
        in one process (the driver holds it already); another holder gets OSError naming it. No lock on
        object stores."""
        from search.lock import SweepLock  # os and fcntl only

        return SweepLock(self.root, self.space, purpose=purpose)

    # ----------------------------------------------------------------- write
    def write_trial(self, trial_row: dict[str, Any], layer_rows: Iterable[dict[str, Any]]) -> None:
        """Write one trial's row and its layer rows as part files (layers first, so a
        reader that sees the trial also sees its layers)."""
        tag = f"{trial_row['run_id']}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        layers = pa.Table.from_pylist(list(layer_rows), schema=layers_schema())
        trials = pa.Table.from_pylist([trial_row], schema=TRIALS_SCHEMA)
        with self.lock():
            self._write_atomic(layers, self.path("layers"), f"part-{tag}.parquet")
            self._write_atomic(trials, self.path("trials"), f"part-{tag}.parquet")

    def _write_atomic(self, table: pa.Table, folder: str, name: str) -> None:
        table = with_writer(table)  # the file records which code wrote it (search.schema)
        self.fs.create_dir(folder, recursive=True)
        final = f"{folder}/{name}"
        if not self.is_local:  # object stores publish a whole object at once
            pq.write_table(table, final, filesystem=self.fs)
            return
        tmp = f"{folder}/.{name}.tmp"
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)

    def drop_runs(self, run_ids: set[str]) -> None:
        """Delete the part files of the given runs (each trial's parts are named after its run)."""
        if not run_ids:
            return
        with self.lock():
            for name in ("trials", "layers"):
                for p, _ in list_parts(self.fs, self.path(name)):
                    base = p.rsplit("/", 1)[-1]
                    if any(base.startswith(f"part-{r}-") for r in run_ids):
                        self.fs.delete_file(p)

    def remove_temporaries(self) -> int:
        """Delete the `.*.tmp` files a killed writer left; only while holding the sweep lock."""
        if not self.is_local:  # object stores publish whole objects: nothing half-written to remove
            return 0
        n = 0
        folders = [f for f in (self.path("trials"), self.path("layers")) if os.path.isdir(f)]
        if not folders:
            return 0
        with self.lock():  # a live writer's .tmp file is never taken for a dead one's
            for folder in folders:
                for f in os.listdir(folder):
                    if f.startswith(".") and f.endswith(".tmp"):
                        os.remove(os.path.join(folder, f))
                        n += 1
        return n

    def set_aside_damaged(self) -> list[tuple[str, str]]:
        """Move part files that are not readable Parquet (e.g. truncated) to `<space>/damaged/`.

        Only their footers are read. Returns (old path, new path) per file moved; the caller rebuilds
        the datasets from MLflow, which holds every finished trial. Only while holding the sweep lock.
        """
        moved: list[tuple[str, str]] = []
        parts = {name: list_parts(self.fs, self.path(name)) for name in ("trials", "layers")}
        if not any(parts.values()):
            return moved
        with self.lock():
            for name in ("trials", "layers"):
                for p, _ in list_parts(self.fs, self.path(name)):
                    try:
                        with self.fs.open_input_file(p) as fh:
                            pq.read_metadata(fh)
                    except FileNotFoundError:  # gone, not damaged
                        continue
                    except (OSError, pa.ArrowException):
                        self.fs.create_dir(f"{self.base}/damaged", recursive=True)
                        dest = f"{self.base}/damaged/{name}-{p.rsplit('/', 1)[-1]}"
                        self.fs.move(p, dest)
                        moved.append((p, dest))
        return moved

    def compact(self) -> None:
        """Fold all part files of each dataset into one, de-duplicated by `dedup`."""
        t_parts, l_parts = list_parts(self.fs, self.path("trials")), list_parts(self.fs, self.path("layers"))
        if len(t_parts) <= 1 and len(l_parts) <= 1:
            return
        with self.lock():  # the files deleted below are the ones read: no other writer adds one meanwhile
            t_parts, l_parts = list_parts(self.fs, self.path("trials")), list_parts(self.fs, self.path("layers"))
            trials = read_parts(self.fs, t_parts, TRIALS_SCHEMA, with_file=True)
            layers = read_parts(self.fs, l_parts, layers_schema())
            trials, layers, _ = dedup(trials, layers, t_parts, l_parts, self.fs, replicates=False)
            for name, table, parts in (("layers", layers, l_parts), ("trials", trials, t_parts)):
                self._write_atomic(table, self.path(name), f"part-compact-{uuid.uuid4().hex[:12]}.parquet")
                for p, _ in parts:  # the new file is in place before any old one goes
                    self.fs.delete_file(p)

    def replace_all(self, trials: pa.Table, layers: pa.Table) -> None:
        """Swap both datasets for the given tables (used when rebuilding from MLflow).

        Under the space's lock; `rebuild_parquet` holds it from before its MLflow read, so no part file
        written after that read is deleted here.
        """
        with self.replacing() as new:
            new.add_layers(layers)
            new.finish(trials)

    def replacing(self, rows_per_file: int = 100_000) -> "Replacement":
        """Swap both datasets for new ones written piecewise: layer rows as they come (`add_layers`, a part
        file per `rows_per_file` rows, so a rebuild of 10,000 trials never holds all their layers), then the
        trials (`finish`). The old part files go only after every new one is in place; a replacement that
        is not finished (an error) deletes its own new files and leaves the old datasets as they were."""
        return Replacement(self, rows_per_file)

    # ------------------------------------------------------------------ read
    def read(self, name: str) -> pa.Table:
        """The raw dataset (`trials` or `layers`), every part file, no de-duplication."""
        schema = TRIALS_SCHEMA if name == "trials" else layers_schema()
        return read_parts(self.fs, list_parts(self.fs, self.path(name)), schema)

    def read_deduped(self, *, replicates: bool = True) -> tuple[pa.Table, pa.Table, list[str]]:
        """(trials, layers, notes) de-duplicated by the one rule (`dedup`)."""
        t_parts, l_parts = list_parts(self.fs, self.path("trials")), list_parts(self.fs, self.path("layers"))
        trials = read_parts(self.fs, t_parts, TRIALS_SCHEMA, with_file=True)
        layers = read_parts(self.fs, l_parts, layers_schema())
        return dedup(trials, layers, t_parts, l_parts, self.fs, replicates=replicates)


class Replacement:
    """New datasets written beside the old ones, then swapped in (`ResultStore.replacing`)."""

    def __init__(self, store: ResultStore, rows_per_file: int) -> None:
        self.store, self.rows_per_file = store, rows_per_file
        self.pending: list[pa.Table] = []
        self.rows, self.written, self.done = 0, [], False
        self.tag = uuid.uuid4().hex[:12]

    def __enter__(self) -> "Replacement":
        self.lock = self.store.lock("rebuild")
        self.lock.__enter__()
        self.old = {name: list_parts(self.store.fs, self.store.path(name)) for name in ("layers", "trials")}
        return self

    def add_layers(self, table: pa.Table) -> None:
        """Queue layer rows; a part file is written once `rows_per_file` are queued."""
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= self.rows_per_file:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        name = f"part-rebuild-{self.tag}-{len(self.written):05d}.parquet"
        self.store._write_atomic(pa.concat_tables(self.pending), self.store.path("layers"), name)
        self.written.append(f"{self.store.path('layers')}/{name}")
        self.pending, self.rows = [], 0

    def finish(self, trials: pa.Table) -> None:
        """Write the trials, then delete every part file the datasets had before."""
        self._flush()
        if not self.written:  # no layer rows at all: an empty layers dataset, still replacing the old one
            self.pending = [layers_schema().empty_table()]
            self._flush()
        self.store._write_atomic(trials, self.store.path("trials"), f"part-rebuild-{self.tag}.parquet")
        self.done = True
        for name in ("layers", "trials"):
            for p, _ in self.old[name]:
                self.store.fs.delete_file(p)

    def __exit__(self, kind: Any, *exc: Any) -> None:
        try:
            if not self.done:  # failed midway: the old datasets stay whole, the new pieces go
                for p in self.written:
                    with contextlib.suppress(FileNotFoundError, OSError):
                        self.store.fs.delete_file(p)
        finally:
            self.lock.__exit__(kind, *exc)
