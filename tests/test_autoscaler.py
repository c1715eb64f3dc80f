"""Ray's autoscaler on one machine: ray_cluster.yaml's node types through Ray's fake multi-node provider.

cluster/fake_cluster.py turns ray_cluster.yaml into a `fake_multinode` config (same worker node types,
GPU counts as resources, the CPU-0 head, GPU workers from zero, a short idle timeout); a head started
with it (`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config ...`, own port and temp dir, 127.0.0.1
only, its own auth token) runs Ray's real autoscaler, which launches each node it decides on as one more
raylet on this machine. The smoke sweep runs through the real CLI with --address and --resource-wait. The
commands are read from docs/cluster.md's section "Ray's autoscaler on one machine" and run with this test's
port, temp dir and token; the checks read `ray status`, the autoscaler's log, MLflow and Parquet.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from _doc_commands import doc_commands, find
from _procs import is_loopback, listeners, reap, session_pids
from test_cluster import assert_complete

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
FAKE_HEAD_ID = "f" * 51 + "00000"  # the fake provider's head node id; its workers count up from ...00001
SECTION = "## Ray's autoscaler on one machine"
DOC_PORT, DOC_CONFIG, DOC_TEMP = "6399", "fake_cluster.yaml", "/tmp/ray-fake"  # as docs/cluster.md writes them


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def active_nodes(status: str) -> dict[str, int]:
    """`ray status`'s Active section: node type -> count."""
    m = re.search(r"^Active:\n(.*?)^Pending:", status, re.M | re.S)
    return {t: int(n) for n, t in re.findall(r"^\s+(\d+)\s+(\S+)\s*$", m.group(1), re.M)} if m else {}


