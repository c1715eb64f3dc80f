"""Checks that run before any trial: storage writable, tracking store reachable, one sweep per space.

They fail in seconds with one line, instead of after hours of training.
"""
from __future__ import annotations

import errno
import os
import shutil
import urllib.error
import urllib.request

__all__ = ["check_storage", "check_tracking", "SweepLock"]

MIN_FREE_BYTES = 200 * 2**20  # below this a sweep cannot even write its first results


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_storage(storage: str) -> None:
    """Raise OSError naming --storage if it is not writable or its disk is (nearly) full."""
    if "://" in storage and not storage.startswith("file://"):
        import pyarrow.fs as pafs

        try:
            fs, path = pafs.FileSystem.from_uri(storage)
            fs.get_file_info(path)
        except Exception as e:  # noqa: BLE001 - any failure here is the user's URI
            raise OSError(f"--storage {storage!r} is not reachable: {str(e).splitlines()[0]}") from None
        return
    path = _existing_parent(storage.replace("file://", ""))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(f"--storage {storage!r}: {path!r} is a file, not a directory")
    if not os.access(path, os.W_OK):
        raise PermissionError(f"--storage {storage!r} is not writable (no write permission on {path!r})")
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise OSError(errno.ENOSPC, f"--storage {storage!r}: only {free / 2**20:.0f} MiB free on its disk "
                      f"(need at least {MIN_FREE_BYTES / 2**20:.0f} MiB)")


def check_tracking(uri: str) -> None:
    """Raise ConnectionError/OSError naming --tracking-uri if the store cannot be used."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        check_storage(os.path.dirname(os.path.abspath(db)) or ".")
        if os.path.exists(db) and not os.access(db, os.W_OK):
            raise PermissionError(f"--tracking-uri {uri!r}: {db!r} is not writable")
        return
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except (urllib.error.URLError, OSError) as e:
            raise ConnectionError(f"--tracking-uri {uri!r} is not reachable ({getattr(e, 'reason', e)}); "
                                  "start the server or check the address") from None
        return
    if uri.startswith("file:") or "://" not in uri:
        check_storage(uri.replace("file://", ""))
        return
    raise ValueError(f"--tracking-uri {uri!r}: unsupported scheme (allowed: sqlite:///PATH, http(s)://HOST:PORT, "
                     "file:PATH)")


class SweepLock:
    """An exclusive lock per (storage, space): two drivers never write one space at once."""

    def __init__(self, storage: str, space: str) -> None:
        self.path = None
        if "://" not in storage or storage.startswith("file://"):
            folder = os.path.join(os.path.abspath(storage.replace("file://", "")), space)
            self.path = os.path.join(folder, ".sweep.lock")
        self.fh = None

    def __enter__(self) -> "SweepLock":
        if self.path is None:  # object storage: no flock; MLflow dedup still applies
            return self
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            owner = self.fh.read().strip() or "unknown"
            self.fh.close()
            raise OSError(f"another sweep of this space is running (lock {self.path}, pid {owner}); "
                          "wait for it or stop it, then use --resume") from None
        self.fh.truncate(0)
        self.fh.write(str(os.getpid()))
        self.fh.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            self.fh.close()  # closing releases the flock; a killed driver releases it too
