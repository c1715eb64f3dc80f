"""The MNIST-format datasets `fashion_mnist` and `mnist`: the four original idx files, read from disk.

Nothing is downloaded at run time. The files may be gzipped or not, and may sit in
`data_dir` itself (the Debian package `dataset-fashion-mnist`, a hand download) or in
torchvision's `<data_dir>/FashionMNIST/raw/` / `<data_dir>/MNIST/raw/`. With no
`data_dir`, fashion_mnist reads the Debian package's folder when it exists.

An idx file is a big-endian header (two zero bytes, a type code, the number of
dimensions, one uint32 per dimension) followed by the payload; every file is checked
against its header (magic number, dimensions, exact length) and images against labels
before a tensor is built, so a truncated or foreign file is one line naming it.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from search.trial.errors import CorruptDatasetError, DatasetNotFoundError

__all__ = ["SOURCES", "IDX_FILES", "DEBIAN_DIRS", "idx_files", "read_idx", "load_idx", "check_idx",
           "default_data_dir", "identity"]

# name -> (torchvision's folder, where the original files come from)
SOURCES: dict[str, tuple[str, str]] = {
    "fashion_mnist": ("FashionMNIST", "https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)"),
    "mnist": ("MNIST", "https://ossci-datasets.s3.amazonaws.com/mnist/ (the files of yann.lecun.com/exdb/mnist/)"),
}
# Debian's data packages (apt-get install dataset-fashion-mnist); MNIST has none.
DEBIAN_DIRS: dict[str, tuple[str, str]] = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist", "dataset-fashion-mnist"),
}
# (train images, train labels, test images, test labels), without '.gz'
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_UBYTE = 0x08  # the idx type code of unsigned bytes; the only one these datasets use
NUM_CLASSES = 10


def default_data_dir(name: str) -> str | None:
    """The Debian package's folder for dataset `name` when it exists on this machine, else None."""
    folder = DEBIAN_DIRS.get(name, (None, ""))[0]
    return folder if folder and os.path.isdir(folder) else None


def _how_to_get(name: str) -> str:
    debian = DEBIAN_DIRS.get(name)
    fetch = f"download the four .gz files from {SOURCES[name][1]} into data_dir"
    apt = f"apt-get install {debian[1]} (files land in {debian[0]}) or " if debian else ""
    return f"{apt}{fetch} (nothing is downloaded at run time)"


def _find(folder: Path, stem: str) -> Path | None:
    # The uncompressed file first: torchvision's raw/ holds both, and it reads faster.
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def idx_files(name: str, data_dir: str | None) -> list[Path]:
    """The four idx files of dataset `name` (train images, train labels, test images, test labels).

    Looks in data_dir, data_dir/<Folder>/raw and data_dir/raw (data_dir None: the Debian folder).

    Raises:
        DatasetNotFoundError: no folder holds all four; one line naming the missing files and how to get them.
    """
    folder, _ = SOURCES[name]
    where = f"(each gzipped or not) in <data_dir>/ or <data_dir>/{folder}/raw/"
    data_dir = data_dir if data_dir is not None else default_data_dir(name)
    if data_dir is None:
        raise DatasetNotFoundError(f"dataset {name!r} needs field 'data_dir' (got None): expected "
                                   f"{', '.join(IDX_FILES)} {where}; {_how_to_get(name)}")
    root = Path(data_dir).expanduser()
    best: tuple[int, Path, list[Path | None]] | None = None
    for cand in (root, root / folder / "raw", root / "raw"):
        found = [_find(cand, stem) for stem in IDX_FILES]
        if all(found):
            return found  # type: ignore[return-value]
        n = sum(f is not None for f in found)
        if best is None or n > best[0]:
            best = (n, cand, found)
    _, where, found = best
    missing = [stem for stem, f in zip(IDX_FILES, found) if f is None]
    raise DatasetNotFoundError(f"dataset {name!r}: missing {', '.join(missing)} (or .gz) in {where} (field "
                               f"'data_dir' = {data_dir!r}); expected the four idx files {where}; {_how_to_get(name)}")


