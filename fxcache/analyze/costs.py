"""FLOPs of every node of a captured graph (an analysis: it only writes ``node.meta``).

Each ``call_function`` node is replayed on ``meta`` tensors of the recorded shapes
under ``torch.utils.flop_counter.FlopCounterMode``, so the counts are PyTorch's own
formulas (a multiply-accumulate is 2 FLOPs). Nodes are sorted into two categories:

- ``dense``: convolutions and linear layers (``conv*``, ``linear``, ``mm``, ``addmm``);
- ``attention``: the batched matmuls of attention (``scaled_dot_product_attention``,
  ``bmm``, ``baddbmm``, ``matmul``).

Results: ``node.meta["fxcache.flops"]`` and ``node.meta["fxcache.flop_category"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["annotate_flops", "GraphCost", "graph_cost", "node_flops"]

_ATTENTION_TARGETS = {
    "aten.scaled_dot_product_attention",
    "aten.bmm",
    "aten.baddbmm",
    "aten.matmul",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_cudnn_attention",
}


def _to_meta(x):
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device="meta")
    return x


def _value(arg):
    if isinstance(arg, fx.Node):
        return arg.meta.get("val")
    return arg


def _signature(node: fx.Node, args, kwargs):
    def sig(x):
        if isinstance(x, torch.Tensor):
            return ("T", tuple(x.shape), tuple(x.stride()), x.dtype)
        if isinstance(x, (list, tuple)):
            return tuple(sig(v) for v in x)
        if isinstance(x, dict):
            return tuple(sorted((k, sig(v)) for k, v in x.items()))
        try:
            hash(x)
            return x
        except TypeError:
            return repr(x)

    return (str(node.target), sig(args), sig(kwargs))


_cache: dict = {}


def node_flops(node: fx.Node) -> int:
    """FLOPs of one node (0 for non-arithmetic nodes)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return 0
    name = str(node.target.overloadpacket)
    if not any(k in name for k in ("conv", "linear", "mm", "matmul", "attention", "bmm")):
        return 0
    args = torch.utils._pytree.tree_map(_value, node.args)
    kwargs = torch.utils._pytree.tree_map(_value, node.kwargs)
    key = _signature(node, args, kwargs)
    if key in _cache:
        return _cache[key]
    margs = torch.utils._pytree.tree_map(_to_meta, args)
    mkwargs = torch.utils._pytree.tree_map(_to_meta, kwargs)
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            node.target(*margs, **mkwargs)
        flops = int(counter.get_total_flops())
    except Exception:  # an op with no meta kernel: count nothing rather than fail the analysis
        flops = 0
    _cache[key] = flops
    return flops


def annotate_flops(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        flops = node_flops(node)
        node.meta["fxcache.flops"] = flops
        if flops:
            name = str(node.target.overloadpacket)
            node.meta["fxcache.flop_category"] = "attention" if name in _ATTENTION_TARGETS else "dense"


@dataclass(frozen=True)
class GraphCost:
    total: int
    dense: int
    attention: int

    @property
    def total_macs(self) -> float:
        return self.total / 2

    @property
    def dense_macs(self) -> float:
        return self.dense / 2

    @property
    def attention_macs(self) -> float:
        return self.attention / 2

    def __str__(self) -> str:
        return (
            f"{self.total / 1e9:.2f} GFLOPs ({self.total_macs / 1e9:.2f} G MACs: conv/linear "
            f"{self.dense_macs / 1e9:.2f} G, attention matmuls {self.attention_macs / 1e9:.2f} G)"
        )


def graph_cost(gm: fx.GraphModule, nodes=None) -> GraphCost:
    """Sum of annotated FLOPs over ``nodes`` (default: the whole graph)."""
    if nodes is None:
        nodes = gm.graph.nodes
    dense = attention = 0
    for node in nodes:
        if "fxcache.flops" not in node.meta:
            node.meta["fxcache.flops"] = node_flops(node)
            if node.meta["fxcache.flops"]:
                name = str(node.target.overloadpacket)
                node.meta["fxcache.flop_category"] = "attention" if name in _ATTENTION_TARGETS else "dense"
        f = node.meta["fxcache.flops"]
        if not f:
            continue
        if node.meta.get("fxcache.flop_category") == "attention":
            attention += f
        else:
            dense += f
    return GraphCost(dense + attention, dense, attention)
