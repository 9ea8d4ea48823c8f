"""Stage 4, rewrite: one graph per kind of step, with static cache buffers.

The meaning of a plan is the naive reference: run the model as written; a unit that is
not computed at a step yields the value it produced the last time it was computed. For
nested units the outermost reused unit wins (a forward hook on the outer module
replaces whatever the inner one returned). This pass produces graphs with exactly that
meaning and nothing more:

- every use of a reused unit's output by a node outside the unit reads a cache buffer
  (an extra graph input, allocated once per input shape and written in place);
- a computed unit writes its buffers (``aten.copy_``) only when a later step reads
  them: liveness across steps is solved backwards from the last step
  (:func:`solve_steps`);
- only nodes that the output or a needed write depends on are copied into the new
  graph, so a unit whose output nobody needs at this step or later does not run at all
  (the "mask rectification" of the timestep-aware masking paper, for any graph shape);
- a graph output that would be a cache buffer, or a view of one (the model returns a
  reused unit's value), is cloned: a later step writes the buffer in place, and the
  caller's tensor must not change under it.

Liveness over data edges is sound because the captured graph is free of mutation
(capture functionalises it); :mod:`fxcache.rewrite.contract` states the invariants and
checks every graph built here when ``FXCACHE_CHECK=1``.

Forecasting (``forecast=order`` > 0, TaylorSeer-style): a cache slot ``(unit, k)`` keeps
the unit's values at its last ``order + 1`` computed steps, in the slot itself (the most
recent) and history slots ``(unit, k, j)``, ``j = 1..order``. A computed unit that writes
shifts them (``H_order <- ... <- H_1 <- H_0 <- value``: reads of the old values precede the
writes, the one exception to "read or write, never both" that the contract allows, for
history slots only); a read becomes ``H_0*c_0 + H_1*c_1 + ...`` (one op, :func:`fxcache.kernels.forecast`;
fused with a gated residual by :mod:`.fuse`) with coefficients from
the coefficient buffer :data:`FORECAST_SLOT` (one row per unit of the plan, written by the
runtime before each step: the polynomial through the last computed steps, evaluated at
this step; :func:`forecast_weights`). With every write needed for a later forecast, a
computed unit writes whenever any later step reads it (not only the next read).

Dead code is decided by this pass's own liveness rule, not by FX's
``eliminate_dead_code``: in exported graphs FX treats ``aten.dropout`` and
``aten.scaled_dot_product_attention`` as impure and keeps whole dead regions alive. In
inference every node here is pure except the cache writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.fx as fx

from ..analyze.costs import graph_cost
from ..errors import UnsupportedModelError
from ..kernels import forecast as forecast_op
from ..kernels import scale_shift as scale_shift_op
from ..analyze.units import Unit
from ..plan import Plan, PlanError, StepKind
from . import contract
from .adapters import ADAPTER_ATTR

__all__ = ["StepGraph", "build_step_graph", "solve_steps", "buffer_name", "fresh_outputs", "FORECAST_SLOT",
           "forecast_weights", "history_slots"]

FORECAST_SLOT = ("fxcache.forecast", 0)  # the coefficient buffer: [plan unit, order + 1], float32


def buffer_name(unit: str, k: int, j: int = 0) -> str:
    if unit == FORECAST_SLOT[0]:
        return "forecast_coefficients"
    return "cache__" + re.sub(r"[^0-9A-Za-z_]", "_", unit) + f"__{k}" + (f"__h{j}" if j else "")


def history_slots(slot: tuple, order: int) -> tuple:
    """``slot`` and its history slots, most recent first."""
    return (slot, *((slot[0], slot[1], j) for j in range(1, order + 1)))


def forecast_weights(step: int, computed_at: list, order: int) -> list:
    """Weights of the history values (most recent first) whose sum is TaylorSeer's
    forecast at ``step`` from the values at the steps ``computed_at`` (most recent first;
    the first ``order + 1`` are used): the Taylor expansion around the last computed step
    ``s0``, ``sum_j D_j (step - s0)**j / j!``, whose derivatives are divided differences
    taken recursively over consecutive computed steps (``D_{j+1}(s_i) = (D_j(s_i) -
    D_j(s_{i+1})) / (s_i - s_{i+1})``), as TaylorSeer and diffusers' ``TaylorSeerCache``
    update them. Order 1 is the line through the last two values. Fewer points than
    ``order + 1`` give the expansion of lower order (one point: reuse); the weights of
    missing points are 0. Float64."""
    pts = list(computed_at[: order + 1])
    n = len(pts)
    # factor[i] = the weights of D_j at point i, for the current j
    factor = [[1.0 if c == i else 0.0 for c in range(order + 1)] for i in range(n)]
    out = [0.0] * (order + 1)
    k = step - pts[0] if pts else 0
    term = 1.0  # k**j / j!
    for j in range(n):
        out = [o + term * f for o, f in zip(out, factor[0])]
        factor = [[(a - b) / (pts[i] - pts[i + 1]) for a, b in zip(factor[i], factor[i + 1])]
                  for i in range(len(factor) - 1)]
        term *= k / (j + 1)
    return out


@dataclass
class StepGraph:
    gm: fx.GraphModule
    reused: frozenset
    writes: tuple  # unit names written, in buffer-argument order
    reads: tuple  # unit names read, in buffer-argument order
    buffers: tuple  # (unit, k) per extra input, in order
    flops: int
    nodes: int
    executed: frozenset = frozenset()  # original node names that run
    fused: int = 0  # cache reads fused with their gate arithmetic (a rewrite.fuse.FusionResult, an int)
    probes: tuple = ()  # probed units (scale-shift training): their (read, computed) pairs follow the outputs

    def code_key(self) -> str:
        return self.gm.code


class _Resolver:
    """Maps (value node, user) to the value the user sees under the plan's meaning."""

    def __init__(self, units: list[Unit], reused: frozenset):
        self.reused = reused
        self.out_units: dict[str, list[Unit]] = {}
        for u in units:
            for o in u.outputs:
                self.out_units.setdefault(o, []).append(u)
        for lst in self.out_units.values():  # outermost first
            lst.sort(key=lambda u: (-len(u.region), u.order))

    def resolve(self, value: str, inside: Callable[[Unit], bool]):
        """``(unit, k)`` of the cache read the user sees, or None for the computed value."""
        for u in self.out_units.get(value, ()):
            if u.name in self.reused and not inside(u):
                return (u.name, u.outputs.index(value))
        return None


