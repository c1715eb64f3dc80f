"""Placement surgery, proved by execution order: forward pre-hooks record every dropout,
conv, BatchNorm and Linear call, and each site is checked against its definition
(PAPER.md "Placements in the paper"; docs/placement.md). Generated from the registry:
every supported backbone x every placement, forward + backward at 32x32."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from search.config import PLACEMENTS, TrialConfig
from search.trial.dropout import VarianceDropout, apply_placement, list_dropout_kinds
from search.trial.models import SUPPORTED_BACKBONES, build_model

pytestmark = pytest.mark.usefixtures("no_onednn")


# Small but structurally complete settings per backbone (depth, width): fast on 2 CPU cores.
SMALL = {
    "cifar_wrn": (16, 1.0),
    "cifar_preresnet": (11, 0.5),  # bottleneck, n=1
    "cifar_resnext": (11, 0.25),
    "cifar_densenet_bc": (16, 0.5),
    "resnet18": (None, 0.125),
    "resnet50": (None, 0.125),
    "resnext50_32x4d": (None, 0.25),  # 0.125 would leave 32 groups with 0 channels each
    "densenet121": (None, 0.125),
    "wide_resnet50_2": (None, 0.125),
}
LEAVES = (VarianceDropout, nn.Conv2d, _BatchNorm, nn.Linear)
OFF_MAIN_BRANCH = ("shortcut", "downsample", "se")


def expected_blocks(backbone: str, depth: int | None) -> int:
    """Block counts from the architectures' definitions, independent of the surgery code."""
    if backbone == "cifar_wrn":
        return (depth - 4) // 6 * 3
    if backbone == "cifar_preresnet":
        # He et al.: basic (6n+2) below 164, bottleneck (9n+2) otherwise.
        basic = (depth - 2) % 6 == 0 and not (depth >= 164 and (depth - 2) % 9 == 0)
        return (depth - 2) // 6 * 3 if basic else (depth - 2) // 9 * 3
    if backbone == "cifar_resnext":
        return (depth - 2) // 9 * 3
    if backbone == "cifar_densenet_bc":
        return (depth - 4) // 6 * 3
    return {"resnet18": 8, "resnet50": 16, "resnext50_32x4d": 16, "wide_resnet50_2": 16,
            "densenet121": 6 + 12 + 24 + 16}[backbone]


def cfg_for(backbone: str, placement: str, **kw) -> TrialConfig:
    depth, width = SMALL[backbone]
    return TrialConfig(backbone=backbone, depth=depth, width=width, dropout_placement=placement,
                       dropout_rate=0.1, **kw)


