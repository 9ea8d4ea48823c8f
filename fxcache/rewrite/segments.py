"""Per-segment graphs, for plans with many kinds of step.

Block caching gives every unit its own refresh steps, so a plan can have a distinct
kind of step at almost every step; compiling one graph per kind would make compile
cost grow with the number of steps. Instead the captured graph is cut into *segments*
at unit boundaries: maximal runs of nodes (in graph order) that belong to the same
innermost unit of the plan and are executed at exactly the same kinds of step. Each
segment is one graph, compiled once; a step runs the segments its kind needs, in
order, feeding reused units' outputs from the cache buffers and writing the caches
the liveness analysis asked for. The number of compiled graphs then grows with the
number of units, not of steps.

The step kinds, their liveness and the values read and written are exactly those of
:mod:`fxcache.rewrite.step_graphs`; only the granularity of compilation changes. The
glue between segments is Python (a dict of values and a few ``copy_``), so per-step
dispatch costs more than one whole graph: the runtime picks segments only when the
plan has more kinds of step than ``max_graphs``.

As in the whole-step graphs, an output that is a cache buffer, or a view of one (a view
computed in a segment from a buffer it was fed), is cloned before it is returned: a
later step writes the buffer in place. With ``FXCACHE_CHECK=1`` every segment graph is
checked (:mod:`fxcache.rewrite.contract`) and every step's outputs are checked to share
no storage with a buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..analyze.units import Unit
from . import contract
from .step_graphs import StepGraph, _Resolver

__all__ = ["Segment", "SegmentProgram", "build_segments"]


@dataclass
class Segment:
    index: int
    nodes: list  # original node names
    inputs: list  # original value names
    outputs: list  # original value names
    gm: fx.GraphModule
    unit: str | None
    runner: object = None


@dataclass
class SegmentProgram:
    """Runs one kind of step as a sequence of segment graphs."""

    segments: list
    order: list  # segment indices to run
    sources: dict  # segment index -> list of ("buf", slot) | ("env", name) | ("in", i)
    writes: list  # (slot, source)
    output: list  # sources of the flat outputs; ("fresh", source) is a clone of source
    adapter: object = None  # ScaleShift applied at adapted cache reads
    temb: str | None = None
    check: bool = False  # debug mode: check that no output shares storage with a buffer

    def __call__(self, flat: list, bufs: dict):
        env: dict = {}

        def get(src):
            kind, key = src
            if kind == "in":
                return flat[key]
            if kind == "buf":
                return bufs[key]
            if kind == "adapt":
                return self.adapter.apply(key[0], key[1], bufs[key], env[self.temb])
            if kind == "fresh":
                return get(key).clone()
            return env[key]

        for i in self.order:
            seg = self.segments[i]
            outs = seg.runner(*[get(s) for s in self.sources[i]])
            for name, value in zip(seg.outputs, outs):
                env[name] = value
        out = [get(s) for s in self.output]  # before the writes: a clone reads the buffer first
        for slot, src in self.writes:
            bufs[slot].copy_(get(src))
        if self.check:
            contract.check_outputs_disjoint(out, bufs, where="segment program")
        return out


def _segment_gm(root: fx.GraphModule, nodes: list[fx.Node], inputs: list[str], outputs: list[str]) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    by_name = {n.name: n for n in root.graph.nodes}
    for name in inputs:
        ph = graph.placeholder(name)
        ph.meta = dict(by_name[name].meta)
        env[name] = ph

    def load(arg: fx.Node):
        if arg.name not in env and arg.op == "get_attr":
            env[arg.name] = graph.node_copy(arg)
        return env[arg.name]

    for node in nodes:
        env[node.name] = graph.node_copy(node, load)
    graph.output(tuple(env[o] for o in outputs))
    graph.lint()
    gm = fx.GraphModule(root, graph, class_name="Segment")
    contract.maybe_check(gm, where="segment")
    return gm


def build_segments(gm: fx.GraphModule, units: list[Unit], graphs: list[StepGraph], adapters=None):
    """Cut ``gm`` into segments and return one :class:`SegmentProgram` per step kind,
    or None when some kind cannot be expressed (then per-kind graphs are used)."""
    by_unit = {u.name: u for u in units}
    if any(u.residual for u in units):  # a span read is an add of two values; segments feed buffers only
        return None, []
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    executed_any = set().union(*(g.executed for g in graphs))

    def innermost(name: str) -> str | None:
        best = None
        for u in units:
            if name in u.region and (best is None or len(u.region) < len(by_unit[best].region)):
                best = u.name
        return best

    runs: list[tuple] = []  # (key, [nodes])
    for node in nodes:
        if node.name not in executed_any:
            continue
        key = (innermost(node.name), tuple(node.name in g.executed for g in graphs))
        if runs and runs[-1][0] == key:
            runs[-1][1].append(node)
        else:
            runs.append((key, [node]))

    seg_of: dict[str, int] = {}
    for i, (_, run) in enumerate(runs):
        for n in run:
            seg_of[n.name] = i
    out_node = gm.graph.find_nodes(op="output")[0]
    adapter, temb = adapters if adapters is not None else (None, None)
    write_values = {o for g in graphs for w in g.writes for o in by_unit[w].outputs}
    if temb is not None:
        write_values.add(temb)
    segments: list[Segment] = []
    for i, (key, run) in enumerate(runs):
        names = {n.name for n in run}
        inputs: list[str] = []
        for n in run:
            for a in n.all_input_nodes:
                if a.op == "get_attr" or a.name in names or a.name in inputs:
                    continue
                inputs.append(a.name)
        outputs = [
            n.name
            for n in run
            if n.name in write_values
            or any(u.name not in names and (u.op != "call_function" or u.name in seg_of) for u in n.users)
        ]
        segments.append(Segment(i, [n.name for n in run], inputs, outputs, _segment_gm(gm, run, inputs, outputs), key[0]))

    placeholders = {p.name: i for i, p in enumerate(gm.graph.find_nodes(op="placeholder"))}
    by_name = {n.name: n for n in gm.graph.nodes}
    programs = []
    for k, g in enumerate(graphs):
        resolver = _Resolver(units, g.reused)
        order = [s.index for s in segments if runs[s.index][0][1][k]]
        available: set[str] = set(placeholders)
        sources: dict[int, list] = {}

        def may_alias_buffer(value: str, inside) -> bool:
            """The value a user sees is a plain cache read or a view of one (adapted
            reads are fresh tensors)."""
            r = resolver.resolve(value, inside)
            if r is not None:
                return not (adapter is not None and adapter.has(*r))
            node = by_name[value]
            return any(
                may_alias_buffer(a.name, lambda u, n=node.name: n in u.region) for a in contract.aliased_inputs(node)
            )

        def source(value: str, inside):
            r = resolver.resolve(value, inside)
            if r is not None:
                return ("adapt", r) if adapter is not None and adapter.has(*r) else ("buf", r)
            if value in placeholders:
                return ("in", placeholders[value])
            if value not in available:
                raise LookupError(value)
            return ("env", value)

        try:
            for i in order:
                seg = segments[i]
                first = seg.nodes[0]
                sources[i] = [source(v, lambda u, n=first: n in u.region) for v in seg.inputs]
                available |= set(seg.outputs)
            if temb is not None and any(src[0] == "adapt" for srcs in sources.values() for src in srcs):
                if temb not in available:
                    raise LookupError(temb)
            writes = []
            for w in g.writes:
                u = by_unit[w]
                for kk, o in enumerate(u.outputs):
                    writes.append(((w, kk), source(o, lambda v, u=u: v.contains(u))))
            output = []
            for a in out_node.args[0]:
                if not isinstance(a, fx.Node):
                    output.append(("const", a))
                    continue
                src = source(a.name, lambda u: False)
                output.append(("fresh", src) if may_alias_buffer(a.name, lambda u: False) else src)
        except LookupError:
            return None, segments
        if any(s[0] == "const" for s in output):
            return None, segments
        programs.append(SegmentProgram(segments, order, sources, writes, output, adapter, temb, contract.enabled()))
    return programs, segments
