"""docs/cluster.md's shell blocks as commands, so that a test runs what the docs say (test_slurm, test_autoscaler)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "cluster.md"
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def doc_commands(heading: str, block: int = 0) -> list[tuple[dict[str, str], list[str]]]:
    """(environment, argv) of each command of the `block`-th ```bash block under `heading` (a whole line such as
    "## Slurm"): continuation lines joined, comments dropped; `export A=1` lines and leading `A=1` words give the
    environment of the commands after them / of their command."""
    text = DOC.read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```bash\n(.*?)\n```", text[start:end if end >= 0 else None], re.S)
    assert len(blocks) > block, f"docs/cluster.md: no bash block #{block} under {heading!r}"
    exported: dict[str, str] = {}
    out = []
    for line in blocks[block].replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            exported.update(w.split("=", 1) for w in words[1:])
            continue
        env = dict(exported)
        while words and _ASSIGN.match(words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if words:
            out.append((env, words))
    return out


def find(commands: list[tuple[dict[str, str], list[str]]], *prefix: str,
         unique: bool = True) -> tuple[dict[str, str], list[str]]:
    """The command whose argv starts with `prefix` (the first one, or the only one when `unique`)."""
    hits = [c for c in commands if c[1][:len(prefix)] == list(prefix)]
    assert hits and (len(hits) == 1 or not unique), \
        f"docs/cluster.md: {len(hits)} commands start with {' '.join(prefix)!r}"
    return hits[0]
