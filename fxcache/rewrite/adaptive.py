"""Stage 4 for adaptive schedules: the statistic pass.

An adaptive plan (``plan.adaptive``, an :class:`~fxcache.schedules.adaptive.AdaptivePolicy`)
has two step graphs, built by ``solve_steps`` from its two-row table: the *full* kind
(every unit computed, every slot the other kind reads written) and the *reuse* kind.
This pass (graph in, graph out) adds to each of them, on the device:

- the **statistic** of the step: ``stat = sum_i |v_i - ref_i|_1 / sum_i |ref_i|_1`` over
  the probe values ``v_i`` (cast to float32; see :func:`probe_values`) and the reference
  values ``ref_i`` stored at the last fully computed step (``+inf`` while no reference
  was stored: the state buffers are zero);
- the **decision** for the *next* step: ``reuse_ok = stat < threshold``, written with the
  statistic into the state buffer ``decision = [stat, reuse_ok]`` (float32, shape (2,));
- in the full kind only, the **state update** ``ref_i <- v_i``.

TeaCache's statistic (``"rescaled_acc"``) differs in three points: ``ref`` is the
*previous step's* probe value (updated by both kinds), the relative change goes
through the policy's polynomial ``p``, and a scalar state ``acc`` sums ``p`` over the
reused steps since the last full step (reset by the full kind); the statistic is
``acc + p``, the decision ``acc + p < threshold``.

A probe value that a kind does not compute (TeaCache's modulated input is read only by
the first attention sublayer, which the reuse kind reuses) is computed from the captured
graph: the nodes it needs are copied in, provided none lies in a reused unit.

State buffers are static, like the cache buffers: allocated once per cache state and
input signature, written in place (``aten.copy_``), extra inputs after the cache
buffers. They extend the graph contract (:mod:`.contract`, invariant 1) in one point: a
state buffer may be read and then written in the same graph (``ref_i`` is compared,
then replaced); every read precedes the write in graph order, and functionalisation
(``torch.compile``) keeps that order's meaning, so the read sees the old value.
:func:`check_state_writes` checks this; the rest of the contract holds as before.

The runtime (:mod:`fxcache.runtime`) copies ``decision`` to the host without blocking
after the step and reads it when the next step is called (the one-step lag).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..analyze.residual import residual_source
from ..errors import ContractError, UnsupportedModelError
from ..plan import PlanError

__all__ = ["STATE", "AdaptiveSteps", "DecisionGraph", "probe_values", "modulated_input", "add_decision",
           "adapt_step_graphs", "check_state_writes"]

STATE = "fxcache.adaptive"
"""First element of the state slots' keys: ``(STATE, "ref", i)``, ``(STATE, "decision")``."""

DECISION = (STATE, "decision")
ACC = (STATE, "acc")


def _val(node: fx.Node):
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None


def _entering(gm: fx.GraphModule, region: frozenset) -> list[fx.Node]:
    """Nodes outside ``region`` used by a node inside it, in graph order of first use."""
    out: dict = {}
    for node in gm.graph.nodes:
        if node.name not in region:
            continue
        for arg in node.all_input_nodes:
            if arg.name not in region:
                out.setdefault(arg, None)
    return list(out)


def probe_values(gm: fx.GraphModule, units, policy) -> list[tuple[str, str | None]]:
    """The values the statistic measures, as ``(node, subtracted node or None)`` names of
    the captured graph ``gm`` (``units``: its ``UnitSet``).

    ``("residual", blocks)``: each output of the last block minus the input of the first
    block that reaches it through the residual adds, by data flow
    (:func:`fxcache.analyze.residual.residual_source`: each stream of a two-stream block
    with its own input, whatever the shapes); a block output with no such input, or
    with several, is an :class:`UnsupportedModelError`. ``("inputs", (unit,))``: the feature maps
    entering the unit's region from outside: computed nodes (not inputs of the model nor
    parameters) with at least 3 dimensions (this leaves out the timestep embedding).
    ``("modulated", (block,))``: the block's timestep-modulated input
    (:func:`modulated_input`)."""
    how, names = policy.probe
    by_name = units.by_name()
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UnsupportedModelError(f"{policy.name}: the probe units {missing} are not units of this model")
    if how == "residual":
        first, last = by_name[names[0]], by_name[names[-1]]
        what = f"{policy.name}: probe block '{last.name}'"
        out = []
        for o in last.outputs:
            sub = residual_source(gm, o, first.region, what=what)
            if sub is None:
                raise UnsupportedModelError(
                    f"{what}: no input of '{first.name}' reaches its output '{o}' through residual adds, so the "
                    f"probe's residual (output - input) is not defined; FirstBlockCache needs residual blocks"
                )
            out.append((o, sub))
        return out
    if how == "inputs":
        unit = by_name[names[0]]
        feats = [a for a in _entering(gm, unit.region)
                 if a.op == "call_function" and (v := _val(a)) is not None and v.ndim >= 3 and v.is_floating_point()]
        if not feats:
            raise UnsupportedModelError(
                f"{policy.name}: no feature map (a computed tensor of 3 or more dimensions) enters unit "
                f"'{unit.name}', so there is nothing to measure its change by"
            )
        return [(a.name, None) for a in feats]
    if how == "modulated":
        return [(modulated_input(gm, by_name[names[0]], policy.name), None)]
    raise PlanError(f"{policy.name}: unknown probe {how!r}")


