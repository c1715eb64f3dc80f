"""The one registry: every reader takes its names from it, tests are generated from it, and a new dropout
kind is one definition that validation, placement, a trial and the theory all pick up."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from search import registry
from search.config import ConfigError, TrialConfig, family_names

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _smallest_depth(family: str) -> int | None:
    meta = registry.get("backbone", family).meta
    ok = meta.get("depth_ok")
    return None if ok is None else next(d for d in range(1, 400) if ok(d))


# ------------------------------------------------------------------ one source of names
def test_readers_take_their_names_from_the_registry() -> None:
    import spaces._defaults as defaults
    from analysis import theory
    from search.trial.dropout.module import list_dropout_kinds

    # The shipped spaces vary every placement but the follow-up literature's (the `literature` space's).
    assert defaults.PLACEMENTS == tuple(n for n in registry.names("placement")
                                        if n not in defaults.FOLLOW_UP_PLACEMENTS)
    # The shipped spaces vary the paper's kinds (those with its closed form), so their hashes stay pinned.
    assert defaults.DROPOUT_TYPES == tuple(e.name for e in registry.entries("dropout")
                                           if e.meta["closed_form"] == "elementwise")
    assert sorted(registry.names("dropout")) == list_dropout_kinds()
    assert set(theory.placement_cases()) == set(registry.names("placement"))
    assert set(theory.closed_form_kinds()) == {e.name for e in registry.entries("dropout")
                                               if e.meta["closed_form"] == "elementwise"}
    assert set(family_names()) >= {"cifar_wrn", "cifar_preresnet", "cifar_resnext", "cifar_densenet_bc"}
    for name in registry.names("space"):
        from spaces import get_space

        assert get_space(name).name == name


def test_a_name_registered_twice_is_one_clear_error() -> None:
    with pytest.raises(registry.RegistryError, match=r"dropout 'bernoulli' is registered twice \(first by "
                                                     r"search.trial.dropout.kinds"):
        registry.register("dropout", "bernoulli", object)
    with pytest.raises(registry.RegistryError, match=r"registry category = 'kinds' is not allowed"):
        registry.register("kinds", "x", object)


def test_timm_names_read_from_sources_match_timms_registry() -> None:
    # config validates stock backbones without importing timm by reading its @register_model functions.
    import timm

    from search.config import _scan_timm_sources

    assert _scan_timm_sources() == frozenset(n for n in timm.list_models() if not n.startswith("cifar_"))


# ------------------------------------------------------------------ generated: kind x placement x family
@pytest.mark.parametrize("family", family_names())
@pytest.mark.parametrize("placement", registry.names("placement"))
@pytest.mark.parametrize("kind", registry.names("dropout"))
def test_every_kind_placement_and_family(kind: str, placement: str, family: str, no_onednn: None) -> None:
    """Each inserted module is of the kind and feeds the BN it names; a before-site runs right before its target,
    an after-site takes exactly its module's output, right after it ran, and hands its own output on (hooks)."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    from search.contracts import _carries_noise
    from search.trial.dropout.module import VarianceDropout
    from search.trial.models import build_model

    args = dict(backbone=family, depth=_smallest_depth(family), width=0.25, in_chans=1, image_size=8,
                dropout_type=kind, dropout_placement=placement, dropout_rate=0.3)
    if registry.get("dropout", kind).meta["needs_map"] and not registry.get("placement", placement).meta["on_map"]:
        # A feature-map kind (DropBlock) before a classifier: refused in one line before any model is built.
        with pytest.raises(ConfigError, match=rf"'dropout_type' = '{kind}' needs \(N, C, H, W\) feature maps, but"
                                              rf" placement '{placement}' feeds it vectors \(allowed placements: "):
            TrialConfig(**args)
        return
    cfg = TrialConfig(**args)
    model = build_model(cfg)
    sites = model.dropout_sites
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items() if n}
    entry = registry.get("placement", placement)
    assert (len(sites) == 0) == (placement == "none")
    order: list[str] = []  # every module, as its forward starts ("name") and ends ("name/")
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def before(m, i) -> None:  # hooks must return None, or they replace the module's input/output
        order.append(names[m])
        inputs.setdefault(names[m], i[0] if i else None)

    def after(m, i, o) -> None:
        order.append(names[m] + "/")
        outputs.setdefault(names[m], o)

    hooks = [m.register_forward_pre_hook(before) for m in names] + [m.register_forward_hook(after) for m in names]
    for s in sites:
        assert isinstance(modules[s.module], VarianceDropout) and modules[s.module].kind == kind
        if s.feeds_bn is not None:
            assert isinstance(modules[s.feeds_bn], _BatchNorm)
        if s.after is None:
            assert (s.feeds_bn is not None) == entry.meta["feeds_bn"]
        elif not entry.meta["feeds_bn"]:  # an after-site of a BN-feeding placement may feed none: the last block
            assert s.feeds_bn is None     # of a post-activation net is followed by pooling and classifier only
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8))
    for h in hooks:
        h.remove()
    for s in sites:
        i, j = order.index(s.module), order.index(s.module + "/")  # the dropout's start and end
        if s.after is None:  # the dropout's output is exactly what its target receives, and the target runs next
            assert order[j + 1] == s.target
            assert outputs[s.module] is inputs[s.target]
        else:  # the dropout starts right as its module ends, on exactly that module's output ...
            wrapper = s.module.rpartition(".")[0]
            assert s.after == f"{wrapper}.0" and s.module == f"{wrapper}.1"
            assert order[i - 1] == s.after + "/" and inputs[s.module] is outputs[s.after]
            # ... and what it hands on is exactly what the wrapper (standing where the module stood) returns,
            # which is what runs next receives
            assert order[j + 1] == wrapper + "/"
            assert outputs[wrapper] is outputs[s.module]
            # where it goes from there (through a residual add, a ReLU, a concatenation): perturbing this dropout's
            # output alone moves the input of its target first among the layers, and of feeds_bn first among the BNs
            layers = (torch.nn.Conv2d, torch.nn.Linear, _BatchNorm)
            moved = [n for n in _carries_noise(model, modules, s.module, torch.randn(2, 1, 8, 8))
                     if isinstance(modules[n], layers)]
            assert (moved[0] if moved else "") == s.target
            bns = [n for n in moved if isinstance(modules[n], _BatchNorm)]
            assert (bns[0] if bns else None) == s.feeds_bn


