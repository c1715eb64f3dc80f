"""`python -m analysis.report --space NAME [--space ...]`: report.md, report.tex and figures of a study.

A study that is empty or unknown is one line on stderr and exit code 2, and
nothing is written. A partial study is reported as far as it goes; what is
missing is named. matplotlib is imported only when figures are drawn.
Profiles of one space share its results folder: a report takes one profile per
space (by default the one of its latest sweep, and says which), so e.g. digits
and Fashion-MNIST trials are never pooled unless `--profile all` asks for it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .fit import MIN_UNITS, accuracy_step
from .guidelines import Analysis, Guideline, analyse, fmt_width, guidelines
from .layer_metrics import layer_metric_rows
from .literature import placement_comparison, schedule_comparison
from .load import ALL_PROFILES, DROPOUT_KEYS, EXPERIMENT_FIELDS, Study, load_study, select_profile, varying
from .theory import closed_form_kinds

__all__ = ["Table", "build_tables", "select_profile", "write_report", "main", "PAPER_REFERENCE"]

NA = "n/a"
# The paper, as the report cites it wherever it quotes it (there is no PAPER.md in what ships).
PAPER_CITATION = ('Li, Chen, Hu and Yang, "Understanding the Disharmony between Dropout and Batch Normalization by '
                  'Variance Shift", CVPR 2019 (arXiv:1801.05134)')
PAPER_NOTE = (f"Numbers marked PAPER are those of {PAPER_CITATION}, quoted from secondary summaries of the paper; "
              "they are targets to compare against, not this study's results.")
# The paper's numbers (PAPER.md); they come from secondary summaries of the paper, not its PDF.
# `match` selects our comparable ok trials; `metric` says what of ours sits beside the number.
PAPER_REFERENCE: list[dict[str, Any]] = [
    dict(what="DenseNet-BC, CIFAR-10, drop 0.5 Dropout-(a): error before BN re-estimation (%)", paper="8.70",
         match=dict(backbone="cifar_densenet_bc", dataset="cifar10", dropout_placement="pre_bn", dropout_rate=0.5),
         metric="error"),
    dict(what="DenseNet-BC, CIFAR-10, drop 0.5 Dropout-(a): error after BN re-estimation (%)", paper="6.82",
         match=dict(backbone="cifar_densenet_bc", dataset="cifar10", dropout_placement="pre_bn", dropout_rate=0.5),
         metric="error_reest"),
    dict(what="DenseNet-BC, CIFAR-10, no dropout: error (%)", paper="4.72",
         match=dict(backbone="cifar_densenet_bc", dataset="cifar10", dropout_placement="none"), metric="error"),
    dict(what="DenseNet-BC, CIFAR-100, drop 0.5 Dropout-(a): error before -> after re-estimation (%)",
         paper="31.45 -> 26.98",
         match=dict(backbone="cifar_densenet_bc", dataset="cifar100", dropout_placement="pre_bn", dropout_rate=0.5),
         metric="error_pair"),
    dict(what="DenseNet, CIFAR-100: accuracy without dropout (%)", paper="77.42",
         match=dict(backbone="cifar_densenet_bc", dataset="cifar100", dropout_placement="none"), metric="acc"),
    dict(what="DenseNet, CIFAR-100: accuracy with dropout 0.5 in each bottleneck (%; ours: pre_bn)", paper="68.55",
         match=dict(backbone="cifar_densenet_bc", dataset="cifar100", dropout_placement="pre_bn", dropout_rate=0.5),
         metric="acc"),
    dict(what="ImageNet top-1 error, ResNet-200: no dropout -> drop 0.2 before the classifier (head) (%)",
         paper="21.70 -> 21.48", match=dict(backbone="resnet200"), metric="error_from_none"),
    dict(what="ImageNet top-1 error, ResNeXt-101: no dropout -> drop 0.2 head (%)", paper="20.40 -> 20.17",
         match=dict(backbone="resnext101"), metric="error_from_none"),
    dict(what="ImageNet top-1 error, SENet: no dropout -> drop 0.2 head (%)", paper="18.89 -> 18.68",
         match=dict(backbone="senet154"), metric="error_from_none"),
    dict(what="d cos^2(theta), PreResNet (BN layers fed by dropout)", paper="2.6-3.8",
         match=dict(backbone="cifar_preresnet"), metric="dcos2"),
    dict(what="d cos^2(theta), DenseNet", paper="2.6-3.8", match=dict(backbone="cifar_densenet_bc"), metric="dcos2"),
    dict(what="d cos^2(theta), ResNeXt", paper="14.7", match=dict(backbone="cifar_resnext"), metric="dcos2"),
    dict(what="d cos^2(theta), WRN-28-10", paper="44-53", match=dict(backbone="cifar_wrn"), metric="dcos2"),
]


@dataclass
class Table:
    """A titled table rendered to Markdown and LaTeX (booktabs) alike."""

    key: str
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""


def _f(x: float, nd: int = 2, scale: float = 1.0, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return NA
    return f"{scale * x:{'+' if sign else ''}.{nd}f}"


def _ci(lo: float, hi: float, nd: int = 1, scale: float = 1.0, sign: bool = True) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return NA
    return f"[{_f(lo, nd, scale, sign)}, {_f(hi, nd, scale, sign)}]"


def _p(p: float) -> str:
    return NA if not math.isfinite(p) else f"{p:.2g}"


def _ctx(a: Analysis, context: tuple) -> list[str]:
    return [str(v) for k, v in context if k in a.context]


def build_tables(a: Analysis, full: Study) -> list[Table]:
    """Every table of the report, in order; `full` is the study before filtering to status ok."""
    tabs = list(_setup_tables(a, full))
    lvl = f"{a.level:.0%} CI"
    t = Table("shift_fit", "Variance shift vs feature dimension: log(shift - 1) = a + b log d",
              ["type", "placement", "rate / beta", "layers", "trials", "slope b", f"b {lvl}", "intercept a", f"a {lvl}",
               "R^2", "resampled", "mean shift", "theory mean shift", "theory slope"],
              note="BN layers fed by dropout with a known fan-in d; layers with shift <= 1 dropped from the log fit "
                   "(counted in the notes). Theory: analysis.theory.predict_layer_shift with c = real_mean, "
                   "v = real_var, cos^2 measured (1 where not probed), rho = 0 (with rho = 0 the closed form does not "
                   "depend on d, so its slope is ~0: the measured slope is what rho > 0 would have to explain).")
    if a.mechanism or a.width_mechanism:
        # The rho = 0 closed form is superseded by the measured mechanism (its own tables below).
        t.headers = t.headers[:-2]
        t.note = ("BN layers fed by dropout with a known fan-in d; layers with shift <= 1 dropped from the log fit "
                  "(counted in the notes). The theory's prediction, from measured rho and d cos^2(theta), is in "
                  "the mechanism tables (theory vs measurement; width through the mechanism).")
    dropped = sum(f.n_dropped for f in a.shift_fits)
    for f in a.shift_fits:
        t.rows.append([f.dropout_type, f.dropout_placement, f"{f.dropout_rate:g}", str(f.n), str(f.n_trials),
                       _f(f.slope), _ci(*f.slope_ci, nd=2, sign=False), _f(f.intercept),
                       _ci(*f.intercept_ci, nd=2, sign=False), _f(f.r2), f.resample, _f(f.shift_mean, 3),
                       _f(f.theory_mean, 3), _f(f.theory_slope)][:len(t.headers)])
    if dropped:
        t.note += f" {dropped} layers had shift <= 1."
    t.note += "".join(f" {f.dropout_type}/{f.dropout_placement}/{f.dropout_rate:g}: {f.note}." for f in a.shift_fits
                      if f.note)
    tabs.append(t)
    ctxh = list(a.context)
    step, step_src = accuracy_step(a.study.trials)
    grain = (f" One test image is {100 * step:.2f} pp of accuracy ({step_src}): every accuracy and cost moves in "
             "steps of that size." if math.isfinite(step) else "")
    t = Table("cost", "Accuracy cost of dropout vs no dropout (placement none) at each width",
              ctxh + ["type", "placement", "rate / beta", "width", "n", "acc (%)", "acc none (%)", "cost (pp)",
                      f"cost {lvl}", "p (Holm)", "method", "detectable (pp)", "hurts"],
              note=f"n: seeds (pairs when paired). method: paired t over seeds; paired sign-flip (every pair equal: "
                   f"the exact test over the 2^n sign assignments, no interval); not testable below {MIN_UNITS} seeds "
                   f"(the point only); welch: unpaired. detectable: the smallest |cost| the cell's test finds with 80% "
                   f"power at its n and spread, so a cell that does not hurt says how large a cost it could have "
                   f"missed. hurts: cost <= -{100 * a.tol:.1f} pp and Holm-adjusted p < {1 - a.level:.2g} over the "
                   "tested cells; 'point' marks an untested cell decided on its point alone." + grain)
    for c in a.costs:
        hurts = ("yes" if c.tested else "point") if c.harm else "no"
        t.rows.append(_ctx(a, c.context) + [c.dropout_type, c.dropout_placement, f"{c.dropout_rate:g}",
                      fmt_width(c.width), str(c.n), _f(c.acc, 2, 100), _f(c.acc_none, 2, 100), _f(c.cost, 2, 100, True),
                      _ci(c.ci_low, c.ci_high, 2, 100), _p(c.p_adj), c.method, _f(c.mde, 2, 100), hurts])
    tabs.append(t)
    t = Table("critical", "Smallest width from which on dropout does not hurt accuracy",
              ctxh + ["type", "placement", "rate / beta", "widths tested", "critical width", "cost there (pp)", lvl,
                      "basis"])
    for cw in a.critical:
        c = cw.cell
        t.rows.append(_ctx(a, cw.context) + [cw.dropout_type, cw.dropout_placement, f"{cw.dropout_rate:g}",
                      ", ".join(fmt_width(w) for w in cw.widths),
                      fmt_width(cw.width) if cw.width is not None else "not reached in this study",
                      _f(c.cost, 2, 100, True) if c else NA, _ci(c.ci_low, c.ci_high, 2, 100) if c else NA,
                      "CI" if cw.with_ci else "points (no interval)"])
    tabs.append(t)
    names = [k for k, _ in a.reest[0].label] if a.reest else []
    t = Table("reest", "BN re-estimation per configuration: test accuracy before and after",
              names + ["n", "before (%)", "after (%)", "gain (pp)", lvl, "method"],
              note=f"n: trials (seeds). method: t over trials; sign-flip where every trial gains the same (no "
                   f"interval); not testable below {MIN_UNITS} trials." + grain)
    for r in a.reest:
        t.rows.append([str(v) if k != "width" else fmt_width(v) for k, v in r.label]
                      + [str(r.n), _f(r.before, 2, 100), _f(r.after, 2, 100), _f(r.gain, 2, 100, True),
                         _ci(r.ci_low, r.ci_high, 2, 100), r.method])
    tabs.append(t)
    t = Table("reest_pooled", "BN re-estimation pooled per placement (trials as one sample)",
              ["placement", "trials", "before (%)", "after (%)", "gain (pp)", lvl, "p (Holm)"])
    if a.correlation is not None:
        c = a.correlation
        t.note = (f"Gain vs {c.x} over {c.n} dropout trials: Pearson r = {c.r:.2f}, "
                  f"{lvl} {_ci(c.ci_low, c.ci_high, 2)}, "
                  f"p = {_p(c.p)}; Spearman rho = {c.rho:.2f}, p = {_p(c.p_rho)}.")
    for r in a.reest_pooled:
        t.rows.append([dict(r.label)["dropout_placement"], str(r.n), _f(r.before, 2, 100), _f(r.after, 2, 100),
                       _f(r.gain, 2, 100, True), _ci(r.ci_low, r.ci_high, 2, 100), _p(r.p_adj)])
    tabs.append(t)
    for resp, rows in a.factors.items():
        t = Table(f"factors_{resp}", f"Factor importance for {resp}: main-effects ANOVA, factors categorical",
                  ["factor", "levels", "df", "unique SS share", "one-way eta^2", "F", "p (Holm)"],
                  note="unique SS: what the factor adds last; type and rate are nested in placement != none.")
        t.rows = [[r.factor, str(r.levels), str(r.df), f"{r.share:.1%}", f"{r.eta2:.1%}", _f(r.f, 1), _p(r.p_adj)]
                  for r in rows]
        tabs.append(t)
    tabs += mechanism_tables(a)
    tabs.append(width_table(a))
    tabs += d_tables(a)
    tabs += literature_tables(a)
    tabs.append(_paper_table(a))
    if (got := layer_metric_rows(a.study.layers)) is not None:  # the registered per-layer metrics
        tabs.append(Table("layer_metrics", "Per-layer metrics (registered)", got[0], got[1], note=got[2]))
    return tabs


_LITERATURE = {
    "dropout_placement": ("kim2023", "Where one dropout goes in a residual network (Kim et al. 2023): each placement "
                          "against no dropout and against pre_conv, paired by seed", "placement"),
    "schedule": ("liu2023", "Early and late dropout (Liu et al. 2023): each drop-rate schedule against no dropout "
                 "and against dropout for the whole run, paired by seed", "schedule"),
}


def literature_tables(a: Analysis) -> list[Table]:
    """The follow-up literature's comparisons (analysis/literature.py), where the study ran them."""
    lvl = f"{a.level:.0%} CI"
    tabs = []
    for comps in (placement_comparison(a.study.trials, a.level), schedule_comparison(a.study.trials, a.level)):
        if not comps:
            continue
        key, title, name = _LITERATURE[comps[0].factor]
        ref = comps[0].reference
        schedules = comps[0].factor == "schedule"
        t = Table(key, title, ["setting", name, "n", "acc (%)", "vs none (pp)", lvl, f"vs {ref} (pp)", lvl,
                               "test loss vs none", "mean shift fed", "method"]
                  + (["train loss vs none", lvl] if schedules else []))
        for c in comps:
            setting = ", ".join(f"{k}={fmt_width(v) if k == 'width' else v}" for k, v in c.setting) or "-"
            for lv in c.levels:
                dn, dr, dl = lv.vs_none["test_acc"], lv.vs_reference["test_acc"], lv.vs_none["test_loss"]
                t.rows.append([setting, lv.label, str(lv.n), _f(lv.means["test_acc"], 2, 100),
                               _f(dn.mean, 2, 100, True), _ci(dn.low, dn.high, 2, 100),
                               _f(dr.mean, 2, 100, True), _ci(dr.low, dr.high, 2, 100),
                               _f(dl.mean, 3, sign=True), _f(lv.means["mean_shift_fed"], 3),
                               _method(dn, dr)])
                if schedules:  # final train loss, only where the last epoch ran without dropout (comparable)
                    tl = lv.vs_none["train_loss"]
                    t.rows[-1] += ([_f(tl.mean, 3, sign=True), _ci(tl.low, tl.high, 3)]
                                   if lv.ends_without_dropout else ["n/a (ends with dropout on)", NA])
        t.note = (f"n: seeds with an ok trial. Differences are paired by seed (the same initial weights and data "
                  f"order) over the seeds both levels ran; method: t over the pairs (a {lvl}), sign-flip "
                  f"where every pair differs alike (no interval), not testable below {MIN_UNITS} pairs. The "
                  f"reference rows compare with themselves (n/a). mean shift fed: the mean variance shift of the "
                  f"BN layers the dropout feeds (n/a where it feeds none).")
        if schedules:
            t.note += (" The shift is measured as the network ends training, with the rate in force then: an "
                       "early schedule ends at rate 0, so its fed BN layers show only what is left without noise "
                       "(~1). train loss: the mean training loss of the last epoch, in train mode at the rate in "
                       "force, so it is compared with no dropout's only for schedules that end at rate 0 (Liu et "
                       "al.'s underfitting measure); a lower value fits the training set better.")
        tabs.append(t)
    return tabs


