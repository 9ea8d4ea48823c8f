"""The blend rewrite: a relaxed cache read at every unit, with the weight as an input.

Timestep-aware block masking (timestep-aware-block-masking.txt) learns, per step, which
units to compute; its optimisation relaxes "compute or read the cache" to a weight
``w ∈ [0, 1]`` per unit. This pass expresses that relaxation as one more rewrite of
the captured graph, so that mask learning differentiates the same graph the rest of the
compiler works on::

    blended = w_u * computed + (1 - w_u) * cache_u        at every output of every unit u

- ``w_u`` is a graph input per unit (a 0-d float tensor; differentiable: gradients
  reach it through the whole graph downstream);
- ``cache_u`` is a graph input per unit output (slot ``(u, k)``, the same slots as the
  step graphs' cache buffers), an ordinary input: never written in place;
- every user outside ``u`` of an output of ``u`` sees the blended value. Units nested in
  one another that return the same value blend it innermost first (a user inside the
  outer unit sees only the inner blend), as forward hooks on nested modules would;
- the graph returns the model's outputs (when asked), then the blended value of every
  slot as seen just outside its unit: the new cache values.

With every weight 1 the graph computes the model (``1 * x + 0 * cache``, bit for bit for
finite caches); with a unit's weight 0 its users see exactly its cache, which is what
the step graphs give for a reused unit (``tests/test_learn_mask.py`` checks both
against the model and the runtime). The weights are exact 0/1 at a hard mask; between,
the graph is the relaxation. Units are computed even at weight 0 (their gradient is
needed): this graph is for calibration, not inference.

With ``model_outputs=False`` the graph returns only the blended slots, and nodes that
only the model's outputs need are not kept (mask learning's "feature" is the last
unit's output, so the rest of the network does not run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from ..analyze.units import Unit
from . import contract

__all__ = ["BlendGraph", "blend_graph"]


@dataclass
class BlendGraph:
    """What :func:`blend_graph` built.

    gm:          inputs ``(*model_inputs, *weights, *caches)``, outputs
                 ``(*model_outputs, *blended)``.
    units:       unit names, one weight input each, in this order.
    slots:       ``(unit, k)`` of the cache inputs and of the blended outputs, in order.
    num_outputs: flat model outputs at the front of the outputs (0 without them).
    """

    gm: fx.GraphModule
    units: tuple
    slots: tuple
    num_outputs: int

    def __call__(self, flat: Sequence, weights: Sequence[torch.Tensor], caches: Sequence[torch.Tensor]):
        """``(model_outputs, blended)`` for flat model inputs, one weight per unit and one
        cache tensor per slot."""
        if len(weights) != len(self.units) or len(caches) != len(self.slots):
            raise ValueError(
                f"the blend graph takes {len(self.units)} weights and {len(self.slots)} caches; "
                f"got {len(weights)} and {len(caches)}"
            )
        out = self.gm(*flat, *weights, *caches)
        return list(out[: self.num_outputs]), list(out[self.num_outputs:])


def _blend(graph: fx.Graph, w: fx.Node, computed: fx.Node, cache: fx.Node) -> fx.Node:
    """``w.to(dtype) * computed + (1 - w).to(dtype) * cache`` (dtype: the value's)."""
    val = computed.meta.get("val")
    dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
    wd = graph.call_function(torch.ops.aten.to.dtype, (w, dtype))
    rest = graph.call_function(torch.ops.aten.to.dtype, (graph.call_function(torch.ops.aten.rsub.Scalar, (w, 1)), dtype))
    node = graph.call_function(
        torch.ops.aten.add.Tensor,
        (graph.call_function(torch.ops.aten.mul.Tensor, (wd, computed)),
         graph.call_function(torch.ops.aten.mul.Tensor, (rest, cache))),
    )
    node.meta["val"] = val
    node.meta["fxcache.blend"] = True
    return node


def blend_graph(gm: fx.GraphModule, units: Sequence[Unit], *, model_outputs: bool = True) -> BlendGraph:
    """The blend rewrite of the captured graph ``gm`` for ``units`` (a pass: graph in,
    graph out; ``gm`` is not changed). See the module doc."""
    units = list(units)
    by_value: dict[str, list[Unit]] = {}
    for u in units:
        for o in u.outputs:
            by_value.setdefault(o, []).append(u)
    for lst in by_value.values():  # innermost first (of equal regions, the later unit is inside)
        lst.sort(key=lambda u: (len(u.region), -u.order))
    slots = tuple((u.name, k) for u in units for k in range(len(u.outputs)))

    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for ph in gm.graph.find_nodes(op="placeholder"):
        env[ph.name] = graph.placeholder(ph.name)
        env[ph.name].meta = dict(ph.meta)
    weights = {}
    for u in units:
        w = graph.placeholder("w__" + u.name.replace(".", "_"))
        w.meta["val"] = torch.empty((), dtype=torch.float32, device="meta")
        weights[u.name] = w
    nodes = {n.name: n for n in gm.graph.nodes}
    caches = {}
    for slot in slots:
        u = next(x for x in units if x.name == slot[0])
        c = graph.placeholder("cache__" + slot[0].replace(".", "_") + f"__{slot[1]}")
        c.meta["val"] = nodes[u.outputs[slot[1]]].meta.get("val")
        caches[slot] = c

    blended: dict[tuple[str, int], fx.Node] = {}  # (value, number of blends applied) -> node

    def seen(value: str, depth: int) -> fx.Node:
        """``value`` with the first ``depth`` blends of its chain applied."""
        if depth == 0:
            return env[value]
        if (value, depth) not in blended:
            u = by_value[value][depth - 1]
            blended[(value, depth)] = _blend(
                graph, weights[u.name], seen(value, depth - 1), caches[(u.name, u.outputs.index(value))]
            )
        return blended[(value, depth)]

    def load(arg: fx.Node, user: str) -> fx.Node:
        chain = by_value.get(arg.name, ())
        depth = 0
        while depth < len(chain) and user not in chain[depth].region:
            depth += 1
        return seen(arg.name, depth)

    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        env[node.name] = graph.node_copy(node, lambda a, n=node.name: load(a, n))
    out = gm.graph.find_nodes(op="output")[0]
    outputs = list(fx.map_arg(out.args[0], lambda a: load(a, out.name))) if model_outputs else []
    by_name = {u.name: u for u in units}
    for name, k in slots:
        value = by_name[name].outputs[k]
        outputs.append(seen(value, by_value[value].index(by_name[name]) + 1))
    graph.output(tuple(outputs))
    if not model_outputs:  # keep what the blended slots need (every node is pure: capture functionalised)
        for node in reversed(list(graph.nodes)):
            if node.op == "call_function" and not node.users:
                graph.erase_node(node)
            elif node.op == "get_attr" and not node.users:
                graph.erase_node(node)
    graph.lint()
    new_gm = fx.GraphModule(gm, graph, class_name="BlendGraph")
    contract.maybe_check(new_gm, units=units, where="blend graph")
    num = len(out.args[0]) if model_outputs else 0
    return BlendGraph(gm=new_gm, units=tuple(u.name for u in units), slots=slots, num_outputs=num)
