"""timm's model contract, generated from the registry: every backbone family that is a timm model
(`register_backbone(..., timm_model=True)`: the paper's CIFAR families, and `timm_stock` through its
stand-in resnet18) is created with timm.create_model and held to what timm's own tests/test_models.py
checks of its models: the pretrained cfg (input size, mean/std, first conv, classifier, pool size),
timm's constructor keywords (num_classes, in_chans, global_pool, drop_rate, drop_path_rate for a family
whose blocks have a shortcut, device/dtype), forward_features / forward_head(pre_logits), reset_classifier
and get_classifier, features_only (feature_info channels and reductions), forward_intermediates and
prune_intermediate_layers, FX feature extraction, TorchScript (of the model and of its FX graph),
gradient checkpointing, backward. A family added to the registry is held to it without a new test.
Models are tiny (smallest depth, the contract width, 16 px) or on the meta device (shapes only).
"""
from __future__ import annotations

import fnmatch
import inspect
import math

import pytest
import timm
import torch
from torch import nn

from search import contracts, registry
from search.config import TrialConfig
from search.trial.models import CIFAR_BACKBONES, build_model
from search.trial.models.cifar_base import CIFAR_MEAN, CIFAR_STD
from search.trial.models.stock import width_kwargs

pytestmark = pytest.mark.usefixtures("no_onednn")

FAMILIES = registry.names("backbone")
IMAGE = 16  # px of the real-tensor inputs; more for a model of larger total stride (resnet18: 64)
STOCK_WIDTH = 0.125


def spec(family: str) -> tuple[str, dict]:
    """The timm model name and small constructor kwargs that stand for `family` (skips non-timm families)."""
    entry = registry.get("backbone", family)
    if entry.obj is not None or not entry.meta.get("timm_model"):
        pytest.skip(f"backbone {family!r} is built by its own builder, not a timm model: timm's contract does not apply")
    if entry.meta.get("stock"):
        return contracts.STOCK_STANDIN, width_kwargs(contracts.STOCK_STANDIN, STOCK_WIDTH)
    ok, depth = entry.meta.get("depth_ok"), entry.meta.get("default_depth")
    if ok is not None:
        depth = next(d for d in range(1, 400) if ok(d))
    return family, dict(depth=depth, width=float(entry.meta.get("contract_width", 0.5)))


def residual(family: str) -> bool:
    """A family whose blocks list a child off the main branch (a shortcut) has residual branches."""
    return any(skipped for skipped in registry.get("backbone", family).meta.get("blocks", {}).values())


def create(family: str, seed: int = 0, **kwargs) -> nn.Module:
    name, base = spec(family)
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **{**base, **kwargs})


def meta(family: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create(family, device="meta", **kwargs).eval()


def side(model: nn.Module) -> int:
    """IMAGE px, or enough for the last feature map to be 2x2 (so max and avg pooling differ)."""
    return max(IMAGE, 2 * model.feature_info[-1]["reduction"])


def image(side: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))


def assert_maps(family: str, maps: list[torch.Tensor], info, side: int, batch: int = 2) -> None:
    """timm's check of feature maps against feature_info: channels equal, spatial size within the stride's bounds."""
    channels, reductions = info.channels(), info.reduction()
    assert len(maps) == len(channels) >= 3, f"{family}: {len(maps)} feature maps for {len(channels)} taps"
    for c, r, m in zip(channels, reductions, maps):
        assert m.shape[0] == batch and m.shape[1] == c, f"{family}: map {tuple(m.shape)} for {c} channels"
        for s in m.shape[2:]:
            assert side / (2 * r) < s <= math.ceil(side / r) + 1, f"{family}: map side {s} at stride {r} of {side} px"
        assert torch.isfinite(m).all()


