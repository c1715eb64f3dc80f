"""Stage a remote `data_dir` (s3://, gs://, file://, ...) onto node-local disk, once per node.

On a cluster every trial of a node reads the same dataset; copying it from
object storage per trial would multiply egress and start-up time by the
number of trials. The first trial on a node copies, the others wait on a file
lock and then reuse the copy; a completion marker lets later trials skip the
lock altogether. A plain local path is returned unchanged.

Layout under the staging root (``$DBN_STAGE_DIR``, default ``/tmp/dbn-data-<uid>``)::

    <sha>/<source fingerprint>/data/   the copy that trials read, one folder per version of the source
    <sha>/<source fingerprint>/DONE    completion marker (JSON: uri, source fingerprint, files, bytes, seconds)
    <sha>/<source fingerprint>.use     shared flock held by every process that was handed that copy
    <sha>.lock                         fcntl lock held while copying

A copy is reused only while it matches (issue 30): the source's fingerprint (every file's path, size and
mtime) names the version folder, so a changed source is a new folder, copied afresh; the copy's files and
bytes must equal the marker's, else it was cut short or partly deleted (a temp cleaner) and is copied
again. A copy is never changed in place (issue 30: a re-copy deleted the folder a trial was reading): it is
built in a temporary folder, its marker inside, and published by one atomic rename (two copiers on a shared
staging folder: the second rename fails and the first copy is used); a damaged copy is renamed aside first;
an older version is deleted only once no process holds its `.use` lock. The staging root must be this
user's own and not writable by others (anyone who can write there could plant training data for a URI),
writable, and have room for the source, or one line says which. `stage_and_check` also runs the dataset's
own file check on the staged copy, on the node that trains on it.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from typing import Any

__all__ = ["stage_data_dir", "stage_and_check", "staged_path", "check_data_uri", "check_stage_root",
           "DEFAULT_STAGE_ROOT"]

DEFAULT_STAGE_ROOT = f"/tmp/dbn-data-{os.getuid()}"  # one per user: another user's folder is refused
MIN_SPARE_BYTES = 16 * 2**20  # free space left beside a copy: the marker, the lock, other trials' temp files
# Version folders this process was handed: path -> the open file holding its shared `.use` flock
_IN_USE: dict[str, Any] = {}
# (copy, dataset) pairs whose file check passed in this process
_CHECKED: set[tuple[str, str]] = set()


def _root(root: str | None) -> str:
    return os.path.abspath(os.path.expanduser(root or os.environ.get("DBN_STAGE_DIR") or DEFAULT_STAGE_ROOT))


def _key(uri: str) -> str:
    # A trailing slash names the same folder; it must not cause a second copy.
    return hashlib.sha256(uri.rstrip("/").encode("utf-8")).hexdigest()[:16]


def staged_path(data_dir: str, *, root: str | None = None) -> str:
    """Where `stage_data_dir` puts (or has put) the copy of URI `data_dir`'s current contents on this node."""
    fs, path = _open(data_dir)
    return os.path.join(_root(root), _key(data_dir), _fingerprint(_listing(fs, path)), "data")


def stage_data_dir(data_dir: str, *, root: str | None = None) -> str:
    """A local directory with the contents of `data_dir`, copied at most once per node and version of it.

    Args:
        data_dir: a local path (returned unchanged) or a URI that
            `pyarrow.fs.FileSystem.from_uri` understands (s3://, gs://, file://, ...).
        root: the node-local staging folder (default ``$DBN_STAGE_DIR`` or ``/tmp/dbn-data-<uid>``).

    Returns:
        The local path of the staged copy (or `data_dir` itself when it is a local path). It is never changed
        or deleted while this process runs (it holds the copy's `.use` lock).

    Raises:
        FileNotFoundError: the URI does not name an existing directory.
        ValueError: pyarrow cannot open the URI (unknown scheme, bad bucket name).
        PermissionError / OSError: the staging root is another user's, writable by others, not writable,
            or has no room for the copy (one line naming it and $DBN_STAGE_DIR).
    """
    if "://" not in data_dir:
        return data_dir
    fs, path = _open(data_dir)  # a bad URI fails here, before any lock file exists
    files = _listing(fs, path)
    source = _fingerprint(files)
    stage_root = _root(root)
    base = os.path.join(stage_root, _key(data_dir))
    version = os.path.join(base, source)
    dest, marker = os.path.join(version, "data"), os.path.join(version, "DONE")
    if _hold(version, marker, dest, source):  # fast path: no copy lock once a node has this version
        _tidy(base, version)
        return dest
    check_stage_root(stage_root, sum(size for _, size, _ in files), uri=data_dir)
    _let_go(base, keep=version)  # this process moves to another version: its older one may go
    os.makedirs(base, mode=0o700, exist_ok=True)
    with open(base + ".lock", "a+") as lock:
        # Blocks while another trial on this node copies; the kernel releases the lock
        # if that process dies, and the next one starts over (see below).
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _current(marker, dest, source):
                _copy(fs, path, data_dir, base, version, source)
            _drop_older(base, keep=version)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if not _hold(version, marker, dest, source):  # deleted between the copy and here: only a temp cleaner does
        raise OSError(f"staging --data-dir {data_dir!r}: the copy at {dest} vanished right after it was made "
                      "(a temp cleaner?); set DBN_STAGE_DIR to a folder nothing else cleans")
    return dest


