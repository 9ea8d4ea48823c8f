"""The one build path: a model, a schedule and example inputs → the plan bound to its
step graphs (:func:`prepare`, which ``fxcache.plan_for`` also uses) → the compiled
programs, buffer specs and repair graph of one input signature (:func:`build_entry`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..analyze.units import UnitSet, find_units
from ..capture import Captured, capture
from ..errors import CacheBudgetError, CheckpointError
from ..plan import Plan, _fmt_bytes
from ..planning import lower_to_plan
from ..rewrite.step_graphs import FORECAST_SLOT, SolvedSteps, build_step_graph, solve_steps
from .options import CompileOptions

__all__ = ["Entry", "Prepared", "prepare", "build_entry", "check_cache_budget"]


@dataclass
class Prepared:
    """A capture with its units, its plan (bound to the step kinds) and its step graphs."""

    captured: Captured
    units: UnitSet
    plan: Plan
    plan_units: list
    solved: SolvedSteps
    adapters: Any  # (ScaleShift, timestep-embedding node) or None
    model_name: str = ""  # the model's class name, for messages


@dataclass
class Entry:
    """Everything built for one input-shape signature."""

    captured: Captured
    units: UnitSet
    plan: Plan
    solved: SolvedSteps
    programs: list  # per step kind: program(flat_inputs, buffers) -> flat outputs
    buffer_specs: dict  # (unit, k) -> (shape, stride, dtype)
    kind_reads: list  # per step kind: slots it reads
    kind_writes: list  # per step kind: slots it writes
    kind_stale: list  # per step kind: slots of units it computes (their old values become stale)
    repair_graph: Any  # StepGraph: everything computed, every slot written
    repair_writes: frozenset
    uid: int = 0
    repair_program: Any = None  # compiled lazily, at the first step that needs it
    adaptive: Any = None  # AdaptiveSteps (fxcache.rewrite.adaptive) of an adaptive plan, else None
    adapter_module: Any = None  # the ScaleShift adapters in use, if any
    ran: set = field(default_factory=set)  # kinds of step run at least once (compiled: the first run compiles)
    auto_steps: int | None = None  # the generation length the caller told, when the plan was made for it


def _dense_stride(val: torch.Tensor) -> tuple:
    """The value's strides when they lay it out densely (its memory format kept: a
    channels-last feature map stays channels-last), else contiguous strides: a cached
    value that is a view into a larger tensor (Flux's image stream, sliced out of the
    joint text+image sequence) must not get a buffer the size of the whole sequence."""
    stride = tuple(val.stride())
    span = 1 + sum((n - 1) * s for n, s in zip(val.shape, stride) if n > 0)
    if val.numel() == 0 or span == val.numel():
        return stride
    return tuple(torch.empty(val.shape, device="meta").stride())


def _slots(graph, units) -> frozenset:
    units = set(units)
    return frozenset(s for s in graph.buffers if s[0] in units)


def _adapters(model, schedule, options: CompileOptions, captured: Captured, units: UnitSet, plan: Plan):
    """The scale-shift adapters (option ``scale_shift`` or ``BlockCache.scale_shift``),
    checked against this model and plan, and the node of the timestep embedding."""
    source = options.scale_shift or getattr(schedule, "scale_shift", None)
    if source is None:
        return None
    from ..analyze.units import temb_output
    from ..rewrite.adapters import ScaleShift

    adapter = source if isinstance(source, ScaleShift) else ScaleShift.load(source)
    by_name = units.by_name()
    adapter.check_compatible(type(model).__name__, {u: by_name[u].out_shapes for u in by_name}, plan)
    missing = [u for u in adapter.units if u not in plan.units]
    if missing:
        raise CheckpointError(
            f"the scale-shift adapters cover units {missing} that this schedule does not cache "
            f"(it caches {list(plan.units)}): train adapters for this schedule"
        )
    adapter = adapter.to(next(model.parameters()).device)
    # an explicit argument of the rewrite: each step graph owns the adapter module
    return adapter, temb_output(captured.gm, adapter.temb_module)


def prepare(model: torch.nn.Module, schedule, options: CompileOptions, args: tuple, kwargs: dict,
            shared=None) -> Prepared:
    """Capture, find units, lower the schedule, solve the step graphs, bind the plan.

    ``shared``: a schedule search evaluating hundreds of plans on one model
    (:mod:`fxcache.calibrate.search`) passes an object whose ``capture(model, args,
    kwargs)`` returns the same capture each time (nothing below mutates the captured
    graph: the step graphs are copies) and whose ``graphs`` dict keeps the step graphs
    built so far (``solve_steps(memo=)``)."""
    captured = capture(model, args, kwargs) if shared is None else shared.capture(model, args, kwargs)
    units = find_units(captured.gm)
    plan = lower_to_plan(schedule, units, options.num_steps, type(model).__name__)
    adapters = _adapters(model, schedule, options, captured, units, plan)
    plan_units = [u for u in units if u.name in set(plan.units)]
    solved = solve_steps(captured.gm, plan_units, plan, adapters, forecast=options.forecast,
                         memo=None if shared is None else shared.graphs)
    plan = plan.bind(solved.kind_of_step, solved.step_kinds).with_forecast(options.forecast)
    return Prepared(captured, units, plan, plan_units, solved, adapters, type(model).__name__)


def check_cache_budget(plan: Plan, budget: int | None, model_name: str) -> None:
    """``max_cache_bytes``: raise :class:`CacheBudgetError` when one cache state of ``plan``
    (``plan.cache_bytes``, forecast history and adaptive state included) needs more than
    ``budget`` bytes. Nothing is checked for ``budget=None``."""
    need = plan.cache_bytes
    if budget is None or need <= budget:
        return
    by_unit = plan.cache_bytes_by_unit()
    top = ", ".join(f"{name} {_fmt_bytes(b)}" for name, b in list(by_unit.items())[:5])
    extra = []
    if plan.forecast:
        extra.append(f"forecast order {plan.forecast} keeps {plan.forecast + 1} values per slot "
                     f"(forecast=0 needs {_fmt_bytes(sum(by_unit.values()) // (plan.forecast + 1))} for the slots)")
    if plan.state_bytes:
        extra.append(f"the adaptive schedule's state buffers take {_fmt_bytes(plan.state_bytes)}")
    raise CacheBudgetError(
        f"the plan of {type(plan.schedule).__name__ if plan.schedule is not None else 'this schedule'} on "
        f"{model_name} for these input shapes needs {need} bytes ({_fmt_bytes(need)}) per cache state, more than "
        f"max_cache_bytes={budget} ({_fmt_bytes(budget)}). It caches {len(by_unit)} units; the biggest: {top}"
        + (f"; {'; '.join(extra)}" if extra else "")
        + ". Each cache context (e.g. CFG's 'cond' and 'uncond' calls) holds its own state of this size. "
        f"Choose a cheaper schedule, one that caches fewer or smaller units (FORA, FirstBlockCache and TeaCache "
        f"cache every attention and MLP sublayer; DeepCache caches one skip branch; BlockCache(units=...) or a "
        f"Mask caches the units named), forecast=0, a smaller batch or resolution, or raise max_cache_bytes"
    )


def build_entry(prepared: Prepared, options: CompileOptions, uid: int) -> Entry:
    """Fuse, add the adaptive statistic, compile one program per step kind, and lay out
    the cache buffers and the repair graph."""
    captured, units, plan, plan_units, solved, adapters = (
        prepared.captured, prepared.units, prepared.plan, prepared.plan_units, prepared.solved, prepared.adapters)
    order = options.forecast
    if options.fuse:
        from ..rewrite.fuse import fuse_cache_reads

        for g in solved.graphs:
            g.fused = fuse_cache_reads(g.gm)
    from ..rewrite.compile import build_programs

    device = next((v.device for v in captured.gm.graph.find_nodes(op="placeholder")
                   for v in [v.meta.get("val")] if isinstance(v, torch.Tensor)), torch.device("cpu"))
    compile_options, adaptive = options, None
    if plan.adaptive is not None:
        # the statistic pass (one step-graph pass per kind) and one graph per kind: two kinds
        from ..rewrite.adaptive import adapt_step_graphs

        adaptive = adapt_step_graphs(captured.gm, units, solved, plan.adaptive)
        compile_options = replace(compile_options, segments=False)
        # the state buffers are part of what one cache state holds
        plan = plan.with_state_bytes(sum(torch.Size(shape).numel() * dtype.itemsize
                                         for shape, _, dtype in adaptive.specs.values()))
    check_cache_budget(plan, options.max_cache_bytes, prepared.model_name)
    if order:
        compile_options = replace(compile_options, segments=False)  # segments carry no history slots
    programs, count, note = build_programs(captured.gm, plan_units, solved, compile_options, device, adapters)
    plan = plan.with_compile(count if options.backend is not None else 0, note)
    # the repair graph: every unit computed, every slot some kind reads written
    read_units = sorted({u for g in solved.graphs for u in g.reads}, key=list(plan.units).index)
    repair = build_step_graph(captured.gm, plan_units, (), read_units, adapters, forecast=order)
    specs = {}
    by_name = units.by_name()
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    for g in (*solved.graphs, repair):
        for slot in g.buffers:
            if adaptive is not None and slot in adaptive.specs:
                continue
            if slot == FORECAST_SLOT:
                specs[slot] = ((len(plan_units), order + 1), (order + 1, 1), torch.float32)
                continue
            val = nodes[by_name[slot[0]].outputs[slot[1]]].meta["val"]
            specs[slot] = (tuple(val.shape), _dense_stride(val), val.dtype)
    if adaptive is not None:
        specs.update(adaptive.specs)  # the state buffers: allocated, zeroed and kept like cache buffers
    return Entry(
        captured=captured,
        units=units,
        plan=plan,
        solved=solved,
        programs=programs,
        buffer_specs=specs,
        kind_reads=[_slots(g, g.reads) for g in solved.graphs],
        kind_writes=[_slots(g, g.writes) for g in solved.graphs],
        kind_stale=[frozenset(s for s in specs if s[0] not in g.reused) for g in solved.graphs],
        repair_graph=repair,
        repair_writes=_slots(repair, repair.writes),
        uid=uid,
        adaptive=adaptive,
        adapter_module=adapters[0] if adapters is not None else None,
    )
