"""One writer per space at a time (`SweepLock`), and telling a full disk from other write errors.

The lock is an flock per (storage, space), plus one per (tracking store, space): beside a sqlite
file, or for an http(s) tracking server in this user's lock folder keyed by the server's normalized
URI (`tracking_identity`), taken by the driver for the whole sweep; a killed driver releases it with its process. Every other writer
of a space's Parquet datasets takes the storage one too (issue 30): a rebuild from MLflow
(`rebuild_parquet`, e.g. `analysis.report --tracking-uri`) for its whole MLflow read and swap,
and `ResultStore`'s compaction, repair and removals. Lock files are named by resolved real
paths (a symlinked `--storage` or `mlflow.db` is the same lock), and the lock is re-entrant
within one process: the driver's repair rebuilds while the sweep holds it.
"""
from __future__ import annotations

import errno
import os

__all__ = ["SweepLock", "disk_full", "tracking_identity", "DEFAULT_LOCK_DIR"]

# Where the locks of a tracking server live (it has no file to lock beside): one folder per user, private
DEFAULT_LOCK_DIR = f"/tmp/dbn-locks-{os.getuid()}"
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Lock files this process holds: real path -> [open file (its flock), depth]. flock belongs to an open
# file, so a second open() of a held lock in the same process would refuse itself.
_HELD: dict[str, list] = {}
# What a holder is doing (written into the lock file after its pid), as the refusal describes it.
_DOING = {"sweep": "another sweep of this space is running",
          "rebuild": "this space's results are being rebuilt from MLflow",
          "write": "another process is writing this space's results"}


