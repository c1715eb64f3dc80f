"""analysis.report on a planted study: files, images, tables, LaTeX, and the CLI's errors."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pyarrow as pa
import pytest

from test_analysis_fit import critical_cost, planted_study, write_study

FIGURES = ("shift_by_layer_bernoulli", "shift_vs_dim", "accuracy_vs_width", "bn_reestimation")
PLACEMENTS = ("none", "pre_bn", "head")
WIDTHS = (1.0, 2.0, 4.0)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> str:
    from analysis.report import main

    root = tmp_path_factory.mktemp("results")
    trials, layers = planted_study(placements=PLACEMENTS, widths=WIDTHS, seeds=(0, 1, 2), n_layers=4,
                                   cost=critical_cost(2.0), reest_per_shift=0.3)
    write_study(str(root), trials, layers, parts=2)
    out = str(tmp_path_factory.mktemp("out") / "planted")
    assert main(["--space", "planted", "--root", str(root), "--out", out, "--n-boot", "200"]) == 0
    return out


def _md_table(md: str, title: str) -> list[str]:
    """The body rows of the Markdown table under the bold title."""
    lines = md.splitlines()
    start = lines.index(f"**{title}**")
    rows = []
    for line in lines[start + 4:]:  # title, blank, header, separator
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_files_and_images(report: str) -> None:
    from PIL import Image

    assert os.path.getsize(os.path.join(report, "report.md")) > 0
    assert os.path.getsize(os.path.join(report, "report.tex")) > 0
    for stem in FIGURES:
        png, pdf = (os.path.join(report, "figures", f"{stem}.{ext}") for ext in ("png", "pdf"))
        with open(png, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", png
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
        with open(pdf, "rb") as fh:
            assert fh.read(5) == b"%PDF-"
    # Written atomically (beside the target, then renamed): no temporary file is left behind.
    left = [f for _, _, files in os.walk(report) for f in files if f.endswith(".tmp")]
    assert not left, left


def test_markdown_content(report: str) -> None:
    md = open(os.path.join(report, "report.md"), encoding="utf-8").read()
    configs = _md_table(md, "Configurations (one row per configuration; seeds are replicates)")
    assert len(configs) == len(PLACEMENTS) * len(WIDTHS)
    assert len(_md_table(md, "Accuracy cost of dropout vs no dropout (placement none) at each width")) == 2 * 3
    assert len(_md_table(md, "Smallest width from which on dropout does not hurt accuracy")) == 2
    assert len(_md_table(md, "BN re-estimation per configuration: test accuracy before and after")) == 9
    shift = _md_table(md, "Variance shift vs feature dimension: log(shift - 1) = a + b log d")
    assert len(shift) == 1 and "| pre_bn |" in shift[0]  # head feeds no BN layer
    for stem in FIGURES:
        assert f"(figures/{stem}.png)" in md
    assert "PAPER (Li et al. 2019)" in md and "secondary summaries" in md and "8.70" in md
    assert "accuracy is no longer detectably below no-dropout from width 2 on" in md


def test_tex_is_escaped_and_balanced(report: str) -> None:
    tex = open(os.path.join(report, "report.tex"), encoding="utf-8").read()
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    body = re.sub(r"\\includegraphics\[[^]]*\]\{[^}]*\}", "", body)  # file names are paths, not text
    # (a % that ends a line is LaTeX's own end-of-line comment, after \\resizebox{...}{!}{)
    assert not re.search(r"(?<!\\)([_#]|%(?!$))", body, re.M), "unescaped LaTeX special"
    assert len(re.findall(r"(?<!\\)\$", body)) % 2 == 0, "unbalanced math mode"  # compiled in test_latex.py
    from analysis.report import tex_escape

    assert tex_escape("a_b%c&d#e$f{g}~^\\") == (r"a\_b\%c\&d\#e\$f\{g\}\textasciitilde{}"
                                               r"\textasciicircum{}\textbackslash{}")
    assert body.count("\\begin{table}") == body.count("\\end{table}") > 5
    assert "\\toprule" in body and "\\midrule" in body and "\\bottomrule" in body
    depth = 0
    for ch in re.sub(r"\\[{}]", "", body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0


def test_cli_unknown_or_empty_space_exits_2_and_writes_nothing(tmp_path, capsys) -> None:
    from analysis.report import main

    (tmp_path / "results" / "empty" / "trials").mkdir(parents=True)
    out = tmp_path / "out-empty"
    assert main(["--space", "empty", "--root", str(tmp_path / "results"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "space 'empty'" in err[0] and "search.run --space empty" in err[0]
    assert not out.exists()
    # The real command line once: exit status, one line, no traceback.
    out = tmp_path / "out-nope"
    proc = subprocess.run([sys.executable, "-m", "analysis.report", "--space", "nope", "--root",
                           str(tmp_path / "results"), "--out", str(out)], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "space 'nope'" in lines[0]
    assert not out.exists()


def test_partial_study_names_what_is_missing(tmp_path) -> None:
    from analysis.report import main

    trials, layers = planted_study(placements=("pre_bn",), widths=(1.0, 2.0), seeds=(0, 1), n_layers=4)
    write_study(str(tmp_path / "results"), trials, layers)
    out = tmp_path / "out"
    assert main(["--space", "planted", "--root", str(tmp_path / "results"), "--out", str(out), "--no-figures",
                 "--n-boot", "100"]) == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "no trials with placement none: accuracy cost not computed" in md
    assert "**Accuracy cost of dropout vs no dropout (placement none) at each width**: no rows." in md
    # Only failed trials: counted in the setup, nothing fitted, no figure, no guideline.
    status = pa.array(["failed"] * trials.num_rows)
    failed = trials.set_column(trials.schema.get_field_index("status"), "status", status)
    write_study(str(tmp_path / "results"), failed, layers, space="failed")
    args = ["--space", "failed", "--root", str(tmp_path / "results"), "--out", str(out / "f"), "--n-boot", "100"]
    assert main(args) == 0
    md = (out / "f" / "report.md").read_text(encoding="utf-8")
    assert "| failed | 4 |" in md and "no trials with status ok: nothing fitted" in md and "No guideline" in md


# ------------------------------------------------------------------ profiles
def _as_profile(trials: pa.Table, layers: pa.Table, profile: str, dataset: str, days: int) -> tuple:
    """A copy of a planted study as another profile's sweep: new run ids and hashes, `days` later."""
    import datetime as dt

    import pyarrow.compute as pc

    def put(t: pa.Table, name: str, values) -> pa.Table:
        return t.set_column(t.schema.get_field_index(name), name, pa.array(values, t.schema.field(name).type))

    ids = [f"{profile}-{r}" for r in trials.column("run_id").to_pylist()]
    trials = put(put(put(trials, "run_id", ids), "profile", [profile] * trials.num_rows),
                 "dataset", [dataset] * trials.num_rows)
    trials = put(trials, "config_hash", [f"{profile}-{h}" for h in trials.column("config_hash").to_pylist()])
    trials = put(trials, "finished_at", pc.add(trials.column("finished_at"), pa.scalar(dt.timedelta(days=days))))
    layers = put(put(layers, "run_id", [f"{profile}-{r}" for r in layers.column("run_id").to_pylist()]),
                 "dataset", [dataset] * layers.num_rows)
    layers = put(layers, "config_hash", [f"{profile}-{h}" for h in layers.column("config_hash").to_pylist()])
    return trials, layers