def _method(*tests: Any) -> str:
    """The tests' method, once, and each pair's detectable effect (pp)."""
    methods = [m.method for m in tests if m.n]
    mdes = [_f(m.mde, 2, 100) for m in tests if m.n and math.isfinite(m.mde)]
    text = "; ".join(dict.fromkeys(methods)) or NA
    return text + (f" (detects {' / '.join(mdes)} pp)" if mdes else "")


def d_tables(a: Analysis) -> list[Table]:
    """D = d cos^2(theta) at initialisation and after training per width, and its width exponent."""
    from .dcos2 import VARIANTS

    lvl = f"{a.level:.0%} CI"
    t = Table("d_cos2", "D = d cos^2(theta) of the weights feeding BN, at initialisation and after training",
              ["over", *a.context, "type", "placement", "rate / beta", "width", "epochs", "seeds", "D init", lvl,
               "D final", lvl],
              note="over: " + "; ".join(f"{k} = {v}" for k, v in VARIANTS.items()) + ". D needs no data: it is "
                   "read from the weights (search/trial/mechanism.py). Intervals: t over seeds (none below 3). The "
                   "paper reports 44-53 for WRN-28-10 after 200 CIFAR epochs.")
    for r in a.d_cos2:
        if r.variant == "d_cos2" and r.dropout_placement in ("none", "head"):
            continue
        t.rows.append([r.variant, *_ctx(a, r.context), r.dropout_type if r.dropout_placement != "none" else "-",
                       r.dropout_placement, f"{r.dropout_rate:g}" if r.dropout_placement != "none" else "-",
                       fmt_width(r.width), str(r.epochs), str(r.final.n), _f(r.init.mean, 2),
                       _ci(r.init.low, r.init.high, 2, sign=False), _f(r.final.mean, 2),
                       _ci(r.final.low, r.final.high, 2, sign=False)])
    w = Table("d_cos2_width", "Width exponent of the final D: log D = a + b log width, one slope per seed",
              ["over", *a.context, "type", "placement", "rate / beta", "widths", "seeds", "b", lvl, "method"],
              note="b > 0: D grows with width, as the paper's width mechanism needs; b = 0: D does not depend on "
                   "width.")
    for d in a.d_cos2_width:
        if d.variant == "d_cos2" and d.dropout_placement in ("none", "head"):
            continue
        s = d.slope
        none = d.dropout_placement == "none"
        w.rows.append([d.variant, *_ctx(a, d.context), "-" if none else d.dropout_type, d.dropout_placement,
                       "-" if none else f"{d.dropout_rate:g}",
                       ", ".join(fmt_width(x) for x in d.widths), str(s.n), _f(s.mean, 3, sign=True),
                       _ci(s.low, s.high, 3), s.method])
    return [t, w]


