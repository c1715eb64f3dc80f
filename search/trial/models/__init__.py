"""Models by name: the paper's CIFAR networks (registered in timm's registry) and stock timm CNNs.

`build_model(cfg)` (search/trial/models/build.py) is the one entry point the trial uses;
it imports the CIFAR family modules, which registers them with timm. Importing this
package itself imports no torch: the names below load on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "build_model": "build", "family_of": "build", "resolve_num_classes": "build", "SUPPORTED_BACKBONES": "build",
    "CIFAR_BACKBONES": "build", "STOCK_BACKBONES": "stock", "PlacementSite": "build",
    "WideResNet": "cifar_wrn", "PreResNet": "cifar_preresnet", "ResNeXt": "cifar_resnext", "DenseNetBC": "cifar_densenet",
    "CifarNet": "cifar_base",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"search.trial.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
