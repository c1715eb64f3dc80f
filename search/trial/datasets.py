"""The built-in datasets, one registration each: a dataset is a registry category like kinds and backbones.

    @register_dataset("digits", classes=10, channels=1, flip=False, images=1_797)
    def digits(cfg): ...    # -> (x_train, y_train, x_test, y_test)

Every reader of datasets reads its facts here (through `search.registry`): TrialConfig validation
(the allowed names), data.py (reader, flips, the resident cache's identity), the model's class
count, preflight's file checks, and `--gpus-per-trial auto`'s memory estimate. A new dataset,
in the package or in a plugin (docs/extending.md), is one `register_dataset` call with its reader.

This module imports no torch: each reader imports its implementation (search/trial/data.py,
search/trial/mnist.py) when called, so `search.run --list/--dry-run` validate dataset names
without loading torch.
"""
from __future__ import annotations

from typing import Any

from search.registry import register_dataset

__all__ = ["digits", "synthetic", "cifar10", "cifar100", "imagefolder", "fashion_mnist", "mnist"]


def _synthetic_images(cfg: Any) -> int:
    from search.trial import data  # its SYNTHETIC_SIZES, read when asked (benchmarks resize it)

    return sum(data.SYNTHETIC_SIZES)


def _synthetic_identity(cfg: Any) -> tuple:
    from search.trial import data

    return (cfg.num_classes, tuple(data.SYNTHETIC_SIZES))


@register_dataset("digits", classes=10, channels=1, flip=False, images=1_797)
def digits(cfg: Any) -> tuple:
    """scikit-learn's bundled 8x8 digits, a fixed stratified 80/20 split (no files)."""
    from search.trial.data import _digits

    return _digits()


@register_dataset("synthetic", classes=10, channels=3, flip=False, images=_synthetic_images, any_classes=True,
                  identity=_synthetic_identity)
def synthetic(cfg: Any) -> tuple:
    """A smooth random pattern per class plus pixel noise, at the trial's size and channels (no files)."""
    from search.trial.data import _synthetic

    return _synthetic(cfg.num_classes or 10, cfg.in_chans, cfg.image_size)


def _cifar_check(name: str) -> Any:
    def check(data_dir: str | None) -> None:
        from search.trial.data import check_cifar

        check_cifar(name, data_dir)

    return check


def _cifar_identity(name: str) -> Any:
    def identity(cfg: Any) -> tuple:
        from search.trial.data import cifar_identity

        return cifar_identity(name, cfg.data_dir)

    return identity


def _cifar_reader(name: str) -> Any:
    def read(cfg: Any) -> tuple:
        from search.trial.data import _cifar

        return _cifar(name, cfg.data_dir)

    read.__name__ = read.__qualname__ = name
    return read


cifar10 = register_dataset("cifar10", _cifar_reader("cifar10"), classes=10, channels=3, flip=True, images=60_000,
                           check=_cifar_check("cifar10"), identity=_cifar_identity("cifar10"))
cifar100 = register_dataset("cifar100", _cifar_reader("cifar100"), classes=100, channels=3, flip=True,
                            images=60_000, check=_cifar_check("cifar100"), identity=_cifar_identity("cifar100"))


@register_dataset("imagefolder", classes=None, channels=3, flip=True, streams=True)
def imagefolder(cfg: Any, device: Any) -> tuple:
    """train/ and val/ (or test/) folders of one subfolder per class, decoded by a DataLoader (nothing resident)."""
    from search.trial.data import _imagefolder

    return _imagefolder(cfg, device)


def _idx_reader(name: str) -> Any:
    def read(cfg: Any) -> tuple:
        from search.trial.mnist import load_idx

        return load_idx(name, cfg.data_dir)

    read.__name__ = read.__qualname__ = name
    return read


def _idx_check(name: str) -> Any:
    def check(data_dir: str | None) -> None:
        from search.trial.mnist import check_idx

        check_idx(name, data_dir)

    return check


def _idx_identity(name: str) -> Any:
    def identity(cfg: Any) -> tuple:
        from search.trial.mnist import identity as files_identity

        return files_identity(name, cfg.data_dir)

    return identity


# Digits are not mirror-symmetric; a mirrored garment is still one.
fashion_mnist = register_dataset("fashion_mnist", _idx_reader("fashion_mnist"), classes=10, channels=1, flip=True,
                                 images=70_000, check=_idx_check("fashion_mnist"),
                                 identity=_idx_identity("fashion_mnist"))
mnist = register_dataset("mnist", _idx_reader("mnist"), classes=10, channels=1, flip=False, images=70_000,
                         check=_idx_check("mnist"), identity=_idx_identity("mnist"))