def stage_and_check(data_dir: str, dataset: str, *, root: str | None = None) -> str:
    """`stage_data_dir`, then the dataset's own file check (search/trial/datasets.py: every file there, its
    header read before the file) on the staged copy, on this node, once per copy and process (issue 30: the
    checks ran on the driver's copy only, so a node whose copy was bad failed in the reader, naming a temp path).

    Raises:
        ValueError: one line naming the URI, the staged copy and what is wrong; or stage_data_dir's errors.
    """
    local = stage_data_dir(data_dir, root=root)
    if local == data_dir or (local, dataset) in _CHECKED:
        return local
    from search import registry

    check = registry.get("dataset", dataset, field_name="dataset").meta.get("check")
    if check is not None:
        try:
            check(local)
        except (ValueError, OSError) as e:
            raise ValueError(f"--data-dir {data_dir!r} (staged at {local}): {str(e).splitlines()[0]}") from None
    _CHECKED.add((local, dataset))
    return local


def check_data_uri(data_dir: str, *, stage_here: bool = False, root: str | None = None) -> None:
    """Preflight for the driver: raise if URI `data_dir` is not a readable directory, and (`stage_here`: its
    trials stage on this machine, a local Ray) if this machine's staging root cannot hold it.

    Raises:
        FileNotFoundError: nothing (or a file) at the URI.
        ValueError: pyarrow cannot open the URI.
        PermissionError / OSError: the staging root is not private, not writable or too small.
    """
    fs, path = _open(data_dir)
    if stage_here:
        files = _listing(fs, path)
        version = os.path.join(_root(root), _key(data_dir), _fingerprint(files))
        if not _current(os.path.join(version, "DONE"), os.path.join(version, "data"), _fingerprint(files)):
            check_stage_root(_root(root), sum(size for _, size, _ in files), uri=data_dir, create=False)


def check_stage_root(root: str, need: int, *, uri: str, create: bool = True) -> None:
    """Raise PermissionError/OSError (one line) unless `root` is this user's own folder, not writable by
    group or others, writable, with `need` bytes free plus MIN_SPARE_BYTES. Creates it (0700) if `create`."""
    hint = "set DBN_STAGE_DIR to a folder of your own on a local disk with room for the data"
    where = f"staging --data-dir {uri!r}: the staging folder {root!r}"
    if create:
        try:
            os.makedirs(root, mode=0o700, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"{where} cannot be created ({e.strerror}); {hint}") from None
    probe = root
    while not os.path.exists(probe):  # not created yet (preflight): its nearest existing parent decides
        probe = os.path.dirname(probe)
    if probe == root:
        st = os.lstat(root)
        if not os.path.isdir(root) or os.path.islink(root):
            raise OSError(f"{where} is not a directory (a symlink or a file); {hint}")
        if st.st_uid != os.getuid():
            raise PermissionError(f"{where} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}): "
                                  f"its owner could plant training data for any URI; {hint}")
        if st.st_mode & 0o022:
            raise PermissionError(f"{where} is writable by {'group and others' if st.st_mode & 0o002 else 'its group'}"
                                  f" (mode {st.st_mode & 0o777:o}): they could plant training data; chmod 700 it "
                                  f"or {hint}")
    if not os.access(probe, os.W_OK):
        raise PermissionError(f"{where} is not writable (no write permission on {probe!r}); {hint}")
    free = shutil.disk_usage(probe).free
    if free < need + MIN_SPARE_BYTES:
        raise OSError(errno.ENOSPC, f"{where} has {free / 2**20:.0f} MiB free, the data needs "
                      f"{(need + MIN_SPARE_BYTES) / 2**20:.0f} MiB; {hint}")


def _listing(fs: Any, path: str) -> list[tuple[str, int, int]]:
    """(path relative to `path`, size, mtime in ns) of every file under `path` of `fs`, sorted."""
    import pyarrow.fs as pafs

    out = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File:
            mtime = info.mtime_ns if info.mtime_ns is not None else -1
            out.append((os.path.relpath(info.path, path), int(info.size or 0), int(mtime)))
    return sorted(out)