def _bad(path: Path, name: str, why: str) -> CorruptDatasetError:
    return CorruptDatasetError(f"{path}: not a readable idx file of dataset {name!r} ({why}); replace it: "
                               f"{_how_to_get(name)}")


# The largest idx data a file may declare: 2 GiB of pixels, far above any MNIST-format dataset (Fashion-MNIST's
# training images are 47 MB); a header promising more is refused before anything is read or decompressed.
MAX_IDX_BYTES = 2**31


def read_idx(path: Path, ndim: int, name: str = "fashion_mnist") -> np.ndarray:
    """One idx file of unsigned bytes with `ndim` dimensions, checked against its header before its data is read.

    The header (magic number, dimensions) is read first; the data is then read up to the length the header
    promises (one byte more, to see a longer file), so a damaged or hostile file (a header promising more than
    MAX_IDX_BYTES, a gzip stream that inflates without end) is refused without reading it whole (issue 30).

    Raises:
        CorruptDatasetError: unreadable gzip, wrong magic number or dimensions, or a length the header
            does not promise (one line naming the file).
    """
    head = 4 + 4 * ndim
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
            header = fh.read(head)
            if len(header) < head:
                raise _bad(path, name, f"{len(header)} bytes, shorter than the {head}-byte header")
            magic = int.from_bytes(header[:4], "big")
            want = (_UBYTE << 8) | ndim
            if magic != want:
                raise _bad(path, name, f"magic number 0x{magic:08x}, expected 0x{want:08x} (unsigned bytes, "
                                       f"{ndim} dims)")
            dims = tuple(int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
            size = int(np.prod(dims, dtype=np.int64))
            shape = " x ".join(map(str, dims))
            if size > MAX_IDX_BYTES:
                raise _bad(path, name, f"header says {shape} = {size} bytes of data, more than the "
                                       f"{MAX_IDX_BYTES} an idx dataset may hold")
            if path.suffix != ".gz" and os.path.getsize(path) - head != size:
                raise _bad(path, name, f"header says {shape} = {size} bytes of data, file holds "
                                       f"{os.path.getsize(path) - head}")
            data = fh.read(size + 1)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncated streams raise EOFError
        raise _bad(path, name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'truncated'}") from None
    if len(data) != size:
        held = f"more than {size}" if len(data) > size else str(len(data))
        raise _bad(path, name, f"header says {shape} = {size} bytes of data, file holds {held}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _split(name: str, images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = read_idx(images, 3, name), read_idx(labels, 1, name)
    if len(x) != len(y):
        raise _bad(labels, name, f"{len(y)} labels for the {len(x)} images of {images.name}")
    if x.shape[1] != x.shape[2]:
        raise _bad(images, name, f"images of {x.shape[1]} x {x.shape[2]} pixels; expected square images")
    if y.size and int(y.max()) >= NUM_CLASSES:
        raise _bad(labels, name, f"label {int(y.max())}, expected 0..{NUM_CLASSES - 1}")
    # [N, H, W] -> [N, 1, H, W]; copy: frombuffer's array is read-only and torch wants to own its memory
    return torch.from_numpy(x.copy())[:, None], torch.from_numpy(y.astype(np.int64))


def load_idx(name: str, data_dir: str | None) -> tuple[torch.Tensor, ...]:
    """(train images, train labels, test images, test labels): uint8 [N, 1, H, W] and int64 [N].

    Raises:
        DatasetNotFoundError: files missing. CorruptDatasetError: a file cannot be read.
    """
    tri, trl, tei, tel = idx_files(name, data_dir)
    return (*_split(name, tri, trl), *_split(name, tei, tel))


def check_idx(name: str, data_dir: str | None) -> None:
    """Raise as loading would (DatasetNotFoundError, CorruptDatasetError), reading every file once."""
    load_idx(name, data_dir)


def identity(name: str, data_dir: str | None) -> tuple:
    """What fixes the loaded tensors: the files' paths, sizes and mtimes (raises as loading would)."""
    files = idx_files(name, data_dir)
    return tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
