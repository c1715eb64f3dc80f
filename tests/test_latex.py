"""report.tex compiled by pdflatex with exactly the preamble it states: no error, no overfull box, every figure.

CI installs texlive-latex-base + texlive-latex-recommended (.ci/run) and sets DBN_REQUIRE_LATEX=1, so
there a missing pdflatex fails this file instead of skipping it.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess

import pytest

from test_analysis_fit import critical_cost, planted_study, write_study


def _engine() -> str:
    if shutil.which("pdflatex"):
        return "pdflatex"
    if os.environ.get("DBN_REQUIRE_LATEX") == "1":
        pytest.fail("DBN_REQUIRE_LATEX=1 but pdflatex is not on PATH (apt-get install texlive-latex-base "
                    "texlive-latex-recommended)")
    pytest.skip("pdflatex not on PATH (CI installs it; see .ci/run)")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[str, str, str]:
    """(report folder, report.tex text, pdflatex log) of a planted study with figures."""
    engine = _engine()
    from analysis.report import main

    root = tmp_path_factory.mktemp("results")
    trials, layers = planted_study(placements=("none", "pre_bn", "head"), widths=(1.0, 2.0, 4.0), seeds=(0, 1, 2),
                                   n_layers=4, cost=critical_cost(2.0), reest_per_shift=0.3)
    write_study(str(root), trials, layers, parts=2)
    out = str(tmp_path_factory.mktemp("out") / "planted")
    assert main(["--space", "planted", "--root", str(root), "--out", out, "--n-boot", "200"]) == 0
    tex = open(os.path.join(out, "report.tex"), encoding="utf-8").read()
    preamble = re.search(r"^% Preamble: (.*)$", tex, re.M)
    assert preamble, "report.tex states the preamble it needs"
    # The paper's document class and nothing but the stated preamble.
    with open(os.path.join(out, "main.tex"), "w", encoding="utf-8") as fh:
        fh.write(f"\\documentclass{{article}}\n{preamble.group(1)}\n\\begin{{document}}\n\\input{{report}}\n"
                 "\\end{document}\n")
    proc = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", "main.tex"], cwd=out,
                          capture_output=True, text=True, timeout=300)
    log = open(os.path.join(out, "main.log"), encoding="latin-1").read()
    assert proc.returncode == 0, log[-3000:]
    return out, tex, log


def test_compiles_without_overfull_boxes(compiled) -> None:
    out, tex, log = compiled
    assert os.path.getsize(os.path.join(out, "main.pdf")) > 10_000
    overfull = [ln for ln in log.splitlines() if ln.startswith("Overfull \\hbox")]
    assert overfull == [], "content wider than the text width:\n" + "\n".join(overfull)
    assert "LaTeX Warning: Reference" not in log and "Missing character" not in log


def test_every_figure_is_a_float_with_a_caption(compiled) -> None:
    out, tex, log = compiled
    stems = sorted(f[:-4] for f in os.listdir(os.path.join(out, "figures")) if f.endswith(".pdf"))
    assert len(stems) >= 4
    floats = re.findall(r"\\begin\{figure\}.*?\\includegraphics\[[^]]*\]\{figures/([\w-]+)\}\}*\s*\\caption\{.+?\}"
                        r"\\label\{fig:[\w-]+\}\s*\\end\{figure\}", tex, re.S)
    assert sorted(floats) == stems
    # pdflatex read every figure PDF (the log names each file it included).
    for stem in stems:
        assert f"figures/{stem}.pdf" in log.replace("\n", "")


def test_numbers_aligned_and_math_in_math_mode(compiled) -> None:
    _, tex, _ = compiled
    body = "\n".join(ln for ln in tex.splitlines() if not ln.startswith("%"))
    # Text-mode stand-ins for math are gone.
    for bad in (r"\textasciicircum", r"\textless", r"\textgreater", "->", "<=", " R^2"):
        assert bad not in body, bad
    assert "$R^2$" in body and "$\\eta^2$" in body
    specs = re.findall(r"\\begin\{tabular\}\{([^}]*(?:\{[^}]*\}[^}]*)*)\}", body)
    assert specs[0] == "lr"  # status: a name, then a right-aligned count
    assert all("r" in s for s in specs[1:-1])  # every table between has numeric columns, right-aligned
    # The shift-fit table: estimate and interval share a cell, and its columns are right-aligned numbers.
    fit = body.split("\\label{tab:shift-fit}")[1].split("\\end{table}")[0]
    assert "slope b [95\\% CI]" in fit and re.search(r"& \$?-?\$?\d\.\d\d \[", fit)
    # Its 12 columns (14 before the merge) are split in two tabulars that repeat what a row is.
    parts = re.findall(r"\\begin\{tabular\}\{([^}]*)\}\n\\toprule\n(.*?) \\\\", fit)
    assert len(parts) == 2 and all(len(spec) <= 8 for spec, _ in parts)
    assert all(head.startswith("type & placement & rate") for _, head in parts)


# ------------------------------------------------------------------ what a paper can take as it is
def _outside_math(tex: str) -> str:
    """The text of `tex` outside $...$ (comments and \\includegraphics paths dropped)."""
    body = "\n".join(ln for ln in tex.splitlines() if not ln.startswith("%"))
    body = re.sub(r"\\includegraphics\[[^]]*\]\{[^}]*\}", "", body)
    return "".join(re.split(r"(?<!\\)\$[^$]*(?<!\\)\$", body))


def test_no_bare_bar_in_text_mode_and_the_paper_cited_not_a_file(compiled) -> None:
    out, tex, _ = compiled
    # pdflatex's text font prints a text-mode | as an em dash: every | is in math mode.
    assert "|" not in _outside_math(tex)
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    for text in (tex, md):
        assert "PAPER.md" not in text  # not in the repository: the report cites the paper itself
        assert "Understanding the Disharmony between Dropout and Batch Normalization by Variance Shift" in text
        assert "CVPR 2019" in text


def test_math_notation_in_math_mode() -> None:
    from analysis.report import tex_text

    cases = {"|theory - frozen| / frozen": r"$|\mathrm{theory} - \mathrm{frozen}| / \mathrm{frozen}$",
             "detectable |b| (80%)": r"detectable $|b|$ (80\%)",
             "shift ~ d^{-0.17}": r"shift $\sim$ $d^{-0.17}$", "d^-1.02": r"$d^{-1.02}$",
             "2^n sign flips": r"$2^{n}$ sign flips", "cos^2": r"$\cos^2$", "R^2": r"$R^2$",
             "rho = 0": r"$\rho$ = 0", "narrow -> wide": r"narrow $\to$ wide", "a | b": r"a $|$ b",
             "d cos^2(theta)": r"$d\cos^2\theta$", "placement != none": r"placement $\ne$ none"}
    for text, want in cases.items():
        got = tex_text(text)
        assert got == want, (text, got)
        assert "|" not in _outside_math(got) and "^" not in _outside_math(got)


def _wide_table(n_rows: int):
    from analysis.report import Table

    headers = ["type", "placement", "rate / beta", "width", "n", "acc (%)", "acc none (%)", "cost (pp)",
               "cost 95% CI", "p (Holm)", "method", "detectable (pp)", "hurts"]
    rows = [[t, p, f"{r:g}", f"{w:g}", "3", "90.10", "91.20", "-1.10", "[-2.00, -0.20]", "0.04", "paired t", "1.2",
             "yes"] for t, p, r, w in itertools.product(("bernoulli", "uout"), ("pre_bn", "pre_conv", "head"),
                                                           (0.1, 0.5), (1, 2, 4))][:n_rows]
    return Table("cost", "Accuracy cost", headers, rows, note="hurts: the cost's interval is below -0.5 pp.")


def _tabulars(tex: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header cells, body rows' cells) of each tabular in `tex`."""
    out = []
    for head, body in re.findall(r"\\toprule\n(.*?) \\\\\n\\midrule\n(.*?)\n\\bottomrule", tex, re.S):
        out.append(([c.strip() for c in head.split(" & ")],
                    [[c.strip() for c in ln.rstrip(" \\").split(" & ")] for ln in body.splitlines()]))
    return out