def leaf_calls(model: nn.Module, x: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """Run model(x) recording leaf calls (dropout, conv, BN, Linear) in order; returns (names, output)."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, LEAVES)}
    calls: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _i: calls.append(names[mod])) for m in names]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls, out


def on_main_branch(name: str, block: str) -> bool:
    rest = name[len(block) + 1:]
    return name.startswith(block + ".") and rest.split(".")[0] not in OFF_MAIN_BRANCH


def test_every_supported_backbone_has_a_small_setting() -> None:
    assert set(SMALL) == set(SUPPORTED_BACKBONES)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("backbone", SUPPORTED_BACKBONES)
def test_placement_position(backbone: str, placement: str) -> None:
    cfg = cfg_for(backbone, placement)
    model = build_model(cfg).train()
    sites = model.dropout_sites
    modules = dict(model.named_modules())
    drops = [n for n, m in modules.items() if isinstance(m, VarianceDropout)]
    assert sorted(drops) == sorted(s.module for s in sites)

    x = torch.randn(2, 3, 32, 32)
    calls, out = leaf_calls(model, x)
    assert out.shape == (2, 10)
    out.square().mean().backward()  # forward + backward at 32x32, every backbone x placement
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)

    def is_bn(n: str) -> bool:
        return isinstance(modules[n], _BatchNorm)

    if placement == "none":
        assert sites == [] and drops == []
        return
    if placement == "head":
        assert len(sites) == 1
        (site,) = sites
        i = calls.index(site.module)
        assert all(j < i for j, n in enumerate(calls) if is_bn(n)), "a BN runs after the head dropout"
        assert calls[i + 1] == site.target and isinstance(modules[site.target], nn.Linear)
        assert i + 2 == len(calls), "the classifier is the last layer"
        assert site.feeds_bn is None and site.fan_in is None and site.block == ""
        return

    if placement == "pre_pool":  # the final feature map, right before global pooling: every BN has run
        (site,) = sites
        i = calls.index(site.module)
        assert all(j < i for j, n in enumerate(calls) if is_bn(n)), "a BN runs after the pre_pool dropout"
        assert site.target == "global_pool.1" and calls[i + 1] == classifier(model)
        assert site.feeds_bn is None and site.fan_in is None and site.block == "" and site.after is None
        return

    assert len(sites) == expected_blocks(backbone, cfg.depth)
    assert [s.index for s in sites] == list(range(len(sites)))
    assert len({s.block for s in sites}) == len(sites)
    if placement in ("post_conv", "post_bn", "post_add"):
        for site in sites:
            check_after_site(placement, site, calls, modules)
        return
    for site in sites:
        i = calls.index(site.module)
        assert calls.count(site.module) == 1
        nxt = calls[i + 1]
        assert nxt == site.target
        later_in_block = [n for n in calls[i + 2:] if on_main_branch(n, site.block)]
        if placement == "pre_bn":
            # Dropout-(a): dropout -> BN, and that BN is the block's last on its main branch.
            assert is_bn(nxt) and site.feeds_bn == nxt and site.fan_in is None
            assert not any(is_bn(n) for n in later_in_block)
        else:
            # Dropout-(b): dropout -> conv -> ... -> BN (never the classifier first).
            assert isinstance(modules[nxt], nn.Conv2d)
            assert not any(isinstance(modules[n], nn.Conv2d) for n in later_in_block)
            first = next(n for n in calls[i + 2:] if is_bn(n) or isinstance(modules[n], nn.Linear))
            assert is_bn(first) and site.feeds_bn == first
            w = modules[nxt].weight
            conv = modules[nxt]
            assert site.fan_in == conv.in_channels // conv.groups * w.shape[2] * w.shape[3]
        assert on_main_branch(site.target, site.block)


def classifier(model: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is model.get_classifier())


def check_after_site(placement: str, site, calls: list[str], modules: dict[str, nn.Module]) -> None:
    """An after-site by its definition, on the leaf calls: the dropout runs right after the last conv (post_conv) or
    BN (post_bn) of its block's main branch, or after the whole block (post_add); its target and feeds_bn are the
    first layer and the first BN called after it, passing over the block's own shortcut, which reads the block's
    input; fan_in is the last conv's between them."""
    i = calls.index(site.module)
    assert calls.count(site.module) == 1
    wrapper = site.module.rpartition(".")[0]
    assert site.module == f"{wrapper}.1" and site.after == f"{wrapper}.0"
    if placement == "post_add":
        assert site.after == site.block  # the block itself moved to P.0
        assert calls[i - 1].startswith(site.block + ".")  # its last layer ran right before the dropout
        block_calls = [j for j, n in enumerate(calls) if n.startswith(site.block + ".")]
        assert max(block_calls) == i - 1
    else:
        want = nn.Conv2d if placement == "post_conv" else _BatchNorm
        assert calls[i - 1] == site.after and isinstance(modules[site.after], want)
        block = site.block
        assert on_main_branch(site.after, block)
        later = [n for n in calls[i + 1:] if on_main_branch(n, block)]
        assert not any(isinstance(modules[n], want) for n in later), "not the last of its kind in the block"
    off = tuple(f"{site.block}.{c}" for c in OFF_MAIN_BRANCH) if placement != "post_add" else ()
    rest = [n for n in calls[i + 1:] if not n.startswith(off) and not isinstance(modules[n], VarianceDropout)]
    assert site.target == (rest[0] if rest else "")
    bns = [j for j, n in enumerate(rest) if isinstance(modules[n], _BatchNorm)]
    assert site.feeds_bn == (rest[bns[0]] if bns else None)
    convs = [modules[n] for n in rest[:bns[0]] if isinstance(modules[n], (nn.Conv2d, nn.Linear))] if bns else []
    if convs:
        c = convs[-1]
        assert site.fan_in == c.in_channels // c.groups * c.weight.shape[2] * c.weight.shape[3]
    else:
        assert site.fan_in is None
    if placement == "post_conv":  # case (a): no weight layer between the dropout and the BN it feeds
        assert isinstance(modules[site.target], _BatchNorm) and site.target == site.feeds_bn
    if placement == "post_bn":  # case (b): a weight layer first
        assert isinstance(modules[site.target], (nn.Conv2d, nn.Linear))


@pytest.mark.parametrize("depth, blocks, last_bn", [(14, 6, "bn2"), (26, 12, "bn2"), (11, 3, "bn3"), (20, 9, "bn2"),
                                                    (29, 9, "bn3")])
def test_preresnet_basic_and_bottleneck_counts(depth: int, blocks: int, last_bn: str) -> None:
    # He et al.: 6n+2 builds basic blocks below 164 (20 = 6*3+2 -> 9 basic blocks); 9n+2 otherwise.
    cfg = TrialConfig(backbone="cifar_preresnet", depth=depth, width=0.25, dropout_placement="pre_bn")
    model = build_model(cfg)
    assert len(model.dropout_sites) == blocks == expected_blocks("cifar_preresnet", depth)
    assert all(s.target.endswith(f"{last_bn}.1") for s in model.dropout_sites)


def test_preresnet_forced_basic_block() -> None:
    import timm

    model = timm.create_model("cifar_preresnet", depth=20, block="basic", width=0.25)
    sites = apply_placement(model, "pre_conv", "bernoulli", 0.1)
    assert len(sites) == 9 and all(s.target.endswith("conv2.1") for s in sites)


def test_wrn_pre_conv_is_the_wrn_dropout_position() -> None:
    model = build_model(TrialConfig(backbone="cifar_wrn", depth=10, width=2.0, dropout_placement="pre_conv"))
    s = model.dropout_sites
    assert [x.target for x in s] == ["body.0.0.conv2.1", "body.1.0.conv2.1", "body.2.0.conv2.1"]
    assert [x.fan_in for x in s] == [32 * 9, 64 * 9, 128 * 9]
    # pre-activation: the noise crosses the residual add into the next block's first BN, then the head BN
    assert [x.feeds_bn for x in s] == ["body.1.0.bn1", "body.2.0.bn1", "pre_head.0"]


def test_state_dict_keys_change_predictably() -> None:
    plain = build_model(cfg_for("resnet18", "none")).state_dict()
    placed = build_model(cfg_for("resnet18", "pre_bn")).state_dict()
    assert "layer1.0.bn2.weight" in plain and "layer1.0.bn2.1.weight" in placed
    assert "layer1.0.bn2.weight" not in placed
    moved = {k.replace("bn2.1.", "bn2.") for k in placed}
    assert moved == set(plain)
    assert all(torch.equal(plain[k], placed[k.replace("bn2.", "bn2.1.")] if "bn2." in k else placed[k])
               for k in plain)


@pytest.mark.parametrize("kind", list_dropout_kinds())
def test_every_dropout_kind_is_inserted(kind: str) -> None:
    cfg = TrialConfig(backbone="cifar_wrn", depth=10, dropout_placement="pre_bn", dropout_type=kind,
                      dropout_rate=0.3)
    model = build_model(cfg)
    drops = [m for m in model.modules() if isinstance(m, VarianceDropout)]
    assert len(drops) == 3 and all(d.kind == kind and d.rate == 0.3 for d in drops)


def test_rate_zero_still_inserts_identity_modules() -> None:
    base = build_model(TrialConfig(backbone="cifar_wrn", depth=10, seed=3)).eval()
    zero = build_model(TrialConfig(backbone="cifar_wrn", depth=10, seed=3, dropout_placement="pre_conv",
                                   dropout_rate=0.0)).train()
    assert len(zero.dropout_sites) == 3
    x = torch.randn(2, 3, 32, 32)
    base.train()
    assert torch.allclose(base(x), zero(x))


def test_dropout_is_active_in_train_and_off_in_eval() -> None:
    model = build_model(TrialConfig(backbone="cifar_wrn", depth=10, dropout_placement="pre_bn", dropout_rate=0.5))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_trace_leaves_model_state_alone() -> None:
    cfg = cfg_for("densenet121", "none")
    model = build_model(cfg)
    model.features.norm0.eval()  # a frozen BN must stay frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    apply_placement(model, "pre_conv", "bernoulli", 0.2)
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training and not model.features.norm0.training
    after = model.state_dict()
    for k, v in before.items():
        k2 = k.replace(".conv2.", ".conv2.1.") if ".conv2." in k else k
        assert torch.equal(v, after[k2]) and after[k2].device.type == "cpu"


def test_unknown_placement_is_a_clear_error() -> None:
    model = build_model(TrialConfig(backbone="cifar_wrn", depth=10))
    with pytest.raises(ValueError, match=r"field 'dropout_placement' = 'middle' is not allowed "
                                         r"\(allowed: none, pre_bn, pre_conv, head, pre_pool, post_conv, post_bn, "
                                         r"post_add\)"):
        apply_placement(model, "middle", "bernoulli", 0.1)
    with pytest.raises(ValueError, match="field 'dropout_type'"):
        apply_placement(model, "pre_bn", "salt", 0.1)


@pytest.mark.parametrize("placement", ["pre_bn", "pre_conv", "post_conv", "post_bn", "post_add"])
def test_bn_placement_on_a_backbone_without_batchnorm(placement: str) -> None:
    cfg = TrialConfig(backbone="convnext_atto", depth=None, dropout_placement=placement)
    with pytest.raises(ValueError, match=rf"field 'dropout_placement' = '{placement}'.*'convnext_atto' has no"
                                         r" BatchNorm \(allowed for it: none, head, pre_pool\)"):
        build_model(cfg)


def test_head_works_without_batchnorm() -> None:
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                            depth=2)
    with pytest.raises(ValueError, match="has no BatchNorm"):
        apply_placement(vit, "pre_conv", "bernoulli", 0.1)
    (site,) = apply_placement(vit, "head", "uout", 0.1)
    assert site.target == "head.1" and isinstance(vit.head[0], VarianceDropout)
    model = build_model(TrialConfig(backbone="convnext_atto", depth=None, dropout_placement="head",
                                    dropout_rate=0.2))
    calls, out = leaf_calls(model.train(), torch.randn(2, 3, 32, 32))
    assert calls[-2:] == ["head.fc.0", "head.fc.1"] and out.shape == (2, 10)
    out.sum().backward()