# ------------------------------------------------------------------ the pretrained cfg
@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_cfg(family: str) -> None:
    model = meta(family)
    cfg = model.pretrained_cfg
    assert model.default_cfg == cfg
    chans, height, width = cfg["input_size"]
    assert chans == model.in_chans == 3 and len(cfg["mean"]) == len(cfg["std"]) == chans
    state = model.state_dict()
    first = (cfg["first_conv"],) if isinstance(cfg["first_conv"], str) else cfg["first_conv"]
    assert all(f"{f}.weight" in state for f in first), f"first_conv {first} not among the parameters"
    assert f"{cfg['classifier']}.weight" in state and cfg["num_classes"] == model.num_classes
    assert model.get_classifier() is model.get_submodule(cfg["classifier"])
    # forward_features at the cfg's input size: pool_size spatial, num_features channels (shapes only)
    feats = model.forward_features(torch.empty(1, chans, height, width, device="meta"))
    assert tuple(feats.shape[1:]) == (model.num_features, *cfg["pool_size"])
    if family in CIFAR_BACKBONES:
        assert cfg["input_size"] == (3, 32, 32) and cfg["pool_size"] == (8, 8) and cfg["crop_pct"] == 1.0
        assert tuple(cfg["mean"]) == CIFAR_MEAN and tuple(cfg["std"]) == CIFAR_STD
        assert cfg["url"] == "" and model.get_classifier(name_only=True) == cfg["classifier"] == "fc"
    # in_chans reaches the first conv
    one = meta(family, in_chans=1)
    assert all(one.get_submodule(f).in_channels == 1 for f in first) and one.in_chans == 1


# ------------------------------------------------------------------ constructor keywords
@pytest.mark.parametrize("family", FAMILIES)
def test_constructor_keywords(family: str) -> None:
    with pytest.raises(TypeError):  # timm: an unknown constructor argument raises
        meta(family, not_a_model_arg=1)
    default = meta(family)
    assert default.drop_rate == 0.0 and default.global_pool.pool_type == "avg"
    assert not any(type(m).__name__ == "DropPath" for m in default.modules())
    model = meta(family, num_classes=7, in_chans=1, global_pool="catavgmax", drop_rate=0.25)
    assert model.num_classes == 7 and model.get_classifier().out_features == 7 and model.drop_rate == 0.25
    assert model.global_pool.pool_type == "catavgmax" and model.head_hidden_size == 2 * model.num_features
    if residual(family):
        model = meta(family, drop_path_rate=0.3)
        rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
        assert rates and max(rates) == pytest.approx(0.3) and rates == sorted(rates)  # timm's linear rule
    # timm's builder passes device and dtype through to every parameter and buffer
    model = create(family, device="meta", dtype=torch.float64)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_new_keywords_leave_the_trial_models_unchanged() -> None:
    """build_model passes none of the new keywords: no classifier dropout, no DropPath, avg pooling."""
    for family in CIFAR_BACKBONES:
        model = build_model(TrialConfig(backbone=family, depth=spec(family)[1]["depth"], width=0.5))
        assert model.drop_rate == 0.0 and model.global_pool.pool_type == "avg"
        assert not any(type(m).__name__ == "DropPath" for m in model.modules())
        assert all(getattr(m, "drop_path", None) is None for m in model.modules())


# ------------------------------------------------------------------ features and head
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_features_and_head(family: str) -> None:
    model = create(family, num_classes=5).eval()
    px = side(model)
    x = image(px)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        out = model(x)
    r = model.feature_info[-1]["reduction"]
    assert tuple(feats.shape) == (2, model.num_features, math.ceil(px / r), math.ceil(px / r))
    assert tuple(pre.shape) == (2, model.head_hidden_size) and tuple(logits.shape) == (2, 5)
    torch.testing.assert_close(out, logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_reset_classifier(family: str) -> None:
    model = create(family, global_pool="max").eval()
    assert inspect.signature(model.reset_classifier).parameters["global_pool"].default is None
    x = image(side(model))
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(5)  # keeps the max pooling
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), pre)
        assert model(x).shape == (2, 5) and model.num_classes == 5
        model.reset_classifier(0)  # no classifier: the pooled features
        assert model.num_classes == 0
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, "")  # nor pooling: the unpooled features
        assert model(x).dim() == 4 and model(x).shape[1] == model.num_features
        model.reset_classifier(3, "avg")
        assert not torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True), pre)
    # the same through the constructor
    assert meta(family, num_classes=0)(torch.empty(1, 3, IMAGE, IMAGE, device="meta")).shape == pre[:1].shape
    assert meta(family, num_classes=0, global_pool="")(torch.empty(1, 3, IMAGE, IMAGE, device="meta")).dim() == 4
    # the new head follows the model's device, dtype and train/eval flag; frozen weights stay frozen
    model = meta(family).to(dtype=torch.float64).train()
    model.requires_grad_(False)
    model.reset_classifier(0)
    model.reset_classifier(2)
    head = list(model.get_classifier().parameters())
    assert head and all(p.device.type == "meta" and p.dtype == torch.float64 for p in head)
    assert all(m.training for m in model.modules())
    model.reset_classifier(0, "")
    assert not [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("family", FAMILIES)
def test_group_matcher_splits_the_parameters(family: str) -> None:
    from timm.models._manipulate import group_parameters

    model = meta(family)
    names = {n for n, _ in model.named_parameters()}
    for coarse in (True, False):
        groups = group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)
        assert len(set(groups.values())) > 1 and set(groups) == names


