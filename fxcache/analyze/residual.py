"""Which input a residual output adds back, read from the graph's data flow.

A residual block computes ``out = x + branch(x)`` (with adaLN gates, ``x + gate * f(x)``,
and several such adds in a row). Its *residual input* for an output ``out`` is the
tensor ``x`` that reaches ``out`` through the residual adds alone. Shapes cannot tell it:
Flux's double-stream blocks return ``(encoder_hidden_states, hidden_states)``, and with as
many text tokens as image tokens both inputs have the shape of both outputs.

:func:`residual_source` walks back from ``out`` along the *spine*, the operands that
carry the residual stream unchanged up to elementwise, value-preserving steps:

- ``add`` of two tensors of the result's shape: both operands (the branch side soon
  meets an op that is not on the spine: a linear layer, a gate ``mul``);
- ``mul`` / ``div`` by a Python number (``/ output_scale_factor``), ``clamp`` (float16
  clipping), dtype casts, ``clone``, ``alias``, ``contiguous``;
- views that keep the shape when no slice is being followed (``squeeze`` of a size-1
  dimension, ``view`` to the same shape);
- ``slice`` along one dimension, and ``cat`` along it when the slice falls inside one of
  the concatenated tensors (Flux's single-stream blocks concatenate text and image,
  add the branch, and slice the two streams apart again).

The walk stops at the first node that *enters* the region (a node outside ``region``
used by a node inside it); those it reaches with the whole tensor selected, of the
output's shape, are the candidates. A slice of a concatenation made outside the region
(Chroma concatenates text and image before its single-stream blocks) is followed into
the concatenated piece it selects. One candidate is the residual input; none means the
output has no residual form (a resnet whose shortcut is a convolution); two or more are
ambiguous and refused (:class:`~fxcache.errors.UnsupportedModelError`), never guessed.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..errors import UnsupportedModelError

__all__ = ["residual_source"]

_aten = torch.ops.aten

#: elementwise ops that carry their (first) tensor operand along the spine
_UNARY = {
    _aten.clamp.default, _aten.clip.default, _aten.clone.default, _aten.alias.default, _aten.contiguous.default,
    _aten._to_copy.default, _aten.to.dtype, _aten.to.dtype_layout, _aten.to.device, _aten.to.other,
    _aten.type_as.default, _aten.detach.default,
}
#: view ops followed when they keep the shape (and no slice is being followed)
_SAME_SHAPE_VIEWS = {
    _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.squeeze.dim, _aten.squeeze.dims,
    _aten.squeeze.default, _aten.unsqueeze.default, _aten.expand.default, _aten.flatten.using_ints,
}
_SCALAR_OPS = {_aten.mul.Tensor, _aten.mul.Scalar, _aten.div.Tensor, _aten.div.Scalar, operator.mul,
               operator.truediv}
_ADDS = {_aten.add.Tensor, operator.add}
_BIG = 2 ** 62


def _val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _shape(node) -> tuple | None:
    v = _val(node)
    return None if v is None else tuple(v.shape)


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _steps(node: fx.Node, window):
    """The spine operands of ``node``, each with the window (``None``: the whole tensor,
    or ``(dim, start, end)``) of it that the followed window of ``node`` selects."""
    t, args = node.target, node.args
    shape = _shape(node)
    if shape is None or node.op != "call_function":
        return []
    if t in _ADDS:
        a, b = args[0], args[1]
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            return [(x, window) for x in (a, b) if _shape(x) == shape]
        return []
    if t in _SCALAR_OPS:
        a, b = args[0], args[1]
        if isinstance(a, fx.Node) and isinstance(b, (int, float)) and _shape(a) == shape:
            return [(a, window)]
        if t in (_aten.mul.Tensor, _aten.mul.Scalar, operator.mul) and isinstance(b, fx.Node) \
                and isinstance(a, (int, float)) and _shape(b) == shape:
            return [(b, window)]
        return []
    if t in _UNARY:
        a = args[0]
        return [(a, window)] if isinstance(a, fx.Node) and _shape(a) == shape else []
    if t in _SAME_SHAPE_VIEWS:
        a = args[0]
        return [(a, None)] if window is None and isinstance(a, fx.Node) and _shape(a) == shape else []
    if t is _aten.slice.Tensor:
        src = args[0]
        src_shape = _shape(src)
        if src_shape is None:
            return []
        dim = _norm_dim(args[1] if len(args) > 1 else 0, len(src_shape))
        size = src_shape[dim]
        start = args[2] if len(args) > 2 and args[2] is not None else 0
        end = args[3] if len(args) > 3 and args[3] is not None else _BIG
        step = args[4] if len(args) > 4 else 1
        if step != 1 or not all(isinstance(x, int) for x in (start, end)):
            return []
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(start, min(size, end + size if end < 0 else end))
        if window is None:
            return [(src, None if (start, end) == (0, size) else (dim, start, end))]
        wdim, ws, we = window
        if wdim != dim:
            return []
        return [(src, (dim, start + ws, start + we))]
    if t is _aten.cat.default:
        tensors = args[0]
        if window is None:
            return []
        wdim, ws, we = window
        if wdim != _norm_dim(args[1] if len(args) > 1 else 0, len(shape)):
            return []
        offset = 0
        for x in tensors:
            xs = _shape(x)
            if xs is None:
                return []
            n = xs[wdim]
            if offset <= ws and we <= offset + n:
                sub = (wdim, ws - offset, we - offset)
                return [(x, None if (sub[1], sub[2]) == (0, n) else sub)]
            offset += n
        return []
    return []


def residual_source(gm: fx.GraphModule, output: str, region: frozenset, *, what: str = "") -> str | None:
    """Name of the node that output ``output`` of the region ``region`` (node names)
    adds back through its residual adds (module doc), or None when it has no residual
    form. Raises :class:`UnsupportedModelError` when several inputs reach it that way.

    ``region`` is where the walk starts from: for several blocks in a row, the first
    one's region (the walk passes through the later blocks along the residual stream and
    stops where it enters the first). ``what`` names the unit in messages."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out = nodes[output]
    out_shape = _shape(out)
    if out_shape is None:
        return None
    entering = set()
    for node in gm.graph.nodes:
        if node.name in region:
            entering.update(a.name for a in node.all_input_nodes if a.name not in region and a.op != "get_attr")
    found: dict[str, None] = {}
    seen = set()
    stack = [(out, None)]
    while stack:
        node, window = stack.pop()
        if (node.name, window) in seen:
            continue
        seen.add((node.name, window))
        if node is not out and node.name in entering:
            if window is None and _shape(node) == out_shape and (v := _val(node)) is not None \
                    and v.is_floating_point():
                found[node.name] = None
            elif window is not None and node.op == "call_function" and node.target is _aten.cat.default:
                # a slice of a concatenation made before the region (Chroma joins text and image
                # before its single-stream blocks): the piece the slice selects is the input
                for piece, win in _steps(node, window):
                    if win is None and _shape(piece) == out_shape and (v := _val(piece)) is not None \
                            and v.is_floating_point():
                        found[piece.name] = None
            continue
        stack.extend(_steps(node, window))
    if len(found) > 1:
        raise UnsupportedModelError(
            f"{what or 'a unit'}: output '{output}' adds back several of its inputs ({sorted(found)}) through "
            f"its residual adds, so which one is its residual input is ambiguous; fxcache does not guess. "
            f"Measure this unit without a residual (e.g. profile its sublayers), or report the model"
        )
    return next(iter(found), None)
