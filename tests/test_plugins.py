"""Plugins (search/plugins.py): loading, identity in the configuration hash, one-line errors, Ray workers.

The end-to-end test writes the tutorial's plugin (examples/plugin_spatial.py) into a temporary
folder outside the package, runs a 2-trial sweep with `--plugin` on a local Ray, and reads the
runs back from MLflow and Parquet with the plugin's names.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from search import plugins, registry
from search.config import TrialConfig
from search.sweep import cli
from spaces import get_space

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin_spatial.py"
PY = sys.executable


@pytest.fixture
def clean():
    """Unload every plugin a test loaded, so the registry is the built-ins again."""
    before = set(plugins._LOADED)
    yield
    for name in set(plugins._LOADED) - before:
        plugins.unload(name)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(text)
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------ loading
def test_plugin_registers_its_names_and_its_identity_enters_the_hash(tmp_path: Path, clean: None) -> None:
    path = write(tmp_path, "myplug", EXAMPLE.read_text())
    p = plugins.load_plugin(str(path))
    assert set(p.registered) == {("dropout", "spatial"), ("placement", "post_stem"), ("space", "spatial_pool")}
    import hashlib

    assert p.identity == "myplug:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    grid = get_space("spatial_pool").grid("tiny")
    cfgs = [TrialConfig.from_dict(c) for c in grid]
    assert {c.plugins for c in cfgs} == {p.identity}
    # A trial using only built-in names carries no plugin identity, so its hash is what it always was.
    assert TrialConfig(dropout_placement="pre_bn", dropout_rate=0.5).plugins is None
    # The identity is a hashed field: the same trial without it hashes differently.
    assert cfgs[0].config_hash != TrialConfig.from_dict({**grid[0], "plugins": "other:0"}).config_hash
    assert plugins.load_plugin(str(path)) is p  # loading the same file again is a no-op


def test_editing_the_plugin_source_changes_the_config_hashes(tmp_path: Path, clean: None) -> None:
    path = write(tmp_path, "myplug", EXAMPLE.read_text())
    plugins.load_plugin(str(path))
    before = sorted(TrialConfig.from_dict(c).config_hash for c in get_space("spatial_pool").grid("tiny"))
    plugins.unload("myplug")
    path.write_text(EXAMPLE.read_text().replace("keep = 1.0 - self.rate", "keep = 1.0 - self.rate  # edited"))
    plugins.load_plugin(str(path))
    after = sorted(TrialConfig.from_dict(c).config_hash for c in get_space("spatial_pool").grid("tiny"))
    assert len(after) == 2 and not set(before) & set(after)


def test_builtin_hashes_are_unchanged() -> None:
    from _pinned import as_pinned  # paper_cifar/paper on its old recipe (issue 29)

    pinned = json.loads((ROOT / "tests" / "data" / "config_hashes.json").read_text())
    for key, hashes in pinned.items():
        space, profile = key.split("/")
        got = sorted(TrialConfig.from_dict(as_pinned(key, c)).config_hash for c in get_space(space).grid(profile))
        assert got == sorted(hashes), key


def test_space_file_shorthand_and_dry_run_import_no_torch(tmp_path: Path) -> None:
    path = write(tmp_path, "myplug", EXAMPLE.read_text())
    code = ("import sys; from search.sweep.cli import main; rc = main(sys.argv[1:]); "
            "bad = [m for m in ('torch', 'timm') if m in sys.modules]; print('HEAVY', bad); sys.exit(rc)")
    out = subprocess.run([PY, "-c", code, "--space", f"{path}:spatial_pool", "--profile", "tiny", "--dry-run"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout and "2 trials (spatial_pool, profile tiny" in out.stdout
    assert "pre_pool" in out.stdout and "spatial" in out.stdout


# ------------------------------------------------------------------ bad plugins: one line, exit 2
@pytest.mark.parametrize("case", ["missing", "syntax", "raises", "twice_builtin", "twice_between", "contract"])
def test_bad_plugins_get_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture, clean: None) -> None:
    kinds_before = registry.names("dropout")
    head = "from search import DropoutKind, register_dropout\n"
    args = ["--space", "smoke", "--plugin"]
    if case == "missing":
        argv, want = args + [str(tmp_path / "nope.py")], "nope.py': no such file"
    elif case == "syntax":
        p = write(tmp_path, "bad_syntax", head + "def broken(:\n")
        argv, want = args + [str(p)], "import failed: bad_syntax.py:2: SyntaxError"
    elif case == "raises":
        p = write(tmp_path, "bad_raises", head + "\n\nraise RuntimeError('no GPU here')\n")
        argv, want = args + [str(p)], "import failed: bad_raises.py:4: RuntimeError: no GPU here"
    elif case == "twice_builtin":
        p = write(tmp_path, "bad_twice", head + "@register_dropout('bernoulli')\nclass K(DropoutKind):\n    pass\n")
        argv, want = args + [str(p)], "dropout 'bernoulli' is registered twice (first by search.trial.dropout.kinds"
    elif case == "twice_between":
        src = head + ("@register_dropout('mine')\nclass K(DropoutKind):\n    closed_form = None\n"
                      "    def noise(self, x):\n        return x * 0 + 1\n")
        a, b = write(tmp_path, "plug_a", src), write(tmp_path, "plug_b", src)
        argv, want = args + [str(a), "--plugin", str(b)], "dropout 'mine' is registered twice (first by plug_a"
    else:  # the multiplier's mean is 0.5, not 1
        src = head + ("@register_dropout('halved')\nclass Halved(DropoutKind):\n    def noise(self, x):\n"
                      "        import torch\n        return torch.full_like(x, 0.5)\n")
        p = write(tmp_path, "bad_kind", src)
        argv, want = args + [str(p)], "dropout kind 'halved' fails its contract: 'halved' at rate 0.2: train-mode mean"
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert want in err, err
    if case != "twice_between":  # plug_a itself was fine and stays loaded
        assert registry.names("dropout") == kinds_before  # nothing of a bad plugin stays registered


def test_dry_run_skips_the_contract_and_a_run_does_not(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       clean: None) -> None:
    src = ("from search import DropoutKind, register_dropout\n@register_dropout('halved')\n"
           "class Halved(DropoutKind):\n    def noise(self, x):\n        import torch\n"
           "        return torch.full_like(x, 0.5)\n")
    p = write(tmp_path, "bad_kind2", src)
    rc, out, _ = run_cli(["--space", "smoke", "--plugin", str(p), "--set", "dropout_type=halved", "--dry-run"],
                         capsys)
    assert rc == 0 and "halved" in out


# ------------------------------------------------------------------ Ray workers
def test_runtime_env_carries_the_source_to_a_worker_without_the_file(tmp_path: Path, clean: None) -> None:
    path = write(tmp_path, "myplug", EXAMPLE.read_text())
    p = plugins.load_plugin(str(path))
    env = plugins.runtime_env()
    assert env["worker_process_setup_hook"] == "search.plugins.setup_worker"
    path.unlink()  # a worker on another machine has no copy of the file
    code = ("from search import plugins, registry; from search.config import TrialConfig; plugins.setup_worker();"
            "c = TrialConfig(dropout_type='spatial', dropout_placement='pre_pool', dropout_rate=0.3);"
            "print(registry.names('dropout'), c.plugins)")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env["env_vars"]}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "'spatial')" in out.stdout and p.identity in out.stdout


def test_a_plugin_a_worker_cannot_import_is_kept_as_the_trials_error(tmp_path: Path, clean: None) -> None:
    """setup_worker (Ray's worker_process_setup_hook) does not raise: Ray would only say "The actor never ran";
    the plugin's one-line error is kept and raise_worker_error (the trainable's first call) raises it."""
    work = tmp_path / "driver"
    work.mkdir()
    write(work, "plughelper", "VALUE = 1\n")
    path = write(work, "needshelper", "import plughelper  # beside the plugin: the driver's cwd only\n")
    sys.path.insert(0, str(work))
    try:
        plugins.load_plugin(str(path))
        env = plugins.runtime_env()
    finally:
        sys.path.remove(str(work))
        sys.modules.pop("plughelper", None)
    code = ("from search import plugins; plugins.setup_worker(); print('setup returned', flush=True); "
            "plugins.raise_worker_error()")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env["env_vars"]}, cwd=tmp_path)  # a worker: no plughelper here
    assert "setup returned" in out.stdout and out.returncode == 1, (out.stdout, out.stderr[-2000:])
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("search.plugins.PluginError: --plugin "), last
    assert "import failed: needshelper.py:1: ModuleNotFoundError: No module named 'plughelper'" in last, last
    assert "on the Ray worker at" in last and "importable on every node" in last, last


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sweep_whose_plugin_fails_to_import_on_workers_names_the_import_error(tmp_path: Path) -> None:
    """A plugin importing a module only the driver has (beside it in the driver's working directory): every
    trial fails, and the failed trial's line, its MLflow run's error and the sweep's last line name the plugin
    and its import error, not "The actor never ran - it was cancelled before it started running" (issue 30).
    Each trial is one FAILED run and one Parquet row, retries included."""
    from _sweeps import _dataset, _env, _runs, _sweep

    write(tmp_path, "plughelper", "VALUE = 1\n")
    write(tmp_path, "needshelper", "import plughelper  # beside the plugin: the driver's cwd only\n")
    args = ["--space", "smoke", "--set", "dropout_placement=none", "--set", "dropout_type=bernoulli", "--set",
            "dropout_rate=0", "--set", "epochs=1", "--set", "train_samples=64", "--num-cpus", "2", "--quiet",
            "--plugin", "./needshelper.py"]
    rc, log = _sweep(tmp_path, args, env=_env(DBN_SWEEP_REPORT="off"))
    assert rc == 1, (rc, log[-3000:])
    cause = "import failed: needshelper.py:1: ModuleNotFoundError: No module named 'plughelper'"
    errors = [ln for ln in log.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: every trial of this sweep failed (1 failed; first: "
                                                     "search.plugins.PluginError: --plugin "), errors
    assert cause in errors[0], errors[0]
    assert any(ln.startswith("[1/1] ") and "FAILED: search.plugins.PluginError" in ln and cause in ln
               for ln in log.splitlines()), log[-3000:]
    assert "The actor never ran" not in log
    runs = [r for r in _runs(tmp_path) if "config_hash" in r.data.tags]
    assert [r.info.status for r in runs] == ["FAILED"] and cause in runs[0].data.tags["error"]
    trials = _dataset(tmp_path / "results", "trials")
    assert trials.column("status").to_pylist() == ["failed"] and cause in trials.column("error")[0].as_py()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_trial_sweep_with_a_plugin_on_local_ray(tmp_path: Path, clean: None) -> None:
    folder = tmp_path / "elsewhere"  # outside the package: only --plugin finds it
    folder.mkdir()
    path = write(folder, "myplug", EXAMPLE.read_text())
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([PY, "-m", "search.run", "--plugin", str(path), "--space", "spatial_pool", "--profile",
                          "tiny", "--num-cpus", "2", "--quiet"], cwd=work, capture_output=True, text=True,
                         timeout=540, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    p = plugins.load_plugin(str(path))
    want = {TrialConfig.from_dict(c).config_hash: c for c in get_space("spatial_pool").grid("tiny")}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("spatial_pool")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("run_kind") != "sweep"]
    assert len(runs) == 2
    assert {r.data.tags["config_hash"] for r in runs} == set(want)
    assert {r.data.params["dropout_placement"] for r in runs} == {"pre_bn", "pre_pool"}
    assert {r.data.params["dropout_type"] for r in runs} == {"spatial"}
    assert {r.data.params["plugins"] for r in runs} == {p.identity}
    assert {r.data.tags["status"] for r in runs} == {"ok"}

    trials = ds.dataset(str(work / "results" / "spatial_pool" / "trials"), format="parquet").to_table().to_pylist()
    assert {t["config_hash"] for t in trials} == set(want)
    assert {(t["dropout_type"], t["dropout_placement"], t["plugins"]) for t in trials} == {
        ("spatial", "pre_bn", p.identity), ("spatial", "pre_pool", p.identity)}
    layers = ds.dataset(str(work / "results" / "spatial_pool" / "layers"), format="parquet").to_table()
    fed = {(r["dropout_placement"], r["fed_by_dropout"]) for r in layers.to_pylist()}
    assert ("pre_bn", True) in fed and ("pre_pool", True) not in fed  # pre_pool feeds no BN

    rep = subprocess.run([PY, "-m", "analysis.report", "--plugin", str(path), "--space", "spatial_pool",
                          "--no-figures", "--n-boot", "100"], cwd=work, capture_output=True, text=True, timeout=300,
                         env=env)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert "spatial" in (work / "reports" / "spatial_pool" / "report.md").read_text()

    # Editing the plugin changes every hash, so nothing is reused from the old plugin.
    path.write_text(path.read_text() + "\n# edited\n")
    dry = subprocess.run([PY, "-m", "search.run", "--plugin", str(path), "--space", "spatial_pool", "--profile",
                          "tiny", "--dry-run"], cwd=work, capture_output=True, text=True, timeout=120, env=env)
    assert dry.returncode == 0, dry.stderr
    printed = {line.split()[0] for line in dry.stdout.splitlines()[1:-1]}
    assert len(printed) == 2 and not printed & set(want)


# ------------------------------------------------------------------ the tutorial's plugin passes the contracts
@pytest.mark.usefixtures("no_onednn")
def test_tutorial_plugin_passes_every_contract(tmp_path: Path, clean: None) -> None:
    from search import contracts

    plugins.load_plugin(str(write(tmp_path, "myplug", EXAMPLE.read_text())))
    contracts.check_dropout("spatial")
    for family in registry.names("backbone"):
        assert len(contracts.check_placement("pre_pool", family, kind="spatial")) == 1  # built in, its kind with it
        assert len(contracts.check_placement("post_stem", family, kind="spatial")) == 1
    # Declared without a closed form: its masks are shared per channel, which the element-wise check rejects.
    assert registry.get("dropout", "spatial").meta["closed_form"] is None


def test_a_module_plugin_is_imported_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean: None) -> None:
    write(tmp_path, "lab_kinds", "from search import DropoutKind, register_dropout\n"
                                 "@register_dropout('lab')\nclass Lab(DropoutKind):\n    closed_form = None\n"
                                 "    def noise(self, x):\n        return x * 0 + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = plugins.load_plugin("lab_kinds")
    assert p.registered == (("dropout", "lab"),) and p.identity.startswith("lab_kinds:")
    assert TrialConfig(dropout_type="lab", dropout_placement="pre_bn", dropout_rate=0.1).plugins == p.identity
    with pytest.raises(plugins.PluginError, match="'no_such_mod': no such file, nor an importable module"):
        plugins.load_plugin("no_such_mod")


BACKBONE_SRC = '''
from search import register_backbone


@register_backbone("tiny_convnet")
def tiny_convnet(*, depth, width, num_classes, in_chans):
    from torch import nn

    c = max(4, int(8 * width))
    return nn.Sequential(nn.Conv2d(in_chans, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, {out}))
'''


@pytest.mark.parametrize("broken", [False, True])
def test_a_plugin_backbone_is_contract_checked(broken: bool, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               clean: None) -> None:
    path = write(tmp_path, "tiny_bb", BACKBONE_SRC.replace("{out}", "3" if broken else "num_classes"))
    argv = ["--plugin", str(path), "--space", "smoke", "--set", "backbone=tiny_convnet", "--set", "depth=none",
            "--set", "dropout_placement=head", "--storage", str(tmp_path / "r"), "--tracking-uri",
            f"sqlite:///{tmp_path / 'm.db'}", "--address", "127.0.0.1:1"]  # refused before any sweep starts
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    if broken:
        assert "backbone 'tiny_convnet' fails its contract: backbone 'tiny_convnet': output shape (2, 3)" in err
        assert "tiny_convnet" not in registry.names("backbone")
    else:  # the contract passed; the run stops later, at the unreachable cluster
        assert "--address '127.0.0.1:1'" in err, err
        cfg = TrialConfig(backbone="tiny_convnet", dropout_placement="head", dropout_rate=0.5)
        assert cfg.plugins == plugins.owner("backbone", "tiny_convnet").identity
