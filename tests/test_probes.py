"""search.trial.probes: known answers on toy nets, exact streaming statistics, layer facts, and every backbone."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from analysis.theory import shift_case_a, shift_uout
from search.config import TrialConfig
from search.trial.dropout import make_dropout
from search.trial.probes import measure_variance_shift, reestimate_bn

pytestmark = pytest.mark.usefixtures("no_onednn")

# Toy known-answer setting: channel k gets x ~ N(c_k, v_k) with c_k^2 / v_k = 1 in every channel, so each
# channel has the same Delta and both `shift` (ratio of channel means) and `shift_channelwise` equal 1/Delta.
TOY_C = torch.tensor([1.0, -2.0, 0.5, 3.0])
TOY_V = TOY_C**2
# 40 batches x 128 images x 8 x 8 = 327,680 values per channel. The dropout output has kurtosis ~4.1
# (bernoulli 0.5) and ~4.4 (uout 0.8), so running_var has relative standard error sqrt((k-1)/n) ~ 0.32%,
# real_var sqrt(2/n) ~ 0.25%: their ratio ~ 0.4%, and the 2% tolerance is about 5 standard errors.
TOY_BATCHES, TOY_BATCH, TOY_HW = 40, 128, 8



def toy_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    c, sd = TOY_C.view(1, -1, 1, 1), TOY_V.sqrt().view(1, -1, 1, 1)
    shape = (TOY_BATCH, len(TOY_C), TOY_HW, TOY_HW)
    return [(c + sd * torch.randn(shape, generator=g), torch.zeros(TOY_BATCH)) for _ in range(TOY_BATCHES)]


def trained_toy(kind: str, rate: float, batches: list) -> nn.Sequential:
    """dropout -> BN, trained in train mode; momentum=None makes running_var the exact cumulative average."""
    model = nn.Sequential(make_dropout(kind, rate), nn.BatchNorm2d(len(TOY_C), momentum=None))
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    return model


@pytest.mark.parametrize("kind, rate, delta", [
    ("bernoulli", 0.5, lambda c, v: shift_case_a(1.0 - 0.5, c, v)),  # case (a): p = 1 - rate
    ("uout", 0.8, lambda c, v: shift_uout(0.8, c, v)),  # beta = rate (0.8: a shift well above the noise)
])
def test_shift_matches_closed_form(kind: str, rate: float, delta) -> None:
    batches = toy_batches()
    model = trained_toy(kind, rate, batches)
    (rec,) = measure_variance_shift(model, batches, "cpu")
    want = 1.0 / delta(TOY_C.numpy(), TOY_V.numpy())
    assert np.allclose(want, want[0]) and want[0] > 1.4  # same Delta in every channel, and a clear shift
    assert rec.fed_by_dropout and rec.name == "1" and rec.index == 0 and rec.channels == 4
    assert rec.shift == pytest.approx(want[0], rel=0.02)
    assert rec.shift_channelwise == pytest.approx(want[0], rel=0.02)
    assert rec.real_var == pytest.approx(float(TOY_V.mean()), rel=0.02)  # eval mode: dropout is off
    assert rec.real_mean == pytest.approx(float(TOY_C.mean()), abs=0.02)

    reestimate_bn(model, batches, "cpu")
    (after,) = measure_variance_shift(model, batches, "cpu")
    assert after.shift == pytest.approx(1.0, rel=0.01)
    assert model.training and model[1].momentum is None  # modes and momentum restored (it was None here)


def test_reestimate_restores_modes_and_momentum() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.Dropout(0.5), nn.BatchNorm2d(4))
    model.train()
    model[3].eval()  # a frozen submodule must stay frozen
    batches = [torch.randn(8, 3, 6, 6) + 2.0 for _ in range(3)]
    reestimate_bn(model, batches, None)
    assert model[1].momentum == 0.3 and model[3].momentum == 0.1
    assert [m.training for m in model] == [True, True, True, False]
    assert int(model[1].num_batches_tracked) == 3
    with pytest.raises(ValueError, match="no batches"):
        reestimate_bn(model, [], None)
    assert int(model[1].num_batches_tracked) == 3  # old statistics put back


class Tapped(nn.Module):
    """conv -> BN2d -> pool -> linear -> BN1d; records every BN input for a numpy reference."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn2d = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        self.fc, self.bn1d = nn.Linear(6, 5), nn.BatchNorm1d(5)
        self.seen: dict[str, list[np.ndarray]] = {"bn2d": [], "bn1d": []}
        for name in self.seen:
            getattr(self, name).register_forward_pre_hook(
                lambda m, a, name=name: self.seen[name].append(a[0].detach().double().numpy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2d(self.conv(x))
        return self.bn1d(self.fc(x.mean((2, 3))))


@pytest.mark.parametrize("dtype, layout, rtol", [
    (torch.float64, torch.contiguous_format, 1e-10),
    (torch.float32, torch.contiguous_format, 1e-5),
    (torch.float32, torch.channels_last, 1e-5),  # a separate code path (see search.trial.probes._batch_moments)
])
def test_streaming_statistics_are_exact_over_uneven_batches(dtype: torch.dtype, layout: torch.memory_format,
                                                            rtol: float) -> None:
    torch.manual_seed(0)
    model = Tapped().to(dtype=dtype, memory_format=layout)
    with torch.no_grad():  # non-trivial running statistics
        for bn in (model.bn2d, model.bn1d):
            bn.running_var.uniform_(0.5, 2.0)
            bn.running_mean.uniform_(-1.0, 1.0)
    # Uneven sizes (one of 1) and a different offset per batch: equal batch weights or a missing
    # between-batch term in the combination would both show.
    # A large offset (|mean| >> std) stresses the precision of the per-batch statistics.
    batches = [((torch.randn(n, 3, 7, 7, dtype=dtype) * (1 + i) + 3.0 * i + 1000.0).to(memory_format=layout), None)
               for i, n in enumerate((7, 64, 1, 33, 2))]
    records = {r.name: r for r in measure_variance_shift(model, batches, "cpu")}
    for name, axes in (("bn2d", (0, 2, 3)), ("bn1d", (0,))):
        data = np.concatenate(model.seen[name])
        var, mean = data.var(axis=axes), data.mean(axis=axes)
        moving = getattr(model, name).running_var.double().numpy()
        rec = records[name]
        assert rec.real_var == pytest.approx(var.mean(), rel=rtol)
        assert rec.real_mean == pytest.approx(mean.mean(), rel=rtol, abs=1e-12)
        assert rec.moving_var == pytest.approx(moving.mean(), rel=1e-12)
        assert rec.shift == pytest.approx(max(var.mean() / moving.mean(), moving.mean() / var.mean()), rel=rtol)
        assert rec.shift_channelwise == pytest.approx(np.maximum(var / moving, moving / var).mean(), rel=rtol)


def cos2_ref(w: torch.Tensor) -> float:
    w = w.detach().double().reshape(w.shape[0], -1).numpy()
    return float((w.sum(1) ** 2 / (w.shape[1] * (w * w).sum(1))).mean())


class Facts(nn.Module):
    """Each BN checks one case of fan_in / fed_by_dropout; see the expectations in the test."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.drop, self.conv2, self.bn2 = nn.Dropout(0.3), nn.Conv2d(8, 16, 3, groups=2), nn.BatchNorm2d(16)
        self.off, self.conv3, self.bn3 = make_dropout("uout", 0.0), nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)
        self.vd, self.bn4 = make_dropout("bernoulli", 0.2), nn.BatchNorm2d(16)
        self.fc, self.bn5 = nn.Linear(16, 5), nn.BatchNorm1d(5)
        nn.init.ones_(self.conv3.weight)  # cos^2 exactly 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(self.bn0(x)))
        x = self.bn2(self.conv2(self.drop(x)))
        x = self.bn3(self.conv3(self.off(x)))
        x = self.bn4(self.vd(x))
        return self.bn5(self.fc(x.mean((2, 3))))


def test_fan_in_dropout_and_cos2_facts() -> None:
    torch.manual_seed(0)
    model = Facts()
    recs = measure_variance_shift(model, [(torch.randn(4, 3, 9, 9), None)], "cpu")
    got = [(r.name, r.fan_in, r.fed_by_dropout) for r in recs]
    assert got == [
        ("bn0", None, False),  # nothing before it
        ("bn1", 3 * 3 * 3, False),
        ("bn2", 8 // 2 * 3 * 3, True),  # grouped conv: in_channels / groups * kh * kw; nn.Dropout(p > 0)
        ("bn3", 16, False),  # a rate-0 dropout injects no noise
        ("bn4", 16, True),  # dropout -> BN directly; the last weight layer is still conv3
        ("bn5", 16, False),  # Linear: in_features
    ]
    assert math.isnan(recs[0].cos2)
    assert recs[1].cos2 == pytest.approx(cos2_ref(model.conv1.weight), rel=1e-9)
    assert recs[2].cos2 == pytest.approx(cos2_ref(model.conv2.weight), rel=1e-9)
    assert recs[3].cos2 == pytest.approx(1.0) and recs[4].cos2 == pytest.approx(1.0)
    assert recs[5].cos2 == pytest.approx(cos2_ref(model.fc.weight), rel=1e-9)
    assert [r.channels for r in recs] == [3, 8, 16, 16, 16, 5]


class Shuffled(nn.Module):
    """Registration order (late, mid, early) differs from execution order (early, mid, late)."""

    def __init__(self) -> None:
        super().__init__()
        self.late, self.mid, self.early = nn.BatchNorm2d(2), nn.BatchNorm2d(2), nn.BatchNorm2d(2)
        self.frozen = nn.Sequential(nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(self.frozen(self.mid(self.early(x))))


def test_records_in_execution_order_modes_restored_hooks_removed() -> None:
    model = Shuffled().train()
    model.frozen.eval()
    recs = measure_variance_shift(model, [torch.randn(3, 2, 4, 4)], None)
    assert [r.name for r in recs] == ["early", "mid", "late"]
    assert [r.index for r in recs] == [0, 1, 2] and [r.rel_depth for r in recs] == [0.0, 0.5, 1.0]
    assert model.training and model.late.training and not model.frozen.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():  # also usable under no_grad, and leaves running statistics untouched
        again = measure_variance_shift(model, [torch.randn(3, 2, 4, 4)], None)
    assert [r.moving_var for r in again] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="no batches"):
        measure_variance_shift(model, [], None)


# Smallest valid configurations per family (depth rules in the registry, search.trial.models.families).
SMALL = {"cifar_wrn": (10, 1.0), "cifar_preresnet": (8, 0.5), "cifar_resnext": (11, 0.25),
         "cifar_densenet_bc": (10, 0.5)}


def _backbones() -> list[str]:
    from search.trial.models import SUPPORTED_BACKBONES  # written alongside; a missing module fails here loudly

    return list(SUPPORTED_BACKBONES)


@pytest.mark.parametrize("backbone", _backbones())
def test_probes_run_on_every_supported_backbone(backbone: str) -> None:
    from search.trial.models import build_model

    depth, width = SMALL.get(backbone, (None, 0.25))  # stock timm models fix their own depth
    cfg = TrialConfig(backbone=backbone, depth=depth, width=width, image_size=32, dropout_placement="pre_bn",
                      dropout_type="bernoulli", dropout_rate=0.3)
    model = build_model(cfg, num_classes=10)
    bns = {m: n for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    order: list[str] = []  # the reference execution order, seen by our own hooks during the probe's forward
    hooks = [m.register_forward_pre_hook(lambda m, a: order.append(bns[m])) for m in bns]
    recs = measure_variance_shift(model, [(torch.randn(2, 3, 32, 32), torch.zeros(2))], "cpu")
    for h in hooks:
        h.remove()
    assert len(recs) == len(bns) > 0
    assert [r.name for r in recs] == list(dict.fromkeys(order))  # execution order
    assert [r.index for r in recs] == list(range(len(recs)))
    assert any(r.fed_by_dropout for r in recs)
    assert all(math.isfinite(r.shift) and r.shift >= 1.0 for r in recs)
    assert all(r.fan_in is None or r.fan_in > 0 for r in recs)
