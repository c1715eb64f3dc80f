"""The built-in dropout kinds. Each is one class here, registered by name; nothing else lists them.

A kind is torch-free at import: it says how to draw its multiplicative noise (torch is
imported when a forward runs) and which closed form of the variance shift applies.
`rate` is the user-facing drop rate 1 - p for bernoulli and gaussian, and beta for
uout (PAPER.md conventions). Every kind is the identity in eval mode.

A drop-rate schedule (TrialConfig.dropout_schedule) changes the rate while training; the rate then lives in a
0-dim device tensor that a captured CUDA graph reads, and a kind draws its noise from it with `apply_rate(x,
rate)`: tensor arithmetic only, no Python branch on the rate's value, and at rate 0 the multiplier is exactly 1
(the identity). Every built-in kind has one; a kind without it runs a schedule eagerly (search.trial.train).

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

__all__ = ["DropoutKind", "BernoulliKind", "GaussianKind", "UoutKind", "ChannelKind", "DropPathKind", "DropBlockKind"]


class DropoutKind:
    """Base of the torch-free dropout kinds: the noise and its closed form.

    Attributes:
        closed_form: 'elementwise' when the noise is i.i.d. per element with mean 1 (then the
            theory uses `noise_var`), 'case_a' when masks are shared but one element's multiplier has
            variance `noise_var` (the theory uses it for dropout -> BN only), None when no closed form applies.
        structure: what one independent mask covers: 'element', 'channel' or 'sample'
            (search.registry.register_dropout; the contract counts these units).
        needs_map: True if it runs on (N, C, H, W) feature maps only.
        max_rate: rates must lie in [0, max_rate).
    """

    kind = "base"
    closed_form: str | None = "elementwise"
    structure: str | None = None  # None: 'element' with an element-wise closed form, else 'sample'
    needs_map: bool = False
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

    def apply_rate(self, x: Any, rate: Any) -> Any:
        """Train-mode output at `rate`, a 0-dim tensor on x's device (a schedule's rate in force).

        Device arithmetic only (CUDA-graph safe); exactly `x` at rate 0. Kinds without it run schedules eagerly.
        """
        raise NotImplementedError(f"dropout kind {self.kind!r} has no apply_rate")

    @classmethod
    def reads_rate_tensor(cls) -> bool:
        """Whether `apply_rate` is implemented (a schedule's rate can stay on the device)."""
        return cls.apply_rate is not DropoutKind.apply_rate


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

    def apply_rate(self, x: Any, rate: Any) -> Any:
        return x * _keep_mask(x, tuple(x.shape), rate)


@register_dropout("gaussian")
class GaussianKind(DropoutKind):
    """Multiplicative Gaussian noise g ~ N(1, rate / (1 - rate)): Bernoulli's train variance."""

    @classmethod
    def noise_var(cls, rate: float) -> float:
        return rate / (1.0 - rate)

    def noise(self, x: Any) -> Any:
        import torch

        return torch.randn_like(x).mul_((self.rate / (1.0 - self.rate)) ** 0.5).add_(1.0)

    def apply_rate(self, x: Any, rate: Any) -> Any:
        import torch

        return x * (torch.randn_like(x) * torch.sqrt(rate / (1.0 - rate)) + 1.0)


@register_dropout("uout")
class UoutKind(DropoutKind):
    """Uout (the paper's variance-stable form): x * (1 + r), r ~ U(-beta, beta), beta = rate."""

    @classmethod
    def noise_var(cls, rate: float) -> float:
        return rate * rate / 3.0

    def noise(self, x: Any) -> Any:
        import torch

        return torch.rand_like(x).mul_(2.0 * self.rate).add_(1.0 - self.rate)

    def apply_rate(self, x: Any, rate: Any) -> Any:
        import torch

        return x * (torch.rand_like(x) * (2.0 * rate) + (1.0 - rate))


# ---------------------------------------------------------------- structured kinds (issue 29)
# Their masks are shared across elements, so the paper's element-wise closed form does not hold through a
# weight layer (docs/theory.md, "Structured kinds"). A BN right after the dropout (case (a)) sees one
# element's marginal only: ChannelKind and DropPathKind declare closed_form = "case_a" with `noise_var`,
# the variance of one element's multiplier, and the theory uses it at case (a) placements only.
# DropBlockKind has no closed form (position-dependent marginal, batch-wide scale): None.
def _bernoulli_mask(x: Any, shape: tuple[int, ...], rate: float) -> Any:
    import torch

    keep = 1.0 - rate
    return torch.bernoulli(torch.full(shape, keep, dtype=x.dtype, device=x.device)) / keep


def _keep_mask(x: Any, shape: tuple[int, ...], rate: Any) -> Any:
    """`_bernoulli_mask` at a 0-dim tensor rate: U >= rate keeps (probability 1 - rate), kept / (1 - rate).

    U ~ U[0, 1), so at rate 0 every element is kept and divided by 1: exactly the identity. U is float32 whatever
    x's dtype: a bf16 uniform has 8 bits, which would move the keep probability off 1 - rate.
    """
    import torch

    return (torch.rand(shape, device=x.device) >= rate).to(x.dtype) / (1.0 - rate)


@register_dropout("channel")
class ChannelKind(DropoutKind):
    """Channel (spatial) dropout, torch's Dropout2d: one Bernoulli(1 - rate) / (1 - rate) per (sample, channel).

    Every position of a channel shares its multiplier; on (N, C) inputs it is element-wise dropout.
    """

    closed_form = "case_a"
    structure = "channel"

    @classmethod
    def noise_var(cls, rate: float) -> float:
        return rate / (1.0 - rate)  # one element's multiplier is Bernoulli's; the sharing is what differs

    def noise(self, x: Any) -> Any:
        return _bernoulli_mask(x, tuple(x.shape[:2]) + (1,) * (x.dim() - 2), self.rate)

    def apply_rate(self, x: Any, rate: Any) -> Any:
        return x * _keep_mask(x, tuple(x.shape[:2]) + (1,) * (x.dim() - 2), rate)


@register_dropout("droppath")
class DropPathKind(DropoutKind):
    """DropPath / stochastic depth (timm's drop_path): one Bernoulli(1 - rate) / (1 - rate) per sample.

    At a placement inside a residual branch it drops the branch for that sample, which is stochastic depth.
    """

    closed_form = "case_a"
    structure = "sample"

    @classmethod
    def noise_var(cls, rate: float) -> float:
        return rate / (1.0 - rate)

    def noise(self, x: Any) -> Any:
        return _bernoulli_mask(x, (x.shape[0],) + (1,) * (x.dim() - 1), self.rate)

    def apply_rate(self, x: Any, rate: Any) -> Any:
        return x * _keep_mask(x, (x.shape[0],) + (1,) * (x.dim() - 1), rate)


@register_dropout("dropblock")
class DropBlockKind(DropoutKind):
    """DropBlock (Ghiasi et al. 2018) as timm's `drop_block_2d`: square blocks of side `block_size` (clipped to
    the map) dropped at seed rate gamma so that about `rate` of the positions drop, one mask shared by every
    channel of a sample, kept values scaled by (elements / kept elements) of the whole batch.

    The mask is correlated within blocks and the scale is a batch statistic: no closed form. Feature maps only.
    """

    closed_form = None
    structure = "sample"
    needs_map = True

    def __init__(self, rate: float, block_size: int = 7) -> None:
        super().__init__(rate)
        self.block_size = int(block_size)

    def noise(self, x: Any) -> Any:
        import torch

        return self.apply(torch.ones_like(x))

    def apply(self, x: Any) -> Any:
        from timm.layers import drop_block_2d

        if x.dim() != 4:
            raise ValueError(f"dropout kind 'dropblock' needs (N, C, H, W) feature maps, got shape {tuple(x.shape)}"
                             " (allowed: placements on a feature map, not one before the classifier)")
        return drop_block_2d(x, self.rate, self.block_size)

    def apply_rate(self, x: Any, rate: Any) -> Any:
        """timm's `drop_block_2d` (couple_channels, scale_by_keep) with the seed rate gamma a device tensor.

        Two departures, both for a rate read on the device: seeds are U < gamma rather than bernoulli_(gamma)
        (the same distribution, another draw), and the batch scale divides by max(kept, 1) rather than
        kept + 1e-7, so rate 0 is exactly the identity.
        """
        import torch
        import torch.nn.functional as F

        if x.dim() != 4:
            raise ValueError(f"dropout kind 'dropblock' needs (N, C, H, W) feature maps, got shape {tuple(x.shape)}"
                             " (allowed: placements on a feature map, not one before the classifier)")
        n, _, h, w = x.shape
        kh, kw = min(self.block_size, h), min(self.block_size, w)
        gamma = rate * (h * w / (kh * kw) / ((h - kh + 1) * (w - kw + 1)))
        with torch.no_grad():
            seeds = (torch.rand((n, 1, h, w), dtype=torch.float32, device=x.device) < gamma).to(x.dtype)
            block = F.max_pool2d(seeds, kernel_size=(kh, kw), stride=1, padding=(kh // 2, kw // 2))
            if kh % 2 == 0 or kw % 2 == 0:  # an even kernel pads one too many (timm's fix)
                block = block[..., (kh + 1) % 2:, (kw + 1) % 2:]
            keep = 1.0 - block
            # positions / kept positions over the whole batch, as timm's (every channel shares its sample's mask)
            keep = keep * (keep.numel() / keep.float().sum().clamp_min(1.0)).to(x.dtype)
        return x * keep
