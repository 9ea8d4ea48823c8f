"""A pipeline's own denoising steps, for the engines of its denoisers (``fxcache.enable(pipe)``).

When fxcache is attached to a pipeline, the pipeline is the source of truth for "which
denoising step is this", not the model calls: a step is what the scheduler steps.

- **Start of a call.** Every diffusers pipeline opens its progress bar once per call,
  before its first step. fxcache puts a ``progress_bar`` on the pipeline instance
  (:class:`CallStart`) that starts a new generation of every cached denoiser and resets
  the step count, then returns the pipeline's own bar. So each call starts fresh, also
  after a call that was interrupted.
- **The step.** fxcache puts a ``step`` on the scheduler instance (:class:`CountingStep`)
  that counts its calls; the denoising step of a model call is ``calls // scheduler.order``:
  Heun and KDPM2 (order 2) call the model and the scheduler twice per step (predictor and
  corrector: one step), PNDM calls them once per loop iteration (its repeated timestep
  is a step of its own), every other scheduler once per step. The same on every device:
  no timestep is read. A scheduler replaced on the pipeline gets its counter at the next
  call.
- **The length.** The bar's total (``total=`` in the pipelines that count steps, the
  length of the iterable divided by the scheduler's order in those that iterate over
  timesteps) is the generation's number of steps; a non-periodic plan of another length
  is an error (see the engine).

Both attributes pickle with the pipeline; ``fxcache.disable(pipe)`` removes them.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["CallStart", "CountingStep", "StepSource"]


class StepSource:
    """The denoising step of the pipeline call in progress (shared by its denoisers' engines)."""

    def __init__(self):
        self.calls = 0  # scheduler steps made in this call
        self.order = 1
        self.total: int | None = None  # denoising steps of this call, when the bar says
        self.generation = 0  # bumped at every call start
        self.active = False

    @property
    def step(self) -> int:
        return self.calls // self.order

    def start(self, scheduler, total: int | None) -> None:
        self.generation += 1
        self.calls = 0
        self.order = max(1, int(getattr(scheduler, "order", 1) or 1))
        self.total = total
        self.active = True


class CountingStep:
    """``scheduler.step`` that counts its calls for a :class:`StepSource`."""

    def __init__(self, scheduler, source: StepSource):
        self.scheduler = scheduler
        self.source = source
        self.previous = scheduler.__dict__.get("step")  # an instance-level step that was there before

    def __call__(self, *args, **kwargs):
        if self.previous is not None:
            out = self.previous(*args, **kwargs)
        else:
            out = type(self.scheduler).step(self.scheduler, *args, **kwargs)
        self.source.calls += 1
        return out


class _Bar:
    """The pipeline's progress bar; the call ends (the step source goes quiet) when the
    bar is closed or its iteration ends."""

    def __init__(self, bar, source: StepSource):
        self._bar = bar
        self._source = source

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        self._source.active = False
        return self._bar.__exit__(*exc)

    def __iter__(self):
        try:
            yield from self._bar
        finally:
            self._source.active = False

    def __getattr__(self, name):
        return getattr(self._bar, name)


class CallStart:
    """``pipe.progress_bar`` while fxcache is attached to ``pipe``'s denoisers ``names``."""

    def __init__(self, pipe, names, engines):
        self.pipe = pipe
        self.names = tuple(names)
        self.source = StepSource()
        for engine in engines:
            engine.step_source = self.source

    def __call__(self, iterable=None, total=None, **kwargs) -> Any:
        pipe = self.pipe
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is not None and hasattr(type(scheduler), "step"):
            counter = scheduler.__dict__.get("step")
            if not (isinstance(counter, CountingStep) and counter.source is self.source):
                scheduler.__dict__["step"] = CountingStep(scheduler, self.source)
        steps = total
        if steps is None and iterable is not None and hasattr(iterable, "__len__"):
            steps = math.ceil(len(iterable) / max(1, int(getattr(scheduler, "order", 1) or 1)))
        self.source.start(scheduler, steps)
        for engine in self.engines():
            engine.step_source = self.source
            engine.reset()
        bar = type(pipe).progress_bar(pipe, iterable=iterable, total=total, **kwargs)
        return _Bar(bar, self.source)

    def engines(self) -> list:
        from .inplace import engine_of

        return [e for e in (engine_of(getattr(self.pipe, n, None)) for n in self.names) if e is not None]

    def remove(self) -> None:
        """Take the counter off the scheduler (``fxcache.disable``)."""
        scheduler = getattr(self.pipe, "scheduler", None)
        counter = scheduler.__dict__.get("step") if scheduler is not None else None
        if isinstance(counter, CountingStep):
            if counter.previous is not None:
                scheduler.__dict__["step"] = counter.previous
            else:
                del scheduler.__dict__["step"]
        self.source.active = False
        for engine in self.engines():
            engine.step_source = None
