"""Tiny MNIST-format idx files (the format of fashion_mnist and mnist), written by the tests themselves."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(a: np.ndarray) -> bytes:
    """The idx encoding of a uint8 array: 0, 0, type 0x08, ndim, big-endian uint32 dims, then the bytes."""
    head = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape)
    return head + a.astype(np.uint8).tobytes()


def write_idx(folder: Path, *, gz: bool, n_train: int = 20, n_test: int = 10, side: int = 12) -> dict:
    """Four tiny idx files in `folder`; image i is filled with the value i (train) or 100 + i (test), label i % 10.

    Returns the arrays written, by file name (without .gz).
    """
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n, base in (("train", n_train, 0), ("t10k", n_test, 100)):
        arrays[f"{split}-images-idx3-ubyte"] = np.repeat(np.arange(base, base + n, dtype=np.uint8), side * side) \
            .reshape(n, side, side)
        arrays[f"{split}-labels-idx1-ubyte"] = (np.arange(n) % 10).astype(np.uint8)
    for name, a in arrays.items():
        data = idx_bytes(a)
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    return arrays