def samples_line(trials: Any) -> str:
    """What the trials' stages saw (n_train, n_test, n_probe, n_reest), or that the results predate the counts."""
    names = ("n_train", "n_test", "n_probe", "n_reest")
    if not all(n in trials.schema.names for n in names):
        return ""
    parts = []
    for n in names:
        vals = sorted({v for v in trials.column(n).to_pylist() if v is not None})
        parts.append(f"{n} = {', '.join(str(v) for v in vals) if vals else 'not recorded (older results)'}")
    return ("Images each stage used: " + "; ".join(parts) + " (n_probe: the shift probes and the mechanism; "
            "n_reest: BN re-estimation; the paper used the whole training set for both).")


def width_table(a: Analysis) -> Table:
    """Width where it is identified (analysis.width): within position, across positions, pooled."""
    from .width import QUANTITIES

    lvl = f"{a.level:.0%} CI"
    label = {"shift": "shift (paper)", "shift_frozen": "frozen (measured)", "shift_theory": "propagation"}
    t = Table("width_effect", "Width at the same BN position: log(q - 1) = a_position + b log d, paired by seed",
              list(a.context) + ["type", "placement", "rate / beta", "quantity", "widths", "positions", "seeds",
                                 "b within position", f"within {lvl}", "method", "detectable |b| (80%)",
                                 "b across positions", "b pooled", "width effect"],
              note="q: " + "; ".join(f"{label[k]} = {k}, the {v}" for k, v in QUANTITIES.items()) + ". within position: a fixed "
                   "effect per BN position (its execution index), so d changes only with the width: the width effect, "
                   "estimated per seed and given a t interval over seeds (none below 3 seeds). across positions: a "
                   "fixed effect per trial, so d changes only with the stage (stage and fan-in together). pooled: "
                   "every layer in one regression, stage and width mixed (the shift-vs-d table). Layers with q <= 1 "
                   "are left out of the logs.")
    for e in a.width_effects:
        w = e.within
        t.rows.append(_ctx(a, e.context) + [e.dropout_type, e.dropout_placement, f"{e.dropout_rate:g}", label[e.quantity],
                      ", ".join(fmt_width(x) for x in e.widths), str(e.n_positions), str(w.n), _f(w.mean, 3, sign=True),
                      _ci(w.low, w.high, 3), w.method, _f(w.mde, 3), _f(e.across.mean, 3, sign=True),
                      _f(e.pooled, 3, sign=True), e.verdict])
    return t


