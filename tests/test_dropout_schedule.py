"""The drop-rate schedule axis (issue 29): Liu et al. 2023's early and late dropout.

The rate of every step against the closed form of their `drop_scheduler` (facebookresearch/dropout), the
device-tensor path CUDA graphs need (checked on CPU: in-place updates, one shared tensor, no host read of
its value), the trials' history and probes, the hash pins and the one-line errors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from search import plugins, registry
from search.config import ConfigError, TrialConfig
from search.trial.dropout.module import ModuleDropout, VarianceDropout, make_dropout
from search.trial.train import DropoutSchedule, dropout_rate_at

BUILT_IN = ("bernoulli", "gaussian", "uout", "channel", "droppath", "dropblock")
SMALL = TrialConfig(backbone="cifar_wrn", depth=10, width=1, dataset="digits", image_size=8, in_chans=1, epochs=2,
                    batch_size=64, lr=0.05, device="cpu", dropout_placement="pre_bn", dropout_rate=0.3)


def liu_drop_scheduler(rate: float, epochs: int, niter_per_ep: int, early_iters: int, mode: str,
                       schedule: str) -> np.ndarray:
    """Liu et al.'s drop_scheduler.py, with the cutoff given in steps (theirs: cutoff_epoch * niter_per_ep)."""
    total = epochs * niter_per_ep
    if mode == "standard":
        return np.full(total, rate)
    if mode == "early":
        head = np.full(early_iters, rate) if schedule == "constant" else np.linspace(rate, 0, early_iters)
        return np.concatenate((head, np.full(total - early_iters, 0.0)))
    assert schedule == "constant"  # theirs asserts it for late
    return np.concatenate((np.full(early_iters, 0.0), np.full(total - early_iters, rate)))


# ------------------------------------------------------------------ the rate at every step
@pytest.mark.parametrize("mode, decay", [("early", "constant"), ("early", "linear"), ("late", "constant"),
                                         ("standard", "constant")])
def test_rate_at_every_step_is_liu_et_al_closed_form(mode: str, decay: str) -> None:
    steps, epochs, cutoff = 7, 3, 1.4  # the cutoff falls mid-epoch 2: round(1.4 * 7) = 10 steps before it
    schedule = None if mode == "standard" else mode
    got = [dropout_rate_at(i, steps, 0.3, schedule, None if schedule is None else cutoff, decay)
           for i in range(epochs * steps)]
    want = liu_drop_scheduler(0.3, epochs, steps, 10, mode, decay)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    if mode == "early" and decay == "linear":  # the closed form: rate * (1 - i / (c - 1)), 0 at step c - 1
        assert got[0] == 0.3 and got[9] == 0.0 and got[4] == pytest.approx(0.3 * (1 - 4 / 9), abs=1e-15)
    if mode != "standard":
        assert (got[9], got[10]) == ((0.3, 0.0) if (mode, decay) == ("early", "constant") else
                                     (0.0, 0.3) if mode == "late" else (0.0, 0.0))


def test_a_one_step_early_phase_is_the_rate_then_zero() -> None:
    assert [dropout_rate_at(i, 4, 0.5, "early", 0.25, "linear") for i in range(3)] == [0.5, 0.0, 0.0]


def _model(kind: str = "bernoulli", rate: float = 0.3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), make_dropout(kind, rate), nn.BatchNorm2d(4),
                         make_dropout(kind, rate), nn.Flatten(), nn.Linear(4 * 25, 3))


@pytest.mark.parametrize("kind", BUILT_IN)
def test_every_site_reads_one_device_tensor_updated_in_place(kind: str) -> None:
    cfg = SMALL.replace(dropout_type=kind, dropout_schedule="early", dropout_cutoff=1.5, dropout_decay="linear",
                        dropout_placement="pre_conv" if kind == "dropblock" else "pre_bn")
    model = _model(kind)
    sched = DropoutSchedule(model, cfg, steps_per_epoch=4, device=torch.device("cpu"))
    sites = [m for m in model.modules() if isinstance(m, VarianceDropout)]
    assert sched.on_device and len(sites) == 2 and all(s.rate_t is sched.rate_t for s in sites)
    ptr = sched.rate_t.data_ptr()
    for i in range(8):
        r = sched.step(i)
        assert r == dropout_rate_at(i, 4, 0.3, "early", 1.5, "linear")
        assert sched.rate_t.data_ptr() == ptr and float(sched.rate_t) == pytest.approx(r, abs=1e-7)
        assert all(s.rate_t is sched.rate_t for s in sites)  # the object a captured graph holds
    assert sched.finish() == 0.0
    assert all(s.rate_t is None and s.rate == 0.0 and s.peak_rate == 0.3 for s in sites)


