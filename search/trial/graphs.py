"""CUDA-graph capture of the training step and of evaluation passes, with the static shapes it needs.

Why: at batch 128 a small CIFAR network's step is bound by the host issuing its
hundreds of kernels (docs/performance.md: one WRN-16-2 trial keeps an H100 busy
32% of the time). A captured `torch.cuda.CUDAGraph` replays the whole step -
forward, backward, SGD update and the loss/accuracy accumulation - with one
launch. An explicit graph was chosen over torch.compile's "reduce-overhead"
mode because it needs no compilation and no recompiles; benchmarks/paper_grid_cost.py
measures both.

What a graph needs, and how this module provides it:
- Static shapes: every replay sees a batch of the captured size. `pad_batch`
  fills a ragged last training batch by wrap-around with the epoch's first
  images (as DistributedSampler pads an epoch), so the step count and the
  learning-rate schedule are those of the eager loop; `static_batches` does it
  for any loader. Evaluation pads with copies and masks them out of the sums,
  which is exact (eval mode: each image's output does not depend on the batch).
- No host work inside the step: the learning rate lives in a device tensor the
  fused SGD kernel reads (`lr.fill_()` before each replay is one tiny kernel,
  not a sync), and loss/accuracy are summed into device tensors. A drop-rate
  schedule's rate likewise lives in one device tensor every dropout site reads
  with no branch on its value (search.trial.train.DropoutSchedule, the choice
  argued in search.trial.dropout.module); schedules of sites that can only take
  a host float run without graphs.
- Warm-up before capture: a few eager steps on a side stream (real training
  steps, counted) initialise momentum buffers, cuDNN autotuning and autograd's
  lazy state, as the PyTorch CUDA-graphs notes prescribe.

On CPU nothing here is used: `use_graphs` is False whatever the config says.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["use_graphs", "pad_batch", "static_batches", "GraphedTrainStep", "GraphedEval", "WARMUP_STEPS"]

WARMUP_STEPS = 3  # eager steps before capture (the PyTorch notes use 3 for whole-network capture)
Batch = tuple[torch.Tensor, torch.Tensor]


def use_graphs(cfg: object, device: torch.device) -> bool:
    """Whether `train` captures graphs: CUDA only; 'auto' is on unless torch.compile handles the model."""
    mode = getattr(cfg, "cuda_graphs", "off")
    if torch.device(device).type != "cuda" or mode == "off":
        return False
    return not (mode == "auto" and getattr(cfg, "compile", False))


def pad_batch(x: torch.Tensor, y: torch.Tensor, fill_x: torch.Tensor, fill_y: torch.Tensor, size: int) -> Batch:
    """(x, y) grown to `size` rows by appending rows of (fill_x, fill_y), cycling through them if too few.

    Raises:
        ValueError: x already has more than `size` rows, or there is nothing to fill with.
    """
    missing = size - x.shape[0]
    if missing < 0:
        raise ValueError(f"batch of {x.shape[0]} rows is larger than the static size {size}")
    if missing == 0:
        return x, y
    if fill_x.shape[0] == 0:
        raise ValueError("cannot pad a batch from an empty filler")
    idx = torch.arange(missing, device=fill_x.device) % fill_x.shape[0]
    pad_x = fill_x.index_select(0, idx).contiguous(memory_format=_format_of(x))
    return torch.cat([x, pad_x]), torch.cat([y, fill_y.index_select(0, idx)])


def static_batches(batches: Iterable[Batch], size: int, ragged: str = "pad") -> Iterator[tuple[torch.Tensor,
                                                                                               torch.Tensor, int]]:
    """Batches of exactly `size` rows, as `(x, y, n_real)`.

    A batch smaller than `size` (the ragged last one) is padded by wrap-around
    with the first batch of the pass (`ragged='pad'`, n_real = its own rows) or
    skipped (`ragged='drop'`). A batch larger than `size` is an error.

    Raises:
        ValueError: unknown `ragged`, or a batch larger than `size`.
    """
    if ragged not in ("pad", "drop"):
        raise ValueError(f"ragged = {ragged!r} is not allowed (allowed: pad, drop)")
    first: Batch | None = None
    for x, y in batches:
        n = x.shape[0]
        if n > size:
            raise ValueError(f"batch of {n} rows is larger than the static size {size}")
        if first is None:
            first = (x, y)
        if n < size:
            if ragged == "drop":
                continue
            x, y = pad_batch(x, y, *first, size)
        yield x, y, n


def _format_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


def _record(graph: "torch.cuda.CUDAGraph", fn: Callable[[], None]) -> None:
    """Capture `fn`'s kernels into `graph`: they are recorded, not run (the one place capture happens,
    so a CPU test can stand in a recorder that replays `fn`)."""
    with torch.cuda.graph(graph):
        fn()


def _autocast(amp: bool) -> contextlib.AbstractContextManager:
    # cache_enabled=False: autocast's weight-cast cache must not outlive a capture (PyTorch CUDA-graphs notes).
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)


class GraphedTrainStep:
    """One SGD training step of `net`, eager for WARMUP_STEPS calls and then replayed from a CUDA graph.

    `opt` must be `torch.optim.SGD(..., fused=True)` whose every param group's
    "lr" is `self.lr` (see `train._optimizer`): the fused kernel reads the rate
    from device memory, so a replay picks up the value set by `lr.fill_()`.
    Loss (times batch size) and correct predictions accumulate in `loss_sum`
    and `correct`; `reset_metrics()` zeroes them in place.

    Args:
        net: the module to call (may be a compiled wrapper of `model`).
        opt: the fused SGD optimizer over the model's parameters.
        lr: the 0-dim float32 device tensor all param groups use as learning rate.
        label_smoothing: of the training loss.
        amp: bf16 autocast.
        strict: raise if capture fails (cuda_graphs='on'); otherwise warn once and stay eager.
    """

    def __init__(self, net: nn.Module, opt: torch.optim.Optimizer, lr: torch.Tensor, *, label_smoothing: float,
                 amp: bool, strict: bool = False, warmup_steps: int = WARMUP_STEPS) -> None:
        self.net, self.opt, self.lr = net, opt, lr
        self.label_smoothing, self.amp, self.strict, self.warmup_steps = label_smoothing, amp, strict, warmup_steps
        dev = lr.device
        self.loss_sum = torch.zeros((), device=dev)
        self.correct = torch.zeros((), device=dev, dtype=torch.long)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: str | None = None  # why capture was given up (eager from then on)
        self.calls = 0
        self.size: int | None = None
        self._stream = torch.cuda.Stream(dev)
        self._x = self._y = None

    def reset_metrics(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()

    def _body(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with _autocast(self.amp):
            logits = self.net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        loss.backward()
        self.opt.step()
        self.loss_sum.add_(loss.detach().float() * y.shape[0])
        self.correct.add_((logits.detach().argmax(1) == y).sum())

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        """Train on one batch of the static size at learning rate `lr`."""
        if self.size is None:
            self.size = x.shape[0]
        elif x.shape[0] != self.size:
            raise ValueError(f"batch of {x.shape[0]} rows but the step was captured for {self.size}; pad it")
        self.calls += 1
        self.lr.fill_(lr)
        if self.graph is not None:
            self._x.copy_(x)
            self._y.copy_(y)
            self.graph.replay()
            return
        if self.failed is not None or self.calls <= self.warmup_steps:
            self._eager(x, y)
            return
        self._capture(x, y)
        if self.graph is not None:
            self.graph.replay()  # capture records, it does not run: this batch's step is the first replay
        else:
            self._eager(x, y)

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.graph is None and self.failed is None:
            # Warm-up runs on a side stream, as capture will (lazy autograd/cuDNN state lands on it).
            cur = torch.cuda.current_stream(self.lr.device)
            self._stream.wait_stream(cur)
            with torch.cuda.stream(self._stream):
                self._body(x, y)
            cur.wait_stream(self._stream)
        else:
            self._body(x, y)

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._x, self._y = torch.empty_like(x), torch.empty_like(y)
        self._x.copy_(x)
        self._y.copy_(y)
        self.opt.zero_grad(set_to_none=True)  # grads are then allocated inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(self.lr.device)
            # The warm-up steps' activations sit in the ordinary cache; hand them back so the graph's private
            # pool reuses that memory instead of doubling the step's footprint (what packing budgets for).
            torch.cuda.empty_cache()
            _record(graph, lambda: self._body(self._x, self._y))
        except Exception as e:  # a model doing host work in its step (a sync, a CPU RNG) cannot be captured
            if self.strict:
                raise RuntimeError(f"field 'cuda_graphs' = 'on' but the training step cannot be captured: "
                                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                                   "(allowed: cuda_graphs=auto or off)") from e
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"CUDA-graph capture of the training step failed, training eagerly: {self.failed}",
                          RuntimeWarning, stacklevel=3)
            self.opt.zero_grad(set_to_none=True)
            return
        self.graph = graph


class GraphedEval:
    """Eval-mode cross-entropy and accuracy over a loader, each batch one replay of a captured forward.

    Batches smaller than the captured size are padded and the padding is masked
    out of both sums, which is exact in eval mode. The first pass runs eagerly
    for one batch (warm-up) and captures on the second; later passes only replay.
    The graph reads the model's parameters and BN buffers in place, so it stays
    valid while training updates them (they are never reassigned).

    Args:
        net: the module to evaluate (put in eval mode for the pass, mode restored).
        device: a CUDA device.
        amp: bf16 autocast.
    """

    def __init__(self, net: nn.Module, device: torch.device, *, amp: bool) -> None:
        self.net, self.device, self.amp = net, torch.device(device), amp
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: str | None = None
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self._x = self._y = self._mask = None

    def _body(self) -> None:
        with _autocast(self.amp):
            out = self.net(self._x).float()
        losses = F.cross_entropy(out, self._y, reduction="none")
        self.loss_sum.add_((losses * self._mask).sum())
        self.correct.add_(((out.argmax(1) == self._y) & (self._mask > 0)).sum())

    def _load(self, x: torch.Tensor, y: torch.Tensor) -> None:
        n, size = x.shape[0], self._x.shape[0]
        if n > size:
            raise ValueError(f"eval batch of {n} rows is larger than the captured size {size}")
        self._x[:n].copy_(x)
        self._y[:n].copy_(y)
        self._mask.zero_()
        self._mask[:n] = 1.0
        if n < size:  # keep real images in the padding (any would do: they are masked out)
            self._x[n:].copy_(self._x[:1].expand(size - n, *self._x.shape[1:]))
            self._y[n:] = self._y[0]

    @torch.no_grad()
    def __call__(self, loader: Iterable[Batch]) -> tuple[float, float]:
        """(mean loss, accuracy) over `loader`; one host-device sync, at the end."""
        was_training = self.net.training
        self.net.eval()
        self.loss_sum.zero_()
        self.correct.zero_()
        n_total = 0
        try:
            for x, y in loader:
                n_total += y.shape[0]
                if self._x is None:
                    self._x, self._y = torch.empty_like(x), torch.empty_like(y)
                    self._mask = torch.zeros(x.shape[0], device=self.device)
                self._load(x, y)
                if self.graph is not None:
                    self.graph.replay()
                elif self.failed is not None:
                    self._body()
                elif n_total == y.shape[0]:  # first batch of the first pass: eager warm-up on a side stream
                    self._warmup()
                else:
                    self._capture()
        finally:
            self.net.train(was_training)
        return self.loss_sum.item() / max(n_total, 1), self.correct.item() / max(n_total, 1)

    def _warmup(self) -> None:
        cur = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            self._body()
        cur.wait_stream(side)

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        saved = self.loss_sum.clone(), self.correct.clone()
        try:
            torch.cuda.synchronize(self.device)
            _record(graph, self._body)
        except Exception as e:  # noqa: BLE001 - fall back to eager, as the training step does
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"CUDA-graph capture of evaluation failed, evaluating eagerly: {self.failed}",
                          RuntimeWarning, stacklevel=3)
            self.loss_sum.copy_(saved[0])
            self.correct.copy_(saved[1])
            self._body()
            return
        self.graph = graph
        graph.replay()  # capture records only: run this batch
