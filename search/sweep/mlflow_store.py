"""Whether a tracking URI names a store MLflow will open, found without opening it (issue 30).

MLflow finds a bad store only once a sweep runs: a file that is not sqlite, an sqlite file of another
program (MLflow would add its tables to it), an MLflow store of a schema this MLflow does not know (a newer
MLflow wrote it) all failed as "the sweep failed while running" (exit 3) after the lock, logs and results/
were written. These checks read the file's header and its schema revision with the standard library, so a
bad store is one line and exit 2 with nothing written; a reading command (analysis.report) also refuses a
store that does not exist instead of creating an empty one.
"""
from __future__ import annotations

import difflib
import os
import re
import sqlite3
from urllib.parse import quote

__all__ = ["ALLOWED", "check_uri_form", "check_sqlite_store", "mlflow_revisions"]

ALLOWED = "sqlite:///PATH, http(s)://HOST:PORT"
_SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every sqlite database file
_SCHEMES = ("sqlite", "http", "https")


def check_uri_form(uri: str, flag: str = "--tracking-uri") -> None:
    """Raise ValueError naming `flag` unless `uri` is spelled as `sqlite:///PATH` or `http(s)://...`.

    A scheme typed almost right (`sqllite:///x`, `sqlite:/x`, `sqlite://x`, `htp://h:5000`) is named as a
    misspelling with the URI it was probably meant to be, not as a store kind MLflow does not support."""
    if uri.startswith("sqlite:///"):
        bad = sorted({c for c in uri[len("sqlite:///"):] if c in "?#%"})
        if bad:  # a database URL reads them as a query, a fragment, an escape: MLflow opened another file (exit 3)
            raise ValueError(f"{flag} {uri!r}: the path holds {', '.join(map(repr, bad))}, which a database URL "
                             "reads as a query, a fragment or an escape (MLflow would open another file); rename "
                             "or move the store (allowed: sqlite:///PATH with no ?, # or % in PATH)")
        return
    if uri.startswith(("http://", "https://")):
        return
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):/*(.*)$", uri, re.S)
    if m is None:
        return  # a bare path: preflight names it as a file store
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "file" or (len(scheme) == 1 and os.name == "nt"):
        return
    close = difflib.get_close_matches(scheme, _SCHEMES, n=1, cutoff=0.6)
    if not close:
        raise ValueError(f"{flag} {uri!r}: unsupported scheme (allowed: {ALLOWED})")
    guess = f"sqlite:///{rest}" if close[0] == "sqlite" else f"{close[0]}://{rest}"
    raise ValueError(f"{flag} {uri!r} is not a well-formed tracking URI; did you mean {guess!r}? (allowed: {ALLOWED})")


def mlflow_revisions() -> tuple[frozenset[str], str | None, str]:
    """(every schema revision the installed MLflow knows, its head revision, MLflow's version), read from
    MLflow's migration scripts without importing MLflow; (empty, None, "") when MLflow is not installed."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("mlflow")
    if spec is None or not spec.submodule_search_locations:
        return frozenset(), None, ""
    folder = os.path.join(list(spec.submodule_search_locations)[0], "store", "db_migrations", "versions")
    revisions, downs = set(), set()
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if not name.endswith(".py"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as fh:
            text = fh.read()
        rev = re.search(r"^revision\s*=\s*['\"](\w+)['\"]", text, re.M)
        down = re.search(r"^down_revision\s*=\s*(.*)$", text, re.M)
        if rev:
            revisions.add(rev.group(1))
        if down:
            downs.update(re.findall(r"['\"](\w+)['\"]", down.group(1)))
    heads = revisions - downs
    try:
        version = importlib.metadata.version("mlflow")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return frozenset(revisions), (next(iter(heads)) if len(heads) == 1 else None), version


def check_sqlite_store(uri: str, db: str, *, reading: bool = False, flag: str = "--tracking-uri") -> None:
    """Raise OSError/ValueError naming `flag`, `uri` and what is allowed unless MLflow will open the sqlite file
    `db` as its store: a new path (not when `reading`), an empty file (not when `reading`), or an MLflow store
    of a schema revision the installed MLflow knows. Reads the file only (its header, its table names and
    schema revision, through a read-only connection)."""
    allowed = "allowed: a new path or an MLflow sqlite file" if not reading else (
        "allowed: the --tracking-uri the sweep wrote to, an existing MLflow sqlite file or http(s)://HOST:PORT")
    if not os.path.exists(db):
        if reading:
            raise FileNotFoundError(f"{flag} {uri!r}: no MLflow store at {os.path.abspath(db)!r} (nothing is "
                                    f"created when reading; {allowed})")
        return
    with open(db, "rb") as fh:
        head = fh.read(len(_SQLITE_MAGIC))
    if not head:  # sqlite treats an empty file as an empty database: MLflow creates its tables in it
        if reading:
            raise ValueError(f"{flag} {uri!r}: {db!r} is an empty file, not an MLflow store ({allowed})")
        return
    if head != _SQLITE_MAGIC:
        raise ValueError(f"{flag} {uri!r}: {db!r} is not an sqlite database (it does not start with 'SQLite "
                         f"format 3'); {allowed}")
    try:
        con = sqlite3.connect(f"file:{quote(os.path.abspath(db))}?mode=ro", uri=True, timeout=30)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            rows = con.execute("SELECT version_num FROM alembic_version").fetchall() if (
                "alembic_version" in tables) else []
        finally:
            con.close()
    except sqlite3.Error as e:
        raise ValueError(f"{flag} {uri!r}: {db!r} is not a readable sqlite database ({e}); {allowed}") from None
    if not tables:
        if reading:
            raise ValueError(f"{flag} {uri!r}: {db!r} holds no MLflow store (no tables) ({allowed})")
        return
    if "experiments" in tables and not rows or any(t.startswith("_alembic_tmp_") for t in tables):
        raise ValueError(f"{flag} {uri!r}: {db!r} is an MLflow store cut short while being created (no schema "
                         "revision, or a migration's temporary table); if it holds no runs, delete it and run "
                         f"again ({allowed})")
    if "experiments" not in tables or not rows:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise ValueError(f"{flag} {uri!r}: {db!r} is an sqlite database but not an MLflow store (its tables: "
                         f"{shown}); MLflow would add its own tables to it: give another path ({allowed})")
    _check_revision(uri, db, str(rows[0][0]), flag)


def _check_revision(uri: str, db: str, rev: str, flag: str) -> None:
    known, head, version = mlflow_revisions()
    if not known or rev == head:
        return
    if rev not in known:
        raise ValueError(f"{flag} {uri!r}: {db!r} is an MLflow store of schema revision {rev!r}, which the "
                         f"installed MLflow {version} does not know (a newer MLflow wrote it?); open it with that "
                         "MLflow version, or give another store (allowed: an MLflow sqlite file of this MLflow's "
                         "schema or older)")
    # An older revision: MLflow migrates a store that lacks some of its tables, and refuses one that has them all
    # ("out-of-date database schema"). Ask MLflow which (its private helper; if it moved, let MLflow decide).
    try:
        import sqlalchemy

        from mlflow.store.db.utils import _all_tables_exist

        engine = sqlalchemy.create_engine(f"sqlite:///{os.path.abspath(db)}")
        try:
            migrates = not _all_tables_exist(engine)
        finally:
            engine.dispose()
    except Exception:  # noqa: BLE001 - MLflow's internals changed: it opens the store and says what it thinks
        return
    if not migrates:
        raise ValueError(f"{flag} {uri!r}: {db!r} is an MLflow store of an older schema (revision {rev!r}; MLflow "
                         f"{version} expects {head!r}); back it up, then run `mlflow db upgrade {uri}` "
                         "(allowed: an MLflow sqlite file of this MLflow's schema)")