class _NoHostRead(torch.Tensor):
    """A rate tensor that fails any read of its value into Python (what would sync, or be baked into a graph)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("item", "__bool__", "__float__", "__int__", "tolist", "__index__", "__format__"):
            raise AssertionError(f"host read of the rate: {name}")
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("kind", BUILT_IN)
def test_train_step_reads_the_rate_on_the_device_only(kind: str) -> None:
    model = _model(kind, 0.4)
    rate_t = torch.tensor(0.4).as_subclass(_NoHostRead)
    for m in model.modules():
        if isinstance(m, VarianceDropout):
            m.bind_rate(rate_t)
    x = torch.randn(6, 2, 5, 5)
    for value in (0.4, 0.1):
        rate_t.fill_(value)
        model.train()(x).sum().backward()  # forward and backward: no Python branch on the rate's value


@pytest.mark.parametrize("kind", BUILT_IN)
def test_rate_tensor_at_zero_is_the_identity_and_eval_is_always(kind: str) -> None:
    site = make_dropout(kind, 0.5)
    rate_t = torch.tensor(0.0)
    site.bind_rate(rate_t)
    x = torch.randn(8, 3, 6, 6)
    assert torch.equal(site.train()(x), x)  # bitwise: the multiplier is exactly 1 at rate 0
    rate_t.fill_(0.5)
    assert not torch.equal(site.train()(x), x)
    assert site.eval()(x) is x  # eval mode: the identity, whatever the rate in force


@pytest.mark.parametrize("kind", ["bernoulli", "channel", "droppath"])
def test_rate_tensor_drops_that_fraction(kind: str) -> None:
    site = make_dropout(kind, 0.5)
    site.bind_rate(torch.tensor(0.25))
    torch.manual_seed(0)
    y = site.train()(torch.ones(512, 16, 4, 4))
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.25, abs=0.03) and y.max().item() == pytest.approx(1 / 0.75)


def test_dropblock_rate_tensor_drops_about_that_fraction_with_timm_scale() -> None:
    site = make_dropout("dropblock", 0.5, block_size=3)
    site.bind_rate(torch.tensor(0.2))
    torch.manual_seed(0)
    y = site.train()(torch.ones(256, 2, 16, 16))
    assert (y == 0).float().mean().item() == pytest.approx(0.2, abs=0.04)
    assert y.mean().item() == pytest.approx(1.0, abs=1e-5)  # scaled by positions / kept positions, as timm's


# ------------------------------------------------------------------ plain nn.Module kinds: a host float
PLUGIN = '''
from timm.layers import DropBlock2d
from search import register_dropout

register_dropout("timm_dropblock_s", structure="sample", needs_map=True)(DropBlock2d)
'''


@pytest.fixture
def timm_plugin(tmp_path: Path):
    before = set(plugins._LOADED)
    path = tmp_path / "timm_dropblock_s_plugin.py"
    path.write_text(PLUGIN)
    yield plugins.load_plugin(str(path), check=False)
    for name in set(plugins._LOADED) - before:
        plugins.unload(name)


def test_a_module_kind_gets_its_drop_prob_set_each_step(timm_plugin) -> None:
    cfg = SMALL.replace(dropout_type="timm_dropblock_s", dropout_placement="pre_conv", dropout_schedule="late",
                        dropout_cutoff=1.0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), make_dropout("timm_dropblock_s", 0.3), nn.Conv2d(2, 2, 3))
    site = model[1]
    sched = DropoutSchedule(model, cfg, steps_per_epoch=3, device=torch.device("cpu"))
    assert isinstance(site, ModuleDropout) and not sched.on_device and sched.rate_t is None
    assert site.rate == 0.0 and site.inner.drop_prob == 0.0
    sched.step(3)
    assert site.rate == 0.3 and site.inner.drop_prob == 0.3 and site.peak_rate == 0.3


def test_a_module_kind_without_a_rate_attribute_is_refused_in_one_line() -> None:
    class Halve(nn.Module):
        def __init__(self, rate: float) -> None:
            super().__init__()
            self.strength = rate

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 0.5

    registry.register_dropout("halve_s")(Halve)
    try:
        cfg = SMALL.replace(dropout_type="halve_s", dropout_schedule="early", dropout_cutoff=1.0)
        model = nn.Sequential(make_dropout("halve_s", 0.3))
        with pytest.raises(ConfigError) as err:
            DropoutSchedule(model, cfg, steps_per_epoch=2, device=torch.device("cpu"))
        msg = str(err.value)
        assert "\n" not in msg and "'dropout_schedule' = 'early'" in msg and "Halve" in msg and "drop_prob" in msg
    finally:
        registry.unregister("dropout", "halve_s")


# ------------------------------------------------------------------ whole trials
@pytest.mark.parametrize("schedule, decay, want", [
    (None, None, [0.3, 0.3]),
    ("early", None, [0.3, 0.0]),            # cutoff 1.0 = 8 steps of 64 of the 512 images: epoch 1 at the rate
    ("early", "linear", [0.0, 0.0]),        # linspace(0.3, 0, 8): 0 at epoch 1's last step
    ("late", None, [0.0, 0.3]),
])
def test_two_epoch_trial_records_the_applied_rate(schedule: str | None, decay: str | None, want: list) -> None:
    from search.trial.runner import format_result, run_trial

    cutoff = None if schedule is None else 1.0
    cfg = SMALL.replace(dropout_schedule=schedule, dropout_cutoff=cutoff, dropout_decay=decay, train_samples=512)
    r = run_trial(cfg)
    assert r.status == "ok" and [h["dropout_rate_applied"] for h in r.history] == want
    assert r.dropout_rate_final == want[-1]
    # The sites are where they were: their BN layers stay fed by dropout whatever rate the schedule ended at.
    assert any(x.fed_by_dropout for x in r.layers)
    text = format_result(cfg, r)  # the printed summary says which schedule the probes measured the end of
    assert ("dropout schedule" in text) == (schedule is not None)
    if schedule is not None:
        assert f"  dropout schedule  {schedule} (cutoff epoch 1" in text and f"last step {want[-1]:g}" in text


def test_the_epoch_history_shows_the_switch() -> None:
    from search.trial.train import train
    from search.trial.data import load_data
    from search.trial.models import build_model

    cfg = SMALL.replace(dropout_schedule="early", dropout_cutoff=1.5, train_samples=256, epochs=3)
    data = load_data(cfg, torch.device("cpu"))
    out = train(build_model(cfg, num_classes=data.num_classes), data, cfg, torch.device("cpu"))
    steps = len(data.train)
    # After epoch 1 the rate is still on; epoch 2's last step is past round(1.5 * steps); so is epoch 3's.
    assert [h["dropout_rate_applied"] for h in out.history] == [0.3, 0.0, 0.0] and steps >= 2


# ------------------------------------------------------------------ config: hashes and one-line errors
def test_new_fields_leave_every_hash_alone() -> None:
    base = TrialConfig()
    assert base.dropout_schedule is None and base.dropout_cutoff is None and base.dropout_decay is None
    written = TrialConfig(dropout_schedule="constant")
    assert written.dropout_schedule is None and written.config_hash == base.config_hash
    early = SMALL.replace(dropout_schedule="early", dropout_cutoff=1, dropout_decay="constant")
    assert early.dropout_decay is None and early.dropout_cutoff == 1.0
    assert early.config_hash == SMALL.replace(dropout_schedule="early", dropout_cutoff=1.0).config_hash
    assert early.config_hash != SMALL.config_hash
    assert SMALL.replace(dropout_schedule="early", dropout_cutoff=1.0, dropout_decay="linear").config_hash \
        != early.config_hash


@pytest.mark.parametrize("changes, want", [
    (dict(dropout_schedule="warm"), "field 'dropout_schedule' = 'warm' is not allowed (allowed: constant, early,"
                                    " late)"),
    (dict(dropout_decay="cosine"), "field 'dropout_decay' = 'cosine' is not allowed (allowed: constant, linear)"),
    (dict(dropout_schedule="early"), "field 'dropout_cutoff' = None is not allowed for dropout_schedule 'early'"
                                     " (allowed: an epoch > 0 and <= epochs = 2)"),
    (dict(dropout_schedule="early", dropout_cutoff=2.5), "field 'dropout_cutoff' = 2.5 is not allowed"),
    (dict(dropout_schedule="early", dropout_cutoff=0.0), "field 'dropout_cutoff' = 0.0 is not allowed"),
    (dict(dropout_schedule="late", dropout_cutoff=2.0), "(allowed: an epoch > 0 and < epochs = 2)"),
    (dict(dropout_cutoff=1.0), "field 'dropout_cutoff' = 1.0 applies to dropout_schedule early or late only"
                               " (dropout_schedule is None; allowed: None)"),
    (dict(dropout_decay="linear"), "field 'dropout_decay' = 'linear' applies to dropout_schedule 'early' only"),
    (dict(dropout_schedule="late", dropout_cutoff=1.0, dropout_decay="linear"),
     "field 'dropout_decay' = 'linear' is not allowed with dropout_schedule 'late'"),
    (dict(dropout_schedule="early", dropout_cutoff=1.0, dropout_placement="none"),
     "field 'dropout_schedule' = 'early' needs dropout to schedule (dropout_placement is 'none'; allowed: None,"
     " constant)"),
    (dict(dropout_schedule="late", dropout_cutoff=1.0, dropout_rate=0.0),
     "field 'dropout_schedule' = 'late' needs dropout to schedule (dropout_rate is 0"),
    (dict(dropout_schedule="early", dropout_cutoff=float("nan")), "field 'dropout_cutoff' = nan is not a finite"),
])
def test_bad_schedules_are_one_line_errors(changes: dict, want: str) -> None:
    with pytest.raises(ConfigError) as err:
        SMALL.replace(**changes)
    assert want in str(err.value) and "\n" not in str(err.value)


def test_the_command_line_takes_the_schedule_flags() -> None:
    from search.config import parse_override
    from search.trial.cli import _config_from_args, _parser

    ns = _parser().parse_args(["--dropout-placement", "pre_bn", "--dropout-rate", "0.2", "--dropout-schedule",
                               "early", "--dropout-cutoff", "1.5", "--dropout-decay", "linear", "--epochs", "2"])
    cfg = _config_from_args(ns)
    assert (cfg.dropout_schedule, cfg.dropout_cutoff, cfg.dropout_decay) == ("early", 1.5, "linear")
    assert parse_override("dropout_cutoff=2") == ("dropout_cutoff", 2.0)


# ------------------------------------------------------------------ the graphed training path (CPU stand-ins)
from test_train import recorded_graphs  # noqa: E402,F401 - the CUDA-graph stand-ins of test_train.py


def _net_with_sites(kind: str = "bernoulli", on_vectors: bool = True) -> nn.Module:
    head = make_dropout(kind, 0.3) if on_vectors else nn.Identity()
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), make_dropout(kind, 0.3), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), head, nn.Linear(8 * 16, 10))


def test_graphed_training_reads_the_scheduled_rate_at_every_replay(recorded_graphs, monkeypatch) -> None:
    import search.trial.train as train_mod
    from search.trial.data import load_data

    monkeypatch.setattr(train_mod, "use_graphs", lambda cfg, device: cfg.cuda_graphs != "off")  # as on CUDA
    cfg = SMALL.replace(dropout_schedule="early", dropout_cutoff=1.5, dropout_decay="linear", train_samples=320,
                        amp=False, cuda_graphs="on")
    data = load_data(cfg, torch.device("cpu"))
    model = recorded_graphs.watch(_net_with_sites())
    seen: list[float] = []
    model[1].register_forward_hook(lambda m, a, o: seen.append(float(m.rate_t)) if m.training else None)
    built, step_class = [], train_mod.GraphedTrainStep
    monkeypatch.setattr(train_mod, "GraphedTrainStep", lambda *a, **k: built.append(step_class(*a, **k)) or built[-1])
    out = train_mod.train(model, data, cfg, torch.device("cpu"))
    steps = len(data.train)
    assert out.status == "ok" and built and built[0].graph is not None  # captured once, then replayed
    assert built[0].graph.replays == cfg.epochs * steps - 3
    assert seen == pytest.approx([dropout_rate_at(i, steps, 0.3, "early", 1.5, "linear")
                                  for i in range(cfg.epochs * steps)], abs=1e-7)
    assert out.dropout_rate_final == 0.0 and model[1].rate_t is None and model[1].rate == 0.0


def test_host_float_sites_train_without_graphs(recorded_graphs, monkeypatch, timm_plugin) -> None:
    import search.trial.train as train_mod
    from search.trial.data import load_data

    monkeypatch.setattr(train_mod, "use_graphs", lambda cfg, device: cfg.cuda_graphs != "off")
    cfg = SMALL.replace(dropout_type="timm_dropblock_s", dropout_placement="pre_conv", dropout_schedule="early",
                        dropout_cutoff=1.0, train_samples=128, amp=False, epochs=2)
    data = load_data(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"^field 'cuda_graphs' = 'on' conflicts with dropout_schedule 'early': "
                                          r"dropout kind 'timm_dropblock_s' reads a scheduled rate as a host float"):
        train_mod.train(_net_with_sites("timm_dropblock_s", False), data, cfg.replace(cuda_graphs="on"),
                        torch.device("cpu"))
    monkeypatch.setattr(train_mod, "GraphedTrainStep", None)  # calling it would fail: the step must stay eager
    with pytest.warns(RuntimeWarning, match="training without CUDA graphs"):
        out = train_mod.train(_net_with_sites("timm_dropblock_s", False), data, cfg, torch.device("cpu"))
    assert [h["dropout_rate_applied"] for h in out.history] == [0.3, 0.0]


# ------------------------------------------------------------------ analysis: cells split by schedule
def _with_early_copies(trials, layers):
    """The planted study plus, for every pre_bn trial, an early-dropout copy (its layers unshifted, as early
    dropout ends at rate 0) with 0.01 more test accuracy."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def early(t, acc_shift: float, shift_one: bool):
        t = t.filter(pc.equal(t.column("dropout_placement"), "pre_bn"))
        n = t.num_rows
        sets = {"run_id": pa.array([f"early-{r}" for r in t.column("run_id").to_pylist()]),
                "dropout_schedule": pa.array(["early"] * n), "dropout_cutoff": pa.array([1.0] * n)}
        if acc_shift:
            sets["test_acc"] = pc.add(t.column("test_acc"), acc_shift)
        if shift_one:
            sets["shift"] = pa.array([1.0] * n)
        for name, col in sets.items():
            i = t.schema.get_field_index(name)
            t = t.set_column(i, t.schema.field(i), col.cast(t.schema.field(i).type))
        return t

    return (pa.concat_tables([trials, early(trials, 0.01, False)]),
            pa.concat_tables([layers, early(layers, 0.0, True)]))