def mechanism_tables(a: Analysis) -> list[Table]:
    """The noise floor; the paper's shift, the frozen measurement and the theory side by side; width explained."""
    from .mechanism import TARGET

    tabs = []
    fl = a.floor
    t = Table("noise_floor", "The noise floor: BN's running statistics without dropout noise",
              ["quantity", "value", f"{a.level:.0%} CI", "trials"])
    if fl is not None:
        t.rows = [["mean shift, no dropout", _f(fl.none_shift[0], 3), _ci(*fl.none_shift[1:], nd=3, sign=False),
                   str(fl.n_none)],
                  ["... after BN re-estimation", _f(fl.none_shift_reest, 3), NA, str(fl.n_none)],
                  ["shift_floor, every trial", _f(fl.floor[0], 3), _ci(*fl.floor[1:], nd=3, sign=False),
                   str(fl.n_trials)],
                  [f"flagged (shift_floor > {fl.limit:g})", str(len(fl.flagged)), NA, str(fl.n_trials)]]
        t.note = ("mean shift: over the BN layers of placement-none trials (after re-estimation: their median); "
                  "shift_floor: a trial's mean shift at the BN layers no dropout noise reaches. A shift above 1 "
                  "with no dropout is not dropout's: the running statistics had not settled. Flagged trials "
                  "(bn_unconverged) are left out of every fit and guideline"
                  + (" (here all are flagged, so no guideline is drawn)" if a.all_flagged else "") + "."
                  + (f" Flagged: {', '.join(fl.flagged[:12])}{' ...' if len(fl.flagged) > 12 else ''}."
                     if fl.flagged else ""))
    tabs.append(t)
    miss = f"columns missing: {', '.join(a.mechanism_missing)} (results written before the mechanism probe)"
    pct = lambda x: f"{100 * x:.1f}%" if math.isfinite(x) else NA  # noqa: E731
    t = Table("mechanism", "Three predictions of the variance BN sees, beside the frozen measurement, at the BN "
              "layers dropout feeds",
              ["backbone", "type", "placement", "rate / beta", "layers", "trials", "frozen (measured)",
               "closed form", "local identity", "propagation", "closed form error", "local identity error",
               "propagation error", "propagation 90th pct", f"propagation <= {TARGET:.0%}"],
              note=miss if a.mechanism_missing else
              "Medians over dropout-fed BN layers. frozen (measured): BN input variance with dropout on and BN "
              "frozen over its eval-mode variance. closed form: the paper's case (a) (pre_bn, post_conv) or case (b) "
              "(pre_conv, post_bn) from the measured rho, d cos^2(theta), c_in and v_in; n/a for post_add, which "
              "is case (a) in a pre-activation family and (b) in a post-activation one; local identity: the exact extra variance the "
              "feeding dropout alone injects (1 + excess_local); propagation: the local identity plus the noise "
              "earlier dropouts send down the residual stream, carried through the network (shift_theory; "
              "docs/theory.md). error: median |prediction - frozen| / frozen.")
    # Kinds with shared masks have neither a closed form nor a propagation rule, so no row here: say why.
    skipped = sorted({f.dropout_type for f in a.shift_fits} - set(closed_form_kinds()))
    if skipped:
        t.note += (f" Not in this table: {', '.join(skipped)}, whose masks are shared, not element-wise: no closed"
                   " form and no propagation rule (docs/theory.md); their shift is measured only.")
    for r in a.mechanism:
        t.rows.append([r.backbone, r.dropout_type, r.dropout_placement, f"{r.dropout_rate:g}", str(r.n_layers),
                       str(r.n_trials), _f(r.shift_frozen, 3), _f(r.shift_closed_form, 3), _f(r.shift_local, 3),
                       _f(r.shift_theory, 3), pct(r.err_closed_form), pct(r.err_local), pct(r.rel_err),
                       pct(r.rel_err_p90), "yes" if r.within_target else "no"])
    tabs.append(t)
    t = Table("mechanism_paper", "The three predictions against the paper's metric, and why the closed form misses",
              ["backbone", "type", "placement", "rate / beta", "shift (paper)", "closed form vs paper",
               "local identity vs paper", "propagation vs paper", "diluted before BN", "local share",
               "d cos^2(theta)", "rho"],
              note=miss if a.mechanism_missing else
              "shift (paper): from BN's running statistics. vs paper: median |prediction - shift| / shift. diluted "
              "before BN: the median share of the closed form's excess that does not reach BN, 1 - excess_local / "
              "(closed form - 1): the closed form takes the dropout's weight layer as BN's only input, while in a "
              "residual block the shortcut adds variance that carries no fresh noise. local share: the local "
              "identity's part of the propagation's excess (the rest is inherited from earlier dropouts).")
    for r in a.mechanism:
        t.rows.append([r.backbone, r.dropout_type, r.dropout_placement, f"{r.dropout_rate:g}", _f(r.shift, 3),
                       *(pct(x) for x in r.err_vs_paper), pct(r.dilution),
                       f"{100 * r.local_share:.0f}%" if math.isfinite(r.local_share) else NA, _f(r.d_cos2, 2),
                       _f(r.rho, 3)])
    tabs.append(t)
    lvl = f"{a.level:.0%} CI"
    t = Table("width_mechanism", "Pooled over BN positions and widths (stage and width mixed): log(q - 1) = "
              "a + b log d for the frozen measurement and the propagation over the same layers",
              ["backbone", "type", "placement", "rate / beta", "widths", "layers", "trials", "b measured",
               f"b measured {lvl}", "b propagation", f"b propagation {lvl}", "b propagation - measured",
               f"paired {lvl}", "propagation agrees", "rho", "d cos^2(theta) narrow -> wide"],
              note=miss if a.mechanism_missing else
              "Slopes: bootstrap over trials. propagation - measured: over the layers where both excesses are > 0, "
              "a paired bootstrap over trials; propagation agrees: that interval holds 0. Pooled slopes mix the "
              "stage with the width: the width effect alone is in the table 'Width at the same BN position'.")
    for w in a.width_mechanism:
        m, th = w.measured, w.theory
        t.rows.append([w.backbone, w.dropout_type, w.dropout_placement, f"{w.dropout_rate:g}",
                       ", ".join(fmt_width(x) for x in w.widths), str(m.n), str(m.n_trials), _f(m.slope),
                       _ci(*m.slope_ci, nd=2, sign=False), _f(th.slope), _ci(*th.slope_ci, nd=2, sign=False),
                       _f(w.diff, 2, sign=True), _ci(*w.diff_ci, nd=2),
                       {True: "yes", False: "no", None: NA}[w.explained], _f(w.rho, 3),
                       f"{_f(w.d_cos2[0], 1)} -> {_f(w.d_cos2[1], 1)}"])
    tabs.append(t)
    return tabs


