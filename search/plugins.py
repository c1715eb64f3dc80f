"""Plugins: a researcher's own dropout kinds, placements, backbones and spaces, loaded by `--plugin`.

A plugin is a Python file (`--plugin ./my_plugin.py`) or an importable module
(`--plugin mylab.dropblock`) that registers names through the public API
(`search.register_dropout`, `search.register_placement`, `search.register_backbone`,
`spaces.register_space`). Loading it:

- imports it once (the built-ins are registered first, so a plugin cannot shadow them:
  a name registered twice is an error naming both modules);
- records its identity, `name:sha` (16 hex chars of SHA-256 over its source), which enters
  the configuration hash of every trial that uses one of its names (TrialConfig.plugins),
  so an edited plugin never reuses the old plugin's results;
- optionally runs the contract of every dropout kind and backbone it registered
  (search/contracts.py), so a broken kind fails before a sweep starts;
- exports itself to Ray workers through the runtime environment (`runtime_env()`): the
  source of a single-file plugin travels inside an environment variable and is imported
  by `setup_worker` (Ray's `worker_process_setup_hook`) in every worker process, on one
  machine or on a cluster; a package plugin travels as a Ray `py_modules` entry.

Every failure is one line (PluginError, a ValueError): a file that does not exist, a
module that does not import (the file and the error's first line), a name registered
twice, a kind failing its contract. This module imports no torch.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from search import registry

__all__ = ["Plugin", "PluginError", "load_plugin", "load_plugins", "loaded", "owner", "identity_of",
           "runtime_env", "setup_worker", "raise_worker_error", "split_space", "load_cli_plugins", "unload", "ENV_VAR"]

ENV_VAR = "DBN_PLUGINS"  # JSON list the driver exports to Ray workers (see runtime_env)
HASH_CHARS = 16


class PluginError(ValueError):
    """A plugin that cannot be used; the message is one line naming the plugin and the cause."""


@dataclass(frozen=True)
class Plugin:
    """One loaded plugin.

    Attributes:
        name: its module name (a file's stem, or the dotted module name).
        spec: what was asked for (an absolute file path, or the module name).
        path: its source file (a package: its folder).
        sha: 16 hex chars of SHA-256 over its source.
        registered: the (category, name) pairs it registered, in order.
        source: the source text of a single-file plugin (what workers execute); '' for a package.
    """

    name: str
    spec: str
    path: str
    sha: str
    registered: tuple[tuple[str, str], ...]
    source: str = ""

    @property
    def identity(self) -> str:
        """'name:sha', the string that enters the configuration hash."""
        return f"{self.name}:{self.sha}"


_LOADED: dict[str, Plugin] = {}  # module name -> plugin
_OWNER: dict[tuple[str, str], str] = {}  # (category, name) -> plugin module name


def loaded() -> tuple[Plugin, ...]:
    """The plugins loaded in this process, in load order."""
    return tuple(_LOADED.values())


def owner(category: str, name: str) -> Plugin | None:
    """The plugin that registered `name` in `category` (None for a built-in or unknown name)."""
    mod = _OWNER.get((category, name))
    return _LOADED.get(mod) if mod else None


def identity_of(names: Iterable[tuple[str, str]]) -> str | None:
    """Sorted, comma-separated 'name:sha' of the plugins owning any of `names`; None if none does.

    Args:
        names: (category, name) pairs a trial uses, e.g. ("dropout", cfg.dropout_type).
    """
    return registry.identity_of(names)


def split_space(value: str) -> tuple[str | None, str]:
    """`--space FILE.py:NAME` -> (FILE.py, NAME); a plain name -> (None, name)."""
    path, sep, name = value.rpartition(":")
    if sep and path.endswith(".py"):
        return path, name
    return None, value


# --------------------------------------------------------------------- loading
def load_cli_plugins(args: Any, *, check: bool = False) -> list[Plugin]:
    """Load `args.plugin` (a list) and the file of `--space FILE.py:NAME`, which becomes `NAME`.

    Raises:
        PluginError: see `load_plugin`.
    """
    specs = list(getattr(args, "plugin", None) or [])
    path, name = split_space(getattr(args, "space", None) or "")
    if path is not None:
        specs.append(path)
        args.space = name
    return load_plugins(specs, check=check)


def load_plugins(specs: Sequence[str], *, check: bool = False) -> list[Plugin]:
    """Load every plugin of `specs` in order (see `load_plugin`)."""
    return [load_plugin(s, check=check) for s in specs]


def load_plugin(spec: str, *, check: bool = False, source: str | None = None) -> Plugin:
    """Import a plugin file or module and record what it registered.

    Loading the same file (same source) twice returns the first load.

    Args:
        spec: a path to a .py file, or an importable module name.
        check: run the contract of each dropout kind and backbone it registers (imports torch).
        source: the source to execute instead of reading the file (Ray workers: the driver's copy).

    Raises:
        PluginError: no such file or module, an import error, a name registered twice, a
            contract failure. Nothing it registered stays registered then.
    """
    registry.names("space")  # built-ins first: a plugin cannot take a built-in name, and the shipped
    # spaces (which read "every registered kind") never grow by a plugin's kinds.
    is_file = spec.endswith(".py") or os.sep in spec or "/" in spec
    if is_file:
        path = os.path.abspath(spec)
        if source is None and not os.path.isfile(path):
            raise PluginError(f"--plugin {spec!r}: no such file")
        if source is None:
            with open(path, encoding="utf-8") as fh:
                source = fh.read()
        name, files = os.path.splitext(os.path.basename(path))[0], {os.path.basename(path): source}
        if not name.isidentifier():
            raise PluginError(f"--plugin {spec!r}: the file name {os.path.basename(path)!r} must be a Python"
                              " identifier plus .py (letters, digits, _)")
    elif source is not None:  # a Ray worker: the driver's copy of a single-file module
        name, path, files = spec, spec, {spec: source}
    else:
        name = spec
        try:
            found = importlib.util.find_spec(spec)
        except (ImportError, ValueError) as e:
            found = None
            if not isinstance(e, ModuleNotFoundError):
                raise PluginError(f"--plugin {spec!r}: {_first_line(e)}") from None
        if found is None or not found.origin:
            raise PluginError(f"--plugin {spec!r}: no such file, nor an importable module of that name")
        path, files = _module_sources(found)
        if source is None and len(files) == 1 and not found.submodule_search_locations:
            source = next(iter(files.values()))
    sha = _sha(files)
    old = _LOADED.get(name)
    if old is not None:
        if old.sha == sha and (old.path == path or not is_file):
            return old
        raise PluginError(f"--plugin {spec!r}: a plugin named {name!r} is already loaded from {old.path}"
                          f" (sha {old.sha}, this one {sha}); rename one of them")
    if name in sys.modules and is_file:
        raise PluginError(f"--plugin {spec!r}: module name {name!r} is taken by {_where(sys.modules[name])};"
                          " rename the plugin file")
    before = {c: set(registry.names(c)) for c in registry.CATEGORIES}
    try:
        if source is not None:
            _exec_source(name, path, source)
        else:
            importlib.import_module(name)
    except registry.RegistryError as e:
        _undo(name, before)
        raise PluginError(f"--plugin {spec!r}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - any import failure is the plugin's, reported in one line
        _undo(name, before)
        raise PluginError(f"--plugin {spec!r}: import failed: {_origin_line(e, path)}{type(e).__name__}: "
                          f"{_first_line(e)}") from None
    added = tuple((c, n) for c in registry.CATEGORIES for n in registry.names(c) if n not in before[c])
    plugin = Plugin(name, path if is_file else spec, path, sha, added, source or "")
    _LOADED[name] = plugin
    for key in added:
        _OWNER[key] = name
        registry.set_owner(*key, plugin.identity)
    if check:
        try:
            _check(plugin)
        except PluginError:
            _undo(name, before)
            raise
    return plugin


def unload(name: str) -> None:
    """Forget plugin `name` and everything it registered (tests; reloading an edited plugin)."""
    plugin = _LOADED.get(name)
    if plugin is None:
        return
    for cat, n in plugin.registered:
        registry.unregister(cat, n)  # forgets its owner too
        _OWNER.pop((cat, n), None)
    _LOADED.pop(name, None)
    sys.modules.pop(name, None)


def _check(plugin: Plugin) -> None:
    from search import contracts  # torch: only when asked

    for cat, name in plugin.registered:
        try:
            if cat == "dropout":
                contracts.check_dropout(name)
            elif cat == "backbone":
                contracts.check_backbone(name)
        except contracts.ContractError as e:
            what = "dropout kind" if cat == "dropout" else cat
            raise PluginError(f"--plugin {plugin.spec!r}: {what} {name!r} fails its contract: {e}") from None


def _exec_source(name: str, path: str, source: str) -> None:
    """Import `source` as module `name` through importlib's own file loader.

    A Ray worker may not have the file (or may hold another copy): the driver's source then goes into a
    private temporary file first, so what runs is exactly what the identity hashed.
    """
    load_from = path
    if not os.path.isfile(path) or _read(path) != source:
        folder = tempfile.mkdtemp(prefix="dbn-plugin-")
        load_from = os.path.join(folder, f"{name}.py")
        with open(load_from, "w", encoding="utf-8") as fh:
            fh.write(source)
    mod_spec = importlib.util.spec_from_file_location(name, load_from)
    if mod_spec is None or mod_spec.loader is None:
        raise PluginError(f"--plugin {path!r}: importlib cannot load it as a Python file")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look the module up by name
    mod_spec.loader.exec_module(module)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _undo(name: str, before: Mapping[str, set[str]]) -> None:
    for c in registry.CATEGORIES:
        for n in set(registry.names(c)) - before[c]:
            registry.unregister(c, n)
            _OWNER.pop((c, n), None)
    _LOADED.pop(name, None)
    sys.modules.pop(name, None)


def _module_sources(found: Any) -> tuple[str, dict[str, str]]:
    """(path, {relative file: source}) of a module or, for a package, of every .py file under it."""
    if found.submodule_search_locations:
        root = list(found.submodule_search_locations)[0]
        files = {}
        for dirpath, _, names in sorted(os.walk(root)):
            for n in sorted(names):
                if n.endswith(".py"):
                    p = os.path.join(dirpath, n)
                    with open(p, encoding="utf-8") as fh:
                        files[os.path.relpath(p, root)] = fh.read()
        return root, files
    with open(found.origin, encoding="utf-8") as fh:
        return found.origin, {os.path.basename(found.origin): fh.read()}


def _sha(files: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        if len(files) > 1:
            h.update(rel.encode() + b"\0")
        h.update(files[rel].encode("utf-8"))
    return h.hexdigest()[:HASH_CHARS]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _origin_line(e: BaseException, path: str) -> str:
    """'file.py:12: ' of the innermost frame inside the plugin (a SyntaxError carries its own line)."""
    if isinstance(e, SyntaxError) and e.lineno:
        return f"{os.path.basename(e.filename or path)}:{e.lineno}: "
    inside = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(path)]
    return f"{os.path.basename(inside[-1].filename)}:{inside[-1].lineno}: " if inside else ""


def _where(module: Any) -> str:
    return getattr(module, "__file__", None) or repr(module)


# ------------------------------------------------------------------------- Ray
def runtime_env(plugins: Sequence[Plugin] | None = None) -> dict[str, Any]:
    """The Ray runtime environment that loads `plugins` (default: all loaded) in every worker.

    Returns {} when there is nothing to export. A single-file plugin's source travels in
    the environment variable DBN_PLUGINS, so a worker on another machine runs exactly the
    code that was hashed; a package plugin travels as a `py_modules` folder.
    """
    plugins = list(loaded() if plugins is None else plugins)
    if not plugins:
        return {}
    payload = [dict(name=p.name, spec=p.spec, path=p.path, sha=p.sha, source=p.source) for p in plugins]
    env: dict[str, Any] = {"env_vars": {ENV_VAR: json.dumps(payload)},
                           "worker_process_setup_hook": "search.plugins.setup_worker"}
    packages = [p.path for p in plugins if not p.source]
    if packages:
        env["py_modules"] = packages
    return env


_WORKER_ERROR: list[str] = []  # why this worker could not load the driver's plugins (setup_worker)


def setup_worker() -> None:
    """Load the plugins the driver exported (DBN_PLUGINS); Ray runs this in each worker process.

    A plugin that fails here (it imports a module the driver has and this worker lacks, a package plugin
    whose source on this worker differs from the driver's) does not raise: Ray would report only "The actor
    never ran - it was cancelled before it started running" with the cause buried in the worker's stderr.
    The error is kept, and `raise_worker_error` (the trainable's first call) raises it as the trial's
    error, so the sweep's failed-trial line and the run's `error` tag name the plugin and its import error.
    """
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return
    for p in json.loads(raw):
        try:
            got = load_plugin(p["spec"], source=p["source"] or None)
        except PluginError as e:
            _WORKER_ERROR.append(str(e))
            continue
        except Exception as e:  # noqa: BLE001 - whatever breaks a plugin's load, the trial says it in one line
            _WORKER_ERROR.append(f"--plugin {p['spec']!r}: {type(e).__name__}: {_first_line(e)}")
            continue
        if got.sha != p["sha"]:
            _WORKER_ERROR.append(f"plugin {p['name']!r}: this worker's copy (sha {got.sha}) differs from the "
                                 f"driver's (sha {p['sha']}); install the same version on every node")


def raise_worker_error() -> None:
    """Raise PluginError with the first plugin that this Ray worker could not load (setup_worker), if any."""
    if _WORKER_ERROR:
        import socket

        raise PluginError(f"{_WORKER_ERROR[0]} (on the Ray worker at {socket.gethostname()}, pid {os.getpid()}: "
                          "the driver loaded it; a module it imports must be importable on every node, e.g. "
                          "beside it in a package plugin or installed)")
