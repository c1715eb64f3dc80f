"""The contracts every registered implementation must pass, built-in or plugin.

    check_dropout(kind)               train-mode multiplier of mean 1 (standard errors from the independent
                                      masks its declared structure has); for element-wise kinds
                                      (closed_form='elementwise') i.i.d. noise whose variance is
                                      noise_var(rate); the identity in eval mode; input shape kept
    check_placement(placement, fam)   the sites it returns are proven by forward hooks: each inserted
                                      module runs, right before its target (a before-site) or on exactly
                                      the output of the module it names (an after-site), its noise
                                      reaches the BN it names first (or no BN when it feeds none), and
                                      the eval-mode function of the model is unchanged
    check_backbone(family)            it builds at a small size and runs forward, train and eval

Each raises ContractError with one line saying what was measured and what was expected.
tests/test_contracts.py runs them over the whole registry; `--plugin` runs the dropout and
backbone contracts on what a plugin registers. Imports torch.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from search import registry
from search.trial.dropout.module import VarianceDropout, make_dropout
from search.trial.dropout.placements import PlacementSite

__all__ = ["ContractError", "check_dropout", "independent_units", "check_placement", "check_backbone", "small_model",
           "CONTRACT_RATES"]

CONTRACT_RATES = (0.2, 0.5)
STOCK_STANDIN = "resnet18"  # the timm model that stands for the `timm_stock` family
IMAGE = 32  # px of the contract inputs
Z = 6.0  # standard errors a Monte-Carlo mean may stray before it is a failure (false alarm ~1e-9)


class ContractError(ValueError):
    """An implementation that breaks its contract; the message says what was measured and expected."""


# ---------------------------------------------------------------- dropout kinds
def check_dropout(kind: str, rates: tuple[float, ...] = CONTRACT_RATES, seed: int = 0) -> None:
    """Check a registered dropout kind's statistics by Monte Carlo.

    Train mode on x = 1 (so the output is the multiplier m): E[m] = 1 within 6 standard
    errors, on (N, C, H, W) and (N, C) inputs (feature maps only for a kind registered with
    needs_map); the standard error counts the independent masks of the kind's declared
    structure: elements, (sample, channel) pairs or samples. For closed_form 'elementwise' also
    Var[m] = noise_var(rate) within 5 % and neighbouring elements uncorrelated (|r| < 0.05); for
    'case_a' (shared masks) one element's E[m^2] - 1 = noise_var(rate) within 6 standard errors.
    Eval mode: the output is the input, bit for bit.

    Raises:
        ContractError: the first broken property.
    """
    try:
        _check_dropout(kind, rates, seed)
    except ContractError:
        raise
    except Exception as e:  # noqa: BLE001 - a kind that raises breaks its contract too
        raise ContractError(f"{kind!r}: raises {type(e).__name__}: {_first(e)}".rstrip(": ")) from None


def _check_dropout(kind: str, rates: tuple[float, ...], seed: int) -> None:
    entry = registry.get("dropout", kind)
    closed, structure = entry.meta.get("closed_form"), entry.meta.get("structure", "sample")
    top = float(getattr(entry.obj, "max_rate", 1.0))
    shapes = [(512, 16, 8, 8)] + ([] if entry.meta.get("needs_map") else [(4096, 64)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for rate in [r for r in rates if r < top] or [top / 2]:
            mod = make_dropout(kind, rate)
            if not isinstance(mod, VarianceDropout):  # make_dropout wraps every nn.Module; a guard for the future
                raise ContractError(f"make_dropout({kind!r}, {rate}) returned {type(mod).__name__}, not a "
                                    "VarianceDropout (the probes find dropout sites by that class)")
            if closed == "elementwise":  # shared noise first: it is the likelier cause of what follows failing
                _check_uncorrelated(mod, kind, rate)
            for shape in shapes:
                _check_mean(mod, kind, rate, shape, structure)
            if closed == "elementwise":
                _check_noise_var(mod, entry.obj, kind, rate)
            elif closed == "case_a":
                _check_marginal_var(mod, entry.obj, kind, rate, structure)
            mod.eval()
            x = torch.randn(8, 4, 5, 5)
            if not torch.equal(mod(x), x):
                raise ContractError(f"{kind!r} at rate {rate}: eval mode changes its input (must be the identity)")


def _multiplier(mod: nn.Module, kind: str, rate: float, shape: tuple[int, ...]) -> torch.Tensor:
    mod.train()
    x = torch.ones(shape)
    with torch.no_grad():
        y = mod(x)
    if tuple(y.shape) != shape:
        raise ContractError(f"{kind!r} at rate {rate}: output shape {tuple(y.shape)} for input {shape}")
    if not torch.isfinite(y).all():
        raise ContractError(f"{kind!r} at rate {rate}: non-finite output in train mode")
    return y


def independent_units(m: torch.Tensor, structure: str) -> torch.Tensor:
    """The multiplier averaged over what one mask of `structure` may share: one value per independent unit.

    'element': every element; 'channel': one per (sample, channel) (positions of a channel share a mask);
    'sample': one per sample (every element of a sample may share or correlate).
    """
    if structure == "sample":
        return m.flatten(1).mean(dim=1)
    if structure == "channel" and m.dim() > 2:
        return m.flatten(2).mean(dim=2).flatten()
    return m.flatten()


def _check_mean(mod: nn.Module, kind: str, rate: float, shape: tuple[int, ...], structure: str) -> None:
    m = _multiplier(mod, kind, rate, shape)
    # The standard error of the mean comes from the independent units, not the elements: a per-sample
    # (DropPath) mask has N independent draws on an (N, C) input, not N * C.
    u = independent_units(m, structure).double()
    mean, se = u.mean().item(), u.std().item() / math.sqrt(u.numel())
    if abs(mean - 1.0) > Z * se + 1e-3:
        s = independent_units(m, "sample").double()
        hint = "scale the kept values so E[m] = 1"
        if structure != "sample" and abs(s.mean().item() - 1.0) <= Z * s.std().item() / math.sqrt(s.numel()) + 1e-3:
            # Counted per sample, the same multipliers pass: the masks are shared more widely than declared.
            hint = (f"its masks look shared within a sample, not per {structure}: declare structure='channel' or"
                    " 'sample' in register_dropout")
        raise ContractError(f"{kind!r} at rate {rate}: train-mode mean multiplier {mean:.4f} on {shape} inputs, "
                            f"expected 1 (+- {Z * se + 1e-3:.4f} from {u.numel()} independent {structure} masks);"
                            f" {hint}")


def _check_noise_var(mod: nn.Module, cls: Any, kind: str, rate: float) -> None:
    m = _multiplier(mod, kind, rate, (512, 16, 8, 8)).double()
    want = float(cls.noise_var(rate))
    got = m.var().item()
    if abs(got - want) > 0.05 * want + 1e-3:
        raise ContractError(f"{kind!r} at rate {rate}: train-mode variance of the multiplier {got:.4f}, but "
                            f"noise_var({rate}) = {want:.4f} (closed_form='elementwise' promises it)")


def _check_marginal_var(mod: nn.Module, cls: Any, kind: str, rate: float, structure: str) -> None:
    """E[m^2] - 1 = noise_var(rate) for one element's multiplier, the standard error from independent masks."""
    m = _multiplier(mod, kind, rate, (16384, 4, 2, 2)).double()  # many samples: per-sample masks are units too
    u = independent_units(m * m, structure)
    got, se = u.mean().item() - 1.0, u.std().item() / math.sqrt(u.numel())
    want = float(cls.noise_var(rate))
    if abs(got - want) > Z * se + 1e-3:
        raise ContractError(f"{kind!r} at rate {rate}: one element's multiplier has variance {got:.4f}, but "
                            f"noise_var({rate}) = {want:.4f} (+- {Z * se + 1e-3:.4f}; closed_form='case_a'"
                            " promises it)")