def _fingerprint(files: list[tuple[str, int, int]]) -> str:
    return hashlib.sha256(json.dumps(files).encode("utf-8")).hexdigest()[:16]


def _current(marker: str, dest: str, source: str) -> bool:
    """Whether the copy at `dest` is complete (its files and bytes as the marker says) and of `source`."""
    try:
        with open(marker) as fh:
            done = json.load(fh)
    except (OSError, ValueError):
        return False  # no marker (a copy cut short) or a marker cut short
    if done.get("source") != source:
        return False  # the source changed since (or a marker from before fingerprints): copy again
    return _count(dest) == (done.get("files"), done.get("bytes"))


def _count(dest: str) -> tuple[int, int]:
    files, size = 0, 0
    for folder, _, names in os.walk(dest):
        files += len(names)
        size += sum(os.path.getsize(os.path.join(folder, n)) for n in names)
    return files, size


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


def _hold(version: str, marker: str, dest: str, source: str) -> bool:
    """Take (or keep) this process's shared `.use` lock on `version` and say whether its copy is complete.
    A process moving to a newer version of a URI lets go of the older ones it held (its earlier trials are
    done: a worker runs one trial at a time), so they can be deleted."""
    if version in _IN_USE:
        if _current(marker, dest, source):
            return True
        _IN_USE.pop(version).close()
    if not os.path.isdir(version):
        return False
    try:
        fh = open(version + ".use", "a+")
    except OSError:
        return False
    fcntl.flock(fh, fcntl.LOCK_SH)  # waits while an older version is being deleted under LOCK_EX
    if not _current(marker, dest, source):
        fh.close()
        return False
    _let_go(os.path.dirname(version), keep=version)
    _IN_USE[version] = fh
    return True


def _let_go(base: str, keep: str) -> None:
    """Release this process's `.use` locks on the versions of `base` other than `keep`."""
    for other in [v for v in _IN_USE if os.path.dirname(v) == base and v != keep]:
        _IN_USE.pop(other).close()


def _tidy(base: str, keep: str) -> None:
    """`_drop_older` when `base` holds more than the version in use, if no copier holds the lock right now."""
    try:
        if not [n for n in os.listdir(base) if n != os.path.basename(keep) and not n.endswith(".use")]:
            return
        with open(base + ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                _drop_older(base, keep)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError:  # BlockingIOError: a copier works there now and tidies after itself
        return


def _drop_older(base: str, keep: str) -> None:
    """Delete the version folders of `base` other than `keep` that no process holds (their `.use` lock free),
    and the temporary and set-aside folders of copiers that died; a held one stays for a later call."""
    for name in os.listdir(base):
        path = os.path.join(base, name)
        if path == keep or name.endswith(".use") or not os.path.isdir(path):
            continue
        if name.startswith(".tmp-") or name.startswith(".old-"):
            shutil.rmtree(path, ignore_errors=True)  # only under the copy lock: no live copier is writing there
            continue
        with open(path + ".use", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a process still trains on it
            shutil.rmtree(path, ignore_errors=True)
            os.unlink(path + ".use")


def _copy(fs: Any, path: str, uri: str, base: str, version: str, source: str) -> None:
    """Copy `path` of `fs` into a private temporary folder with its marker, then publish it as `version` in one
    rename; a damaged copy already there is renamed aside first (a trial may still hold its files open)."""
    import pyarrow.fs as pafs

    tmp = os.path.join(base, f".tmp-{uuid.uuid4().hex[:8]}")
    t0 = time.time()
    # pyarrow creates the subfolders it copies, not the destination itself: files directly in the source (the
    # Debian dataset packages' layout, /usr/share/datasets/fashion-mnist) failed with FileNotFoundError.
    os.makedirs(os.path.join(tmp, "data"), mode=0o700)
    try:
        pafs.copy_files(path, os.path.join(tmp, "data"), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        files, size = _count(os.path.join(tmp, "data"))
        done = {"uri": uri, "source": source, "files": files, "bytes": size,
                "seconds": round(time.time() - t0, 3), "pid": os.getpid()}
        with open(os.path.join(tmp, "DONE"), "w") as fh:
            json.dump(done, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.exists(version):  # damaged (checked under the lock): aside, never rewritten in place
            os.replace(version, os.path.join(base, f".old-{uuid.uuid4().hex[:8]}"))
        try:
            os.rename(tmp, version)  # the copy and its marker appear together, complete
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # another copier (a node sharing this staging folder) published this version first: use theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
