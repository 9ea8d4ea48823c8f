"""Stage 7, run: :class:`CachedModel`, the drop-in replacement for a denoiser.

The engine holds, per input shape signature, the captured graph, the plan and one
(compiled) graph per kind of step (an *entry*), and, per thread and cache context, the
generation state: the current step, the static cache buffers and which of their slots
hold a value written in the current generation. Calling the model runs the graph of the
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

**Attached to a pipeline** (``fxcache.enable(pipe)``, :mod:`fxcache.runtime.pipeline`):
each pipeline call starts a generation, and the step of a model call is the pipeline's
denoising step (``scheduler.step`` calls // ``scheduler.order``); the rules below do not
apply while a pipeline call is in progress.

**When does a new generation start?** (checked in this order; the first that applies wins)

1. ``reset()``, entering ``with model.generation():``, ``_reset_stateful_cache()``
   (diffusers pipelines call it on every component at the end of every call, through
   ``maybe_free_model_hooks()``), or a pipeline call prepared with
   :func:`fxcache.attach`;
2. ``cache_context(name, step_index=i)`` (diffusers' keyword): step ``i`` is used as
   given, ``i == 0`` starts a new generation, and the timestep rule does not apply to
   the calls inside;
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

**The model's state (guards).** ``torch.export`` bakes every plain value the forward
reads into the graph (peft's adapter names and scales, FreeU factors, processor
attributes, ...). At the start of every generation the runtime compares a snapshot of
the model's module state with the one taken at capture (:mod:`fxcache.runtime.guards`):
module, processor, hook and parameter identities and the plain values of every module's
attributes; a difference captures again. In-place edits of weights need no recapture:
the graphs read the parameters themselves. A change in the middle of a generation is
seen at the next generation start (pipelines start one at every call). Nothing global
is registered: importing fxcache changes nothing for other models.

**Other libraries' hooks.** While diffusers hooks (``enable_cache``, layerwise casting,
group offloading) or accelerate's per-submodule hooks are on the model, the engine runs
the model as those hooks make it run and warns once: the caches do not compose, and a
graph captured through a stateful hook would be wrong.

**Two ways to attach.** ``fxcache.compile`` returns a :class:`CachedModel` wrapper
(:mod:`fxcache.runtime.cached`); ``fxcache.enable`` attaches the same engine to the
model object itself (:mod:`fxcache.runtime.inplace`).

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

The per-step path does no logging and no device-wide synchronisation; an adaptive plan
on CUDA waits for the event of the previous step's decision copy (the one-step lag).
"""

from __future__ import annotations

from .cached import CachedModel
from .engine import Engine, PlanLengthError
from .inplace import attach, detach, engine_of
from .options import CompileOptions, UnsupportedCallError
from .state import Decisions

__all__ = ["CachedModel", "CompileOptions", "Decisions", "Engine", "PlanLengthError", "UnsupportedCallError", "attach", "detach",
           "engine_of"]
