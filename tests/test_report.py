"""analysis.report on a planted study: files, images, tables, LaTeX, and the CLI's errors."""
from __future__ import annotations

import os
import re
import shutil
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
    assert "accuracy matches no-dropout from width 2 on" in md


def test_tex_is_escaped_and_balanced(report: str) -> None:
    tex = open(os.path.join(report, "report.tex"), encoding="utf-8").read()
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    assert not re.search(r"(?<!\\)[_%#$]", body), "unescaped LaTeX special"
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


def test_tex_compiles(report: str, tmp_path) -> None:
    engine = next((e for e in ("pdflatex", "lualatex", "tectonic") if shutil.which(e)), None)
    if engine is None:
        pytest.skip("no LaTeX engine (pdflatex, lualatex or tectonic) on PATH")
    shutil.copy(os.path.join(report, "report.tex"), tmp_path / "report.tex")
    (tmp_path / "main.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n"
                                       "\\begin{document}\n\\input{report}\n\\end{document}\n")
    cmd = [engine, "main.tex"] if engine == "tectonic" else [engine, "-interaction=nonstopmode", "-halt-on-error",
                                                              "main.tex"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (tmp_path / "main.pdf").exists()


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
