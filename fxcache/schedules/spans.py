"""Residual spans: a contiguous run of transformer blocks cached as one residual per
stream. Pure Python (no torch): names, and which blocks a span covers.

A span ``span:A..B`` covers the blocks from ``A`` to ``B`` (unit names of kind
``transformer_block`` or ``single_block``, in the order data flows through them; ``A``
may equal ``B``). Reusing it at a step means: each value leaving the span (a stream of
the last block that something after the span reads) is the *current* input of that
stream plus the residual ``out - in`` stored at the last step that computed the span
(FirstBlockCache's, TeaCache's and MagCache's "add the cached residual of the remaining
blocks", cache-dit's DBCache middle blocks). Which input a stream adds back is read from
the graph's data flow (:func:`fxcache.analyze.residual.residual_source`: Flux's
double-stream blocks carry the text and the image stream, each with its own input).

A span holds one residual per stream leaving it, whatever its length: on FLUX.1-dev at
1024 px, 57 blocks in one span cost the image stream's 4096 x 3072 values, where FORA's
sublayer units cost two to three such tensors per block.

Spans are not listed among a model's units (there are O(blocks^2) of them); a schedule
or a :class:`~.mask.Mask` names the ones it uses, and the capture materialises them
(:meth:`fxcache.analyze.units.UnitSet.add_span`). A span contains the sublayer units of
its blocks (nested units: the outermost reused unit wins, as everywhere); two spans
that overlap without one containing the other are refused, like any two such units.
"""

from __future__ import annotations

from typing import Sequence

from ..plan import BLOCK_KINDS, SPAN_PREFIX, UnitInfo, parse_span, span_name
from ._validate import UnknownUnitError

__all__ = ["BLOCK_KINDS", "SPAN_PREFIX", "span_name", "parse_span", "block_units", "span_blocks", "span_info",
           "is_span"]


def is_span(name: str) -> bool:
    return parse_span(name) is not None


def block_units(units: Sequence[UnitInfo]) -> list[UnitInfo]:
    """The whole-block units, in the order data flows through them (graph order)."""
    return [u for u in units if u.kind in BLOCK_KINDS]


def span_blocks(name: str, units: Sequence[UnitInfo]) -> list[str]:
    """The block names span ``name`` covers, first to last; an :class:`UnknownUnitError`
    when its ends are not blocks of this model or come in the wrong order."""
    ends = parse_span(name)
    if ends is None:
        raise UnknownUnitError(f"'{name}' is not a span name; spans are named 'span:FIRST..LAST' (block unit names)")
    blocks = [u.name for u in block_units(units)]
    bad = [e for e in ends if e not in blocks]
    if bad:
        shown = blocks[:3] + (["..."] if len(blocks) > 4 else []) + blocks[-1:] if len(blocks) > 3 else blocks
        raise UnknownUnitError(
            f"span '{name}': {bad} {'is' if len(bad) == 1 else 'are'} not transformer blocks of this model; "
            f"a span runs from one block to a later one (blocks: {shown or 'none'})"
        )
    i, j = blocks.index(ends[0]), blocks.index(ends[1])
    if j < i:
        raise UnknownUnitError(f"span '{name}': block '{ends[1]}' comes before '{ends[0]}'; name the first block first")
    return blocks[i : j + 1]


def span_info(name: str, units: Sequence[UnitInfo]) -> UnitInfo:
    """An estimate of a span's :class:`UnitInfo` from its blocks' (FLOPs: their sum;
    cache bytes: the last block's outputs). The capture's own span unit is exact
    (:meth:`fxcache.analyze.units.UnitSet.add_span`); this one serves pure-Python
    reports (:func:`fxcache.schedules.to_plan`)."""
    names = span_blocks(name, units)
    by_name = {u.name: u for u in units}
    first = by_name[names[0]]
    return UnitInfo(
        name=name,
        kind="span",
        flops=sum(by_name[n].flops for n in names),
        index=first.index,
        cache_bytes=by_name[names[-1]].cache_bytes,
    )