#: names of the model input the timestep arrives in (as :mod:`fxcache.capture` reads them)
_TIMESTEP_NAMES = ("timestep", "timesteps", "t")
_MODULATE = (torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor)


def _timestep_dependent(gm: fx.GraphModule, cut: set) -> set:
    """Names of the nodes whose value depends on the model's timestep input other than
    through the nodes named in ``cut`` (a block's incoming hidden states: in a U-Net they
    depend on the timestep through the resnets before the block, which does not make a
    norm of them timestep-modulated)."""
    dep = {n.name for n in gm.graph.find_nodes(op="placeholder") if n.name in _TIMESTEP_NAMES}
    for node in gm.graph.nodes:
        if node.name not in dep and node.name not in cut and any(a.name in dep for a in node.all_input_nodes):
            dep.add(node.name)
    return dep - cut


def modulated_input(gm: fx.GraphModule, block, name: str = "TeaCache") -> str:
    """The timestep-modulated input of ``block`` (a ``Unit``), TeaCache's probe: the value
    leaving the block's ``norm1`` with the block's shape, when it depends on the timestep
    (adaLN inside ``norm1``: DiT, Flux, SD3, CogVideoX); else, when ``norm1`` is a plain
    norm that the block's forward modulates afterwards (PixArt's ``ada_norm_single``:
    ``norm1(x) * (1 + scale_msa) + shift_msa``), the value after that modulation: the
    chain of ``mul``/``add`` users of the norm's output, inside the block and of its
    shape, whose other operand depends on the timestep. "Depends on the timestep" means
    other than through the hidden states entering the block (in a U-Net those depend on
    it through the resnets before). A block with neither (a plain
    LayerNorm whose output no timestep-dependent scale or shift follows, as in SD's
    U-Net transformer blocks) is an :class:`UnsupportedModelError`."""
    base = block.module or block.name
    nodes = {n.name: n for n in gm.graph.nodes}
    out_val = _val(nodes[block.outputs[0]])
    shape = None if out_val is None else tuple(out_val.shape)
    # the block's first norm: ``norm1`` in most families, the image stream's ``img_norm1`` in
    # two-stream blocks that name their streams (QwenImage)
    paths = {p for n in gm.graph.nodes for p, _ in (n.meta.get("nn_module_stack") or {}).values()}
    module = next((f"{base}.{c}" for c in ("norm1", "img_norm1", "norm1_x") if f"{base}.{c}" in paths),
                  f"{base}.norm1")
    inside = [n for n in gm.graph.nodes
              if any(p == module or p.startswith(module + ".") for p, _ in (n.meta.get("nn_module_stack") or {}).values())]
    names_in = {n.name for n in inside}
    leaving = next((n for n in inside if (v := _val(n)) is not None and tuple(v.shape) == shape
                    and any(u.name not in names_in for u in n.users)), None)
    if leaving is None:
        raise UnsupportedModelError(
            f"{name}: no value leaves '{module}' with the block's shape {shape}; this block has no norm1 output "
            f"to probe for its timestep-modulated input"
        )
    # the hidden states entering the block (of the shape of one of its outputs) count as
    # timestep-free: what is modulated is modulated inside the block
    out_shapes = {tuple(v.shape) for o in block.outputs if (v := _val(nodes[o])) is not None}
    cut = {a.name for a in _entering(gm, block.region) if (v := _val(a)) is not None and tuple(v.shape) in out_shapes}
    dep = _timestep_dependent(gm, cut)
    if not any(n.op == "placeholder" for n in gm.graph.nodes if n.name in dep):
        raise UnsupportedModelError(
            f"{name}: the model has no timestep input named one of {list(_TIMESTEP_NAMES)}, so the "
            f"timestep-modulated input of '{block.name}' cannot be told from the graph"
        )

    def modulation(v):  # the users of v that scale or shift it by a timestep-dependent tensor
        return [u for u in v.users
                if u.op == "call_function" and u.target in _MODULATE and u.name in block.region
                and (w := _val(u)) is not None and tuple(w.shape) == shape
                and any(isinstance(a, fx.Node) and a is not v and a.name in dep for a in u.args)]

    value = leaving
    if value.name not in dep:  # a plain norm: follow the block's modulation of it (scale, then shift)
        while len(step := modulation(value)) == 1:
            value = step[0]
    if value.name not in dep:
        raise UnsupportedModelError(
            f"{name}: the output of '{module}' ('{leaving.name}') does not depend on the timestep, and no "
            f"timestep-dependent scale or shift is applied to it in '{block.name}'; TeaCache measures the "
            f"timestep-modulated input of the first block (adaLN), which this model's blocks do not have"
        )
    return value.name


