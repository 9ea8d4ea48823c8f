"""Fusion at cache reads, as declared patterns with shape guards (a pass: graph in,
graph out, ends with ``graph.lint()`` and the graph contract).

Where a cache buffer feeds a gated residual, ``x + gate * cache`` (FORA's reuse path:
the adaLN gate of the *current* step times the cached attention or MLP output), the
``mul``/``add`` pair becomes one call of :func:`fxcache.kernels.gated_residual`, which
picks its implementation where it runs (the Triton kernel in eager graphs on CUDA, the
same arithmetic under ``torch.compile``, where inductor fuses it with its neighbours,
and on other devices; see :mod:`fxcache.kernels`).

The pattern is declared, not hand-matched: :data:`PATTERNS` are the four argument
orders of ``aten.add.Tensor(x, aten.mul.Tensor(gate, cache))`` (both ops commute), and
:func:`torch.fx.subgraph_rewriter.replace_pattern_with_filters` finds them (the ``mul``
must have no other user, ``add`` no ``alpha``). A structural match is fused only where
the guard :func:`_refusal` proves it from ``node.meta["val"]``:

* ``cache`` is a cache-buffer placeholder holding a ``(B, N, C)`` tensor, or a
  forecasting read of one (``forecast=1|2``: :func:`fxcache.kernels.forecast`), which
  is then folded in too: one ``forecast_gated_residual`` (forecast, gate and residual
  add in one op);
* ``x`` is a tensor of the same shape and dtype, and ``gate * cache`` is no larger
  (the gate does not broadcast the value);
* the gate has the dtype of the cache and, broadcast against ``(B, N, C)``, is
  constant along N: rank <= 3 and, right-aligned, shape ``(B or 1, 1, C)``. DiT's
  ``gate.unsqueeze(1)`` is ``(B, 1, C)``; ``(1, 1, C)``, ``(1, C)`` and ``(C,)`` are per
  channel. Broadcasting aligns shapes from the right, so a rank-2 ``(B, C)`` gate times
  a ``(B, N, C)`` value is a per-*token* ``(N, C)`` gate (legal when ``B == N``), not a
  per-sample one: refused.

The replacement is built per match (``replacement_callback``): a ``(B|1, C)`` view of
the gate when it has another shape, then the fused call. The pass returns a
:class:`FusionResult`: the number of fused cache reads (it *is* that ``int``, what
``StepGraph.fused`` holds), which sites were fused and which candidates the guard
refused, with the reason.

The block-caching scale-shift (``cache * (1 + scale) + shift``) is inserted directly
as :func:`fxcache.kernels.scale_shift` by the step-graph rewrite, so it needs no
pattern here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.subgraph_rewriter import replace_pattern_with_filters

from . import contract

__all__ = ["fuse_cache_reads", "FusionResult", "FusedSite", "RefusedSite", "PATTERNS"]

_aten = torch.ops.aten


# ----------------------------------------------------------------------- the patterns
# Placeholders in the same order in every pattern (x, gate, cache): the replacement
# callback reads them from ``match.placeholder_nodes`` in that order.
def _add_x_mul_gate_cache(x, gate, cache):
    return _aten.add.Tensor(x, _aten.mul.Tensor(gate, cache))


def _add_x_mul_cache_gate(x, gate, cache):
    return _aten.add.Tensor(x, _aten.mul.Tensor(cache, gate))


def _add_mul_gate_cache_x(x, gate, cache):
    return _aten.add.Tensor(_aten.mul.Tensor(gate, cache), x)


def _add_mul_cache_gate_x(x, gate, cache):
    return _aten.add.Tensor(_aten.mul.Tensor(cache, gate), x)


#: ``x + gate * cache`` in every argument order, on aten ops (what capture produces).
PATTERNS = (_add_x_mul_gate_cache, _add_x_mul_cache_gate, _add_mul_gate_cache_x, _add_mul_cache_gate_x)


@functools.cache
def _pattern_graphs() -> tuple:
    """:data:`PATTERNS` traced once (``symbolic_trace``), for the matcher."""
    return tuple(fx.symbolic_trace(p).graph for p in PATTERNS)


# ----------------------------------------------------------------------- the result
@dataclass(frozen=True)
class FusedSite:
    """One fused cache read: the new node, the buffer it reads, the gate's shape."""

    op: str
    node: str
    cache: str
    gate_shape: tuple


@dataclass(frozen=True)
class RefusedSite:
    """A structural match the shape guard left unfused, and why."""

    node: str  # the ``add`` left in place
    cache: str
    reason: str


class FusionResult(int):
    """What :func:`fuse_cache_reads` changed.

    The ``int`` value is the number of fused cache reads (``count``), so the result can
    stand wherever the count did (``StepGraph.fused``, comparisons, sums); ``sites``
    lists them and ``refused`` the candidates the shape guard left alone.
    """

    sites: tuple
    refused: tuple

    def __new__(cls, sites=(), refused=()):
        obj = super().__new__(cls, len(sites))
        obj.sites = tuple(sites)
        obj.refused = tuple(refused)
        return obj

    def __reduce__(self):
        return (type(self), (self.sites, self.refused))

    @property
    def count(self) -> int:
        return int(self)

    def __str__(self) -> str:
        return str(int(self))

    def __repr__(self) -> str:
        return f"FusionResult(count={int(self)}, sites={list(self.sites)!r}, refused={list(self.refused)!r})"


