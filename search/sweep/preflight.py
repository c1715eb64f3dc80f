"""Checks that run before any trial: storage writable, tracking store reachable, data files, each model.

They fail in seconds with one line, instead of after hours of training.
"""
from __future__ import annotations

import errno
import os
import shutil
import urllib.error
import urllib.request

__all__ = ["check_storage", "check_tracking", "check_environment", "check_address", "check_trials", "check_resources", "local_gpus"]

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


def check_tracking(uri: str, *, reading: bool = False, flag: str = "--tracking-uri") -> None:
    """Raise ConnectionError/OSError/ValueError naming `flag` unless `uri` is a persistent store MLflow opens.

    In-memory sqlite (`sqlite://`, `sqlite:///:memory:`) keeps nothing across processes, so every
    rerun would train everything again; MLflow 3 no longer opens file stores (`file:PATH`, a bare path);
    a misspelled scheme is named with the URI it was probably meant to be. An existing sqlite file must be
    an MLflow store of a schema this MLflow opens (search/sweep/mlflow_store.py). `reading` (analysis.report
    rebuilding from MLflow): the store must exist; nothing creates it.
    """
    from search.sweep.mlflow_store import ALLOWED, check_sqlite_store, check_uri_form

    if uri in ("sqlite://", "sqlite:///", "sqlite:///:memory:") or uri.startswith("sqlite:///:memory:"):
        raise ValueError(f"{flag} {uri!r} is an in-memory database that keeps nothing after the sweep "
                         f"(every rerun would train everything again); give a file (allowed: {ALLOWED})")
    check_uri_form(uri, flag)
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        if reading and not os.path.exists(db):
            check_sqlite_store(uri, db, reading=True, flag=flag)  # names the missing store
        if not reading:
            check_storage(os.path.dirname(os.path.abspath(db)) or ".", flag=flag, shown=uri)
        if os.path.isdir(db):
            raise OSError(f"{flag} {uri!r}: {db!r} is a directory, not a database file")
        from search.outputs import not_regular

        kind = not_regular(db)  # a device or FIFO is no store (and MLflow would write into it)
        if kind is not None:
            raise OSError(f"{flag} {uri!r}: {db!r} is {kind}, not a database file (allowed: a new path or "
                          "an MLflow sqlite file)")
        if not reading and os.path.exists(db) and not os.access(db, os.W_OK):
            raise PermissionError(f"{flag} {uri!r}: {db!r} is not writable")
        check_sqlite_store(uri, db, reading=reading, flag=flag)
        return
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except (urllib.error.URLError, OSError) as e:
            raise ConnectionError(f"{flag} {uri!r} is not reachable ({getattr(e, 'reason', e)}); "
                                  "start the server or check the address") from None
        return
    if uri.startswith("file:") or "://" not in uri:
        raise ValueError(f"{flag} {uri!r}: MLflow 3 no longer supports file stores (a folder of runs); "
                         f"use sqlite:///mlflow.db or a tracking server (allowed: {ALLOWED})")
    raise ValueError(f"{flag} {uri!r}: unsupported scheme (allowed: {ALLOWED})")


