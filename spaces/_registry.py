"""The space registry, in timm's shape: `@register_space` on a function named after its space."""
from __future__ import annotations

import fnmatch
from typing import Callable

from ._space import Space, SpaceError, _not_allowed

__all__ = ["register_space", "get_space", "list_spaces"]

_SPACES: dict[str, Space] = {}


def register_space(fn: Callable[[], Space]) -> Callable[[], Space]:
    """Register the Space that `fn()` returns under `fn.__name__` (which must equal the space's name).

    Raises:
        SpaceError: a name mismatch or a name registered twice.
    """
    space = fn()
    if space.name != fn.__name__:
        raise SpaceError(f"space function {fn.__name__!r} returns a space named {space.name!r}; use one name")
    if space.name in _SPACES:
        raise SpaceError(f"space {space.name!r} is registered twice")
    _SPACES[space.name] = space
    return fn


def get_space(name: str) -> Space:
    """The registered space called `name`.

    Raises:
        SpaceError (a ValueError): unknown name; the message lists the allowed names and a close match.
    """
    if name not in _SPACES:
        raise _not_allowed("space", name, list_spaces())
    return _SPACES[name]


def list_spaces(pattern: str = "*") -> list[str]:
    """Registered space names matching a shell-style `pattern`, sorted."""
    return sorted(n for n in _SPACES if fnmatch.fnmatchcase(n, pattern))
