"""The generation state the runtime keeps per thread and cache context (:class:`GenerationState`),
the timestep rule that starts a new generation, and the host side of adaptive plans
(:class:`Decider`, :class:`Decisions`). Bookkeeping on the host only: nothing here reads a
device tensor's value except the "values" timestep rule, which runs only where that
costs no device sync (a CPU tensor)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["GenerationState", "ThreadStates", "Decider", "Decisions", "apply_timestep_rule"]


@dataclass
class GenerationState:
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
    ended_at: int | None = None  # the length of the generation that ended last (not yet checked)
    source_generation: int = 0  # the pipeline call (StepSource.generation) this state follows

    def forget(self) -> None:
        """No slot holds a value of this generation (for ``signature``)."""
        self.valid = set()
        self.computed_at = {}

    def new_generation(self) -> None:
        if not self.new:
            self.ended_at = self.step  # how many steps the generation that ends here ran
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


class Decider:
    """The host side of an adaptive plan, per cache state: the host copy of the last
    step's decision (pinned memory and a CUDA event on CUDA, a plain copy on the CPU), the
    run of consecutive reused steps and the record of the generation. Reads the decision
    through a NumPy view of the host copy: no ``Tensor.item``/``__bool__``/``.cpu()``."""

    def __init__(self):
        self.key = None  # (entry uid, signature) of the pending decision
        self.pending: int | None = None  # the step whose decision the host copy holds
        self.kind = None  # the kind that step ran
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
        self.pending, self.key, self.run, self.kind = None, None, 0, None

    def read(self) -> tuple[float, bool]:
        if self.event is not None:
            self.event.synchronize()  # the copy queued after the previous step (see docs/schedules.md, "Adaptive caching")
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


class ThreadStates(threading.local):
    """The calling thread's cache context and its generation states, by context."""

    def __init__(self):
        self.context: str | None = None
        self.states: dict = {}
        self.busy = False  # inside fxcache's own work (capture, a fallback call): calls run the model as written
        self.step_given = False  # inside cache_context(step_index=i): the step is given, no timestep rule
        self.expected_steps = None  # inside cache_context(num_inference_steps=n): the generation's length


def apply_timestep_rule(state: GenerationState, t: Any, rule: str, repeated: bool) -> None:
    """Rule 3 of "When does a new generation start?" (see :mod:`fxcache.runtime`)."""
    if rule == "off" or not isinstance(t, torch.Tensor):
        return
    if rule == "values" or (rule == "auto" and t.device.type == "cpu"):
        value = float(t.reshape(-1)[0]) if t.numel() else None
        if value is None:
            return
        if state.last_t is not None:
            d = (value > state.last_t) - (value < state.last_t)
            if d == 0 and not repeated:
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
        elif key[1] < last[1] or (key[1] == last[1] and not repeated):
            state.new_generation()
    state.last_storage = key