def check_environment(address: str | None) -> None:
    """Raise OSError naming the variable unless a local Ray can keep its session files (RAY_TMPDIR, default /tmp):
    a folder there that cannot be written, or whose disk is (nearly) full, ended the sweep as "failed while
    running ... rerun with --resume" (exit 3) after the lock and mlflow.db were written (issue 30).
    A cluster's nodes (`address`) keep theirs on their own disks."""
    if address:
        return
    shown = os.environ.get("RAY_TMPDIR") or "/tmp"
    flag = "RAY_TMPDIR" if os.environ.get("RAY_TMPDIR") else "Ray's temporary folder"
    try:
        check_storage(shown, flag=flag, shown=shown)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e}: Ray keeps its session files there (allowed: a writable "
                      "folder on a disk with room; set RAY_TMPDIR to one)") from None


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Raise ConnectionError naming --address unless a Ray cluster answers there, in seconds.

    `auto` is resolved as Ray resolves it (RAY_ADDRESS, then the cluster `ray start` recorded
    on this machine) without connecting, so "no cluster" is said before anything is written.
    """
    if not address or "://" in address:
        return
    shown = address
    if address == "auto":
        try:
            from ray._private.services import get_ray_address_from_environment

            address = get_ray_address_from_environment("auto", None)
        except Exception as e:  # noqa: BLE001 - Ray's own lookup failing is the same answer: no cluster
            raise ConnectionError(f"--address 'auto': no running Ray cluster found ({str(e).splitlines()[0][:200]}); "
                                  "start one with `ray start --head` or give host:port") from None
        if not address or address == "auto":
            raise ConnectionError("--address 'auto': no running Ray cluster found on this machine (RAY_ADDRESS unset, "
                                  "no cluster started by `ray start`); start one with `ray start --head` or give "
                                  "host:port")
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        via = f" (resolved to {address})" if shown != address else ""
        raise ConnectionError(f"--address {shown!r}{via}: no Ray cluster reachable there ({e}); start one with "
                              "`ray start --head` or check host:port") from None


def local_gpus() -> int:
    """GPUs a local Ray would see on this machine (honours CUDA_VISIBLE_DEVICES), without importing torch."""
    try:
        from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager as m

        n = int(m.get_current_node_num_accelerators() or 0)
        visible = m.get_current_process_visible_accelerator_ids()
    except Exception:  # noqa: BLE001 - no driver, no NVML: no GPU
        return 0
    return min(n, len(visible)) if visible is not None else n


def check_resources(*, cpus_per_trial: float, gpus_per_trial: float | str, num_cpus: int | None,
                    address: str | None, configs: list[dict], cluster: dict[str, float] | None = None) -> None:
    """Refuse a per-trial request no node can ever meet, and CUDA on a machine without a GPU.

    On a local Ray the resources are known before it starts (`--num-cpus` or every core, the
    GPUs of this machine); on a cluster `cluster` is the largest node's resources (checked once
    connected, before anything is written). Without this, Tune waits forever for a node that
    never comes, holding the sweep lock.

    Raises:
        ValueError: one line naming the flag, the value and what the cluster has.
    """
    if cluster is None and address:
        cluster = None  # checked against the real cluster after connecting
    have_cpus = cluster.get("CPU", 0.0) if cluster is not None else float(num_cpus or os.cpu_count() or 1)
    have_gpus = cluster.get("GPU", 0.0) if cluster is not None else (float(local_gpus()) if not address else None)
    where = "the largest node of the cluster" if cluster is not None else "this machine's local Ray"
    if (cluster is not None or not address) and cpus_per_trial > have_cpus:
        raise ValueError(f"--cpus-per-trial {cpus_per_trial:g} can never be met: {where} has {have_cpus:g} CPU(s) "
                         "(allowed: at most that; --num-cpus sets a local Ray's CPUs)")
    gpus = gpus_per_trial
    if have_gpus is not None and gpus != "auto" and float(gpus) > have_gpus:
        raise ValueError(f"--gpus-per-trial {float(gpus):g} can never be met: {where} has {have_gpus:g} GPU(s)")
    if have_gpus is not None and gpus == "auto" and have_gpus < 1:
        raise ValueError(f"--gpus-per-trial auto: {where} has no GPU to measure on; give a number instead")
    wants_cuda = sorted({c.get("device") for c in configs} & {"cuda"})
    if wants_cuda:
        if have_gpus is not None and have_gpus < 1:
            raise ValueError(f"field 'device' = 'cuda': {where} has no GPU (CUDA_VISIBLE_DEVICES="
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use device=auto or cpu, or run "
                             "on a GPU machine")
        if gpus != "auto" and float(gpus) <= 0:
            raise ValueError("field 'device' = 'cuda' needs --gpus-per-trial > 0 (or auto): Ray hides every GPU "
                             "from a trial that reserves none, so each trial would fail")


def check_trials(configs: list[dict]) -> None:
    """What only the files or a built model can tell, once per distinct value, before anything is written.

    Raises:
        FileNotFoundError / ValueError (DatasetNotFoundError, CorruptDatasetError, ConfigError): one line.
    """
    check_data_files(configs)
    _check_models(configs)


def check_data_files(configs: list[dict]) -> None:
    """Each dataset's own file check (search/trial/datasets.py: every file present, its header read before
    the file), once per (dataset, data_dir); a URI is skipped (checked once staged: search.run stages it in
    preflight on a local Ray)."""
    from search import registry

    seen: set = set()
    for c in configs:
        key = (c["dataset"], c.get("data_dir"))
        check = registry.get("dataset", c["dataset"], field_name="dataset").meta["check"]
        if key in seen or check is None or "://" in (c.get("data_dir") or ""):
            continue  # no files; or a URI, staged per node (check_data_uri checked the folder)
        seen.add(key)
        check(key[1])


def _check_models(configs: list[dict]) -> None:
    """Build each distinct architecture once on the meta device (no memory, no weights) and run a forward."""
    import torch

    from search import registry
    from search.config import ConfigError, TrialConfig
    from search.trial.models import build_model

    seen: set = set()
    for c in configs:
        cfg = TrialConfig.from_dict(c)
        key = (cfg.backbone, cfg.depth, cfg.width, cfg.stem, cfg.image_size, cfg.in_chans, cfg.dropout_placement,
               cfg.dropout_type, cfg.normalization, cfg.norm_groups)
        if key in seen:
            continue
        seen.add(key)
        classes = cfg.num_classes or registry.get("dataset", cfg.dataset).meta["classes"] or 10
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