def test_accuracy_cells_split_by_schedule_and_share_the_no_dropout_baseline() -> None:
    from test_analysis_fit import _study, planted_study

    from analysis.fit import accuracy_cost

    plain = accuracy_cost(_study(*planted_study()))[0]
    cells = accuracy_cost(_study(*_with_early_copies(*planted_study())))[0]
    sched = lambda c: dict(c.context).get("dropout_schedule")  # noqa: E731
    early = [c for c in cells if sched(c) == "early"]
    rest = [c for c in cells if sched(c) is None]
    assert len(early) == 4 and len(rest) == len(plain)  # pre_bn x 4 widths, beside the constant cells
    for e in early:  # the same none baseline, 0.01 better than its constant twin
        twin = next(c for c in rest if (c.dropout_placement, c.width) == ("pre_bn", e.width))
        assert e.cost == pytest.approx(twin.cost + 0.01, abs=1e-9) and e.n == twin.n


def test_closed_form_fits_keep_constant_rate_layers_only() -> None:
    from test_analysis_fit import _study, planted_study

    from analysis.fit import shift_vs_dim
    from analysis.mechanism import fed_layers

    plain, mixed = _study(*planted_study()), _study(*_with_early_copies(*planted_study()))
    a, b = shift_vs_dim(plain, n_boot=50), shift_vs_dim(mixed, n_boot=50)
    assert [(f.dropout_placement, f.n, f.slope) for f in a] == [(f.dropout_placement, f.n, f.slope) for f in b]
    assert fed_layers(mixed).num_rows == fed_layers(plain).num_rows


