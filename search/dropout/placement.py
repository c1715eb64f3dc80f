"""Placement surgery: insert dropout modules into a built model at the paper's positions.

Placements (PAPER.md, "Placements in the paper"):
    none      nothing inserted
    pre_bn    Dropout-(a): dropout -> the last BatchNorm of each block
    pre_conv  Dropout-(b): dropout -> the last conv of each block (-> ... -> next BN)
    head      one dropout after all BN layers, right before the classifier

A *block* is a module whose class is registered with `register_block` (our CIFAR
blocks register themselves; timm's ResNet BasicBlock/Bottleneck and DenseNet
DenseLayer are known). Inside a block, "last BN" and "last conv" are found by
execution order (forward pre-hooks on one dummy forward), ignoring the block's
shortcut children, so no family needs special-case code. Insertion replaces the
target module `t` at path P by nn.Sequential(dropout, t): the dropout lives at
`P.0`, the target at `P.1`. See docs/placement.md.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..config import PLACEMENTS

from .kinds import make_dropout

__all__ = ["PlacementSite", "apply_placement", "register_block", "block_types", "trace_calls", "classifier_path"]

T = TypeVar("T", bound=type)

# Block class -> names of its children that are off the main (residual) branch.
_BLOCKS: dict[type, tuple[str, ...]] = {}
# timm classes, resolved only if timm already imported them (no timm model otherwise).
_TIMM_BLOCKS = (
    ("timm.models.resnet", "BasicBlock", ("downsample", "se")),
    ("timm.models.resnet", "Bottleneck", ("downsample", "se")),
    ("timm.models.densenet", "DenseLayer", ()),
)
_TRACED = (nn.Conv2d, _BatchNorm, nn.Linear)


@dataclass(frozen=True)
class PlacementSite:
    """One inserted dropout module. Paths are module names in the model after surgery.

    Attributes:
        index: block order (execution order), from 0; 0 for head.
        block: path of the block, '' for head.
        module: path of the inserted dropout module.
        target: path of the module it runs right before.
        feeds_bn: path of the BatchNorm its noise reaches first (None for head).
        fan_in: d = in_channels*kh*kw/groups of the conv between dropout and BN (pre_conv only).
    """

    index: int
    block: str
    module: str
    target: str
    feeds_bn: str | None
    fan_in: int | None


def register_block(cls: T | None = None, *, skip: Iterable[str] = ("downsample", "shortcut")) -> T | Callable[[T], T]:
    """Mark a module class as a placement block; usable bare or as `@register_block(skip=(...))`.

    Args:
        cls: the block class.
        skip: names of the block's children that are not on its main branch (shortcuts,
            squeeze-excitation); their BN/conv layers are never placement targets.
    """

    def deco(c: T) -> T:
        _BLOCKS[c] = tuple(skip)
        return c

    return deco(cls) if cls is not None else deco


def block_types() -> dict[type, tuple[str, ...]]:
    """Registered block classes (including timm's, when timm is loaded) -> skipped child names."""
    out = dict(_BLOCKS)
    for mod_name, cls_name, skip in _TIMM_BLOCKS:
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, cls_name):
            out.setdefault(getattr(mod, cls_name), skip)
    return out