@dataclass
class DecisionGraph:
    """What :func:`add_decision` added: state slots in placeholder order and their specs
    ``slot -> (shape, stride, dtype)``."""

    slots: tuple
    specs: dict


def add_decision(
    gm: fx.GraphModule, probes, policy, *, full: bool, source: fx.GraphModule | None = None, reused=(),
    group: str | None = None,
) -> tuple[fx.GraphModule, DecisionGraph]:
    """A copy of step graph ``gm`` that also computes the policy's statistic and decision
    (module doc); ``full``: this kind computes every unit (it stores the reference).
    ``probes``: :func:`probe_values`. A probe value that this kind does not compute (the
    modulated input that only a reused sublayer reads) is computed from ``source``, the
    captured graph: its nodes that ``gm`` lacks are copied, provided none of them
    is an output of a unit of ``reused`` (``Unit`` objects: their values are not this
    step's; nodes inside them that the probe needs are computed afresh).

    ``group``: the name of a process group (context parallelism: each rank holds a shard
    of the probe values). The statistic's numerator and denominator are then summed over
    the group on the device (one functional ``all_reduce`` in the graph, no host sync),
    so every rank computes the statistic of the whole tensor and makes the same
    decision."""
    if policy.statistic not in ("rel_l1", "rescaled_acc"):
        raise PlanError(f"{policy.name}: unknown statistic {policy.statistic!r}")
    teacache = policy.statistic == "rescaled_acc"
    graph = fx.Graph()
    val_map: dict = {}
    out_value = graph.graph_copy(gm.graph, val_map)
    graph.output(out_value)
    by_name = {old.name: new for old, new in val_map.items()}
    if source is not None:
        _materialize(graph, by_name, source, [n for p in probes for n in p if n is not None], reused, policy)
    placeholders = graph.find_nodes(op="placeholder")
    aten = torch.ops.aten

    specs: dict = {}
    with graph.inserting_after(placeholders[-1]):
        dec_ph = graph.placeholder("adaptive__decision")
    dec_ph.meta["fxcache.state"] = DECISION
    acc_ph = None
    if teacache:
        with graph.inserting_before(dec_ph):
            acc_ph = graph.placeholder("adaptive__acc")
        acc_ph.meta["fxcache.state"] = ACC
    refs = []
    for i, _ in enumerate(probes):
        with graph.inserting_before(dec_ph):
            ph = graph.placeholder(f"adaptive__ref_{i}")
        ph.meta["fxcache.state"] = (STATE, "ref", i)
        refs.append(ph)
    output = graph.find_nodes(op="output")[0]
    f32 = torch.float32
    num = den = None
    values = []
    with graph.inserting_before(output):
        for i, (name, sub) in enumerate(probes):
            for n in (name, sub):
                if n is not None and n not in by_name:
                    raise UnsupportedModelError(
                        f"{policy.name}: the probe value '{n}' is not computed in every kind of step, so the "
                        f"statistic cannot be measured at each step; choose another probe"
                    )
            node = by_name[name]
            val = _val(node)
            if val is None:
                raise UnsupportedModelError(f"{policy.name}: the probe value '{name}' is not a tensor")
            raw = node if sub is None else graph.call_function(aten.sub.Tensor, (node, by_name[sub]))
            dtype = val.dtype if sub is None else torch.promote_types(val.dtype, _val(by_name[sub]).dtype)
            v = graph.call_function(aten._to_copy.default, (raw,), {"dtype": f32})
            # the reference is stored in the probe's own dtype (bf16 on a bf16 model: half the
            # bytes of float32, and exactly the value the float32 statistic reads back)
            values.append(raw)
            shape = tuple(val.shape)
            stride = tuple(torch.empty(shape).stride())
            specs[(STATE, "ref", i)] = (shape, stride, dtype)
            ref = refs[i] if dtype == f32 else graph.call_function(aten._to_copy.default, (refs[i],), {"dtype": f32})
            d = graph.call_function(aten.sub.Tensor, (v, ref))
            n_i = graph.call_function(aten.sum.default, (graph.call_function(aten.abs.default, (d,)),))
            d_i = graph.call_function(aten.sum.default, (graph.call_function(aten.abs.default, (ref,)),))
            num = n_i if num is None else graph.call_function(aten.add.Tensor, (num, n_i))
            den = d_i if den is None else graph.call_function(aten.add.Tensor, (den, d_i))
        if group is not None:  # the whole tensor's sums, identical on every rank
            both = graph.call_function(aten.stack.default, ([num, den],))
            c10d = torch.ops._c10d_functional
            both = graph.call_function(c10d.all_reduce.default, (both, "sum", group))
            both = graph.call_function(c10d.wait_tensor.default, (both,))
            num = graph.call_function(aten.select.int, (both, 0, 0))
            den = graph.call_function(aten.select.int, (both, 0, 1))
        has_ref = graph.call_function(aten.gt.Scalar, (den, 0.0))
        ratio = graph.call_function(aten.div.Tensor, (num, den))
        if teacache:
            # p(rel) by Horner (coefficients highest power first, as numpy.polyval); the
            # error the next step would accumulate: the sum since the last full step
            # (0 at a full step) plus this step's, with the next change estimated by this one
            rescaled = None
            for c in policy.coefficients:
                rescaled = (graph.call_function(aten.mul.Tensor, (ratio, 0.0)) if rescaled is None
                            else graph.call_function(aten.mul.Tensor, (rescaled, ratio)))
                rescaled = graph.call_function(aten.add.Tensor, (rescaled, float(c)))
            if full:
                acc_new = graph.call_function(aten.mul.Tensor, (acc_ph, 0.0))
            else:
                acc_new = graph.call_function(aten.add.Tensor, (acc_ph, rescaled))
            pred = graph.call_function(aten.add.Tensor, (acc_new, rescaled))
            stat = graph.call_function(aten.where.ScalarOther, (has_ref, pred, float("inf")))
            acc_new = graph.call_function(aten.where.ScalarOther, (has_ref, acc_new, 0.0))
        else:
            stat = graph.call_function(aten.where.ScalarOther, (has_ref, ratio, float("inf")))
        reuse = graph.call_function(aten.lt.Scalar, (stat, float(policy.threshold)))
        reuse = graph.call_function(aten._to_copy.default, (reuse,), {"dtype": f32})
        decision = graph.call_function(aten.stack.default, ([stat, reuse],))
        graph.call_function(aten.copy_.default, (dec_ph, decision))
        if full or teacache:  # TeaCache compares with the previous step, whatever it ran
            for ref, v in zip(refs, values):
                graph.call_function(aten.copy_.default, (ref, v))
        if teacache:
            graph.call_function(aten.copy_.default, (acc_ph, acc_new))
    specs[DECISION] = ((2,), (1,), f32)
    if teacache:
        specs[ACC] = ((), (), f32)
    # the state slots in placeholder order (the order the runtime passes the buffers in)
    slots = [ph.meta["fxcache.state"] for ph in graph.find_nodes(op="placeholder") if "fxcache.state" in ph.meta]
    graph.lint()
    attrs = {}  # the step graph's attributes, and the captured graph's that copied probe nodes read
    for node in (*graph.find_nodes(op="get_attr"), *graph.find_nodes(op="call_module")):
        try:
            attrs[node.target] = _get_attr(gm, node.target)
        except AttributeError:
            attrs[node.target] = _get_attr(source, node.target)
    new = fx.GraphModule(attrs, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    check_state_writes(new)
    return new, DecisionGraph(slots=tuple(slots), specs=specs)


def _get_attr(module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _materialize(graph: fx.Graph, by_name: dict, source: fx.GraphModule, names, reused, policy) -> None:
    """Copy into ``graph`` (before its output) the nodes of ``source`` that the values
    ``names`` need and ``graph`` lacks, in ``source``'s order."""
    src = {n.name: n for n in source.graph.nodes}
    needed: list = []
    seen: set = set()
    stack = [src[n] for n in names if n not in by_name]
    while stack:
        node = stack.pop()
        if node.name in seen or node.name in by_name:
            continue
        if node.op == "placeholder":
            raise UnsupportedModelError(f"{policy.name}: the probe needs the model input '{node.name}', not in this graph")
        seen.add(node.name)
        needed.append(node)
        stack.extend(node.all_input_nodes)
    if not needed:
        return
    # nodes inside a reused unit are computed afresh from this step's values (TeaCache's
    # modulated input inside a reused span), but not the unit's own outputs: that would
    # run what the step reuses
    bad = [(n.name, u.name) for n in needed for u in reused if n.name in u.outputs]
    if bad:
        raise UnsupportedModelError(
            f"{policy.name}: the probe value needs '{bad[0][0]}', the value of unit '{bad[0][1]}', which this "
            f"kind of step reuses; choose a probe outside the reused units"
        )
    order = {n.name: i for i, n in enumerate(source.graph.nodes)}
    output = graph.find_nodes(op="output")[0]
    with graph.inserting_before(output):
        for node in sorted(needed, key=lambda n: order[n.name]):
            by_name[node.name] = graph.node_copy(node, lambda a: by_name[a.name])


def check_state_writes(gm: fx.GraphModule) -> None:
    """The state buffers' share of the graph contract: each written at most once, by a
    ``copy_`` that is a sink and comes after every read of the buffer."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for ph in gm.graph.find_nodes(op="placeholder"):
        if "fxcache.state" not in ph.meta:
            continue
        writes = [u for u in ph.users if u.target is torch.ops.aten.copy_.default and u.args[0] is ph]
        if len(writes) > 1 or any(w.users for w in writes):
            raise ContractError(f"state buffer '{ph.name}' is written more than once, or its write is used")
        if writes:
            late = [u.name for u in ph.users if u is not writes[0] and order[u] > order[writes[0]]]
            if late:
                raise ContractError(f"state buffer '{ph.name}' is read by {late} after it is written")


@dataclass
class AdaptiveSteps:
    """The adaptive part of an entry: the policy, which kind is full and which reuses, and
    the state slots (in every kind's buffer order, after the cache slots)."""

    policy: object
    full_kind: int
    reuse_kind: int
    slots: tuple
    specs: dict
    probes: list


def decision_group(gm: fx.GraphModule, policy) -> str | None:
    """The process group the adaptive statistic is all-reduced over: the one group the
    captured graph's collectives use (context parallelism shards the probe values over
    it), or None when the capture holds no collective (one process, or data parallel:
    each rank decides for its own samples)."""
    groups = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and "c10d" in str(getattr(n.target, "namespace", "")):
            groups.update(a for a in n.args if isinstance(a, str) and a not in ("sum", "avg", "max", "min"))
    if len(groups) > 1:
        raise UnsupportedModelError(
            f"{policy.name}: the captured graph's collectives use several process groups ({sorted(groups)}: "
            f"e.g. ring and Ulysses meshes together); fxcache all-reduces an adaptive decision over one group "
            f"only. Use one parallel degree, or a static schedule (FORA, DeepCache, BlockCache, Mask)"
        )
    return next(iter(groups), None)


def adapt_step_graphs(gm: fx.GraphModule, units, solved, policy) -> AdaptiveSteps:
    """Apply :func:`add_decision` to the two step graphs ``solve_steps`` built for an
    adaptive plan (``solved``, changed in place: each graph's ``gm`` and ``buffers``)."""
    group = decision_group(gm, policy)
    full_kind, reuse_kind = solved.kind_of_step[0], solved.kind_of_step[1]
    if len(solved.graphs) != 2 or full_kind == reuse_kind:
        raise PlanError(
            f"{policy.name}: the full and the reused step compile to {len(solved.graphs)} distinct graph(s); "
            f"an adaptive plan needs a step that reuses something"
        )
    probes = probe_values(gm, units, policy)
    result = None
    for k, g in enumerate(solved.graphs):
        reused = [u for u in units if u.name in g.reused]
        g.gm, result = add_decision(g.gm, probes, policy, full=(k == full_kind), source=gm, reused=reused,
                                    group=group)
        g.buffers = tuple(g.buffers) + result.slots
    return AdaptiveSteps(policy, full_kind, reuse_kind, result.slots, result.specs, probes)
