"""Dropout kinds as small nn.Modules, in a registry of the timm shape.

`rate` is the user-facing drop rate 1 - p for bernoulli and gaussian, and
beta for uout (PAPER.md conventions). Every kind is the identity in eval mode.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["VarianceDropout", "BernoulliDropout", "GaussianDropout", "UoutDropout",
           "register_dropout", "make_dropout", "list_dropout_kinds"]

_KINDS: dict[str, type["VarianceDropout"]] = {}


def register_dropout(name: str) -> Callable[[type["VarianceDropout"]], type["VarianceDropout"]]:
    """Class decorator: make a dropout kind available to `make_dropout(name, rate)`."""

    def deco(cls: type[VarianceDropout]) -> type[VarianceDropout]:
        if name in _KINDS:
            raise ValueError(f"dropout kind {name!r} is already registered")
        cls.kind = name
        _KINDS[name] = cls
        return cls

    return deco


def list_dropout_kinds() -> list[str]:
    return sorted(_KINDS)


def make_dropout(kind: str, rate: float) -> "VarianceDropout":
    """Build a dropout module of a registered kind.

    Raises:
        ValueError: unknown kind, or rate outside [0, 1).
    """
    if kind not in _KINDS:
        raise ValueError(f"field 'dropout_type' = {kind!r} is not allowed (allowed: {', '.join(list_dropout_kinds())})")
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"field 'dropout_rate' must be in [0, 1), got {rate!r}")
    return _KINDS[kind](float(rate))


class VarianceDropout(nn.Module):
    """Base of our dropout kinds; probes recognise dropout sites by this class."""

    kind = "base"

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = float(rate)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        return x * self.noise(x)

    def noise(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@register_dropout("bernoulli")
class BernoulliDropout(VarianceDropout):
    """Inverted dropout: x * a / p, a ~ Bernoulli(p), p = 1 - rate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.dropout is the fused kernel; identical distribution to noise() below.
        return nn.functional.dropout(x, self.rate, self.training)

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        p = 1.0 - self.rate
        return torch.bernoulli(torch.full_like(x, p)) / p


@register_dropout("gaussian")
class GaussianDropout(VarianceDropout):
    """Multiplicative Gaussian noise g ~ N(1, rate / (1 - rate)): Bernoulli's train variance."""

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        std = (self.rate / (1.0 - self.rate)) ** 0.5
        return torch.randn_like(x).mul_(std).add_(1.0)


@register_dropout("uout")
class UoutDropout(VarianceDropout):
    """Uout (the paper's variance-stable form): x * (1 + r), r ~ U(-beta, beta), beta = rate."""

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rand_like(x).mul_(2.0 * self.rate).add_(1.0 - self.rate)