@pytest.mark.parametrize("kind", ["bernoulli", "gaussian", "uout", "channel", "droppath"])
def test_rate_tensor_noise_has_the_kinds_mean_and_variance(kind: str) -> None:
    """The scheduled path draws other numbers than the constant one, from the same distribution: mean 1 and one
    element's variance noise_var(rate), the closed form the theory uses."""
    site = make_dropout(kind, 0.5)
    site.bind_rate(torch.tensor(0.3))
    torch.manual_seed(1)
    m = site.train()(torch.ones(4096, 16, 2, 2, dtype=torch.float64)).flatten()  # 4096 samples: droppath's units
    want = type(site.impl).noise_var(0.3)
    assert m.mean().item() == pytest.approx(1.0, abs=0.02) and m.var().item() == pytest.approx(want, rel=0.05)


def test_bf16_inputs_keep_the_drop_fraction() -> None:
    site = make_dropout("bernoulli", 0.5)
    site.bind_rate(torch.tensor(0.3))
    torch.manual_seed(2)
    y = site.train()(torch.ones(1 << 20, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and (y == 0).float().mean().item() == pytest.approx(0.3, abs=0.002)


# ------------------------------------------------------------------ on a GPU (skipped where there is none)
CUDA = torch.cuda.is_available()
NO_CUDA = "a real CUDA graph needs a CUDA device; this machine has none (the CPU stand-ins above cover the logic)"


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("kind", BUILT_IN)
def test_a_captured_graph_replays_at_the_rate_the_tensor_holds_on_cuda(kind: str) -> None:
    dev = torch.device("cuda")
    site = make_dropout(kind, 0.5, block_size=3 if kind == "dropblock" else None).to(dev).train()
    rate_t = torch.zeros((), device=dev)
    site.bind_rate(rate_t)
    x = torch.ones(4096, 2, 16, 16, device=dev)  # 4096 samples: droppath's mean within 0.05 is 5 sd
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as graphs.py does
        for _ in range(3):
            site(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = site(x)
    torch.cuda.set_sync_debug_mode("error")  # a host read of the rate would raise here
    try:
        rate_t.fill_(0.0)
        graph.replay()
        at_zero = y.clone()
        rate_t.fill_(0.3)
        graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(at_zero, x)  # the graph read 0: the identity
    assert not torch.equal(y, x) and y.mean().item() == pytest.approx(1.0, abs=0.05)
    if kind in ("bernoulli", "channel", "droppath", "dropblock"):
        assert (y == 0).float().mean().item() == pytest.approx(0.3, abs=0.05)


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_graphed_training_follows_an_early_linear_schedule_on_cuda() -> None:
    from search.trial.data import load_data
    from search.trial.models import build_model
    from search.trial.train import seed_everything, train

    dev = torch.device("cuda")
    cfg = SMALL.replace(device="cuda", cuda_graphs="on", dropout_schedule="early", dropout_cutoff=1.5,
                        dropout_decay="linear", epochs=3, train_samples=512)
    data = load_data(cfg, dev)
    seed_everything(0)
    out = train(build_model(cfg, num_classes=data.num_classes), data, cfg, dev)
    steps = len(data.train)
    assert out.status == "ok" and [h["dropout_rate_applied"] for h in out.history] == [
        dropout_rate_at(e * steps - 1, steps, 0.3, "early", 1.5, "linear") for e in (1, 2, 3)]
    assert out.dropout_rate_final == 0.0
