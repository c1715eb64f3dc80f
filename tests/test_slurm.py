"""cluster/slurm/sweep.sbatch on a real Slurm: munged, slurmctld and two slurmd on one machine.

Debian's Slurm (22.05) runs here as it would on a cluster, with a minimal slurm.conf in a temp dir: two
nodes n1, n2 at 127.0.0.1 on their own ports, `proctrack/linuxproc` (no cgroups needed),
`select/cons_tres`, `SlurmdParameters=config_overrides` (each node claims the machine's cores), no
accounting (so no `sacct`: the job's state comes from `scontrol show job`). munged runs with its own key
and socket. The job is the shipped script with the smoke sweep, submitted with the `sbatch` command read
from docs/cluster.md (section Slurm); the Ray nodes it starts keep to 127.0.0.1
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the tests/_ray_loopback.py hook for `ray start --address`,
DBN_RAY_NODE_IP=127.0.0.1), with their own token.

Skipped only when the Slurm binaries are missing and DBN_REQUIRE_SLURM is unset (CI sets it, after
`apt-get install slurmctld slurmd slurm-client munge`). Every daemon is stopped by its PID.
"""
from __future__ import annotations

import getpass
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from _doc_commands import doc_commands, find
from _procs import descendants, is_loopback, listeners
from test_cluster import assert_complete

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# The smoke sweep, as docs/cluster.md's command runs it (TMP: the test's temp dir).
SWEEP = ["python", "-m", "search.run", "--space", "smoke", "--set", "train_samples=128", "--quiet",
         "--tracking-uri", "sqlite:///TMP/mlflow.db", "--storage", "TMP/results", "--gpus-per-trial", "0.5",
         "--cpus-per-trial", "0.5"]
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel")
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}


