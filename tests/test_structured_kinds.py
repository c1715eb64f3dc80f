"""The structured dropout kinds (issue 29): channel, droppath, dropblock, and any nn.Module dropout class.

Each kind's masks are proven by their shape (what one mask covers), their statistics are tested
against closed forms with standard errors counted in independent masks (not elements), DropBlock
is timm's own function, its block size is a hashed config field, and a plugin registering timm's
`DropBlock2d` unchanged runs through a 1-epoch trial. Tolerances: 5 standard errors.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from search import contracts, plugins, registry
from search.config import ConfigError, TrialConfig
from search.trial.dropout.module import ModuleDropout, VarianceDropout, make_dropout

N_SE = 5.0
C, V = 1.5, 0.5  # the BN input's mean and variance, as in tests/test_dropout_kinds.py


def multiplier(kind: str, shape: tuple[int, ...], rate: float, seed: int = 0, **kw) -> torch.Tensor:
    """The train-mode multiplier m of `kind` (its output on x = 1), in float64."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return make_dropout(kind, rate, **kw).train()(torch.ones(shape, dtype=torch.float64))


# ------------------------------------------------------------------ what one mask covers
def test_channel_masks_are_shared_by_a_channels_positions_only() -> None:
    m = multiplier("channel", (64, 8, 5, 5), 0.5)
    assert torch.equal(m, m[..., :1, :1].expand_as(m))  # one value per (sample, channel)
    per = m[..., 0, 0]
    assert set(per.unique().tolist()) == {0.0, 2.0}  # Bernoulli(1 - rate) / (1 - rate)
    assert not torch.equal(per, per[:, :1].expand_as(per))  # channels of a sample draw apart


def test_droppath_masks_one_per_sample() -> None:
    m = multiplier("droppath", (64, 8, 5, 5), 0.5)
    assert torch.equal(m, m[:, :1, :1, :1].expand_as(m))
    assert set(m[:, 0, 0, 0].unique().tolist()) == {0.0, 2.0}
    v = multiplier("droppath", (64, 10), 0.5)  # before a classifier: the whole feature vector
    assert torch.equal(v, v[:, :1].expand_as(v))


@pytest.mark.parametrize("kind", ["channel", "droppath"])
@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_case_a_identity_holds_with_the_marginal_noise_var(kind: str, rate: float) -> None:
    """BN right after the dropout sees E[y^2] = (c^2 + v) / p per channel, Var_train = v + k (c^2 + v).

    Only one element's marginal enters a BN's per-channel moments, so the element-wise case (a) holds
    for shared masks too; the standard error comes from the independent units of the kind's structure.
    """
    g = torch.Generator().manual_seed(1)
    x = C + math.sqrt(V) * torch.randn(4000, 4, 4, 4, generator=g, dtype=torch.float64)
    torch.manual_seed(2)
    y = make_dropout(kind, rate).train()(x)
    structure = registry.get("dropout", kind).meta["structure"]
    assert structure == {"channel": "channel", "droppath": "sample"}[kind]
    u1, u2 = contracts.independent_units(y, structure), contracts.independent_units(y * y, structure)
    k = registry.get("dropout", kind).obj.noise_var(rate)
    want = V + k * (C * C + V)  # the paper's Var_train for case (a) with this kind's marginal k
    se1, se2 = u1.std().item() / math.sqrt(u1.numel()), u2.std().item() / math.sqrt(u2.numel())
    assert abs(u1.mean().item() - C) < N_SE * se1
    assert abs(u2.mean().item() - (want + C * C)) < N_SE * se2, (u2.mean().item(), want + C * C, se2)
    assert want > V + 0.1  # the noise adds variance, so the test has something to detect


def test_dropblock_is_timms_drop_block_2d() -> None:
    from timm.layers import DropBlock2d

    x = torch.randn(8, 3, 12, 12)
    torch.manual_seed(5)
    ours = make_dropout("dropblock", 0.2, block_size=3).train()(x)
    torch.manual_seed(5)
    timms = DropBlock2d(0.2, 3).train()(x)
    assert torch.equal(ours, timms) and not torch.equal(ours, x)