def _liveness(gm: fx.GraphModule, units: dict[str, Unit], resolver: _Resolver, writes: Iterable[str], roots=(),
              probes: Iterable[str] = ()):
    """Live original nodes, cache reads used, and the resolved value of every write."""
    by_name = {n.name: n for n in gm.graph.nodes}
    live: set[str] = set()
    reads: set[tuple] = set()
    stack: list[fx.Node] = []

    def need(value: str, inside) -> None:
        r = resolver.resolve(value, inside)
        if r is not None:
            reads.add(r)
            u = units[r[0]]
            if u.residual:  # a span read adds the stored residual to the span's current input
                need(u.residual[r[1]], _entering_view(u))
        elif value not in live:
            live.add(value)
            stack.append(by_name[value])

    write_src: dict[tuple, object] = {}
    write_base: dict[tuple, object] = {}  # residual spans: the input each written residual subtracts
    for w in writes:
        u = units[w]
        # the value as seen just outside u: units inside u still apply, units that
        # enclose u do not (the write happens inside them).
        inside = lambda v, u=u: v.contains(u)
        for k, o in enumerate(u.outputs):
            r = resolver.resolve(o, inside)
            write_src[(w, k)] = r if r is not None else o
            need(o, inside)
            if u.residual:  # the span's input, as the span sees it
                x, x_inside = u.residual[k], _entering_view(u)
                r = resolver.resolve(x, x_inside)
                write_base[(w, k)] = r if r is not None else x
                need(x, x_inside)
    for p in probes:  # the probed unit computed (as seen just outside it), and its own cache read
        u = units[p]
        if u.residual:
            raise PlanError(f"unit '{p}' is a residual span; scale-shift adapters are trained on sublayer units only")
        inside = lambda v, u=u: v.name == u.name or v.contains(u)
        for k, o in enumerate(u.outputs):
            r = resolver.resolve(o, inside)
            write_src[("probe", p, k)] = r if r is not None else o
            need(o, inside)
            reads.add((p, k))
    out = gm.graph.find_nodes(op="output")[0]
    for arg in out.all_input_nodes:
        need(arg.name, lambda v, n=out.name: n in v.region)
    for name in roots:  # values an adapter reads (the timestep embedding): always computed
        if name not in live:
            live.add(name)
            stack.append(by_name[name])
    while stack:
        node = stack.pop()
        for arg in node.all_input_nodes:
            need(arg.name, lambda v, n=node.name: n in v.region)
    return live, reads, write_src, write_base


