"""The normalization axis (TrialConfig.normalization; docs/normalization.md): config, the swap proven by forward
hooks on every supported family (generated from the registry), the probes' records and re-estimation without
running statistics, a 1-epoch trial per normalization read back from Parquet, and the analysis on a mixed
study."""
from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from search import registry
from search.config import NORMALIZATIONS, ConfigError, TrialConfig
from search.trial.dropout import VarianceDropout
from search.trial.models import SUPPORTED_BACKBONES, build_model
from test_placement import SMALL

pytestmark = pytest.mark.usefixtures("no_onednn")

# ---------------------------------------------------------------------- config
def test_batchnorm_is_the_default_and_keeps_every_hash() -> None:
    base = TrialConfig()
    assert base.normalization is None and base.norm_groups is None
    written = TrialConfig(normalization="batchnorm")
    assert written.normalization is None and written.config_hash == base.config_hash
    assert TrialConfig(normalization="groupnorm").config_hash != base.config_hash
    assert TrialConfig(normalization="groupnorm", norm_groups=32) == TrialConfig(normalization="groupnorm")
    assert TrialConfig(normalization="groupnorm", norm_groups=8).config_hash != \
        TrialConfig(normalization="groupnorm").config_hash
    # batchnorm written out is the default on any configuration (the pinned hashes: tests/test_config.py)
    for kw in ({"backbone": "resnet18"}, {"dropout_placement": "pre_bn", "dropout_rate": 0.3, "width": 2.0},
               {"backbone": "cifar_densenet_bc", "dataset": "fashion_mnist", "in_chans": 1}):
        assert TrialConfig(**kw, normalization="batchnorm").config_hash == TrialConfig(**kw).config_hash


@pytest.mark.parametrize("changes, words", [
    ({"normalization": "layernorm"}, ["'normalization'", "'layernorm'", "batchnorm", "groupnorm", "none"]),
    ({"norm_groups": 8}, ["'norm_groups'", "8", "groupnorm", "allowed: None"]),
    ({"normalization": "none", "norm_groups": 4}, ["'norm_groups'", "4", "'none'", "allowed: None"]),
    ({"normalization": "groupnorm", "norm_groups": 0}, ["'norm_groups'", "0", "1 to 8192"]),
])
def test_bad_normalization_is_one_line_naming_field_value_and_allowed(changes, words) -> None:
    with pytest.raises(ConfigError) as e:
        TrialConfig(**changes)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_norm_groups_dividing_no_layer_is_refused_at_build() -> None:
    cfg = TrialConfig(backbone="cifar_wrn", depth=10, normalization="groupnorm", norm_groups=7)
    with pytest.raises(ConfigError) as e:
        build_model(cfg, 10)
    msg = str(e.value)
    assert "\n" not in msg and "'norm_groups' = 7" in msg and "16, 32, 64" in msg


def test_a_model_without_batchnorm_refuses_a_normalization_that_would_change_nothing() -> None:
    from search.trial.models.normalization import apply_normalization

    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    assert apply_normalization(plain, None) == [] and apply_normalization(plain, "batchnorm") == []
    for norm in ("groupnorm", "none"):
        with pytest.raises(ConfigError) as e:
            apply_normalization(plain, norm)
        assert "\n" not in str(e.value) and f"'normalization' = {norm!r}" in str(e.value) and "allowed: None" in \
            str(e.value)


# ------------------------------------------------------- the swap, by forward hooks
PLACEMENTS = tuple(p for p in registry.names("placement") if p != "none")  # every one that inserts dropout


def _calls(model: nn.Module, x: torch.Tensor) -> tuple[list[str], dict[str, int]]:
    """Every module's path in call order (pre-hooks, train mode) and each called module's input channels."""
    names = {m: n for n, m in model.named_modules() if n}
    calls: list[str] = []
    chans: dict[str, int] = {}

    def pre(mod: nn.Module, args: tuple) -> None:
        calls.append(names[mod])
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
            chans.setdefault(names[mod], int(args[0].shape[1]))

    hooks = [m.register_forward_pre_hook(pre) for m in names]
    try:
        model.train()
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls, chans


