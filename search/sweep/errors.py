"""What can end a sweep besides success, each with its own exit code (search.sweep.cli).

`Refused` is bad input found before anything ran (exit 2); `Interrupted` is SIGINT/SIGTERM
(exit 130/143); anything else raised during the sweep is a failure (exit 3) whose traceback
`write_crash_log` keeps in a file, so the one line on stderr can name it.
"""
from __future__ import annotations

import os
import tempfile
import time
import traceback

__all__ = ["Refused", "ResourceWait", "Interrupted", "SweepFailed", "write_crash_log"]


class Refused(ValueError):
    """A request refused before any trial ran (e.g. another sweep holds the lock): exit 2."""


class ResourceWait(Refused):
    """`--resource-wait` passed on a cluster and no trial could start (no node ever fit one): exit 2."""


class Interrupted(Exception):
    """The sweep stopped on a signal; running trials were closed as KILLED."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.name, self.detail = name, detail


class SweepFailed(RuntimeError):
    """Recording results failed during the sweep (a write error other than bad input)."""


def write_crash_log(storage: str, space: str, exc: BaseException) -> str:
    """Write `exc`'s full traceback to `<storage>/<space>/logs/` (or the temp dir) and return the path.

    The log goes beside the results when --storage is local; on a full or unwritable disk,
    or an object store, into the system temp directory; "(not written: ...)" if neither works.
    """
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    name = f"search-run-{space}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    folders = []
    if "://" not in storage or storage.startswith("file://"):
        folders.append(os.path.join(os.path.abspath(storage.replace("file://", "")), space, "logs"))
    folders.append(tempfile.gettempdir())
    last: OSError | None = None
    for folder in folders:
        path = os.path.join(folder, name)
        try:
            os.makedirs(folder, exist_ok=True)
            with open(path, "w") as fh:
                fh.write(text)
            return path
        except OSError as e:
            last = e
    return f"(not written: {last})"
