"""run_trial end to end on the bundled digits, and the one-trial CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from search.config import TrialConfig
from search.trial.cli import main
from search.trial.runner import run_trial

SMALL_WRN = TrialConfig(backbone="cifar_wrn", depth=10, width=1, dataset="digits", image_size=8, in_chans=1,
                        epochs=6, batch_size=64, lr=0.05, device="cpu")


def test_small_wrn_learns_digits_and_is_reproducible() -> None:
    a = run_trial(SMALL_WRN)
    assert a.status == "ok" and a.epochs_completed == 6
    assert a.test_acc > 0.80  # chance is 0.10
    assert len(a.layers) == 7 and [x.index for x in a.layers] == list(range(7))
    assert abs(a.mean_shift_reest - 1) < 0.01  # re-estimated BN statistics match the data
    b = run_trial(SMALL_WRN)
    timing = ("epoch_time_s", "throughput")
    strip = lambda h: [{k: v for k, v in e.items() if k not in timing} for e in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)  # bit for bit on CPU
    assert [x.shift for x in a.layers] == [x.shift for x in b.layers]


def test_dropout_before_bn_shifts_more_than_none() -> None:
    none = run_trial(SMALL_WRN.replace(epochs=3))
    pre_bn = run_trial(SMALL_WRN.replace(epochs=3, dropout_placement="pre_bn", dropout_rate=0.5))
    fed = [x for x in pre_bn.layers if x.fed_by_dropout]
    assert len(fed) == 3  # one site per block
    # Finding 1 of the paper: dropout before BN moves the BN input's variance between train and test.
    assert min(x.shift for x in fed) > max(x.shift for x in none.layers)


def test_divergence_is_a_result_not_an_exception() -> None:
    r = run_trial(SMALL_WRN.replace(lr=1e6, epochs=2))
    assert r.status == "diverged" and not r.layers and r.epochs_completed < 2


def test_cli_prints_summary_and_layers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r.json"
    rc = main(["--depth", "10", "--image-size", "8", "--in-chans", "1", "--epochs", "1", "--device", "cpu",
               "--dropout-placement", "pre_bn", "--dropout-rate", "0.3", "--layers", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "test acc" in text and "after BN re-est." in text and "body.0.0.bn2" in text
    saved = json.loads(out.read_text())
    assert saved["config"]["dropout_rate"] == 0.3 and len(saved["result"]["layers"]) == 7


def test_cli_bad_input_is_one_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["--depth", "11"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "field 'depth' = 11 is invalid for backbone 'cifar_wrn'" in err[0]


def test_probe_samples_limits_the_probe_pass() -> None:
    r = run_trial(SMALL_WRN.replace(epochs=1, probe_samples=256))
    assert r.status == "ok" and len(r.layers) == 7
    assert abs(r.mean_shift_reest - 1) < 0.01  # re-estimated and measured on the same 256 images
    assert SMALL_WRN.replace(probe_samples=256).config_hash != SMALL_WRN.config_hash
