"""Fusion at cache reads (a pass: graph in, graph out, ends with ``graph.lint()``).

Where a cache buffer feeds a gated residual, ``x + gate * cache`` (FORA's reuse path:
the adaLN gate of the *current* step times the cached attention or MLP output), the
``mul``/``add`` pair becomes one call of :func:`fxcache.kernels.gated_residual`: a
Triton kernel on CUDA tensors, the same arithmetic in PyTorch elsewhere (inductor
cannot compile a ``triton_op`` on CPU tensors, and fuses the reference itself).

The pattern is matched only where shapes prove it: the fused op takes a per-sample
``(B, C)`` (or per-channel ``(1, C)``) gate, so the gate, broadcast against the
``(B, N, C)`` cache value, must be constant along the token dimension. Broadcasting
aligns shapes from the right: a rank-2 ``(B, C)`` operand times a ``(B, N, C)`` value is a
per-*token* ``(N, C)`` gate (legal when ``B == N``), not a per-sample one. So the gate
must have rank at most 3 and, right-aligned, the shape ``(B or 1, 1, C)``: DiT's
``gate.unsqueeze(1)`` is ``(B, 1, C)``; ``(1, 1, C)`` and ``(C,)`` are per channel.

The block-caching scale-shift (``cache * (1 + scale) + shift``) is inserted directly
as :func:`fxcache.kernels.scale_shift` by :mod:`fxcache.calibrate.scale_shift`, so it
needs no pattern here.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from . import contract

__all__ = ["fuse_cache_reads"]

_MUL = {torch.ops.aten.mul.Tensor}
_ADD = {torch.ops.aten.add.Tensor}


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _gate_2d(graph: fx.Graph, gate: fx.Node, value_shape: tuple):
    """A ``(B, C)`` or ``(1, C)`` view of ``gate``, or None unless the gate, broadcast
    against a value of shape ``value_shape = (B, N, C)``, is provably constant along N:
    rank <= 3 and, right-aligned, shape ``(B or 1, 1, C)``."""
    val = _val(gate)
    if not isinstance(val, torch.Tensor) or val.ndim > 3:
        return None
    batch, _, channels = value_shape
    aligned = (1,) * (3 - val.ndim) + tuple(val.shape)
    if aligned[2] != channels or aligned[1] != 1 or aligned[0] not in (1, batch):
        return None
    rows = aligned[0]
    if tuple(val.shape) == (rows, channels):
        return gate
    view = graph.call_function(torch.ops.aten.reshape.default, (gate, [rows, channels]))
    view.meta["val"] = val.reshape(rows, channels)
    return view


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
            mval = _val(mul)
            if not isinstance(mval, torch.Tensor) or tuple(mval.shape) != tuple(cval.shape):
                continue  # the gate broadcasts the value to a larger shape
            if xval.dtype != cval.dtype or _val(gate) is None or _val(gate).dtype != cval.dtype:
                continue
            with graph.inserting_before(add):
                gate2 = _gate_2d(graph, gate, tuple(cval.shape))
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
    contract.maybe_check(gm, where="fusion")
    return fused
