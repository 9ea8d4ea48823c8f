"""Stage 7, run: :class:`CachedModel`, the drop-in replacement for a denoiser.

``CachedModel`` holds, per input shape signature, the captured graph, the plan and one
(compiled) graph per kind of step (an *entry*), and, per thread and cache context, the
generation state: the current step, the static cache buffers and which of their slots
hold a value written in the current generation. Calling it runs the graph of the
current step's kind.

The contract (DESIGN.md §2): the output is what the plan means (the model run as
written; a unit not computed at a step yields its value from the last step *of this
generation* that computed it) or an :class:`~fxcache.errors.FxcacheError`. The
runtime's share of it:

**Valid slots.** The host tracks, per thread, cache context and input signature,
which cache slots were written in the current generation by the step that last
computed their unit (a step that computes a unit without writing its slot makes the
slot stale). When the kind of the current step would read a slot that is not valid
(the batch, resolution or dtype changed part-way, an entry was evicted, a step index
jumped), the step runs the *repair* graph instead: everything computed, every slot
written. No device sync: this is bookkeeping on Python sets.

**When does a new generation start?** (checked in this order; the first that applies wins)

1. ``reset()``, entering ``with model.generation():``, ``_reset_stateful_cache()``
   (diffusers pipelines call it on every component at the end of every call, through
   ``maybe_free_model_hooks()``), or a pipeline call prepared with
   :func:`fxcache.attach`;
2. ``cache_context(name, step_index=i)`` (diffusers' keyword): step ``i`` is used as
   given, and ``i == 0`` starts a new generation;
3. the timestep (option ``timestep_rule``, default ``"auto"``):

   - readable without a device sync (a CPU tensor or a Python number): a generation's
     timesteps are monotonic; the second call fixes the direction (descending for
     sampling, ascending for DDIM inversion), and a timestep equal to the previous one
     or one that turns back starts a new generation. ``repeated_timesteps=True``
     (Heun-like schedulers that call the model twice per timestep) lets equal
     timesteps continue the generation;
   - on an accelerator (never read): the storage rule. Pipelines pass a view of the
     scheduler's timestep tensor (``for t in timesteps``). The same storage with a
     larger offset continues the generation; the same storage with an offset that
     does not grow, or a view of another storage, starts a new one. A timestep that is
     not a view (computed afresh at each call, e.g. ``t / 1000``) says nothing, and
     the step count continues;
   - ``"values"`` / ``"storage"`` force one of the two; ``"off"`` disables the rule.
4. A plan that is not periodic (block caching, learned masks, non-uniform DeepCache)
   covers ``num_steps`` steps; a call past its end is not wrapped to step 0: it warns
   once and computes everything (the repair graph), which is always correct.

**Threads.** The cache context and every generation state are per thread: two threads
calling one ``CachedModel`` each get their own step count and buffers (the compiled
graphs are shared). ``reset()`` resets the calling thread's states.

**Autograd.** Step graphs are for inference. With grad mode on and no input requiring
grad, a step runs under ``torch.no_grad()`` (the output does not require grad; nothing
chains into the buffers). An input that requires grad raises
:class:`UnsupportedCallError`: train on the original model. Buffers are never
inference tensors (they are made outside ``torch.inference_mode``), so a generation
under ``inference_mode`` does not poison later ``no_grad`` calls.

**Module changes.** A submodule, parameter or buffer replaced after capture (peft
``add_adapter``, ``set_attn_processor``, ``load_state_dict(assign=True)``, a new
``nn.Parameter``, ``model.to(dtype)``) is seen, and the model is captured again:
torch's global registration hooks bump a counter (one integer compare per step), and
a fingerprint of module, processor and parameter identities is compared at the start
of every generation and whenever the counter moved. In-place edits of weights need no
recapture: the graphs read the parameters themselves.

**Training mode.** Capture is in eval mode; a model left in training mode runs the
eval-mode graph and warns once.

**Adaptive plans** (``plan.adaptive``: FirstBlockCache, AdaptiveDeepCache). The two
step graphs also compute the policy's statistic on the device and write the decision
for the *next* step into a static state buffer (:mod:`fxcache.rewrite.adaptive`). After
each step the runtime queues a copy of it to the host (``non_blocking`` into pinned
memory and a CUDA event on CUDA; a plain copy on the CPU) and reads it, through a NumPy
view, when the next step of the same generation, cache context and input signature is
called: the one-step lag. The host limits (``first_steps``, ``last_steps``,
``max_reuse``) and the valid slots apply on top. Without such a previous step (a new
generation, shape or step jump) the state buffers are zeroed on the device and the step
computes everything. :meth:`CachedModel.decisions` returns the record.

The per-step path does no logging and no device-to-host synchronisation.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.utils._pytree as pytree

from .analyze.units import UnitSet, find_units
from .capture import Captured, capture, flatten_call, signature_of
from .dropin import DropIn
from .errors import CheckpointError, FxcacheError
from .plan import Plan
from .planning import lower_to_plan
from .rewrite.adaptive import DECISION as STATE_DECISION
from .rewrite.step_graphs import FORECAST_SLOT, SolvedSteps, build_step_graph, forecast_weights, solve_steps

__all__ = ["CachedModel", "CompileOptions", "Decisions", "UnsupportedCallError"]

TIMESTEP_RULES = ("auto", "values", "storage", "off")


class UnsupportedCallError(FxcacheError, RuntimeError):
    """A call that the cached graphs cannot honour (e.g. inputs that require grad)."""


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
    timestep_rule: str = "auto"  # see "When does a new generation start?"
    repeated_timesteps: bool = False  # Heun-like schedulers: equal timesteps continue a generation
    forecast: int = 0  # cache reads: 0 reuse, 1/2 extrapolate over the last computed steps


# ------------------------------------------------------------ module changes
# torch calls these global hooks whenever any module registers (or is assigned) a
# parameter, buffer or submodule; the counter tells a CachedModel, for the price of one
# integer compare per step, that its fingerprint may have changed.
_MODULE_EPOCH = [0]


def _bump(*_args):
    _MODULE_EPOCH[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_bump)
torch.nn.modules.module.register_module_buffer_registration_hook(_bump)
torch.nn.modules.module.register_module_module_registration_hook(_bump)


def _fingerprint(model: torch.nn.Module) -> tuple:
    """Identities of everything the captured graph baked in: modules, their attention
    processors, instance-level forward patches and forward hooks, parameters and buffers (object,
    dtype, shape, device; not the storage: the graphs read each parameter object at
    every call, so ``param.data = ...`` of the same kind, as offloading does, is seen
    without capturing again). Reads no tensor values: no device sync."""
    parts: list = []
    for name, m in model.named_modules(remove_duplicate=False):
        d = m.__dict__
        parts.append((name, id(m), type(m), id(d.get("processor")), id(d.get("forward")),
                      len(m._forward_hooks), len(m._forward_pre_hooks)))
        for pname, p in m._parameters.items():
            parts.append((pname, None if p is None else (id(p), p.dtype, tuple(p.shape), p.device)))
        for bname, b in m._buffers.items():
            parts.append((bname, None if b is None else (id(b), b.dtype, tuple(b.shape), b.device)))
    return tuple(parts)


# ------------------------------------------------------------------- entries
@dataclass
class _Entry:
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


@dataclass
class _State:
    """One generation's state, per thread and cache context."""

    step: int = 0
    last_t: float | None = None  # the values rule
    direction: int = 0  # +1 ascending, -1 descending, 0 not known yet
    last_storage: tuple | None = None  # the storage rule: (storage pointer, offset)
    new: bool = True  # no step run yet in this generation
    signature: tuple | None = None  # the signature `valid` refers to
    valid: set = field(default_factory=set)  # slots written in this generation (for `signature`)
    buffers: dict = field(default_factory=dict)  # signature -> (entry uid, {(unit, k): tensor})
    decider: Any = None  # _Decider: the host side of adaptive plans
    computed_at: dict = field(default_factory=dict)  # forecasting: unit -> steps it was written, newest first

    def forget(self) -> None:
        """No slot holds a value of this generation (for ``signature``)."""
        self.valid = set()
        self.computed_at = {}

    def new_generation(self) -> None:
        self.step = 0
        self.last_t = None
        self.direction = 0
        self.last_storage = None
        self.new = True
        self.forget()
        if self.decider is not None:
            self.decider.new_generation()


