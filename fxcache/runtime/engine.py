"""The engine: per input signature the built entry (plan, compiled step graphs, buffer
specs), per thread and cache context the generation state, and the step: which kind of
step runs, the guards, the adaptive and forecasting host sides. It is not a module: it
serves :class:`~fxcache.runtime.cached.CachedModel` (a wrapper, ``fxcache.compile``) and a
model it is attached to in place (:mod:`fxcache.runtime.inplace`, ``fxcache.enable``)
alike. See :mod:`fxcache.runtime` for the rules it follows."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
import warnings
import time
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from ..capture import flatten_call, signature_of
from ..plan import Plan, PlanError, _fmt_bytes
from ..schedules import ScheduleError
from ..rewrite.adaptive import DECISION as STATE_DECISION
from ..rewrite.step_graphs import FORECAST_SLOT, forecast_weights
from .build import Entry, build_entry, prepare
from .guards import foreign_hooks, snapshot
from .lora import LoraScales
from .options import TIMESTEP_RULES, CompileOptions, UnsupportedCallError
from .state import Decider, GenerationState, ThreadStates, apply_timestep_rule
from .voice import compile_dropped, compile_finished, compile_started, fmt_seconds, say, short

__all__ = ["Engine", "PlanLengthError"]


class PlanLengthError(PlanError):
    """A generation of another length than the non-periodic plan's table."""


def _same_graph(a, b) -> bool:
    """Two captures that compute the same thing: the same code, reading the same tensor
    objects (parameters, buffers, lifted constants)."""
    if a.code != b.code:
        return False
    missing = object()

    def resolve(gm, target):
        obj = gm
        for part in target.split("."):
            obj = getattr(obj, part, missing)
            if obj is missing:
                return missing
        return obj

    for n in b.graph.find_nodes(op="get_attr"):
        x, y = resolve(a, n.target), resolve(b, n.target)
        if x is missing or x is not y:
            return False
    return True