def _entering_view(span: Unit) -> Callable[[Unit], bool]:
    """``inside`` for a value entering ``span``: seen as the span's own nodes see it
    (the units enclosing the span, and the span itself, do not apply to that use)."""
    return lambda v, u=span: v.name == u.name or v.contains(u)


def build_step_graph(
    gm: fx.GraphModule, units: list[Unit], reused: Iterable[str], writes: Iterable[str], adapters=None,
    probes: Iterable[str] | None = None, forecast: int = 0,
) -> StepGraph:
    """A copy of ``gm`` for one kind of step (a pass: graph in, graph out).

    ``adapters``: optional ``(ScaleShift, temb_node_name)``; a read of cache slot
    ``(unit, k)`` that the adapters cover becomes
    ``scale_shift(cache, *linear(temb).chunk(2))`` (block caching's scale-shift
    adjustment, one fused op). The returned graph owns the adapter module, as its
    submodule ``fxcache_scale_shift`` (:data:`fxcache.rewrite.adapters.ADAPTER_ATTR`);
    ``gm`` is not changed.

    ``probes`` (scale-shift training, :mod:`fxcache.calibrate.scale_shift`): units reused
    at this step whose cache read and whose computed value the graph also returns, after
    the model's outputs, two values per output ``k`` of each probed unit (in unit order):
    the value a user just outside the unit sees (the adapted cache read) and the unit
    computed on this step's values (the teacher: the uncached unit on the cached model's
    own inputs). When ``probes`` is given (even empty), the rest of the graph sees every
    adapted read through ``aten.detach``: gradients reach an adapter only through the
    returned reads. Without ``probes`` the graph is the inference graph.

    ``forecast``: the order of the forecast at cache reads (0: reuse the stored value;
    see the module docstring); row ``i`` of the coefficient buffer is ``units[i]``."""
    reused = frozenset(reused)
    by_unit = {u.name: u for u in units}
    writes = tuple(w for w in (u.name for u in units) if w in set(writes))
    for w in writes:
        if w in reused:
            raise PlanError(f"unit '{w}' cannot be both reused and written at one step")
    training = probes is not None
    if forecast and training:
        raise PlanError("scale-shift training runs on reused cache values; train without forecast")
    probes = tuple(p for p in (u.name for u in units) if p in set(probes or ()))
    for p in probes:
        if p not in reused:
            raise PlanError(f"unit '{p}' is probed but not reused at this step; only a cache read can be probed")
    resolver = _Resolver(units, reused)
    adapter, temb = adapters if adapters is not None else (None, None)
    live, reads, write_src, write_base = _liveness(gm, by_unit, resolver, writes, roots=(temb,) if adapter is not None else (),
                                       probes=probes)

    read_order = sorted(reads, key=lambda r: (by_unit[r[0]].order, r[1]))
    write_slots = [(w, k) for w in writes for k in range(len(by_unit[w].outputs))]
    buffers = tuple(read_order) + tuple(s for s in write_slots if s not in reads)
    if forecast:
        buffers = tuple(h for slot in buffers for h in history_slots(slot, forecast))
        if read_order:
            buffers += (FORECAST_SLOT,)

    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    placeholders = gm.graph.find_nodes(op="placeholder")
    for ph in placeholders:
        new = graph.placeholder(ph.name)
        new.meta = dict(ph.meta)
        env[ph.name] = new
    buf_nodes: dict[tuple, fx.Node] = {}
    for slot in buffers:
        node = graph.placeholder(buffer_name(*slot))
        if slot == FORECAST_SLOT:
            node.meta["val"] = torch.empty((len(units), forecast + 1), dtype=torch.float32, device="meta")
            node.meta["fxcache.forecast"] = True
            buf_nodes[slot] = node
            continue
        unit = by_unit[slot[0]]
        src = next(n for n in gm.graph.nodes if n.name == unit.outputs[slot[1]])
        node.meta["val"] = src.meta.get("val")
        node.meta["fxcache.buffer"] = slot
        if len(slot) == 3:
            node.meta["fxcache.history"] = slot[2]
        buf_nodes[slot] = node

    row_of = {u.name: i for i, u in enumerate(units)}
    forecasts: dict[tuple, fx.Node] = {}

    def base(slot: tuple) -> fx.Node:
        """The stored value of a slot, or its forecast at this step."""
        if not forecast:
            return buf_nodes[slot]
        if slot not in forecasts:
            coef = graph.call_function(torch.ops.aten.select.int, (buf_nodes[FORECAST_SLOT], 0, row_of[slot[0]]))
            coef.meta["val"] = buf_nodes[FORECAST_SLOT].meta["val"][0]
            hist = [buf_nodes[h] for h in history_slots(slot, forecast)]
            node = graph.call_function(forecast_op, (coef, *hist, *([None] * (3 - len(hist)))))
            node.meta["val"] = buf_nodes[slot].meta["val"]
            node.meta["fxcache.forecast"] = slot
            forecasts[slot] = node
        return forecasts[slot]

    adapted: dict[tuple, fx.Node] = {}

    def adapt(slot: tuple) -> fx.Node:
        if slot not in adapted:
            if temb not in env:
                raise UnsupportedModelError(
                    f"the cache of unit '{slot[0]}' is read before the timestep embedding '{temb}' is computed, "
                    f"so its scale-shift adapter cannot be applied there"
                )
            key = adapter.key(*slot)
            prefix = f"{ADAPTER_ATTR}.linears.{key}"
            buf = base(slot)
            weight = graph.get_attr(f"{prefix}.weight")
            bias = graph.get_attr(f"{prefix}.bias")
            t = graph.call_function(torch.ops.aten.to.dtype, (env[temb], adapter.linears[key].weight.dtype))
            ss = graph.call_function(torch.ops.aten.linear.default, (t, weight, bias))
            half = adapter.linears[key].out_features // 2
            dtype = buf.meta["val"].dtype
            scale = graph.call_function(torch.ops.aten.slice.Tensor, (ss, 1, 0, half))
            shift = graph.call_function(torch.ops.aten.slice.Tensor, (ss, 1, half, 2 * half))
            scale = graph.call_function(torch.ops.aten.to.dtype, (scale, dtype))
            shift = graph.call_function(torch.ops.aten.to.dtype, (shift, dtype))
            node = graph.call_function(scale_shift_op, (buf, scale, shift, adapter.channel_dim(*slot)))
            node.meta["val"] = buf.meta["val"]
            node.meta["fxcache.fused"] = "scale_shift"
            adapted[slot] = node
        return adapted[slot]

    detached: dict[tuple, fx.Node] = {}
    restored: dict[tuple, fx.Node] = {}

    def stored(slot: tuple) -> fx.Node:
        """The unit's value from its slot: the stored value (or its forecast); for a
        residual span, the span's current input plus the stored residual (one add)."""
        unit = by_unit[slot[0]]
        if not unit.residual:
            return base(slot)
        if slot not in restored:
            x = unit.residual[slot[1]]
            r = resolver.resolve(x, _entering_view(unit))
            x_now = read(r) if r is not None else env[x]
            buf = base(slot)
            node = graph.call_function(torch.ops.aten.add.Tensor, (x_now, buf))
            want = buf.meta["val"]
            node.meta["val"] = want
            node.meta["fxcache.span_read"] = slot
            if _dtype(x_now) != want.dtype:  # the stream was cast inside the span
                node = graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": want.dtype})
                node.meta["val"] = want
            restored[slot] = node
        return restored[slot]

    def read(slot: tuple) -> fx.Node:
        """The value a user outside the unit sees: the stored value, or its adapted value."""
        return adapt(slot) if adapter is not None and adapter.has(*slot) else stored(slot)

    def load(arg: fx.Node, user: str):
        r = resolver.resolve(arg.name, lambda v: user in v.region)
        if r is not None:
            value = read(r)
            if training and value is not buf_nodes[r]:
                if r not in detached:
                    detached[r] = graph.call_function(torch.ops.aten.detach.default, (value,))
                    detached[r].meta["val"] = value.meta.get("val")
                return detached[r]
            return value
        return env[arg.name]

    executed = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or node.name not in live:
            continue
        new = graph.node_copy(node, lambda a, n=node.name: load(a, n))
        env[node.name] = new
        executed.append(node.name)
    out = gm.graph.find_nodes(op="output")[0]
    outputs = fx.map_arg(out.args[0], lambda a: load(a, out.name))
    if probes:
        taps = []
        for p in probes:
            for k in range(len(by_unit[p].outputs)):
                src = write_src[("probe", p, k)]
                taps += [read((p, k)), buf_nodes[src] if isinstance(src, tuple) else env[src]]
        outputs = (*outputs, *taps)
    outputs = fresh_outputs(graph, outputs)
    for slot in write_slots:
        src = write_src[slot]
        value = stored(src) if isinstance(src, tuple) else env[src]
        if slot in write_base:  # a residual span stores output - input
            sub = write_base[slot]
            x = stored(sub) if isinstance(sub, tuple) else env[sub]
            value = graph.call_function(torch.ops.aten.sub.Tensor, (value, x))
            value.meta["val"] = buf_nodes[slot].meta["val"]
        chain = history_slots(slot, forecast)
        for newer, older in zip(reversed(chain[:-1]), reversed(chain[1:])):  # the history shifts, oldest first
            graph.call_function(torch.ops.aten.copy_.default, (buf_nodes[older], buf_nodes[newer]))
        graph.call_function(torch.ops.aten.copy_.default, (buf_nodes[slot], value))
    graph.output(outputs)
    graph.lint()
    new_gm = _graph_module(gm, graph, adapter)
    contract.maybe_check(new_gm, units=units, where="step graph")
    flops = graph_cost(gm, [n for n in gm.graph.nodes if n.name in live]).total
    return StepGraph(
        gm=new_gm,
        reused=reused,
        writes=writes,
        reads=tuple(dict.fromkeys(r[0] for r in read_order)),
        buffers=buffers,
        flops=flops,
        nodes=len(graph.nodes),
        executed=frozenset(executed),
        probes=probes,
    )


