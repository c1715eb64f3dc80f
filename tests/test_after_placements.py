"""The placements that insert AFTER a layer (post_conv, post_bn, post_add: Kim et al. 2023's positions inside a
residual branch) and `pre_pool` (their head position H4), beyond the generated position tests
(tests/test_registry.py, tests/test_placement.py, tests/test_contracts.py): a trial's layer table at each, the
state_dict keys, FX and TorchScript through the wrappers, the probes' own names, the `wrap_after` helper, and
the one-line errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from search import contracts, registry
from search.config import TrialConfig
from search.trial.dropout import VarianceDropout, apply_placement
from search.trial.dropout.surgery import per_block_after, wrap_after
from search.trial.models import build_model
from search.trial.probes import own_name

pytestmark = pytest.mark.usefixtures("no_onednn")

AFTER = ("post_conv", "post_bn", "post_add")
NEW = (*AFTER, "pre_pool")


def _wrn(placement: str, **kw) -> TrialConfig:
    return TrialConfig(backbone="cifar_wrn", depth=10, width=1.0, dataset="digits", image_size=8, in_chans=1,
                       dropout_placement=placement, dropout_rate=0.3, **kw)


def test_registered_meta() -> None:
    """case, feeds_bn and on_map as docs/placement.md gives them; none of them is in the shipped spaces' axes."""
    import spaces._defaults as defaults

    meta = {p: registry.get("placement", p).meta for p in NEW}
    assert {p: m["case"] for p, m in meta.items()} == {"post_conv": "a", "post_bn": "b", "post_add": None,
                                                       "pre_pool": None}
    assert {p: m["feeds_bn"] for p, m in meta.items()} == {"post_conv": True, "post_bn": True, "post_add": True,
                                                           "pre_pool": False}
    assert all(m["on_map"] for m in meta.values())
    assert not set(NEW) & set(defaults.PLACEMENTS)


# ------------------------------------------------------------------ a trial at each new placement
@pytest.mark.parametrize("placement", NEW)
def test_one_epoch_trial_has_a_sane_layer_table(placement: str) -> None:
    """1 epoch on digits, WRN-10-1: the BN layers the sites feed are the fed ones, with a finite shift; from the first
    fed BN on the dropout noise shows in the mechanism (shift_frozen > 1, the propagation's shift_theory finite > 1);
    every BN upstream of the first site sees none (both exactly 1). pre_pool feeds no BN: 1 everywhere."""
    from search.trial.runner import run_trial

    cfg = _wrn(placement, train_samples=256, epochs=1, batch_size=32)
    result = run_trial(cfg)
    assert result.status == "ok" and math.isfinite(result.test_acc)
    model = build_model(cfg)
    plain = build_model(_wrn("none"))
    layers = sorted(result.layers, key=lambda x: x.index)
    # The probes' own names are the plain model's BN paths, whatever level a wrapper added.
    assert [x.bn_name for x in layers] == [n for n, m in plain.named_modules() if isinstance(m, _BatchNorm)]
    fed = {own_name(model, s.feeds_bn) for s in model.dropout_sites if s.feeds_bn}
    assert {x.bn_name for x in layers if x.fed_by_dropout} == fed
    assert all(math.isfinite(x.shift) and x.shift > 0 for x in layers)
    if placement == "pre_pool":
        assert fed == set()
        assert all(x.shift_frozen == pytest.approx(1.0, abs=1e-9) for x in layers)
        return
    first = min(x.index for x in layers if x.bn_name in fed)
    for x in layers:
        if x.index < first:  # upstream of every site: no noise reaches it
            assert x.shift_frozen == pytest.approx(1.0, abs=1e-9), x.bn_name
            assert x.shift_theory == pytest.approx(1.0, abs=1e-9), x.bn_name
        else:
            assert x.shift_frozen > 1.0 and math.isfinite(x.shift_theory) and x.shift_theory > 1.0, x.bn_name
        if x.fed_by_dropout:
            assert math.isfinite(x.c_in) and math.isfinite(x.v_in) and x.v_in > 0, x.bn_name


# ------------------------------------------------------------------ what the wrappers keep
@pytest.mark.parametrize("placement, old, new", [("post_conv", ".conv2.", ".conv2.0."), ("post_bn", ".bn2.", ".bn2.0."),
                                                  ("post_add", "body.{s}.0.", "body.{s}.0.0.")])
def test_state_dict_keys_move_by_one_level(placement: str, old: str, new: str) -> None:
    plain = build_model(_wrn("none", seed=3)).state_dict()
    model = build_model(_wrn(placement, seed=3))
    drops = tuple(s.module + "." for s in model.dropout_sites)  # a dropout's own state (if any) is new, not moved
    placed = {k: v for k, v in model.state_dict().items() if not k.startswith(drops)}
    rename = [(old.format(s=s), new.format(s=s)) for s in range(3)] if "{s}" in old else [(old, new)]

    def moved(key: str) -> str:
        for a, b in rename:
            if a in key:
                return key.replace(a, b)
        return key

    assert {moved(k) for k in plain} == set(placed)
    assert all(torch.equal(v, placed[moved(k)]) for k, v in plain.items())  # same seed, same weights


