"""The training loop: one flat, commented function plus small helpers (nanoGPT style).

Choices, documented once here:
- SGD with cfg.momentum / cfg.nesterov; weight decay on conv and linear weights
  (tensors with ndim >= 2), and on norm-layer affine parameters and biases (ndim < 2)
  only with cfg.weight_decay_norm_bias (published CIFAR recipes decay every tensor).
  Nesterov is dropped when momentum is 0 (torch refuses that combination).
- Learning rate set every step: linear warm-up over cfg.warmup_epochs, then
  cosine to 0 or multistep: x cfg.lr_factor (default 0.1) once each of cfg.lr_milestones
  epochs has completed (default: at 50% and 75% of the steps).
- Train loss uses cfg.label_smoothing; evaluation loss is plain cross-entropy.
- On CUDA: bf16 autocast (cfg.amp), channels_last (cfg.channels_last),
  torch.compile (cfg.compile), cudnn.benchmark. On CPU all are no-ops.
- On CUDA with cfg.cuda_graphs 'auto' (default, unless cfg.compile) or 'on': the
  training step and the per-epoch test evaluation are replayed from CUDA graphs
  (search.trial.graphs): fused SGD reading the learning rate from a device tensor,
  a ragged last training batch padded by wrap-around to the batch size (same
  step count and schedule as eager; those few images count twice in images_seen
  and the epoch's train loss). On CPU the knob changes nothing.
- Drop-rate schedule (cfg.dropout_schedule, Liu et al. 2023; `dropout_rate_at`): the rate of every
  dropout site is set before every step, in a device tensor the sites read (CUDA-graph safe, no sync;
  search.trial.dropout.module explains the choice) or, for sites that cannot read one, as a host float
  with the step run eagerly. After training each site holds the final rate as a plain float, so the
  probes measure the network as it ends training (early dropout: sites present, injecting nothing).
  History's `dropout_rate_applied` is the rate of each epoch's last step (as `lr`).
- D = d cos^2(theta) (docs/theory.md, "D over training") is read from the weights at
  initialisation and after every epoch (`d_cos2`, `d_cos2_all`: means over the BN layers
  fed by dropout / over every BN layer with a feeding weight layer): no data, a few ms,
  outside any captured region (after the epoch's steps have synchronised).
- A NaN/inf loss ends the trial with status 'diverged' (a result, not an error).
  The check reads the accumulated loss once every CHECK_EVERY steps and at
  epoch end, so the GPU is not synchronised every step.
"""
from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from search.config import ConfigError, TrialConfig
from search.trial.dropout.module import VarianceDropout
from search.trial.graphs import GraphedEval, GraphedTrainStep, static_batches, use_graphs

__all__ = ["TrainOutcome", "train", "evaluate", "seed_everything", "lr_at", "dropout_rate_at", "DropoutSchedule",
           "weight_stats", "CHECK_EVERY", "EPOCH_KEYS", "WEIGHT_KEYS"]

CHECK_EVERY = 32  # steps between divergence checks (each is one host-device sync)
EPOCH_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s", "throughput",
              "d_cos2", "d_cos2_all", "dropout_rate_applied")
WEIGHT_KEYS = ("d_cos2", "d_cos2_all")  # the epoch keys read from the weights (`weight_stats`)


