"""Files a user names as outputs are written safely (issue 30).

Outputs are written beside their target and renamed over it, so a half-written file is never seen. A
rename replaces whatever the path names: `search.trial --json /dev/full`, run as root, replaced the
device node with a JSON file. So an output path must be new or a regular file; anything else (a device,
a FIFO, a socket, a directory) is refused before anything is written, with one line naming the flag. A
symlink to a regular file is written through (its target is replaced, the link stays), on purpose.

Used by `search.trial --json`, `analysis.report --out` and the sqlite store of `--tracking-uri`.
"""
from __future__ import annotations

import os
import stat

__all__ = ["not_regular", "check_output_file", "check_output_dir", "write_text_atomic"]

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))


def not_regular(path: str) -> str | None:
    """What `path` is (through symlinks) when it exists and is not a regular file, e.g. 'a character
    device'; None for a regular file or a new path (a dangling symlink is a new path at its target)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def check_output_file(path: str, flag: str) -> str:
    """Refuse (OSError naming `flag`) an output path that exists and is not a regular file, or whose folder
    does not exist; returns the real path to write (a symlink is written through)."""
    kind = not_regular(path)
    if kind is not None:
        raise OSError(f"{flag} {path!r} is {kind}, not a regular file: writing would replace it (allowed: a new "
                      "path or a regular file)")
    real = os.path.realpath(path)
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag} {path!r}: folder {folder!r} does not exist (create it first)")
    return real


def check_output_dir(folder: str, flag: str, files: tuple[str, ...] = (),
                     suffixes_in: dict[str, tuple[str, ...]] | None = None) -> None:
    """Refuse (OSError naming `flag`) an output folder that exists and is not a directory, or in which one of
    `files`, or an entry of a subfolder of `suffixes_in` ending in one of its suffixes, exists and is not a
    regular file: checked before anything is written."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OSError(f"{flag} {folder!r} is {not_regular(folder) or 'a regular file'}, not a folder (allowed: a "
                      "folder or a new path)")
    paths = [os.path.join(folder, f) for f in files]
    for sub, suffixes in (suffixes_in or {}).items():
        d = os.path.join(folder, sub)
        if os.path.isdir(d):
            paths += [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(suffixes)]
        elif os.path.lexists(d):
            paths.append(d)
    for p in paths:
        kind = not_regular(p)
        if kind is not None:
            raise OSError(f"{flag} {folder!r}: {p!r} is {kind}, not a regular file: writing would replace it "
                          "(allowed: a new path or a regular file there)")


def write_text_atomic(path: str, text: str, flag: str) -> None:
    """Write `text` to `path` through a temporary file of this writer's own beside it, then rename; checked
    again just before the rename (a device could have appeared since the command started)."""
    import tempfile

    real = check_output_file(path, flag)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(real), prefix=f".{os.path.basename(real)}.", suffix=".tmp")
    try:
        mask = os.umask(0)
        os.umask(mask)
        try:
            mode = stat.S_IMODE(os.stat(real).st_mode)  # a file replaced keeps its permissions
        except FileNotFoundError:
            mode = 0o666 & ~mask  # a new one gets what open() would give it (mkstemp makes it 0600)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        check_output_file(path, flag)
        os.replace(tmp, real)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
