"""The graph contract, stated in one place.

A cached model gives what its plan means or raises (DESIGN.md §2). The passes keep
that promise only if every graph they produce satisfies these invariants:

1. **No mutation but the cache writes.** Capture functionalises the exported program,
   so no graph has an in-place op: liveness follows data edges, and an in-place op
   whose result is not used as a value would silently vanish from a rewritten graph.
   The only mutating nodes are the rewrite's own cache writes, ``aten.copy_(buffer,
   value)`` into a cache-buffer placeholder (``node.meta["fxcache.buffer"]``) that
   nothing else in that graph reads, except (forecasting) the copy that first moves its
   old value into the next history slot (``node.meta["fxcache.history"]``).
2. **Units nested or disjoint.** Two units of one plan either share no node or one
   contains the other (the meaning of nested reuse depends on it).
3. **Outputs disjoint from cache buffers.** No graph output is a cache buffer or a view
   of one (a chain of ops whose schema returns an alias of an input): a later step
   writes the buffer in place, under the caller's feet.

:func:`check_graph` raises :class:`~fxcache.errors.ContractError` when a graph breaks
one. The passes call :func:`maybe_check` after they build a graph; it does nothing
unless the environment variable ``FXCACHE_CHECK`` is set to a value other than ``0``
(the test suite sets it). The checks run when graphs are built, never per step.

:func:`buffer_alias` (the cache buffer a value may share storage with) is what the
passes themselves use to keep invariant 3: they return a fresh tensor (``aten.clone``)
wherever an output would alias a buffer.
"""

from __future__ import annotations

import operator
import os
from typing import Iterable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import ContractError

__all__ = [
    "ENV",
    "enabled",
    "maybe_check",
    "check_graph",
    "check_outputs_disjoint",
    "is_cache_buffer",
    "is_mutating",
    "aliased_inputs",
    "buffer_alias",
]

ENV = "FXCACHE_CHECK"

# ops whose result shares storage with an input although their schema does not say so
_UNDECLARED_VIEWS = {torch.ops.aten._unsafe_view.default}

_REPORT = "this is a bug in fxcache: please report it with the model and the schedule"


def enabled() -> bool:
    """Whether debug checking is on (``FXCACHE_CHECK`` set and not ``0``)."""
    return os.environ.get(ENV, "0") not in ("", "0")


def maybe_check(gm: fx.GraphModule, *, units=None, where: str = "graph") -> None:
    """:func:`check_graph` when debug checking is on; nothing otherwise."""
    if enabled():
        check_graph(gm, units=units, where=where)


