"""Fusion at cache reads (a pass: graph in, graph out, ends with ``graph.lint()``).

Where a cache buffer feeds a gated residual, ``x + gate * cache`` (FORA's reuse path:
the adaLN gate of the *current* step times the cached attention or MLP output), the
``mul``/``add`` pair becomes one call of :func:`fxcache.kernels.gated_residual`: a
Triton kernel on CUDA tensors, the same arithmetic in PyTorch elsewhere (inductor
cannot compile a ``triton_op`` on CPU tensors, and fuses the reference itself).

The block-caching scale-shift (``cache * (1 + scale) + shift``) is inserted directly
as :func:`fxcache.kernels.scale_shift` by :mod:`fxcache.calibrate.scale_shift`, so it
needs no pattern here.
"""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["fuse_cache_reads"]

_MUL = {torch.ops.aten.mul.Tensor}
_ADD = {torch.ops.aten.add.Tensor}


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _gate_2d(graph: fx.Graph, gate: fx.Node, batch: int, channels: int):
    """A (B, C) view of a gate of shape (B, 1, C), (B, C), (1, 1, C) or (C,), or None."""
    val = _val(gate)
    if not isinstance(val, torch.Tensor):
        return None
    shape = tuple(val.shape)
    if shape == (batch, channels):
        return gate
    if shape in ((batch, 1, channels), (1, 1, channels), (1, channels), (channels,)):
        rows = shape[0] if len(shape) > 1 else 1
        view = graph.call_function(torch.ops.aten.reshape.default, (gate, [rows, channels]))
        view.meta["val"] = val.reshape(rows, channels)
        return view
    return None


def fuse_cache_reads(gm: fx.GraphModule) -> int:
    """Replace ``add(x, mul(gate, cache))`` at cache reads by one fused op. Returns the count."""
    from ..kernels import gated_residual

    graph = gm.graph
    fused = 0
    for buf in list(graph.find_nodes(op="placeholder")):
        if "fxcache.buffer" not in buf.meta:
            continue
        cval = _val(buf)
        if not isinstance(cval, torch.Tensor) or cval.ndim != 3:
            continue
        batch, _, channels = cval.shape
        for mul in list(buf.users):
            if mul.target not in _MUL or len(mul.users) != 1 or mul.kwargs:
                continue
            add = next(iter(mul.users))
            if add.target not in _ADD or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
                continue
            gate = mul.args[1] if mul.args[0] is buf else mul.args[0]
            x = add.args[1] if add.args[0] is mul else add.args[0]
            xval = _val(x)
            if gate is buf or not isinstance(xval, torch.Tensor) or tuple(xval.shape) != tuple(cval.shape):
                continue
            if xval.dtype != cval.dtype or _val(gate) is None or _val(gate).dtype != cval.dtype:
                continue
            with graph.inserting_before(add):
                gate2 = _gate_2d(graph, gate, batch, channels)
                if gate2 is None:
                    continue
                new = graph.call_function(gated_residual, (x, gate2, buf, -1))
            new.meta["val"] = _val(add)
            new.meta["fxcache.fused"] = "gated_residual"
            add.replace_all_uses_with(new)
            graph.erase_node(add)
            if not mul.users:
                graph.erase_node(mul)
            fused += 1
    graph.lint()
    gm.recompile()
    return fused
