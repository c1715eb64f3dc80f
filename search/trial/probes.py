"""Per-BatchNorm variance shift (PAPER.md, "The empirical metric") and BN statistics re-estimation.

A GroupNorm layer (TrialConfig.normalization = groupnorm) normalises with each sample's own statistics in
train and eval alike: it has no running statistics, so no variance shift in the paper's sense. It still gets
a record (norm_type 'groupnorm'): its input's eval-mode moments, the feeding weight layer and the mechanism's
train-vs-eval input-variance ratio (`shift_frozen`), with the running-statistics columns (moving_var, shift,
shift_channelwise) NaN. A model without normalization layers (normalization = none) gets no records, and
`reestimate_bn` reports 0 layers re-estimated (docs/normalization.md).

`measure_variance_shift` passes data through the frozen network in eval mode
(dropout off, BN on its running statistics) and compares, at every BatchNorm
layer, the variance of the layer's actual input with the running variance it
accumulated in training. Statistics stream: each batch contributes a
per-channel (count, mean, M2) that is folded into float64 totals with Chan's
parallel update, so the result is exact over the whole loader and no
activation outlives its batch.

`reestimate_bn` recomputes the running statistics on given data with the
weights frozen and dropout off (the paper's remedy, its finding 2).

Both work on any nn.Module (our CIFAR networks and stock timm models alike):
layers are found by type and execution order is read from forward hooks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from search.results import LayerProbe, LayerShift, compute_layer_metrics, layer_metrics
from search.trial.dropout.module import VarianceDropout
from search.trial.models.normalization import NORM_LAYERS, norm_kind

__all__ = ["measure_variance_shift", "reestimate_bn", "is_active_dropout", "feeding_weights"]


def is_active_dropout(module: nn.Module) -> bool:
    """True for a dropout module that injects noise in training (ours built with rate > 0, torch's with p > 0).

    Ours count by `peak_rate`, the rate they were built with: a drop-rate schedule that ended at 0 (early
    dropout) leaves its sites present, and the BN layers they feed stay `fed_by_dropout`, so a report compares
    the same layers across schedules. What those layers measure is the network as it ends training: the sites
    then hold the final rate (`rate`), which the mechanism's noise model uses (0: no injected noise).
    """
    if isinstance(module, VarianceDropout):
        return getattr(module, "peak_rate", module.rate) > 0.0
    return isinstance(module, _DropoutNd) and module.p > 0.0


def _is_weight_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or isinstance(module, _ConvNd)


@dataclass
class _Site:
    """What the first forward saw right before one BN call."""

    weight: nn.Module | None  # last Conv/Linear executed before it
    fed_by_dropout: bool
    dropout: nn.Module | None = None  # the last dropout module run since the previous BN


class _Trace:
    """Execution order of the normalization layers (BN, GroupNorm) plus the weight layer and dropout feeding each
    (first forward only)."""

    def __init__(self, model: nn.Module) -> None:
        self.order: list[nn.Module] = []
        self.sites: dict[nn.Module, _Site] = {}
        self._last_weight: nn.Module | None = None
        self._dropout: nn.Module | None = None
        self._handles = []
        for m in model.modules():
            if isinstance(m, NORM_LAYERS):
                self._handles.append(m.register_forward_pre_hook(self._on_bn))
            elif _is_weight_layer(m):
                self._handles.append(m.register_forward_hook(self._on_weight))
            elif is_active_dropout(m):
                self._handles.append(m.register_forward_hook(self._on_dropout))

    def _on_bn(self, module: nn.Module, _args: Any) -> None:
        if module not in self.sites:  # a BN called twice keeps its first position
            self.order.append(module)
            self.sites[module] = _Site(self._last_weight, self._dropout is not None, self._dropout)
        self._dropout = None

    def _on_weight(self, module: nn.Module, _args: Any, _out: Any) -> None:
        self._last_weight = module

    def _on_dropout(self, module: nn.Module, _args: Any, _out: Any) -> None:
        self._dropout = module

    def stop(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class _Moments:
    """Streaming per-channel count, mean and M2 of a BN input, folded in float64 (Chan et al.).

    Every batch is measured as its deviation from one per-channel shift, the first batch's mean: a float32
    batch mean carries an absolute error of ~1e-7 |mean|, which the between-batch term turns into a relative
    error of the variance of ~1e-7 |mean| |mean_b - mean| / var (2e-5 where |mean| is 150 std, tests/test_probes.py);
    deviations from the shift are small numbers whose means float32 holds to ~1e-7 of the std.
    """

    def __init__(self) -> None:
        self.n = 0  # values per channel so far (a Python int: exact, no device sync)
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None  # (1, C, 1, ...) in the input's dtype; float64 copy in shift64

    def __call__(self, _module: nn.Module, args: tuple) -> None:
        x = args[0]
        n_b = x.numel() // x.shape[1]
        if n_b == 0:
            return
        if self.shift is None:
            first, _ = _batch_moments(x)
            self.shift = first.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
            self.shift64 = self.shift.reshape(-1).double()
        mean_b, var_b = _batch_moments(x - self.shift)
        mean_b, m2_b = mean_b.double().add_(self.shift64), var_b.double().mul_(n_b)
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean.add_(delta, alpha=n_b / n)
        self.m2.add_(m2_b).addcmul_(delta, delta, value=self.n * n_b / n)
        self.n = n

    def variance(self) -> torch.Tensor | None:
        return None if self.m2 is None else self.m2 / self.n


def _batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population variance of one batch (channels on dim 1), in float32 or wider.

    BatchNorm's own statistics kernel is 2-5x faster than torch.var_mean on CPU and
    as exact (two-pass on CPU, Welford on CUDA). Its CPU channels-last variant
    cancels catastrophically when |mean| >> std, so that layout takes var_mean.
    """
    cpu = x.device.type == "cpu"
    if cpu and x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # CPU would accumulate in half precision; CUDA accumulates in float32 itself
    if x.device.type == "cuda" or (cpu and x.is_contiguous()):
        try:
            return torch.batch_norm_update_stats(x, None, None, 0.0)
        except (RuntimeError, NotImplementedError):  # a dtype or backend without the kernel
            pass
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    var, mean = torch.var_mean(x, dim=(0, *range(2, x.dim())), correction=0)
    return mean, var


def _inputs(batch: Any, device: torch.device | str | None) -> Any:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if device is not None and isinstance(x, torch.Tensor):
        x = x.to(device, non_blocking=True)
    return x


def _modes(model: nn.Module) -> dict[nn.Module, bool]:
    # Per module, not model.training alone: a caller may hold some submodules frozen in eval.
    return {m: m.training for m in model.modules()}


def _restore(modes: dict[nn.Module, bool]) -> None:
    for m, mode in modes.items():
        m.training = mode


def _cos2(weight: torch.Tensor) -> float:
    """Mean over output units of cos^2 between the unit's weight vector and all-ones: (sum w)^2 / (d ||w||^2)."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    sq = (w * w).sum(1)
    ok = sq > 0  # a zero weight vector has no direction
    if not bool(ok.any()):
        return math.nan
    return float((w.sum(1)[ok] ** 2 / (w.shape[1] * sq[ok])).mean())


def _feeding(weight: nn.Module | None) -> tuple[int | None, float]:
    """fan_in d = in_channels*prod(kernel)/groups (in_features for Linear) and cos^2 of the feeding layer."""
    if weight is None or getattr(weight, "weight", None) is None:
        return None, math.nan
    if isinstance(weight, _ConvNd) and weight.transposed:
        return None, math.nan  # a transposed conv's fan-in depends on the output position
    w = weight.weight
    return int(w[0].numel()), _cos2(w)


def _reads_d_cos2(weight: nn.Module | None) -> bool:
    """A feeding weight layer the probe reads `d_cos2` from: a conv or linear with a weight, not transposed."""
    return weight is not None and getattr(weight, "weight", None) is not None and \
        not (isinstance(weight, _ConvNd) and weight.transposed)


@torch.no_grad()
def feeding_weights(model: nn.Module, example: torch.Tensor) -> list[tuple[nn.Module, bool]]:
    """(weight layer, fed_by_dropout) for every BN layer with a feeding weight layer the probe reads `d_cos2`
    from, in execution order: the layers of LayerShift.d_cos2, found as measure_variance_shift finds them.

    One eval-mode forward of `example` (structure only: zeros of one input's shape will do); every
    module's train/eval mode is restored and no random number is drawn. A weight layer feeding two BN
    layers is listed twice, so a mean over the list is the mean of the BN layers' `d_cos2`.
    """
    trace = _Trace(model)
    modes = _modes(model)
    try:
        model.eval()
        model(example)
    finally:
        trace.stop()
        _restore(modes)
    return [(s.weight, s.fed_by_dropout) for s in (trace.sites[bn] for bn in trace.order) if _reads_d_cos2(s.weight)]


def _ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.maximum(a / b, b / a)


def _shift(real: float, moving: float) -> float:
    """max(real/moving, moving/real); inf when exactly one is zero, NaN when both are."""
    if real > 0 and moving > 0:
        return max(real / moving, moving / real)
    return math.inf if (real > 0) != (moving > 0) else math.nan


class _Gated(_Moments):
    """_Moments that count only while `on` (the mechanism's subset of batches); input or output of a module."""

    def __init__(self) -> None:
        super().__init__()
        self.on, self.enabled = False, True

    def pre(self, module: nn.Module, args: tuple) -> None:
        if self.on:
            self(module, args)

    def post(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self.on:
            self(module, (out,))


@dataclass
class _Mechanism:
    """The mechanism probe's state: gated statistics over every `every`-th batch, then the frozen pass."""

    every: int
    bn_eval: dict  # BN -> _Gated of its input (eval mode, subset)
    drop_in: dict  # dropout -> _Gated of its input
    w_in: dict  # weight layer -> _Gated of its input
    w_out: dict  # weight layer -> _Gated of its output
    propagator: Any = None  # mechanism.NoisePropagator, None when the model does not trace
    batches: list = None  # the subset's inputs, for the frozen pass
    frozen: dict = None  # BN -> _Moments of its input in the frozen pass

    def gates(self) -> list[_Gated]:
        return [*self.bn_eval.values(), *self.drop_in.values(), *self.w_in.values(), *self.w_out.values()]


@torch.no_grad()
def measure_variance_shift(model: nn.Module, loader: Iterable, device: torch.device | str | None, *,
                           mechanism: bool = True, every: int = 8) -> list[LayerShift]:
    """Variance shift at every BatchNorm layer, in execution order, and the mechanism behind it.

    The model runs in eval mode (dropout off, BN on running statistics) over
    every batch of `loader`; each BN's input is summarised per channel on the
    fly. The previous train/eval mode of every module is restored afterwards.

    With `mechanism`, every `every`-th batch (the first included) also feeds the
    mechanism probe (search/trial/mechanism.py): the eval-mode moments of each
    feeding dropout's input (c_in, v_in) and weight layer (rho), the theory's
    propagated noise (shift_theory, excess_local, excess_inherited), and then the
    frozen measurement on those same batches (shift_frozen: dropout on, BN frozen,
    fixed seed) over their eval-mode variance.

    Args:
        model: any nn.Module with BatchNorm layers (`_BatchNorm` subclasses).
        loader: iterable of (x, y) batches (or bare x); x is moved to `device`.
        device: where to run; None leaves x where it is.
        mechanism: also run the mechanism probe (the shift probe after BN re-estimation skips it).
        every: stride of the mechanism's batch subset (8: an eighth of the batches, the first included).

    Returns:
        One `LayerShift` per BN module, in the order the first forward calls
        them; BN modules the forward never reaches come last, with NaN
        statistics. shift = max(real/moving, moving/real) of the channel means;
        shift_channelwise is the mean of the per-channel ratio over channels
        where both variances are > 0.

    Raises:
        ValueError: `loader` yielded no batch, or `every` < 1.
    """
    if every < 1:
        raise ValueError(f"argument 'every' = {every!r} is invalid: must be an int >= 1")
    names = {m: n for n, m in model.named_modules() if isinstance(m, NORM_LAYERS)}
    if not names:  # normalization none: no layer to measure
        return []
    moments = {m: _Moments() for m in names}
    trace = _Trace(model)
    handles = [m.register_forward_pre_hook(moments[m]) for m in names]
    mech = _start_mechanism(model, names, every) if mechanism else None
    if mech is not None:
        handles += _mechanism_hooks(mech)
    modes = _modes(model)
    batches = 0
    try:
        model.eval()
        for batch in loader:
            x = _inputs(batch, device)
            if mech is not None and batches % every == 0:
                _subset_forward(mech, model, x)
            else:
                model(x)
            if batches == 0:
                trace.stop()  # structure is known after one forward; keep later batches lean
                if mech is not None:
                    _prune(mech, trace, handles)
            batches += 1
        if mech is not None and batches:
            for h in handles:  # the eval-mode statistics are complete; the frozen pass must not add to them
                h.remove()
            handles.clear()
            _frozen(mech, model, trace)
    finally:
        trace.stop()
        for h in handles:
            h.remove()
        _restore(modes)
    if batches == 0:
        raise ValueError("measure_variance_shift: `loader` yielded no batches; pass the training data loader")

    order = trace.order + [m for m in names if m not in trace.sites]
    n = len(order)
    metrics = bool(layer_metrics())  # registered per-layer metrics (register_layer_metric): computed below
    records = []
    for index, bn in enumerate(order):
        site = trace.sites.get(bn, _Site(None, False))
        fan_in, cos2 = _feeding(site.weight)
        rec = _record(names[bn], index, n, bn, moments[bn], fan_in, site.fed_by_dropout, cos2)
        rec.bn_name = own_name(model, names[bn])
        if mech is not None:
            _mechanism_fields(rec, mech, bn, site)
        if metrics:
            rec.metrics = compute_layer_metrics(_layer_probe(rec, bn, moments[bn]))
        records.append(rec)
    return records


def _layer_probe(rec: LayerShift, bn: _BatchNorm, mom: _Moments) -> LayerProbe:
    """What a registered per-layer metric reads: the record and the per-channel statistics, as numpy float64."""
    def arr(t: torch.Tensor | None) -> Any:
        return None if t is None else t.detach().double().cpu().numpy()

    return LayerProbe(rec, arr(getattr(bn, "running_var", None)), arr(mom.variance()), arr(mom.mean))


def _start_mechanism(model: nn.Module, names: dict, every: int) -> _Mechanism:
    from search.trial import mechanism as M

    drops = [m for m in model.modules() if is_active_dropout(m)]
    weights = [m for m in model.modules() if _is_weight_layer(m)] if drops else []
    mech = _Mechanism(every, {m: _Gated() for m in names}, {m: _Gated() for m in drops},
                      {m: _Gated() for m in weights}, {m: _Gated() for m in weights}, batches=[])
    if drops:
        gm = M.trace_graph(model)
        mech.propagator = M.NoisePropagator(gm, list(names)) if gm is not None else None
        if mech.propagator is not None:
            for rec in mech.propagator.records.values():
                rec.shifted = _Moments()
    return mech


def _mechanism_hooks(mech: _Mechanism) -> list:
    hs = [m.register_forward_pre_hook(g.pre) for d in (mech.bn_eval, mech.drop_in, mech.w_in) for m, g in d.items()]
    return hs + [m.register_forward_hook(g.post) for m, g in mech.w_out.items()]


def _prune(mech: _Mechanism, trace: _Trace, handles: list) -> None:
    """After the first batch: keep weight/dropout statistics only for the modules that feed a BN fed by dropout."""
    fed = [s for s in trace.sites.values() if s.fed_by_dropout]
    keep_w = {s.weight for s in fed if s.weight is not None}
    keep_d = {s.dropout for s in fed if s.dropout is not None}
    for table, keep in ((mech.w_in, keep_w), (mech.w_out, keep_w), (mech.drop_in, keep_d)):
        for m in [m for m in table if m not in keep]:
            table[m].enabled = False  # its hook stays (cheap to leave) but counts nothing more


def _subset_forward(mech: _Mechanism, model: nn.Module, x: torch.Tensor) -> None:
    for g in mech.gates():
        g.on = g.enabled
    if mech.propagator is not None:
        mech.propagator.propagate(x)
    else:
        model(x)
    for g in mech.gates():
        g.on = False
    if mech.drop_in:
        mech.batches.append(x)


def _frozen(mech: _Mechanism, model: nn.Module, trace: _Trace) -> None:
    from search.trial.mechanism import frozen_pass

    mech.frozen = {m: _Moments() for m in mech.bn_eval}
    if mech.batches:
        frozen_pass(model, mech.batches, mech.frozen)
    mech.batches = []


def _mechanism_fields(rec: LayerShift, mech: _Mechanism, bn: nn.Module, site: _Site) -> None:
    """Fill the mechanism columns of one BN record (NaN where a quantity does not apply or was not measured)."""
    from search.trial.mechanism import d_cos2

    ev = mech.bn_eval[bn].variance()
    if _reads_d_cos2(site.weight):
        sq, dj = d_cos2(site.weight.weight)
        rec.d_cos2 = float(dj[torch.isfinite(dj)].mean()) if bool(torch.isfinite(dj).any()) else math.nan
        if site.fed_by_dropout and site.weight in mech.w_in:
            rec.rho = _rho(mech.w_in[site.weight], mech.w_out[site.weight], sq, dj)
    if site.fed_by_dropout and site.dropout in mech.drop_in:
        m = mech.drop_in[site.dropout]
        if m.mean is not None:
            rec.c_in, rec.v_in = float(m.mean.mean()), float(m.variance().mean())
    if ev is None or not mech.drop_in:
        if ev is not None:  # no active dropout: nothing injects noise, the frozen pass is the eval pass
            rec.shift_frozen = rec.shift_theory = 1.0
            rec.excess_local = rec.excess_inherited = 0.0
        return
    base = float(ev.sum())
    fz = mech.frozen[bn].variance()
    if fz is not None and base > 0:
        rec.shift_frozen = float(fz.sum()) / base
    if mech.propagator is not None and bn in mech.propagator.records:
        noise = mech.propagator.records[bn]
        total, local = noise.mean()
        shifted = noise.shifted.variance() if noise.shifted is not None else None
        if total is not None and shifted is not None and base > 0:
            # Var_frozen = Var_data(x + mean shift) + E[noise variance]; the local part is exact, the rest inherited.
            rec.shift_theory = (float(shifted.sum()) + float(total.sum())) / base
            rec.excess_local = float(local.sum()) / base
            rec.excess_inherited = rec.shift_theory - 1.0 - rec.excess_local


def _rho(w_in: _Moments, w_out: _Moments, sq: torch.Tensor, dj: torch.Tensor) -> float:
    """Least-squares rho of Var(Wx)_j = v ||w_j||^2 (1 + rho (D_j - 1)) over output units j.

    v is the channel mean of the weight layer's input variance (eval mode): the paper's
    equal-variance, equicorrelated model. rho is *effective*: it also absorbs unequal
    input variances, correlation that differs across taps, and a conv's zero padding.
    """
    vin, vout = w_in.variance(), w_out.variance()
    if vin is None or vout is None or vout.numel() != sq.numel():
        return math.nan
    v = float(vin.mean())
    a = v * sq.to(vout.device) * (dj.to(vout.device) - 1.0)
    b = vout - v * sq.to(vout.device)
    ok = torch.isfinite(a) & torch.isfinite(b)
    den = float((a[ok] ** 2).sum())
    return float((a[ok] * b[ok]).sum()) / den if den > 0 else math.nan


def own_name(model: nn.Module, path: str) -> str:
    """A BN's path without the levels dropout wrappers add: `P.1` inside nn.Sequential(dropout, bn) at P is `P`,
    `P.0` inside nn.Sequential(bn, dropout) is `P`, and so is a wrapped block's level above the BN.

    search/trial/dropout/surgery.py inserts dropout before a module at P by replacing it with
    nn.Sequential(dropout, module), after it (post_* placements, possibly a whole block) with
    nn.Sequential(module, dropout); the module's own name is the same under every placement.
    """
    own, module = [], model
    for part in path.split("."):
        wrapped = isinstance(module, nn.Sequential) and len(module) == 2 and part in ("0", "1") and \
            isinstance(module[1 - int(part)], VarianceDropout) and not isinstance(module[int(part)], VarianceDropout)
        if not wrapped:
            own.append(part)
        module = module.get_submodule(part)
    return ".".join(own)


def _record(name: str, index: int, n: int, bn: nn.Module, mom: _Moments, fan_in: int | None,
            fed: bool, cos2: float) -> LayerShift:
    nan = math.nan
    real = mom.variance()
    running = getattr(bn, "running_var", None)  # a GroupNorm has none: the shift columns stay NaN
    moving = running.detach().double() if running is not None else None
    moving_var = float(moving.mean()) if moving is not None else nan
    real_var = float(real.mean()) if real is not None else nan
    real_mean = float(mom.mean.mean()) if mom.mean is not None else nan
    shift = shift_cw = nan
    if real is not None and moving is not None:
        shift = _shift(real_var, moving_var)
        real = real.to(moving.device)
        ok = (real > 0) & (moving > 0)  # a dead channel would make the mean infinite
        if bool(ok.any()):
            shift_cw = float(_ratio(real[ok], moving[ok]).mean())
    return LayerShift(
        name=name, index=index, rel_depth=index / (n - 1) if n > 1 else 0.0,
        channels=int(bn.num_features if isinstance(bn, _BatchNorm) else bn.num_channels),
        fan_in=fan_in, fed_by_dropout=fed, moving_var=moving_var, real_var=real_var, shift=shift,
        shift_channelwise=shift_cw, real_mean=real_mean, cos2=cos2, norm_type=norm_kind(bn),
    )


@torch.no_grad()
def reestimate_bn(model: nn.Module, loader: Iterable, device: torch.device | str | None) -> int:
    """Recompute every BN's running statistics on `loader`; weights frozen, dropout off.

    BN layers run in train mode with momentum=None, which makes torch keep an
    exact cumulative average of the per-batch statistics; every other module
    (dropout included) runs in eval mode. Momentum values and every module's
    train/eval mode are restored afterwards. If the pass fails, the old
    statistics are put back.

    Args:
        model: any nn.Module; BN layers without running statistics are left alone.
        loader: iterable of (x, y) batches (or bare x), typically the training data.
        device: where to run; None leaves x where it is.

    Returns:
        The number of BN layers re-estimated: 0 when the model has none with running statistics
        (normalization groupnorm or none), and then nothing ran and the loader was not read; the
        caller records no re-estimation (test_acc_reest NaN: no gain, rather than a gain of 0).

    Raises:
        ValueError: `loader` yielded no batch.
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    modes = _modes(model)
    momenta = {m: m.momentum for m in bns}
    saved = {m: {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in bns}
    ok = False
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        batches = 0
        for batch in loader:
            model(_inputs(batch, device))
            batches += 1
        if batches == 0:
            raise ValueError("reestimate_bn: `loader` yielded no batches; pass the training data loader")
        ok = True
    finally:
        for m in bns:
            m.momentum = momenta[m]
            if not ok:
                for k, b in saved[m].items():
                    getattr(m, k).copy_(b)
        _restore(modes)
    return len(bns)
