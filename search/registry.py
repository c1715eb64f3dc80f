"""One registry for every name a study uses: dropout kinds, placements, backbone families, spaces, datasets.

One shape, timm's: a decorator registers an object under a name with its metadata,
and every reader (TrialConfig validation, spaces, placement surgery, the theory, the
report) asks here instead of keeping its own list.

    @register_dropout("bernoulli")
    class BernoulliKind(DropoutKind): ...

    @register_placement("pre_bn", case="a", paper="Dropout-(a): dropout -> the last BN of each block")
    def pre_bn(model, make_dropout, *, input_size=None): ...

    register_backbone("cifar_wrn", default_depth=16, depth_rule="6n+4 ...", depth_ok=lambda d: ...)

    @register_space
    def wrn_widths() -> Space: ...

    @register_dataset("digits", classes=10, channels=1, flip=False, images=1_797)
    def digits(cfg): ...   # -> (x_train, y_train, x_test, y_test), uint8 images

This module imports no torch: the built-in entries live in torch-free modules
(torch is imported inside their functions), so `search.run --list/--dry-run`
validate names without loading torch or timm. Built-ins load on first lookup.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

__all__ = [
    "Entry", "RegistryError", "register", "unregister", "get", "names", "entries",
    "register_dropout", "register_placement", "register_backbone", "register_space",
    "register_dataset", "not_allowed", "did_you_mean", "CATEGORIES", "STRUCTURES", "set_owner", "identity_of",
]

CATEGORIES = ("dropout", "placement", "backbone", "space", "dataset", "layer_metric")
# Torch-free modules whose import registers the built-in entries, in dependency order
# (spaces read the kinds and placements while they register).
BUILTINS = ("search.trial.dropout.kinds", "search.trial.dropout.placements", "search.trial.models.families",
            "search.trial.datasets", "spaces")

T = TypeVar("T")


class RegistryError(ValueError):
    """A name registered twice, or a lookup of an unknown name (the message lists the allowed names)."""


@dataclass(frozen=True)
class Entry:
    """One registered thing.

    Attributes:
        category: 'dropout', 'placement', 'backbone', 'space', 'dataset' or 'layer_metric'
            (search.results.register_layer_metric).
        name: the name configs and spaces use.
        obj: the dropout kind class, the placement function, the backbone builder (or None
            for a timm-registered family) or the Space.
        meta: category-specific metadata (see the register_* functions).
        module: the module that registered it (a plugin's identity starts here).
    """

    category: str
    name: str
    obj: Any
    meta: dict[str, Any] = field(default_factory=dict)
    module: str = ""


_ENTRIES: dict[str, dict[str, Entry]] = {c: {} for c in CATEGORIES}
# (category, name) -> 'name:sha' of the plugin that registered it (search/plugins.py sets it): kept here, beside
# the entries, so TrialConfig reads a trial's plugin identities without importing the plugin machinery.
_OWNERS: dict[tuple[str, str], str] = {}
_loaded = False
_loading: set[int] = set()  # threads importing the built-ins now: their lookups while registering go through
_load_lock = threading.RLock()


def _load_builtins() -> None:
    # Another thread's first lookup (rebuild_parquet reads runs on 4 threads) waits for the import to finish
    # instead of seeing a half-filled registry ("field 'dataset' = 'digits' is not allowed (allowed: )").
    global _loaded
    if _loaded or threading.get_ident() in _loading:
        return
    with _load_lock:
        if _loaded:
            return
        _loading.add(threading.get_ident())
        try:
            for mod in BUILTINS:
                importlib.import_module(mod)
            _loaded = True
        finally:
            _loading.discard(threading.get_ident())


def did_you_mean(value: Any, allowed: Iterable[str], n: int = 1, cutoff: float = 0.6) -> str:
    """'; did you mean 'x'?' for the closest of `allowed` (n of them, comma-separated), or ''."""
    hint = difflib.get_close_matches(str(value), list(allowed), n=n, cutoff=cutoff)
    if not hint:
        return ""
    return f"; did you mean {hint[0]!r}?" if n == 1 else f"; did you mean {', '.join(hint)}?"


def not_allowed(what: str, value: Any, allowed: Iterable[str], where: str = "") -> RegistryError:
    """The one 'not allowed' error: names the field, the value, what is allowed and a close match."""
    allowed = list(allowed)
    return RegistryError(f"{what} = {value!r} is not allowed{where} (allowed: {', '.join(allowed)})"
                         f"{did_you_mean(value, allowed)}")


def register(category: str, name: str, obj: Any, *, module: str | None = None, **meta: Any) -> Entry:
    """Register `obj` under `name` in `category`.

    Raises:
        RegistryError: an unknown category, an empty name, or a name already registered there.
    """
    if category not in _ENTRIES:
        raise not_allowed("registry category", category, CATEGORIES)
    if not isinstance(name, str) or not name.isidentifier():
        raise RegistryError(f"{category} name {name!r} must be a Python identifier (letters, digits, _)")
    if name in _ENTRIES[category]:
        old = _ENTRIES[category][name]
        raise RegistryError(f"{category} {name!r} is registered twice (first by {old.module or '?'},"
                            f" again by {module or _caller_module()})")
    entry = Entry(category, name, obj, dict(meta), module or _caller_module())
    _ENTRIES[category][name] = entry
    return entry


def unregister(category: str, name: str) -> None:
    """Remove an entry (tests and plugin reloads); unknown names are ignored."""
    _ENTRIES.get(category, {}).pop(name, None)
    _OWNERS.pop((category, name), None)


def set_owner(category: str, name: str, identity: str | None) -> None:
    """Record (or, with None, forget) the plugin identity 'name:sha' that registered `name` in `category`."""
    if identity is None:
        _OWNERS.pop((category, name), None)
    else:
        _OWNERS[(category, name)] = identity


def identity_of(names: Iterable[tuple[str, str]]) -> str | None:
    """Sorted, comma-separated 'name:sha' of the plugins owning any of `names`; None if none does.

    Args:
        names: (category, name) pairs a trial uses, e.g. ("dropout", cfg.dropout_type).
    """
    return ",".join(sorted({_OWNERS[k] for k in names if k in _OWNERS})) or None


def get(category: str, name: str, *, field_name: str | None = None) -> Entry:
    """The entry `name` of `category`.

    Args:
        field_name: the config field to name in the error (default: the category).

    Raises:
        RegistryError: unknown name; the message lists the allowed names and a close match.
    """
    _load_builtins()
    try:
        return _ENTRIES[category][name]
    except KeyError:
        what = f"field {field_name!r}" if field_name else category
        raise not_allowed(what, name, names(category)) from None


def names(category: str, pattern: str = "*") -> tuple[str, ...]:
    """Registered names of `category` matching a shell-style pattern, in registration order."""
    _load_builtins()
    return tuple(n for n in _ENTRIES[category] if fnmatch.fnmatchcase(n, pattern))


def entries(category: str) -> tuple[Entry, ...]:
    """Every entry of `category`, in registration order."""
    _load_builtins()
    return tuple(_ENTRIES[category].values())


def _caller_module() -> str:
    for frame in inspect.stack()[2:]:
        mod = frame.frame.f_globals.get("__name__", "")
        if mod != __name__:
            return mod
    return ""


# ------------------------------------------------------------------ the decorators users see
STRUCTURES = ("element", "channel", "sample")  # what one independent mask of a dropout kind covers


def register_dropout(name: str, **meta: Any) -> Callable[[type[T]], type[T]]:
    """Class decorator: a dropout kind, built by `make_dropout(name, rate)`.

    The class is a `search.DropoutKind` (torch-free: it says how to draw the noise and
    which closed form applies), a `search.VarianceDropout` nn.Module subclass, or any
    nn.Module whose first constructor argument is the drop rate (timm's `DropBlock2d`,
    torch's `nn.Dropout2d`): `make_dropout` wraps it so the probes and contracts find it.
    Metadata (keyword or class attribute of the same name):

    - closed_form: the theory that applies ('elementwise': i.i.d. multiplicative noise of
      mean 1, whose variance `noise_var(rate)` the theory uses; 'case_a': shared masks whose
      one-element variance is `noise_var(rate)`, used for dropout -> BN only; None: no closed
      form, the report shows measurements only).
    - structure: what one independent mask covers, 'element', 'channel' (one per sample and
      channel) or 'sample' (one per sample, or masks correlated within a sample); the
      contract's standard errors count these units. Default 'element' with an element-wise
      closed form, else 'sample' (the least any dropout promises: samples are independent).
    - block_size: the default of the kind's `block_size` setting (TrialConfig.dropout_block_size),
      read from the constructor's `block_size` keyword when not given; None: it takes none.
    - needs_map: True if it runs on (N, C, H, W) feature maps only (DropBlock), not before a classifier.
    """

    def deco(cls: type[T]) -> type[T]:
        if hasattr(cls, "kind"):  # ours; a foreign nn.Module class is left untouched
            cls.kind = name  # type: ignore[attr-defined]
        closed = meta.pop("closed_form", getattr(cls, "closed_form", None))
        structure = meta.pop("structure", getattr(cls, "structure", None)) or (
            "element" if closed == "elementwise" else "sample")
        if structure not in STRUCTURES:
            raise not_allowed(f"dropout {name!r} structure", structure, STRUCTURES)
        block = meta.pop("block_size", _keyword_default(cls, "block_size"))
        register("dropout", name, cls, module=cls.__module__, closed_form=closed, structure=structure,
                 block_size=block, needs_map=bool(meta.pop("needs_map", getattr(cls, "needs_map", False))), **meta)
        return cls

    return deco


def _keyword_default(cls: type, arg: str) -> Any:
    """The default of `arg` in cls's constructor (None when it has no such argument or no default)."""
    try:
        param = inspect.signature(cls).parameters.get(arg)
    except (TypeError, ValueError):  # a builtin or C-level constructor
        return None
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def register_placement(name: str, *, case: str | None = None, paper: str = "", feeds_bn: bool = True,
                       on_map: bool = True) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Function decorator: a placement, `fn(model, make_dropout, *, input_size=None) -> list[PlacementSite]`.

    `make_dropout()` returns a fresh dropout module each call; the function inserts it
    into `model` in place and returns one PlacementSite per inserted module.

    Args:
        case: which closed form applies to the BN its noise reaches: 'a' (dropout -> BN),
            'b' (dropout -> weight layer -> BN) or None (feeds no BN, e.g. before the head).
        paper: the paper case it corresponds to, in words (report and docs).
        feeds_bn: False if no BN ever sees its noise (then it needs no BatchNorm in the model).
        on_map: False if its dropout sees vectors (N, C), not feature maps (before a classifier):
            kinds registered with needs_map (DropBlock) are refused there.
    """
    if case not in ("a", "b", None):
        raise not_allowed(f"placement {name!r} case", case, ["a", "b", "None"])

    def deco(fn: Callable[..., T]) -> Callable[..., T]:
        register("placement", name, fn, module=fn.__module__, case=case, paper=paper, feeds_bn=feeds_bn,
                 on_map=on_map)
        return fn

    return deco


def register_backbone(name: str, builder: Callable[..., Any] | None = None, *, default_depth: int | None = None,
                      depth_rule: str = "", depth_ok: Callable[[int], bool] | None = None,
                      blocks: dict[str, tuple[str, ...]] | None = None, timm_model: bool = False,
                      **meta: Any) -> Any:
    """Register a backbone family; usable as a call or as a decorator on its builder.

    Args:
        builder: `builder(*, depth, width, num_classes, in_chans) -> nn.Module` (None with
            timm_model=True: built by `timm.create_model(name, ...)`).
        default_depth: the depth used when a config leaves depth unset; None: the family
            takes no depth.
        depth_rule: the allowed depths in words (error messages).
        depth_ok: predicate of an allowed depth.
        blocks: block classes placement surgery works on, as 'module:Class' -> names of
            the block's children that are off its main branch (shortcuts, SE).
        timm_model: the family is a model in timm's registry (ours register themselves there).
    """
    def deco(fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
        register("backbone", name, fn, module=getattr(fn, "__module__", None) or _caller_module(),
                 default_depth=default_depth, depth_rule=depth_rule, depth_ok=depth_ok,
                 blocks=dict(blocks or {}), timm_model=timm_model, **meta)
        return fn

    if builder is not None or timm_model:
        deco(builder)
        return builder
    return deco


def register_dataset(name: str, reader: Callable[..., Any] | None = None, *, classes: int | None, channels: int,
                     flip: bool, images: int | Callable[[Any], int] | None = None, any_classes: bool = False,
                     check: Callable[[str | None], None] | None = None,
                     identity: Callable[[Any], tuple] | None = None, streams: bool = False) -> Any:
    """Register a dataset; usable as a call or as a decorator on its reader (torch inside the reader only).

    Args:
        reader: `reader(cfg) -> (x_train, y_train, x_test, y_test)`: uint8 [N, C, H, W] images and int64 [N]
            labels at the files' own size and channels; search/trial/data.py resizes them to `image_size`,
            converts channels to `in_chans`, takes the `train_samples` subset and keeps them on the device.
            With streams=True (imagefolder), `reader(cfg, device)` serves batches itself (data._imagefolder).
        classes: its number of classes; None: known only once loaded (set num_classes to build a model first).
        channels: its images' channels (1 or 3; `in_chans` converts by repetition or luma).
        flip: a mirrored image is still one of its class (augmentation draws random flips).
        images: train + test images held on the device (`--gpus-per-trial auto`'s memory estimate), or
            `images(cfg)`; None: nothing resident.
        any_classes: it makes as many classes as `num_classes` asks (synthetic).
        check: `check(data_dir)` reads every file once and raises as loading would (DatasetNotFoundError,
            CorruptDatasetError); preflight runs it before a sweep writes anything. None: no files.
        identity: `identity(cfg) -> tuple`: what else fixes the loaded tensors (files' sizes and mtimes), so the
            resident cache reads a changed file again.
    """
    if classes is not None and (not isinstance(classes, int) or classes < 1):
        raise not_allowed(f"dataset {name!r} classes", classes, ["an integer >= 1", "None"])
    if channels not in (1, 3):
        raise not_allowed(f"dataset {name!r} channels", channels, ["1", "3"])

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        register("dataset", name, fn, module=getattr(fn, "__module__", None) or _caller_module(),
                 classes=classes, channels=channels, flip=bool(flip), images=images, any_classes=any_classes,
                 check=check, identity=identity, streams=streams)
        return fn

    if reader is not None:
        return deco(reader)
    return deco


def register_space(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Function decorator: register the Space that `fn()` returns under `fn.__name__`.

    Raises:
        RegistryError: the function's name differs from the space's, or it is registered twice.
    """
    space = fn()
    if getattr(space, "name", None) != fn.__name__:
        raise RegistryError(f"space function {fn.__name__!r} returns a space named "
                            f"{getattr(space, 'name', None)!r}; use one name")
    register("space", space.name, space, module=fn.__module__)
    return fn
