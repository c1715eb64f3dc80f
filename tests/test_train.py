"""search.trial.train: the loop learns, is reproducible, reports per epoch and survives divergence (CPU)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from search.config import TrialConfig
from search.trial.data import load_data
from search.trial.graphs import GraphedEval, GraphedTrainStep, pad_batch, static_batches, use_graphs
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


# --------------------------------------------------------------------------- CUDA graphs (issue 18)

CUDA = torch.cuda.is_available()


def test_graph_knob_is_a_no_op_on_cpu_bit_for_bit(digits):
    # A ragged last batch too: 1437 training images at batch 64 leave 29.
    assert digits.n_train % 64 not in (0, 1)
    ref = run(cfg(epochs=2, cuda_graphs="off"), digits)

    def strip(history: list[dict]) -> list[dict]:  # wall-clock columns differ run to run
        return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "throughput")} for r in history]

    for mode in ("on", "auto"):
        assert not use_graphs(cfg(cuda_graphs=mode), CPU)
        out = run(cfg(epochs=2, cuda_graphs=mode), digits)
        assert out.images_seen == ref.images_seen == 2 * digits.n_train
        assert strip(out.history) == strip(ref.history)


def test_use_graphs_rules():
    assert use_graphs(cfg(), torch.device("cuda")) and use_graphs(cfg(cuda_graphs="on"), torch.device("cuda"))
    assert not use_graphs(cfg(cuda_graphs="off"), torch.device("cuda"))
    assert not use_graphs(cfg(compile=True), torch.device("cuda"))  # auto leaves compiled models to torch.compile
    with pytest.raises(ValueError, match="field 'cuda_graphs' = 'on' conflicts with compile=True"):
        cfg(cuda_graphs="on", compile=True)
    with pytest.raises(ValueError, match=r"field 'cuda_graphs' = 'maybe' is not allowed \(allowed: auto, on, off\)"):
        cfg(cuda_graphs="maybe")


def test_static_batches_pad_ragged_last_by_wrap_around_and_drop_it():
    xs = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1)
    ys = torch.arange(10)
    batches = [(xs[i:i + 4], ys[i:i + 4]) for i in range(0, 10, 4)]  # 4, 4, 2
    out = list(static_batches(batches, 4))
    assert [n for _, _, n in out] == [4, 4, 2] and all(x.shape[0] == 4 for x, _, _ in out)
    x, y, _ = out[-1]
    assert y.tolist() == [8, 9, 0, 1] and x.flatten().tolist() == [8, 9, 0, 1]  # filled from the pass's first batch
    assert [n for _, _, n in static_batches(batches, 4, ragged="drop")] == [4, 4]
    # Fewer filler rows than missing ones: cycle through them.
    x, y = pad_batch(xs[:1], ys[:1], xs[5:7], ys[5:7], 6)
    assert y.tolist() == [0, 5, 6, 5, 6, 5]
    # The padding keeps channels_last (the graph's static input has one memory format).
    cl = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    px, _ = pad_batch(cl[:1], ys[:1], cl, ys[:2], 2)
    assert px.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="larger than the static size 4"):
        list(static_batches([(xs[:5], ys[:5])], 4))
    with pytest.raises(ValueError, match="allowed: pad, drop"):
        list(static_batches(batches, 4, ragged="trim"))


def test_fused_sgd_reading_lr_from_a_tensor_matches_the_eager_optimizer():
    # The graphed step's optimizer (fused, lr in a tensor written before each step) against train()'s
    # eager one, on CPU where both run: same updates through a changing schedule.
    torch.manual_seed(0)
    a = small_cnn()
    b = small_cnn()
    b.load_state_dict(a.state_dict())
    c = cfg()
    lr_t = torch.tensor(c.lr)
    opt_a, opt_b = _optimizer(a, c), _optimizer(b, c, lr=lr_t)
    assert opt_b.defaults["fused"] and all(g["lr"] is lr_t for g in opt_b.param_groups)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    a.eval(), b.eval()  # no dropout noise: both see the same function
    for step in range(6):
        lr = lr_at(step, 6, 2, c.lr, "cosine")
        for g in opt_a.param_groups:
            g["lr"] = lr
        lr_t.fill_(lr)
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # lr = 0 in the tensor: the next step leaves the weights where they are.
    before = [p.clone() for p in b.parameters()]
    lr_t.fill_(0.0)
    opt_b.zero_grad()
    F.cross_entropy(b(x), y).backward()
    opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(before, b.parameters()))


@pytest.mark.skipif(not CUDA, reason="CUDA-graph capture needs a CUDA device; this machine has none "
                                     "(CPU tests cover the knob, batching, optimizer and, with recorded "
                                     "stand-ins for the graph, the capture/replay logic)")
def test_graphed_training_captures_and_matches_eager_on_cuda():
    dev = torch.device("cuda")
    c = TrialConfig(dataset="synthetic", image_size=16, batch_size=64, epochs=2, seed=1, amp=False,
                    channels_last=False, train_samples=1000)  # 1000 % 64 = 40: a ragged last batch
    data = load_data(c, dev)
    eager = train(_seeded_model(c, data), data, c.replace(cuda_graphs="off"), dev)
    model = _seeded_model(c, data)
    graphed = train(model, data, c.replace(cuda_graphs="on"), dev)
    assert graphed.status == eager.status == "ok"
    # Same steps and schedule; the padded last batch adds 24 images per epoch.
    assert graphed.images_seen == eager.images_seen + 2 * 24
    for g, e in zip(graphed.history, eager.history):
        assert g["lr"] == e["lr"]
        # Fused vs foreach SGD and the padded batch: close, not equal.
        assert abs(g["test_acc"] - e["test_acc"]) < 0.1 and abs(g["train_loss"] - e["train_loss"]) < 0.3
    # The graphed evaluation (padded, masked) equals the eager one on the same weights.
    loss, acc = GraphedEval(model, dev, amp=False)(data.test)
    loss2, acc2 = GraphedEval(model, dev, amp=False)(data.test)  # second pass: replays only
    e_loss, e_acc = evaluate(model, data.test, dev)
    assert (loss, acc) == (loss2, acc2)
    assert acc == pytest.approx(e_acc, abs=1.5 / data.n_test) and loss == pytest.approx(e_loss, rel=1e-3)
    # A direct step object: eager warm-up, then a captured graph replayed.
    opt_lr = torch.tensor(0.05, device=dev)
    step = GraphedTrainStep(model, _optimizer(model, c, lr=opt_lr), opt_lr, label_smoothing=0.0, amp=False,
                            strict=True)
    for x, y, _ in static_batches(data.train, 64):
        step(x, y, 0.05)
    assert step.graph is not None and step.failed is None and math.isfinite(step.loss_sum.item())


def _seeded_model(c: TrialConfig, data):
    from search.trial.models import build_model

    seed_everything(c.seed)
    return build_model(c, num_classes=data.num_classes)


class _RecordedGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: capture records the step function, replay runs it."""

    def __init__(self) -> None:
        self.fn = None
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.fn()


