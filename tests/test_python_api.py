"""The notebook API (issue 25): load_study's profile choice and error names, sweep and algorithm columns,
`bn_name` across placements, and docs/python-api.md's examples run as written after a tiny sweep."""
from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from _sweeps import KILL_ARGS, ROOT, _env
from test_analysis_fit import planted_study, write_study

from analysis.load import load_study


def _put(t: pa.Table, name: str, values) -> pa.Table:
    return t.set_column(t.schema.get_field_index(name), name, pa.array(values, t.schema.field(name).type))


def _two_profiles(root: Path) -> None:
    """quick (two sweeps: grid, then optuna) and, two days later, fashion: one space's folder."""
    trials, layers = planted_study(placements=("none", "pre_bn"), widths=(1.0,), seeds=(0, 1), n_layers=4)
    n = trials.num_rows
    trials = _put(_put(trials, "algo", ["grid"] * (n // 2) + ["optuna"] * (n - n // 2)), "sweep_id",
                  ["sweep-a"] * (n // 2) + ["sweep-b"] * (n - n // 2))
    later = _put(_put(trials, "profile", ["fashion"] * n), "run_id", [f"f-{r}" for r in trials.column("run_id")
                                                                      .to_pylist()])
    later = _put(later, "finished_at", pc.add(later.column("finished_at"), pa.scalar(dt.timedelta(days=2))))
    later = _put(_put(later, "sweep_id", ["sweep-c"] * n), "algo", ["grid"] * n)
    later = _put(later, "config_hash", [f"f-{h}" for h in later.column("config_hash").to_pylist()])
    later_layers = _put(layers, "run_id", [f"f-{r}" for r in layers.column("run_id").to_pylist()])
    later_layers = _put(later_layers, "config_hash", [f"f-{h}" for h in layers.column("config_hash").to_pylist()])
    write_study(str(root), pa.concat_tables([trials, later]), pa.concat_tables([layers, later_layers]))


def test_profile_is_the_latest_by_default_and_says_so(tmp_path: Path) -> None:
    _two_profiles(tmp_path)
    latest = load_study("planted", root=str(tmp_path))
    assert set(latest.trials.column("profile").to_pylist()) == {"fashion"}
    assert "planted fashion (the latest sweep's; not pooled with planted/quick" in latest.selection
    assert "profile=NAME or profile='all'" in latest.selection  # Python's names, not the CLI's
    quick = load_study("planted", root=str(tmp_path), profile="quick")
    assert set(quick.trials.column("profile").to_pylist()) == {"quick"}
    assert set(quick.layers.column("run_id").to_pylist()) == set(quick.trials.column("run_id").to_pylist())
    pooled = load_study("planted", root=str(tmp_path), profile="all")
    assert pooled.trials.num_rows == quick.trials.num_rows + latest.trials.num_rows
    with pytest.raises(ValueError, match=r"^profile='paper': no trials of that profile .*or profile='all'\)$"):
        load_study("planted", root=str(tmp_path), profile="paper")


def test_sweeps_and_algorithms_tell_trials_apart(tmp_path: Path) -> None:
    _two_profiles(tmp_path)
    quick = load_study("planted", root=str(tmp_path), profile="quick")
    sweeps = quick.sweeps().to_pylist()
    assert [(s["algo"], s["sweep_id"]) for s in sweeps] == [("grid", "sweep-a"), ("optuna", "sweep-b")]
    assert sum(s["trials"] for s in sweeps) == quick.trials.num_rows
    opt = quick.where(algo="optuna")
    assert set(opt.trials.column("sweep_id").to_pylist()) == {"sweep-b"} and opt.layers.num_rows
    assert set(opt.layers.column("run_id").to_pylist()) == set(opt.trials.column("run_id").to_pylist())
    with pytest.raises(ValueError, match="no such trials column"):
        quick.where(algorithm="grid")


def test_errors_name_the_keyword_in_python_and_the_flag_in_the_report(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as e:
        load_study("smoke", root=str(tmp_path))
    assert "root=..." in str(e.value) and "tracking_uri=..." in str(e.value) and "--tracking-uri" not in str(e.value)
    out = subprocess.run([sys.executable, "-m", "analysis.report", "--space", "smoke", "--storage", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert out.returncode == 2
    assert "as --storage" in out.stderr and "pass --tracking-uri" in out.stderr and "root=" not in out.stderr


def test_bn_name_is_the_same_layer_under_every_placement() -> None:
    from search.config import TrialConfig
    from search.trial.models.build import build_model
    from search.trial.probes import own_name
    from torch.nn.modules.batchnorm import _BatchNorm

    base = dict(backbone="cifar_wrn", depth=10, dataset="digits", image_size=8, in_chans=1)
    names = {}
    for placement in ("none", "pre_bn", "pre_conv"):
        cfg = TrialConfig.from_dict({**base, "dropout_placement": placement, "dropout_type": "bernoulli",
                                     "dropout_rate": 0.0 if placement == "none" else 0.5})
        model = build_model(cfg)  # with its placement's dropout
        paths = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
        names[placement] = (paths, [own_name(model, p) for p in paths])
    assert any(p.endswith(".1") for p in names["pre_bn"][0])  # the wrapper renames the BN it feeds
    assert names["pre_bn"][1] == names["none"][1] == names["pre_conv"][1] == names["none"][0]


def test_bn_name_filled_for_rows_written_before_it(tmp_path: Path) -> None:
    trials, layers = planted_study(placements=("none", "pre_bn"), widths=(1.0,), seeds=(0,), n_layers=4)
    pre = pc.equal(layers.column("dropout_placement"), "pre_bn")
    fed = pc.fill_null(layers.column("fed_by_dropout"), False)
    name = pc.if_else(pc.and_(pre, fed), pc.binary_join_element_wise(layers.column("name"), ".1", ""),
                      layers.column("name"))
    layers = _put(layers.drop_columns(["bn_name"]) if "bn_name" in layers.schema.names else layers, "name",
                  name.to_pylist())
    write_study(str(tmp_path), trials, layers)
    got = load_study("planted", root=str(tmp_path)).layers
    by = {}
    for r in got.select(["dropout_placement", "index", "name", "bn_name"]).to_pylist():
        by.setdefault(r["index"], {})[r["dropout_placement"]] = (r["name"], r["bn_name"])
    assert any(n.endswith(".1") for v in by.values() for n, _ in v.values())
    for v in by.values():
        assert len({b for _, b in v.values()}) == 1, v  # one key per layer across placements


def _code_blocks(md: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", md, re.S)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_python_api_examples_run_after_a_tiny_sweep(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "search.run", *KILL_ARGS], cwd=tmp_path, capture_output=True,
                         text=True, timeout=800, env=_env(DBN_SWEEP_REPORT="off"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    blocks = _code_blocks((ROOT / "docs" / "python-api.md").read_text())
    assert len(blocks) >= 6
    code = "\n".join(blocks)
    script = tmp_path / "api.py"
    script.write_text(code)
    env = _env()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "Profile: smoke quick (the latest sweep's)." in run.stdout
    assert "body.0.0.bn2 " in run.stdout and "body.0.0.bn2.1" not in run.stdout  # the pivot by bn_name
    study = load_study("smoke", root=str(tmp_path / "results"))
    ids = set(study.trials.column("sweep_id").to_pylist())
    assert len(ids) == 1 and None not in ids and study.trials.column("algo").to_pylist() == ["grid"] * 4
    pre = study.layers.filter(pc.equal(study.layers.column("dropout_placement"), "pre_bn")).to_pylist()
    assert any(r["name"].endswith(".1") and r["bn_name"] == r["name"][:-2] for r in pre)
