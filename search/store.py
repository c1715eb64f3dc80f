"""The Parquet result datasets: `<root>/<space>/trials/` and `<root>/<space>/layers/`.

Each finished trial is written as its own part file, atomically (a temporary
name, then a rename), so a killed driver never leaves a half-written file that
a reader would see. `compact` folds the parts into one file per dataset.
Readers de-duplicate on `run_id`. `root` is a local path or a URI that
pyarrow's filesystems understand (s3://, gs://, file://).
"""
from __future__ import annotations

import os
import time
import uuid
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from search.schema import LAYERS_SCHEMA, TRIALS_SCHEMA

__all__ = ["ResultStore", "resolve_fs"]


def resolve_fs(root: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or a URI."""
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), os.path.abspath(root)


class ResultStore:
    """Reads and writes one space's `trials` and `layers` datasets."""

    def __init__(self, root: str, space: str) -> None:
        self.root, self.space = root, space
        self.fs, base = resolve_fs(root)
        self.base = f"{base.rstrip('/')}/{space}"
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, dataset: str) -> str:
        return f"{self.base}/{dataset}"

    # ----------------------------------------------------------------- write
    def write_trial(self, trial_row: dict[str, Any], layer_rows: Iterable[dict[str, Any]]) -> None:
        """Write one trial's row and its layer rows as part files (layers first, so a
        reader that sees the trial also sees its layers)."""
        # Sorted by name, one run's parts come in write order: dedup keeps the last written.
        tag = f"{trial_row['run_id']}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        layers = pa.Table.from_pylist(list(layer_rows), schema=LAYERS_SCHEMA)
        self._write_atomic(layers, self.path("layers"), f"part-{tag}.parquet")
        trials = pa.Table.from_pylist([trial_row], schema=TRIALS_SCHEMA)
        self._write_atomic(trials, self.path("trials"), f"part-{tag}.parquet")

    def _write_atomic(self, table: pa.Table, folder: str, name: str) -> None:
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
        for name in ("trials", "layers"):
            for p in self._parts(self.path(name)):
                base = p.rsplit("/", 1)[-1]
                if any(base.startswith(f"part-{r}-") for r in run_ids):
                    self.fs.delete_file(p)

    def remove_temporaries(self) -> int:
        """Delete the `.*.tmp` files a killed writer left; only while holding the sweep lock."""
        if not self.is_local:  # object stores publish whole objects: nothing half-written to remove
            return 0
        n = 0
        for name in ("trials", "layers"):
            folder = self.path(name)
            if os.path.isdir(folder):
                for f in os.listdir(folder):
                    if f.startswith(".") and f.endswith(".tmp"):
                        os.remove(os.path.join(folder, f))
                        n += 1
        return n

    def compact(self) -> None:
        """Fold all part files of each dataset into one, de-duplicated on run_id."""
        for name, schema in (("trials", TRIALS_SCHEMA), ("layers", LAYERS_SCHEMA)):
            folder = self.path(name)
            parts = self._parts(folder)
            if len(parts) <= 1:
                continue
            table = dedup(self.read(name), name)
            self._write_atomic(table, folder, f"part-compact-{uuid.uuid4().hex[:12]}.parquet")
            for p in parts:  # the new file is in place before any old one goes
                self.fs.delete_file(p)

    def replace_all(self, trials: pa.Table, layers: pa.Table) -> None:
        """Swap both datasets for the given tables (used when rebuilding from MLflow)."""
        for name, table in (("layers", layers), ("trials", trials)):
            folder = self.path(name)
            old = self._parts(folder)
            self._write_atomic(table, folder, f"part-rebuild-{uuid.uuid4().hex[:12]}.parquet")
            for p in old:
                self.fs.delete_file(p)

    # ------------------------------------------------------------------ read
    def _parts(self, folder: str) -> list[str]:
        info = self.fs.get_file_info(folder)
        if info.type != pafs.FileType.Directory:
            return []
        sel = pafs.FileSelector(folder, recursive=False)
        return sorted(f.path for f in self.fs.get_file_info(sel)
                      if f.type == pafs.FileType.File and f.base_name.endswith(".parquet")
                      and not f.base_name.startswith("."))

    def read(self, name: str) -> pa.Table:
        """The whole dataset (`trials` or `layers`); an empty table of the schema when absent."""
        schema = TRIALS_SCHEMA if name == "trials" else LAYERS_SCHEMA
        parts = self._parts(self.path(name))
        if not parts:
            return schema.empty_table()
        return ds.dataset(parts, schema=schema, format="parquet", filesystem=self.fs).to_table()

    def finished_hashes(self) -> set[str]:
        t = self.read("trials")
        return set(t.column("config_hash").to_pylist()) if t.num_rows else set()


def dedup(table: pa.Table, name: str) -> pa.Table:
    """Keep one row per run_id (trials) or per (run_id, index) (layers): the last written."""
    if table.num_rows == 0:
        return table
    keys = ["run_id"] if name == "trials" else ["run_id", "index"]
    idx = pa.array(range(table.num_rows), pa.int64())
    last = table.append_column("__i", idx).group_by(keys).aggregate([("__i", "max")])
    keep = pc.sort_indices(last.column("__i_max"))
    return table.take(pc.take(last.column("__i_max"), keep))
