"""The mechanism probe: what the theory needs at each BN fed by dropout, its prediction, and the measurement.

PAPER.md, "Exact form, no equicorrelation needed": with element-wise dropout masks
(Bernoulli, Gaussian, Uout) the masks leave covariances between distinct units alone,
so a weight layer's output gains exactly k * sum_i w_ji^2 E[x_i^2] of variance
(k = the kind's `noise_var(rate)`). For a conv with zero padding the per-position sum
is conv2d(x*x, w*w) with the conv's own stride, padding and groups, border taps
included. Case (a) is the same with no weight layer: k * E[x^2].

`NoisePropagator` carries that noise forward through the network in eval mode (BN on
its running statistics, dropout off) as a per-element *variance map* beside the
activations, on a torch.fx graph of the model:

- dropout (k):       s_out = (1 + k) s_in + k x^2       (exact: E[m] = 1, Var m = k, mask independent)
- conv / linear:     s_out = conv(s_in, w^2)             (exact for independent input noise)
- frozen BN:         s_out = s_in * gamma^2 / (running_var + eps)   (exact: an affine map)
- GroupNorm:         recorded at its input like a BN; noise past it unknown (each sample divided by its own
                     noisy group statistics: no rule), a clean input stays clean (normalization groupnorm)
- ReLU:              s_out = s_in * 1[z > 0]             (first order in the noise, z the eval input)
- add / cat / views: summed / concatenated / re-viewed  (sum: noise of two branches taken independent)
- mean / avg pool:   mean(s) / (elements averaged)       (noise of distinct elements taken independent)

At every BN input it records the predicted extra variance per channel, split into the
part injected by the dropout that feeds this BN (local) and the rest (inherited: noise
earlier dropouts sent down the residual stream or the dense concatenation, and the
local mask's amplification k * s_in of it). The prediction uses eval-mode activations
only; it never sees a dropout-on variance. What it leaves out: covariances between
noise of distinct elements after the first weight layer they cross, between the two
operands of an add, and ReLU's response beyond first order.

`frozen_pass` is the measurement the prediction is tested against: the same batches
with every dropout in train mode and every BN in eval mode (running statistics
frozen), under a fixed seed.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from search.trial.dropout.module import VarianceDropout

__all__ = ["NoisePropagator", "BNNoise", "trace_graph", "site_noise_var", "frozen_pass", "FROZEN_SEED", "d_cos2",
           "layer_d_cos2"]

RELU_RULE = "gaussian"  # 'gaussian' (rectified-Gaussian variance) or 'mask' (first order); docs/theory.md
FROZEN_SEED = 20190601  # the dropout draws of the frozen measurement (reproducible, independent of training)
_UNKNOWN = "unknown"  # a noise map through an op without a propagation rule


def site_noise_var(module: nn.Module) -> float | None:
    """k = Var of the multiplier of an active element-wise dropout module; None when there is no closed form."""
    if isinstance(module, VarianceDropout):
        if module.rate <= 0.0:
            return None
        impl = module.impl
        try:
            return float(type(impl).noise_var(module.rate)) if impl is not None and \
                getattr(impl, "closed_form", None) == "elementwise" else None
        except NotImplementedError:
            return None
    if isinstance(module, _DropoutNd) and module.p > 0.0:
        # nn.Dropout is element-wise inverted Bernoulli; Dropout2d/3d share a mask per channel (no closed form).
        return module.p / (1.0 - module.p) if type(module) is nn.Dropout and module.p < 1.0 else None
    return None


def _shared_noise(module: nn.Module) -> bool:
    """An active dropout whose noise has no element-wise rule (channel, droppath, dropblock, nn.Dropout2d).

    Ignoring it would predict no noise where there is some; the BNs it reaches are recorded unknown (NaN).
    """
    if isinstance(module, VarianceDropout):
        return module.rate > 0.0 and site_noise_var(module) is None
    return isinstance(module, _DropoutNd) and module.p > 0.0 and site_noise_var(module) is None


class _Tracer(fx.Tracer):
    """Keeps dropout modules (ours are Python-level branches on `training`) as leaves of the graph."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # GroupNorm a leaf too: traced through, its module hooks (the probes' statistics) would never fire.
        return isinstance(m, (VarianceDropout, _DropoutNd, _BatchNorm, nn.GroupNorm, _ConvNd, nn.Linear)) or \
            super().is_leaf_module(m, qualname)