def _dtype(node: fx.Node):
    v = node.meta.get("val")
    return v.dtype if isinstance(v, torch.Tensor) else None


def _graph_module(gm: fx.GraphModule, graph: fx.Graph, adapter) -> fx.GraphModule:
    """The step GraphModule: the model's attributes from ``gm`` (shared, never copied) and,
    with adapters, the adapter module itself as submodule :data:`ADAPTER_ATTR`."""
    if adapter is None:
        return fx.GraphModule(gm, graph, class_name="StepGraph")
    attrs = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            head, _, rest = node.target.partition(".")
            obj = adapter if head == ADAPTER_ATTR else gm
            for part in (rest if head == ADAPTER_ATTR else node.target).split("."):
                obj = getattr(obj, part) if part else obj
            attrs[node.target] = obj
    new_gm = fx.GraphModule(attrs, graph, class_name="StepGraph")
    new_gm.training = gm.training
    setattr(new_gm, ADAPTER_ATTR, adapter)  # the module itself, in place of the containers just made
    return new_gm


def fresh_outputs(graph: fx.Graph, outputs):
    """``outputs`` (an output node's argument) with every value that is a cache buffer,
    or a view of one, replaced by an ``aten.clone`` of it, inserted at the end of
    ``graph`` (before the cache writes, which the caller appends next)."""
    clones: dict = {}

    def fresh(node: fx.Node) -> fx.Node:
        if contract.buffer_alias(node) is None:
            return node
        if node not in clones:
            clone = graph.call_function(torch.ops.aten.clone.default, (node,))
            clone.meta["val"] = node.meta.get("val")
            clones[node] = clone
        return clones[node]

    return fx.map_arg(outputs, fresh)


