"""The built-in dropout kinds. Each is one class here, registered by name; nothing else lists them.

A kind is torch-free at import: it says how to draw its multiplicative noise (torch is
imported when a forward runs) and which closed form of the variance shift applies.
`rate` is the user-facing drop rate 1 - p for bernoulli and gaussian, and beta for
uout (PAPER.md conventions). Every kind is the identity in eval mode.

Adding a kind is one decorated class, here or in a plugin:

    @register_dropout("spatial")
    class SpatialKind(DropoutKind):
        closed_form = None                      # channel-shared masks: no element-wise closed form
        def noise(self, x):
            ...                                 # a tensor broadcastable to x, mean 1
"""
from __future__ import annotations

from typing import Any

from search.registry import register_dropout

__all__ = ["DropoutKind", "BernoulliKind", "GaussianKind", "UoutKind"]


class DropoutKind:
    """Base of the torch-free dropout kinds: the noise and its closed form.

    Attributes:
        closed_form: 'elementwise' when the noise is i.i.d. per element with mean 1 (then the
            theory uses `noise_var`), None when no closed form applies.
        max_rate: rates must lie in [0, max_rate).
    """

    kind = "base"
    closed_form: str | None = "elementwise"
    max_rate: float = 1.0

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)

    @classmethod
    def noise_var(cls, rate: float) -> float:
        """Variance of the multiplier m (E[m] = 1) at `rate`: Var_train = Var_test + noise_var * E[x^2]."""
        raise NotImplementedError(f"dropout kind {cls.kind!r} has no closed form")

    def noise(self, x: Any) -> Any:
        """A multiplier tensor broadcastable to `x`, with mean 1 (train mode only)."""
        raise NotImplementedError

    def apply(self, x: Any) -> Any:
        """Train-mode output; override for a fused kernel."""
        return x * self.noise(x)


@register_dropout("bernoulli")
class BernoulliKind(DropoutKind):
    """Inverted dropout: x * a / p, a ~ Bernoulli(p), p = 1 - rate."""

    @classmethod
    def noise_var(cls, rate: float) -> float:
        return rate / (1.0 - rate)  # E[(a/p)^2] - 1 = 1/p - 1

    def noise(self, x: Any) -> Any:
        import torch

        p = 1.0 - self.rate
        return torch.bernoulli(torch.full_like(x, p)) / p

    def apply(self, x: Any) -> Any:
        import torch.nn.functional as F

        return F.dropout(x, self.rate, True)  # the fused kernel; same distribution as noise()


@register_dropout("gaussian")
class GaussianKind(DropoutKind):
    """Multiplicative Gaussian noise g ~ N(1, rate / (1 - rate)): Bernoulli's train variance."""

    @classmethod
    def noise_var(cls, rate: float) -> float:
        return rate / (1.0 - rate)

    def noise(self, x: Any) -> Any:
        import torch

        return torch.randn_like(x).mul_((self.rate / (1.0 - self.rate)) ** 0.5).add_(1.0)


@register_dropout("uout")
class UoutKind(DropoutKind):
    """Uout (the paper's variance-stable form): x * (1 + r), r ~ U(-beta, beta), beta = rate."""

    @classmethod
    def noise_var(cls, rate: float) -> float:
        return rate * rate / 3.0

    def noise(self, x: Any) -> Any:
        import torch

        return torch.rand_like(x).mul_(2.0 * self.rate).add_(1.0 - self.rate)