def test_dropblock_drops_blocks_at_timms_seed_rate() -> None:
    """Position (i, j) is dropped when a seed (rate gamma) lies in its clipped k x k neighbourhood of
    n_ij positions: P(drop) = 1 - (1 - gamma)^n_ij; one mask per sample, shared by its channels;
    kept values scaled by elements / kept elements of the batch."""
    b, h, k, rate = 4000, 12, 3, 0.2
    m = multiplier("dropblock", (b, 3, h, h), rate, block_size=k)
    assert torch.equal(m, m[:, :1].expand_as(m))  # coupled channels
    kept = m[:, 0] != 0
    assert torch.allclose(m[:, 0][kept], torch.full_like(m[:, 0][kept], m.numel() / (3 * kept.sum().item())))
    assert abs(m.mean().item() - 1.0) < 1e-6
    gamma = rate * h * h / (k * k) / ((h - k + 1) ** 2)
    idx = torch.arange(h)
    cover = ((idx[:, None] - idx[None, :]).abs() <= k // 2).sum(1).double()  # seeds covering a row, clipped
    want = (1 - (1 - gamma) ** (cover[:, None] * cover[None, :])).mean().item()
    per_sample = (~kept).double().flatten(1).mean(1)  # masks are independent across samples only
    se = per_sample.std().item() / math.sqrt(b)
    assert abs(per_sample.mean().item() - want) < N_SE * se, (per_sample.mean().item(), want, se)


def test_dropblock_refuses_vectors_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"'dropblock' needs \(N, C, H, W\) feature maps, got shape \(4, 8\)"):
        make_dropout("dropblock", 0.2).train()(torch.ones(4, 8))
    # Surgery refuses the pair before inserting anything, so the placement contract says it in one line.
    with pytest.raises(contracts.ContractError, match="surgery fails: ValueError: field 'dropout_type' = 'dropblock'"
                                                      " needs \\(N, C, H, W\\) feature maps, but placement 'head'"):
        contracts.check_placement("head", "cifar_wrn", kind="dropblock")


# ------------------------------------------------------------------ the block size is hashed config
def test_block_size_is_a_hashed_field_whose_default_keeps_the_hash() -> None:
    base = TrialConfig(dropout_type="dropblock", dropout_placement="pre_bn", dropout_rate=0.2)
    assert TrialConfig(**{**base.to_dict(), "dropout_block_size": 7}).dropout_block_size is None  # timm's default
    assert TrialConfig(**{**base.to_dict(), "dropout_block_size": 7}).config_hash == base.config_hash
    three = base.replace(dropout_block_size=3)
    assert three.dropout_block_size == 3 and three.config_hash != base.config_hash
    from search.trial.models import build_model

    model = build_model(three.replace(in_chans=1, image_size=8, depth=10))
    drops = [m for m in model.modules() if isinstance(m, VarianceDropout)]
    assert len(drops) == 3 and {m.impl.block_size for m in drops} == {3}


@pytest.mark.parametrize("changes, want", [
    (dict(dropout_type="bernoulli", dropout_block_size=3),
     "field 'dropout_block_size' = 3 applies only to dropout kinds that take a block size (dropblock); dropout_type"
     " is 'bernoulli' (allowed: None)"),
    (dict(dropout_type="dropblock", dropout_block_size=0), "field 'dropout_block_size' = 0 is out of range"
                                                           " (allowed: 1 to 8192)"),
    (dict(dropout_type="dropblock", dropout_placement="head"),
     "field 'dropout_type' = 'dropblock' needs (N, C, H, W) feature maps, but placement 'head' feeds it vectors"),
])
def test_bad_block_settings_name_field_value_and_allowed(changes: dict, want: str) -> None:
    with pytest.raises(ConfigError) as err:
        TrialConfig(**{"dropout_placement": "pre_bn", "dropout_rate": 0.2, **changes})
    assert want in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ the contract counts independent masks