# ------------------------------------------------------------------ adding a kind is one definition
SCALED_KIND = '''
from search import DropoutKind, register_dropout


@register_dropout("test_twopoint")
class TwoPoint(DropoutKind):
    """x * (1 +- a) with equal odds: mean 1, variance a**2 = rate."""

    @classmethod
    def noise_var(cls, rate):
        return rate

    def noise(self, x):
        import torch

        sign = torch.randint(0, 2, x.shape, device=x.device, dtype=x.dtype).mul_(2).sub_(1)
        return 1.0 + sign * self.rate ** 0.5
'''


def test_a_kind_defined_at_test_time_reaches_validation_placement_trial_and_theory(tmp_path: Path) -> None:
    from analysis.theory import predict_delta, unit_train_var
    from search.trial.dropout.module import VarianceDropout
    from search.trial.runner import run_trial

    with pytest.raises(ConfigError, match="'test_twopoint' is not allowed"):
        TrialConfig(dropout_type="test_twopoint", dropout_placement="pre_bn", dropout_rate=0.25)
    code = compile(SCALED_KIND, str(tmp_path / "kind.py"), "exec")
    exec(code, {"__name__": "test_twopoint_plugin"})  # the one definition
    try:
        cfg = TrialConfig(backbone="cifar_wrn", depth=10, width=0.5, dataset="digits", image_size=8, in_chans=1,
                          train_samples=64, epochs=1, batch_size=32, dropout_type="test_twopoint",
                          dropout_placement="pre_bn", dropout_rate=0.25)
        result = run_trial(cfg)
        assert result.status == "ok" and np.isfinite(result.test_acc)
        fed = [x for x in result.layers if x.fed_by_dropout]
        assert len(fed) == 3 and all(x.shift > 1.0 for x in fed)  # WRN-10: one pre_bn site per block
        from search.trial.models import build_model

        model = build_model(cfg)
        assert sum(isinstance(m, VarianceDropout) and m.kind == "test_twopoint" for m in model.modules()) == 3
        # theory: Var_train = v + rate * (c^2 + v); case (a) Delta = v / that
        assert unit_train_var("test_twopoint", 0.25, 1.0, 2.0) == pytest.approx(2.0 + 0.25 * 3.0)
        assert predict_delta("test_twopoint", "pre_bn", 0.25, 0.0, 1.0) == pytest.approx(1 / 1.25)
        # Monte Carlo of the kind itself against its declared closed form
        import torch

        torch.manual_seed(0)
        x = torch.full((400_000,), 2.0)
        y = registry.get("dropout", "test_twopoint").obj(0.25).noise(x) * x
        assert float(y.mean()) == pytest.approx(2.0, rel=5e-3)
        assert float(y.var()) == pytest.approx(0.25 * 4.0, rel=1e-2)
    finally:
        registry.unregister("dropout", "test_twopoint")


# ------------------------------------------------------------------ contracts of the layout
def test_no_product_module_reads_fault_injection() -> None:
    hits = [str(p.relative_to(ROOT)) for d in ("search", "analysis", "spaces", "benchmarks")
            for p in (ROOT / d).rglob("*.py") if "DBN_FAULTS" in p.read_text(encoding="utf-8")]
    assert hits == []


def test_shipped_space_hashes_are_pinned() -> None:
    """The config hashes every shipped space/profile had before the registry change (seed 0 trials)."""
    from spaces import get_space

    from _pinned import as_pinned  # every profile as pinned; paper_cifar/paper on its old recipe (issue 29)

    pinned = json.loads((ROOT / "tests" / "data" / "config_hashes.json").read_text())
    for key, hashes in pinned.items():
        name, profile = key.split("/")
        got = {TrialConfig.from_dict(as_pinned(key, d)).config_hash
               for d in get_space(name).grid(profile) if d.get("seed", 0) == 0}
        assert got == set(hashes), key


_PROBE = """
import runpy, sys
sys.argv = ["search.run"] + sys.argv[1:]
try:
    runpy.run_module("search.run", run_name="__main__")
except SystemExit as e:
    code = e.code
print("HEAVY", sorted(m for m in ("torch", "timm", "ray", "mlflow") if m in sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--list"], ["--help"]] + [["--space", s, "--dry-run"]
                                                            for s in registry.names("space")])
def test_light_commands_import_neither_torch_nor_timm(args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([PY, "-c", _PROBE, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    line = [x for x in out.stderr.splitlines() if x.startswith("HEAVY")]
    assert line == ["HEAVY []"], out.stderr[-2000:]
    assert os.listdir(tmp_path) == []  # and wrote nothing
