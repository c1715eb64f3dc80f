"""The normalization axis (TrialConfig.normalization; docs/normalization.md): every BatchNorm of a built model
becomes a GroupNorm or an Identity, in place.

Applied after the model is built and after dropout placement, so a placement keeps its position ("pre_bn" is
where the BN was) and `PlacementSite.feeds_bn` still names the layer the noise reaches first: the module at
that path is now the GroupNorm (or Identity). No random number is drawn, so a seed gives the same conv and
linear weights under every normalization (the ablation is paired).

- groupnorm: torch's nn.GroupNorm (timm's GroupNormAct for timm's norm-act layers, keeping their activation),
  same channels, eps and affine, initialised with the BN's own affine values (weight 1, bias 0 in the CIFAR
  families; a family's zero-initialised last BN of a residual branch, timm's `zero_init_last`, stays zero).
  Groups: gcd(G, C) for a layer of C channels, G = norm_groups (None: 32), so every layer's count divides.
- none: nn.Identity; a timm norm-act layer (BatchNormAct2d) becomes its own dropout-and-activation.
"""
from __future__ import annotations

import math

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from search.config import DEFAULT_NORM_GROUPS, ConfigError

__all__ = ["apply_normalization", "group_count", "NORM_LAYERS", "norm_kind"]

# The layer types the probes treat as normalization layers (a GroupNorm has no running statistics).
NORM_LAYERS = (_BatchNorm, nn.GroupNorm)


def norm_kind(module: nn.Module) -> str | None:
    """'batchnorm' or 'groupnorm' for a normalization layer (LayerShift.norm_type), None for anything else."""
    if isinstance(module, _BatchNorm):
        return "batchnorm"
    if isinstance(module, nn.GroupNorm):
        return "groupnorm"
    return None


def group_count(channels: int, groups: int | None) -> int:
    """Groups of a GroupNorm over `channels`: gcd(G, channels), G = `groups` (None: 32); always divides."""
    return math.gcd(DEFAULT_NORM_GROUPS if groups is None else int(groups), int(channels))


def apply_normalization(model: nn.Module, normalization: str | None, groups: int | None = None) -> list[str]:
    """Replace every BatchNorm of `model` per `normalization` (None or 'batchnorm': leave them).

    Returns:
        The module paths replaced, in `named_modules` order ([] for batchnorm).

    Raises:
        ConfigError: `groups` divides the channel count of no BatchNorm (it would only ever be cut down by the
            gcd rule), the model has no BatchNorm (the hashed setting would change nothing), or an unknown
            normalization.
    """
    if normalization in (None, "batchnorm"):
        return []
    if normalization not in ("groupnorm", "none"):
        raise ConfigError(f"field 'normalization' = {normalization!r} is not allowed (allowed: batchnorm, groupnorm,"
                          " none)")
    paths = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if not paths:
        raise ConfigError(f"field 'normalization' = {normalization!r}: the model ({type(model).__name__}) has no"
                          " BatchNorm to replace, so it would change nothing (allowed: None)")
    if normalization == "groupnorm" and groups is not None:
        channels = sorted({model.get_submodule(p).num_features for p in paths})
        if not any(c % groups == 0 for c in channels):
            raise ConfigError(f"field 'norm_groups' = {groups!r} divides the channels of no BatchNorm of this model"
                              f" (channels {', '.join(map(str, channels))}; allowed: a divisor of one of them, or"
                              f" None for gcd({DEFAULT_NORM_GROUPS}, C))")
    for path in paths:
        bn = model.get_submodule(path)
        new = _group_norm(bn, groups) if normalization == "groupnorm" else _identity(bn)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return paths


def _group_norm(bn: _BatchNorm, groups: int | None) -> nn.GroupNorm:
    c = bn.num_features
    kw = dict(eps=bn.eps, affine=bn.affine, device=_device(bn), dtype=_dtype(bn))
    act = getattr(bn, "act", None)
    if act is not None:  # timm's norm-act layer: its activation and dropout must survive the swap
        from timm.layers import GroupNormAct

        gn: nn.GroupNorm = GroupNormAct(c, group_count(c, groups), apply_act=False, **kw)
        gn.act, gn.drop = act, getattr(bn, "drop", nn.Identity())
    else:
        gn = nn.GroupNorm(group_count(c, groups), c, **kw)
    if bn.affine:  # the family's own init (why not always 1 and 0: module docstring)
        gn.weight.data.copy_(bn.weight.data)
        gn.bias.data.copy_(bn.bias.data)
    gn.train(bn.training)
    return gn


def _identity(bn: _BatchNorm) -> nn.Module:
    act = getattr(bn, "act", None)
    if act is None:
        return nn.Identity()
    drop = getattr(bn, "drop", None)
    return act if drop is None or isinstance(drop, nn.Identity) else nn.Sequential(drop, act)


def _device(bn: _BatchNorm):  # noqa: ANN202
    t = next(iter(bn.buffers()), None) if bn.weight is None else bn.weight
    return None if t is None else t.device


def _dtype(bn: _BatchNorm):  # noqa: ANN202
    return None if bn.weight is None else bn.weight.dtype