@pytest.fixture
def temp_kind():
    """Register throwaway kinds; unregistered afterwards."""
    names: list[str] = []

    def make(name: str, scale: float = 1.0, noise_var=None, **meta) -> str:
        from search.trial.dropout.kinds import DropoutKind

        def noise(self, x):  # DropPath's mask, written as the tutorial's spatial kind; `scale` biases its mean
            keep = 1.0 - self.rate
            shape = (x.shape[0],) + (1,) * (x.dim() - 1)
            return torch.bernoulli(torch.full(shape, keep, dtype=x.dtype)) * scale / keep

        body = {"closed_form": None, "noise": noise}
        if noise_var is not None:
            body["noise_var"] = classmethod(lambda cls, rate: noise_var(rate))
        registry.register_dropout(name, **meta)(type(name, (DropoutKind,), body))
        names.append(name)
        return name

    yield make
    for n in names:
        registry.unregister("dropout", n)


def test_a_per_sample_kind_passes_on_20_seeds(temp_kind) -> None:
    """Its masks are independent across samples only; standard errors from N * C elements failed 12 of 20."""
    undeclared = temp_kind("t_path")  # no closed form, no structure: the safe default, 'sample'
    declared = temp_kind("t_path_declared", structure="sample")
    assert registry.get("dropout", undeclared).meta["structure"] == "sample"
    for seed in range(20):
        contracts.check_dropout(undeclared, seed=seed)
        contracts.check_dropout(declared, seed=seed)


def test_a_per_sample_kind_declared_elementwise_fails_on_most_seeds(temp_kind) -> None:
    """The old check's mistake, kept reachable: the same masks counted as elements look biased."""
    k = temp_kind("t_path_elem", structure="element")
    failed = 0
    for seed in range(20):
        try:
            contracts.check_dropout(k, seed=seed)
        except contracts.ContractError as e:
            failed += 1
            assert "independent element masks" in str(e) and "declare structure='channel' or 'sample'" in str(e)
    assert failed >= 15  # 20 of 20 measured; counted per sample (above) none fails


def test_a_biased_per_sample_kind_fails(temp_kind) -> None:
    k = temp_kind("t_path_biased", scale=1.1)  # E[m] = 1.1
    want = (r"train-mode mean multiplier 1\.(09|10|11)\d* on \(4096, 64\) inputs, expected 1 \(\+- 0\.0\d+ from 4096"
            r" independent sample masks\)")
    with pytest.raises(contracts.ContractError, match=want):
        contracts.check_dropout(k)


def test_a_case_a_kind_is_held_to_its_marginal_noise_var(temp_kind) -> None:
    ok = temp_kind("t_path_a", closed_form="case_a", noise_var=lambda r: r / (1 - r))
    contracts.check_dropout(ok)  # DropPath's masks: one element's variance is Bernoulli's
    wrong = temp_kind("t_path_a_wrong", closed_form="case_a", noise_var=lambda r: r * r / 3)  # uout's
    with pytest.raises(contracts.ContractError, match=r"one element's multiplier has variance 0\.2[45]\d*, but "
                                                      r"noise_var\(0\.2\) = 0\.0133"):
        contracts.check_dropout(wrong)


# ------------------------------------------------------------------ any nn.Module dropout class
PLUGIN = '''
"""timm's DropBlock2d, registered unchanged: the framework wraps it."""
from timm.layers import DropBlock2d

from search import register_dropout

register_dropout("timm_dropblock", structure="sample", needs_map=True)(DropBlock2d)
'''


@pytest.fixture
def timm_plugin(tmp_path: Path):
    before = set(plugins._LOADED)
    path = tmp_path / "timm_dropblock_plugin.py"
    path.write_text(PLUGIN)
    yield plugins.load_plugin(str(path), check=True)  # check: its contract runs, as --plugin does
    for name in set(plugins._LOADED) - before:
        plugins.unload(name)