class _Stream:
    def wait_stream(self, other) -> None:
        pass


class _Recorder:
    """Models whose gradients a replay writes afresh: backward was captured with every .grad unset, so a
    real replay assigns gradients where eager autograd would accumulate onto the last step's."""

    def __init__(self) -> None:
        self.models: list[nn.Module] = []

    def watch(self, model: nn.Module) -> nn.Module:
        self.models.append(model)
        return model

    def record(self, graph: _RecordedGraph, fn) -> None:
        unset = [p for m in self.models for p in m.parameters() if p.grad is None]

        def replay() -> None:
            for p in unset:
                p.grad = None
            fn()

        graph.fn = replay  # recorded, not run: as a real capture


@pytest.fixture
def recorded_graphs(monkeypatch):
    """The CUDA calls of search.trial.graphs replaced by CPU stand-ins with a real graph's semantics:
    what is captured does not run at capture time, every replay reads the static buffers again and
    writes the gradients afresh."""
    import contextlib

    from search.trial import graphs

    rec = _Recorder()
    record = rec.record

    monkeypatch.setattr(graphs, "_record", record)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _RecordedGraph)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: _Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return rec


def test_graphed_step_warms_up_captures_once_and_replays_like_eager_steps(digits, recorded_graphs):
    # The same fused optimizer and padded batches, stepped eagerly by hand: bit-identical parameters and sums.
    c = cfg()
    seed_everything(0)
    ref, model = small_cnn(), recorded_graphs.watch(small_cnn())
    model.load_state_dict(ref.state_dict())
    lr_ref, lr_g = torch.tensor(c.lr), torch.tensor(c.lr)
    opt_ref, opt_g = _optimizer(ref, c, lr=lr_ref), _optimizer(model, c, lr=lr_g)
    step = GraphedTrainStep(model, opt_g, lr_g, label_smoothing=0.1, amp=False, strict=True)
    batches = [(x, y) for x, y, _ in static_batches(digits.train, 64)]
    assert len(batches) == len(digits.train) == 23  # 1437 = 22 x 64 + 29, padded to 64
    ref_loss = torch.zeros(())
    torch.manual_seed(5)
    for i, (x, y) in enumerate(batches):
        lr_ref.fill_(0.1 / (i + 1))
        opt_ref.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ref(x), y, label_smoothing=0.1)
        loss.backward()
        opt_ref.step()
        ref_loss += loss.detach() * 64
    torch.manual_seed(5)  # dropout draws the same noise in the same order
    for i, (x, y) in enumerate(batches):
        step(x.clone(), y.clone(), 0.1 / (i + 1))  # fresh tensors: replays must read the static copies
    assert step.graph is not None and step.failed is None
    assert step.graph.replays == len(batches) - 3  # 3 eager warm-up steps, then the capture step is replay 1
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(step.loss_sum, ref_loss)
    with pytest.raises(ValueError, match="captured for 64; pad it"):
        step(batches[0][0][:10], batches[0][1][:10], 0.1)


