"""Security properties: loopback-only services, no unsafe deserialisation, no code in `--set`.

- A local sweep's Ray (search.sweep.driver.init_ray with no address) listens on loopback only:
  the sockets of its whole process tree are read from /proc (no psutil needed).
- Project code never unpickles with an unrestricted unpickler, never calls torch.load
  without weights_only=True, never evaluates strings (AST scan of spaces/ search/
  analysis/ benchmarks/); the CIFAR reader's restricted unpickler refuses payloads.
- `--set key=value` and `--space` only parse; a payload that would create a file if
  evaluated creates nothing.
- ray_cluster.yaml (when present) binds no service to all interfaces (the merged-config
  checks are in tests/test_cluster_config.py).
"""
from __future__ import annotations

import ast
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cifar import write_cifar10
from _procs import is_loopback, listeners, reap, session_pids

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("spaces", "search", "analysis", "benchmarks")


# --------------------------------------------------------------------------- listening sockets
def test_listener_scan_sees_an_all_interfaces_socket() -> None:
    """The /proc scan itself: a socket on 0.0.0.0 in this process is found and is not loopback."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        mine = [x for x in listeners([os.getpid()]) if x[3] == port]
        assert mine and not is_loopback(mine[0][2])
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert [x for x in listeners([os.getpid()]) if x[3] == port and is_loopback(x[2])]


_LOCAL_RAY = r'''
import os, sys
from search.sweep.driver import init_ray
init_ray(None, 2)  # exactly what a local sweep does
import ray
from ray import tune

@ray.remote
def task():
    return os.getpid()

@ray.remote
class Actor:
    def ping(self):
        return 1

ray.get([task.remote() for _ in range(2)])
actor = Actor.remote()
ray.get(actor.ping.remote())

def trainable(config):
    tune.report({"x": 1.0})

tune.Tuner(trainable, run_config=tune.RunConfig(storage_path=sys.argv[1], verbose=0)).fit()
print("READY", flush=True)
sys.stdin.read()  # hold Ray up until the test has looked
ray.shutdown()
'''


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_local_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([PY, "-c", _LOCAL_RAY, str(tmp_path / "ray")], cwd=tmp_path, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        lines, deadline = [], time.time() + 180
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip() == "READY":
                break
        assert lines and lines[-1].strip() == "READY", "".join(lines)[-3000:]
        pids = session_pids(proc.pid)
        found = listeners(pids)
        names = {pid: open(f"/proc/{pid}/cmdline").read().split("\0")[0][-40:] for pid, *_ in found
                 if os.path.exists(f"/proc/{pid}/cmdline")}
        assert len(found) >= 3, f"expected Ray's services among the listeners, found {found}"  # GCS, raylet, workers
        exposed = [(names.get(pid, pid), proto, addr, port) for pid, proto, addr, port in found
                   if not is_loopback(addr)]
        assert not exposed, f"a local sweep's processes listen beyond loopback: {exposed}"
    finally:
        try:
            proc.stdin.close()
            proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, OSError):
            pass
        reap(proc.pid)


# --------------------------------------------------------------------------- unsafe deserialisation
_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "<expr>")  # f(x).eval() is no builtin eval
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {_dotted(b) for b in node.bases}
            if bases & {"pickle.Unpickler", "Unpickler", "_pickle.Unpickler"}:
                if not any(isinstance(b, ast.FunctionDef) and b.name == "find_class" for b in node.body):
                    bad.append((node.lineno, f"class {node.name}: an Unpickler without find_class"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, last = name.rpartition(".")
        if head in _PICKLE_MODULES and last in ("load", "loads", "Unpickler", "open"):
            bad.append((node.lineno, name))
        elif name == "torch.load":
            wo = _kw(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                bad.append((node.lineno, "torch.load without weights_only=True"))
        elif name in ("np.load", "numpy.load"):
            ap = _kw(node, "allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                bad.append((node.lineno, f"{name} with allow_pickle"))
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _dotted(_kw(node, "Loader") or ast.Name("missing"))
            if not loader.endswith(("SafeLoader", "CSafeLoader")):
                bad.append((node.lineno, f"{name} without a SafeLoader"))
        elif name in ("yaml.unsafe_load", "yaml.full_load", "pd.read_pickle", "pandas.read_pickle"):
            bad.append((node.lineno, name))
        elif name in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"):
            bad.append((node.lineno, name))
        elif name.endswith(".load_model") and name.startswith("mlflow."):
            bad.append((node.lineno, f"{name} (unpickles)"))
        elif head in ("subprocess", "os") and last in ("run", "Popen", "call", "check_call", "check_output",
                                                      "system", "popen"):
            shell = _kw(node, "shell")
            if last in ("system", "popen") or (isinstance(shell, ast.Constant) and shell.value):
                bad.append((node.lineno, f"{name} through a shell"))
    return bad


def test_scanner_flags_unsafe_calls() -> None:
    src = ("import pickle, torch, yaml\npickle.load(f)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
           "yaml.load(s)\neval(s)\nclass U(pickle.Unpickler):\n    pass\n")
    assert len(_unsafe_calls(ast.parse(src))) == 6
    ok = "import torch, yaml\ntorch.load(p, weights_only=True)\nyaml.load(s, Loader=yaml.SafeLoader)\nmodel.eval()\n"
    assert _unsafe_calls(ast.parse(ok)) == []


def test_no_unsafe_deserialisation_or_eval_in_project_code() -> None:
    found = []
    for d in CODE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            found += [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in _unsafe_calls(tree)]
    assert not found, "\n".join(found)


class _Payload:
    """Unpickling this runs `fn(*args)`."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, bytes]:
    import builtins

    return {
        "os.system": pickle.dumps({b"data": _Payload(os.system, f"touch {marker}"), b"labels": []}),
        "subprocess.call": pickle.dumps({b"data": _Payload(subprocess.call, ["touch", str(marker)]), b"labels": []}),
        "builtins.exec": pickle.dumps({b"data": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
                                       b"labels": []}),
        "builtins.open": pickle.dumps({b"data": _Payload(builtins.open, str(marker), "w"), b"labels": []}),
        # GLOBAL numpy.load, then a call, as the value of a dict (the batch files' shape, protocol 2, which the
        # header check lets through): an allowed module with a name that is not allowed
        "numpy-other-name": b"\x80\x02}(U\x04datacnumpy\nload\n(S'%s'\ntRu." % str(marker).encode(),
    }


