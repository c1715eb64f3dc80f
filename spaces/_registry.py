"""Spaces in the one registry (search.registry): `@register_space` on a function named after its space."""
from __future__ import annotations

from typing import Callable

from search import registry

from ._space import Space, SpaceError

__all__ = ["register_space", "get_space", "list_spaces"]


def register_space(fn: Callable[[], Space]) -> Callable[[], Space]:
    """Register the Space that `fn()` returns under `fn.__name__` (which must equal the space's name).

    Raises:
        SpaceError: a name mismatch or a name registered twice.
    """
    try:
        return registry.register_space(fn)
    except registry.RegistryError as e:
        raise SpaceError(str(e)) from None


def get_space(name: str) -> Space:
    """The registered space called `name`.

    Raises:
        SpaceError (a ValueError): unknown name; the message lists the allowed names and a close match.
    """
    try:
        return registry.get("space", name, field_name="space").obj
    except registry.RegistryError as e:
        raise SpaceError(str(e)) from None


def list_spaces(pattern: str = "*") -> list[str]:
    """Registered space names matching a shell-style `pattern`, sorted."""
    return sorted(registry.names("space", pattern))