def apply_placement(model: nn.Module, placement: str, kind: str, rate: float, *,
                    input_size: tuple[int, int, int] | None = None) -> list[PlacementSite]:
    """Insert dropout of `kind` and drop `rate` into `model` in place at `placement`.

    Args:
        model: a built model (timm or ours); modified in place.
        placement: one of search.config.PLACEMENTS.
        kind: a registered dropout kind (search.dropout.list_dropout_kinds()).
        rate: drop rate in [0, 1); 0 still inserts (identity) modules.
        input_size: (C, H, W) of the dummy input used to trace execution order;
            default (in_chans, 32, 32), then the model's pretrained_cfg input size.

    Returns:
        One PlacementSite per inserted module, in block order; [] for 'none'.

    Raises:
        ValueError: unknown placement, kind or rate; pre_bn/pre_conv on a model
            without BatchNorm or without a registered block type; no classifier for head.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"field 'dropout_placement' = {placement!r} is not allowed (allowed: {', '.join(PLACEMENTS)})")
    make_dropout(kind, rate)  # validates kind and rate before any surgery
    if placement == "none":
        return []
    if placement == "head":
        path = classifier_path(model)
        _wrap(model, path, make_dropout(kind, rate))
        return [PlacementSite(0, "", f"{path}.0", f"{path}.1", None, None)]

    name = _model_name(model)
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        raise ValueError(
            f"field 'dropout_placement' = {placement!r} needs BatchNorm layers, but backbone {name!r} has no"
            " BatchNorm (allowed for it: none, head)")
    types = block_types()
    blocks = _outermost_blocks(model, tuple(types))
    if not blocks:
        known = ", ".join(sorted(f"{t.__module__}.{t.__qualname__}" for t in types))
        raise ValueError(
            f"field 'dropout_placement' = {placement!r}: backbone {name!r} has none of the registered block types"
            f" ({known}); use 'head' or 'none', or register its block class with"
            " search.dropout.placement.register_block")
    modules = dict(model.named_modules())
    calls = trace_calls(model, input_size)
    plan = []  # (block, target, feeds_bn, fan_in, first call index)
    for bpath, block in blocks:
        prefix = bpath + "."
        skipped = tuple(f"{prefix}{s}" for s in types[_block_type(block, types)])
        main = [(i, n) for i, n in enumerate(calls)
                if n.startswith(prefix) and not any(n == s or n.startswith(s + ".") for s in skipped)]
        if not main:
            continue  # never executed: no noise would reach anything
        want = _BatchNorm if placement == "pre_bn" else nn.Conv2d
        picks = [(i, n) for i, n in main if isinstance(modules[n], want)]
        if not picks:
            what = "BatchNorm" if placement == "pre_bn" else "conv"
            raise ValueError(f"field 'dropout_placement' = {placement!r}: block {bpath!r} of {name!r} runs no {what}")
        pos, target = picks[-1]
        if placement == "pre_bn":
            feeds, fan_in = target, None
        else:
            feeds = next((n for n in calls[pos + 1:] if isinstance(modules[n], _BatchNorm)), None)
            w = modules[target].weight
            fan_in = int(w.shape[1] * w.shape[2] * w.shape[3])  # in_channels/groups * kh * kw
        plan.append((bpath, target, feeds, fan_in, main[0][0]))

    plan.sort(key=lambda p: p[4])
    sites = []
    for index, (bpath, target, feeds, fan_in, _) in enumerate(plan):
        _wrap(model, target, make_dropout(kind, rate))
        if feeds == target:  # pre_bn: the BN itself moved one level down
            feeds = f"{target}.1"
        sites.append(PlacementSite(index, bpath, f"{target}.0", f"{target}.1", feeds, fan_in))
    return sites


def trace_calls(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> list[str]:
    """Names of conv, BatchNorm and Linear modules in the order one forward calls them.

    Runs one forward in eval mode without gradients, first on the meta device
    (shapes only: free even for big models), then for real on zeros if the model
    cannot run on meta tensors. Running statistics, the random state and every
    module's training flag are left as they were.
    """
    names = {m: n for n, m in model.named_modules() if isinstance(m, _TRACED)}
    calls: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _inp: calls.append(names[mod])) for m in names]
    modes = {m: m.training for m in model.modules()}  # restored one by one: some may be frozen in eval
    errors = []
    try:
        model.eval()
        for meta in (True, False):
            for size in _candidate_sizes(model, input_size):
                calls.clear()
                try:
                    with torch.no_grad():
                        _dummy_forward(model, size, meta)
                    return list(calls)
                except Exception as e:  # noqa: BLE001 - wrong size, or an op without a meta kernel
                    errors.append(f"{tuple(size)}{' on meta' if meta else ''}: {type(e).__name__}: {e}")
        raise RuntimeError(f"could not trace {_model_name(model)!r} with a dummy input: " + "; ".join(errors))
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode


def _dummy_forward(model: nn.Module, size: tuple[int, ...], meta: bool) -> None:
    if meta:
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(model.named_buffers(remove_duplicate=False))
        state = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
        torch.func.functional_call(model, state, (torch.zeros(1, *size, device="meta"),))
        return
    param = next(model.parameters(), None)
    floating = param is not None and param.is_floating_point()
    model(torch.zeros(1, *size, device=param.device if param is not None else None,
                      dtype=param.dtype if floating else None))


def classifier_path(model: nn.Module) -> str:
    """Module path of the final classifier: timm's pretrained_cfg['classifier'], else
    get_classifier(), else the last nn.Linear.

    Raises:
        ValueError: no classifier found (e.g. num_classes=0).
    """
    modules = dict(model.named_modules())
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(name, str) and name in modules and not isinstance(modules[name], nn.Identity):
        return name
    if hasattr(model, "get_classifier"):
        clf = model.get_classifier()
        for n, m in modules.items():
            if m is clf and n and not isinstance(m, nn.Identity):
                return n
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    raise ValueError(f"field 'dropout_placement' = 'head': backbone {_model_name(model)!r} has no classifier"
                     " (is num_classes 0?)")


# ----------------------------------------------------------------------- helpers
def _wrap(model: nn.Module, path: str, dropout: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, nn.Sequential(dropout, getattr(parent, child)))


def _outermost_blocks(model: nn.Module, types: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for n, m in model.named_modules():
        if isinstance(m, types) and not any(n.startswith(p + ".") for p, _ in found):
            found.append((n, m))
    return found


def _block_type(block: nn.Module, types: dict[type, tuple[str, ...]]) -> type:
    return next(t for t in type(block).__mro__ if t in types)


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return type(model).__name__


def _candidate_sizes(model: nn.Module, input_size: tuple[int, int, int] | None) -> list[tuple[int, ...]]:
    if input_size is not None:
        return [tuple(input_size)]
    chans = getattr(model, "in_chans", None)
    if not isinstance(chans, int):
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        chans = conv.in_channels if conv is not None else 3
    sizes = [(chans, 32, 32)]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size and len(size) == 3 and tuple(size[1:]) != (32, 32):
        sizes.append((chans, *size[1:]))
    return sizes