def _first_reached(model: nn.Module, site: str, swapped: list[str], x: torch.Tensor) -> str | None:
    """The first of the `swapped` layers, in call order, whose input changes when the output of `site` alone is
    shifted by 1 (eval mode, so dropout is the identity and the two passes differ by that shift only)."""
    modules = dict(model.named_modules())

    def run(perturb: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
        seen: dict[str, torch.Tensor] = {}
        order: list[str] = []

        def pre(path: str):  # noqa: ANN202
            def hook(_m: nn.Module, args: tuple) -> None:
                if path not in seen:
                    seen[path] = args[0].detach().clone()
                    order.append(path)
            return hook

        hooks = [modules[p].register_forward_pre_hook(pre(p)) for p in swapped]
        if perturb:
            hooks.append(modules[site].register_forward_hook(lambda _m, _i, out: out + 1.0))
        try:
            model.eval()
            with torch.no_grad():
                model(x)
        finally:
            for h in hooks:
                h.remove()
        return seen, order

    base, order = run(False)
    moved, _ = run(True)
    return next((p for p in order if not torch.equal(base[p], moved[p])), None)


@pytest.mark.parametrize("normalization", ("groupnorm", "none"))
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("backbone", SUPPORTED_BACKBONES)
def test_every_family_builds_without_batchnorm_and_sites_feed_the_swapped_layer(backbone, placement,
                                                                                normalization) -> None:
    depth, width = SMALL[backbone]
    kw = dict(backbone=backbone, depth=depth, width=width, dropout_placement=placement, dropout_rate=0.1)
    twin = build_model(TrialConfig(**kw), 10)  # the same model under batchnorm: where the BNs were
    bn_paths = {n: m.num_features for n, m in twin.named_modules() if isinstance(m, _BatchNorm)}
    model = build_model(TrialConfig(**kw, normalization=normalization), 10)
    assert sorted(model.replaced_norms) == sorted(bn_paths)
    x = torch.randn(2, 3, 32, 32)
    calls, chans = _calls(model, x)
    modules = dict(model.named_modules())
    assert not any(isinstance(m, _BatchNorm) for m in modules.values())
    assert not any(isinstance(modules[n], _BatchNorm) for n in calls)  # none runs either
    for path, c in bn_paths.items():
        m = modules[path]
        if normalization == "groupnorm":
            assert isinstance(m, nn.GroupNorm)
            assert m.num_channels == c and c % m.num_groups == 0 and m.num_groups == math.gcd(32, c)
            if path in chans:
                assert chans[path] == m.num_channels  # the tensor it normalises has its channels
        else:
            assert not any(isinstance(s, (nn.GroupNorm, _BatchNorm)) for s in m.modules())
    # Dropout sites: same paths as under batchnorm, and the first swapped layer the site's output reaches (the
    # first, in call order, whose input moves when that output alone is perturbed) is feeds_bn.
    sites, twin_sites = model.dropout_sites, twin.dropout_sites
    assert [(s.module, s.target, s.feeds_bn) for s in sites] == [(s.module, s.target, s.feeds_bn) for s in twin_sites]
    assert sites
    for s in sites:
        assert isinstance(modules[s.module], VarianceDropout) and s.module in calls
        assert _first_reached(model, s.module, list(bn_paths), x) == s.feeds_bn, s
        if s.feeds_bn is not None and normalization == "groupnorm":
            assert isinstance(modules[s.feeds_bn], nn.GroupNorm)
    # Eval-mode outputs are finite and the weights are the twin's (no random number drawn by the swap).
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    twin_w = {n: p for n, p in twin.named_parameters() if "weight" in n and p.dim() > 1}
    for n, p in model.named_parameters():
        if n in twin_w:
            assert torch.equal(p, twin_w[n])


def test_groupnorm_keeps_the_batchnorm_init_and_a_norm_act_activation() -> None:
    from timm.layers import BatchNormAct2d

    cfg = TrialConfig(backbone="densenet121", width=0.125)
    twin = build_model(cfg, 10)
    gn = build_model(cfg.replace(normalization="groupnorm"), 10)
    none = build_model(cfg.replace(normalization="none"), 10)
    path = next(n for n, m in twin.named_modules() if isinstance(m, BatchNormAct2d))
    a, b, c = (dict(x.named_modules())[path] for x in (twin, gn, none))
    assert isinstance(b.act, nn.ReLU) and b.act is not None and isinstance(c, nn.ReLU)
    assert torch.equal(b.weight, a.weight) and torch.equal(b.bias, a.bias)
    # resnet50's zero-initialised last BN of each branch (timm's zero_init_last) stays zero as a GroupNorm
    r = build_model(TrialConfig(backbone="resnet50", width=0.125, normalization="groupnorm"), 10)
    assert isinstance(r.layer1[0].bn3, nn.GroupNorm) and float(r.layer1[0].bn3.weight.detach().abs().sum()) == 0.0
    assert float(r.layer1[0].bn1.weight.detach().min()) == 1.0 and float(r.layer1[0].bn1.bias.detach().abs().max()) == 0.0


# ------------------------------------------------------------------ probes
def _loader(n: int = 4, batch: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(n)]


def test_probe_on_groupnorm_records_input_moments_and_nan_running_columns() -> None:
    from search.trial.probes import measure_variance_shift, reestimate_bn

    cfg = TrialConfig(backbone="cifar_wrn", depth=10, dropout_placement="pre_bn", dropout_rate=0.3,
                      normalization="groupnorm")
    model = build_model(cfg, 10)
    data = _loader()
    layers = measure_variance_shift(model, data, None)
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(layers) == len(gns) == 7
    # real_var is the channel mean of the input's variance: recomputed here by a hook, over all batches
    seen: list[torch.Tensor] = []
    first = dict(model.named_modules())[layers[0].name]
    h = first.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    model.eval()
    with torch.no_grad():
        for x in data:
            model(x)
    h.remove()
    x = torch.cat(seen).double()
    want = x.var(dim=(0, 2, 3), unbiased=False).mean().item()
    assert layers[0].real_var == pytest.approx(want, rel=1e-6)  # float32 inputs, float64 sums
    for r in layers:
        assert r.norm_type == "groupnorm"
        assert math.isnan(r.moving_var) and math.isnan(r.shift) and math.isnan(r.shift_channelwise)
        assert math.isfinite(r.real_var) and r.real_var > 0
    fed = [r for r in layers if r.fed_by_dropout]
    assert fed and all(math.isfinite(r.shift_frozen) and r.shift_frozen > 1.0 for r in fed)
    assert all(r.shift_frozen == 1.0 for r in layers if not r.fed_by_dropout and r.index == 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert reestimate_bn(model, data, None) == 0  # nothing to re-estimate
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("placement", ("pre_bn", "pre_conv"))
def test_propagation_predicts_the_first_groupnorm_the_noise_reaches_and_stops_there(placement) -> None:
    from search.trial.probes import measure_variance_shift

    model = build_model(TrialConfig(backbone="cifar_wrn", depth=10, dropout_placement=placement, dropout_rate=0.3,
                                    normalization="groupnorm"), 10)
    layers = measure_variance_shift(model, _loader(8, 32), None, every=1)
    first = next(i for i, r in enumerate(layers) if r.fed_by_dropout)
    for r in layers[:first]:  # upstream of every dropout: no noise, exactly
        assert r.shift_theory == 1.0 and r.shift_frozen == 1.0 and r.excess_local == 0.0
    r = layers[first]
    # the local identity (exact for element-wise Bernoulli noise) against the frozen pass's own masks
    assert r.excess_local > 0.1 and r.shift_theory == pytest.approx(r.shift_frozen, rel=0.01)
    assert all(math.isnan(x.shift_theory) for x in layers[first + 1:])  # no rule through a GroupNorm's noise
    assert all(math.isfinite(x.shift_frozen) for x in layers)


def test_probe_on_no_normalization_has_no_rows_and_reads_no_batch() -> None:
    from search.trial.probes import measure_variance_shift, reestimate_bn

    model = build_model(TrialConfig(backbone="cifar_wrn", depth=10, dropout_placement="pre_bn", dropout_rate=0.3,
                                    normalization="none"), 10)

    class Counting:
        reads = 0

        def __iter__(self):
            Counting.reads += 1
            return iter(_loader())

    assert measure_variance_shift(model, Counting(), None) == []
    assert reestimate_bn(model, Counting(), None) == 0
    assert Counting.reads == 0


def test_probe_on_batchnorm_says_batchnorm() -> None:
    from search.trial.probes import measure_variance_shift, reestimate_bn

    model = build_model(TrialConfig(backbone="cifar_wrn", depth=10), 10)
    layers = measure_variance_shift(model, _loader(2), None, mechanism=False)
    assert layers and {r.norm_type for r in layers} == {"batchnorm"}
    assert reestimate_bn(model, _loader(2), None) == len(layers)


# ------------------------------------------------------------ trials, read back
@pytest.fixture(scope="module")
def trials() -> dict[str, tuple[TrialConfig, object]]:
    from search.trial.runner import run_trial

    out = {}
    for norm in NORMALIZATIONS:
        cfg = TrialConfig(backbone="cifar_wrn", depth=10, dataset="digits", epochs=1, batch_size=64,
                          train_samples=512, dropout_placement="pre_bn", dropout_rate=0.2, device="cpu",
                          normalization=norm)
        out[norm] = (cfg, run_trial(cfg))
    return out


def _write_read(tmp_path, cfg: TrialConfig, result) -> tuple[dict, list[dict]]:
    from search.schema import TRIALS_SCHEMA, layer_rows, layers_schema, trial_row

    row = trial_row(cfg, result, run_id="r", space="s", profile="quick", finished_at=None,
                    code={"code_version": "test"})
    pq.write_table(pa.Table.from_pylist([row], schema=TRIALS_SCHEMA), tmp_path / "t.parquet")
    rows = layer_rows(cfg, result.layers, run_id="r", space="s")
    pq.write_table(pa.Table.from_pylist(rows, schema=layers_schema()), tmp_path / "l.parquet")
    return pq.read_table(tmp_path / "t.parquet").to_pylist()[0], pq.read_table(tmp_path / "l.parquet").to_pylist()


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def test_one_epoch_trial_per_normalization_reads_back_with_the_right_nans(trials, tmp_path) -> None:
    for norm, (cfg, r) in trials.items():
        assert r.status == "ok", (norm, r.error)
        assert math.isfinite(r.test_acc)
        t, layers = _write_read(tmp_path, cfg, r)
        assert t["normalization"] == (None if norm == "batchnorm" else norm)
        if norm == "batchnorm":
            assert len(layers) == 7 and all(x["norm_type"] == "batchnorm" for x in layers)
            assert math.isfinite(t["mean_shift"]) and t["mean_shift"] >= 1.0
            assert math.isfinite(t["test_acc_reest"]) and t["n_reest"] == r.n_probe
            continue
        # no running statistics: no shift, no re-estimation (NaN, not 0 or 1)
        for k in ("mean_shift", "max_shift", "mean_shift_fed", "mean_shift_reest", "shift_floor", "test_acc_reest",
                  "test_loss_reest"):
            assert _nan(t[k]), (norm, k, t[k])
        assert t["n_reest"] is None and t["bn_unconverged"] is False
        from search.trial.runner import format_result

        assert f"normalization     {norm}: no running statistics" in format_result(cfg, r)
        if norm == "groupnorm":
            assert len(layers) == 7 and all(x["norm_type"] == "groupnorm" for x in layers)
            assert all(_nan(x["moving_var"]) and _nan(x["shift"]) and math.isfinite(x["real_var"]) for x in layers)
            assert any(x["fed_by_dropout"] and x["shift_frozen"] > 1.0 for x in layers)
            assert math.isfinite(t["d_cos2_all_final"])
        else:
            assert layers == [] and t["n_probe"] is None
            assert _nan(t["d_cos2_all_final"])


def test_analysis_of_real_trials_without_running_statistics_blames_no_missing_column(trials, tmp_path) -> None:
    from analysis.guidelines import analyse
    from analysis.load import load_study
    from search.schema import TRIALS_SCHEMA, layer_rows, layers_schema, trial_row

    rows, lrows = [], []
    for i, (cfg, r) in enumerate(trials.values()):
        rows.append(trial_row(cfg, r, run_id=f"r{i}", space="s", profile="quick", finished_at=None,
                              code={"code_version": "test"}))
        lrows += layer_rows(cfg, r.layers, run_id=f"r{i}", space="s")
    for name, data, schema in (("trials", rows, TRIALS_SCHEMA), ("layers", lrows, layers_schema())):
        os.makedirs(tmp_path / "s" / name)
        pq.write_table(pa.Table.from_pylist(data, schema=schema), tmp_path / "s" / name / "part-0.parquet")
    study = load_study("s", root=str(tmp_path))
    assert sorted(study.trials.column("normalization").to_pylist()) == ["batchnorm", "groupnorm", "none"]
    assert set(study.layers.column("norm_type").to_pylist()) == {"batchnorm", "groupnorm"}
    a = analyse(study, n_boot=100)
    assert any("no running statistics" in n for n in a.notes)
    # GroupNorm layers have no shift_theory (no propagation through them): not a sign of old results
    assert not any("predate the mechanism probe" in n for n in a.notes), a.notes
    assert all(r.dropout_placement == "pre_bn" for r in a.mechanism)


# --------------------------------------------------------------- analysis
def _mixed_study():
    """A planted study with its trials repeated under groupnorm (no running statistics) and none (no layers)."""
    from search.schema import LAYERS_SCHEMA
    from test_analysis_fit import planted_study

    trials, layers = planted_study(placements=("none", "pre_bn"), widths=(1.0, 2.0), seeds=(0, 1, 2), n_layers=4)
    out_t, out_l = [trials], [layers]
    for norm in ("groupnorm", "none"):
        t = trials
        for col, fn in (("normalization", lambda c: pa.array([norm] * t.num_rows, pa.string())),
                        ("run_id", lambda c: pc.binary_join_element_wise(c, pa.scalar(norm), "-")),
                        ("config_hash", lambda c: pc.binary_join_element_wise(c, pa.scalar(norm), "-"))):
            t = t.set_column(t.schema.get_field_index(col), t.schema.field(col), fn(t.column(col)))
        for col in ("mean_shift", "max_shift", "mean_shift_fed", "mean_shift_reest", "test_acc_reest",
                    "test_loss_reest"):
            t = t.set_column(t.schema.get_field_index(col), t.schema.field(col),
                             pa.array([math.nan] * t.num_rows, pa.float64()))
        out_t.append(t)
        if norm == "groupnorm":
            lay = layers
            for col in ("moving_var", "shift", "shift_channelwise"):
                lay = lay.set_column(lay.schema.get_field_index(col), lay.schema.field(col),
                                     pa.array([math.nan] * lay.num_rows, pa.float64()))
            lay = lay.set_column(lay.schema.get_field_index("norm_type"), lay.schema.field("norm_type"),
                                 pa.array(["groupnorm"] * lay.num_rows, pa.string()))
            lay = lay.set_column(lay.schema.get_field_index("run_id"), lay.schema.field("run_id"),
                                 pc.binary_join_element_wise(lay.column("run_id"), pa.scalar(norm), "-"))
            out_l.append(lay.cast(LAYERS_SCHEMA))
    return pa.concat_tables(out_t), pa.concat_tables(out_l)


def test_analysis_and_report_on_a_mixed_study_skip_and_say_why(tmp_path) -> None:
    from analysis.guidelines import analyse
    from analysis.load import Study
    from analysis.report import main
    from test_analysis_fit import write_study

    trials, layers = _mixed_study()
    a = analyse(Study(trials, layers, ("planted",)), n_boot=50)
    note = next(n for n in a.notes if "no running statistics" in n)
    assert "groupnorm" in note and "none" in note and "24" in note
    # re-estimation rows come from the batchnorm trials only, and keep the normalizations apart
    assert a.reest and all(dict(r.label).get("normalization") in (None,) for r in a.reest)
    # accuracy costs are computed within each normalization (none vs pre_bn under the same normalization)
    assert {dict(c.context).get("normalization") for c in a.costs} == {None, "groupnorm", "none"}
    root = tmp_path / "results"
    write_study(str(root), trials, layers)
    out = str(tmp_path / "out")
    assert main(["--space", "planted", "--root", str(root), "--out", out, "--n-boot", "100"]) == 0
    md = open(os.path.join(out, "report.md")).read()
    assert "no running statistics: no variance shift to measure" in md
    assert "| batchnorm | bernoulli | pre_bn |" in md and "| None |" not in md  # the default, named
