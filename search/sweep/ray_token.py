"""Ray's token file made private: Ray 2.60 writes `~/.ray/auth_token` with mode 0644 (issue 30).

The token is all it takes to run code on a cluster, and Ray writes it readable by every user of the machine
(its doing, not this project's: docs/cluster.md, Security). A local `ray.init()` turns token auth on for a
new local cluster and writes a token when there is none, so the driver calls `make_private` after each
`ray.init`, as `ray_cluster.yaml`'s setup commands do on every node.
"""
from __future__ import annotations

import os
import stat

__all__ = ["token_paths", "make_private"]


def token_paths() -> list[str]:
    """Where Ray reads its token from: RAY_AUTH_TOKEN_PATH when set, and ~/.ray/auth_token."""
    paths = [os.environ.get("RAY_AUTH_TOKEN_PATH") or "", os.path.expanduser(os.path.join("~", ".ray", "auth_token"))]
    return list(dict.fromkeys(p for p in paths if p))


def make_private(paths: list[str] | None = None) -> list[str]:
    """chmod 600 each token file this user owns that group or others can read or write; returns those changed.

    A symlink, a file of another user or one that is not there is left alone (the owner decides)."""
    changed = []
    for path in token_paths() if paths is None else paths:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or not st.st_mode & 0o077:
            continue
        try:
            os.chmod(path, 0o600)
        except OSError:
            continue  # a read-only mount: nothing this process can do
        changed.append(path)
    return changed