@pytest.fixture(scope="module")
def two_profiles(tmp_path_factory) -> tuple[str, int]:
    """One space holding a quick (digits) sweep and, a day later, a fashion (Fashion-MNIST) sweep."""
    trials, layers = planted_study(placements=("none", "pre_bn"), widths=(1.0, 2.0), seeds=(0, 1), n_layers=4)
    fashion = _as_profile(trials, layers, "fashion", "fashion_mnist", days=1)
    root = str(tmp_path_factory.mktemp("two"))
    write_study(root, pa.concat_tables([trials, fashion[0]]), pa.concat_tables([layers, fashion[1]]))
    return root, trials.num_rows


def _report(root: str, out, *extra: str) -> str:
    from analysis.report import main

    assert main(["--space", "planted", "--root", root, "--out", str(out), "--no-figures", "--n-boot", "100",
                 *extra]) == 0
    return (out / "report.md").read_text(encoding="utf-8")


def _datasets(md: str) -> set[str]:
    """The datasets a report covers: its fixed setting, or the dataset column of its configurations table."""
    fixed = next(line for line in md.splitlines() if line.startswith("Fixed settings: "))
    one = re.search(r"\bdataset=(\w+)", fixed)
    if one:
        return {one.group(1)}
    title = "Configurations (one row per configuration; seeds are replicates)"
    lines = md.splitlines()
    header = [c.strip() for c in lines[lines.index(f"**{title}**") + 2].strip("|").split("|")]
    return {[c.strip() for c in r.strip("|").split("|")][header.index("dataset")] for r in _md_table(md, title)}


def test_report_defaults_to_the_latest_sweeps_profile_and_says_so(two_profiles, tmp_path, capsys) -> None:
    root, n = two_profiles
    md = _report(root, tmp_path / "latest")
    said = capsys.readouterr().out
    line = "Profile: planted fashion (the latest sweep's; not pooled with planted/quick: pass --profile NAME or " \
           "--profile all)."
    assert line in md and line in said
    assert f"{n} trials" in md and _datasets(md) == {"fashion_mnist"}


def test_report_profile_named_or_all(two_profiles, tmp_path) -> None:
    root, n = two_profiles
    md = _report(root, tmp_path / "quick", "--profile", "quick")
    assert "Profile: planted quick (as asked; not pooled with planted/fashion" in md
    assert f"{n} trials" in md and _datasets(md) == {"digits"}
    md = _report(root, tmp_path / "all", "--profile", "all")
    assert "Profiles: all, pooled as asked (fashion, quick)." in md
    assert f"{2 * n} trials" in md and _datasets(md) == {"digits", "fashion_mnist"}


def test_report_unknown_profile_is_one_line_and_writes_nothing(two_profiles, tmp_path, capsys) -> None:
    from analysis.report import main

    root, _ = two_profiles
    out = tmp_path / "nope"
    assert main(["--space", "planted", "--root", root, "--out", str(out), "--profile", "paper"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["analysis.report: error: --profile 'paper': no trials of that profile in planted (profiles "
                   "there: planted: fashion, quick; or --profile all)"]
    assert not out.exists()
