"""One sweep per space at a time (`SweepLock`), and telling a full disk from other write errors.

The lock is an flock per (storage, space), plus one per (sqlite tracking store, space),
taken by the driver for the whole sweep; a killed driver releases it with its process.
"""
from __future__ import annotations

import errno
import os

__all__ = ["SweepLock", "disk_full"]


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


class SweepLock:
    """An exclusive lock per (storage, space): two drivers never write one space at once."""

    def __init__(self, storage: str, space: str, tracking_uri: str | None = None) -> None:
        self.paths = []
        if "://" not in storage or storage.startswith("file://"):
            folder = os.path.join(os.path.abspath(storage.replace("file://", "")), space)
            self.paths.append(os.path.join(folder, ".sweep.lock"))
        if tracking_uri and tracking_uri.startswith("sqlite:///"):
            # The MLflow store is shared by every --storage: lock the space there too.
            db = os.path.abspath(tracking_uri[len("sqlite:///"):])
            self.paths.append(os.path.join(os.path.dirname(db), f".{os.path.basename(db)}.{space}.lock"))
        self.path = self.paths[0] if self.paths else None
        self.fhs: list = []

    def __enter__(self) -> "SweepLock":
        import fcntl

        for path in self.paths:  # object storage / remote tracking: no flock; MLflow dedup still applies
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fh = open(path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                owner = fh.read().strip() or "unknown"
                fh.close()
                self.__exit__()
                raise OSError(f"another sweep of this space is running (lock {path}, pid {owner}); "
                              "wait for it or stop it, then use --resume") from None
            fh.truncate(0)
            fh.write(str(os.getpid()))
            fh.flush()
            self.fhs.append(fh)
        return self

    def __exit__(self, *exc: object) -> None:
        for fh in self.fhs:
            fh.close()  # closing releases the flock; a killed driver releases it too
        self.fhs = []
