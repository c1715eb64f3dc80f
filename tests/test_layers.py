"""The one-way import rule: every module belongs to one floor, and imports only go down.

Every module of `spaces`, `search` and `analysis` is parsed with `ast`, function-level (lazy)
imports included, so an import hidden inside a function counts as much as one at the top. A
module may import modules of its own floor or of a lower one; anything else fails, naming the
file, the line and the import. A second test finds import circles between modules (lazy imports
included), which hide behind function-level imports.

The floors, lowest first (docs/architecture.md, "Floors"):

    core      the torch-free contracts: registry, TrialConfig, results and their column metadata
    records   what is written: schema, store, the writer lock, outputs, code version
    spaces    what to vary (reads the registry)
    trial     one trial's science (no Ray, no MLflow)
    plugins   loading a researcher's plugin and checking its contracts (builds models: above trial)
    sweep     the orchestration of many trials (Ray Tune, MLflow)
    analysis  results -> statistics, figures, tables
    app       the command lines, where plugins are loaded and a sweep's report is attached
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("spaces", "search", "analysis")

# Floor -> the modules on it: a name covers itself and its submodules; the longest matching name wins.
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("search", "search.registry", "search.config", "search.results", "search.metrics")),
    ("records", ("search.schema", "search.store", "search.lock", "search.outputs", "search.code_version")),
    ("spaces", ("spaces",)),
    ("trial", ("search.trial",)),
    ("plugins", ("search.plugins", "search.contracts")),
    ("sweep", ("search.sweep",)),
    ("analysis", ("analysis",)),
    ("app", ("search.run", "search.trial.__main__", "search.trial.cli", "search.sweep.cli", "search.sweep.driver",
             "analysis.report", "analysis.findings")),
)
RANK = {floor: i for i, (floor, _) in enumerate(FLOORS)}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def floor_of(module: str) -> str:
    """The floor of `module`: the longest name in FLOORS that is it or one of its packages."""
    best, floor = -1, ""
    for f, names in FLOORS:
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best:
                best, floor = len(n), f
    if not floor:
        raise AssertionError(f"module {module!r} is on no floor: add it to FLOORS in tests/test_layers.py")
    return floor


def _target(name: str) -> str | None:
    """The project module `name` refers to (a module, or the package holding an imported attribute)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, path: Path | None = None) -> list[tuple[int, str, str]]:
    """(line, imported project module, source text) of every import in `module` (its file: `path`, default the
    package's), function-level ones included; each imported module once per statement."""
    path = path or MODULES[module]
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]  # `from pkg import mod` imports pkg.mod
        else:
            continue
        targets = {t for n in names if n.split(".")[0] in PACKAGES and (t := _target(n)) and t != module}
        out += [(node.lineno, t, ast.get_source_segment(text, node) or "") for t in sorted(targets)]
    return out


def upward(modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    """'file:line: import (floor imports module, its floor)' for every import in `modules` that goes up a floor."""
    bad = []
    for module, path in modules.items():
        mine = floor_of(module)
        for line, target, text in imports(module, path):
            theirs = floor_of(target)
            if RANK[theirs] > RANK[mine]:
                bad.append(f"{path.relative_to(root)}:{line}: {text.strip()!r} ({mine} imports {target}, {theirs})")
    return bad


def test_every_module_is_on_a_floor() -> None:
    assert len(MODULES) > 50
    for m in MODULES:
        floor_of(m)


def test_imports_only_go_down() -> None:
    bad = upward(MODULES)
    assert not bad, "imports that go up a floor:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _is_package_of(a: str, b: str) -> bool:
    return b.startswith(a + ".")


def test_no_import_circle() -> None:
    # A package's __init__ re-exporting its own submodules is not a circle of ideas (the submodule
    # importing a sibling through the package is resolved to the sibling): those edges are left out.
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    where: dict[tuple[str, str], str] = {}
    for module, path in MODULES.items():
        for line, target, text in imports(module):
            if _is_package_of(module, target) or _is_package_of(target, module):
                continue
            graph[module].add(target)
            where.setdefault((module, target), f"{path.relative_to(ROOT)}:{line}: {text.strip()!r}")
    circles = _cycles(graph)
    lines = []
    for comp in circles:
        lines.append(" <-> ".join(comp) + ": " + "; ".join(
            where[(a, b)] for a in comp for b in comp if (a, b) in where))
    assert not circles, "import circles:\n" + "\n".join(lines)


def test_the_rule_catches_a_lazy_import_going_up(tmp_path: Path) -> None:
    """The checker itself: a function-level import of a higher floor is reported with file, line and import."""
    fake = tmp_path / "fake.py"
    fake.write_text("import os\n\nfrom search.config import TrialConfig\n\n\ndef f():\n"
                    "    from analysis.fit import mean_test, holm\n    return mean_test, holm, TrialConfig, os\n")
    assert upward({"search.sweep.fake": fake}, root=tmp_path) == [
        "fake.py:7: 'from analysis.fit import mean_test, holm' (sweep imports analysis.fit, analysis)"]
    assert upward({"analysis.fake": fake}, root=tmp_path) == []  # analysis may read analysis and search.config
    assert floor_of("search.trial.dropout.surgery") == "trial" and floor_of("search.trial.cli") == "app"
    assert floor_of("search.sweep.lock") == "sweep" and floor_of("search.lock") == "records"


def test_the_circle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
