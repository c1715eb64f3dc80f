"""The base the paper's CIFAR families share: CifarNet (stem -> body -> pre-head -> pool -> fc, timm's
model interface) and the small helpers every family file uses (depth check, channel scaling,
convs, the timm pretrained_cfg and builder).

No `from __future__ import annotations` here: torch.fx copies the root module's forward
annotations into the code it generates, and TorchScript cannot read them as strings
(an FX-traced model would not script: "Unknown type name '_torch_Tensor_'").
"""
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
from torch import nn
from timm.layers import DropPath, calculate_drop_path_rates, create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq
from timm.models._features import feature_take_indices

from search import registry
from search.config import ConfigError

__all__ = ["CifarNet", "check_depth", "check_width", "scaled", "conv3x3", "conv1x1", "cifar_cfg", "build_cifar",
           "bn_relu", "drop_path_rates", "optional_drop_path", "feature", "CIFAR_MEAN", "CIFAR_STD", "FEATURE_LEVELS"]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
FEATURE_LEVELS = 4  # feature_info taps of every CIFAR family: the stem and the ends of its three stages


def check_depth(family: str, depth: int) -> None:
    """Raise ConfigError (a ValueError) unless `depth` follows `family`'s rule."""
    meta = registry.get("backbone", family).meta
    rule, ok = meta["depth_rule"], meta["depth_ok"]
    if not isinstance(depth, int) or isinstance(depth, bool) or not ok(depth):
        raise ConfigError(f"field 'depth' = {depth!r} is invalid for backbone {family!r}: depth must be {rule}")


def check_width(family: str, width: float) -> float:
    if not isinstance(width, (int, float)) or isinstance(width, bool) or width <= 0:
        raise ConfigError(f"field 'width' = {width!r} is invalid for backbone {family!r}: width must be a number > 0")
    return float(width)


def scaled(channels: float, width: float) -> int:
    """round(channels * width), at least 1: width is a real multiplier, never a silent zero."""
    return max(1, int(round(channels * width)))


def conv3x3(in_chs: int, out_chs: int, stride: int = 1, groups: int = 1, device=None, dtype=None) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, groups=groups, bias=False, device=device,
                     dtype=dtype)


def conv1x1(in_chs: int, out_chs: int, stride: int = 1, device=None, dtype=None) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, device=device, dtype=dtype)


def drop_path_rates(drop_path_rate: float, blocks_per_stage: List[int]) -> List[List[float]]:
    """timm's stochastic-depth rule: 0 at the first block rising linearly to `drop_path_rate` at the last."""
    flat = calculate_drop_path_rates(float(drop_path_rate), sum(blocks_per_stage))
    out, start = [], 0
    for n in blocks_per_stage:
        out.append(flat[start:start + n])
        start += n
    return out


def optional_drop_path(rate: float) -> Optional[nn.Module]:
    """timm's DropPath on a residual branch, or None (no module at all) at rate 0, so a default model is unchanged."""
    return DropPath(rate) if rate > 0.0 else None


def feature(num_chs: int, reduction: int, module: str) -> Dict[str, Any]:
    """One feature_info entry (timm's format): channels, stride from the input, the module whose output it is."""
    return dict(num_chs=int(num_chs), reduction=int(reduction), module=module)


def cifar_cfg(**kwargs: Any) -> Dict[str, Any]:
    """timm pretrained_cfg for a CIFAR net: no weights; 32x32 inputs (8x8 after the two stride-2 stages),
    CIFAR-10's channel statistics; names the stem conv and the classifier."""
    return {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8),
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": CIFAR_MEAN, "std": CIFAR_STD,
        "first_conv": "stem", "classifier": "fc", "license": "apache-2.0", **kwargs,
    }


