"""analysis.findings: the paper's five findings on a planted study whose answers are known."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from test_analysis_fit import _study, planted_study, write_study

from analysis.findings import FAILS, HOLDS, UNTESTABLE, findings, main
from analysis.theory import noise_var


def _planted(head_gain: float = 0.0) -> tuple[pa.Table, pa.Table]:
    """Shift of fed BNs = 1 + noise variance x (2 for pre_bn, 1 for pre_conv) x (1 + small noise), costing
    0.2 x (shift - 1) of accuracy, half of it won back by re-estimation; head changes accuracy by `head_gain`."""
    trials, layers = planted_study(placements=("none", "pre_bn", "pre_conv", "head"), types=("bernoulli", "uout"),
                                   rates=(0.1, 0.5), widths=(1.0, 2.0), seeds=(0, 1, 2), rng=5)
    g = np.random.default_rng(1)
    t = trials.to_pydict()
    for i, (ty, pl, r) in enumerate(zip(t["dropout_type"], t["dropout_placement"], t["dropout_rate"])):
        k = {"pre_bn": 2.0, "pre_conv": 1.0}.get(pl, 0.0)
        t["mean_shift_fed"][i] = 1 + k * float(noise_var(ty, r)) * (1 + 0.02 * g.normal()) if k else float("nan")
        excess = t["mean_shift_fed"][i] - 1 if k else 0.0
        t["test_acc"][i] -= 0.2 * excess  # the shift costs accuracy; re-estimation wins half of it back
        t["test_acc_reest"][i] = t["test_acc"][i] + 0.1 * excess + 0.001
        if pl == "head":
            t["test_acc"][i] += head_gain
            t["test_acc_reest"][i] += head_gain
    return pa.table(t, schema=trials.schema), layers


def test_findings_on_a_planted_study() -> None:
    fs = {f.number: f for f in findings(_study(*_planted(head_gain=0.01)))}
    assert fs[1].verdict.startswith(HOLDS + " for rate and (a) > (b);") and "except" not in fs[1].verdict
    assert UNTESTABLE in fs[1].verdict  # one family
    assert fs[2].verdict == HOLDS  # every cell gains (+0.1 pp at least), and pre_bn stays below no dropout
    assert fs[3].verdict == HOLDS  # planted: head adds 1 pp
    assert fs[4].verdict.startswith(HOLDS + " at the same nominal rate")
    assert "matched noise variance" in fs[4].verdict  # uout 0.5 (0.083) vs bernoulli 0.1 (0.111)
    assert fs[5].verdict == UNTESTABLE
    fs = {f.number: f for f in findings(_study(*_planted(head_gain=-0.02)))}
    assert fs[3].verdict.startswith(FAILS)


def test_cli_prints_every_finding_and_refuses_an_unknown_profile(tmp_path, capsys) -> None:
    write_study(str(tmp_path), *_planted(), space="planted")
    assert main(["--space", "planted", "--storage", str(tmp_path)]) == 0  # search.run's name for the folder
    out = capsys.readouterr().out
    assert all(f"\n{i}. " in out for i in range(1, 6)) and "-> " in out
    assert main(["--space", "planted", "--root", str(tmp_path), "--profile", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("analysis.findings: error: --profile 'nope'") and err.count("\n") == 1


def test_scheduled_and_groupnorm_trials_stay_out_of_the_papers_findings() -> None:
    """A study that also ran early dropout and GroupNorm: the findings rest on the paper's setting only."""
    import pyarrow as pa

    from analysis.findings import paper_setting

    t = pa.table(dict(dropout_schedule=[None, "constant", "early", None, None],
                      normalization=[None, None, None, "groupnorm", "batchnorm"]))
    assert paper_setting(t).to_pylist() == [True, True, False, False, True]
    assert paper_setting(pa.table(dict(x=[1, 2]))).to_pylist() == [True, True]  # files from before both axes


def test_a_study_with_one_rate_does_not_claim_the_rate_effect() -> None:
    """Finding 1's rate part needs two rates: with one (the literature study's), it cannot be tested, not 'holds'."""
    trials, layers = _planted()
    one = pa.compute.equal(trials.column("dropout_rate"), 0.5)
    keep = pa.compute.or_(one, pa.compute.equal(trials.column("dropout_placement"), "none"))
    (f1,) = [f for f in findings(_study(trials.filter(keep), layers)) if f.number == 1]
    assert f1.verdict == (f"{HOLDS} for (a) > (b); rate {UNTESTABLE} (one level); WRN vs other families "
                          f"{UNTESTABLE}")
    (f1,) = [f for f in findings(_study(trials, layers)) if f.number == 1]
    assert f1.verdict.startswith(f"{HOLDS} for rate and (a) > (b)")