def _setup_tables(a: Analysis, full: Study) -> tuple[Table, Table]:
    status = Table("status", "Trials by status", ["status", "trials"],
                   rows=[[k, str(v)] for k, v in sorted(full.status_counts().items())])
    ctx = varying(full.trials, [f for f in EXPERIMENT_FIELDS if f not in DROPOUT_KEYS + ("width", "seed")])
    keys = ctx + list(DROPOUT_KEYS) + ["width"]
    agg = full.trials.group_by(keys).aggregate([("run_id", "count"), ("seed", "count_distinct")])
    rows = sorted(agg.to_pylist(), key=lambda r: tuple(str(r[k]) for k in keys))
    ok = full.trials.filter(pc.equal(full.trials.column("status"), "ok"))
    ok_agg = {tuple(r[k] for k in keys): r for r in ok.group_by(keys).aggregate(
        [("run_id", "count"), ("test_acc", "mean")]).to_pylist()}
    cfg = Table("configs", "Configurations (one row per configuration; seeds are replicates)",
                keys + ["trials", "seeds", "ok", "test acc (%)"])
    for r in rows:
        o = ok_agg.get(tuple(r[k] for k in keys), {})
        cfg.rows.append([fmt_width(r[k]) if k == "width" else str(r[k]) for k in keys]
                        + [str(r["run_id_count"]), str(r["seed_count_distinct"]), str(o.get("run_id_count", 0)),
                           _f(o.get("test_acc_mean", math.nan), 2, 100)])
    return status, cfg


def _paper_table(a: Analysis) -> Table:
    t = Table("paper", "The paper's numbers (Li et al., CVPR 2019, from secondary summaries) beside ours where "
              "comparable",
              ["quantity", "PAPER (Li et al. 2019)", "ours"],
              note=f"The paper's column is the paper's ({PAPER_CITATION}), quoted from secondary summaries; ours is "
                   "this study's mean over matching ok trials, shown only where backbone, data and placement match.")
    for ref in PAPER_REFERENCE:
        t.rows.append([ref["what"], ref["paper"], _ours(a.study, ref["match"], ref["metric"])])
    return t


def _ours(study: Study, match: dict[str, Any], metric: str) -> str:
    if metric == "error_from_none":  # the paper's head rows: none -> head at drop 0.2, same network
        none = _ours(study, dict(match, dropout_placement="none"), "error")
        head = _ours(study, dict(match, dropout_placement="head", dropout_rate=0.2), "error")
        return "not in this study" if "not" in none + head else f"{none} -> {head}"
    table = study.layers if metric == "dcos2" else study.trials
    if table.num_rows == 0:
        return "not in this study"
    mask = None
    for k, v in match.items():
        col = table.column(k)
        m = pc.starts_with(col, v) if k == "backbone" else pc.equal(col, v)
        mask = m if mask is None else pc.and_(mask, m)
    sub = table.filter(mask)
    if metric == "dcos2":
        return _ours_dcos2(sub)
    if sub.num_rows == 0:
        return "not in this study"
    acc, reest = sub.column("test_acc").to_numpy(), sub.column("test_acc_reest").to_numpy()
    n = f" (n = {sub.num_rows})"
    if metric == "acc":
        return f"{100 * np.nanmean(acc):.2f}{n}"
    if metric == "error_reest":
        return f"{100 * (1 - np.nanmean(reest)):.2f}{n}"
    if metric == "error_pair":
        return f"{100 * (1 - np.nanmean(acc)):.2f} -> {100 * (1 - np.nanmean(reest)):.2f}{n}"
    return f"{100 * (1 - np.nanmean(acc)):.2f}{n}"


def _ours_dcos2(layers: pa.Table) -> str:
    """d cos^2(theta) of the weight layers feeding dropout-fed BNs, per network of ours (depth, width, data).

    The probe's `d_cos2` (mean over output units of (sum w)^2 / ||w||^2, the paper's averaging) where recorded;
    older results: fan_in x cos2.
    """
    fed = layers.filter(pc.fill_null(layers.column("fed_by_dropout"), False))
    if fed.num_rows == 0:
        return "not in this study"
    dc = pc.fill_null(fed.column("d_cos2"), math.nan).to_numpy(zero_copy_only=False).astype(float)
    old = (pc.fill_null(fed.column("fan_in"), 0).to_numpy(zero_copy_only=False).astype(float)
           * pc.fill_null(fed.column("cos2"), math.nan).to_numpy(zero_copy_only=False))
    x = np.where(np.isfinite(dc), dc, old)
    nets: dict[tuple, list[float]] = {}
    nets_of = zip(*(fed.column(k).to_pylist() for k in ("depth", "width", "dataset")))
    for (depth, width, data), v in zip(nets_of, x):
        if math.isfinite(v):
            nets.setdefault((depth, width, data), []).append(v)
    if not nets:
        return "not in this study"
    return "; ".join(f"{np.mean(v):.1f} (ours: depth {dp}, width {fmt_width(w)}, {data}; {len(v)} layers)"
                     for (dp, w, data), v in sorted(nets.items(), key=lambda kv: tuple(str(k) for k in kv[0])))


# ----------------------------------------------------------------- rendering
def md_table(t: Table) -> str:
    """A Markdown table with its title above and its note below."""
    if not t.rows:
        return f"**{t.title}**: no rows." + (f" *{t.note}*" if t.note else "") + "\n"
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    out = [f"**{t.title}**", "", "| " + " | ".join(map(esc, t.headers)) + " |",
           "|" + "|".join("---" for _ in t.headers) + "|"]
    out += ["| " + " | ".join(map(esc, r)) + " |" for r in t.rows]
    return "\n".join(out + (["", f"*{t.note}*"] if t.note else [])) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def tex_escape(text: str) -> str:
    """Escape LaTeX's special characters (and keep the text ASCII-safe for pdflatex)."""
    return "".join(_TEX.get(ch, ch) for ch in str(text))


_GREEK = ("alpha", "beta", "theta", "eta", "rho", "sigma")


def _math_expr(text: str) -> str:
    """Plain notation as one math expression: `|theory - frozen| / frozen` -> $|\\mathrm{theory} - ...|/...$.

    Names of two or more letters are set upright (\\mathrm), greek names as symbols, single letters as variables.
    """
    def name(m: re.Match) -> str:
        w = m.group(0)
        return f"\\{w}" if w in _GREEK else w if len(w) == 1 else "\\mathrm{" + w.replace("_", r"\_") + "}"

    body = re.sub(r"[A-Za-z][A-Za-z_]*", name, text)
    return "$" + body.replace("*", r"\cdot ").replace("%", r"\%") + "$"