class Decisions(list):
    """The record of one generation of an adaptive plan in one cache context: per step,
    True when it computed everything (the full kind), False when it reused. ``statistic``
    holds the statistic each step measured on the device (NaN where the next step did not
    read it: the generation, the input shape or the step count changed)."""

    def __init__(self, computed, statistic):
        super().__init__(computed)
        self.statistic = list(statistic)


class _Decider:
    """The host side of an adaptive plan, per cache state: the host copy of the last
    step's decision (pinned memory and a CUDA event on CUDA, a plain copy on the CPU), the
    run of consecutive reused steps and the record of the generation. Reads the decision
    through a NumPy view of the host copy: no ``Tensor.item``/``__bool__``/``.cpu()``."""

    def __init__(self):
        self.key = None  # (entry uid, signature) of the pending decision
        self.pending: int | None = None  # the step whose decision the host copy holds
        self.host = None
        self.host_np = None
        self.event = None
        self.run = 0
        self.computed: list = []
        self.stats: list = []
        self.last = None  # the previous generation: (computed, stats, host, host_np, event, pending)

    def new_generation(self) -> None:
        if self.computed:
            self.last = (self.computed, self.stats, self.host, self.host_np, self.event, self.pending)
            self.host = self.host_np = self.event = None  # the previous generation keeps its host copy
        self.computed, self.stats = [], []
        self.pending, self.key, self.run = None, None, 0

    def read(self) -> tuple[float, bool]:
        if self.event is not None:
            self.event.synchronize()  # the copy queued after the previous step (see the README)
        return float(self.host_np[0]), bool(self.host_np[1] > 0.5)

    def write(self, decision: torch.Tensor) -> None:
        if self.host is None:
            cuda = decision.device.type == "cuda"
            with torch.inference_mode(False):
                self.host = torch.empty(decision.shape, dtype=decision.dtype, pin_memory=cuda)
            self.host_np = self.host.numpy()
            self.event = torch.cuda.Event() if cuda else None
        if self.event is not None:
            self.host.copy_(decision, non_blocking=True)
            self.event.record()
        else:
            self.host.copy_(decision)

    def record(self) -> Decisions | None:
        """The current generation's record, or the previous one's when none started."""
        if self.computed:
            computed, stats, host_np, event, pending = self.computed, self.stats, self.host_np, self.event, self.pending
        elif self.last is not None:
            computed, stats, _, host_np, event, pending = self.last
        else:
            return None
        stats = list(stats)
        if len(stats) < len(computed) and pending == len(computed) - 1 and host_np is not None:
            if event is not None:
                event.synchronize()
            stats.append(float(host_np[0]))
        stats += [float("nan")] * (len(computed) - len(stats))
        return Decisions(computed, stats)


