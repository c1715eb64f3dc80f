"""What a researcher sees (issue 25): the terminal of a `--quiet` sweep, its `report:` line, the Optuna study.

One tiny Optuna sweep (4 trials of 1 epoch on 64 digits, the smoke space) whose TPE (seed 0) proposes
configurations it already trained: its output is read as a user reads it, its printed report command run
from another folder, and its study read back with optuna.load_study as optuna-dashboard reads it.
"""
from __future__ import annotations

import math
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _sweeps import KILL_ARGS, _env
from ray.tune.search import Searcher

from search.config import TrialConfig
from search.sweep.tune import DedupSearcher, DefineByRun

BOILERPLATE = ("ExperimentalWarning", "UserWarning", "Configuration for experiment", "tensorboard",
               "View detailed results", "Warning:")
# Every line a --quiet sweep writes: its header, one line per finished trial, the summary with its two tables,
# where everything is. Any other line (Ray's banners and INFO lines, a library's warning) is boilerplate.
OWN_LINES = (r"sweep '\w+' \(profile \w+, \w+, code [^)]+\): \d+ trial\(s\) to run, .+",
             r"\[\d+/\d+\] [\w.-]+: \w+  .+", r"sweep '\w+' done in \d+s: .+", r"(best|worst) \d+ by test accuracy:",
             r"  width  placement  .+", r" +\d[\d.]* +\w+ +\w+ +[\d.]+ +\d+ .+",
             r"(results|tracking|report|optuna): +\S.+", r"")


def test_dry_run_table_is_aligned() -> None:
    out = subprocess.run([sys.executable, "-m", "search.run", "--space", "smoke", "--dry-run"], capture_output=True,
                         text=True, timeout=120, env=_env())
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header, rows = lines[0], [ln for ln in lines[1:] if re.match(r"^[0-9a-f]{16}  ", ln)]
    assert header.startswith("hash  ") and rows
    # every column starts where its header starts
    starts = [m.start() for m in re.finditer(r"(?<=  )\S", "  " + header)]
    for row in rows:
        padded = "  " + row
        assert all(padded[s - 1] == " " and padded[s] != " " for s in starts if s < len(padded)), (header, row)


def test_summary_table_cells_are_compact() -> None:
    from search.sweep.driver import _table

    row = dict(width=4.0, dropout_placement="pre_conv", dropout_type="bernoulli", dropout_rate=0.5, seed=2,
               test_acc=0.98123, test_acc_reest=0.9875, mean_shift=16.2142, max_shift=140.4139)
    head, line = _table([row])
    assert head.split() == ["width", "placement", "type", "rate", "seed", "test_acc", "acc_reest", "mean_shift",
                            "max_shift"]
    assert line.split() == ["4", "pre_conv", "bernoulli", "0.5", "2", "0.9812", "0.9875", "16.214", "140.414"]
    assert len(head) == len(line) <= 100