# Plain-text notation in tables and notes -> LaTeX math, matched before escaping the rest. A `|` never stays
# in text mode (pdflatex's OT1 font prints it as an em dash): |x| and |x - y| / z become math, a lone | too.
_MATH = [(r"log\(shift - 1\) = a \+ b log d", r"$\log(\mathrm{shift} - 1) = a + b \log d$"),
         (r"\|[^|\n]{1,40}\|(?:\s*/\s*[A-Za-z]\w*)?", _math_expr),  # |theory - frozen| / frozen, |b|
         (r"\bd cos\^2\(theta\)", r"$d\cos^2\theta$"), (r"\bcos\^2\(theta\)", r"$\cos^2\theta$"),
         (r"\bd cos\^2", r"$d\cos^2$"), (r"\bcos\^2", r"$\cos^2$"), (r"\bR\^2", r"$R^2$"), (r"\beta\^2", r"$\eta^2$"),
         (r"\b[A-Za-z]\^\{[^{}\n]{1,20}\}", lambda t: f"${t}$"),  # d^{-0.17}
         (r"\b[A-Za-z0-9]\^(?:[+-]?\d+(?:\.\d+)?|[A-Za-z]\b)",
          lambda t: "${}^{{{}}}$".format(*t.split("^"))),  # d^-1.02, 2^n
         (r"\b(" + "|".join(_GREEK) + r")\b", None), (r"->", r"$\to$"), (r"<=", r"$\le$"), (r">=", r"$\ge$"),
         (r"!=", r"$\ne$"),
         (r"\+/-|±", r"$\pm$"), (r"(?<=\s)~(?=\s?\d)|^~(?=\d)", r"$\approx$"),
         (r"(?<=\s)~(?=\s)", r"$\sim$"), (r"(?<![\w.])-(?=\d)", r"$-$"),
         (r"(?<=\s)-(?=\s)", r"$-$"), (r"<", r"$<$"), (r">", r"$>$"), (r"\|", r"$|$"), (r"_", r"\_\allowbreak{}"),
         (r'"[^"\n]+"', lambda t: f"``{tex_text(t[1:-1])}''")]  # "a title": TeX's opening and closing quotes
_MATH_RE = re.compile("|".join(f"(?P<r{i}>{pat})" for i, (pat, _) in enumerate(_MATH)))


def tex_text(text: str) -> str:
    """Escape `text` for LaTeX with its notation in math mode: R^2, eta^2, ->, <=, greek names, minus signs.

    Underscores may break a line there (long identifiers in notes stay within the text width).
    """
    out, pos, text = [], 0, str(text)
    for m in _MATH_RE.finditer(text):
        out.append(tex_escape(text[pos:m.start()]))
        rule = next(int(k[1:]) for k, v in m.groupdict().items() if v is not None)
        rep = _MATH[rule][1]
        out.append(f"$\\{m.group(0)}$" if rep is None else rep(m.group(0)) if callable(rep) else rep)
        pos = m.end()
    out.append(tex_escape(text[pos:]))
    return "".join(out)


_NUMERIC = re.compile(r"^([+-]?\d[\d.,]*(e[+-]?\d+)?%?|\[.*\]|n/a|)$")


