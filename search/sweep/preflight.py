"""Checks that run before any trial: storage writable, tracking store reachable, data files, each model.

They fail in seconds with one line, instead of after hours of training.
"""
from __future__ import annotations

import errno
import os
import shutil
import urllib.error
import urllib.request

__all__ = ["check_storage", "check_tracking", "check_address", "check_trials"]

MIN_FREE_BYTES = 200 * 2**20  # below this a sweep cannot even write its first results


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_storage(storage: str, flag: str = "--storage", shown: str | None = None) -> None:
    """Raise OSError naming `flag` (--storage) if it is not writable or its disk is (nearly) full.

    DBN_MIN_FREE_BYTES overrides MIN_FREE_BYTES (tests simulate a full disk with it)."""
    shown = storage if shown is None else shown
    if "://" in storage and not storage.startswith("file://"):
        import pyarrow.fs as pafs

        try:
            fs, path = pafs.FileSystem.from_uri(storage)
            fs.get_file_info(path)
        except Exception as e:  # noqa: BLE001 - any failure here is the user's URI
            raise OSError(f"{flag} {shown!r} is not reachable: {str(e).splitlines()[0]}") from None
        return
    path = _existing_parent(storage.replace("file://", ""))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(f"{flag} {shown!r}: {path!r} is a file, not a directory")
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{flag} {shown!r} is not writable (no write permission on {path!r})")
    free = shutil.disk_usage(path).free
    need = int(os.environ.get("DBN_MIN_FREE_BYTES") or MIN_FREE_BYTES)
    if free < need:
        raise OSError(errno.ENOSPC, f"{flag} {shown!r}: only {free / 2**20:.0f} MiB free on its disk "
                      f"(need at least {need / 2**20:.0f} MiB)")


def check_tracking(uri: str) -> None:
    """Raise ConnectionError/OSError naming --tracking-uri if the store cannot be used."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        check_storage(os.path.dirname(os.path.abspath(db)) or ".", flag="--tracking-uri", shown=uri)
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
        check_storage(uri.replace("file://", ""), flag="--tracking-uri", shown=uri)
        return
    raise ValueError(f"--tracking-uri {uri!r}: unsupported scheme (allowed: sqlite:///PATH, http(s)://HOST:PORT, "
                     "file:PATH)")


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Raise ConnectionError naming --address unless something answers at host:port (Ray's GCS)."""
    if not address or address == "auto" or "://" in address:
        return
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise ConnectionError(f"--address {address!r}: no Ray cluster reachable there ({e}); start one with "
                              "`ray start --head` or check host:port") from None


def check_trials(configs: list[dict]) -> None:
    """What only the files or a built model can tell, once per distinct value, before anything is written.

    Raises:
        FileNotFoundError / ValueError (DatasetNotFoundError, CorruptDatasetError, ConfigError): one line.
    """
    seen: set = set()
    for c in configs:
        key = (c["dataset"], c.get("data_dir"))
        if key in seen or c["dataset"] not in ("cifar10", "cifar100", "fashion_mnist", "mnist") \
                or "://" in (c.get("data_dir") or ""):
            continue  # a URI is staged per node; check_data_uri checked the folder
        seen.add(key)
        if c["dataset"] in ("fashion_mnist", "mnist"):
            from search.trial.mnist import check_idx

            check_idx(*key)
            continue
        from search.trial.data import check_cifar

        check_cifar(*key)
    _check_models(configs)


def _check_models(configs: list[dict]) -> None:
    """Build each distinct architecture once on the meta device (no memory, no weights) and run a forward."""
    import torch

    from search.config import DATASET_CLASSES, ConfigError, TrialConfig
    from search.trial.models import build_model

    seen: set = set()
    for c in configs:
        cfg = TrialConfig.from_dict(c)
        key = (cfg.backbone, cfg.depth, cfg.width, cfg.stem, cfg.image_size, cfg.in_chans, cfg.dropout_placement,
               cfg.dropout_type)
        if key in seen:
            continue
        seen.add(key)
        classes = cfg.num_classes or DATASET_CLASSES.get(cfg.dataset) or 10
        try:
            with torch.device("meta"):
                model = build_model(cfg, num_classes=classes).eval()
                with torch.no_grad():
                    model(torch.zeros(2, cfg.in_chans, cfg.image_size, cfg.image_size))
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        except RuntimeError as e:
            raise ConfigError(f"field 'image_size' = {cfg.image_size}: backbone {cfg.backbone!r} cannot run a "
                              f"{cfg.image_size}x{cfg.image_size} input ({str(e).splitlines()[0]}); use a larger image_size") from None