class _ThreadState(threading.local):
    def __init__(self):
        self.context: str | None = None
        self.states: dict = {}


def _slots(graph, units) -> frozenset:
    units = set(units)
    return frozenset(s for s in graph.buffers if s[0] in units)


class CachedModel(DropIn):
    """A denoiser that runs each step with only what its plan says to recompute."""

    def __init__(self, model: torch.nn.Module, schedule, options: CompileOptions | None = None):
        super().__init__(model)
        self.schedule = schedule
        self.options = options or CompileOptions()
        if self.options.timestep_rule not in TIMESTEP_RULES:
            raise ValueError(f"timestep_rule must be one of {TIMESTEP_RULES}, got {self.options.timestep_rule!r}")
        self._entries: OrderedDict = OrderedDict()
        self._local = _ThreadState()
        self._lock = threading.RLock()
        self._last_entry: _Entry | None = None
        self._forward_params = list(inspect.signature(model.forward).parameters)
        self._uid = 0
        self._epoch = -1
        self._fingerprint: tuple | None = None
        self._warned_overrun = False
        self._warned_training = False
        self._timestep_indices: dict = {}  # call structure (TreeSpec) -> flat index of the timestep

    # ------------------------------------------------------------ drop-in bits
    # ``torch.compile(cached)`` (every torch user's habit) is a pass-through: dynamo is
    # disabled for the call itself, whose Python bookkeeping is not a graph, and the step
    # graphs inside are fxcache's own compiled graphs (they still compile: a nested
    # torch.compile runs inside a disabled region). 0 graph breaks, 0 extra graphs.
    __call__ = torch.compiler.disable(torch.nn.Module.__call__)

    def compile(self, *args, **kwargs) -> None:
        """``nn.Module.compile()`` in place: a no-op, the step graphs are compiled already
        (choose their backend with ``fxcache.compile(..., backend=...)``)."""
        return None

    _TRANSIENT = ("_entries", "_local", "_lock", "_last_entry", "_fingerprint", "_epoch", "_timestep_indices")

    def __getstate__(self):
        """Pickling (``pickle``, ``torch.save``, ``copy.deepcopy``) keeps the model, the
        schedule and the options; compiled graphs, buffers and generation states are
        dropped and rebuilt at the first call after unpickling."""
        state = dict(self.__dict__)
        for name in self._TRANSIENT:
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._entries = OrderedDict()
        self._local = _ThreadState()
        self._lock = threading.RLock()
        self._last_entry = None
        self._fingerprint = None
        self._epoch = -1
        self._timestep_indices = {}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the original model (diffusers' ``ModelMixin.save_pretrained``): caching is
        a way of running a model, not part of it."""
        return self.model.save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        """Load what :meth:`save_pretrained` wrote: the original diffusers model, uncached
        (``DiffusionPipeline.from_pretrained`` calls this for a component saved as
        ``["fxcache", "CachedModel"]``)."""
        import json
        import os

        import diffusers

        config = os.path.join(os.fspath(path), "config.json")
        try:
            with open(config) as f:
                class_name = json.load(f)["_class_name"]
            model_cls = getattr(diffusers, class_name)
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise CheckpointError(
                f"{config}: cannot tell which diffusers model class was saved there ({type(exc).__name__}: {exc})"
            ) from exc
        return model_cls.from_pretrained(path, *args, **kwargs)

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

    def cache_tensors(self) -> dict:
        """The calling thread's cache buffers: ``{(context, signature): {(unit, k): tensor}}``."""
        return {(ctx, sig): held[1] for ctx, st in self._local.states.items() for sig, held in st.buffers.items()}

    # ------------------------------------------------------------ generations
    @property
    def _states(self) -> dict:
        """The calling thread's states, by cache context."""
        return self._local.states

    def reset(self) -> None:
        """Start a new generation in every cache context of the calling thread (buffers
        are kept, their contents are no longer read)."""
        for state in self._local.states.values():
            state.new_generation()

    def _reset_stateful_cache(self, *args, **kwargs) -> None:
        """diffusers' protocol: every pipeline calls this on its components at the end of
        each call (``maybe_free_model_hooks``). The next call starts a new generation."""
        self.reset()

    @contextlib.contextmanager
    def generation(self):
        """``with model.generation(): ...`` runs one generation from step 0."""
        self.reset()
        try:
            yield self
        finally:
            self.reset()

    @contextlib.contextmanager
    def cache_context(self, name: str, step_index: int | None = None, **kwargs):
        """Separate cache state (step count and buffers) per name, as diffusers'
        ``cache_context``. ``step_index`` (diffusers passes it in some pipelines) is the
        step the calls inside run; 0 starts a new generation. Other keywords are accepted
        and ignored."""
        local = self._local
        previous = local.context
        local.context = name
        if step_index is not None:
            state = self._state()
            step_index = int(step_index)
            if step_index == 0 or step_index < state.step:
                state.new_generation()
            state.step = step_index
        try:
            yield
        finally:
            local.context = previous

    def _state(self) -> _State:
        local = self._local
        state = local.states.get(local.context)
        if state is None:
            state = local.states[local.context] = _State()
        return state

    @property
    def step(self) -> int:
        """The step the next call runs (in the calling thread's current cache context)."""
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
        captured = capture(self.model, args, kwargs)
        units = find_units(captured.gm)
        plan = lower_to_plan(self.schedule, units, self.options.num_steps, type(self.model).__name__)
        adapters = self._adapters(captured, units, plan)
        plan_units = [u for u in units if u.name in set(plan.units)]
        order = self.options.forecast
        solved = solve_steps(captured.gm, plan_units, plan, adapters, forecast=order)
        plan = plan.bind(solved.kind_of_step, solved.step_kinds).with_forecast(order)
        if self.options.fuse:
            from .rewrite.fuse import fuse_cache_reads

            for g in solved.graphs:
                g.fused = fuse_cache_reads(g.gm)
        from .rewrite.compile import build_programs

        device = next((v.device for v in captured.gm.graph.find_nodes(op="placeholder")
                       for v in [v.meta.get("val")] if isinstance(v, torch.Tensor)), torch.device("cpu"))
        options, adaptive = self.options, None
        if plan.adaptive is not None:
            # the statistic pass (one step-graph pass per kind) and one graph per kind: two kinds
            from .rewrite.adaptive import adapt_step_graphs

            adaptive = adapt_step_graphs(captured.gm, units, solved, plan.adaptive)
            options = replace(options, segments=False)
        if order:
            options = replace(options, segments=False)  # segments carry no history slots
        programs, count, note = build_programs(captured.gm, plan_units, solved, options, device, adapters)
        plan = plan.with_compile(count if self.options.backend is not None else 0, note)
        if adaptive is not None:  # the state buffers are part of what one cache state holds
            plan = plan.with_state_bytes(sum(torch.Size(shape).numel() * dtype.itemsize
                                             for shape, _, dtype in adaptive.specs.values()))
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
                specs[slot] = (tuple(val.shape), tuple(val.stride()), val.dtype)
        if adaptive is not None:
            specs.update(adaptive.specs)  # the state buffers: allocated, zeroed and kept like cache buffers
        self._uid += 1
        entry = _Entry(
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
            uid=self._uid,
            adaptive=adaptive,
        )
        self._entries[signature] = entry
        while len(self._entries) > self.options.max_shapes:
            self._entries.popitem(last=False)  # its buffers are dropped when a state meets the signature again
        return entry

    def _adapters(self, captured: Captured, units: UnitSet, plan: Plan):
        """The scale-shift adapters (option ``scale_shift`` or ``BlockCache.scale_shift``),
        checked against this model and plan, and the node of the timestep embedding."""
        source = self.options.scale_shift or getattr(self.schedule, "scale_shift", None)
        if source is None:
            return None
        from .analyze.units import temb_output
        from .rewrite.adapters import ScaleShift

        adapter = source if isinstance(source, ScaleShift) else ScaleShift.load(source)
        by_name = units.by_name()
        adapter.check_compatible(type(self.model).__name__, {u: by_name[u].out_shapes for u in by_name}, plan)
        missing = [u for u in adapter.units if u not in plan.units]
        if missing:
            raise CheckpointError(
                f"the scale-shift adapters cover units {missing} that this schedule does not cache "
                f"(it caches {list(plan.units)}): train adapters for this schedule"
            )
        adapter = adapter.to(next(self.model.parameters()).device)
        self.scale_shift_adapters = adapter
        # an explicit argument of the rewrite: each step graph owns the adapter module
        return adapter, temb_output(captured.gm, adapter.temb_module)

    def _cache_buffers(self, state: _State, signature: tuple, entry: _Entry, device: torch.device) -> dict:
        held = state.buffers.get(signature)
        if held is not None and held[0] == entry.uid:
            return held[1]
        bufs = {}
        # never inference tensors (a generation under inference_mode must not poison later
        # no_grad calls) and never part of an autograd graph
        with torch.inference_mode(False), torch.no_grad():
            for slot, (shape, stride, dtype) in entry.buffer_specs.items():
                # same strides as the value the model produces: kernels downstream of a
                # cache read then see exactly the layout they see in the model
                bufs[slot] = torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
                if device.type == "cuda":
                    torch._dynamo.mark_static_address(bufs[slot])
        state.buffers[signature] = (entry.uid, bufs)
        if state.signature == signature:
            state.forget()
        return bufs

    # ------------------------------------------------------------ the checks
    def _check_modules(self, force: bool) -> None:
        """Capture again when a module, processor or parameter was replaced since capture."""
        if not force and _MODULE_EPOCH[0] == self._epoch:
            return
        self._epoch = _MODULE_EPOCH[0]
        fp = _fingerprint(self.model)
        if self._fingerprint is not None and fp != self._fingerprint:
            with self._lock:
                self._entries.clear()
                self._last_entry = None
        self._fingerprint = fp

    def _timestep_rule(self, state: _State, t) -> None:
        """Rule 3 of "When does a new generation start?"."""
        rule = self.options.timestep_rule
        if rule == "off" or not isinstance(t, torch.Tensor):
            return
        if rule == "values" or (rule == "auto" and t.device.type == "cpu"):
            value = float(t.reshape(-1)[0]) if t.numel() else None
            if value is None:
                return
            if state.last_t is not None:
                d = (value > state.last_t) - (value < state.last_t)
                if d == 0 and not self.options.repeated_timesteps:
                    state.new_generation()
                elif d != 0 and state.direction == 0:
                    state.direction = d
                elif d != 0 and d != state.direction:
                    state.new_generation()
            state.last_t = value
            return
        # the storage rule: no value read
        storage = t.untyped_storage()
        is_view = t._base is not None or storage.nbytes() > t.numel() * t.element_size()
        if not is_view:
            return  # computed afresh at this call: says nothing
        key = (storage.data_ptr(), t.storage_offset())
        last = state.last_storage
        if last is not None:
            if key[0] != last[0]:
                state.new_generation()
            elif key[1] < last[1] or (key[1] == last[1] and not self.options.repeated_timesteps):
                state.new_generation()
        state.last_storage = key

    # -------------------------------------------------------------------- run
    def forward(self, *args, **kwargs) -> Any:
        if self.model.training and not self._warned_training:
            self._warned_training = True
            warnings.warn(
                f"{type(self.model).__name__} is in training mode, but fxcache captures and runs the eval-mode "
                f"graph (no dropout, no label dropout): call model.eval(), or train the original model",
                RuntimeWarning,
                stacklevel=2,
            )
        flat, spec = flatten_call(self.model, args, kwargs)
        state = self._state()
        ti = self._timestep_indices.get(spec, -1)
        if ti == -1:
            ti = self._timestep_indices[spec] = self._timestep_index(*pytree.tree_unflatten(flat, spec))
        if ti is not None:
            self._timestep_rule(state, flat[ti])
        self._check_modules(force=state.new)
        signature = signature_of(flat, spec)
        with self._lock:
            entry = self._entries.get(signature)
            if entry is None:
                args_n, kwargs_n = pytree.tree_unflatten(flat, spec)
                entry = self._build(args_n, kwargs_n, signature)
            else:
                self._entries.move_to_end(signature)
            self._last_entry = entry
        if torch.is_grad_enabled():
            if any(isinstance(x, torch.Tensor) and x.requires_grad for x in flat):
                raise UnsupportedCallError(
                    f"an input of {type(self.model).__name__} requires grad; fxcache's step graphs are for "
                    f"inference and would neither give gradients through cached values nor keep the caches "
                    f"out of the autograd graph. Train or differentiate the original model (cached.model)"
                )
            grad_ctx = torch.no_grad()
        else:
            grad_ctx = contextlib.nullcontext()
        device = next((x.device for x in flat if isinstance(x, torch.Tensor)), torch.device("cpu"))
        bufs = self._cache_buffers(state, signature, entry, device)
        if state.signature != signature:
            state.signature = signature
            state.forget()
        plan = entry.plan
        step = state.step
        if not plan.periodic and step >= plan.num_steps:
            kind = None
            if not self._warned_overrun:
                self._warned_overrun = True
                warnings.warn(
                    f"this generation is longer than the plan of {type(self.model).__name__} ({plan.num_steps} "
                    f"steps): steps from {plan.num_steps} on compute everything. If a new generation started, "
                    f"say so with model.reset() or `with model.generation():` (pipelines do it for you)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        else:
            if entry.adaptive is None:
                kind = plan.kind_of_step(step)
            else:
                kind = self._adaptive_kind(state, entry, signature, bufs, step)
            if not entry.kind_reads[kind] <= state.valid:
                kind = None  # a slot it reads was not written in this generation: repair
        if self.options.forecast:
            self._forecast_before(state, entry, bufs, kind, step)
        with grad_ctx:
            if kind is None:
                out = self._repair_program(entry)(flat, bufs)
                state.valid = set(entry.repair_writes)
            else:
                out = entry.programs[kind](flat, bufs)
                valid = state.valid
                valid -= entry.kind_stale[kind]
                valid |= entry.kind_writes[kind]
            if entry.adaptive is not None:
                self._adaptive_after(state, entry, signature, bufs, kind, step)
        if self.options.forecast:
            self._forecast_after(state, entry, kind, step)
        state.step = step + 1
        state.new = False
        return pytree.tree_unflatten(list(out), entry.captured.out_spec)

    # ---------------------------------------------------------- forecasting
    def _forecast_before(self, state: _State, entry: _Entry, bufs: dict, kind, step: int) -> None:
        """Write this step's forecast coefficients (one row per plan unit) into the
        coefficient buffer: a host-to-device copy of a few floats, never a wait (pinned
        and non-blocking on CUDA). A generation's first step zeroes the history slots, so
        a missing point (weight 0) adds an exact zero."""
        order = self.options.forecast
        if not state.computed_at:
            for slot, buf in bufs.items():
                if len(slot) == 3:
                    buf.zero_()
        graph = entry.repair_graph if kind is None else entry.solved.graphs[kind]
        if not graph.reads or FORECAST_SLOT not in bufs:
            return
        zero = [0.0] * (order + 1)  # rows of units this step does not read stay zero
        rows = [forecast_weights(step, state.computed_at.get(u, []), order) if u in graph.reads else zero
                for u in entry.plan.units]
        coef = bufs[FORECAST_SLOT]
        if coef.device.type == "cuda":
            host = torch.tensor(rows, dtype=torch.float32).pin_memory()  # the caching host allocator keeps it
            coef.copy_(host, non_blocking=True)  # until the copy ran
        else:
            coef.copy_(torch.tensor(rows, dtype=torch.float32))

    def _forecast_after(self, state: _State, entry: _Entry, kind, step: int) -> None:
        """Record which units' histories this step extended (it wrote them) and which it
        made stale (computed without writing: their stored values are no longer the
        latest computed ones)."""
        order = self.options.forecast
        graph = entry.repair_graph if kind is None else entry.solved.graphs[kind]
        for u in entry.plan.units:
            if u in graph.writes:
                state.computed_at[u] = [step, *state.computed_at.get(u, [])][: order + 1]
            elif u not in graph.reused:
                state.computed_at.pop(u, None)

    # ------------------------------------------------------------- adaptive
    def _adaptive_kind(self, state: _State, entry: _Entry, signature: tuple, bufs: dict, step: int) -> int:
        """The kind of this step of an adaptive plan: reuse when the previous step of this
        generation, cache state and input signature said so on the device (its host copy,
        read here: the one-step lag) and the host limits allow it; otherwise the full kind.
        Without that previous step the adaptive state starts afresh (its buffers are
        zeroed on the device: no reference, so the next decision is "compute")."""
        a = entry.adaptive
        d = state.decider
        if d is None:
            d = state.decider = _Decider()
        key = (entry.uid, signature)
        reuse_ok = False
        if d.pending is not None and d.pending == step - 1 and d.key == key:
            stat, reuse_ok = d.read()
            d.stats.append(stat)
        else:
            d.stats += [float("nan")] * (len(d.computed) - len(d.stats))
            d.run = 0
            for slot in a.slots:
                bufs[slot].zero_()
        if reuse_ok and not a.policy.forced_full(step, d.run) and entry.kind_reads[a.reuse_kind] <= state.valid:
            return a.reuse_kind
        return a.full_kind

    def _adaptive_after(self, state: _State, entry: _Entry, signature: tuple, bufs: dict, kind, step: int) -> None:
        """Record the step and queue the copy of its decision to the host (no wait)."""
        a = entry.adaptive
        d = state.decider
        full = kind != a.reuse_kind
        d.computed.append(full)
        d.run = 0 if full else d.run + 1
        d.write(bufs[STATE_DECISION])
        d.pending, d.key = step, (entry.uid, signature)

    def decisions(self) -> dict:
        """Per cache context of the calling thread (``None``: no context), the record of the
        current generation of an adaptive plan, or of the last one when none has started:
        a :class:`Decisions` list (per step, True: computed everything; False: reused) with
        the measured ``statistic``. Reading the last step's statistic may wait for the
        device. Static plans keep no record (their steps follow from the plan)."""
        out = {}
        for ctx, st in self._local.states.items():
            rec = st.decider.record() if st.decider is not None else None
            if rec is not None:
                out[ctx] = rec
        return out

    def _repair_program(self, entry: _Entry):
        if entry.repair_program is None:
            from .rewrite.compile import _KindProgram, compile_graph

            g = entry.repair_graph
            entry.repair_program = _KindProgram(compile_graph(g.gm, self.options), g.buffers)
        return entry.repair_program