# ------------------------------------------------------------------ features_only, intermediates
@pytest.mark.parametrize("family", FAMILIES)
def test_features_only(family: str) -> None:
    model = create(family).eval()
    features = create(family, features_only=True).eval()  # same seed: same weights
    info = features.feature_info
    assert info.channels() == [f["num_chs"] for f in model.feature_info]
    assert info.reduction() == [f["reduction"] for f in model.feature_info]
    assert features.pretrained_cfg["input_size"] == model.pretrained_cfg["input_size"]
    x = image(side(model))
    with torch.no_grad():
        maps = features(x)
        _, inter = model.forward_intermediates(x)
    assert_maps(family, maps, info, side(model))
    for a, b in zip(maps, inter):
        torch.testing.assert_close(a, b)
    some = create(family, features_only=True, out_indices=(1, 2)).eval()
    assert some.feature_info.channels() == info.channels()[1:3]
    with torch.no_grad():
        assert [m.shape for m in some(x)] == [m.shape for m in maps[1:3]]


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_intermediates(family: str) -> None:
    model = create(family).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = image(side(model))
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert_maps(family, inter, info, side(model))
        torch.testing.assert_close(final, model.forward_features(x))
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape for t in last2] == [t.shape for t in inter[-2:]]
        _, early = model.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(early[0], inter[1])
        # timm's FeatureGetterNet (features_only, feature_cls='getter') prunes the model and calls it
        getter = create(family, features_only=True, feature_cls="getter", out_indices=(0, 1)).eval()
        for a, b in zip(getter(x), inter[:2]):
            torch.testing.assert_close(a, b)
        kept = model.prune_intermediate_layers(indices=[1])
        assert kept == [1] and model.num_classes == 0
        torch.testing.assert_close(model.forward_intermediates(x, indices=[1], intermediates_only=True)[0], inter[1])


# ------------------------------------------------------------------ FX and TorchScript
def fx_model(model: nn.Module) -> nn.Module:
    """The model as timm's tests trace it: torchvision's feature extractor with timm's leaf modules."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tracer = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                  param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer)


@pytest.mark.parametrize("family", FAMILIES)
def test_fx_feature_extraction(family: str) -> None:
    model = create(family).eval()
    x = image(side(model))
    with torch.no_grad():
        want = model(x)
        got = tuple(fx_model(model)(x).values())
        torch.testing.assert_close(torch.cat(got), want, rtol=1e-4, atol=1e-5)
        # timm's own FX feature extractor: the feature_info taps as graph outputs
        features = create(family, features_only=True).eval()
        graph = create(family, features_only=True, feature_cls="fx").eval()
        for a, b in zip(graph(x), features(x)):
            torch.testing.assert_close(a, b)
    trained = fx_model(create(family, num_classes=3).train())
    out = torch.cat(tuple(trained(x).values()))
    out.mean().backward()
    assert all(p.grad is not None for p in trained.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_torchscript(family: str) -> None:
    with timm.set_scriptable(True):
        model = create(family).eval()
    x = image(side(model))
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), want)
        # the FX-traced graph scripts too (a forward annotation it cannot read once failed here)
        torch.testing.assert_close(torch.cat(tuple(torch.jit.script(fx_model(model))(x).values())), want)


# ------------------------------------------------------------------ training utilities
@pytest.mark.parametrize("family", FAMILIES)
def test_backward_and_grad_checkpointing(family: str) -> None:
    x = image(side(meta(family)))
    grads = []
    for checkpointing in (False, True):
        model = create(family, num_classes=4).train()
        model.set_grad_checkpointing(checkpointing)
        model(x).pow(2).mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"{family}: no gradient for {missing[:3]}"
        grads.append([p.grad for p in model.parameters()])
        # forward_intermediates runs the same blocks, checkpointed or not
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model.forward_intermediates(x)[0], model.forward_features(x))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_every_timm_family_is_covered() -> None:
    """The cases above come from the registry: the CIFAR families and the stock stand-in are all here."""
    assert set(CIFAR_BACKBONES) | {"timm_stock"} <= set(FAMILIES)
    assert all(fnmatch.fnmatch(n, "cifar_*") for n in CIFAR_BACKBONES)
