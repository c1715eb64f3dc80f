"""search.trial.train: the loop learns, is reproducible, reports per epoch and survives divergence (CPU)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from search.config import TrialConfig
from search.trial.data import load_data
from search.trial.train import CHECK_EVERY, EPOCH_KEYS, _optimizer, evaluate, lr_at, seed_everything, train

CPU = torch.device("cpu")


def small_cnn(in_chans: int = 1, num_classes: int = 10, p: float = 0.1) -> nn.Module:
    """Conv-BN-ReLU-pool x2, dropout, linear: for 8x8 inputs (digits at native size)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(p), nn.Linear(32 * 2 * 2, num_classes))


class NaNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((1, 2, 3))[:, None]) * float("nan")


def cfg(**kw) -> TrialConfig:
    base = dict(dataset="digits", image_size=8, in_chans=1, batch_size=64, epochs=4, lr=0.1, seed=0,
                warmup_epochs=0.5)
    return TrialConfig(**{**base, **kw})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    # spin-waiting makes them many times slower; restored afterwards for other modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return load_data(cfg(), CPU)


def run(c: TrialConfig, data, model: nn.Module | None = None, **kw):
    seed_everything(c.seed)
    return train(model or small_cnn(), data, c, CPU, **kw)


def test_learns_digits_and_reports_each_epoch(digits):
    rows = []
    out = run(cfg(), digits, on_epoch=rows.append)
    assert out.status == "ok" and out.epochs_completed == 4 and len(rows) == 4 and rows == out.history
    for i, r in enumerate(rows, 1):
        assert set(r) == set(EPOCH_KEYS) and all(type(v) is float for v in r.values()) and r["epoch"] == i
        assert r["epoch_time_s"] > 0 and r["throughput"] > 0
    assert rows[-1]["test_acc"] > 0.9, rows[-1]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert out.images_seen == 4 * digits.n_train
    assert out.train_time_s == pytest.approx(sum(r["epoch_time_s"] for r in rows))
    assert out.throughput == pytest.approx(out.images_seen / out.train_time_s)
    assert (out.train_loss, out.train_acc) == (rows[-1]["train_loss"], rows[-1]["train_acc"])
    # evaluate() agrees with the last epoch's test metrics and leaves the mode alone.
    model = small_cnn()
    seed_everything(0)
    out = train(model, digits, cfg(epochs=1), CPU)
    model.train()
    loss, acc = evaluate(model, digits.test, CPU)
    assert model.training and (loss, acc) == (out.history[0]["test_loss"], out.history[0]["test_acc"])


def test_same_seed_same_history_bit_for_bit(digits):
    c = cfg(epochs=2, augment=True, schedule="multistep")
    a, b = run(c, digits), run(c, digits)
    timing = {"epoch_time_s", "throughput"}
    strip = lambda h: [{k: v for k, v in r.items() if k not in timing} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert strip(run(c.replace(seed=1), digits).history) != strip(a.history)


@pytest.mark.parametrize("how", ["huge_lr", "nan_model"])
def test_divergence_is_a_result_not_a_crash(digits, how):
    rows = []
    if how == "huge_lr":
        small_batches = load_data(cfg(batch_size=8), CPU)  # 180 steps per epoch: more than CHECK_EVERY
        out = run(cfg(lr=1e6, warmup_epochs=0.0, batch_size=8), small_batches, on_epoch=rows.append)
        assert out.images_seen == CHECK_EVERY * 8  # stopped at the first check, not at the epoch's end
    else:
        out = run(cfg(), digits, model=NaNModel(), on_epoch=rows.append)
    assert out.status == "diverged" and out.epochs_completed < 4 and len(rows) == out.epochs_completed
    assert not math.isfinite(out.train_loss)
    assert out.epochs_completed == 0  # the first epoch already blew up


def test_lr_schedule_endpoints_and_warmup():
    assert lr_at(0, 100, 0, 0.1, "cosine") == pytest.approx(0.1)
    assert lr_at(50, 100, 0, 0.1, "cosine") == pytest.approx(0.05)
    assert lr_at(100, 100, 0, 0.1, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert 0 < lr_at(99, 100, 0, 0.1, "cosine") < 1e-3
    assert [lr_at(s, 100, 10, 0.1, "cosine") for s in (0, 9, 10)] == pytest.approx([0.01, 0.1, 0.1])
    assert [lr_at(s, 100, 0, 0.1, "multistep") for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 10, 0, 0.1, "linear")


def test_reported_lr_follows_cosine(digits):
    out = run(cfg(epochs=2, warmup_epochs=0.0, compile=True, amp=True, channels_last=True), digits)  # no-ops on CPU
    steps = len(digits.train)
    assert out.history[0]["lr"] == pytest.approx(lr_at(steps - 1, 2 * steps, 0, 0.1, "cosine"))
    assert out.history[-1]["lr"] < 0.01


def test_weight_decay_only_on_conv_and_linear_weights():
    model = small_cnn()
    groups = _optimizer(model, cfg(weight_decay=0.5)).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.5 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {"0.weight", "4.weight", "10.weight"}  # convs and the linear; no BN, no bias
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert groups[0]["nesterov"] and not _optimizer(model, cfg(momentum=0.0)).param_groups[0]["nesterov"]