@dataclass
class TrainOutcome:
    """What `train` returns. Loss/accuracy are of the last epoch run (partial, NaN-laden if it diverged)."""

    status: str  # 'ok' | 'diverged'
    epochs_completed: int
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per completed epoch (EPOCH_KEYS)
    train_loss: float = float("nan")
    train_acc: float = float("nan")
    train_time_s: float = 0.0  # training steps only; evaluation excluded
    images_seen: int = 0
    throughput: float = float("nan")  # images_seen / train_time_s
    weights_init: dict[str, float] = field(default_factory=dict)  # WEIGHT_KEYS at initialisation (epoch 0)
    dropout_rate_final: float = float("nan")  # the drop rate of the last step run (0.0 without dropout sites)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str,
          milestones: Sequence[int] | None = None, factor: float = 0.1) -> float:
    """Learning rate of 0-based `step`: linear warm-up to `peak`, then cosine to 0 or multistep.

    multistep: `peak * factor**k`, k = how many of `milestones` (steps) `step` has reached;
    `milestones` None: 50% and 75% of `total_steps`.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "multistep":
        if milestones is None:
            milestones = [int(f * total_steps) for f in (0.5, 0.75)]
        return peak * factor ** sum(step >= m for m in milestones)
    if schedule == "cosine":
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 0 at the first post-warm-up step
        return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    raise ValueError(f"field 'schedule' = {schedule!r} is not allowed (allowed: cosine, multistep)")


def dropout_rate_at(step: int, steps_per_epoch: int, rate: float, schedule: str | None, cutoff: float | None,
                    decay: str | None) -> float:
    """Drop rate of 0-based `step`, as Liu et al. 2023's `drop_scheduler` (facebookresearch/dropout,
    drop_scheduler.py) lays out its per-iteration array.

    schedule None/'constant' (their 'standard'): `rate` at every step. Otherwise c = round(cutoff *
    steps_per_epoch) steps come before the cutoff (theirs: cutoff_epoch * niter_per_ep, an integer epoch):
    'early': steps 0..c-1 at `rate` (decay None/'constant') or at numpy.linspace(rate, 0, c)[step] =
    rate * (1 - step / (c - 1)) (decay 'linear': reaching 0 at step c - 1; `rate` when c == 1), then 0;
    'late': 0 for steps 0..c-1, then `rate` (theirs has no linear late form; TrialConfig refuses one).
    """
    if schedule in (None, "constant"):
        return rate
    c = round(cutoff * steps_per_epoch)
    if schedule == "late":
        return rate if step >= c else 0.0
    if schedule != "early":
        raise ValueError(f"field 'dropout_schedule' = {schedule!r} is not allowed (allowed: constant, early, late)")
    if step >= c:
        return 0.0
    if decay == "linear" and c > 1:
        return rate * (1.0 - step / (c - 1))
    return rate


class DropoutSchedule:
    """Applies cfg's drop-rate schedule to every VarianceDropout site of `model`, one step at a time.

    Built before training (it binds the sites); `step(i)` before each training step sets the rate and
    returns it; `finish()` after training leaves every site at the last rate as a plain float, unbound.
    With no schedule it touches nothing and reports the sites' constant rate.

    `on_device`: the rate is one 0-dim float32 tensor on `device` (`rate_t`) that every site reads
    (`VarianceDropout.bind_rate`); `step` changes it with an in-place `fill_` only when the value
    changes (a host-side comparison: no sync), so a captured graph reads the new value. False when a
    site cannot read a tensor (`reads_rate_tensor`): then `step` calls each site's `set_rate`, and
    `train` runs without CUDA graphs.

    Raises:
        ConfigError: a site that can be scheduled neither way (an nn.Module kind without drop_prob or p).
    """

    def __init__(self, model: nn.Module, cfg: TrialConfig, steps_per_epoch: int, device: torch.device) -> None:
        self.cfg, self.steps_per_epoch = cfg, steps_per_epoch
        self.sites = [m for m in model.modules() if isinstance(m, VarianceDropout)]
        self.active = cfg.dropout_schedule not in (None, "constant") and bool(self.sites)
        self.on_device = self.active and all(s.reads_rate_tensor() for s in self.sites)
        self.rate_t: torch.Tensor | None = None
        self.last = self.rate_at(0) if self.active else (max(s.rate for s in self.sites) if self.sites else 0.0)
        if not self.active:
            return
        if self.on_device:
            self.rate_t = torch.tensor(self.last, dtype=torch.float32, device=device)
            for s in self.sites:
                s.bind_rate(self.rate_t)
            return
        for s in self.sites:
            try:
                s.set_rate(self.last)
            except ValueError as e:
                raise ConfigError(f"field 'dropout_schedule' = {cfg.dropout_schedule!r} cannot be applied: {e}"
                                  " or dropout_schedule None") from None

    def rate_at(self, step: int) -> float:
        c = self.cfg
        return dropout_rate_at(step, self.steps_per_epoch, c.dropout_rate, c.dropout_schedule, c.dropout_cutoff,
                               c.dropout_decay)

    def step(self, step: int) -> float:
        """Set the rate of 0-based training step `step` on every site (before the step runs); return it."""
        if not self.active:
            return self.last
        rate = self.rate_at(step)
        if rate != self.last:
            if self.rate_t is not None:
                self.rate_t.fill_(rate)  # in place: the sites and any captured graph hold this tensor
            else:
                for s in self.sites:
                    s.set_rate(rate)
            self.last = rate
        return rate

    def finish(self) -> float:
        """Leave every site at the last rate applied, as a host float and unbound; return that rate."""
        if self.active:
            for s in self.sites:
                s.bind_rate(None)
                s.set_rate(self.last)
        return self.last


def _optimizer(model: nn.Module, cfg: TrialConfig, lr: torch.Tensor | None = None) -> torch.optim.SGD:
    """SGD over two groups (ndim >= 2, decayed; ndim < 2, decayed with cfg.weight_decay_norm_bias); with `lr`
    (a device tensor): fused, reading it every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay_1d = cfg.weight_decay if cfg.weight_decay_norm_bias else 0.0
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": decay_1d}]
    groups = [g for g in groups if g["params"]]
    if lr is not None:  # for graph capture: one shared tensor, read by the fused kernel (no host value baked in)
        for g in groups:
            g["lr"] = lr
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               fused=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def weight_stats(sites: list[tuple[nn.Module, bool]]) -> dict[str, float]:
    """WEIGHT_KEYS from the weights now: the mean of the BN layers' `d_cos2` over those fed by dropout
    (`d_cos2`) and over all of them (`d_cos2_all`); NaN (math.nan itself) where there is none.

    `sites` is search.trial.probes.feeding_weights(model, ...). One host-device transfer.
    """
    from search.trial.mechanism import layer_d_cos2

    values = layer_d_cos2([m.weight for m, _ in sites])
    fed = [v for v, (_, f) in zip(values, sites) if f and math.isfinite(v)]
    every = [v for v in values if math.isfinite(v)]
    # math.nan itself, not a fresh NaN: histories of two runs then compare equal (identity before ==).
    return {"d_cos2": sum(fed) / len(fed) if fed else math.nan,
            "d_cos2_all": sum(every) / len(every) if every else math.nan}


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    # bf16 needs no GradScaler; on CPU autocast stays off (fp32 is the reference path).
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, amp: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in [0, 1] of `model` in eval mode over `loader`.

    The model's train/eval mode is restored afterwards. One host-device sync, at the end.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    with _autocast(torch.device(device), amp):
        for x, y in loader:
            out = model(x).float()
            loss_sum += F.cross_entropy(out, y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
            n += y.shape[0]
    model.train(was_training)
    return loss_sum.item() / max(n, 1), correct.item() / max(n, 1)


def train(model: nn.Module, data, cfg: TrialConfig, device: torch.device,
          on_epoch: Callable[[dict[str, float]], None] | None = None) -> TrainOutcome:
    """Train `model` in place on `data` (a search.data.DataBundle) for cfg.epochs.

    After each epoch the test set is evaluated and `on_epoch` gets a dict with
    EPOCH_KEYS as plain floats (epoch is 1-based; lr and dropout_rate_applied are the last step's; epoch_time_s
    and throughput cover the training steps only; d_cos2 and d_cos2_all are read from the
    weights after the epoch, `weight_stats`). Their values at initialisation are in
    the outcome's `weights_init`.

    Returns:
        TrainOutcome; status 'diverged' (no exception) when the loss turned NaN/inf.
    """
    from search.trial.probes import feeding_weights

    device = torch.device(device)
    cuda = device.type == "cuda"
    model.to(device)
    # The weight layers feeding BN layers, found once (one eval forward of zeros, no random numbers drawn),
    # before channels_last, compile or graph capture; D at initialisation is read from them now.
    sites = feeding_weights(model, torch.zeros(2, data.in_chans, data.image_size, data.image_size, device=device))
    # Dropout noise is drawn from the global RNG; reseed it from (seed, 'train') so it does not
    # depend on how many numbers building the model consumed. Data order has its own generator.
    seed_everything(cfg.seed * 7919 + 1)
    if cuda:
        torch.backends.cudnn.benchmark = True  # batch shapes are fixed, so autotuning pays off after step 1
    if cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if cuda and cfg.compile else model  # shares parameters with `model`
    steps_per_epoch = len(data.train)
    if steps_per_epoch < 1:
        raise ValueError(f"data.train yields no batches (field 'batch_size' = {cfg.batch_size!r}); need >= 1 batch")
    drops = DropoutSchedule(model, cfg, steps_per_epoch, device)
    graphed = use_graphs(cfg, device)
    if graphed and drops.active and not drops.on_device:
        # A site that reads its rate as a host float would have the capture-time value baked into the graph.
        why = (f"dropout kind {cfg.dropout_type!r} reads a scheduled rate as a host float, not a device tensor"
               " (no apply_rate)")
        if cfg.cuda_graphs == "on":
            raise ConfigError(f"field 'cuda_graphs' = 'on' conflicts with dropout_schedule"
                              f" {cfg.dropout_schedule!r}: {why} (allowed: cuda_graphs=auto or off)")
        warnings.warn(f"training without CUDA graphs: {why}", RuntimeWarning, stacklevel=2)
        graphed = False
    lr_t = torch.tensor(cfg.lr, device=device, dtype=torch.float32) if graphed else None
    opt = _optimizer(model, cfg, lr=lr_t)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    epochs_done = cfg.milestone_epochs()  # in steps below: the lr changes as epoch m + 1 begins
    milestones = None if epochs_done is None else [m * steps_per_epoch for m in epochs_done]
    factor = 0.1 if cfg.lr_factor is None else cfg.lr_factor
    autocast = _autocast(device, cfg.amp)
    if graphed:
        # Static batch size: the loader's full batch (a training set smaller than one batch is its own size).
        size = min(cfg.batch_size, data.n_train)
        graph_step = GraphedTrainStep(net, opt, lr_t, label_smoothing=cfg.label_smoothing, amp=cfg.amp,
                                      strict=cfg.cuda_graphs == "on")
        graph_eval = GraphedEval(net, device, amp=cfg.amp)
    out = TrainOutcome(status="ok", epochs_completed=0, weights_init=weight_stats(sites))
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        if hasattr(data.train, "set_epoch"):
            data.train.set_epoch(epoch - 1)  # order and augmentation fixed by (seed, epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)  # accumulated on the device: no sync per step
        correct = torch.zeros((), device=device, dtype=torch.long)
        if graphed:
            graph_step.reset_metrics()
            loss_sum, correct = graph_step.loss_sum, graph_step.correct  # the graph adds into these
        n = 0
        _sync(device)
        t0 = time.perf_counter()
        batches = (b[:2] for b in static_batches(data.train, size)) if graphed else data.train
        for x, y in batches:
            lr = lr_at(step, total_steps, warmup_steps, cfg.lr, cfg.schedule, milestones, factor)
            drop_rate = drops.step(step)  # before the step: an in-place tensor update or host floats
            if graphed:
                graph_step(x, y, lr)  # writes lr into lr_t, then one replay (eager for the first few steps)
            else:
                for g in opt.param_groups:
                    g["lr"] = lr
                with autocast:
                    logits = net(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach().float() * y.shape[0]
                correct += (logits.detach().argmax(1) == y).sum()
            n += y.shape[0]
            step += 1
            if step % CHECK_EVERY == 0 and not math.isfinite(loss_sum.item()):
                break  # diverged: further steps would only push NaNs around
        _sync(device)
        dt = time.perf_counter() - t0
        # Bookkeeping for this epoch (partial if it diverged).
        out.train_time_s += dt
        out.images_seen += n
        out.train_loss, out.train_acc = loss_sum.item() / max(n, 1), correct.item() / max(n, 1)
        if not math.isfinite(out.train_loss):
            out.status = "diverged"
            break
        if graphed:
            test_loss, test_acc = graph_eval(data.test)
        else:
            test_loss, test_acc = evaluate(net, data.test, device, amp=cfg.amp)
        row = dict(epoch=epoch, train_loss=out.train_loss, train_acc=out.train_acc, test_loss=test_loss,
                   test_acc=test_acc, lr=lr, dropout_rate_applied=drop_rate, epoch_time_s=dt,
                   throughput=n / dt if dt > 0 else float("nan"),
                   **weight_stats(sites))  # after the epoch's steps and evaluation: outside any capture
        row = {k: float(v) for k, v in row.items()}
        out.history.append(row)
        out.epochs_completed = epoch
        if on_epoch is not None:
            on_epoch(row)
        if not math.isfinite(test_loss):  # eval-mode outputs overflowed: BN statistics vs exploded weights
            out.status = "diverged"
            break
    out.throughput = out.images_seen / out.train_time_s if out.train_time_s > 0 else float("nan")
    out.dropout_rate_final = drops.finish()  # the probes then see the network as it ended training
    return out
