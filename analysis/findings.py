"""`python -m analysis.findings --space NAME [--profile P]`: the paper's five findings, tested on a study.

Each finding (PAPER.md, "Findings to reproduce") is printed with the numbers it rests on, t intervals
over seeds (paired by width and seed where two configurations are compared) and a verdict: holds,
does not hold, or cannot be tested here (the study lacks the networks or data it needs). The numbers
behind docs/results.md come from this command.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .fit import mean_ci
from .load import Study, constant_schedule, load_study
from .report import select_profile

__all__ = ["Finding", "findings", "main", "paper_setting"]

HOLDS, FAILS, UNTESTABLE = "holds", "does not hold", "cannot be tested here"


@dataclass
class Finding:
    """One of the paper's findings: its statement, the verdict here and the numbers behind it."""

    number: int
    claim: str
    verdict: str
    lines: list[str] = field(default_factory=list)


def paper_setting(trials: pa.Table) -> pa.Array:
    """Row mask: the paper's setting, dropout at one rate for the whole run with BatchNorm (no drop-rate schedule,
    normalization at its default). The findings are about that setting; an early/late schedule or a GroupNorm
    trial would sit in a (type, placement, rate) cell beside trials that mean something else."""
    mask = constant_schedule(trials)
    if "normalization" in trials.column_names:
        norm = trials.column("normalization")
        mask = pc.and_(mask, pc.fill_null(pc.equal(norm, "batchnorm"), True))
    return mask


def _rows(study: Study) -> list[dict]:
    t = study.ok().trials
    return t.filter(paper_setting(t)).select(
        ["backbone", "dataset", "width", "seed", "dropout_type", "dropout_placement", "dropout_rate", "test_acc",
         "test_acc_reest", "mean_shift_fed"]).to_pylist()


def _by(rows: list[dict], **where) -> dict[tuple, dict]:
    """(width, seed) -> row, for the rows matching `where`."""
    return {(r["width"], r["seed"]): r for r in rows if all(r[k] == v for k, v in where.items())}


def _ci(x: Sequence[float], scale: float = 1.0, nd: int = 3) -> str:
    m, lo, hi, _, n = mean_ci(np.asarray(x, float))
    if n == 0:
        return "n/a"
    ci = f" [{scale * lo:+.{nd}f}, {scale * hi:+.{nd}f}]" if math.isfinite(lo) else ""
    return f"{scale * m:+.{nd}f}{ci} (n = {n})"


def _paired(a: dict[tuple, dict], b: dict[tuple, dict], key: str) -> list[float]:
    return [a[k][key] - b[k][key] for k in sorted(set(a) & set(b))
            if math.isfinite(a[k][key]) and math.isfinite(b[k][key])]


def _lo_hi(x: Sequence[float]) -> tuple[float, float]:
    _, lo, hi, _, n = mean_ci(np.asarray(x, float))
    return (lo, hi) if n >= 2 else (math.nan, math.nan)