def test_split_tables_repeat_their_key_columns() -> None:
    from analysis.report import MAX_COLUMNS, tex_table

    t = _wide_table(6)
    tex = tex_table(t)
    parts = _tabulars(tex)
    assert len(parts) >= 2 and tex.count("\\begin{table}") == 1
    keys = ["type", "placement", r"rate / $\beta$", "width"]  # what a row is: rate and width are numbers, yet keys
    for head, body in parts:
        assert head[:4] == keys and len(head) <= MAX_COLUMNS, head
    # every row of every part names its configuration in full (never "bernoulli head 0.5" without a width)
    first = [r[:4] for r in parts[0][1]]
    assert all([r[:4] for r in body] == first for _, body in parts)
    assert first[0] == ["bernoulli", r"pre\_\allowbreak{}bn", "0.1", "1"]
    # every column appears once outside the keys
    rest = [h for head, _ in parts for h in head[4:]]
    assert len(rest) == len(set(rest)) == 13 - 1 - 4  # 13 headers, the CI merged beside its estimate


def test_tall_tables_continue_in_further_floats() -> None:
    from analysis.report import ROWS_PER_FLOAT, tex_table

    t = _wide_table(36)
    tex = tex_table(t)
    floats = tex.split("\\end{table}")[:-1]
    assert len(floats) >= 2
    assert tex.count("\\label{tab:cost}") == 1 and tex.count("hurts: the cost") == 1  # one label, one note
    assert "(continued, 2 of" in floats[1]
    seen = []
    for fl in floats:
        parts = _tabulars(fl)
        assert sum(len(body) for _, body in parts) <= ROWS_PER_FLOAT
        assert len({tuple(tuple(r[:4]) for r in body) for _, body in parts}) == 1  # the parts of the same rows
        seen += [tuple(r[:4]) for r in parts[0][1]]
    assert len(seen) == len(set(seen)) == 36


def test_tall_split_table_compiles_within_the_page(tmp_path) -> None:
    engine = _engine()
    from analysis.report import TEX_PREAMBLE, tex_table

    (tmp_path / "main.tex").write_text(f"\\documentclass{{article}}\n{TEX_PREAMBLE}\n\\begin{{document}}\n"
                                       f"{tex_table(_wide_table(36))}\n\\end{{document}}\n", encoding="utf-8")
    proc = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", "main.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    log = (tmp_path / "main.log").read_text(encoding="latin-1")
    assert proc.returncode == 0, log[-3000:]
    assert "Float too large" not in log and "Overfull \\hbox" not in log, log[-3000:]