def disk_full(e: BaseException | None) -> bool:
    """True if `e` or an exception in its chain says the disk is full (OSError ENOSPC, sqlite's 'disk is full')."""
    for _ in range(20):
        if e is None:
            return False
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "database or disk is full" in str(e) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def tracking_identity(uri: str) -> str | None:
    """The server an http(s) tracking URI names, as one string: scheme and host lower-cased, the default port
    written out, a loopback name or address as `localhost`, credentials, query, fragment and trailing slashes
    dropped; so `http://LOCALHOST:80/`, `http://127.0.0.1` and `http://user@localhost/` are one store. None for
    any other URI."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        return None
    host = (parts.hostname or "").lower().rstrip(".")
    if host in ("localhost", "::1", "0.0.0.0", "::") or host.startswith("127.") or host.endswith(".localhost"):
        host = "localhost"
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:  # a port that is not a number: the URI as written is its identity
        return uri.strip()
    path = "/".join(p for p in parts.path.split("/") if p)
    return f"{scheme}://{host}:{port}/{path}"


def _private_dir(folder: str) -> str:
    """`folder`, created 0700; OSError (one line) unless it is this user's own and not writable by others:
    another user who could write there could hold (or fake) the lock of any sweep."""
    hint = "set DBN_LOCK_DIR to a folder of your own"
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if not os.path.isdir(folder) or os.path.islink(folder):
        raise OSError(f"the lock folder {folder!r} is not a directory (a symlink or a file); {hint}")
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"the lock folder {folder!r} belongs to uid {st.st_uid} with mode {st.st_mode & 0o777:o}: "
                      f"only this user (uid {os.getuid()}) may write there; {hint}")
    return folder


def lock_paths(storage: str, space: str, tracking_uri: str | None = None) -> list[str]:
    """The lock files of a space: `<storage>/<space>/.sweep.lock` (local storage); for a sqlite store,
    `<dir of mlflow.db>/.mlflow.db.<space>.lock`; both from resolved real paths. For an http(s) tracking
    server, which has no file to lock beside, `<DBN_LOCK_DIR or /tmp/dbn-locks-UID>/mlflow-<host>-<port>-<hash of
    tracking_identity>.<space>.lock`: every driver of this user on this machine that writes the space's
    experiment on that server takes the same lock, whatever --storage it writes (issue 30)."""
    paths = []
    if "://" not in storage or storage.startswith("file://"):
        folder = os.path.join(os.path.realpath(storage.replace("file://", "", 1)), space)
        paths.append(os.path.join(folder, ".sweep.lock"))
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        # The MLflow store is shared by every --storage: lock the space there too.
        db = os.path.realpath(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
        paths.append(os.path.join(os.path.dirname(db), f".{os.path.basename(db)}.{space}.lock"))
    server = tracking_identity(tracking_uri) if tracking_uri else None
    if server is not None:
        import hashlib
        import re

        folder = os.path.abspath(os.path.expanduser(os.environ.get("DBN_LOCK_DIR") or DEFAULT_LOCK_DIR))
        host_port = re.sub(r"[^A-Za-z0-9.-]+", "-", server.split("://", 1)[1].split("/", 1)[0])
        digest = hashlib.sha256(server.encode("utf-8")).hexdigest()[:12]
        # First: a driver refused by the server's lock has written nothing (not even its --storage folder)
        paths.insert(0, os.path.join(folder, f"mlflow-{host_port}-{digest}.{space}.lock"))
    return paths


class SweepLock:
    """An exclusive lock per (storage, space) (and sqlite store, space): one writer of a space at a time.

    `purpose` (sweep | rebuild | write) is recorded beside the pid, so a refusal says what holds it.
    Refused: OSError naming the lock file, the holder's pid and what it does.
    """

    def __init__(self, storage: str, space: str, tracking_uri: str | None = None, *, purpose: str = "sweep") -> None:
        self.paths = lock_paths(storage, space, tracking_uri)
        self.server = tracking_identity(tracking_uri) if tracking_uri else None
        self.path = self.paths[0] if self.paths else None
        self.purpose = purpose
        self.keys: list[str] = []

    def __enter__(self) -> "SweepLock":
        import fcntl

        for path in self.paths:  # object storage: no flock; MLflow dedup still applies
            if self.server is not None and os.path.basename(path).startswith("mlflow-"):
                try:
                    _private_dir(os.path.dirname(path))
                except OSError:
                    self.__exit__()
                    raise
            os.makedirs(os.path.dirname(path), exist_ok=True)
            key = os.path.realpath(path)
            if key in _HELD:  # this process holds it already (the driver, while its repair rebuilds)
                _HELD[key][1] += 1
                self.keys.append(key)
                continue
            fh = open(path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                owner = fh.read().split()
                fh.close()
                self.__exit__()
                raise OSError(self._refusal(path, owner[0] if owner else "unknown",
                                            owner[1] if len(owner) > 1 else "sweep")) from None
            fh.truncate(0)
            fh.write(f"{os.getpid()} {self.purpose}")
            fh.flush()
            _HELD[key] = [fh, 1]
            self.keys.append(key)
        return self

    def _refusal(self, path: str, pid: str, doing: str) -> str:
        what = _DOING.get(doing, _DOING["write"])
        if self.server is not None and os.path.basename(path).startswith("mlflow-"):
            what += f" against the tracking server {self.server}"
        if self.purpose == "sweep":
            advice = ("wait for it or stop it, then use --resume" if doing == "sweep"
                      else "wait for it, then run the sweep again (nothing was written)")
        elif self.purpose == "rebuild":
            what = what.replace("another sweep", "a sweep")
            advice = ("its results cannot be rebuilt from MLflow while it writes them; nothing was rebuilt: wait "
                      "for it to finish, then run again")
        else:
            advice = "nothing was changed: wait for it, then run again"
        return f"{what} (lock {path}, pid {pid}); {advice}"

    def __exit__(self, *exc: object) -> None:
        for key in self.keys:
            held = _HELD.get(key)
            if held is None:
                continue
            held[1] -= 1
            if held[1] <= 0:
                held[0].close()  # closing releases the flock; a killed process releases it too
                del _HELD[key]
        self.keys = []
