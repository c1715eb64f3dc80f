"""Which code produced a result: the git commit (and a hash of uncommitted changes), or the package version.

A configuration hash says *what* was trained; this says *with which code*. The sweep records it
on every MLflow run (tags) and every Parquet row (columns), and by default reuses a finished
trial only when it was produced by the same code version (`search.run --reuse`).

Torch-free and cheap: two or three `git` calls once per process (cached). Run from a checkout,
the version is `git:<commit12>` or `git:<commit12>+dirty.<diff8>` where `diff8` hashes the
uncommitted changes to tracked files and the untracked, not-ignored `.py` files; run from an
installed package (no checkout), `pkg:<version>`.

On a cluster the code reaches the nodes without `.git` (Ray leaves it out of a `--working-dir`
upload, ray_cluster.yaml's rsync excludes it), so a node cannot compute the checkout's version
itself. The driver's version travels instead: `DBN_CODE_VERSION` holds it as JSON
(`CodeVersion.to_json`), the sweep's driver sets it in Ray's runtime environment for every
worker, and `python -m search.code_version --runtime-env` prints it for `ray job submit
--runtime-env-json` (docs/cluster.md). When set, it is this process's code version, in
preference to git; a value that is not one is a one-line error.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, fields

__all__ = ["CodeVersion", "code_version", "compute_code_version", "code_columns_from_tags", "parse_code_version",
           "ENV_VAR", "PROJECT_ROOT"]

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGE = "dropout-bn-ablate"
# The driver's code version, as JSON of a CodeVersion, for processes whose copy of the code has no .git.
ENV_VAR = "DBN_CODE_VERSION"


@dataclass(frozen=True)
class CodeVersion:
    """The code a process runs.

    Attributes:
        label: the one string compared for reuse (`git:...` or `pkg:...`).
        commit: full git commit ("" outside a checkout).
        dirty: uncommitted changes to tracked files, or untracked source files, exist.
        diff_hash: 16 hex chars of SHA-256 over those changes ("" when clean or not a checkout).
        package_version: the installed distribution's version ("" when not installed).
    """

    label: str
    commit: str = ""
    dirty: bool = False
    diff_hash: str = ""
    package_version: str = ""

    def tags(self) -> dict[str, str]:
        """MLflow tags: `code_version`, `code.*`, and MLflow's own `mlflow.source.git.commit`."""
        out = {"code_version": self.label, "code.commit": self.commit, "code.dirty": str(self.dirty).lower(),
               "code.diff_hash": self.diff_hash, "code.package_version": self.package_version}
        if self.commit:
            out["mlflow.source.git.commit"] = self.commit
        return out

    def columns(self) -> dict[str, object]:
        """Parquet columns (search.schema): code_version, code_commit, code_dirty."""
        return {"code_version": self.label, "code_commit": self.commit or None,
                "code_dirty": self.dirty if self.commit else None}

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def to_json(self) -> str:
        """The value of DBN_CODE_VERSION that makes another process record this version (`parse_code_version`)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


_HEX = re.compile(r"[0-9a-f]+")
_LABEL = re.compile(r"git:(?P<commit>[0-9a-f]{12})(\+dirty\.(?P<diff>[0-9a-f]{8}))?|pkg:[\w.+!-]+")


def parse_code_version(raw: str) -> CodeVersion:
    """The CodeVersion a DBN_CODE_VERSION value holds (JSON of `CodeVersion.to_dict`), checked for consistency.

    Raises:
        ValueError: one line naming the variable, the value and what is wrong with it.
    """
    def bad(why: str) -> ValueError:
        shown = raw if len(raw) <= 120 else raw[:117] + "..."
        return ValueError(f"{ENV_VAR}={shown!r} is not a code version ({why}); it carries the driver's version to "
                          "nodes without .git: unset it, or set it to the output of `python -m search.code_version`")

    try:
        d = json.loads(raw)
    except ValueError:
        raise bad("not JSON") from None
    if not isinstance(d, dict):
        raise bad("not a JSON object")
    names = {f.name for f in fields(CodeVersion)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise bad(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    if "label" not in d:
        raise bad("no label")
    for k, x in d.items():
        want = bool if k == "dirty" else str
        if not isinstance(x, want):
            raise bad(f"{k} must be a {want.__name__}, got {x!r}")
    v = CodeVersion(**d)
    m = _LABEL.fullmatch(v.label)
    if not m:
        raise bad(f"label {v.label!r} is neither git:<commit12>[+dirty.<diff8>] nor pkg:<version>")
    if v.label.startswith("pkg:"):
        if v.commit or v.dirty or v.diff_hash:
            raise bad("a pkg: label has no commit, dirty flag or diff hash")
        return v
    if len(v.commit) not in (40, 64) or not _HEX.fullmatch(v.commit) or not v.commit.startswith(m["commit"]):
        raise bad(f"commit {v.commit!r} is not the full hex commit of label {v.label!r}")
    if v.dirty != bool(m["diff"]):
        raise bad(f"dirty={v.dirty} contradicts label {v.label!r}")
    if v.dirty and not (len(v.diff_hash) == 16 and _HEX.fullmatch(v.diff_hash) and v.diff_hash.startswith(m["diff"])):
        raise bad(f"diff_hash {v.diff_hash!r} is not the 16 hex chars of label {v.label!r}")
    if not v.dirty and v.diff_hash:
        raise bad("a clean version has no diff_hash")
    return v


def _git(root: str, *args: str) -> bytes | None:
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version(_PACKAGE)
    except metadata.PackageNotFoundError:
        return ""


def compute_code_version(root: str = PROJECT_ROOT) -> CodeVersion:
    """The code version of the tree at `root` (uncached; `code_version()` caches it for this project).

    A checkout counts only if `root` is the top of its git work tree: an installed copy
    inside some other repository is a package, not that repository's commit.
    """
    pkg = _package_version()
    top = _git(root, "rev-parse", "--show-toplevel")
    commit = _git(root, "rev-parse", "HEAD")
    if top is None or commit is None or os.path.realpath(top.decode().strip()) != os.path.realpath(root):
        return CodeVersion(label=f"pkg:{pkg or 'unknown'}", package_version=pkg)
    commit_s = commit.decode().strip()
    h = hashlib.sha256()
    # --binary: a change to a binary file changes the hash too; no external diff drivers or colour.
    diff = _git(root, "diff", "HEAD", "--binary", "--no-ext-diff", "--no-color") or b""
    h.update(diff)
    untracked = (_git(root, "ls-files", "--others", "--exclude-standard", "-z") or b"").split(b"\0")
    # Untracked source files change what runs (a new module); data and notes do not.
    py = sorted(p for p in untracked if p.endswith(b".py"))
    for p in py:
        h.update(b"\0untracked\0" + p + b"\0")
        try:
            with open(os.path.join(root, p.decode()), "rb") as fh:
                h.update(fh.read())
        except OSError:
            pass
    dirty = bool(diff) or bool(py)
    diff_hash = h.hexdigest()[:16] if dirty else ""
    label = f"git:{commit_s[:12]}" + (f"+dirty.{diff_hash[:8]}" if dirty else "")
    return CodeVersion(label=label, commit=commit_s, dirty=dirty, diff_hash=diff_hash, package_version=pkg)


@functools.lru_cache(maxsize=1)
def code_version() -> CodeVersion:
    """This project's code version, once per process: DBN_CODE_VERSION when set (the driver's), else the checkout's.

    Raises:
        ValueError: DBN_CODE_VERSION is set to something that is not a code version (`parse_code_version`).
    """
    raw = os.environ.get(ENV_VAR, "").strip()
    if raw:
        return parse_code_version(raw)
    return compute_code_version(PROJECT_ROOT)


def code_columns_from_tags(tags: dict[str, str]) -> dict[str, object]:
    """The Parquet code_* columns of a run, from its MLflow tags (nulls for a run recorded before them)."""
    label = tags.get("code_version") or None
    commit = tags.get("code.commit") or None
    dirty = tags.get("code.dirty")
    return {"code_version": label, "code_commit": commit,
            "code_dirty": None if commit is None or dirty is None else dirty == "true"}


def main(argv: list[str] | None = None) -> int:
    """Print this code's version as the JSON value of DBN_CODE_VERSION (`--runtime-env`: as the runtime
    environment `ray job submit --runtime-env-json` takes, docs/cluster.md); returns the exit code."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m search.code_version",
                                description="this code's version, as DBN_CODE_VERSION's JSON value")
    p.add_argument("--runtime-env", action="store_true",
                   help='print {"env_vars": {"DBN_CODE_VERSION": ...}} for ray job submit --runtime-env-json')
    args = p.parse_args(argv)
    try:
        v = code_version()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"env_vars": {ENV_VAR: v.to_json()}}) if args.runtime_env else v.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