def test_payloads_are_real(tmp_path: Path) -> None:
    """Control: an unrestricted pickle.loads of one payload does create the file (in a child process)."""
    marker = tmp_path / "control"
    blob = _payloads(marker)["builtins.open"]
    subprocess.run([PY, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"], input=blob, check=True,
                   timeout=60)
    assert marker.exists()


@pytest.mark.parametrize("name", ["os.system", "subprocess.call", "builtins.exec", "builtins.open", "numpy-other-name"])
def test_cifar_reader_refuses_malicious_pickles(tmp_path: Path, name: str) -> None:
    from search.config import TrialConfig
    from search.trial.data import CorruptDatasetError, load_data

    marker = tmp_path / "pwned"
    d = write_cifar10(tmp_path / "data")
    (d / "data_batch_2").write_bytes(_payloads(marker)[name])
    cfg = TrialConfig(dataset="cifar10", data_dir=str(tmp_path / "data"), image_size=32, in_chans=3, batch_size=8)
    with pytest.raises(CorruptDatasetError) as e:
        load_data(cfg, "cpu")
    assert "refusing global" in str(e.value) and "data_batch_2" in str(e.value)
    assert not marker.exists()


# --------------------------------------------------------------------------- --set never evaluates
_CODE = ["__import__('os').system('touch {m}')", "$(touch {m})", "`touch {m}`", "{{m}}; touch {m}",
         "!!python/object/apply:os.system ['touch {m}']"]


def test_parse_override_only_parses(tmp_path: Path) -> None:
    import dataclasses

    from search.config import ConfigError, TrialConfig, parse_override

    marker = tmp_path / "pwned"
    for f in dataclasses.fields(TrialConfig):
        for code in _CODE:
            text = code.format(m=marker)
            try:
                key, value = parse_override(f"{f.name}={text}")
            except ConfigError:
                continue
            assert (key, value) == (f.name, text.strip()), "a value is kept verbatim or refused"
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_cli_set_and_space_never_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cases = [
        (["--space", f"__import__('os').system('touch {marker}')", "--dry-run"], 2),
        (["--space", "smoke", "--set", f"backbone=__import__('os').system('touch {marker}')", "--dry-run"], 2),
        (["--space", "smoke", "--set", f"epochs=__import__('os').system('touch {marker}')", "--dry-run"], 2),
        (["--space", "smoke", "--set", f"data_dir=$(touch {marker})", "--dry-run"], 0),  # any text is a path
    ]
    for args, rc in cases:
        out = subprocess.run([PY, "-m", "search.run", *args], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == rc, (args, out.stderr[-1000:])
        assert not marker.exists(), args
    assert list(cwd.iterdir()) == []


# --------------------------------------------------------------------------- cluster config
def test_ray_cluster_yaml_binds_nothing_to_all_interfaces() -> None:
    path = ROOT / "ray_cluster.yaml"
    if not path.exists():
        pytest.skip("no ray_cluster.yaml yet")
    import yaml

    cfg = yaml.safe_load(path.read_text())

    def strings(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)

    values = list(strings(cfg))  # comments are gone: only what runs or configures
    assert not [v for v in values if "0.0.0.0" in v or "--host=::" in v or "--host ::" in v]
    starts = [v for v in values if "ray start --head" in v]
    assert starts and all("--dashboard-host=127.0.0.1" in v for v in starts), starts


# --------------------------------------------------------------------------- Ray's token file
def test_ray_token_file_is_made_private_where_the_project_starts_ray(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray 2.60 writes ~/.ray/auth_token readable by all (0644), and the token is all it takes to run code on
    the cluster (issue 30). init_ray, after ray.init (local or a cluster), makes this user's token files 0600:
    ~/.ray/auth_token and RAY_AUTH_TOKEN_PATH; a symlink, a file it does not own or one not there is left alone."""
    import stat

    import ray

    from search.sweep import driver
    from search.sweep.ray_token import make_private

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token, other = home / ".ray" / "auth_token", tmp_path / "job_token"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))

    def fake_init(*_a: object, **_k: object) -> None:  # what Ray 2.60's ray.init does to the token
        for p in (token, other):
            p.write_text("t" * 64)
            p.chmod(0o644)

    import ray._private.ray_constants as ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)  # restored after
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(driver, "_runtime_env", lambda: None)
    for address in (None, "10.0.0.1:6379"):
        driver.init_ray(address, 1)
        assert {stat.S_IMODE(p.stat().st_mode) for p in (token, other)} == {0o600}, address
    link = tmp_path / "link"
    link.symlink_to(token)
    token.chmod(0o644)
    assert make_private([str(link), str(tmp_path / "missing")]) == []
    assert stat.S_IMODE(token.stat().st_mode) == 0o644  # through a symlink: left to its owner
    assert make_private([str(token)]) == [str(token)] and make_private([str(token)]) == []
