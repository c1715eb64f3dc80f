"""The nn.Module that runs a dropout kind, and `make_dropout(name, rate)`.

Probes recognise dropout sites by `VarianceDropout`. A kind registered as a torch-free
`DropoutKind` runs inside `VarianceDropout`; a kind registered (as before) as a
`VarianceDropout` subclass is instantiated directly; any other registered nn.Module class
(timm's `DropBlock2d`, torch's `nn.Dropout2d`, a researcher's own) runs inside `ModuleDropout`.
"""
from __future__ import annotations

import torch
from torch import nn

from search import registry
from search.trial.dropout.kinds import DropoutKind

__all__ = ["VarianceDropout", "ModuleDropout", "make_dropout", "list_dropout_kinds", "kind_class"]


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


class ModuleDropout(VarianceDropout):
    """A registered plain nn.Module dropout class, wrapped so the probes and contracts find it.

    The wrapped module runs in train mode at rate > 0 only; the wrapper is the identity otherwise,
    whatever the module does in eval mode (the framework's promise for every site).
    """

    def __init__(self, kind: str, rate: float, inner: nn.Module) -> None:
        super().__init__(rate)
        self.kind = kind
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        return self.inner(x)

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.ones_like(x))  # the multiplier, for a module that multiplies its input


def make_dropout(kind: str, rate: float, *, block_size: int | None = None) -> VarianceDropout:
    """Build a dropout module of a registered kind.

    Args:
        block_size: the kind's block size (TrialConfig.dropout_block_size); None: the kind's default.

    Raises:
        ValueError: unknown kind, rate outside [0, max_rate), or a block size for a kind that takes none.
    """
    entry = registry.get("dropout", kind, field_name="dropout_type")
    cls = entry.obj
    top = float(getattr(cls, "max_rate", 1.0))
    if not 0.0 <= float(rate) < top:
        raise ValueError(f"field 'dropout_rate' must be in [0, {top:g}), got {rate!r}")
    kwargs = {}
    if block_size is not None:
        if entry.meta.get("block_size") is None:
            raise ValueError(f"field 'dropout_block_size' = {block_size!r}: dropout kind {kind!r} takes no block size"
                             " (allowed: None)")
        kwargs["block_size"] = int(block_size)
    if isinstance(cls, type) and issubclass(cls, VarianceDropout):
        return cls(float(rate), **kwargs)
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        return ModuleDropout(kind, float(rate), cls(float(rate), **kwargs))
    return VarianceDropout(float(rate), cls(float(rate), **kwargs))
