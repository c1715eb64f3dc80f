"""Scale-out on a real multi-node Ray cluster, on one machine, CPU only.

The cluster is `ray.cluster_utils.Cluster`: a head and worker nodes that are separate
Ray nodes (own raylet, object store and workers), each declaring fake GPUs as plain
resources. Every sweep goes through the real CLI (`python -m search.run --address ...`)
in a subprocess, and the assertions read back MLflow, Parquet and Ray's own accounting.

Everything listens on 127.0.0.1 only. Ray rewrites a 127.0.0.1 address to the machine's
routable IP when connecting (and binds on all interfaces for any node IP that is not
loopback); RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 turns that rewrite off, so the nodes and
the driver stay on loopback.

Also here: `search.sweep.staging.stage_data_dir`, which copies a `--data-dir` URI once per node.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
from _procs import descendants, is_loopback, listeners

from search.sweep.staging import check_data_uri, stage_data_dir, staged_path


def _ts(tag: str) -> float:
    """A trial run's started_at / ended_at tag (ISO 8601) as a Unix time."""
    import datetime as dt

    return dt.datetime.fromisoformat(tag).timestamp()

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
# The smoke space (10 trials) made smaller still: 2 cores run every node here.
SMALL = ["--space", "smoke", "--set", "train_samples=128", "--quiet"]
GRID = 10
TRAINABLE = "ImplicitFunc"  # the actor class Ray Tune runs a function trainable in


# --------------------------------------------------------------------------- staging
def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def remote_dir(tmp_path: Path) -> Path:
    src = tmp_path / "bucket" / "cifar"
    (src / "cifar-10-batches-py").mkdir(parents=True)
    (src / "cifar-10-batches-py" / "data_batch_1").write_bytes(os.urandom(4096))
    (src / "cifar-10-batches-py" / "test_batch").write_bytes(os.urandom(1024))
    (src / "README").write_text("not really CIFAR")
    return src


@pytest.mark.timeout(60)
def test_staging_returns_a_local_path_unchanged(tmp_path: Path) -> None:
    assert stage_data_dir(str(tmp_path), root=str(tmp_path / "stage")) == str(tmp_path)
    assert stage_data_dir("relative/dir") == "relative/dir"
    assert not (tmp_path / "stage").exists()


