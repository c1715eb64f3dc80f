"""Stage a remote `data_dir` (s3://, gs://, file://, ...) onto node-local disk, once per node.

On a cluster every trial of a node reads the same dataset; copying it from
object storage per trial would multiply egress and start-up time by the
number of trials. The first trial on a node copies, the others wait on a file
lock and then reuse the copy; a completion marker lets later trials skip the
lock altogether. A plain local path is returned unchanged.

Layout under the staging root (``$DBN_STAGE_DIR``, default ``/tmp/dbn-data``)::

    <sha>/data/      the copy that trials read
    <sha>/DONE       completion marker (JSON: uri, files, bytes, seconds)
    <sha>.lock       fcntl lock held while copying
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from typing import Any

__all__ = ["stage_data_dir", "staged_path", "check_data_uri", "DEFAULT_STAGE_ROOT"]

DEFAULT_STAGE_ROOT = "/tmp/dbn-data"


def _root(root: str | None) -> str:
    return os.path.abspath(os.path.expanduser(root or os.environ.get("DBN_STAGE_DIR") or DEFAULT_STAGE_ROOT))


def _key(uri: str) -> str:
    # A trailing slash names the same folder; it must not cause a second copy.
    return hashlib.sha256(uri.rstrip("/").encode("utf-8")).hexdigest()[:16]


def staged_path(data_dir: str, *, root: str | None = None) -> str:
    """Where `stage_data_dir` puts (or has put) the copy of URI `data_dir` on this node."""
    return os.path.join(_root(root), _key(data_dir), "data")


def stage_data_dir(data_dir: str, *, root: str | None = None) -> str:
    """A local directory with the contents of `data_dir`, copied at most once per node.

    Args:
        data_dir: a local path (returned unchanged) or a URI that
            `pyarrow.fs.FileSystem.from_uri` understands (s3://, gs://, file://, ...).
        root: the node-local staging folder (default ``$DBN_STAGE_DIR`` or ``/tmp/dbn-data``).

    Returns:
        The local path of the staged copy (or `data_dir` itself when it is a local path).

    Raises:
        FileNotFoundError: the URI does not name an existing directory.
        ValueError: pyarrow cannot open the URI (unknown scheme, bad bucket name).
    """
    if "://" not in data_dir:
        return data_dir
    base = os.path.join(_root(root), _key(data_dir))
    dest, marker = os.path.join(base, "data"), os.path.join(base, "DONE")
    if os.path.exists(marker):  # fast path: no lock once a node has its copy
        return dest
    fs, path = _open(data_dir)  # a bad URI fails here, before any lock file exists
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".lock", "a+") as lock:
        # Blocks while another trial on this node copies; the kernel releases the lock
        # if that process dies, and the next one starts over (see below).
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.exists(marker):
                return dest
            _copy(fs, path, data_dir, base, dest, marker)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return dest


def check_data_uri(data_dir: str) -> None:
    """Preflight for the driver: raise if URI `data_dir` is not a readable directory.

    Raises:
        FileNotFoundError: nothing (or a file) at the URI.
        ValueError: pyarrow cannot open the URI.
    """
    _open(data_dir)


def _open(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem and path of `uri`, checked to be a directory."""
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad URI
        raise ValueError(f"--data-dir {uri!r}: pyarrow cannot open it ({str(e).splitlines()[0]})") from None
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        what = "does not exist" if info.type == pafs.FileType.NotFound else "is not a directory"
        raise FileNotFoundError(f"--data-dir {uri!r} {what}")
    return fs, path


def _copy(fs: Any, path: str, uri: str, base: str, dest: str, marker: str) -> None:
    """Copy `path` of `fs` into a private temp folder, then rename it to `dest` and write the marker."""
    import pyarrow.fs as pafs

    # Whatever a killed copier left behind is incomplete (no marker): start over.
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    tmp = os.path.join(base, f".tmp-{uuid.uuid4().hex[:8]}")
    t0 = time.time()
    pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    os.makedirs(tmp, exist_ok=True)  # an empty source directory copies no file
    os.replace(tmp, dest)
    files, size = 0, 0
    for folder, _, names in os.walk(dest):
        files += len(names)
        size += sum(os.path.getsize(os.path.join(folder, n)) for n in names)
    done = {"uri": uri, "files": files, "bytes": size, "seconds": round(time.time() - t0, 3), "pid": os.getpid()}
    with open(marker + ".tmp", "w") as fh:
        json.dump(done, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(marker + ".tmp", marker)  # the marker appears only after the data is complete