def trace_graph(model: nn.Module) -> fx.GraphModule | None:
    """A torch.fx graph of `model` sharing its modules, or None when the model does not trace."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: no propagated theory then
        return None
    return fx.GraphModule(model, graph)


@dataclass
class BNNoise:
    """The theory at one BN input, summed over batches: noise variance and the moments of eval value + mean shift."""

    total: torch.Tensor | None = None  # per channel, float64 sum over values of the noise variance
    local: torch.Tensor | None = None
    count: int = 0
    unknown: bool = False
    shifted: Any = None  # streaming per-channel moments of x + mu (probes._Moments-like: n, mean, m2)

    def add(self, x: torch.Tensor, total: Any, local: torch.Tensor | None, mu: torch.Tensor | None) -> None:
        dims = (0, *range(2, x.dim()))
        t = total.sum(dims, dtype=torch.float64) if total is not None else torch.zeros(
            x.shape[1], dtype=torch.float64, device=x.device)
        lo = local.sum(dims, dtype=torch.float64) if local is not None else torch.zeros_like(t)
        self.total = t if self.total is None else self.total + t
        self.local = lo if self.local is None else self.local + lo
        self.count += x.numel() // x.shape[1]
        if self.shifted is not None:
            self.shifted(None, (x if mu is None else x.float() + mu,))

    def mean(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-channel noise variance (total, local) averaged over values; None when not known."""
        if self.unknown or self.total is None or self.count == 0:
            return None, None
        return self.total / self.count, self.local / self.count


@dataclass
class _State:
    """Noise of one graph value: variance map, the latest site's part of it and that site's id, and the mean shift."""

    total: Any = None  # Tensor | None (no noise) | _UNKNOWN
    local: torch.Tensor | None = None
    tag: int = -1
    mu: torch.Tensor | None = None  # E[noisy value] - eval value (ReLU of a noisy input moves its mean)


_STRUCTURAL = {"view", "reshape", "flatten", "permute", "contiguous", "squeeze", "unsqueeze", "transpose",
               "expand", "clone"}
_CASTS = {"to", "float", "double", "type_as"}
_ADD = {operator.add, operator.iadd, torch.add}
_RELU_FUNCS = {F.relu, torch.relu}