@pytest.mark.timeout(60)
def test_staging_copies_a_uri_once_and_reuses_it(tmp_path: Path, remote_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.fs as pafs

    calls = []
    real = pafs.copy_files
    monkeypatch.setattr(pafs, "copy_files", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    uri, root = remote_dir.as_uri(), str(tmp_path / "stage")
    local = stage_data_dir(uri, root=root)
    assert local == staged_path(uri, root=root) and local.startswith(root)
    assert _tree(Path(local)) == _tree(remote_dir)
    assert (Path(local).parent / "DONE").exists()
    # Later trials on the node (and the same folder spelt with a trailing slash) reuse the copy.
    assert stage_data_dir(uri, root=root) == local
    assert stage_data_dir(uri + "/", root=root) == local
    assert len(calls) == 1


@pytest.mark.timeout(60)
def test_staging_root_comes_from_the_environment(tmp_path: Path, remote_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBN_STAGE_DIR", str(tmp_path / "nvme"))
    assert stage_data_dir(remote_dir.as_uri()).startswith(str(tmp_path / "nvme") + os.sep)


@pytest.mark.timeout(60)
def test_staging_redoes_a_copy_left_incomplete(tmp_path: Path, remote_dir: Path) -> None:
    uri, root = remote_dir.as_uri(), str(tmp_path / "stage")
    local = Path(staged_path(uri, root=root))
    local.mkdir(parents=True)  # a copier killed half-way: data, no DONE marker
    (local / "README").write_text("trunc")
    assert stage_data_dir(uri, root=root) == str(local)
    assert _tree(local) == _tree(remote_dir)


@pytest.mark.timeout(60)
def test_staging_names_a_missing_uri(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stage_data_dir((tmp_path / "nope").as_uri(), root=str(tmp_path / "stage"))
    with pytest.raises(ValueError, match="pyarrow cannot open"):
        stage_data_dir("nosuchscheme://bucket/x", root=str(tmp_path / "stage"))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        check_data_uri((tmp_path / "a-file").as_uri())
    assert not (tmp_path / "stage").exists()  # no lock file, no folder for a URI that failed


@pytest.mark.timeout(60)
def test_staging_copies_files_lying_directly_in_the_uri(tmp_path: Path) -> None:
    """The idx files directly in the folder (the Debian package's layout, /usr/share/datasets/fashion-mnist):
    pyarrow's copy did not create the destination and every trial failed with a FileNotFoundError inside
    staging (issue 30). Now the copy holds the four files and the dataset's own check accepts it."""
    from _idx import write_idx

    from search import registry

    src = tmp_path / "fashion-mnist"
    write_idx(src, gz=True)
    local = Path(stage_data_dir(src.as_uri(), root=str(tmp_path / "stage")))
    assert _tree(local) == _tree(src) and len(_tree(local)) == 4
    registry.get("dataset", "fashion_mnist").meta["check"](str(local))


@pytest.mark.timeout(60)
def test_staging_copies_again_when_the_source_changed(tmp_path: Path, remote_dir: Path) -> None:
    """A staged copy was keyed by the URI alone and reused forever: after the source was fixed or changed, trials
    still trained on the old copy, silently (issue 30). Now a changed file (same size, new mtime), an added file or
    a removed one is copied again; an unchanged source is not."""
    uri, root = remote_dir.as_uri(), str(tmp_path / "stage")
    local = Path(stage_data_dir(uri, root=root))
    marker = (local.parent / "DONE").read_text()
    assert stage_data_dir(uri, root=root) == str(local) and (local.parent / "DONE").read_text() == marker
    base, seen = local.parent.parent, [local]
    batch = remote_dir / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(os.urandom(4096))  # same size, new content
    os.utime(batch, ns=(batch.stat().st_atime_ns, batch.stat().st_mtime_ns + 10**9))
    (remote_dir / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"new")
    for change in (None, lambda: (remote_dir / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"new"),
                   lambda: (remote_dir / "README").unlink()):
        if change is not None:
            change()
        now = Path(stage_data_dir(uri, root=root))
        assert now not in seen and now == Path(staged_path(uri, root=root)) and _tree(now) == _tree(remote_dir)
        seen.append(now)
        # A new version is a new folder; the older one, which no process holds any more, is gone
        assert [p.name for p in base.iterdir() if p.is_dir()] == [now.parent.name], list(base.iterdir())
    assert not [p for p in base.iterdir() if p.name.startswith((".tmp-", ".old-"))]  # no copy left half-way


@pytest.mark.timeout(60)
def test_staging_copies_again_a_copy_cut_short_or_partly_deleted(tmp_path: Path, remote_dir: Path) -> None:
    """A DONE marker is not enough: a copy whose files or bytes differ from what the marker recorded (truncated,
    a file removed by a temp cleaner) is copied again, not trained on."""
    uri, root = remote_dir.as_uri(), str(tmp_path / "stage")
    local = Path(stage_data_dir(uri, root=root))
    (local / "cifar-10-batches-py" / "test_batch").write_bytes(b"cut")  # truncated
    assert stage_data_dir(uri, root=root) == str(local) and _tree(local) == _tree(remote_dir)
    (local / "README").unlink()  # removed
    assert stage_data_dir(uri, root=root) == str(local) and _tree(local) == _tree(remote_dir)
    (local.parent / "DONE").write_text('{"uri": "')  # a marker cut short
    assert stage_data_dir(uri, root=root) == str(local) and _tree(local) == _tree(remote_dir)


@pytest.mark.timeout(60)
def test_staging_refuses_a_folder_others_can_write_or_too_small(tmp_path: Path, remote_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The staging root must be this user's, not writable by others (they could plant training data for a URI),
    writable, and hold the data: one line naming the URI, the folder and DBN_STAGE_DIR; nothing copied."""
    import search.sweep.staging as staging

    uri = remote_dir.as_uri()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match=r"the staging folder .*shared' is writable by group and others "
                                              r"\(mode 777\).*DBN_STAGE_DIR"):
        stage_data_dir(uri, root=str(shared))
    assert list(shared.iterdir()) == []
    if os.getuid() == 0:  # as root a folder can be given to another user
        os.chown(shared, 65534, 65534)
        shared.chmod(0o700)
        with pytest.raises(PermissionError, match=r"belongs to uid 65534, not to this user"):
            stage_data_dir(uri, root=str(shared))
        assert list(shared.iterdir()) == []
    monkeypatch.setattr(staging, "MIN_SPARE_BYTES", 2**62)
    with pytest.raises(OSError, match=r"MiB free, the data needs \d+ MiB; set DBN_STAGE_DIR"):
        stage_data_dir(uri, root=str(tmp_path / "small"))
    assert not list((tmp_path / "small").iterdir())
    made = tmp_path / "fresh"
    monkeypatch.setattr(staging, "MIN_SPARE_BYTES", 0)
    stage_data_dir(uri, root=str(made))
    assert made.stat().st_mode & 0o777 == 0o700  # a staging root it creates is private


@pytest.mark.timeout(120)
def test_a_sweep_whose_staging_folder_others_can_write_is_refused_before_anything_runs(
        tmp_path: Path, remote_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """search.run with a --data-dir URI on a local Ray checks this machine's staging root in preflight: exit 2,
    one line, nothing written (no mlflow.db, no results/), nothing staged."""
    import search.sweep.driver
    from search.sweep import cli

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o775)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("DBN_STAGE_DIR", str(shared))
    monkeypatch.setattr(search.sweep.driver, "drive", lambda *a, **k: pytest.fail("reached the driver"))
    rc = cli.main(["--space", "smoke", "--data-dir", remote_dir.as_uri(), "--num-cpus", "2"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: staging --data-dir {remote_dir.as_uri()!r}: the staging folder "), lines[0]
    assert "is writable by its group (mode 775)" in lines[0] and "DBN_STAGE_DIR" in lines[0], lines[0]
    assert list(cwd.iterdir()) == [] and list(shared.iterdir()) == []


@pytest.mark.timeout(120)
def test_a_sweep_checks_the_staged_copy_of_a_uri_before_anything_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """On a local Ray, search.run stages a --data-dir URI in preflight and runs the dataset's own file checks on
    the copy: a corrupt idx file is one line naming the URI and the file, exit 2, before the lock, mlflow.db or
    results/ (it was every trial's failure). A good one passes and leaves the copy the trials reuse."""
    import search.sweep.driver
    from _idx import write_idx

    from search.sweep import cli

    src = tmp_path / "fashion"
    write_idx(src, gz=False)
    (src / "train-labels-idx1-ubyte").write_bytes((src / "t10k-images-idx3-ubyte").read_bytes())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("DBN_STAGE_DIR", str(tmp_path / "stage"))
    reached = []
    monkeypatch.setattr(search.sweep.driver, "drive", lambda *a, **k: reached.append(1) or 0)
    argv = ["--space", "smoke", "--set", "dataset=fashion_mnist", "--set", "image_size=16", "--data-dir",
            src.as_uri(), "--num-cpus", "2"]
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and not reached, err
    assert lines[0].startswith(f"error: --data-dir {src.as_uri()!r} (staged at {tmp_path / 'stage'}"), lines[0]
    assert "train-labels-idx1-ubyte: not a readable idx file of dataset 'fashion_mnist'" in lines[0], lines[0]
    assert list(cwd.iterdir()) == []
    write_idx(src, gz=False)  # fixed: the source changed, so the copy is staged again and passes
    assert cli.main(argv) == 0 and reached == [1], capsys.readouterr().err
    assert list(cwd.iterdir()) == []


_STAGE_WORKER = textwrap.dedent("""
    import sys, time
    import pyarrow.fs as pafs
    from search.sweep.staging import stage_data_dir

    uri, root, log, start = sys.argv[1:5]
    real = pafs.copy_files

    def slow_copy(*a, **k):  # long enough that every process arrives while one copies
        with open(log, "a") as fh:
            fh.write("copy\\n")
        time.sleep(1.5)
        return real(*a, **k)

    pafs.copy_files = slow_copy
    while time.time() < float(start):
        time.sleep(0.005)
    print(stage_data_dir(uri, root=root))
""")


@pytest.mark.timeout(120)
def test_concurrent_trials_on_a_node_copy_once(tmp_path: Path, remote_dir: Path) -> None:
    uri, root, log = remote_dir.as_uri(), str(tmp_path / "stage"), tmp_path / "copies.log"
    start = time.time() + 3.0  # all three start together, after their imports
    procs = [subprocess.Popen([sys.executable, "-c", _STAGE_WORKER, uri, root, str(log), str(start)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0, err[-2000:]
        outs.append(out.strip())
    assert log.read_text().splitlines() == ["copy"]
    assert len(set(outs)) == 1 and outs[0] == staged_path(uri, root=root)
    # The processes that waited got the complete copy, not a half-written one.
    assert _tree(Path(outs[0])) == _tree(remote_dir)


_STAGE_READER = textwrap.dedent("""
    import os, sys, time
    from search.sweep.staging import stage_data_dir

    uri, root, go = sys.argv[1:4]
    local = stage_data_dir(uri, root=root)
    print(local, flush=True)
    while not os.path.exists(go):  # a trial that has its path and reads the files later
        time.sleep(0.02)
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(local) for n in names)
    print(repr({os.path.relpath(f, local): open(f, "rb").read() for f in files}), flush=True)
""")


@pytest.mark.timeout(120)
def test_a_recopy_never_changes_a_copy_a_trial_still_reads(tmp_path: Path, remote_dir: Path) -> None:
    """The re-copy race (issue 30): a trial had its staged path, the source changed, and the next trial's
    re-copy deleted and rewrote that folder under it (it read a half-written or a mixed copy). Now each version
    of the source is its own folder, published by one rename: the reader, a real second process, reads the
    version it was handed, whole and unchanged, while the new version is copied beside it; the old version is
    deleted only after the reader has gone."""
    import ast

    uri, root, go = remote_dir.as_uri(), str(tmp_path / "stage"), tmp_path / "go"
    before = _tree(remote_dir)
    reader = subprocess.Popen([sys.executable, "-c", _STAGE_READER, uri, root, str(go)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        old = Path(reader.stdout.readline().strip())
        assert old.is_dir(), reader.stderr.read()[-2000:]
        (remote_dir / "cifar-10-batches-py" / "data_batch_1").write_bytes(os.urandom(4096))
        (remote_dir / "cifar-10-batches-py" / "data_batch_9").write_bytes(b"new file")
        new = Path(stage_data_dir(uri, root=root))  # the next trial, in this process: a copy of the new source
        assert new != old and _tree(new) == _tree(remote_dir)
        assert _tree(old) == before  # the folder the reader holds was not touched
        go.touch()
        out, err = reader.communicate(timeout=60)
    finally:
        go.touch()
        reader.kill() if reader.poll() is None else None
    assert reader.returncode == 0, err[-2000:]
    assert {k: v for k, v in ast.literal_eval(out.strip()).items()} == before  # read whole, the old version
    stage_data_dir(uri, root=root)  # the reader has gone: nobody holds the old version, and it is deleted
    assert not old.parent.exists() and new.is_dir()


def test_a_staged_copy_is_checked_by_the_dataset_on_the_node_that_uses_it(tmp_path: Path) -> None:
    """The readers' checks ran on the driver's staged copy only; a trial on a node whose copy was bad failed in
    the reader, naming a temporary path. `stage_and_check` (what every trial calls) runs the dataset's own file
    check on this node's copy: one line naming the URI, the copy and what is wrong."""
    from _idx import write_idx

    from search.sweep.staging import stage_and_check

    src = tmp_path / "fashion-mnist"
    write_idx(src, gz=False)
    uri, root = src.as_uri(), str(tmp_path / "stage")
    local = stage_and_check(uri, "fashion_mnist", root=root)
    assert _tree(Path(local)) == _tree(src)
    (src / "train-labels-idx1-ubyte").write_bytes((src / "t10k-images-idx3-ubyte").read_bytes())  # a wrong file
    with pytest.raises(ValueError) as e:
        stage_and_check(uri, "fashion_mnist", root=root)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--data-dir {uri!r} (staged at {root}/")
    assert "train-labels-idx1-ubyte" in msg, msg


# --------------------------------------------------------------------------- cluster
@contextmanager
def local_cluster(monkeypatch: pytest.MonkeyPatch, workers: int = 1, cpus: int = 1,
                  gpus: int = 1) -> Iterator[tuple[Any, list[Any]]]:
    """A head and `workers` worker nodes, each its own Ray node with `cpus` CPUs and `gpus` fake GPUs."""
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # for the driver subprocess
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # for this process
    node = dict(num_cpus=cpus, num_gpus=gpus, node_ip_address=LOOPBACK, object_store_memory=80 * 2**20)
    cluster = Cluster()
    try:
        cluster.add_node(**node, include_dashboard=False)  # the first node added is the head
        nodes = [cluster.add_node(**node) for _ in range(workers)]
        cluster.wait_for_nodes()
        assert off_loopback_listeners() == []
        yield cluster, nodes
    finally:
        cluster.shutdown()  # kills every node's processes, also when the test failed


def run_cli(cluster: Any, tmp: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "search.run", *SMALL, "--address", cluster.address,
           "--storage", str(tmp / "results"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    assert out.returncode == 0, out.stdout[-3000:] + "\n" + out.stderr[-5000:]
    return out


def finished_runs(tmp: Path) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    # Trial runs only: each sweep also has a parent run (run_kind = sweep) holding its summary.
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("run_kind") != "sweep"]


def parquet_hashes(tmp: Path) -> list[str]:
    import pyarrow.dataset as ds

    return ds.dataset(str(tmp / "results" / "smoke" / "trials"), format="parquet").to_table() \
        .column("config_hash").to_pylist()


def assert_complete(tmp: Path) -> list[Any]:
    """Every grid config has one FINISHED, ok run in the one tracking store and one Parquet row."""
    runs = finished_runs(tmp)
    assert len(runs) == GRID
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["status"] for r in runs} == {"ok"}
    hashes = sorted(r.data.tags["config_hash"] for r in runs)
    assert len(set(hashes)) == GRID
    assert sorted(parquet_hashes(tmp)) == hashes
    return runs


def off_loopback_listeners() -> list[str]:
    """Listening TCP sockets of this process and its descendants (Ray nodes, workers, the
    driver subprocess) that are not on a loopback address."""
    return [f"pid {pid} listens on {addr}" for pid, proto, addr, _ in listeners(descendants(os.getpid()))
            if proto.startswith("tcp") and not is_loopback(addr)]


def trainable_actors(cluster: Any, state: str = "ALIVE") -> list[dict[str, Any]]:
    table = cluster.global_state.actor_table(None, actor_state_name=state)
    return [a for a in table.values() if TRAINABLE in a["ActorClassName"]]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sweep_spreads_over_nodes_into_one_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with local_cluster(monkeypatch, workers=1) as (cluster, (worker,)):
        head = cluster.head_node
        run_cli(cluster, tmp_path, "--gpus-per-trial", "0.5", "--cpus-per-trial", "0.5")
        runs = assert_complete(tmp_path)
        # Both nodes share 127.0.0.1 here, so the Ray node id tells them apart.
        by_node = {r.data.tags.get("node_id") for r in runs}
        assert by_node == {head.node_id, worker.node_id}, by_node
        assert {r.data.tags.get("node_ip") for r in runs} == {LOOPBACK}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fractional_gpus_pack_eight_trials_on_two_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with local_cluster(monkeypatch, workers=1) as (cluster, _):
        samples: list[tuple[float, int]] = []  # (GPUs in use per Ray's accounting, live trial actors)
        exposed: set[str] = set()
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                free = cluster.global_state.available_resources().get("GPU", 0.0)
                samples.append((2.0 - free, len(trainable_actors(cluster))))
                if len(samples) % 5 == 0:  # with the driver and 8 trial workers up: still loopback only
                    exposed.update(off_loopback_listeners())
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            # CPU 0.1 per trial: the 0.25 GPU share, not the 2 real cores, binds.
            run_cli(cluster, tmp_path, "--gpus-per-trial", "0.25", "--cpus-per-trial", "0.1",
                    "--set", "train_samples=64")
        finally:
            stop.set()
            watcher.join(timeout=10)
        runs = assert_complete(tmp_path)
    assert not exposed, exposed
    used = max(s[0] for s in samples)
    live = max(s[1] for s in samples)
    assert used <= 2.0 + 1e-9 and live <= 8, (used, live)
    # More than 2 trials per GPU at once: the fractions really packed (0.5 would allow only 4).
    assert used >= 1.25 and live >= 5, (used, live)
    spans = sorted((_ts(r.data.tags["started_at"]), _ts(r.data.tags["ended_at"])) for r in runs)
    overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    print(f"packing: peak {used:g} GPUs in use, {live} live trial actors, {overlap} trials training at once")
    assert 3 <= overlap <= 8, overlap


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_worker_node_loses_no_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with local_cluster(monkeypatch, workers=1) as (cluster, (worker,)):
        head_id, worker_id = cluster.head_node.node_id, worker.node_id
        killed: dict[str, Any] = {}

        def kill_when_busy() -> None:
            deadline = time.time() + 150
            while time.time() < deadline and not killed:
                busy = [a for a in trainable_actors(cluster) if a["Address"]["NodeID"] == worker_id]
                if busy:
                    time.sleep(1.0)  # let the trial get going
                    killed["at"] = time.time()
                    cluster.remove_node(worker, allow_graceful=False)
                    return
                time.sleep(0.1)

        killer = threading.Thread(target=kill_when_busy, daemon=True)
        killer.start()
        try:
            run_cli(cluster, tmp_path, "--gpus-per-trial", "0.5", "--cpus-per-trial", "0.5", "--retries", "3")
        finally:
            killer.join(timeout=30)
        assert killed, "no trial ever started on the worker node"
        runs = assert_complete(tmp_path)
        nodes = {r.data.tags["node_id"] for r in runs}
        # The kill hit live trials: their actors died with the node.
        assert any(a["Address"]["NodeID"] == worker_id for a in trainable_actors(cluster, "DEAD"))
        print(f"kill: {sum(r.data.tags['node_id'] == worker_id for r in runs)} trial(s) finished on the worker "
              f"before it died, {sum(r.data.tags['node_id'] == head_id for r in runs)} on the head")
        assert nodes <= {head_id, worker_id}
        for r in runs:  # nothing is credited to the dead node after it died
            if r.data.tags["node_id"] == worker_id:
                assert _ts(r.data.tags["ended_at"]) <= killed["at"]
        # The sweep went on without the worker: trials started on the head after the kill.
        assert any(_ts(r.data.tags["started_at"]) > killed["at"] for r in runs
                   if r.data.tags["node_id"] == head_id)


def _cmd(cluster: Any, tmp: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "search.run", "--space", "smoke", "--set", "train_samples=64", "--set", "epochs=1",
            "--set", "dropout_type=bernoulli", "--quiet", "--address", cluster.address, "--storage",
            str(tmp / "results"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *args]


def _cli(cluster: Any, tmp: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(cluster, tmp, *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_request_no_node_fits_is_refused_or_waited_for_with_a_bound(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes of 1 CPU, trials of 2: refused at once by default; with --resource-wait, a wait message, then one
    line when the bound passes (nothing trained); a node that fits, added during the wait, runs the sweep."""
    with local_cluster(monkeypatch, workers=0, cpus=1, gpus=0) as (cluster, _):
        out = _cli(cluster, tmp_path / "a", "--cpus-per-trial", "2")
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
        assert "--cpus-per-trial 2 can never be met" in line and "--resource-wait SECONDS" in line
        out = _cli(cluster, tmp_path / "b", "--cpus-per-trial", "2", "--resource-wait", "6")
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        assert "waiting up to --resource-wait 6 s for the autoscaler" in out.stdout
        (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
        assert "no trial could start within --resource-wait 6 s" in line and "nothing was trained" in line
        assert finished_runs(tmp_path / "b") == []  # no trial run; the sweep's parent run is closed
        # The autoscaler's part, by hand: a node that fits arrives during the wait, and the sweep completes.
        log = tmp_path / "c.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(_cmd(cluster, tmp_path / "c", "--cpus-per-trial", "2", "--resource-wait", "150"),
                                    cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
            deadline = time.time() + 90
            while "waiting up to --resource-wait 150 s" not in log.read_text() and proc.poll() is None:
                assert time.time() < deadline, log.read_text()[-2000:]
                time.sleep(0.5)
            cluster.add_node(num_cpus=2, num_gpus=0, node_ip_address=LOOPBACK, object_store_memory=80 * 2**20)
            cluster.wait_for_nodes()
            rc = proc.wait(timeout=300)
        assert rc == 0, log.read_text()[-3000:]
        runs = finished_runs(tmp_path / "c")
        assert runs and {r.data.tags["status"] for r in runs} == {"ok"}
