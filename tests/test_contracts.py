"""The contracts (search/contracts.py), generated from the registry: every dropout kind, every
backbone family, and every placement x family x kind. A kind or placement added to the registry
(or by a plugin) is tested here without a new test; the contract's own checks are tested against
deliberately broken implementations."""
from __future__ import annotations

import pytest

from search import contracts, registry
from search.trial.dropout.kinds import DropoutKind

pytestmark = pytest.mark.usefixtures("no_onednn")

KINDS = registry.names("dropout")
PLACEMENTS = registry.names("placement")
FAMILIES = registry.names("backbone")


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_kind_contract(kind: str) -> None:
    contracts.check_dropout(kind)


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_contract(family: str) -> None:
    contracts.check_backbone(family)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_placement_contract(placement: str, family: str) -> None:
    sites = contracts.check_placement(placement, family, kind="bernoulli")
    assert (len(sites) == 0) == (placement == "none")


def _fits(kind: str, placement: str) -> bool:
    """False for a feature-map kind (DropBlock) at a placement on vectors: TrialConfig refuses those
    (tests/test_registry.py::test_every_kind_placement_and_family asserts the refusal)."""
    needs_map = registry.get("dropout", kind).meta["needs_map"]
    return not (needs_map and not registry.get("placement", placement).meta["on_map"])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind, placement", [(k, p) for k in KINDS if k != "bernoulli" for p in PLACEMENTS
                                             if p != "none" and _fits(k, p)])
def test_every_kind_at_every_placement_of_every_family(kind: str, placement: str, family: str) -> None:
    contracts.check_placement(placement, family, kind=kind)


# ----------------------------------------------------- the contract catches what it promises to
@pytest.fixture
def temp_kind():
    """Register a throwaway kind; unregistered afterwards."""
    names: list[str] = []

    def make(name: str, noise, closed_form=None, noise_var=None) -> str:
        body = {"closed_form": closed_form, "noise": lambda self, x: noise(self, x)}
        if noise_var is not None:
            body["noise_var"] = classmethod(lambda cls, rate: noise_var(rate))
        registry.register_dropout(name)(type(name, (DropoutKind,), body))
        names.append(name)
        return name

    yield make
    for n in names:
        registry.unregister("dropout", n)


def test_a_biased_mean_fails(temp_kind) -> None:
    import torch

    k = temp_kind("t_biased", lambda self, x: torch.bernoulli(torch.full_like(x, 1 - self.rate)))  # not rescaled
    want = r"train-mode mean multiplier 0\.(79|80)\d* on \(512, 16, 8, 8\) inputs, expected 1"
    with pytest.raises(contracts.ContractError, match=want):
        contracts.check_dropout(k)


def test_a_wrong_noise_var_fails(temp_kind) -> None:
    import torch

    k = temp_kind("t_var", lambda self, x: torch.bernoulli(torch.full_like(x, 1 - self.rate)) / (1 - self.rate),
                  closed_form="elementwise", noise_var=lambda r: r * r / 3)  # uout's, not Bernoulli's
    want = r"variance of the multiplier 0\.2[45]\d*, but noise_var\(0\.2\) = 0\.0133"
    with pytest.raises(contracts.ContractError, match=want):
        contracts.check_dropout(k)


def test_shared_noise_declared_elementwise_fails(temp_kind) -> None:
    import torch

    def channel(self, x):
        shape = x.shape[:2] + (1,) * (x.dim() - 2)
        return torch.bernoulli(torch.full(shape, 1 - self.rate)) / (1 - self.rate)

    k = temp_kind("t_shared", channel, closed_form="elementwise", noise_var=lambda r: r / (1 - r))
    with pytest.raises(contracts.ContractError, match="neighbouring multipliers correlate"):
        contracts.check_dropout(k)
    registry.unregister("dropout", k)
    ok = temp_kind("t_shared_ok", channel, closed_form=None)
    contracts.check_dropout(ok)  # the same noise, honestly declared without a closed form, passes


def test_a_kind_active_in_eval_mode_fails(temp_kind) -> None:
    from search.trial.dropout.module import VarianceDropout

    class Always(VarianceDropout):
        closed_form = None

        def forward(self, x):
            return x * 1.0001

    registry.register_dropout("t_always")(Always)
    try:
        with pytest.raises(contracts.ContractError, match="eval mode changes its input"):
            contracts.check_dropout("t_always")
    finally:
        registry.unregister("dropout", "t_always")


def test_a_placement_that_lies_about_its_target_fails() -> None:
    from search.trial.dropout.placements import PlacementSite
    from search.trial.dropout.surgery import wrap_before

    @registry.register_placement("t_liar", case=None, feeds_bn=False)
    def liar(model, make, *, input_size=None):
        site = wrap_before(model, "fc", make)
        return [PlacementSite(0, "", site.module, "global_pool", None, None)]  # says: before the pooling

    try:
        with pytest.raises(contracts.ContractError, match="says it runs before 'global_pool', but the next module "
                                                          "called is 'fc.1'"):
            contracts.check_placement("t_liar", "cifar_wrn")
    finally:
        registry.unregister("placement", "t_liar")


def test_a_placement_claiming_no_bn_while_feeding_one_fails() -> None:
    from search.trial.dropout.surgery import wrap_before

    @registry.register_placement("t_feeds", case=None, feeds_bn=False)
    def feeds(model, make, *, input_size=None):
        from torch import nn

        first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        return [wrap_before(model, first, make)]  # before the very first conv: every BN sees the noise

    try:
        with pytest.raises(contracts.ContractError, match="registered with feeds_bn=False, but BN"):
            contracts.check_placement("t_feeds", "cifar_wrn")
    finally:
        registry.unregister("placement", "t_feeds")
