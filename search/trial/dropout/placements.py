"""The built-in placements: where dropout goes, one registered function each (PAPER.md, "Placements").

    none      nothing inserted
    pre_bn    Dropout-(a): dropout -> the last BatchNorm of each block
    pre_conv  Dropout-(b): dropout -> the last conv of each block (-> ... -> next BN)
    head      one dropout after all BN layers, right before the classifier

A placement is `fn(model, make_dropout, *, input_size=None) -> list[PlacementSite]`;
torch is imported inside (search/trial/dropout/surgery.py has the helpers), so
registering one, here or in a plugin, costs nothing at import.
"""
from __future__ import annotations

from typing import Any, Callable

from search.registry import register_placement
from search.trial.dropout.site import PlacementSite

__all__ = ["PlacementSite", "none", "pre_bn", "pre_conv", "head"]


@register_placement("none", case=None, paper="no dropout (the baseline)", feeds_bn=False)
def none(model: Any, make: Callable[[], Any], *, input_size: tuple[int, int, int] | None = None) -> list[PlacementSite]:
    return []


@register_placement("pre_bn", case="a", paper="Dropout-(a): dropout directly before the last BN of each block")
def pre_bn(model: Any, make: Callable[[], Any], *, input_size: tuple[int, int, int] | None = None) -> list[PlacementSite]:
    from search.trial.dropout.surgery import per_block

    return per_block(model, make, target="bn", placement="pre_bn", input_size=input_size)


@register_placement("pre_conv", case="b", paper="Dropout-(b): dropout before the last conv of each block (WRN style)")
def pre_conv(model: Any, make: Callable[[], Any], *,
             input_size: tuple[int, int, int] | None = None) -> list[PlacementSite]:
    from search.trial.dropout.surgery import per_block

    return per_block(model, make, target="conv", placement="pre_conv", input_size=input_size)


@register_placement("head", case=None, paper="after all BN: one dropout before the classifier", feeds_bn=False,
                    on_map=False)
def head(model: Any, make: Callable[[], Any], *, input_size: tuple[int, int, int] | None = None) -> list[PlacementSite]:
    from search.trial.dropout.surgery import wrap_classifier

    return wrap_classifier(model, make)