def build_cifar(cls: Type[nn.Module], variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """timm's builder (pretrained_cfg, features_only, ...); there are no weights to load.

    `features_only=True` wraps the model in timm's FeatureListNet, which runs `stem`, the children of
    `body` and of `pre_head` in order (flatten_sequential) and returns the feature_info taps (all
    FEATURE_LEVELS of them unless `out_indices` picks some).
    """
    if pretrained:
        raise ConfigError(f"{variant!r} has no pretrained weights: pretrained must be False")
    feature_cfg = dict(flatten_sequential=True, out_indices=tuple(range(FEATURE_LEVELS)))
    return build_model_with_cfg(cls, variant, pretrained=False, feature_cfg=feature_cfg, **kwargs)


class CifarNet(nn.Module):
    """Base of the CIFAR families: stem -> body -> pre-head (BN-ReLU or nothing) -> pool -> fc.

    Subclasses set `stem`, `body` (a Sequential of stages), `pre_head` and call `_init_head` (with
    their feature_info) then `_init_weights`. Provides timm's model interface: get_classifier,
    reset_classifier, forward_features, forward_head(pre_logits), forward_intermediates,
    prune_intermediate_layers, group_matcher, set_grad_checkpointing; `feature_info` lists the
    taps (module paths into stem / body / pre_head, one Sequential level deep).
    """

    def _init_head(self, num_features: int, num_classes: int, in_chans: int, drop_rate: float,
                   global_pool: str = "avg", feature_info: Optional[List[Dict[str, Any]]] = None,
                   device=None, dtype=None) -> None:
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, float(drop_rate)
        self.num_features = num_features
        self.grad_checkpointing = False
        self.feature_info = list(feature_info or [])
        self.global_pool, self.fc = create_classifier(num_features, num_classes, pool_type=global_pool,
                                                      device=device, dtype=dtype)
        self.head_hidden_size = num_features * self.global_pool.feat_mult()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ timm's model interface
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise decay: the stem, each stage (coarse) or block, the pre-head last."""
        return dict(stem=r"^stem", blocks=r"^body\.(\d+)" if coarse else [
            (r"^body\.(\d+)\.(\d+)", None), (r"^body\.(\d+)", None), (r"^pre_head", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for `num_classes` (0: none); `global_pool` None keeps the current pooling."""
        first = next(self.parameters())  # the new head follows the model's device and dtype
        dd = dict(device=first.device, dtype=first.dtype)
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def _trunk(self) -> List[Tuple[str, nn.Module]]:
        """stem, body and pre_head, each Sequential opened one level: the order features_only runs them in."""
        out: List[Tuple[str, nn.Module]] = []
        for part in ("stem", "body", "pre_head"):
            module = getattr(self, part)
            if isinstance(module, nn.Sequential):  # as timm's FeatureListNet (flatten_sequential) opens them
                out.extend((f"{part}.{name}", child) for name, child in module.named_children())
            else:
                out.append((part, module))
        return out

    def _taps(self) -> Dict[str, int]:
        """feature_info's module paths -> their feature index."""
        return {f["module"]: i for i, f in enumerate(self.feature_info)}

    @torch.jit.ignore
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The final features and the feature_info taps (timm's forward_intermediates).

        Args:
            indices: the last n taps if int, all if None, those listed if a sequence.
            norm: unused: the last tap of a pre-activation net is already the pre-head (BN-ReLU) output.
            stop_early: stop after the last tap asked for.
            output_fmt: 'NCHW' only.
            intermediates_only: return the taps only.
        """
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        taps = self._taps()
        take_indices, max_index = feature_take_indices(len(taps), indices)
        intermediates = []
        for name, module in self._trunk():
            x = self._stage(module, x) if name.startswith("body.") else module(x)
            tap = taps.get(name)
            if tap is not None and tap in take_indices:
                intermediates.append(x)
            if stop_early and tap == max_index:
                break
        if intermediates_only:
            return intermediates
        return x, intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop everything after the last tap asked for (timm's prune_intermediate_layers)."""
        taps = self._taps()
        take_indices, max_index = feature_take_indices(len(taps), indices)
        keep = set()
        for name, _ in self._trunk():
            keep.add(name)
            if taps.get(name) == max_index:
                break
        for part in ("stem", "body", "pre_head"):
            module = getattr(self, part)
            if isinstance(module, nn.Sequential):
                kept = [(n, m) for n, m in module.named_children() if f"{part}.{n}" in keep]
                if len(kept) < len(module):
                    setattr(self, part, nn.Sequential(OrderedDict(kept)))
            elif part not in keep:
                setattr(self, part, nn.Identity())
        prune_end = max_index < len(taps) - 1
        if prune_end:  # the features now end at the last kept tap: the head sized for the final ones goes
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    @torch.jit.ignore
    def _stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One child of `body`; with gradient checkpointing, a stage of blocks is checkpointed per block."""
        if self.grad_checkpointing and type(stage) is nn.Sequential:
            return checkpoint_seq(stage, x)
        return stage(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for stage in self.body:
                x = self._stage(stage, x)
        else:
            x = self.body(x)
        return self.pre_head(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0.0:  # timm's classifier dropout; build_model keeps it at 0
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def bn_relu(channels: int, device=None, dtype=None) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels, device=device, dtype=dtype), nn.ReLU(inplace=True))