def test_a_plain_module_class_is_wrapped_and_checked(timm_plugin) -> None:
    from timm.layers import DropBlock2d

    from search.trial.probes import is_active_dropout

    entry = registry.get("dropout", "timm_dropblock")
    assert entry.obj is DropBlock2d and not hasattr(DropBlock2d, "kind")  # the class itself is left alone
    assert entry.meta["block_size"] == 7 and entry.meta["closed_form"] is None  # read from its constructor
    mod = make_dropout("timm_dropblock", 0.3, block_size=3)
    assert isinstance(mod, ModuleDropout) and isinstance(mod.inner, DropBlock2d)
    assert mod.kind == "timm_dropblock" and mod.inner.block_size == 3 and mod.inner.drop_prob == 0.3
    assert is_active_dropout(mod) and not is_active_dropout(make_dropout("timm_dropblock", 0.0))
    x = torch.randn(4, 2, 6, 6)
    assert torch.equal(mod.eval()(x), x)
    torch.manual_seed(3)
    y = mod.train()(x)
    torch.manual_seed(3)
    assert torch.equal(y, DropBlock2d(0.3, 3).train()(x))  # runs the module itself in train mode
    contracts.check_dropout("timm_dropblock")


@pytest.mark.usefixtures("no_onednn")
def test_a_plugin_registering_timms_dropblock_runs_a_trial(timm_plugin) -> None:
    from spaces import get_space
    from search.trial.runner import run_trial

    smoke = get_space("smoke").fixed
    cfg = TrialConfig.from_dict({**smoke, "dropout_type": "timm_dropblock", "dropout_placement": "pre_bn",
                                 "dropout_rate": 0.3, "dropout_block_size": 3, "device": "cpu"})
    assert cfg.plugins == timm_plugin.identity
    r = run_trial(cfg)
    assert r.status == "ok", r.error
    fed = [layer for layer in r.layers if layer.fed_by_dropout]
    assert len(fed) == 3  # WRN-10-1: one site per block, each found by the probes through the wrapper
    assert all(math.isfinite(layer.shift) for layer in fed)


STRUCTURED = [e.name for e in registry.entries("dropout") if e.meta["closed_form"] is None]


@pytest.mark.usefixtures("no_onednn")
@pytest.mark.parametrize("kind", STRUCTURED)
def test_every_structured_kind_runs_a_trial_and_feeds_the_probes(kind: str) -> None:
    """1 epoch of the smoke configuration (WRN-10-1, 8 px digits): the probes find every site of the kind."""
    from spaces import get_space
    from search.trial.runner import run_trial

    cfg = TrialConfig.from_dict({**get_space("smoke").fixed, "dropout_type": kind, "dropout_placement": "pre_bn",
                                 "dropout_rate": 0.3, "device": "cpu", "train_samples": 128})
    r = run_trial(cfg)
    assert r.status == "ok", r.error
    fed = [layer for layer in r.layers if layer.fed_by_dropout]
    assert len(fed) == 3 and all(math.isfinite(layer.shift) for layer in fed)
    # The frozen measurement sees the noise; the propagation has no rule for shared masks and says
    # unknown (NaN) rather than predicting no noise (it predicted exactly 1 before).
    assert all(layer.shift_frozen > 1.0 and math.isnan(layer.shift_theory) for layer in fed)


