"""The nn.Module that runs a dropout kind, and `make_dropout(name, rate)`.

Probes recognise dropout sites by `VarianceDropout`. A kind registered as a torch-free
`DropoutKind` runs inside `VarianceDropout`; a kind registered (as before) as a
`VarianceDropout` subclass is instantiated directly.
"""
from __future__ import annotations

import torch
from torch import nn

from search import registry
from search.trial.dropout.kinds import DropoutKind

__all__ = ["VarianceDropout", "make_dropout", "list_dropout_kinds", "kind_class"]


class VarianceDropout(nn.Module):
    """A dropout site: identity in eval mode (or at rate 0), the kind's noise in train mode.

    Subclass it and override `noise(x)` (or `forward`) to write a kind as an nn.Module.
    """

    kind = "base"
    closed_form: str | None = None

    def __init__(self, rate: float, impl: DropoutKind | None = None) -> None:
        super().__init__()
        self.rate = float(rate)
        self.impl = impl
        if impl is not None:
            self.kind = impl.kind

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rate={self.rate}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        if self.impl is not None:
            return self.impl.apply(x)
        return x * self.noise(x)

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl is not None:
            return self.impl.noise(x)
        raise NotImplementedError  # pragma: no cover - subclasses define it


def list_dropout_kinds() -> list[str]:
    return sorted(registry.names("dropout"))


def kind_class(name: str) -> type:
    """The registered class of dropout kind `name`.

    Raises:
        ValueError: unknown kind (names the allowed ones).
    """
    return registry.get("dropout", name, field_name="dropout_type").obj


def make_dropout(kind: str, rate: float) -> VarianceDropout:
    """Build a dropout module of a registered kind.

    Raises:
        ValueError: unknown kind, or rate outside [0, max_rate).
    """
    cls = kind_class(kind)
    top = float(getattr(cls, "max_rate", 1.0))
    if not 0.0 <= float(rate) < top:
        raise ValueError(f"field 'dropout_rate' must be in [0, {top:g}), got {rate!r}")
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        return cls(float(rate))
    return VarianceDropout(float(rate), cls(float(rate)))