def _check_uncorrelated(mod: nn.Module, kind: str, rate: float) -> None:
    m = _multiplier(mod, kind, rate, (512, 16, 8, 8)).double()
    a, b = m[..., :-1].flatten(), m[..., 1:].flatten()
    r = torch.corrcoef(torch.stack([a, b]))[0, 1].item() if a.std() > 0 else 0.0
    if abs(r) > 0.05:
        raise ContractError(f"{kind!r} at rate {rate}: neighbouring multipliers correlate (r = {r:.3f}); "
                            "shared noise is not element-wise: declare closed_form = None")


# ------------------------------------------------------------------- backbones
def _smallest_depth(entry: registry.Entry) -> int | None:
    ok, default = entry.meta.get("depth_ok"), entry.meta.get("default_depth")
    if ok is None:
        return default
    return next((d for d in range(1, 400) if ok(d)), default)


def small_model(family: str, *, num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """The registered `family` at its smallest depth and a small width, without dropout.

    `timm_stock` (any timm model) is represented by resnet18 at width 1/8.
    """
    from search.config import TrialConfig
    from search.trial.models import build_model

    entry = registry.get("backbone", family)
    stock = bool(entry.meta.get("stock"))
    cfg = TrialConfig(backbone=STOCK_STANDIN if stock else family, depth=None if stock else _smallest_depth(entry),
                      width=0.125 if stock else float(entry.meta.get("contract_width", 0.5)),
                      dataset="synthetic", image_size=IMAGE, in_chans=in_chans, num_classes=num_classes)
    torch.manual_seed(0)
    return build_model(cfg)


def check_backbone(family: str) -> None:
    """A registered family builds small and maps (2, 3, 32, 32) to (2, 10) logits in train and eval mode.

    Raises:
        ContractError: it does not build, does not run, or returns the wrong shape.
    """
    try:
        model = small_model(family)
    except Exception as e:  # noqa: BLE001 - any failure to build is the contract's failure
        raise ContractError(f"backbone {family!r} does not build: {type(e).__name__}: {_first(e)}") from None
    for train in (True, False):
        model.train(train)
        try:
            with torch.no_grad():
                y = model(torch.randn(2, 3, IMAGE, IMAGE))
        except Exception as e:  # noqa: BLE001
            raise ContractError(f"backbone {family!r}: forward in {'train' if train else 'eval'} mode fails: "
                                f"{type(e).__name__}: {_first(e)}") from None
        if tuple(y.shape) != (2, 10):
            raise ContractError(f"backbone {family!r}: output shape {tuple(y.shape)}, expected (2, 10) logits")


# ------------------------------------------------------------------ placements
def check_placement(placement: str, family: str, kind: str = "bernoulli", rate: float = 0.5) -> list[PlacementSite]:
    """Insert `placement` into a small `family` model and prove every returned site by forward hooks.

    Proven: the inserted VarianceDropout modules are exactly the sites; in a train-mode
    forward each runs at least once and changes its input (rate > 0). A before-site: the next
    module called after it is its target. An after-site (`site.after` set): its input is exactly
    the output of `after`, which is the last module to run before it, and its output is exactly
    what the wrapper hands on; its target is the first conv/BN/Linear whose input carries its
    noise. For every site, `feeds_bn` is the first BatchNorm (in call order) whose input carries
    its noise (none at all for a placement registered with feeds_bn=False): "carries" is shown by
    perturbing that dropout's output alone in an eval-mode forward and seeing which inputs move.
    Case 'a' targets a BN, case 'b' a conv or linear layer; the eval-mode output equals the
    model's before surgery.

    Returns:
        The sites.

    Raises:
        ContractError: the first broken property.
    """
    from search.trial.dropout.surgery import apply_placement

    meta = registry.get("placement", placement).meta
    model = small_model(family)
    before = copy.deepcopy(model)
    where = f"placement {placement!r} on {family!r}"
    try:
        sites = apply_placement(model, placement, kind, rate, input_size=(3, IMAGE, IMAGE))
    except Exception as e:  # noqa: BLE001
        raise ContractError(f"{where}: surgery fails: {type(e).__name__}: {_first(e)}") from None
    modules = dict(model.named_modules())
    inserted = {n for n, m in modules.items() if isinstance(m, VarianceDropout)}
    if inserted != {s.module for s in sites}:
        raise ContractError(f"{where}: returned sites {sorted(s.module for s in sites)} but inserted "
                            f"{sorted(inserted)}")
    # Eval first: the train-mode forward below moves the BN running statistics.
    model.eval()
    before.eval()
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        same = torch.allclose(model(x), before(x), rtol=1e-5, atol=1e-6)
    if not same:
        raise ContractError(f"{where}: the eval-mode output differs from the model's before surgery "
                            "(a placement may insert only dropout, which is the identity in eval mode)")
    rec = _record(model, modules)
    calls = rec.calls
    bns = {n for n, m in modules.items() if isinstance(m, _BatchNorm)}
    for s in sites:
        idx = [i for i, n in enumerate(calls) if n == s.module]
        if not idx:
            raise ContractError(f"{where}: site {s.module!r} never runs in a forward")
        if rate > 0 and not rec.changed.get(s.module):
            raise ContractError(f"{where}: site {s.module!r} leaves its input unchanged in train mode at rate {rate}")
        moved = _carries_noise(model, modules, s.module, x)
        if s.after is None:
            nxt = calls[idx[0] + 1] if idx[0] + 1 < len(calls) else None
            if nxt != s.target:
                raise ContractError(f"{where}: site {s.module!r} says it runs before {s.target!r}, but the next "
                                    f"module called is {nxt!r}")
        else:
            _check_after_site(where, s, modules, rec, idx[0], moved)
        first_bn = next((n for n in moved if n in bns), None)
        if not meta.get("feeds_bn", True):
            if first_bn is not None:
                raise ContractError(f"{where}: registered with feeds_bn=False, but BN {first_bn!r}'s input carries "
                                    f"the noise of {s.module!r}")
        elif first_bn != s.feeds_bn:
            raise ContractError(f"{where}: site {s.module!r} names feeds_bn={s.feeds_bn!r}, but the first BN "
                                f"whose input carries its noise is {first_bn!r}")
        target = modules[s.target] if s.target else None
        if meta.get("case") == "a" and not isinstance(target, _BatchNorm):
            raise ContractError(f"{where}: case 'a' (dropout -> BN), but {s.module!r} runs before "
                                f"{type(target).__name__} {s.target!r}")
        if meta.get("case") == "b" and not isinstance(target, (nn.Conv2d, nn.Linear)):
            raise ContractError(f"{where}: case 'b' (dropout -> weight layer -> BN), but {s.module!r} runs before "
                                f"{type(target).__name__} {s.target!r}")
    return sites


def _check_after_site(where: str, s: PlacementSite, modules: dict[str, nn.Module], rec: "_Recording", at: int,
                      moved: list[str]) -> None:
    """An after-site takes exactly `after`'s output, right after it ran, and its output is what the wrapper returns;
    its target is the first conv/BN/Linear whose input carries its noise."""
    inside = [i for i, n in enumerate(rec.calls[:at]) if n == s.after or n.startswith(s.after + ".")]
    if not inside or modules.get(s.after) is None:
        raise ContractError(f"{where}: after-site {s.module!r} names after={s.after!r}, which never runs before it")
    if rec.finished_before.get(s.module) != s.after:
        raise ContractError(f"{where}: after-site {s.module!r} says it takes the output of {s.after!r}, but the last "
                            f"module to finish before it is {rec.finished_before.get(s.module)!r}")
    if rec.inputs.get(s.module) is not rec.outputs.get(s.after):
        raise ContractError(f"{where}: after-site {s.module!r}'s input is not the output of {s.after!r}")
    wrapper = s.module.rpartition(".")[0]
    if rec.outputs.get(wrapper) is not rec.outputs.get(s.module):
        raise ContractError(f"{where}: after-site {s.module!r}'s output is not what {wrapper!r} hands on")
    layers = [n for n in moved if isinstance(modules[n], (nn.Conv2d, nn.Linear, _BatchNorm))]
    if (layers[0] if layers else "") != s.target:
        raise ContractError(f"{where}: after-site {s.module!r} names target={s.target!r}, but the first layer whose "
                            f"input carries its noise is {layers[0] if layers else None!r}")


class _Recording:
    """One train-mode forward: module names in call order (pre-hooks), whether each dropout changed its input,
    the first input and output object of each module, and per dropout the last module to finish before it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.changed: dict[str, bool] = {}
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        self.finished_before: dict[str, str | None] = {}
        self.last_finished: str | None = None


def _record(model: nn.Module, modules: dict[str, nn.Module]) -> _Recording:
    """Record one seeded train-mode forward of `model` (see _Recording)."""
    names = {m: n for n, m in modules.items() if n}
    rec = _Recording()

    def pre(mod: nn.Module, inp: Any) -> None:
        name = names[mod]
        rec.calls.append(name)
        rec.inputs.setdefault(name, inp[0] if inp else None)
        if isinstance(mod, VarianceDropout):
            rec.finished_before.setdefault(name, rec.last_finished)

    def post(mod: nn.Module, inp: Any, out: Any) -> None:
        name = names[mod]
        rec.outputs.setdefault(name, out)
        rec.last_finished = name
        if isinstance(mod, VarianceDropout):
            # An all-zero input cannot show multiplicative noise: timm zero-initialises each block's last BN
            # (zero_init_last), whose output an after-site (post_bn) takes.
            rec.changed[name] = rec.changed.get(name, False) or not torch.equal(inp[0], out) or not inp[0].any()

    hooks = [m.register_forward_pre_hook(pre) for m in names]
    hooks += [m.register_forward_hook(post) for m in names]
    try:
        model.train()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model(torch.randn(4, 3, IMAGE, IMAGE))
    finally:
        for h in hooks:
            h.remove()
    return rec


def _carries_noise(model: nn.Module, modules: dict[str, nn.Module], site: str, x: torch.Tensor) -> list[str]:
    """Names of the modules called after dropout `site` whose input moves when (only) that dropout's output is
    perturbed, in call order: the layers its noise reaches. Eval mode: no other noise, BN on running statistics."""
    names = {m: n for n, m in modules.items() if n}

    def run(perturb: bool) -> tuple[list[str], dict[str, torch.Tensor]]:
        order: list[str] = []
        seen: dict[str, torch.Tensor] = {}

        def pre(mod: nn.Module, inp: Any) -> None:
            name = names[mod]
            if name not in seen and inp and isinstance(inp[0], torch.Tensor):
                order.append(name)
                seen[name] = inp[0].detach().clone()

        def bump(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            gen = torch.Generator().manual_seed(1)
            return out + torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)

        hooks = [m.register_forward_pre_hook(pre) for m in names]
        if perturb:
            hooks.append(modules[site].register_forward_hook(bump))
        try:
            model.eval()
            with torch.no_grad():
                model(x)
        finally:
            for h in hooks:
                h.remove()
        return order, seen

    order, clean = run(False)
    _, noisy = run(True)
    start = order.index(site) + 1 if site in order else len(order)
    return [n for n in order[start:] if n in noisy and noisy[n].shape == clean[n].shape
            and not torch.allclose(noisy[n], clean[n], rtol=1e-4, atol=1e-5)]


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]