class Engine:
    """Runs ``model`` step by step under ``schedule``. ``fallback(*args, **kwargs)`` runs
    the model as written (used while fxcache captures, and while other libraries' hooks
    are on the model); it defaults to calling the model."""

    def __init__(self, model: torch.nn.Module, schedule, options: CompileOptions | None = None,
                 fallback: Callable | None = None):
        self.model = model
        self.schedule = schedule
        self.options = options or CompileOptions()
        if self.options.timestep_rule not in TIMESTEP_RULES:
            raise ValueError(f"timestep_rule must be one of {TIMESTEP_RULES}, got {self.options.timestep_rule!r}")
        self.fallback = fallback
        self.enabled = True
        self._init_transient()

    def _init_transient(self) -> None:
        self._entries: OrderedDict = OrderedDict()
        self._local = ThreadStates()
        self._lock = threading.RLock()
        self._last_entry: Entry | None = None
        self._forward_params = list(inspect.signature(type(self.model).forward).parameters)[1:]
        self._uid = 0
        self._snapshot: tuple | None = None
        self._stale: dict = {}  # entries from before a guard failed, by signature
        self._warned_overrun = False
        self._warned_training = False
        self._warned_foreign: tuple | None = None
        self._foreign = False
        self._timestep_indices: dict = {}  # call structure (TreeSpec) -> flat index of the timestep
        self.captures = 0  # how many times the model was captured (a guard that failed captures again)
        self._lora = LoraScales()  # peft LoRA scales as graph inputs (runtime/lora.py)
        self.step_source = None  # a pipeline's StepSource (runtime/pipeline.py), set at each pipeline call
        self._restarts = 0
        self._warned_restarts = False
        self._warned_prefix = False
        self.scale_shift_adapters = None
        self._shared = None  # fxcache.calibrate.search: one capture and its step graphs for all candidates

    _KEEP = ("model", "schedule", "options", "fallback", "enabled")

    def __getstate__(self):
        """Pickling (``pickle``, ``torch.save``, ``copy.deepcopy``) keeps the model, the
        schedule and the options; compiled graphs, buffers and generation states are
        dropped and rebuilt at the first call after unpickling."""
        return {k: self.__dict__[k] for k in self._KEEP}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_transient()

    def __repr__(self) -> str:
        return f"fxcache.Engine({type(self.model).__name__}, {self.schedule!r})"

    def _as_written(self):
        """While capturing: the model as written (an attached engine steps out of the way)."""
        return contextlib.nullcontext()

    def _run_plain(self, args, kwargs):
        local = self._local
        busy, local.busy = local.busy, True
        try:
            if self.fallback is not None:
                return self.fallback(*args, **kwargs)
            return self.model(*args, **kwargs)
        finally:
            local.busy = busy

    @property
    def plan(self) -> Plan:
        """The plan of the most recent input shape (available after the first call)."""
        if self._last_entry is None:
            raise RuntimeError(
                "the plan is built at the first call (it depends on the input shapes); call the model "
                "once, or build it without running the model: fxcache.plan_for(model, schedule, *example_args, "
                "**example_kwargs), or for a pipeline fxcache.plan_for(pipe, schedule, prompt=..., height=..., "
                "width=..., num_inference_steps=...)"
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
        each call (``maybe_free_model_hooks``). The next call starts a new generation, and
        the model's own stateful hooks (diffusers' ``CacheMixin``) are reset too."""
        self.reset()
        own = getattr(type(self.model), "_reset_stateful_cache", None)
        if own is not None:
            own(self.model, *args, **kwargs)

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
        and passed on, with ``step_index``, to the model's own ``cache_context`` (diffusers'
        ``CacheMixin``), so diffusers' hooks see the context too."""
        own = getattr(type(self.model), "cache_context", None)
        own_kwargs = kwargs if step_index is None else {**kwargs, "step_index": step_index}
        own_ctx = own(self.model, name, **own_kwargs) if own is not None else contextlib.nullcontext()
        local = self._local
        previous = local.context
        local.context = name
        given, expected = local.step_given, local.expected_steps
        steps = kwargs.get("num_inference_steps")
        if isinstance(steps, int) and not isinstance(steps, bool):
            local.expected_steps = steps  # diffusers' CacheContext says how long the generation is
        if step_index is not None:
            state = self._state()
            step_index = int(step_index)
            if step_index == 0 or step_index < state.step:
                state.new_generation()
            state.step = step_index
            local.step_given = True  # the calls inside run this step: no timestep rule overrides it
        with own_ctx:
            try:
                yield
            finally:
                local.context = previous
                local.step_given = given
                local.expected_steps = expected

    def _state(self) -> GenerationState:
        local = self._local
        state = local.states.get(local.context)
        if state is None:
            state = local.states[local.context] = GenerationState()
        return state

    @property
    def step(self) -> int:
        """The step the next call runs (in the calling thread's current cache context)."""
        return self._state().step

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

    # ------------------------------------------------------------ guards and build
    def _check_model(self) -> None:
        """At a generation start: step aside while other libraries' hooks run the model
        (warned once per set of hooks), and capture again when the model's state changed
        since capture (:mod:`fxcache.runtime.guards`)."""
        hooks = foreign_hooks(self.model)
        self._foreign = bool(hooks)
        if hooks:
            if tuple(hooks) != self._warned_foreign:
                self._warned_foreign = tuple(hooks)
                warnings.warn(
                    f"fxcache is not caching {type(self.model).__name__} while other hooks run it "
                    f"({', '.join(hooks[:4])}{', ...' if len(hooks) > 4 else ''}): the model runs as those hooks "
                    f"make it run. Remove them (diffusers: model.disable_cache(), ...) and fxcache caches again",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return
        self._lora.sync()
        snap = snapshot(self.model)
        if self._snapshot is not None and snap != self._snapshot:
            with self._lock:
                # captured again at the next call of each shape; an identical capture keeps its graphs
                self._stale = dict(self._entries)
                for stale in self._stale.values():
                    compile_dropped(stale)
                self._entries.clear()
                self._last_entry = None
        self._snapshot = snap

    def _build(self, args: tuple, kwargs: dict, signature: tuple, hint: int | None = None) -> Entry:
        local = self._local
        options = self.options
        busy, local.busy = local.busy, True  # a call of the model while capturing runs it as written
        verbose = self.options.verbose
        name = type(self.model).__name__
        t0 = time.perf_counter()
        try:
            with self._as_written(), self._lora.lifted(self.model):
                try:
                    prepared = prepare(self.model, self.schedule, options, args, kwargs, self._shared)
                except ScheduleError:
                    if options.num_steps is not None or hint is None:
                        raise
                    # a schedule that needs the number of steps (a non-uniform DeepCache, last_steps):
                    # the caller said how long this generation is
                    options = dataclasses.replace(options, num_steps=hint)
                    prepared = prepare(self.model, self.schedule, options, args, kwargs, self._shared)
        finally:
            local.busy = busy
        self.captures += 1
        old = self._stale.pop(signature, None)
        if old is not None and _same_graph(old.captured.gm, prepared.captured.gm):
            say(verbose, f"captured {name} again after a change of its state: same graph, compiled graphs kept")
            return old  # the guard saw a change the forward does not read: same graph, same tensors
        self._uid += 1
        entry = build_entry(prepared, options, self._uid)
        self.scale_shift_adapters = entry.adapter_module
        plan = entry.plan
        if options is not self.options and (not plan.periodic or plan.adaptive is not None):
            entry.auto_steps = options.num_steps  # this plan depends on the length it was made for
        shapes = ", ".join(str(tuple(x.shape)) for x in pytree.tree_leaves((args, kwargs))
                           if isinstance(x, torch.Tensor) and x.ndim >= 2)
        say(verbose, f"{name} for inputs {shapes}: captured and planned in {fmt_seconds(time.perf_counter() - t0)}; "
                     f"{short(self.schedule)} caches {len(plan.units)} unit(s), {len(plan.step_kinds)} kind(s) of step, "
                     f"FLOP-ideal {plan.ideal_speedup:.2f}x over {'one period' if plan.periodic else 'the generation'}, "
                     f"cache {_fmt_bytes(plan.cache_bytes)} per cache state"
                     + (f"; {len(entry.programs)} step graph(s) compile with {self.options.backend} at their first "
                        f"run" if self.options.backend is not None else ""))
        return entry

    def _run_kind(self, entry: Entry, kind: int, flat, bufs):
        """Run a kind of step; the first run of a compiled one says how long compiling took."""
        if kind in entry.ran or self.options.backend is None:
            return entry.programs[kind](flat, bufs)
        kinds = entry.plan.step_kinds
        what = "computes everything" if not kinds[kind].reused else f"reuses {len(kinds[kind].reused)} unit(s)"
        n, name, verbose = len(entry.programs), type(self.model).__name__, self.options.verbose
        say(verbose, f"compiling step graph {kind + 1} of {n} of {name} ({what}) with {self.options.backend} ...")
        compile_started(entry, verbose=verbose, total=n, done=len(entry.ran),
                        desc=f"compiling {n} step graph{'s' if n != 1 else ''} of {name} with {self.options.backend}")
        t0 = time.perf_counter()
        out = entry.programs[kind](flat, bufs)
        entry.ran.add(kind)
        say(verbose, f"step graph {kind + 1} of {n} compiled and run in {fmt_seconds(time.perf_counter() - t0)}")
        compile_finished(entry, len(entry.ran))
        return out

    def _check_length(self, plan: Plan, state: GenerationState, total: int | None) -> None:
        """A non-periodic plan is a table for ``plan.num_steps`` steps; it is never run as a
        prefix of itself. When the generation's number of denoising steps is known before
        its first step (attached to a pipeline: its progress bar; or diffusers'
        ``cache_context(..., num_inference_steps=n)``), another length is a
        :class:`PlanLengthError`. A bare model's generation that ended early is only known
        afterwards: warned, once."""
        if total is not None and total != plan.num_steps:
            raise PlanLengthError(
                f"the plan of {type(self.model).__name__} is a table for {plan.num_steps} denoising steps, and this "
                f"generation runs {total}: running the first {min(total, plan.num_steps)} rows "
                f"of it would not be the schedule. Build the schedule for {total} steps (num_steps="
                f"{total}, or a profile/mask made at that length), or call the pipeline with "
                f"num_inference_steps={plan.num_steps}"
            )
        ended, state.ended_at = state.ended_at, None
        if ended is not None and 0 < ended < plan.num_steps and not self._warned_prefix:
            self._warned_prefix = True
            warnings.warn(
                f"a generation of {type(self.model).__name__} ended after {ended} of its plan's {plan.num_steps} "
                f"steps: it ran the first {ended} rows of a table made for {plan.num_steps} steps, which is not "
                f"that schedule at {ended} steps. Build the schedule for the number of steps you run",
                RuntimeWarning,
                stacklevel=4,
            )

    def _note_restart(self) -> None:
        """A bare model whose every call starts a new generation never reuses anything:
        warned once, after three such calls in a row (Heun-like schedulers call the model
        twice per timestep; a loop may pass equal timesteps)."""
        self._restarts += 1
        if self._restarts == 3 and not self._warned_restarts:
            self._warned_restarts = True
            warnings.warn(
                f"caching saved nothing: the last 3 calls of {type(self.model).__name__} each started a new "
                f"generation (the timestep did not move on). Attach to the pipeline (fxcache.enable(pipe, ...)), "
                f"pass cache_context(name, step_index=i), or compile(..., repeated_timesteps=True) for schedulers "
                f"that call the model twice per timestep",
                RuntimeWarning,
                stacklevel=4,
            )

    def _cache_buffers(self, state: GenerationState, signature: tuple, entry: Entry, device: torch.device) -> dict:
        held = state.buffers.get(signature)
        if held is not None and held[0] == entry.uid:
            return held[1]
        # drop the buffers of shapes whose entries were evicted (max_shapes) or rebuilt
        live = {sig: e.uid for sig, e in self._entries.items()}
        for sig in [sig for sig, (uid, _) in state.buffers.items() if live.get(sig) != uid]:
            del state.buffers[sig]
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

    def __call__(self, *args, **kwargs) -> Any:
        local = self._local
        if local.busy or not self.enabled:
            return self._run_plain(args, kwargs)
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
        source = self.step_source
        if source is not None and source.active:
            # attached to a pipeline: its scheduler says which denoising step this is
            if state.source_generation != source.generation:
                state.new_generation()
                state.source_generation = source.generation
            state.step = source.step
        elif ti is not None and not local.step_given:
            apply_timestep_rule(state, flat[ti], self.options.timestep_rule, self.options.repeated_timesteps)
        if state.new:
            self._check_model()
        if self._foreign:
            return self._run_plain(args, kwargs)
        signature = signature_of(flat, spec)
        # the generation's length when the caller knows it before its first step (a pipeline's
        # progress bar, diffusers' cache_context(num_inference_steps=...)): a schedule that needs
        # the number of steps and was not given one takes it from there
        hint = source.total if source is not None and source.active else local.expected_steps
        with self._lock:
            entry = self._entries.get(signature)
            if entry is not None and entry.auto_steps is not None and hint is not None and hint != entry.auto_steps:
                entry = None  # a plan made for another length: plan again for this one
            if entry is None:
                args_n, kwargs_n = pytree.tree_unflatten(flat, spec)
                entry = self._build(args_n, kwargs_n, signature, hint)
                self._entries[signature] = entry
                while len(self._entries) > self.options.max_shapes:
                    # its buffers are dropped when a state meets the signature again
                    compile_dropped(self._entries.popitem(last=False)[1])
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
        if not plan.periodic:
            total = source.total if source is not None and source.active else local.expected_steps
            self._check_length(plan, state, total)
        elif state.ended_at is not None:
            state.ended_at = None
        if step == 0 and state.new and not (source is not None and source.active):
            self._note_restart()
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
                out = self._run_kind(entry, kind, flat, bufs)
                valid = state.valid
                valid -= entry.kind_stale[kind]
                valid |= entry.kind_writes[kind]
            if entry.adaptive is not None:
                self._adaptive_after(state, entry, signature, bufs, kind, step)
        if self.options.forecast:
            self._forecast_after(state, entry, kind, step)
        if step > 0:
            self._restarts = 0
        state.step = step + 1
        state.new = False
        return pytree.tree_unflatten(list(out), entry.captured.out_spec)

    # ---------------------------------------------------------- forecasting
    def _forecast_before(self, state: GenerationState, entry: Entry, bufs: dict, kind, step: int) -> None:
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

    def _forecast_after(self, state: GenerationState, entry: Entry, kind, step: int) -> None:
        """Record which units' histories this step extended (it wrote them) and which it
        made stale (computed without writing: their stored values are no longer the
        latest computed ones)."""
        order = self.options.forecast
        graph = entry.repair_graph if kind is None else entry.solved.graphs[kind]
        for u in entry.plan.units:
            if u in graph.writes:
                # a second call at the same denoising step (Heun's corrector) replaces that point
                history = [s for s in state.computed_at.get(u, []) if s != step]
                state.computed_at[u] = [step, *history][: order + 1]
            elif u not in graph.reused:
                state.computed_at.pop(u, None)

    # ------------------------------------------------------------- adaptive
    def _adaptive_kind(self, state: GenerationState, entry: Entry, signature: tuple, bufs: dict, step: int) -> int:
        """The kind of this step of an adaptive plan: reuse when the previous step of this
        generation, cache state and input signature said so on the device (its host copy,
        read here: the one-step lag) and the host limits allow it; otherwise the full kind.
        Without that previous step the adaptive state starts afresh (its buffers are
        zeroed on the device: no reference, so the next decision is "compute")."""
        a = entry.adaptive
        d = state.decider
        if d is None:
            d = state.decider = Decider()
        key = (entry.uid, signature)
        if d.pending == step and d.key == key and d.kind is not None:
            # a second call at the same denoising step (Heun's corrector) runs that step's kind
            if d.kind == a.full_kind or entry.kind_reads[d.kind] <= state.valid:
                return d.kind
            return a.full_kind
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

    def _adaptive_after(self, state: GenerationState, entry: Entry, signature: tuple, bufs: dict, kind, step: int) -> None:
        """Record the step and queue the copy of its decision to the host (no wait)."""
        a = entry.adaptive
        d = state.decider
        full = kind != a.reuse_kind
        if d.pending == step and d.key == (entry.uid, signature):
            d.computed[-1] = d.computed[-1] and full  # the same step again: one record, the latest decision
        else:
            d.computed.append(full)
            d.run = 0 if full else d.run + 1
        d.write(bufs[STATE_DECISION])
        d.pending, d.key, d.kind = step, (entry.uid, signature), kind

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

    def _repair_program(self, entry: Entry):
        if entry.repair_program is None:
            from ..rewrite.compile import _KindProgram, compile_graph

            g = entry.repair_graph
            entry.repair_program = _KindProgram(compile_graph(g.gm, self.options), g.buffers)
        return entry.repair_program