def _require_slurm() -> dict[str, str]:
    found = {b: shutil.which(b, path=SBIN) for b in BINARIES}
    missing = sorted(b for b, path in found.items() if path is None)
    if missing:
        msg = f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd slurm-client munge"
        if os.environ.get("DBN_REQUIRE_SLURM"):
            pytest.fail(msg + " (DBN_REQUIRE_SLURM is set)")
        pytest.skip(msg)
    return {b: str(p) for b, p in found.items()}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the daemon by its PID, SIGKILL it after `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class Slurm:
    base: Path
    env: dict[str, str]  # SLURM_CONF and PATH for sbatch/scontrol
    bins: dict[str, str]
    slurmd: list[subprocess.Popen]

    def run(self, *cmd: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([self.bins.get(cmd[0], cmd[0]), *cmd[1:]], env=kw.pop("env", self.env),
                              capture_output=True, text=True, timeout=timeout, **kw)


SLURM_CONF = """\
ClusterName=dbntest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.socket
CommunicationParameters=NoInAddrAny
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MailProg=/bin/true
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1_port} CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2_port} CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


def _wait(what: str, ok, timeout: float, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.time() + timeout
    while not ok():
        dead = [p.args for p in procs if p.poll() is not None]
        if dead or time.time() > deadline:
            tails = "\n".join(f"--- {log.name}\n" + log.read_text()[-1500:] for log in logs if log.exists())
            raise AssertionError(f"{what}: {'exited: ' + str(dead) if dead else 'timed out'}\n{tails}")
        time.sleep(0.3)


@contextmanager
def slurm_cluster() -> Iterator[Slurm]:
    """munged, slurmctld and slurmd n1, n2 on 127.0.0.1, in a temp dir; all stopped by PID afterwards."""
    bins = _require_slurm()
    # munged insists that the socket's directory be reachable by all, which pytest's 0700 tmp dirs are not.
    base = Path(tempfile.mkdtemp(prefix="dbn-slurm-", dir="/tmp"))
    base.chmod(0o755)
    for sub in ("munge", "state", "log", "spool/n1", "spool/n2"):
        (base / sub).mkdir(parents=True)
    key = base / "munge" / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    ctld_port, n1_port, n2_port = _free_ports(3)
    conf = base / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=socket.gethostname().split(".")[0], user=getpass.getuser(),
                                      base=base, ctld_port=ctld_port, n1_port=n1_port, n2_port=n2_port))
    env = dict(os.environ, SLURM_CONF=str(conf))
    daemons: list[subprocess.Popen] = []
    logs: list[Path] = []

    def start(name: str, *cmd: str) -> subprocess.Popen:
        log = base / "log" / f"{name}.out"
        logs.append(log)
        with open(log, "w") as fh:
            proc = subprocess.Popen(list(cmd), env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        daemons.append(proc)
        return proc

    slurm = Slurm(base, env, bins, [])
    try:
        m = base / "munge"
        start("munged", bins["munged"], "-F", f"--socket={m}/munge.socket", f"--key-file={key}",
              f"--log-file={m}/munged.log", f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed")
        _wait("munged", lambda: (m / "munge.socket").exists(), 20, daemons, logs)
        start("slurmctld", bins["slurmctld"], "-D")
        _wait("slurmctld", lambda: slurm.run("scontrol", "ping").stdout.count("UP") > 0, 30, daemons, logs)
        slurm.slurmd = [start(f"slurmd-{n}", bins["slurmd"], "-D", "-N", n) for n in ("n1", "n2")]
        _wait("slurmd n1, n2 idle", lambda: slurm.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
              == ["n1", "idle", "n2", "idle"], 60, daemons, logs)
        yield slurm
    finally:
        # Any job left (a failed test) is cancelled before its nodes go.
        if len(daemons) > 1 and daemons[1].poll() is None:  # slurmctld is up
            subprocess.run([bins["scancel"], "--user", getpass.getuser()], env=env, capture_output=True, timeout=30)
            deadline = time.time() + 60
            while time.time() < deadline and slurm.run("squeue", "-h").stdout.strip():
                time.sleep(1)
        for proc in reversed(daemons):
            _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ processes of the job
def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def job_processes(job_id: str, ray_tmp: Path) -> dict[int, str]:
    """Live processes of the job: those that inherited its SLURM_JOB_ID, and any whose command line names
    its Ray temp dir (a Ray process that escaped the job's environment would still name its session)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            pid = int(entry)
            cmd = _cmdline(pid)
            if _environ(pid).get("SLURM_JOB_ID") == job_id or str(ray_tmp) in cmd:
                out[pid] = cmd[:160]
    return out


def _job(slurm: Slurm, job_id: str) -> dict[str, str]:
    out = slurm.run("scontrol", "show", "job", "-o", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


# ------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def slurm() -> Iterator[Slurm]:
    with slurm_cluster() as cluster:
        yield cluster


def _doc_submit(tmp: Path, gcs_port: int) -> tuple[dict[str, str], list[str]]:
    """docs/cluster.md's test command (section Slurm, 2nd block), with PORT and TMP filled in."""
    env, argv = find(doc_commands("## Slurm", 1), "sbatch")
    fill = lambda v: v.replace("PORT", str(gcs_port)).replace("TMP", str(tmp))  # noqa: E731
    return {k: fill(v) for k, v in env.items()}, [fill(a) for a in argv]


def _submit(slurm: Slurm, tmp: Path, drop: tuple[str, ...] = (), **extra: str) \
        -> tuple[str, dict[str, str], str, set[str], float, dict[str, str]]:
    """sbatch docs/cluster.md's command (the smoke sweep on 2 nodes) from the repository root and wait for the job:
    (job id, its final scontrol fields, its output, off-loopback listeners seen among its processes, seconds,
    the job's environment)."""
    gcs_port = _free_ports(1)[0]
    doc_env, argv = _doc_submit(tmp, gcs_port)
    Path(tmp / "auth_token").write_text(secrets.token_hex(32))  # the job's own token (RAY_AUTH_TOKEN_PATH)
    env = dict(slurm.env, PATH=os.pathsep.join([str(Path(sys.executable).parent), slurm.env.get("PATH", "")]),
               RAY_USAGE_STATS_ENABLED="0", DBN_SWEEP_REPORT="off")
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "PYTHONPATH", "RAY_START_HOOK", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(name, None)  # the docs' command sets what it needs; RAY_AUTH_MODE stays unset: the script decides
    env.update(doc_env)
    env.update(extra)
    for name in drop:
        env.pop(name)
    assert argv[0] == "sbatch" and argv[-len(SWEEP):] == [a.replace("TMP", str(tmp)) for a in SWEEP], argv
    # Slurm gives this machine's nodes no GPUs (DBN_GPUS_PER_NODE gives each Ray node one to schedule on).
    out = slurm.run(argv[0], "--parsable", f"--output={tmp}/slurm-%j.out", *argv[1:], env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    ray_tmp = Path(env["DBN_RAY_TMP"])
    started = time.time()
    exposed: set[str] = set()
    state: dict[str, str] = {}
    while time.time() < started + 300:
        state = _job(slurm, job_id)
        if state.get("JobState") in DONE:
            break
        exposed |= {f"{cmd} listens on {addr}:{port}" for pid, cmd in job_processes(job_id, ray_tmp).items()
                    for _, proto, addr, port in listeners([pid]) if not is_loopback(addr)}
        time.sleep(1)
    log = tmp / f"slurm-{job_id}.out"
    text = log.read_text() if log.exists() else "(no job output)"
    return job_id, state, text, exposed, time.time() - started, env


def _assert_no_ray_left(slurm: Slurm, job_id: str, env: dict[str, str]) -> None:
    """No Ray process outlives the job: none left with its SLURM_JOB_ID or naming its Ray temp dir, none below
    the slurmd's, and the head's port is closed."""
    ray_tmp = Path(env["DBN_RAY_TMP"])
    deadline = time.time() + 30
    while (left := job_processes(job_id, ray_tmp)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, left
    below = {pid: _cmdline(pid)[:160] for d in slurm.slurmd for pid in descendants(d.pid) - {d.pid}}
    assert not any("ray" in cmd for cmd in below.values()), below
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(env["DBN_RAY_PORT"]))) != 0


@pytest.mark.timeout(420)
def test_sbatch_script_runs_the_sweep_over_two_slurm_nodes(slurm: Slurm, tmp_path: Path) -> None:
    job_id, state, text, exposed, took, env = _submit(slurm, tmp_path)
    try:
        assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", \
            f"{state.get('JobState')} {state.get('ExitCode')} after {took:.0f} s\n{text[-6000:]}"
        print(f"slurm: job {job_id} COMPLETED 0:0 in {took:.0f} s")

        # Both nodes joined, and the trials ran on both: count the Ray node ids, not the exit code.
        (joined,) = re.findall(r"^(\d+) of 2 Ray nodes joined: (.*)$", text, re.M) or [("0", "")]
        assert joined[0] == "2", text[-4000:]
        prefixes = re.findall(r"127\.0\.0\.1 ([0-9a-f]{12}) ", joined[1])
        assert len(set(prefixes)) == 2, joined
        runs = assert_complete(tmp_path)  # every trial in MLflow (FINISHED, ok) and in Parquet
        node_ids = {r.data.tags["node_id"] for r in runs}
        assert len(node_ids) >= 2, node_ids
        assert all(any(n.startswith(p) for p in prefixes) for n in node_ids), (node_ids, prefixes)
        assert {r.data.tags["node_ip"] for r in runs} == {"127.0.0.1"}
        assert not exposed, exposed
        assert "Stopping Ray on 2 node(s)" in text and "Ray stopped" in text
        assert "auth token" in text  # the job's nodes and driver all ran with token auth
        _assert_no_ray_left(slurm, job_id, env)
    finally:
        shutil.rmtree(env["DBN_RAY_TMP"], ignore_errors=True)


@pytest.mark.timeout(300)
def test_a_worker_that_cannot_join_fails_the_job_before_the_sweep(slurm: Slurm, tmp_path: Path) -> None:
    """Without the loopback hook, `ray start --address` on n2 refuses to join (this machine has one address
    for both nodes): the job fails naming n2, trains nothing, and leaves no Ray process."""
    job_id, state, text, _, took, env = _submit(slurm, tmp_path, drop=("RAY_START_HOOK",), DBN_RAY_JOIN_TIMEOUT="90")
    try:
        assert (state.get("JobState"), state.get("ExitCode")) == ("FAILED", "1:0"), text[-4000:]
        assert "error: ray start on n2 exited before the sweep began" in text, text[-4000:]
        assert "+ python -m search.run" not in text and not (tmp_path / "mlflow.db").exists()
        assert "Stopping Ray on 2 node(s)" in text and "Ray stopped" in text
        _assert_no_ray_left(slurm, job_id, env)
        print(f"slurm: job {job_id} FAILED 1:0 in {took:.0f} s, naming n2")
    finally:
        shutil.rmtree(env["DBN_RAY_TMP"], ignore_errors=True)