def _study_trials(db: Path) -> tuple[Any, list[Any]]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = optuna.get_all_study_names(storage=f"sqlite:///{db}")
    assert len(names) == 1, names
    study = optuna.load_study(study_name=names[0], storage=f"sqlite:///{db}")
    return study, study.trials


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quiet_optuna_sweep_prints_no_boilerplate_and_tells_optuna_what_each_trial_is(tmp_path: Path) -> None:
    import optuna

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    args = [*KILL_ARGS, "--algo", "optuna", "--samples", "4", "--storage", "res", "--tracking-uri",
            "sqlite:///track.db"]
    out = subprocess.run([sys.executable, "-m", "search.run", *args], cwd=work, capture_output=True, text=True,
                         timeout=800, env=_env())  # the full report (figures), as a user's sweep attaches it
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]

    # ---- the terminal: lines only, no library boilerplate or warnings, tables within 100 columns
    for word in BOILERPLATE:
        assert word.lower() not in log.lower(), (word, log[-3000:])
    alien = [ln for ln in log.splitlines() if not any(re.fullmatch(p, ln) for p in OWN_LINES)]
    assert not alien, alien
    assert sum(bool(re.fullmatch(OWN_LINES[1], ln)) for ln in out.stdout.splitlines()) == 4  # one per trial
    tables = re.findall(r"^(?:best|worst) \d+ by test accuracy:\n((?:  .*\n)+)", out.stdout, re.M)
    assert len(tables) == 2, out.stdout
    for t in tables:
        lines = t.splitlines()
        assert lines[0].split()[:4] == ["width", "placement", "type", "rate"]
        assert all(len(ln) <= 100 for ln in lines), t
        assert all(ln.split()[0] == "1" for ln in lines[1:]), t  # width 1, not 1.0000

    # ---- the report line works as printed from another folder (absolute --storage and --tracking-uri)
    report = next(ln for ln in out.stdout.splitlines() if ln.startswith("report:"))
    cmd = shlex.split(report.split(":", 1)[1])
    assert cmd[:3] == ["python", "-m", "analysis.report"] and "--storage" in cmd and "--tracking-uri" in cmd, cmd
    assert cmd[cmd.index("--storage") + 1] == str(work / "res")
    assert cmd[cmd.index("--tracking-uri") + 1] == f"sqlite:///{work / 'track.db'}"
    rep = subprocess.run([sys.executable, *cmd[1:], "--no-figures", "--n-boot", "100"], cwd=elsewhere,
                         capture_output=True, text=True, timeout=300, env=_env())
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert (elsewhere / "reports" / "smoke" / "report.md").exists()
    # the old name of the flag still works
    rep = subprocess.run([sys.executable, "-m", "analysis.report", "--space", "smoke", "--root", str(work / "res"),
                          "--no-figures", "--n-boot", "100", "--out", str(tmp_path / "rep2")], cwd=elsewhere,
                         capture_output=True, text=True, timeout=300, env=_env())
    assert rep.returncode == 0, rep.stdout + rep.stderr

    # ---- the Optuna study: every COMPLETE trial names its MLflow run; repeated proposals are marked
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'track.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id], "tags.run_kind = 'trial'")}
    assert len(runs) == 4
    _check_mlflow_views(client, exp.experiment_id, list(runs.values()), tmp_path / "artifacts")
    study, trials = _study_trials(work / "res" / "smoke" / "optuna.db")
    assert study.user_attrs["space"] == "smoke" and study.user_attrs["profile"] == "quick"
    assert study.user_attrs["mlflow_experiment"] == "smoke"
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) > 4, "TPE (seed 0) repeats a configuration within 4 trained ones: the test needs a repeat"
    trained, repeats = [], []
    for t in done:
        rid = t.user_attrs.get("mlflow_run_id")
        assert rid in runs, (t.number, t.user_attrs)
        run = runs[rid]
        assert t.value == pytest.approx(run.data.metrics["test_acc"])
        (repeats if "reused_from" in t.user_attrs else trained).append(t)
        for v in t.params.values():  # rates as the space declares them (steps of 0.05)
            if isinstance(v, float):
                assert v == round(v, 2), t.params
    # each trained configuration is one unmarked trial; every repeat says which run and trial it reuses
    assert sorted(t.user_attrs["mlflow_run_id"] for t in trained) == sorted(runs)
    assert repeats
    numbers = {t.number for t in trained}
    for t in repeats:
        assert t.user_attrs["reused_from"] == t.user_attrs["mlflow_run_id"]
        assert t.user_attrs["duplicate_of"] in numbers, t.user_attrs


