"""Stage 7, run: :class:`CachedModel`, the drop-in replacement for a denoiser.

``CachedModel`` holds, per input shape signature, the captured graph, the plan, one
(compiled) graph per kind of step and the static cache buffers, and per cache context
the current step. Calling it runs the graph of the current step's kind.

**When does a new generation start?** (the cache is never carried into another image)

1. ``reset()``, entering ``with model.generation():``, or a pipeline call when the
   pipeline was prepared with :func:`fxcache.attach`;
2. the timestep did not decrease: every diffusers scheduler walks timesteps
   downwards, so a timestep larger than the previous call's starts a new generation.
   This is read only when the timestep tensor lives on the CPU (as in
   ``DDPMPipeline``), where reading it costs no device synchronisation; a timestep on
   an accelerator (``DiTPipeline`` moves it there) is never read;
3. a non-periodic plan (block caching, learned masks, non-uniform DeepCache) ran out
   of steps: the next call is step 0 of a new generation.

Limits: with the timestep on an accelerator and a periodic plan, two generations run
back to back continue the step count unless rule 1 is used; repeated timesteps (Heun's
method calls the model twice per timestep) count as separate steps.

The per-step path does no logging and no device-to-host synchronisation: it flattens
the inputs, looks up the shape signature, picks the graph and calls it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from .analyze.units import UnitSet, find_units
from .capture import Captured, capture, flatten_call, signature_of
from .errors import CheckpointError, UnitError
from .plan import Plan
from .rewrite.step_graphs import SolvedSteps, solve_steps
from .dropin import DropIn

__all__ = ["CachedModel", "CompileOptions"]


@dataclass(frozen=True)
class CompileOptions:
    """How step graphs are compiled. ``backend=None`` runs the FX graphs as they are."""

    backend: str | None = "inductor"
    mode: str | None = None
    num_steps: int | None = None
    max_shapes: int = 4
    fuse: bool = True
    freezing: bool | None = None  # inductor only; None means True (see rewrite/compile.py)
    options: dict | None = None
    segments: bool | str = "auto"  # per-segment graphs when kinds of step > max_graphs
    max_graphs: int = 8
    scale_shift: object = None  # ScaleShift adapters or a path to their checkpoint


@dataclass
class _Entry:
    """Everything built for one input-shape signature."""

    captured: Captured
    units: UnitSet
    plan: Plan
    solved: SolvedSteps
    programs: list  # per step kind: program(flat_inputs, buffers) -> flat outputs
    timestep_index: int | None
    buffer_specs: dict  # (unit, k) -> (shape, stride, dtype)


@dataclass
class _State:
    step: int = 0
    last_t: float | None = None
    buffers: dict = field(default_factory=dict)  # signature -> {(unit, k): tensor}


class CachedModel(DropIn):
    """A denoiser that runs each step with only what its plan says to recompute."""

    def __init__(self, model: torch.nn.Module, schedule, options: CompileOptions | None = None):
        super().__init__(model)
        self.schedule = schedule
        self.options = options or CompileOptions()
        self._entries: OrderedDict = OrderedDict()
        self._states: dict = {}
        self._context: str | None = None
        self._last_entry: _Entry | None = None
        self._forward_params = list(inspect.signature(model.forward).parameters)

    # ------------------------------------------------------------ drop-in bits
    def __repr__(self) -> str:
        return f"CachedModel({type(self.model).__name__}, {self.schedule!r})"

    @property
    def plan(self) -> Plan:
        """The plan of the most recent input shape (available after the first call)."""
        if self._last_entry is None:
            raise RuntimeError(
                "the plan is built at the first call (it depends on the input shapes); call the model "
                "once, or use fxcache.plan_for(model, schedule, *example_args) to build it without running"
            )
        return self._last_entry.plan

    @property
    def entries(self) -> list:
        return list(self._entries.values())

    # ------------------------------------------------------------ generations
    def reset(self) -> None:
        """Start a new generation in every cache context (buffers are kept, not cleared)."""
        for state in self._states.values():
            state.step = 0
            state.last_t = None

    @contextlib.contextmanager
    def generation(self):
        """``with model.generation(): ...`` runs one generation from step 0."""
        self.reset()
        try:
            yield self
        finally:
            self.reset()

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """Separate cache state (step count and buffers) per name, as diffusers' ``cache_context``."""
        previous = self._context
        self._context = name
        try:
            yield
        finally:
            self._context = previous

    def _state(self) -> _State:
        state = self._states.get(self._context)
        if state is None:
            state = self._states[self._context] = _State()
        return state

    @property
    def step(self) -> int:
        """The step the next call runs (in the current cache context)."""
        return self._state().step

    # ------------------------------------------------------------------ build
    def _timestep_index(self, args: tuple, kwargs: dict) -> int | None:
        marked_args = list(args)
        marked_kwargs = dict(kwargs)
        name = next((n for n in ("timestep", "timesteps", "t") if n in self._forward_params), None)
        if name is None:
            return None
        pos = self._forward_params.index(name)
        marker = object()
        if name in marked_kwargs:
            marked_kwargs[name] = marker
        elif pos < len(marked_args):
            marked_args[pos] = marker
        else:
            return None
        flat, _ = pytree.tree_flatten((tuple(marked_args), marked_kwargs))
        for i, leaf in enumerate(flat):
            if leaf is marker:
                return i
        return None

    def _build(self, args: tuple, kwargs: dict, signature: tuple) -> _Entry:
        from .api import _lower_to_plan  # local: api imports this module

        captured = capture(self.model, args, kwargs)
        units = find_units(captured.gm)
        plan = _lower_to_plan(self.schedule, units, self.options.num_steps)
        adapters = self._adapters(captured, units, plan)
        solved = solve_steps(captured.gm, [u for u in units if u.name in set(plan.units)], plan, adapters)
        plan._bind(solved.kind_of_step, solved.step_kinds)
        if self.options.fuse:
            from .rewrite.fuse import fuse_cache_reads

            for g in solved.graphs:
                g.fused = fuse_cache_reads(g.gm)
        from .rewrite.compile import build_programs

        device = next((v.device for v in captured.gm.graph.find_nodes(op="placeholder")
                       for v in [v.meta.get("val")] if isinstance(v, torch.Tensor)), torch.device("cpu"))
        programs, count, note = build_programs(
            captured.gm, [u for u in units if u.name in set(plan.units)], solved, self.options, device, adapters
        )
        plan.compiled_graphs = count if self.options.backend is not None else 0
        plan.compile_note = note
        specs = {}
        by_name = units.by_name()
        for g in solved.graphs:
            for slot in g.buffers:
                node_name = by_name[slot[0]].outputs[slot[1]]
                val = next(n for n in captured.gm.graph.nodes if n.name == node_name).meta["val"]
                specs[slot] = (tuple(val.shape), tuple(val.stride()), val.dtype)
        norm_args, norm_kwargs = args, kwargs
        entry = _Entry(
            captured=captured,
            units=units,
            plan=plan,
            solved=solved,
            programs=programs,
            timestep_index=self._timestep_index(norm_args, norm_kwargs),
            buffer_specs=specs,
        )
        self._entries[signature] = entry
        while len(self._entries) > self.options.max_shapes:
            old_sig, _ = self._entries.popitem(last=False)
            for state in self._states.values():
                state.buffers.pop(old_sig, None)
        return entry

    def _adapters(self, captured: Captured, units: UnitSet, plan: Plan):
        """The scale-shift adapters (option ``scale_shift`` or ``BlockCache.scale_shift``),
        checked against this model and plan, and the node of the timestep embedding."""
        source = self.options.scale_shift or getattr(self.schedule, "scale_shift", None)
        if source is None:
            return None
        from .analyze.units import temb_output
        from .calibrate.scale_shift import ScaleShift

        adapter = source if isinstance(source, ScaleShift) else ScaleShift.load(source)
        by_name = units.by_name()
        adapter.check_compatible(type(self.model).__name__, {u: by_name[u].out_shapes for u in by_name})
        missing = [u for u in adapter.units if u not in plan.units]
        if missing:
            raise CheckpointError(
                f"the scale-shift adapters cover units {missing} that this schedule does not cache "
                f"(it caches {list(plan.units)}): train adapters for this schedule"
            )
        adapter = adapter.to(next(self.model.parameters()).device)
        self.scale_shift_adapters = adapter
        captured.gm.fxcache_scale_shift = adapter
        return adapter, temb_output(captured.gm, adapter.temb_module)

    def _cache_buffers(self, state: _State, signature: tuple, entry: _Entry, device: torch.device) -> dict:
        bufs = state.buffers.get(signature)
        if bufs is None:
            bufs = {}
            for slot, (shape, stride, dtype) in entry.buffer_specs.items():
                # same strides as the value the model produces: kernels downstream of a
                # cache read then see exactly the layout they see in the model
                bufs[slot] = torch.zeros_like(torch.empty_strided(shape, stride, dtype=dtype, device=device))
                if device.type == "cuda":
                    torch._dynamo.mark_static_address(bufs[slot])
            state.buffers[signature] = bufs
        return bufs

    # -------------------------------------------------------------------- run
    def forward(self, *args, **kwargs) -> Any:
        flat, spec = flatten_call(self.model, args, kwargs)
        signature = signature_of(flat, spec)
        entry = self._entries.get(signature)
        if entry is None:
            args_n, kwargs_n = pytree.tree_unflatten(flat, spec)
            entry = self._build(args_n, kwargs_n, signature)
        else:
            self._entries.move_to_end(signature)
        self._last_entry = entry
        state = self._state()
        plan = entry.plan
        if entry.timestep_index is not None:
            t = flat[entry.timestep_index]
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                value = float(t.reshape(-1)[0])
                if state.last_t is not None and value > state.last_t:
                    state.step = 0
                state.last_t = value
        if not plan.periodic and state.step >= plan.num_steps:
            state.step = 0
        step = state.step
        kind = plan.kind_of_step(step)
        device = next((x.device for x in flat if isinstance(x, torch.Tensor)), torch.device("cpu"))
        bufs = self._cache_buffers(state, signature, entry, device)
        out = entry.programs[kind](flat, bufs)
        state.step = step + 1
        return pytree.tree_unflatten(list(out), entry.captured.out_spec)