def _merge_ci(headers: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """Put each interval column beside its estimate ("0.52 [0.31, 0.70]"): fewer columns, as papers print them."""
    heads, keep = list(headers), list(range(len(headers)))
    body = [list(r) for r in rows]
    for i in range(len(headers) - 1, 0, -1):
        ci = re.search(r"\d+% CI", headers[i])
        if ci and "CI" not in headers[i - 1] and all(r[i].startswith("[") or r[i] == NA for r in rows):
            heads[i - 1] = f"{headers[i - 1]} [{ci.group(0)}]"
            for r in body:
                r[i - 1] = r[i - 1] if r[i] == NA else f"{r[i - 1]} {r[i]}"
            keep.remove(i)
    return [heads[k] for k in keep], [[r[k] for k in keep] for r in body]


def _numeric(cells: list[str]) -> bool:
    """A column of numbers (an estimate, maybe with its interval, or n/a), at least one of them a number."""
    return all(_NUMERIC.match(c.split(" [")[0]) for c in cells) and any(c[:1].isdigit() or c[:1] in "+-"
                                                                       for c in cells)


def _column_spec(rows: list[list[str]], n: int) -> str:
    """`r` for numeric columns (numbers align on the right), `p{}` for long text (it wraps), `l` otherwise."""
    spec = []
    for j in range(n):
        cells = [r[j] for r in rows]
        if _numeric(cells):
            spec.append("r")
        elif max(len(c) for c in cells) > 40:
            spec.append(f"p{{{min(0.5, 0.9 / n + 0.2):.2f}\\linewidth}}")
        else:
            spec.append("l")
    return "".join(spec)


# Headers that say what a row is (a configuration's fields), numbers or not: a split table repeats them.
_KEY_HEADERS = frozenset(EXPERIMENT_FIELDS) | frozenset(DROPOUT_KEYS) | {
    "type", "placement", "rate", "rate / beta", "width", "widths", "widths tested", "backbone", "space", "factor",
    "level", "quantity", "seed", "depth", "dataset", "profile", "configuration"}
MAX_COLUMNS = 10  # more do not fit a page at a readable size
ROWS_PER_FLOAT = 40  # table rows a page holds at \\scriptsize beside the caption, headers and note


def _key_columns(headers: list[str], rows: list[list[str]]) -> int:
    """How many leading columns say what a row is: the leading run of text columns and of columns naming a
    configuration field (rate, width: numbers, yet part of the row's name)."""
    k = 0
    while k < len(headers) and (headers[k] in _KEY_HEADERS or not _numeric([r[k] for r in rows])):
        k += 1
    return k


def _split_columns(headers: list[str], rows: list[list[str]]) -> list[list[int]]:
    """The column indices of each stacked tabular: one part if it fits MAX_COLUMNS, else parts of about equal
    size that each start with the key columns (every part's row says which configuration it is)."""
    n = len(headers)
    keys = _key_columns(headers, rows)
    if n <= MAX_COLUMNS or keys >= n - 1:
        return [list(range(n))]
    rest = list(range(keys, n))
    per = max(MAX_COLUMNS - keys, 3)
    n_parts = math.ceil(len(rest) / per)
    size = math.ceil(len(rest) / n_parts)  # parts of about equal width
    return [list(range(keys)) + rest[i:i + size] for i in range(0, len(rest), size)]


def tex_table(t: Table) -> str:
    """A booktabs table float, ready to \\input: numbers right-aligned, math in math mode, within the text width.

    More than MAX_COLUMNS columns are split into stacked tabulars, each repeating the key columns (what a row
    is); one still wider than the text is scaled down to the text width by graphicx's \\resizebox (only then:
    narrow tables keep their size). More rows than a page holds continue in further floats.
    """
    if not t.rows:
        return f"% {tex_escape(t.title)}: no rows\n"
    headers, rows = _merge_ci(t.headers, t.rows)
    parts = _split_columns(headers, rows)
    # A float taller than a page runs off it: more rows than a page holds (counting every stacked part) go
    # into further floats, each with all the parts of its rows ("continued").
    n_floats = math.ceil(len(rows) * len(parts) / ROWS_PER_FLOAT)
    size = math.ceil(len(rows) / n_floats)
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
    out = []
    for i, chunk in enumerate(chunks):
        title = tex_text(t.title) + (f" (continued, {i + 1} of {len(chunks)})" if i else "")
        label = f"\\label{{tab:{t.key.replace('_', '-')}}}" if i == 0 else ""
        note = (f"\n\\par\\smallskip\\raggedright\\footnotesize {tex_text(t.note)}\\par"
                if t.note and i == len(chunks) - 1 else "")
        out.append(f"\\begin{{table}}[htbp]\n\\centering\\scriptsize\\setlength{{\\tabcolsep}}{{3pt}}\n"
                   f"\\caption{{{title}}}{label}\n"
                   + "\\par\\medskip\n".join(_tabular([headers[j] for j in cols], [[r[j] for j in cols] for r in chunk])
                                              for cols in parts)
                   + f"{note}\n\\end{{table}}\n")
    return "".join(out)


def _tabular(headers: list[str], rows: list[list[str]]) -> str:
    """One booktabs tabular, scaled down to the text width only if it is wider (graphicx's \\resizebox)."""
    head = " & ".join(tex_text(h) for h in headers)
    body = "\n".join(" & ".join(tex_text(c) for c in r) + r" \\" for r in rows)
    return (f"\\resizebox{{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}}{{!}}{{%\n"
            f"\\begin{{tabular}}{{{_column_spec(rows, len(headers))}}}\n\\toprule\n{head} \\\\\n\\midrule\n{body}\n"
            f"\\bottomrule\n\\end{{tabular}}}}\n")


def tex_figure(stem: str, caption: str) -> str:
    """A figure float for figures/<stem>.pdf (pdflatex picks the PDF; the PNG is for report.md).

    At its natural size (its fonts at the point sizes they were drawn with), scaled down only where it is
    wider than the text or taller than 3/4 of the page: a one-panel figure is not blown up to the text width.
    """
    return (f"\\begin{{figure}}[htbp]\n\\centering\n"
            f"\\resizebox{{!}}{{\\ifdim\\height>0.75\\textheight 0.75\\textheight\\else\\height\\fi}}{{%\n"
            f"\\resizebox{{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}}{{!}}{{%\n"
            f"\\includegraphics[scale=1]{{figures/{stem}}}}}}}\n"
            f"\\caption{{{tex_text(caption)}}}\\label{{fig:{stem.replace('_', '-')}}}\n\\end{{figure}}\n")


# The packages report.tex needs, stated in its first lines; tests/test_latex.py compiles it with exactly these.
TEX_PREAMBLE = r"\usepackage{booktabs}\usepackage{graphicx}"


SECTIONS = [  # (heading, table keys, figure stem prefixes)
    ("Width at the same BN position", ["width_effect"], ["shift_vs_width"]),
    ("D = d cos^2(theta) over training and width", ["d_cos2", "d_cos2_width"], ["d_cos2_vs_epoch"]),
    ("Variance shift vs feature dimension", ["shift_fit"], ["shift_by_layer", "shift_vs_dim"]),
    ("Accuracy vs width", ["cost", "critical"], ["accuracy_vs_width"]),
    ("BN re-estimation", ["reest", "reest_pooled"], ["bn_reestimation"]),
    ("The noise floor", ["noise_floor"], []),
    ("The mechanism: three predictions vs the measurement", ["mechanism", "mechanism_paper", "width_mechanism"],
     ["decomposition"]),
    ("Factor importance", ["factors_test_acc", "factors_mean_shift"], []),
    ("The follow-up literature: where dropout goes, and when it is on", ["kim2023", "liu2023"],
     ["literature_placements", "literature_schedules"]),
    ("One-factor-at-a-time ablation", ["ablation"], []),
    ("Per-layer metrics", ["layer_metrics"], []),
    ("The paper's numbers beside ours", ["paper"], []),
]


def code_versions_lines(trials: Any) -> list[str]:
    """The report's "Code versions" lines: trials per code version (search.code_version), and a warning
    when the study mixes versions (its numbers then come from different code)."""
    col = trials.column("code_version").to_pylist() if "code_version" in trials.schema.names else []
    counts: dict[str, int] = {}
    for v in col:
        key = v or "unrecorded (written before code versions were recorded)"
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        return []
    out = ["**Code versions**", ""] + [f"- `{v}`: {n} trial(s)" for v, n in sorted(counts.items())] + [""]
    if len(counts) > 1:
        out += [f"> **Warning: mixed code versions.** These {sum(counts.values())} trials were produced by "
                f"{len(counts)} code versions; a change in the trainer or the probes between them makes their "
                "numbers incomparable. Rerun the sweep (it retrains trials of other code by default) or "
                "restrict the study to one version.", ""]
    return out


def render_markdown(a: Analysis, full: Study, tables: list[Table], gls: list[Guideline], figs: list[Any],
                    profile_text: str = "") -> str:
    """The whole report.md; `profile_text` (from select_profile) goes into the setup."""
    by = {t.key: t for t in tables}
    fixed = [f"{k}={v}" for k in EXPERIMENT_FIELDS if k in full.trials.schema.names
             and len(vals := set(full.trials.column(k).to_pylist())) == 1 for v in vals]
    out = [f"# Dropout x BatchNorm study: {', '.join(full.spaces)}", "",
           f"Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC from {', '.join(full.paths)}.", "",
           "## Setup", "", f"Spaces: {', '.join(full.spaces)}; {full.trials.num_rows} trials, "
           f"{full.layers.num_rows} BN-layer rows. Fits use trials with status ok. Intervals are "
           f"{a.level:.0%}, two-sided.", ""]
    out += [profile_text, ""] if profile_text else []
    out += [f"Fixed settings: {', '.join(fixed) or 'none'}.", ""]
    out += [line, ""] if (line := samples_line(full.trials)) else []
    out += [md_table(by["status"]), md_table(by["configs"])]
    out += code_versions_lines(full.trials)
    if a.notes:
        out += ["**What this study lacks, and what loading repaired**", ""] + [f"- {n}" for n in a.notes] + [""]
    if a.floor is not None and a.floor.flagged:
        fl = a.floor
        out += [f"> **Warning: noise floor.** {len(fl.flagged)} of {fl.n_trials} trials have a variance shift above "
                f"{fl.limit:g} at BN layers no dropout reaches (their running statistics had not converged); "
                + ("every fit below uses them, and no guideline is drawn." if a.all_flagged else
                   "they are left out of every fit and guideline.") + " See \"The noise floor\".", ""]
    out += ["## Guidelines (generated from the data)", ""]
    if gls:
        out += [f"{i}. {g.text}." for i, g in enumerate(gls, 1)] + [""]
    else:
        out += ["No guideline: no fit in this study has an interval that supports a statement.", ""]
    for heading, keys, stems in SECTIONS:
        if keys in (["ablation"], ["layer_metrics"], ["kim2023", "liu2023"]) and not any(k in by for k in keys):
            continue  # only a study run with --ablate (registered per-layer metrics; the literature's placements
            # or schedules) has this section
        out += [f"## {heading}", ""]
        out += [md_table(by[k]) for k in keys if k in by]
        for f in figs:
            if any(f.stem.startswith(s) for s in stems):
                out += [f"![{f.caption}](figures/{f.stem}.png)", "", f"*{f.caption}* ([PDF](figures/{f.stem}.pdf))", ""]
    out += [PAPER_NOTE, ""]
    return "\n".join(out)


def render_tex(a: Analysis, full: Study, tables: list[Table], gls: list[Guideline], figs: Sequence[Any] = ()) -> str:
    """report.tex: a paper-ready fragment (guidelines, then per section its tables and figure floats).

    Its first lines state the preamble it needs (TEX_PREAMBLE) and where the figures are.
    """
    out = [f"% Generated by analysis.report for {', '.join(full.spaces)}: \\input{{report}} into a LaTeX document.",
           f"% Preamble: {TEX_PREAMBLE}",
           "% Figures: figures/<name>.pdf beside this file; from another folder add \\graphicspath{{<this folder>/}}.",
           ""]
    if (line := samples_line(full.trials)):
        out += [tex_text(line), ""]
    if gls:
        out += ["\\begin{itemize}"] + [f"  \\item {tex_text(g.text)}." for g in gls] + ["\\end{itemize}", ""]
    else:
        out += ["% No guideline: no fit has an interval that supports a statement.", ""]
    by, in_sections = {t.key: t for t in tables}, {k for _, keys, _ in SECTIONS for k in keys}
    out += [tex_table(t) for t in tables if t.key not in in_sections]  # the setup: status, configurations
    for heading, keys, stems in SECTIONS:
        out.append(f"% --- {heading}")
        out += [tex_table(by[k]) for k in keys if k in by]
        out += [tex_figure(f.stem, f.caption) for f in figs if any(f.stem.startswith(s) for s in stems)]
    placed_figs = {f.stem for f in figs if any(f.stem.startswith(s) for _, _, st in SECTIONS for s in st)}
    out += [tex_figure(f.stem, f.caption) for f in figs if f.stem not in placed_figs]
    return "\n".join(out)


def ablation_table(study: Study, root: str, level: float = 0.95) -> Table | None:
    """The "ablation" table from the plans `search.run --ablate` stored beside the study (None: no plan)."""
    from search.sweep.ablate import read_plan

    from .ablation import ablation_rows

    plans = [(s, p) for s in study.spaces if (p := read_plan(root, s)) is not None]
    if not plans:
        return None
    lvl = f"{level:.0%} CI"
    t = Table("ablation", "One factor changed at a time: effect against the baseline, paired by seed",
              ["space", "factor", "level", "seeds", "acc base (%)", "acc (%)", "d acc (pp)", lvl,
               "d re-est. gain (pp)", lvl, "d mean shift", lvl])
    bases = []
    for space, plan in plans:
        base = plan["baseline"]
        bases.append(f"{space}: " + ", ".join(f"{k}={base[k]}" for k in ("backbone", "depth", "width",
                     "dropout_placement", "dropout_type", "dropout_rate", "dataset", "epochs") if k in base))
        for r in ablation_rows(study, plan, level=level):
            acc, gain, shift = (r.effects[k] for k in ("test_acc", "reest_gain", "mean_shift"))
            t.rows.append([space, r.factor, str(r.level), str(len(r.seeds)), _f(acc.baseline, 2, 100),
                           _f(acc.variant, 2, 100), _f(acc.diff, 2, 100, True), _ci(acc.ci_low, acc.ci_high, 2, 100),
                           _f(gain.diff, 2, 100, True), _ci(gain.ci_low, gain.ci_high, 2, 100),
                           _f(shift.diff, 3, sign=True), _ci(shift.ci_low, shift.ci_high, 3)])
    t.note = ("d = variant - baseline over the seeds where both trials are ok; Student-t intervals on the paired "
              "differences (n/a for one seed). Baseline: " + "; ".join(bases) + ".")
    return t


# How the report's errors name what a user types (analysis.load_study's Python names otherwise).
CLI_NAMES = {"root": "--storage", "tracking_uri": "--tracking-uri", "profile": "--profile"}


def write_report(spaces: str | Sequence[str], root: str = "results", out: str | None = None,
                 tracking_uri: str | None = None, *, n_boot: int = 1000, seed: int = 0, figures: bool = True,
                 profile: str | None = None, log: Callable[[str], None] | None = None) -> str:
    """Load, analyse and write report.md, report.tex and figures/; returns the output folder.

    `profile` picks the trials (see `select_profile`; None: each space's latest sweep); `log` gets the
    sentence saying which profile was reported (it is in report.md's setup too).

    Raises:
        ValueError: the study is empty, unknown or unreadable, or has no trials of `profile` (nothing is
            written then).
    """
    study = load_study(spaces, root=root, tracking_uri=tracking_uri, profile=ALL_PROFILES, names=CLI_NAMES)
    study, profile_text = select_profile(study, profile)
    if log is not None:
        log(profile_text)
    a = analyse(study, n_boot=n_boot, seed=seed)
    gls, tables = guidelines(a), build_tables(a, study)
    abl = ablation_table(study, root, level=a.level)
    if abl is not None:
        tables.insert(next((i for i, t in enumerate(tables) if t.key == "paper"), len(tables)), abl)
    out = out or os.path.join("reports", "+".join(study.spaces))
    from search.outputs import check_output_dir  # nothing renamed over a device, before anything is written

    check_output_dir(out, "--out", ("report.md", "report.tex", "report.html"), {"figures": (".png", ".pdf")})
    figs = []
    if figures:
        from .figures import write_figures  # matplotlib only here

        figs = write_figures(a, os.path.join(out, "figures"), seed=seed)
    os.makedirs(out, exist_ok=True)
    md = render_markdown(a, study, tables, gls, figs, profile_text=profile_text)
    _write_atomic(os.path.join(out, "report.md"), md)
    from .html import markdown_to_html  # the same page, figures embedded: what MLflow's artifact viewer shows

    page = markdown_to_html(md, out, title=f"report: {'+'.join(study.spaces)}")
    _write_atomic(os.path.join(out, "report.html"), page)
    _write_atomic(os.path.join(out, "report.tex"), render_tex(a, study, tables, gls, figs))
    return out


def _write_atomic(path: str, text: str) -> None:
    """Write beside `path`, then rename: an interrupted report never leaves a half-written file."""
    # A name of this writer's own: two reports into one --out never clobber or rename each other's file
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    with open(tmp, "x", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 on a user error, printed as one line)."""
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    p.add_argument("--space", action="append", required=True, help="space name (repeat to combine spaces)")
    p.add_argument("--storage", "--root", dest="root", default="results",
                   help="the sweep's --storage: results folder holding <space>/trials and <space>/layers "
                        "(--root is the same flag)")
    p.add_argument("--out", default=None, help="output folder (default reports/<space>)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store to rebuild missing Parquet from")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for the slope CIs")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.add_argument("--profile", default=None,
                   help="the profile to report (default: each space's latest sweep; 'all' pools every profile)")
    p.add_argument("--plugin", action="append", default=[], metavar="PATH_OR_MODULE",
                   help="the plugin(s) the study's trials used, so their names resolve (docs/extending.md)")
    p.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    try:
        from search.plugins import load_plugins

        load_plugins(args.plugin)
        if args.n_boot < 100:
            raise ValueError(f"--n-boot must be >= 100, got {args.n_boot}")
        out = write_report(args.space, args.root, args.out, args.tracking_uri, n_boot=args.n_boot, seed=args.seed,
                           figures=not args.no_figures, profile=args.profile, log=print)
    except (ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"analysis.report: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 2
    print(f"wrote {os.path.join(out, 'report.md')}, report.html (figures embedded), report.tex and figures/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