def test_fake_config_keeps_the_node_types_of_ray_cluster_yaml(tmp_path: Path) -> None:
    out = tmp_path / "fake.yaml"
    run = subprocess.run([sys.executable, "cluster/fake_cluster.py", "ray_cluster.yaml", str(out), "--port", "6399"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    real = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    fake = yaml.safe_load(out.read_text())
    assert fake["provider"]["type"] == "fake_multinode" and fake["provider"]["gcs_address"] == "127.0.0.1:6399"
    head, types = fake["head_node_type"], fake["available_node_types"]
    workers = {k for k in real["available_node_types"] if k != real["head_node_type"]}
    assert set(types) == workers | {head}
    assert types[head]["resources"] == real["available_node_types"][real["head_node_type"]]["resources"]
    assert types[head]["resources"]["CPU"] == 0
    for name in workers:
        spec = real["available_node_types"][name]
        assert types[name]["resources"]["GPU"] == spec["resources"]["GPU"]
        assert types[name]["resources"]["CPU"] == 1  # scaled down to this machine
        assert types[name]["min_workers"] == spec["min_workers"] == 0
        assert 1 <= types[name]["max_workers"] <= spec["max_workers"]
    assert fake["max_workers"] <= 2 and fake["idle_timeout_minutes"] < 1


@pytest.mark.timeout(400)
def test_autoscaler_adds_nodes_for_the_sweep_and_removes_them(tmp_path: Path) -> None:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    config = tmp_path / "fake_cluster.yaml"
    # Short, for Ray's socket paths (< 108 chars); created by `ray start` and removed at the end.
    temp = Path(tempfile.gettempdir()) / f"dbn-as-{port}"
    token = tmp_path / "auth_token"  # instead of `ray get-auth-token --generate` (~/.ray): this test's own token
    token.write_text(secrets.token_hex(32))
    base_env = dict(os.environ, RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
                    DBN_SWEEP_REPORT="off")
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        base_env.pop(name, None)  # the docs' commands set what they need

    shutil.rmtree(temp, ignore_errors=True)

    def doc(*prefix: str) -> tuple[dict[str, str], list[str]]:
        """docs/cluster.md's command, with this test's port, config, temp dir, python and ray."""
        env, argv = find(doc_commands(SECTION), *prefix, unique=False)
        argv = [a.replace(DOC_PORT, str(port)).replace(DOC_TEMP, str(temp)).replace(DOC_CONFIG, str(config))
                for a in argv]
        argv[0] = {"python": sys.executable, "ray": RAY}[argv[0]]
        return dict(base_env, **env), argv

    env, argv = doc("python", "cluster/fake_cluster.py")
    subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True, timeout=60)
    head_env, head_argv = doc("ray", "start", "--head")
    assert {"RAY_FAKE_CLUSTER", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"} <= set(head_env), head_env
    assert f"--temp-dir={temp}" in head_argv and f"--port={port}" in head_argv, head_argv
    status_env, status_argv = doc("ray", "status")
    assert status_argv[-1] == address, status_argv
    sweep_env, sweep_argv = doc("python", "-m", "search.run")
    assert sweep_argv[sweep_argv.index("--address") + 1] == address, sweep_argv

    def status() -> str:
        out = subprocess.run(status_argv, env=status_env, capture_output=True, text=True, timeout=60)
        return out.stdout if out.returncode == 0 else ""

    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(head_argv, env=head_env, stdout=head_log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    sweep = None
    try:
        deadline = time.time() + 90
        while not active_nodes(first := status()):
            assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(1)
        assert active_nodes(first) == {"ray.head.default": 1}, first  # no worker before there is demand

        sweep_log = tmp_path / "sweep.log"
        with open(sweep_log, "w") as fh:
            started = time.time()
            sweep = subprocess.Popen(
                [*sweep_argv, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage",
                 str(tmp_path / "results")],
                cwd=ROOT, env=sweep_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            peak: dict[str, int] = {}
            exposed: set[str] = set()
            while sweep.poll() is None and time.time() < started + 300:
                for kind, n in active_nodes(status()).items():
                    peak[kind] = max(peak.get(kind, 0), n)
                exposed |= {f"pid {pid} listens on {addr}:{p}" for pid, proto, addr, p
                            in listeners(session_pids(head.pid)) if not is_loopback(addr)}
                time.sleep(3)
            rc = sweep.wait(timeout=30)
        took = time.time() - started
        log = sweep_log.read_text()
        assert rc == 0, log[-4000:]
        assert "waiting up to --resource-wait 300 s for the autoscaler" in log  # no worker existed at the start
        print(f"autoscaler: sweep done in {took:.0f} s, peak nodes {peak}")

        # The autoscaler added worker nodes of ray_cluster.yaml's types, and the trials ran on 2 or more of them.
        workers = {k: v for k, v in peak.items() if k != "ray.head.default"}
        assert sum(workers.values()) >= 2, peak
        assert set(workers) <= set(yaml.safe_load(config.read_text())["available_node_types"]), peak
        monitor = (temp / "session_latest" / "logs" / "monitor.log").read_text()
        assert re.search(r"Adding \d+ node\(s\) of type gpu_", monitor), monitor[-3000:]
        runs = assert_complete(tmp_path)  # every trial: FINISHED and ok in MLflow, one row each in Parquet
        node_ids = {r.data.tags["node_id"] for r in runs}
        assert len(node_ids) >= 2, node_ids
        assert all(n.startswith("f" * 51) and n != FAKE_HEAD_ID for n in node_ids), node_ids  # launched nodes
        assert {r.data.tags["node_ip"] for r in runs} == {"127.0.0.1"}
        assert not exposed, exposed

        # Idle, they go again (idle_timeout_minutes 0.1 in the generated config).
        deadline = time.time() + 120
        while (now := active_nodes(status())) != {"ray.head.default": 1}:
            assert time.time() < deadline, now
            time.sleep(2)
        monitor = (temp / "session_latest" / "logs" / "monitor.log").read_text()
        assert re.search(r"Removing \d+ nodes of type gpu_\w+ \(idle\)", monitor), monitor[-3000:]
        print(f"autoscaler: scaled down to the head {time.time() - started - took:.0f} s after the sweep")
    finally:
        if sweep is not None and sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
        if sweep is not None:
            reap(sweep.pid)
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)  # `ray start --block` stops the node's processes on SIGTERM
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        reap(head.pid, grace=5)  # and whatever it left: the autoscaler's nodes live in the head's session
        head_log.close()
        shutil.rmtree(temp, ignore_errors=True)