def test_graphed_eval_pads_masks_and_equals_evaluate(digits, recorded_graphs):
    seed_everything(0)
    model = small_cnn()
    run(cfg(epochs=1), digits, model)
    ev = GraphedEval(model, CPU, amp=False)
    model.train()
    first = ev(digits.test)  # 360 test images at batch 64: 5 full batches and a ragged one of 40
    assert ev.graph is not None and ev.graph.replays == len(digits.test) - 1  # first batch ran eagerly (warm-up)
    again = ev(digits.test)
    assert ev.graph.replays == 2 * len(digits.test) - 1 and model.training  # mode restored
    loss, acc = evaluate(model, digits.test, CPU)
    assert first == again and first[1] == acc and first[0] == pytest.approx(loss, rel=1e-6)


def test_train_graphed_path_end_to_end_on_cpu_stand_ins(digits, recorded_graphs, monkeypatch):
    import search.trial.train as train_mod

    monkeypatch.setattr(train_mod, "use_graphs", lambda cfg, device: cfg.cuda_graphs != "off")  # as on CUDA
    seed_everything(0)
    ref = train(small_cnn(), digits, cfg(epochs=3, amp=False, cuda_graphs="off"), CPU)  # no bf16 on CPU
    seed_everything(0)
    out = train(recorded_graphs.watch(small_cnn()), digits, cfg(epochs=3, amp=False), CPU)
    pad = 64 - digits.n_train % 64
    assert out.status == "ok" and out.images_seen == ref.images_seen + 3 * pad
    assert [r["lr"] for r in out.history] == [r["lr"] for r in ref.history]  # same steps, same schedule
    assert out.history[-1]["test_acc"] > 0.9 and abs(out.history[-1]["test_acc"] - ref.history[-1]["test_acc"]) < 0.05