# ----------------------------------------------------------------------- the guard
def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node):
    val = _val(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _parts(match):
    """``(x, gate, cache, mul, add)`` of a match, graph nodes (x may be a literal)."""
    x, gate, cache = match.placeholder_nodes
    add = match.returning_nodes[0]
    mul = next(gn for pn, gn in match.nodes_map.items() if pn.op == "call_function" and pn.target == _aten.mul.Tensor)
    return x, gate, cache, mul, add


def _gate_rows(gate_val: torch.Tensor, value_shape: tuple):
    """The gate's rows (``B`` or 1) when, broadcast against ``value_shape = (B, N, C)``,
    it is provably constant along N (rank <= 3, right-aligned ``(B or 1, 1, C)``); None
    otherwise."""
    if gate_val.ndim > 3:
        return None
    batch, _, channels = value_shape
    aligned = (1,) * (3 - gate_val.ndim) + tuple(gate_val.shape)
    if aligned[2] != channels or aligned[1] != 1 or aligned[0] not in (1, batch):
        return None
    return aligned[0]


def _is_forecast(node) -> bool:
    """A forecasting cache read (``forecast=1|2``), as the step-graph rewrite inserts it."""
    return isinstance(node, fx.Node) and node.op == "call_function" and "fxcache.forecast" in node.meta


def _merge_forecasts(graph: fx.Graph) -> None:
    """``gated_residual(x, gate, forecast(coef, h0, h1, h2))`` -> one
    ``forecast_gated_residual(x, gate, coef, h0, h1, h2)`` where the forecast has no other
    user: the forecast, the gate and the residual add in one op."""
    from ..kernels import forecast_gated_residual, gated_residual

    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not gated_residual:
            continue
        x, gate, cache, channel_dim = node.args
        if not _is_forecast(cache) or len(cache.users) != 1:
            continue
        with graph.inserting_before(node):
            fused = graph.call_function(forecast_gated_residual, (x, gate, *cache.args, channel_dim))
        fused.meta.update(node.meta)
        fused.meta["fxcache.fused"] = "forecast_gated_residual"
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(cache)


def _refusal(match) -> str | None:
    """Why the shapes do not prove this match a per-(sample, channel) gated residual at a
    cache read; None when they do."""
    x, gate, cache, mul, _ = _parts(match)
    if not (contract.is_cache_buffer(cache) or _is_forecast(cache)):
        return "not a cache read"
    cval = _val(cache)
    if not isinstance(cval, torch.Tensor) or cval.ndim != 3:
        return f"cache value of shape {_shape(cache)}: only (B, N, C) token features are fused"
    xval, gval = _val(x), _val(gate)
    if not isinstance(xval, torch.Tensor) or tuple(xval.shape) != tuple(cval.shape):
        return f"residual of shape {_shape(x)}, cache {tuple(cval.shape)}"
    if _shape(mul) != tuple(cval.shape):
        return f"the gate broadcasts the cached value to {_shape(mul)}"
    if not isinstance(gval, torch.Tensor):
        return "the gate is not a tensor"
    if xval.dtype != cval.dtype or gval.dtype != cval.dtype:
        return f"dtypes differ (x {xval.dtype}, gate {gval.dtype}, cache {cval.dtype})"
    if _gate_rows(gval, tuple(cval.shape)) is None:
        return (
            f"gate of shape {tuple(gval.shape)} against {tuple(cval.shape)} is not per sample and channel "
            f"(needs (B|1, 1, C), (1, C) or (C,) right-aligned)"
        )
    return None


# ----------------------------------------------------------------------- the pass
def fuse_cache_reads(gm: fx.GraphModule) -> FusionResult:
    """Replace ``x + gate * cache`` at cache reads by one fused op where the shapes
    prove it (module docstring). Returns a :class:`FusionResult` (an ``int``: the count)."""
    from ..kernels import gated_residual

    graph = gm.graph
    sites: list[FusedSite] = []
    refused: dict[str, RefusedSite] = {}

    def guard(match, original_graph, pattern_graph) -> bool:
        reason = _refusal(match)
        cache = match.placeholder_nodes[2]
        if reason is not None and (contract.is_cache_buffer(cache) or _is_forecast(cache)):
            add, cache = match.returning_nodes[0], match.placeholder_nodes[2]
            refused.setdefault(add.name, RefusedSite(add.name, cache.name, reason))
        return reason is None

    def replacement(match, original_graph, pattern_graph) -> fx.Graph:
        x, gate, cache, _, add = _parts(match)
        cval, gval = _val(cache), _val(gate)
        rows, channels = _gate_rows(gval, tuple(cval.shape)), cval.shape[2]
        g = fx.Graph()
        px, pgate, pcache = g.placeholder("x"), g.placeholder("gate"), g.placeholder("cache")
        gate2 = pgate
        if tuple(gval.shape) != (rows, channels):
            gate2 = g.call_function(_aten.reshape.default, (pgate, [rows, channels]))
            gate2.meta["val"] = gval.reshape(rows, channels)
        fused = g.call_function(gated_residual, (px, gate2, pcache, -1))
        fused.meta["val"] = _val(add)
        fused.meta["fxcache.fused"] = "gated_residual"
        g.output(fused)
        return g

    for pattern in _pattern_graphs():
        done = replace_pattern_with_filters(gm, pattern, match_filters=[guard], replacement_callback=replacement)
        for r in done:
            new = next(n for n in r.replacements if n.meta.get("fxcache.fused") == "gated_residual")
            inputs = {pn.name: gn for pn, gn in r.nodes_map.items() if pn.op == "placeholder"}
            sites.append(FusedSite("gated_residual", new.name, inputs["cache"].name, _shape(inputs["gate"])))
            refused.pop(r.anchor.name, None)
    _merge_forecasts(graph)
    graph.lint()
    gm.recompile()
    contract.maybe_check(gm, where="fusion")
    return FusionResult(sites, refused.values())
