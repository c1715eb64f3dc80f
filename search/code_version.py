"""Which code produced a result: the git commit (and a hash of uncommitted changes), or the package version.

A configuration hash says *what* was trained; this says *with which code*. The sweep records it
on every MLflow run (tags) and every Parquet row (columns), and by default reuses a finished
trial only when it was produced by the same code version (`search.run --reuse`).

Torch-free and cheap: two or three `git` calls once per process (cached). Run from a checkout,
the version is `git:<commit12>` or `git:<commit12>+dirty.<diff8>` where `diff8` hashes the
uncommitted changes to tracked files and the untracked, not-ignored `.py` files; run from an
installed package (no checkout), `pkg:<version>`.
"""
from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from dataclasses import asdict, dataclass

__all__ = ["CodeVersion", "code_version", "compute_code_version", "code_columns_from_tags", "PROJECT_ROOT"]

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGE = "dropout-bn-ablate"


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
    """This project's code version, computed once per process."""
    return compute_code_version(PROJECT_ROOT)


def code_columns_from_tags(tags: dict[str, str]) -> dict[str, object]:
    """The Parquet code_* columns of a run, from its MLflow tags (nulls for a run recorded before them)."""
    label = tags.get("code_version") or None
    commit = tags.get("code.commit") or None
    dirty = tags.get("code.dirty")
    return {"code_version": label, "code_commit": commit,
            "code_dirty": None if commit is None or dirty is None else dirty == "true"}