def is_cache_buffer(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "placeholder" and "fxcache.buffer" in node.meta


def is_mutating(node: fx.Node) -> bool:
    """The node runs an op whose schema writes one of its inputs."""
    target = node.target
    return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


def aliased_inputs(node: fx.Node) -> list:
    """The input nodes whose storage ``node``'s value may share: the inputs an op's
    schema says its result aliases (views, ``alias``, in-place ops returning ``self``,
    lists of views such as ``split``), through ``getitem`` of such a list."""
    if node.op != "call_function":
        return []
    target = node.target
    if target is operator.getitem:
        src = node.args[0]
        return aliased_inputs(src) if isinstance(src, fx.Node) else []
    if target in _UNDECLARED_VIEWS:
        return [a for a in node.args[:1] if isinstance(a, fx.Node)]
    if not isinstance(target, torch._ops.OpOverload):
        return []  # fxcache's own kernels and Python functions return fresh tensors
    schema = target._schema
    if not any(r.alias_info is not None for r in schema.returns):
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        out.extend(v for v in pytree.tree_leaves(value) if isinstance(v, fx.Node))
    return out


def buffer_alias(node) -> fx.Node | None:
    """The cache-buffer placeholder ``node``'s value is, or is a view of; None if none."""
    if not isinstance(node, fx.Node):
        return None
    seen: set = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if is_cache_buffer(n):
            return n
        stack.extend(aliased_inputs(n))
    return None


def _module(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [p for p, _ in stack.values() if p]
    return f"module '{paths[-1]}'" if paths else "the top-level module" if stack else "inserted by fxcache"


def _check_mutation(graph: fx.Graph, where: str) -> None:
    written: dict = {}
    for node in graph.nodes:
        if not is_mutating(node):
            continue
        target = node.args[0] if node.args else None
        if node.target is torch.ops.aten.copy_.default:
            if not is_cache_buffer(target):
                name = target.name if isinstance(target, fx.Node) else repr(target)
                raise ContractError(
                    f"{where}: node '{node.name}' ({_module(node)}) is aten.copy_ into '{name}', which is not a "
                    f"cache buffer; the only in-place ops a graph may hold are the cache writes. {_REPORT}"
                )
            if node.users:
                raise ContractError(
                    f"{where}: the value of cache write '{node.name}' is used by {[u.name for u in node.users]}; "
                    f"a cache write must be a sink. {_REPORT}"
                )
            if target in written:
                raise ContractError(
                    f"{where}: cache buffer '{target.name}' is written twice ('{written[target].name}' and "
                    f"'{node.name}'). {_REPORT}"
                )
            written[target] = node
            continue
        raise ContractError(
            f"{where}: node '{node.name}' ({_module(node)}) is the mutating op {node.target}; graphs must be "
            f"free of mutation (liveness follows data edges and would drop it). If it comes from the model, "
            f"capture should have functionalised it or raised a CaptureError. {_REPORT}"
        )
    order = {n: i for i, n in enumerate(graph.nodes)}

    def history_shift(user, buf, write) -> bool:  # forecasting: the old value moves one slot back first
        return (user.target is torch.ops.aten.copy_.default and len(user.args) > 1 and user.args[1] is buf
                and "fxcache.history" in getattr(user.args[0], "meta", {}) and order[user] < order[write])

    for buf, write in written.items():
        readers = [u.name for u in buf.users if u is not write and not history_shift(u, buf, write)]
        if readers:
            raise ContractError(
                f"{where}: cache buffer '{buf.name}' is written by '{write.name}' and read by {readers} in the "
                f"same graph; a step reads a slot or writes it, never both. {_REPORT}"
            )


def _check_units(units: Iterable, where: str) -> None:
    units = list(units)
    for i, a in enumerate(units):
        for b in units[i + 1 :]:
            inter = a.region & b.region
            if inter and inter != a.region and inter != b.region:
                raise ContractError(
                    f"{where}: units '{a.name}' and '{b.name}' overlap without one containing the other "
                    f"({len(inter)} shared nodes, e.g. '{sorted(inter)[0]}'); a plan's units must be nested or "
                    f"disjoint. {_REPORT}"
                )


def _check_outputs(graph: fx.Graph, where: str) -> None:
    outs = graph.find_nodes(op="output")
    if not outs:
        return
    for i, value in enumerate(pytree.tree_leaves(outs[0].args[0])):
        base = buffer_alias(value)
        if base is None:
            continue
        what = f"cache buffer '{base.name}'" if value is base else f"'{value.name}', a view of cache buffer '{base.name}'"
        raise ContractError(
            f"{where}: graph output {i} is {what}; a later step writes that buffer in place, so the caller's "
            f"tensor would change under it. Outputs must be fresh tensors (aten.clone). {_REPORT}"
        )


def check_graph(gm: fx.GraphModule, *, units=None, where: str = "graph") -> None:
    """Raise :class:`ContractError` when ``gm`` breaks the contract (module doc);
    ``units``: the plan's units, checked nested or disjoint."""
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    _check_mutation(graph, where)
    if units:
        _check_units(units, where)
    _check_outputs(graph, where)


def check_outputs_disjoint(outputs, buffers: dict, where: str = "step") -> None:
    """The run-time form of invariant 3, for programs glued in Python (segments): no
    output tensor shares storage with a cache buffer. Called only in debug mode."""
    storages = {b.untyped_storage().data_ptr(): slot for slot, b in buffers.items() if b.numel()}
    for i, out in enumerate(pytree.tree_leaves(outputs)):
        if isinstance(out, torch.Tensor) and out.numel():
            slot = storages.get(out.untyped_storage().data_ptr())
            if slot is not None:
                raise ContractError(
                    f"{where}: output {i} shares storage with the cache buffer of unit '{slot[0]}' (output "
                    f"{slot[1]}); a later step writes it in place. {_REPORT}"
                )