class NoisePropagator(fx.Interpreter):
    """Runs the eval-mode forward on the fx graph and carries the noise-variance maps (module docstring).

    Args:
        gm: the graph (from `trace_graph`), sharing the model's modules: hooks on them fire as usual.
        bns: the BN modules to record at (usually those fed by dropout).
    """

    def __init__(self, gm: fx.GraphModule, bns: Iterable[nn.Module]) -> None:
        super().__init__(gm)
        self.records: dict[nn.Module, BNNoise] = {m: BNNoise() for m in bns}
        self.sites: dict[nn.Module, int] = {}
        self._latest = -1  # id of the dropout site that ran last
        self._fed = False  # a dropout ran since the last BN

    def propagate(self, x: torch.Tensor) -> Any:
        """One batch: the model's eval-mode output; the records gain this batch's noise."""
        self.states: dict[str, _State] = {}
        self._latest, self._fed = -1, False
        with torch.no_grad():
            return self.run(x)

    # ---------------------------------------------------------------- fx hooks
    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        ins = [self.states.get(a.name, _State()) for a in n.all_input_nodes]
        noisy = [s for s in ins if s.total is not None]
        module = self.fetch_attr(n.target) if n.op == "call_module" else None
        # The input before an in-place module (ReLU) overwrites it, and x^2 for a dropout site.
        pre = args[0].detach().clone() if noisy and isinstance(module, nn.ReLU) and module.inplace else None
        out = getattr(self, n.op)(n.target, args, kwargs)
        shared = module is not None and _shared_noise(module)
        special = module is not None and (site_noise_var(module) is not None or
                                          isinstance(module, (_BatchNorm, nn.GroupNorm)))
        if n.op in ("placeholder", "get_attr", "output") or not noisy and not special and not shared:
            state = _State()
        elif shared:  # masks shared across elements: no propagation rule, so every BN it reaches is unknown
            state = _State(_UNKNOWN)
        elif isinstance(module, _BatchNorm):
            state = self._bn(module, args[0], noisy[0] if noisy else _State())
        elif isinstance(module, nn.GroupNorm):
            state = self._gn(module, args[0], noisy[0] if noisy else _State())
        elif any(s.total is _UNKNOWN for s in noisy):
            state = _State(_UNKNOWN)
        elif module is not None:
            state = self._module(module, args, out, noisy[0] if noisy else _State(), pre)
        else:
            state = self._function(n, args, out)
        self.states[n.name] = state
        return out

    def _local(self, s: _State) -> torch.Tensor | None:
        return s.local if s.tag == self._latest else None

    def _linear(self, s: _State, var_op: Callable, mean_op: Callable) -> _State:
        """A linear map: variance through `var_op` (on squared weights), mean shift through `mean_op`."""
        return _State(var_op(s.total), _maybe(var_op, self._local(s)), s.tag, _maybe(mean_op, s.mu))

    def _module(self, m: nn.Module, args: tuple, out: Any, s: _State, pre: Any) -> _State:
        k = site_noise_var(m)
        if k is not None:
            self._latest = self.sites.setdefault(m, len(self.sites))
            self._fed = True
            x = args[0].detach().float()
            x = x if s.mu is None else x + s.mu
            inj = k * x * x  # mask x (conditional mean); E[m] = 1 keeps the mean shift as it is
            tot = inj if s.total is None else (1.0 + k) * s.total + inj
            return _State(tot, inj, self._latest, s.mu)
        if isinstance(m, (nn.Identity, nn.Flatten)) or (isinstance(m, _DropoutNd) and m.p == 0.0) or (
                isinstance(m, VarianceDropout) and m.rate == 0.0):
            return self._linear(s, m, m)
        if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros":
            w, w2 = m.weight.detach().float(), m.weight.detach().float() ** 2
            return self._linear(s, lambda t: F.conv2d(t, w2, None, m.stride, m.padding, m.dilation, m.groups),
                                lambda t: F.conv2d(t, w, None, m.stride, m.padding, m.dilation, m.groups))
        if isinstance(m, nn.Linear):
            w = m.weight.detach().float()
            return self._linear(s, lambda t: t @ (w * w).T, lambda t: t @ w.T)
        if isinstance(m, nn.ReLU):
            return self._relu(pre if pre is not None else args[0], s)
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            area = args[0].numel() / max(out.numel(), 1)  # elements averaged into one output
            return self._linear(s, lambda t: m(t) / area, m)  # Var(mean of n independent) = mean(Var) / n
        return _State(_UNKNOWN)

    def _relu(self, z: torch.Tensor, s: _State) -> _State:
        """relu(z + mu + n), n ~ N(0, s), at the eval pre-activation z: the rectified Gaussian's variance and the
        mean shift E[.] - relu(z) (RELU_RULE 'gaussian'), or the first order s * 1[z > 0] ('mask')."""
        if RELU_RULE == "mask":
            mask = (z > 0).float()
            return self._linear(s, lambda t: t * mask, lambda t: t * mask)
        z = z.detach().float()
        centre = z if s.mu is None else z + s.mu
        mean, tot = _relu_moments(centre, s.total)
        loc = self._local(s)
        # ReLU mixes local and inherited noise; the local part keeps its share of the variance.
        frac = None if loc is None else torch.where(s.total > 0, loc / s.total.clamp_min(1e-30), torch.zeros_like(tot))
        return _State(tot, None if frac is None else tot * frac, s.tag, mean - z.clamp_min(0))

    def _gn(self, m: nn.GroupNorm, x: torch.Tensor, s: _State) -> _State:
        """A GroupNorm (normalization groupnorm): recorded at its input like a BN; past it the noise is unknown.

        It divides each sample by that sample's own (noisy) group statistics, a map with no rule here, so
        its output carries unknown noise (a clean input stays clean).
        """
        rec = self.records.get(m)
        fed, self._fed = self._fed, False
        if s.total is _UNKNOWN:
            if rec is not None:
                rec.unknown = True
            return _State(_UNKNOWN)
        if rec is not None:
            rec.add(x, s.total, self._local(s) if fed else None, s.mu)
        return _State() if s.total is None else _State(_UNKNOWN)

    def _bn(self, m: _BatchNorm, x: torch.Tensor, s: _State) -> _State:
        rec = self.records.get(m)
        fed, self._fed = self._fed, False
        if m.training or m.running_var is None or s.total is _UNKNOWN:
            if rec is not None:
                rec.unknown = True
            return _State(_UNKNOWN)
        if rec is not None:
            rec.add(x, s.total, self._local(s) if fed else None, s.mu)
        if s.total is None:
            return _State()
        scale = m.running_var.detach().float().add(m.eps).rsqrt()
        if m.weight is not None:
            scale = scale * m.weight.detach().float()
        shape = (1, -1) + (1,) * (s.total.dim() - 2)
        scale = scale.view(shape)
        # Its noise is now upstream of the next BN: no local part any more.
        return _State(s.total * scale * scale, None, -1, None if s.mu is None else s.mu * scale)

    def _function(self, n: fx.Node, args: tuple, out: Any) -> _State:
        target, op = n.target, n.op
        states = {a.name: self.states.get(a.name, _State()) for a in n.all_input_nodes}

        def swapped(which: str) -> tuple[tuple, dict]:
            # The call's arguments with each tensor input replaced by its noise map (zeros where it has none).
            def swap(a: Any) -> Any:
                if not isinstance(a, fx.Node):
                    return a
                st, val = states[a.name], self.env.get(a)
                if not isinstance(val, torch.Tensor):
                    return val
                t = None if st.total is None else {"total": st.total, "local": self._local(st), "mu": st.mu}[which]
                return t if t is not None else torch.zeros_like(val, dtype=torch.float32)
            return fx.node.map_aggregate(n.args, swap), fx.node.map_aggregate(n.kwargs, swap)

        def apply(var_fn: Callable, mean_fn: Callable | None = None) -> _State:
            mean_fn = mean_fn or var_fn
            tags = {st.tag for st in states.values() if st.total is not None}
            mu = mean_fn(*swapped("mu")) if any(st.mu is not None for st in states.values()) else None
            has_local = any(st.total is not None and self._local(st) is not None for st in states.values())
            return _State(var_fn(*swapped("total")), var_fn(*swapped("local")) if has_local else None,
                          self._latest if self._latest in tags else -1, mu)

        if (op == "call_function" and target in _ADD) or (op == "call_method" and target in ("add", "add_")):
            return apply(lambda a, k: a[0] + a[1])  # the operands' noise taken independent
        if op == "call_function" and target is torch.cat:
            return apply(lambda a, k: torch.cat(*a, **k))
        if (op == "call_function" and target in _RELU_FUNCS) or (op == "call_method" and target == "relu"):
            return self._relu(args[0], next(st for st in states.values() if st.total is not None))
        if op == "call_method" and target in _STRUCTURAL:
            return apply(lambda a, k: getattr(a[0], target)(*a[1:], **k))
        if op == "call_function" and target is torch.flatten:
            return apply(lambda a, k: torch.flatten(*a, **k))
        if op == "call_method" and target in _CASTS:
            return apply(lambda a, k: a[0])
        if (op == "call_method" and target == "mean") or (op == "call_function" and target in (
                torch.mean, F.adaptive_avg_pool2d, F.avg_pool2d)):
            area = args[0].numel() / max(out.numel(), 1)
            fn = torch.mean if op == "call_method" else target
            return apply(lambda a, k: fn(*a, **k) / area, lambda a, k: fn(*a, **k))
        if op == "call_function" and target in (operator.mul, torch.mul) and sum(
                isinstance(a, torch.Tensor) for a in args) == 1 and any(isinstance(a, (int, float)) for a in args):
            c = next(float(a) for a in args if isinstance(a, (int, float)))
            t = lambda a: next(x for x in a if isinstance(x, torch.Tensor))  # noqa: E731
            return apply(lambda a, k: t(a) * c * c, lambda a, k: t(a) * c)
        if op == "call_function" and target is operator.getitem and not isinstance(out, torch.Tensor):
            return _State()
        return _State(_UNKNOWN)