@dataclass
class SolvedSteps:
    graphs: list[StepGraph]
    kind_of_step: list[int]
    step_kinds: list[StepKind] = field(default_factory=list)


def solve_steps(gm: fx.GraphModule, units: list[Unit], plan: Plan, adapters=None, probes=None,
                forecast: int = 0, memo: dict | None = None) -> SolvedSteps:
    """Liveness across steps, then one graph per distinct step.

    Backwards from the last step: a computed unit writes its cache only if the value
    is read at a later step before it is computed again. A periodic plan is solved over
    two periods with every cache assumed needed after the second, and the first period
    is kept: writes at the end of a period serve the next one.

    ``probes``: ``{step: units}`` for scale-shift training (see :func:`build_step_graph`);
    what a probe reads counts as read, so earlier steps write it.

    ``forecast`` > 0: a forecast reads the values of several computed steps, so a
    computed unit writes whenever any later step reads it.

    ``memo``: step graphs already built on this ``gm`` with these units and adapters,
    kept across plans by a schedule search (:mod:`fxcache.calibrate.search`), which
    runs them unfused: fusion rewrites a step graph in place.
    """
    by_unit = {u.name: u for u in units}
    plan_units = [by_unit[n] for n in plan.units]
    n_steps = plan.num_steps
    horizon = 2 * n_steps if plan.periodic else n_steps
    need = {n: plan.periodic for n in plan.units}
    per_step: list = [None] * horizon
    cache: dict = {}
    for t in reversed(range(horizon)):
        row = plan.row(t)
        reused = frozenset(n for n, c in zip(plan.units, row) if not c)
        writes = frozenset(n for n, c in zip(plan.units, row) if c and need[n])
        probed = None if probes is None else frozenset(probes.get(t % n_steps, ()))
        key = (reused, writes, probed)
        if key not in cache:
            shared = None if memo is None else memo.get((key, forecast))
            cache[key] = shared or build_step_graph(gm, plan_units, reused, writes, adapters, probed, forecast)
            if memo is not None:
                memo[(key, forecast)] = cache[key]
        sg = cache[key]
        per_step[t] = key
        read_units = set(sg.reads)
        need = {n: (n in read_units) or ((n in reused or forecast > 0) and need[n]) for n in plan.units}

    # forward check: no live read of a slot that no earlier step wrote
    written: set = set()
    for t in range(n_steps):
        sg = cache[per_step[t]]
        for r in sg.reads:
            if r not in written:
                raise PlanError(
                    f"step {t} reads the cache of unit '{r}' but no earlier step wrote it; "
                    f"compute '{r}' (or every unit enclosing it) at step {t} or earlier"
                )
        written |= set(sg.writes)

    graphs: list[StepGraph] = []
    index_of_code: dict[str, int] = {}
    kind_of_step: list[int] = []
    for t in range(n_steps):
        sg = cache[per_step[t]]
        code = sg.gm.code
        if code not in index_of_code:
            index_of_code[code] = len(graphs)
            graphs.append(sg)
        kind_of_step.append(index_of_code[code])
    kinds = []
    for i, sg in enumerate(graphs):
        steps = [t for t, k in enumerate(kind_of_step) if k == i]
        computed = tuple(n for n in plan.units if n not in sg.reused)
        kinds.append(
            StepKind(
                index=i,
                steps=steps,
                computed=computed,
                reused=tuple(n for n in plan.units if n in sg.reused),
                flops=sg.flops,
                reads=sg.reads,
                writes=sg.writes,
                nodes=sg.nodes,
            )
        )
    return SolvedSteps(graphs=graphs, kind_of_step=kind_of_step, step_kinds=kinds)
