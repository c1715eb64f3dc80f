"""A real `mlflow server` for the tests that read a sweep back through a tracking server.

The command is the one ray_cluster.yaml starts on the head node (read from that file), with the test's
database, artifact folder, the loopback address, a free port and one worker: it serves the artifacts
itself, so every run's artifact URI is `mlflow-artifacts:/...`, resolved against the tracking URI.
The server leads its own session and is stopped by its process group, then whatever outlived that
by its session id (tests/_procs.py).
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import yaml
from _procs import reap, session_pids

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_command() -> tuple[dict[str, str], list[str]]:
    """(environment, argv) of the `mlflow server` command ray_cluster.yaml starts on the head node."""
    with open(ROOT / "ray_cluster.yaml") as fh:
        cfg = yaml.safe_load(fh)
    cmds = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    assert len(cmds) == 1, cmds
    line = [part for part in cmds[0].split(";") if "mlflow server" in part][0]
    line = line.split(">")[0].replace("$(hostname -I | awk '{print $1}')", "HEAD_IP")
    words = shlex.split(line)
    env = {}
    while "=" in words[0]:  # VAR=value prefixes
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    while words[0] in ("setsid", "nohup"):
        words.pop(0)
    assert words[:2] == ["mlflow", "server"], words
    return env, words


def server_argv(db: Path, artifacts: Path, port: int) -> tuple[dict[str, str], list[str]]:
    """The head's command with this test's store, artifact folder, address and one worker."""
    env, words = head_command()
    ours = {"--backend-store-uri": f"sqlite:///{db}", "--artifacts-destination": str(artifacts),
            "--host": "127.0.0.1", "--port": str(port), "--workers": "1"}
    flags = words[2::2]
    assert sorted(flags) == sorted(ours), f"ray_cluster.yaml's mlflow server sets {flags}; this test knows {list(ours)}"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    argv = [str(mlflow_bin)] if mlflow_bin.exists() else [sys.executable, "-m", "mlflow"]
    return env, argv + ["server"] + [w for f in flags for w in (f, ours[f])]


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 with its store and artifacts under `folder`; yields its URL.

    Up when its /health answers OK (within 180 s); stopped at the end by its process group, and every
    process of its session is gone before this returns.
    """
    port = free_port()
    extra, argv = server_argv(folder / "srv.db", folder / "artifacts", port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(extra)
    log_path = folder / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).read().strip() == b"OK":
                    break
            except OSError:
                pass
            assert proc.poll() is None, f"mlflow server exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.time() < deadline, f"no /health in 180 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server, uvicorn and its worker: one process group
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        reap(proc.pid, grace=10)  # SIGKILL whatever of its session outlived SIGTERM
        log.close()
        assert not session_pids(proc.pid), "processes of the mlflow server are left"
