"""A tiny CIFAR-10 folder in torchvision's on-disk format (4 random images per batch file)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_cifar10(root: Path, corrupt: str | None = None) -> Path:
    """Write `root`/cifar-10-batches-py with 5 training batches and a test batch; `corrupt` names a file to damage."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = np.random.default_rng(i).integers(0, 256, (4, 3072), dtype=np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": list(range(4))}, f)
    if corrupt:
        (d / corrupt).write_bytes(b"\x80\x04this is not a CIFAR batch")
    return d