# ------------------------------------------------------------------ the analysis skips them and says so
def test_analysis_gives_no_closed_form_for_structured_kinds_and_says_so() -> None:
    """channel and droppath: the case (a) closed form only (pre_bn); dropblock: none; the fit says which."""
    from analysis.fit import NO_CLOSED_FORM, shift_vs_dim
    from analysis.guidelines import analyse
    from analysis.report import build_tables
    from analysis.theory import closed_form_kinds, predict_layer_shift, shift_case_a

    assert not {"channel", "droppath", "dropblock"} & set(closed_form_kinds())
    assert {"channel", "droppath"} <= set(closed_form_kinds("a")) and "dropblock" not in closed_form_kinds("a")
    # Case (a) with the marginal k = rate / (1 - rate): Bernoulli's formula, the paper's shift max(D, 1/D).
    delta = float(shift_case_a(0.5, 0.1, 1.0))
    assert float(predict_layer_shift("channel", "pre_bn", 0.5, 0.1, 1.0)) == pytest.approx(1 / delta, rel=1e-12)
    with pytest.raises(ValueError, match="field 'dropout_type' = 'channel' has no closed form for case \\(b\\)"):
        predict_layer_shift("channel", "pre_conv", 0.5, 0.1, 1.0, 9, 0.5, 0.1)
    with pytest.raises(ValueError, match="field 'dropout_type' = 'dropblock' has no closed form for case \\(a\\)"):
        predict_layer_shift("dropblock", "pre_bn", 0.5, 0.1, 1.0)
    from test_analysis_fit import _study, planted_study

    study = _study(*planted_study(placements=("none", "pre_bn", "pre_conv"), types=("bernoulli", "channel",
                                  "dropblock"), seeds=(0, 1, 2), widths=(1.0, 2.0), n_layers=6))
    fits = {(f.dropout_type, f.dropout_placement): f for f in shift_vs_dim(study, n_boot=50)}
    for key in [("channel", "pre_conv"), ("dropblock", "pre_bn"), ("dropblock", "pre_conv")]:
        assert NO_CLOSED_FORM in fits[key].note and not math.isfinite(fits[key].theory_mean), key
    for key in [("channel", "pre_bn"), ("bernoulli", "pre_bn"), ("bernoulli", "pre_conv")]:
        assert math.isfinite(fits[key].theory_mean) and NO_CLOSED_FORM not in fits[key].note, key
    tables = {t.key: t for t in build_tables(analyse(study, n_boot=50), study)}
    assert f"dropblock/pre_bn/0.5: {NO_CLOSED_FORM}" in tables["shift_fit"].note
    assert "Not in this table: channel, dropblock, whose masks are shared" in tables["mechanism"].note


SWEEP_PLUGIN = PLUGIN + '''
from spaces import Profile, Space, register_space


@register_space
def timm_dropblock_pair() -> Space:
    return Space(
        name="timm_dropblock_pair", description="timm's DropBlock2d, registered unchanged, at two block sizes",
        fixed=dict(backbone="cifar_wrn", depth=10, dataset="digits", image_size=8, in_chans=1, epochs=1,
                   width=1.0, lr=0.05, weight_decay=5e-4, schedule="cosine", train_samples=64, probe_samples=64,
                   batch_size=32, dropout_type="timm_dropblock",
                   dropout_placement="pre_bn", dropout_rate=0.3, seed=0),
        axes=dict(dropout_block_size=[3, 5]),
        profiles=dict(quick=Profile(text="2 trials"), paper=Profile(text="2 trials")),
    )
'''


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_two_trial_sweep_with_timms_dropblock_plugin(tmp_path: Path) -> None:
    """`search.run --plugin`: the Ray workers load the plugin, wrap DropBlock2d and run both block sizes."""
    import os
    import subprocess
    import sys

    import pyarrow.dataset as ds

    path = tmp_path / "timm_dropblock_sweep.py"
    path.write_text(SWEEP_PLUGIN)
    out = subprocess.run([sys.executable, "-m", "search.run", "--plugin", str(path), "--space", "timm_dropblock_pair",
                          "--num-cpus", "2", "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=540,
                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    trials = ds.dataset(str(tmp_path / "results" / "timm_dropblock_pair" / "trials")).to_table().to_pylist()
    assert sorted((t["dropout_block_size"], t["status"]) for t in trials) == [(3, "ok"), (5, "ok")]
    layers = ds.dataset(str(tmp_path / "results" / "timm_dropblock_pair" / "layers")).to_table().to_pylist()
    assert sum(r["fed_by_dropout"] for r in layers) == 6  # 3 sites per trial, found by the probes in the workers
