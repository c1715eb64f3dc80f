"""Placement surgery: the torch code that inserts dropout modules into a built model.

The placements themselves are registered functions (search/trial/dropout/placements.py);
they call the helpers here. A *block* is a module whose class a backbone family lists
in the registry (`register_backbone(..., blocks={'module:Class': skipped children})`).
Inside a block, "last BN" and "last conv" are found by execution order (forward
pre-hooks on one dummy forward), ignoring the block's shortcut children, so no family
needs special-case code. A before-site replaces the target module `t` at path P by
nn.Sequential(dropout, t): the dropout lives at `P.0`, the target at `P.1`. An after-site
replaces the module `m` whose output the dropout takes by nn.Sequential(m, dropout): `m` at
`P.0`, the dropout at `P.1`. Both are plain modules: state_dict keys move by one predictable
level, FX and TorchScript see them, and the probes' hooks find the dropout. See docs/placement.md.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from search import registry
from search.trial.dropout.module import make_dropout
from search.trial.dropout.site import PlacementSite

__all__ = ["PlacementSite", "apply_placement", "per_block", "per_block_after", "wrap_classifier", "wrap_before",
           "wrap_after", "wrap_pool", "block_types", "trace_calls", "classifier_path"]

_TRACED = (nn.Conv2d, _BatchNorm, nn.Linear)


def block_types() -> dict[type, tuple[str, ...]]:
    """Block classes of every registered backbone family -> names of their skipped children.

    A class is resolved only if its module is already imported (a timm block class is
    needed only when a timm model of that kind was built, which imported it).
    """
    out: dict[type, tuple[str, ...]] = {}
    for entry in registry.entries("backbone"):
        for ref, skip in entry.meta.get("blocks", {}).items():
            mod_name, _, cls_name = ref.partition(":")
            mod = sys.modules.get(mod_name)
            if mod is not None and hasattr(mod, cls_name):
                out.setdefault(getattr(mod, cls_name), tuple(skip))
    return out


def apply_placement(model: nn.Module, placement: str, kind: str, rate: float, *,
                    input_size: tuple[int, int, int] | None = None,
                    block_size: int | None = None) -> list[PlacementSite]:
    """Insert dropout of `kind` and drop `rate` into `model` in place at the registered `placement`.

    Args:
        model: a built model (timm or ours); modified in place.
        placement: a registered placement (search.registry.names("placement")).
        kind: a registered dropout kind (search.registry.names("dropout")).
        rate: drop rate; 0 still inserts (identity) modules.
        input_size: (C, H, W) of the dummy input used to trace execution order;
            default (in_chans, 32, 32), then the model's pretrained_cfg input size.
        block_size: the kind's block size (TrialConfig.dropout_block_size); None: its default.

    Returns:
        One PlacementSite per inserted module, in block order; [] for 'none'.

    Raises:
        ValueError: unknown placement, kind or rate; a feature-map kind at a placement on vectors; a placement
            that feeds BN on a model without BatchNorm or without a registered block type; no classifier for head.
    """
    entry = registry.get("placement", placement, field_name="dropout_placement")
    make_dropout(kind, rate, block_size=block_size)  # validates kind, rate and block size before any surgery
    if registry.get("dropout", kind).meta.get("needs_map") and not entry.meta.get("on_map", True):
        raise ValueError(f"field 'dropout_type' = {kind!r} needs (N, C, H, W) feature maps, but placement"
                         f" {placement!r} feeds it vectors (TrialConfig refuses this pair too)")
    return list(entry.obj(model, lambda: make_dropout(kind, rate, block_size=block_size), input_size=input_size))


def wrap_classifier(model: nn.Module, make: Callable[[], nn.Module]) -> list[PlacementSite]:
    """One dropout right before the final classifier (after every BN)."""
    path = classifier_path(model)
    _wrap(model, path, make())
    return [PlacementSite(0, "", f"{path}.0", f"{path}.1", None, None)]


def wrap_before(model: nn.Module, path: str, make: Callable[[], nn.Module], index: int = 0, block: str = "",
                feeds_bn: str | None = None, fan_in: int | None = None) -> PlacementSite:
    """Insert one dropout right before the module at `path`; returns its site (paths after surgery)."""
    _wrap(model, path, make())
    if feeds_bn == path:  # the target BN itself moved one level down
        feeds_bn = f"{path}.1"
    return PlacementSite(index, block, f"{path}.0", f"{path}.1", feeds_bn, fan_in)


def per_block(model: nn.Module, make: Callable[[], nn.Module], *, target: str, placement: str,
              input_size: tuple[int, int, int] | None = None) -> list[PlacementSite]:
    """One dropout per block, right before the block's last BatchNorm (target='bn') or last conv ('conv').

    Raises:
        ValueError: the model has no BatchNorm, none of the registered block types, or a
            block runs no module of the target type.
    """
    modules, calls, blocks = _block_calls(model, placement, input_size)
    want = _BatchNorm if target == "bn" else nn.Conv2d
    plan = []  # (block, target, feeds_bn, fan_in, first call index)
    for bpath, main, _, _ in blocks:
        pos, tpath = _last_of(main, modules, want, placement, bpath, model)
        if target == "bn":
            feeds, fan_in = tpath, None
        else:
            feeds = next((n for n in calls[pos + 1:] if isinstance(modules[n], _BatchNorm)), None)
            fan_in = _fan_in(modules[tpath])
        plan.append((bpath, tpath, feeds, fan_in, main[0][0]))
    plan.sort(key=lambda p: p[4])
    return [wrap_before(model, tpath, make, index, bpath, feeds, fan_in)
            for index, (bpath, tpath, feeds, fan_in, _) in enumerate(plan)]


def per_block_after(model: nn.Module, make: Callable[[], nn.Module], *, after: str, placement: str,
                    input_size: tuple[int, int, int] | None = None) -> list[PlacementSite]:
    """One dropout per block on the output of the block's last conv (after='conv'), its last BatchNorm ('bn'),
    or the whole block, i.e. after the residual add ('block'); main branch and execution order as `per_block`.

    Each site's `target`, `feeds_bn` and `fan_in` are read off the same trace: the first conv/BN/Linear
    called after the dropout, the first BN called after it, and the last weight layer called between them,
    passing over the block's own shortcut (in post-activation blocks it runs after the branch but reads the
    block's input, not the dropout's output).

    Raises:
        ValueError: the model has no BatchNorm, none of the registered block types, or a block runs no
            module of the wanted type.
    """
    modules, calls, blocks = _block_calls(model, placement, input_size)
    plan = []  # (first call index, block, module taken from, index of its last call, shortcut paths)
    for bpath, main, every, skipped in blocks:
        if after == "block":
            plan.append((main[0][0], bpath, bpath, every[-1][0], ()))
            continue
        pos, apath = _last_of(main, modules, _BatchNorm if after == "bn" else nn.Conv2d, placement, bpath, model)
        plan.append((main[0][0], bpath, apath, pos, skipped))
    plan.sort(key=lambda p: p[0])
    # Resolve paths through the module objects: wrapping one module renames everything inside it.
    resolved = [(modules[bpath], modules[apath], _downstream(calls, modules, end, off))
                for _, bpath, apath, end, off in plan]
    for _, module, _ in resolved:
        _wrap_after(model, _path_of(model, module), make())
    names = {m: n for n, m in model.named_modules()}
    return [_after_site(names, index, names[block], module, down)
            for index, (block, module, down) in enumerate(resolved)]


def wrap_after(model: nn.Module, path: str, make: Callable[[], nn.Module], index: int = 0, block: str = "", *,
               input_size: tuple[int, int, int] | None = None) -> PlacementSite:
    """Insert one dropout on the output of the module at `path` (nn.Sequential(module, dropout)).

    `target`, `feeds_bn` and `fan_in` come from one traced forward (as `per_block_after`, but with no block
    shortcut to pass over: a layer called later that reads another tensor would be named anyway, which
    `search.contracts.check_placement` catches); paths are the names after surgery (the module moves to
    `path.0`, the dropout is `path.1`).

    Raises:
        ValueError: `path` names no module of the model, or one that a forward never calls.
    """
    modules = dict(model.named_modules())
    if path not in modules or not path:
        raise ValueError(f"argument 'path' = {path!r} is not a module of {_model_name(model)!r} (wrap_after)")
    calls = _trace(model, input_size, also=(modules[path],))
    inside = [i for i, n in enumerate(calls) if n == path or n.startswith(path + ".")]
    if not inside:
        raise ValueError(f"argument 'path' = {path!r}: a forward of {_model_name(model)!r} never calls it (wrap_after)")
    down = _downstream(calls, modules, inside[-1])
    held = modules[block] if block else None
    _wrap_after(model, path, make())
    names = {m: n for n, m in model.named_modules()}
    return _after_site(names, index, names[held] if held is not None else "", modules[path], down)


def wrap_pool(model: nn.Module, make: Callable[[], nn.Module], *, placement: str = "pre_pool",
              input_size: tuple[int, int, int] | None = None) -> list[PlacementSite]:
    """One dropout on the final feature map, right before the model's global pooling module: timm's
    `global_pool` (the CIFAR families' and timm's ResNet/DenseNet; `head.global_pool` in ConvNeXt's head).
    `feeds_bn` is the first BN called after the pooling (None in every built-in family: all BN layers run
    before it).

    Raises:
        ValueError: the model has no global_pool module, or several (a ViT's `global_pool` is a string).
    """
    pools = [n for n, m in model.named_modules() if n.rpartition(".")[2] == "global_pool"]
    if len(pools) != 1:
        found = f"several ({', '.join(pools)})" if pools else "no"
        raise ValueError(f"field 'dropout_placement' = {placement!r}: backbone {_model_name(model)!r} has {found}"
                         " global_pool module before its classifier (allowed for it: head, none)")
    (path,) = pools
    modules = dict(model.named_modules())
    calls = _trace(model, input_size, also=(modules[path],))
    if path not in calls:
        raise ValueError(f"field 'dropout_placement' = {placement!r}: a forward of {_model_name(model)!r} never calls"
                         f" {path!r} (allowed for it: head, none)")
    down = _downstream(calls, modules, calls.index(path))
    site = wrap_before(model, path, make)
    names = {m: n for n, m in model.named_modules()}
    feeds = names[down[1]] if down[1] is not None else None
    return [PlacementSite(0, "", site.module, site.target, feeds, down[2] if feeds else None)]


def trace_calls(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> list[str]:
    """Names of conv, BatchNorm and Linear modules in the order one forward calls them.

    Runs one forward in eval mode without gradients, first on the meta device
    (shapes only: free even for big models), then for real on zeros if the model
    cannot run on meta tensors. Running statistics, the random state and every
    module's training flag are left as they were.
    """
    return _trace(model, input_size)


def _trace(model: nn.Module, input_size: tuple[int, int, int] | None = None,
           also: tuple[nn.Module, ...] = ()) -> list[str]:
    """`trace_calls`, also recording the modules in `also` (each as one call, where its forward starts)."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, _TRACED) or any(m is a for a in also)}
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


def _wrap_after(model: nn.Module, path: str, dropout: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, nn.Sequential(getattr(parent, child), dropout))


def _path_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _fan_in(layer: nn.Module) -> int:
    """d = in_channels/groups * kernel size (in_features for Linear): the paper's d of a weight layer."""
    if isinstance(layer, nn.Linear):
        return int(layer.in_features)
    w = layer.weight
    return int(w.shape[1] * w[0, 0].numel())


def _downstream(calls: list[str], modules: dict[str, nn.Module], end: int, off: tuple[str, ...] = ()
                ) -> tuple[nn.Module | None, nn.Module | None, int | None]:
    """After call `end`: the first conv/BN/Linear called, the first BN called, and the fan-in of the last
    weight layer called between the two (None if none is). Calls under the paths `off` (the block's
    shortcut, which reads the block's input, not the branch's output) are passed over."""
    rest = [modules[n] for n in calls[end + 1:] if isinstance(modules[n], _TRACED)
            and not any(n == o or n.startswith(o + ".") for o in off)]
    first = rest[0] if rest else None
    at = next((i for i, m in enumerate(rest) if isinstance(m, _BatchNorm)), None)
    if at is None:
        return first, None, None
    weights = [m for m in rest[:at] if isinstance(m, (nn.Conv2d, nn.Linear))]
    return first, rest[at], _fan_in(weights[-1]) if weights else None


def _after_site(names: dict[nn.Module, str], index: int, block: str, module: nn.Module,
                down: tuple[nn.Module | None, nn.Module | None, int | None]) -> PlacementSite:
    """The site of the dropout wrapped after `module` (now at P.0, the dropout at P.1), paths after surgery."""
    wrapper = names[module].rpartition(".")[0]
    first, bn, fan_in = down
    return PlacementSite(index, block, f"{wrapper}.1", names[first] if first is not None else "",
                         names[bn] if bn is not None else None, fan_in, after=f"{wrapper}.0")


def _block_calls(model: nn.Module, placement: str, input_size: tuple[int, int, int] | None
                 ) -> tuple[dict[str, nn.Module], list[str], list[tuple[str, list, list, tuple[str, ...]]]]:
    """The model's modules, its traced calls, and per executed block (path, its main-branch calls, all its
    calls, the paths of its skipped children), calls as (index, name).

    Raises:
        ValueError: no BatchNorm in the model, or none of the registered block types.
    """
    name = _model_name(model)
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        allowed = ", ".join(e.name for e in registry.entries("placement") if not e.meta.get("feeds_bn", True))
        raise ValueError(
            f"field 'dropout_placement' = {placement!r} needs BatchNorm layers, but backbone {name!r} has no"
            f" BatchNorm (allowed for it: {allowed})")
    types = block_types()
    blocks = _outermost_blocks(model, tuple(types))
    if not blocks:
        known = ", ".join(sorted(f"{t.__module__}.{t.__qualname__}" for t in types))
        raise ValueError(
            f"field 'dropout_placement' = {placement!r}: backbone {name!r} has none of the registered block types"
            f" ({known}); use 'head' or 'none', or list its block class in its family's"
            " register_backbone(..., blocks=...)")
    modules = dict(model.named_modules())
    calls = trace_calls(model, input_size)
    out = []
    for bpath, block in blocks:
        prefix = bpath + "."
        skipped = tuple(f"{prefix}{s}" for s in types[_block_type(block, types)])
        every = [(i, n) for i, n in enumerate(calls) if n.startswith(prefix)]
        main = [(i, n) for i, n in every if not any(n == s or n.startswith(s + ".") for s in skipped)]
        if main:  # a block never executed is left out: no noise would reach anything
            out.append((bpath, main, every, skipped))
    return modules, calls, out


def _last_of(main: list[tuple[int, str]], modules: dict[str, nn.Module], want: type, placement: str, bpath: str,
             model: nn.Module) -> tuple[int, str]:
    """(call index, path) of the last module of type `want` in a block's main branch."""
    picks = [(i, n) for i, n in main if isinstance(modules[n], want)]
    if not picks:
        what = "BatchNorm" if want is _BatchNorm else "conv"
        raise ValueError(f"field 'dropout_placement' = {placement!r}: block {bpath!r} of {_model_name(model)!r}"
                         f" runs no {what}")
    return picks[-1]


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