def findings(study: Study) -> list[Finding]:
    """Evaluate the five findings on `study` (ok trials)."""
    rows = _rows(study)
    types = sorted({r["dropout_type"] for r in rows if r["dropout_placement"] != "none"})
    rates = {t: sorted({r["dropout_rate"] for r in rows if r["dropout_type"] == t and r["dropout_placement"] != "none"})
             for t in types}
    backbones = sorted({r["backbone"] for r in rows})
    out = []

    # 1. Shift grows with the rate; (a) shifts more than (b); WRN shifts least.
    f = Finding(1, "the shift grows with the drop rate; Dropout-(a) (pre_bn) shifts more than (b) (pre_conv); WRN "
                   "shifts least", HOLDS)
    misses: list[str] = []
    ab_tested = False
    for t in types:
        for pl in ("pre_bn", "pre_conv"):
            rs = rates[t]
            if len(rs) >= 2:
                d = _paired(_by(rows, dropout_type=t, dropout_placement=pl, dropout_rate=rs[-1]),
                            _by(rows, dropout_type=t, dropout_placement=pl, dropout_rate=rs[0]), "mean_shift_fed")
                if not _lo_hi(d)[0] > 0:
                    misses.append(f"{t} {pl}: rate {rs[-1]:g} vs {rs[0]:g}")
                f.lines.append(f"{t} {pl}: mean shift of fed BNs at rate {rs[-1]:g} minus rate {rs[0]:g}, paired by "
                               f"width and seed: {_ci(d)}")
        for r in rates[t]:
            d = _paired(_by(rows, dropout_type=t, dropout_placement="pre_bn", dropout_rate=r),
                        _by(rows, dropout_type=t, dropout_placement="pre_conv", dropout_rate=r), "mean_shift_fed")
            if d:
                ab_tested = True
                if not _lo_hi(d)[0] > 0:
                    misses.append(f"{t} {r:g}: pre_bn vs pre_conv")
                f.lines.append(f"{t} {r:g}: pre_bn minus pre_conv mean shift of fed BNs, paired: {_ci(d)}")
    f.lines.append(f"WRN shifts least: one family here ({', '.join(backbones)}): cannot be tested")
    # A part of the claim the study has no two levels of is not tested, so it cannot hold.
    tested = [what for what, ok in (("rate", any(len(rates[t]) >= 2 for t in types)), ("(a) > (b)", ab_tested))
              if ok]
    untested = [w for w in ("rate", "(a) > (b)") if w not in tested]
    f.verdict = ((HOLDS + " for " + " and ".join(tested) + (f", except {'; '.join(misses)} (interval holds 0)"
                                                            if misses else "") + "; " if tested else "")
                 + "".join(f"{w} {UNTESTABLE} (one level); " for w in untested)
                 + "WRN vs other families " + UNTESTABLE)
    out.append(f)

    # 2. BN re-estimation lowers error in every cell; still worse than no dropout.
    f = Finding(2, "re-estimating BN statistics lowers the error in every cell, but stays worse than no dropout",
                HOLDS)
    cells = {}
    for r in rows:
        if r["dropout_placement"] not in ("none",):
            cells.setdefault((r["dropout_type"], r["dropout_placement"], r["dropout_rate"], r["width"]), []).append(
                r["test_acc_reest"] - r["test_acc"])
    means = {k: float(np.mean(v)) for k, v in cells.items()}
    up = sum(m > 0 for m in means.values())
    f.lines.append(f"cells (type, placement, rate, width) whose mean gain over seeds is > 0: {up} of {len(means)}")
    for pl in ("pre_bn", "pre_conv", "head"):
        g = [r["test_acc_reest"] - r["test_acc"] for r in rows if r["dropout_placement"] == pl]
        if g:
            f.lines.append(f"{pl}: accuracy gain, all its trials: {_ci(g, 100, 2)} pp")
    worse = []
    for t in types:
        r = rates[t][-1]
        d = _paired(_by(rows, dropout_type=t, dropout_placement="pre_bn", dropout_rate=r), _by(rows,
                    dropout_placement="none"), "test_acc_reest")
        if d:
            worse.append(_lo_hi(d)[1] < 0)
            f.lines.append(f"{t} pre_bn {r:g} after re-estimation minus no dropout (after), paired: {_ci(d, 100, 2)} pp")
    big = [k for k, m in means.items() if k[1] == "pre_bn" and k[2] == rates[k[0]][-1]]
    sig = [k for k in big if _lo_hi(cells[k])[0] > 0]
    f.lines.append(f"pre_bn at the largest rate: gain interval above 0 in {len(sig)} of {len(big)} cells")
    f.verdict = (HOLDS if up == len(means) and all(worse) else
                 "holds where the shift is large (pre_bn at the large rate), not in every cell" if all(worse) and big
                 else FAILS)
    out.append(f)

    # 3. Dropout after all BN (head) helps slightly.
    f = Finding(3, "dropout after all BN (before the classifier, head) helps slightly", FAILS)
    helps = []
    for t in types:
        for r in rates[t]:
            d = _paired(_by(rows, dropout_type=t, dropout_placement="head", dropout_rate=r),
                        _by(rows, dropout_placement="none"), "test_acc")
            if d:
                lo, hi = _lo_hi(d)
                helps.append(lo > 0)
                f.lines.append(f"{t} head {r:g} minus no dropout, all widths, paired: {_ci(d, 100, 2)} pp")
    f.verdict = HOLDS if helps and any(helps) else FAILS + " at this scale" if helps else UNTESTABLE
    out.append(f)

    # 4. Uout shifts far less than Bernoulli at comparable regularisation.
    f = Finding(4, "Uout shifts far less than Bernoulli dropout at comparable regularisation", UNTESTABLE)
    if "uout" in types and "bernoulli" in types:
        from .theory import noise_var

        nv = {(t, r): float(noise_var(t, r)) for t in ("uout", "bernoulli") for r in rates[t]}
        diffs = []  # (uout rate, bernoulli rate, mean difference, placement, ci high)
        for pl in ("pre_bn", "pre_conv"):
            for (tu, ru) in [k for k in nv if k[0] == "uout"]:
                for (tb, rb) in [k for k in nv if k[0] == "bernoulli"]:
                    d = _paired(_by(rows, dropout_type="uout", dropout_placement=pl, dropout_rate=ru),
                                _by(rows, dropout_type="bernoulli", dropout_placement=pl, dropout_rate=rb),
                                "mean_shift_fed")
                    if d:
                        diffs.append((ru, rb, float(np.mean(d)), pl, _lo_hi(d)[1]))
                    f.lines.append(f"{pl}: uout {ru:g} (noise variance {nv[(tu, ru)]:.3f}) minus bernoulli {rb:g} "
                                   f"({nv[(tb, rb)]:.3f}) mean shift of fed BNs, paired: {_ci(d)}")
        same = [d for d in diffs if d[0] == d[1]]
        matched = [d for d in diffs if 0.5 <= nv[("uout", d[0])] / nv[("bernoulli", d[1])] <= 2.0]
        less_same = bool(same) and all(hi < 0 for *_, hi in same)
        f.verdict = ((HOLDS if less_same else FAILS) + " at the same nominal rate")
        if matched:
            rel = [abs(m[2]) / abs(s_[2]) for m in matched for s_ in same if s_[1] == m[1] and s_[3] == m[3]
                   and s_[2]]
            f.verdict += (f"; at matched noise variance the difference shrinks to "
                          f"{', '.join(f'{m[2]:+.3f} ({m[3]})' for m in matched)}"
                          + (f" ({100 * min(rel):.0f}-{100 * max(rel):.0f}% of the same-rate one)" if rel else "")
                          + ": Uout's smaller shift is its smaller noise variance")
    out.append(f)

    # 5. DenseNet on CIFAR-100.
    dense = [r for r in rows if r["backbone"].startswith("cifar_densenet") and r["dataset"] == "cifar100"]
    f = Finding(5, "DenseNet on CIFAR-100: 77.42% without dropout vs 68.55% with dropout 0.5 in each bottleneck",
                UNTESTABLE if not dense else HOLDS)
    if not dense:
        f.lines.append("no DenseNet trial on CIFAR-100 in this study (python -m search.run --space paper_cifar "
                       "--profile paper with the data on disk)")
    else:
        none = [r["test_acc"] for r in dense if r["dropout_placement"] == "none"]
        drop = [r["test_acc"] for r in dense if r["dropout_placement"] == "pre_bn" and r["dropout_rate"] == 0.5]
        f.lines.append(f"no dropout {_ci(none, 100, 2)}%; pre_bn 0.5 {_ci(drop, 100, 2)}%")
        f.verdict = HOLDS if none and drop and np.mean(none) > np.mean(drop) else FAILS
    out.append(f)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 on a user error, printed as one line)."""
    p = argparse.ArgumentParser(prog="python -m analysis.findings", description=__doc__.splitlines()[0])
    p.add_argument("--space", action="append", required=True, help="space name (repeat to combine spaces)")
    p.add_argument("--storage", "--root", dest="root", default="results",
                   help="the sweep's --storage: results folder holding <space>/trials and <space>/layers "
                        "(--root is the same flag)")
    p.add_argument("--profile", default=None, help="the profile (default: each space's latest sweep)")
    args = p.parse_args(argv)
    try:
        study, text = select_profile(load_study(args.space, root=args.root, profile="all"), args.profile)
    except (ValueError, OSError) as exc:
        print(f"analysis.findings: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(text)
    ok = study.ok().trials
    if (left := ok.num_rows - pc.sum(paper_setting(ok)).as_py()):
        print(f"{left} of {ok.num_rows} ok trials left out: a drop-rate schedule or a normalization other than "
              "BatchNorm (the findings are about constant-rate dropout with BatchNorm; analysis.report has them)")
    for f in findings(study):
        print(f"\n{f.number}. {f.claim}\n   -> {f.verdict}")
        for line in f.lines:
            print(f"   - {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