def _relu_moments(z: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance over n ~ N(0, s) of relu(z + n), element-wise (the rectified Gaussian's moments)."""
    sd = s.clamp_min(0).sqrt()
    t = z / sd.clamp_min(1e-20)
    cdf = torch.special.ndtr(t)
    pdf = torch.exp(-0.5 * t * t) * 0.3989422804014327
    m1 = z * cdf + sd * pdf
    m2 = (z * z + s) * cdf + z * sd * pdf
    pos = s > 0
    return torch.where(pos, m1, z.clamp_min(0)), torch.where(pos, (m2 - m1 * m1).clamp_min(0), torch.zeros_like(s))


def _maybe(f: Callable[[Any], Any], t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else f(t)


def _dropouts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (VarianceDropout, _DropoutNd))]


def frozen_pass(model: nn.Module, batches: Iterable[torch.Tensor], hooks: dict[nn.Module, Callable],
                seed: int = FROZEN_SEED) -> None:
    """Forward `batches` with every dropout module in train mode and everything else (BN included) in eval.

    `hooks` are forward pre-hooks to attach to modules for the pass. The global RNG is
    forked and seeded, so the draws are reproducible and training's random state is untouched.
    The caller restores train/eval modes.
    """
    model.eval()
    for m in _dropouts(model):
        m.train()
    handles = [m.register_forward_pre_hook(h) for m, h in hooks.items()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()


def d_cos2(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output unit: ||w_j||^2 and D_j = (sum_i w_ji)^2 / ||w_j||^2 (= d cos^2 theta_j), float64."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    sq = (w * w).sum(1)
    with torch.no_grad():
        d = torch.where(sq > 0, w.sum(1) ** 2 / sq.clamp_min(1e-300), torch.full_like(sq, math.nan))
    return sq, d


@torch.no_grad()
def layer_d_cos2(weights: Iterable[torch.Tensor]) -> list[float]:
    """Per weight tensor, the mean over its output units of D_j (`d_cos2`; units with a zero weight vector
    skipped, NaN when all are): the probe's `d_cos2` column, read from the weights alone (no data).

    One host-device transfer for all of them; nothing is captured or synchronised before it, so it runs
    between CUDA-graph replays (search.trial.train calls it after every epoch).
    """
    means = [torch.nanmean(d_cos2(w)[1]) for w in weights]
    return torch.stack(means).tolist() if means else []