def test_a_repeated_proposal_is_marked_with_the_run_it_reuses() -> None:
    """No training: OptunaSearch over the smoke space, the searcher told run ids as the tracking callback does."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from search.sweep.sampler import StepRoundingTPE

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    inner = OptunaSearch(space=DefineByRun("smoke", "quick", {}), metric="test_acc", mode="max",
                         sampler=StepRoundingTPE(seed=0))
    earlier = {"0" * 16: "run-earlier"}
    s = DedupSearcher(inner, metric="test_acc", mode="max", run_ids=earlier, known={"0" * 16: 0.5})
    runs: dict[str, str] = {}
    for i in range(12):
        cfg = s.suggest(f"t{i}")
        if cfg == Searcher.FINISHED:
            break
        h = TrialConfig.from_dict(cfg).config_hash
        runs[h] = f"run-{i}"
        s.link(h, runs[h])
        s.on_trial_complete(f"t{i}", {"test_acc": int(h[:6], 16) / 16**6})
    trials = [t for t in inner._ot_study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) > len(runs)
    by_number = {t.number: t for t in trials}
    for t in trials:
        h = t.user_attrs["config_hash"]
        assert t.user_attrs["mlflow_run_id"] == runs[h] and t.user_attrs["mlflow_run_ids"] == [runs[h]]
        if "reused_from" in t.user_attrs:
            first = by_number[t.user_attrs["duplicate_of"]]
            assert first.user_attrs["config_hash"] == h and "reused_from" not in first.user_attrs
            assert first.number < t.number
        rate = t.params.get("dropout_rate")
        assert rate is None or (rate == round(rate, 2) and math.isfinite(rate)), t.params
    assert sum("reused_from" in t.user_attrs for t in trials) == len(trials) - len(runs)


def _check_mlflow_views(client: Any, experiment_id: str, runs: list[Any], dst: Path) -> None:
    """What the MLflow UI shows, read through a stock MlflowClient: an experiment of model training (not GenAI),
    the sweep's report as one HTML page with its figures embedded, ISO 8601 times, run names that lead with what
    differs, 200 dpi layer previews."""
    import datetime as dt

    from PIL import Image

    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = client.search_runs([experiment_id], "tags.run_kind = 'sweep'")
    assert "report/report.html" in [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    page = Path(client.download_artifacts(parent.info.run_id, "report/report.html", str(dst))).read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and "<h2>" in page
    assert page.count('src="data:image/png;base64,') >= 3 and 'src="figures/' not in page
    for r in runs:
        start, end = (dt.datetime.fromisoformat(r.data.tags[k]) for k in ("started_at", "ended_at"))
        assert start.tzinfo is not None and start <= end, r.data.tags
        p = r.data.params
        lead = p["dropout_placement"] + ("" if p["dropout_placement"] == "none" else
                                         f"-{p['dropout_type']}-{float(p['dropout_rate']):g}")
        assert r.info.run_name == f"{lead}-w{float(p['width']):g}-s{p['seed']}-{p['backbone']}-d{p['depth']}"
    png = client.download_artifacts(runs[0].info.run_id, "shift_by_layer.png", str(dst / "trial"))
    with Image.open(png) as im:
        assert im.size == (960, 560) and round(im.info["dpi"][0]) == 200, (im.size, im.info.get("dpi"))


def test_report_html_embeds_figures_and_renders_the_markdown(tmp_path: Path) -> None:
    from analysis.html import markdown_to_html

    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    md = ("# Title\n\nText with `code <x>` and **bold**.\n\n| a | b \\| c |\n|---|---|\n| 1 | 2 |\n\n"
          "- one\n- two\n\n> **Warning.** careful\n\n![A & B](figures/a.png)\n\n*A & B* ([PDF](figures/a.pdf))\n")
    page = markdown_to_html(md, str(tmp_path), "t")
    assert "<h1>Title</h1>" in page and "<code>code &lt;x&gt;</code>" in page and "<strong>bold</strong>" in page
    assert "<th>b | c</th>" in page and "<td>2</td>" in page and "<li>two</li>" in page
    assert "<blockquote><strong>Warning.</strong> careful</blockquote>" in page
    assert '<img src="data:image/png;base64,iVBORw0KGgpmYWtl" alt="A &amp; B">' in page
    assert '<em>A &amp; B</em> (<a href="figures/a.pdf">PDF</a>)' in page


def test_the_summary_tells_a_schedule_apart_within_100_columns() -> None:
    """The end-of-sweep best/worst tables: early dropout never reads as dropout for the whole run."""
    from search.sweep.driver import _table

    base = dict(width=1.0, dropout_type="bernoulli", dropout_rate=0.2, seed=3, test_acc=0.8312, test_acc_reest=0.8401,
                mean_shift=1.1, max_shift=1.3)
    rows = [dict(base, dropout_placement="post_conv", dropout_schedule="early", dropout_cutoff=2.0,
                 dropout_decay="linear"),
            dict(base, dropout_placement="pre_conv", dropout_schedule="late", dropout_cutoff=2.5),
            dict(base, dropout_placement="pre_conv")]
    head, *lines = _table(rows, schedules=True)
    assert head.split() == ["width", "placement", "type", "rate", "schedule", "seed", "test_acc", "acc_reest",
                            "mean_shift", "max_shift"]
    assert [ln.split()[4] for ln in lines] == ["early2-lin", "late2.5", "-"]
    assert all(len(ln) <= 100 for ln in [head, *lines])
    assert "schedule" not in _table(rows[2:])[0]  # a sweep without schedules keeps its table
