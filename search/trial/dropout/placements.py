"""The built-in placements: where dropout goes, one registered function each (PAPER.md, "Placements").

    none      nothing inserted
    pre_bn    Dropout-(a): dropout -> the last BatchNorm of each block
    pre_conv  Dropout-(b): dropout -> the last conv of each block (-> ... -> next BN)
    head      one dropout after all BN layers, right before the classifier
    pre_pool  one dropout on the final feature map, right before global pooling (Kim et al. 2023's H4)
    post_conv one dropout per block on the output of its branch's last conv
    post_bn   one dropout per block on the output of its branch's last BatchNorm
    post_add  one dropout per block on the block's output, after the residual add

The post_* placements are *after-sites* (PlacementSite.after names the module whose output the
dropout takes); the positions Kim et al. 2023 (UAI) compare inside a residual branch. Their `case`
is the paper's case where it holds in every family: post_conv (a): no weight layer between the
dropout and the BN it feeds; post_bn (b): a conv is always between; post_add None: case (a) in
pre-activation families, (b) in post-activation ones (docs/placement.md has the table per family).

A placement is `fn(model, make_dropout, *, input_size=None) -> list[PlacementSite]`;
torch is imported inside (search/trial/dropout/surgery.py has the helpers), so
registering one, here or in a plugin, costs nothing at import.
"""
from __future__ import annotations

from typing import Any, Callable

from search.registry import register_placement
from search.trial.dropout.site import PlacementSite

__all__ = ["PlacementSite", "none", "pre_bn", "pre_conv", "head", "pre_pool", "post_conv", "post_bn",
           "post_add"]


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


@register_placement("pre_pool", case=None, feeds_bn=False, on_map=True,
                    paper="after every BN: one element-wise dropout on the last feature map, before global pooling"
                          " (Kim et al. 2023, H4)")
def pre_pool(model: Any, make: Callable[[], Any], *,
             input_size: tuple[int, int, int] | None = None) -> list[PlacementSite]:
    from search.trial.dropout.surgery import wrap_pool

    return wrap_pool(model, make, placement="pre_pool", input_size=input_size)


@register_placement("post_conv", case="a", on_map=True,
                    paper="after the last conv of each block's branch: its output, before the next BN (Kim et al.)")
def post_conv(model: Any, make: Callable[[], Any], *,
              input_size: tuple[int, int, int] | None = None) -> list[PlacementSite]:
    from search.trial.dropout.surgery import per_block_after

    return per_block_after(model, make, after="conv", placement="post_conv", input_size=input_size)


@register_placement("post_bn", case="b", on_map=True,
                    paper="after the last BN of each block's branch: its output, before a weight layer (Kim et al.)")
def post_bn(model: Any, make: Callable[[], Any], *,
            input_size: tuple[int, int, int] | None = None) -> list[PlacementSite]:
    from search.trial.dropout.surgery import per_block_after

    return per_block_after(model, make, after="bn", placement="post_bn", input_size=input_size)


@register_placement("post_add", case=None, on_map=True,
                    paper="after the residual add: on each block's output (case a pre-activation, b post-activation)")
def post_add(model: Any, make: Callable[[], Any], *,
             input_size: tuple[int, int, int] | None = None) -> list[PlacementSite]:
    from search.trial.dropout.surgery import per_block_after

    return per_block_after(model, make, after="block", placement="post_add", input_size=input_size)