def test_after_wrappers_keep_fx_and_torchscript() -> None:
    """nn.Sequential(module, dropout) is plain structure: FX traces it (the mechanism's graph) and TorchScript
    scripts it; a forward hook would be invisible to both. TorchScript is shown with torch's scriptable nn.Dropout
    (VarianceDropout itself does not script, at any placement)."""
    import timm

    from search.trial.mechanism import trace_graph

    x = torch.randn(2, 3, 32, 32)
    for after in ("conv", "bn", "block"):
        model = timm.create_model("cifar_wrn", depth=10, width=0.5)
        sites = per_block_after(model, lambda: nn.Dropout(0.3), after=after, placement=f"post_{after}")
        assert len(sites) == 3 and all(isinstance(model.get_submodule(s.module), nn.Dropout) for s in sites)
        model.eval()
        with torch.no_grad():
            want = model(x)
            assert torch.equal(torch.jit.script(model)(x), want)
    for placement in AFTER:
        model = build_model(TrialConfig(backbone="cifar_wrn", depth=10, width=0.5, dropout_placement=placement,
                                        dropout_rate=0.3)).eval()
        graph = trace_graph(model)
        assert graph is not None
        assert sum(isinstance(m, VarianceDropout) for m in graph.modules()) == 3
        with torch.no_grad():
            assert torch.equal(graph(x), model(x))


def test_post_bn_in_a_preactivation_net_is_pre_conv_for_bernoulli() -> None:
    """Kim et al. 2023: in a pre-activation block the dropout after the last BN(-ReLU) and before the last conv is
    one position. post_bn takes the BN output, pre_conv the ReLU's; a Bernoulli mask m >= 0 commutes with ReLU
    (relu(m x) = m relu(x)), so with the same masks the two networks compute the same function in train mode."""
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for placement in ("post_bn", "pre_conv"):
        model = build_model(TrialConfig(backbone="cifar_wrn", depth=16, width=0.5, dropout_placement=placement,
                                        dropout_rate=0.4, seed=1)).train()
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(model(x))
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.manual_seed(1)  # different masks: a different output, so the equality above is the masks', not luck
    with torch.no_grad():
        assert not torch.allclose(model(x), outs[1])


# ------------------------------------------------------------------ helpers and errors
def test_wrap_after_names_what_its_noise_reaches() -> None:
    model = build_model(TrialConfig(backbone="cifar_wrn", depth=10, width=0.5))
    make = lambda: VarianceDropout(0.3)  # noqa: E731
    stem = wrap_after(model, "stem", make)
    assert (stem.module, stem.after, stem.target, stem.feeds_bn, stem.fan_in) == (
        "stem.1", "stem.0", "body.0.0.bn1", "body.0.0.bn1", None)
    head = wrap_after(model, "pre_head", make)  # after the final BN-ReLU: only pooling and classifier follow
    assert (head.module, head.target, head.feeds_bn, head.fan_in) == ("pre_head.1", "fc", None, None)
    with pytest.raises(ValueError, match=r"argument 'path' = 'nope' is not a module of 'cifar_wrn' \(wrap_after\)"):
        wrap_after(model, "nope", make)
    model.unused = nn.Conv2d(1, 1, 1)
    with pytest.raises(ValueError, match="argument 'path' = 'unused': a forward of 'cifar_wrn' never calls it"):
        wrap_after(model, "unused", make)


def test_own_name_strips_every_wrapper_level() -> None:
    model = build_model(_wrn("post_add"))
    assert own_name(model, "body.1.0.0.bn1") == "body.1.0.bn1"
    model = build_model(_wrn("post_bn"))
    assert own_name(model, "body.1.0.bn2.0") == "body.1.0.bn2"
    model = build_model(_wrn("pre_bn"))
    assert own_name(model, "body.1.0.bn2.1") == "body.1.0.bn2" and own_name(model, "pre_head.0") == "pre_head.0"


def test_pre_pool_needs_one_global_pool_module() -> None:
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=1)
    with pytest.raises(ValueError, match=r"field 'dropout_placement' = 'pre_pool': backbone 'vit_tiny_patch16_224' "
                                         r"has no global_pool module before its classifier \(allowed for it: head, "
                                         r"none\)"):
        apply_placement(vit, "pre_pool", "bernoulli", 0.1)
    model = build_model(TrialConfig(backbone="convnext_atto", depth=None, dropout_placement="pre_pool",
                                    dropout_rate=0.2))  # no BatchNorm; its pooling sits in its head
    (site,) = model.dropout_sites
    assert (site.module, site.target, site.feeds_bn) == ("head.global_pool.0", "head.global_pool.1", None)


def test_an_after_site_that_lies_about_feeds_bn_fails_the_contract() -> None:
    from dataclasses import replace

    @registry.register_placement("t_after_liar", case=None)
    def liar(model, make, *, input_size=None):
        sites = per_block_after(model, make, after="conv", placement="t_after_liar", input_size=input_size)
        return [replace(s, feeds_bn=s.after) for s in sites]  # names its own conv as the BN it feeds

    try:
        with pytest.raises(contracts.ContractError, match=r"names feeds_bn='body.0.0.conv2.0', but the first BN "
                                                          r"whose input carries its noise is 'body.1.0.bn1'"):
            contracts.check_placement("t_after_liar", "cifar_wrn")
    finally:
        registry.unregister("placement", "t_after_liar")


def test_an_after_site_that_lies_about_its_module_fails_the_contract() -> None:
    from dataclasses import replace

    @registry.register_placement("t_after_from", case=None)
    def liar(model, make, *, input_size=None):
        sites = per_block_after(model, make, after="bn", placement="t_after_from", input_size=input_size)
        return [replace(s, after=s.block + ".conv1") for s in sites]

    try:
        with pytest.raises(contracts.ContractError, match=r"says it takes the output of 'body.0.0.conv1', but the "
                                                          r"last module to finish before it is 'body.0.0.bn2.0'"):
            contracts.check_placement("t_after_from", "cifar_wrn")
    finally:
        registry.unregister("placement", "t_after_from")
