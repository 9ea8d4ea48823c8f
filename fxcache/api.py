"""``fxcache.compile``: the stages in order (capture → analyze → schedule → rewrite →
compile → run). Capture and everything after it happen at the first call, when the
input shapes are known; a new input shape captures and plans again."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import TYPE_CHECKING, Any, Union

import torch

from .analyze.units import UnitSet, find_units
from .capture import capture
from .errors import UnitError
from .plan import Plan
from .planning import lower_to_plan
from .runtime import CachedModel, CompileOptions

if TYPE_CHECKING:  # pragma: no cover
    from .calibrate.scale_shift import ScaleShift
    from .schedules import (
        FORA, AdaptiveDeepCache, BlockCache, DeepCache, FirstBlockCache, LearnedMask, MagCache, Mask, TeaCache,
    )

    Schedule = Union[
        Mask, DeepCache, FORA, BlockCache, LearnedMask, FirstBlockCache, AdaptiveDeepCache, MagCache, TeaCache
    ]

__all__ = ["compile", "units", "plan_for", "attach", "enable", "disable", "detach"]


def compile(
    model: torch.nn.Module,
    schedule: Schedule,
    *,
    backend: str | None = "inductor",
    mode: str | None = None,
    num_steps: int | None = None,
    max_shapes: int = 4,
    fuse: bool = True,
    options: dict[str, Any] | None = None,
    freezing: bool | None = None,
    segments: bool | str = "auto",
    max_graphs: int = 8,
    scale_shift: ScaleShift | str | os.PathLike | None = None,
    timestep_rule: str = "auto",
    repeated_timesteps: bool = False,
    forecast: int = 0,
) -> CachedModel:
    """Return a drop-in replacement for ``model`` that follows ``schedule``.

    backend: ``"inductor"`` (default), any ``torch.compile`` backend, or ``None`` to
    run the rewritten graphs eagerly. mode/options: passed to ``torch.compile``.
    freezing: inductor's weight freezing (default on for inductor; see
    ``fxcache.rewrite.compile``). num_steps: required only by schedules that are not
    periodic. max_shapes: input shapes whose graphs and buffers are kept. segments:
    ``"auto"`` compiles per segment between unit boundaries when the plan has more
    than ``max_graphs`` kinds of step; True/False force it. fuse: fuse cache reads
    with the gate arithmetic around them. scale_shift: trained
    :class:`~fxcache.calibrate.scale_shift.ScaleShift` adapters (or their checkpoint
    path) applied at cache reads; ``BlockCache(scale_shift=path)`` does the same.
    timestep_rule: how a new generation is told from the timestep, ``"auto"``
    (default), ``"values"``, ``"storage"`` or ``"off"``; repeated_timesteps: equal
    consecutive timesteps continue a generation (Heun-like schedulers). See
    :mod:`fxcache.runtime`, "When does a new generation start?". forecast: what a cache
    read yields, for every schedule: 0 (default) the value stored when the unit was
    last computed; 1 or 2 the polynomial of that order through the unit's values at
    its last 2 or 3 computed steps, evaluated at this step (TaylorSeer's
    finite-difference forecast); the cache then holds ``forecast + 1`` values per slot.
    """
    # every argument is checked here, before anything is captured: a bad one is an
    # OptionError (a ValueError; OptionTypeError for a wrong type, also a TypeError)
    # naming the argument, the value and what is allowed, never torch's error at the first call
    import numbers

    from .errors import OptionError, OptionTypeError
    from .rewrite.compile import check_backend, check_mode, check_options
    from .runtime import TIMESTEP_RULES
    from .schedules import check_schedule

    def _int(x) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    def bad(name, value, allowed, type_error=False):
        cls = OptionTypeError if type_error else OptionError
        return cls(f"fxcache.compile: {name} = {value!r} is not allowed; {name} must be {allowed}")

    if not isinstance(model, torch.nn.Module):
        raise OptionTypeError(f"fxcache.compile expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, CachedModel):
        raise OptionTypeError("this model is already a CachedModel; compile the original model instead")
    check_schedule(schedule)
    check_backend(backend)
    check_mode(mode)
    check_options(options, backend)
    if num_steps is not None and (not _int(num_steps) or num_steps < 1):
        raise bad("num_steps", num_steps, "an integer >= 1 (the steps of a generation) or None",
                  type_error=not _int(num_steps))
    for name, value in (("max_shapes", max_shapes), ("max_graphs", max_graphs)):
        if not _int(value) or value < 1:
            raise bad(name, value, "an integer >= 1", type_error=not _int(value))
    for name, value in (("fuse", fuse), ("repeated_timesteps", repeated_timesteps)):
        if not isinstance(value, bool):
            raise bad(name, value, "True or False", type_error=True)
    if freezing is not None and not isinstance(freezing, bool):
        raise bad("freezing", freezing, "True, False or None (inductor's default, True)", type_error=True)
    if not (segments is True or segments is False or (isinstance(segments, str) and segments == "auto")):
        raise bad("segments", segments, "True, False or 'auto'", type_error=not isinstance(segments, (bool, str)))
    if not isinstance(timestep_rule, str) or timestep_rule not in TIMESTEP_RULES:
        raise bad("timestep_rule", timestep_rule, f"one of {list(TIMESTEP_RULES)}",
                  type_error=not isinstance(timestep_rule, str))
    if not _int(forecast) or forecast not in (0, 1, 2):
        # "forecast must be" is what callers matched before this was an OptionError
        raise (OptionError if _int(forecast) else OptionTypeError)(
            f"fxcache.compile: forecast = {forecast!r} is not allowed; forecast must be 0 (reuse), 1 or 2 "
            f"(the order of the extrapolation)"
        )
    if scale_shift is not None:
        from .rewrite.adapters import ScaleShift

        if isinstance(scale_shift, os.PathLike):
            scale_shift = os.fspath(scale_shift)
        if isinstance(scale_shift, str) and scale_shift:
            from .artefacts.store import read_scale_shift

            read_scale_shift(scale_shift)  # a missing or damaged file: CheckpointError naming it, now
        elif not isinstance(scale_shift, ScaleShift):
            raise bad("scale_shift", scale_shift, "None, ScaleShift adapters or the path of their checkpoint",
                      type_error=True)
    opts = CompileOptions(
        backend=backend, mode=mode, num_steps=None if num_steps is None else int(num_steps),
        max_shapes=int(max_shapes), fuse=fuse, options=options, freezing=freezing, segments=segments,
        max_graphs=int(max_graphs), scale_shift=scale_shift, timestep_rule=timestep_rule,
        repeated_timesteps=repeated_timesteps, forecast=int(forecast),
    )
    return CachedModel(model, schedule, opts)


def units(model: torch.nn.Module, *example_args, **example_kwargs) -> UnitSet:
    """The cacheable units of ``model`` for these example inputs (captures once)."""
    return find_units(capture(model, example_args, example_kwargs).gm)


def plan_for(model: torch.nn.Module, schedule: Schedule, *example_args, num_steps: int | None = None, **example_kwargs) -> Plan:
    """The plan ``schedule`` gives on ``model`` for these inputs, bound to its rewritten graphs."""
    from .rewrite.step_graphs import solve_steps

    captured = capture(model, example_args, example_kwargs)
    unitset = find_units(captured.gm)
    plan = lower_to_plan(schedule, unitset, num_steps, type(model).__name__)
    solved = solve_steps(captured.gm, [u for u in unitset if u.name in set(plan.units)], plan)
    return plan.bind(solved.kind_of_step, solved.step_kinds)


_DENOISER_ATTRS = ("unet", "transformer", "prior", "decoder")


def _is_pipeline(obj) -> bool:
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(obj, DiffusionPipeline)


def _cached_components(pipe) -> dict:
    return {name: comp for name, comp in pipe.components.items() if isinstance(comp, CachedModel)}


@contextlib.contextmanager
def _originals(pipe):
    """Every cached component of ``pipe`` replaced by its original model (the pipeline's
    config records the original class while inside), then put back."""
    cached = _cached_components(pipe)
    for name, comp in cached.items():
        setattr(pipe, name, comp.model)
    try:
        yield
    finally:
        for name, comp in cached.items():
            setattr(pipe, name, comp)


def attach(pipe: Any, schedule: Schedule | None = None, *, denoiser: str | None = None, **compile_kwargs: Any) -> Any:
    """Put a cached denoiser into a diffusers pipeline and start a new generation at
    every call of the pipeline. ``schedule=None`` keeps an already cached denoiser.
    ``pipe.save_pretrained`` then writes the original denoiser (a pipeline that loads
    without fxcache); :func:`disable` restores the original component and class."""
    name = denoiser or next((a for a in _DENOISER_ATTRS if getattr(pipe, a, None) is not None), None)
    if name is None:
        raise UnitError(
            f"{type(pipe).__name__} has none of the attributes {_DENOISER_ATTRS}; pass denoiser='name' "
            f"to say which component is the denoiser"
        )
    cached = getattr(pipe, name)
    if schedule is not None:
        if isinstance(cached, CachedModel):
            cached = cached.model
        cached = compile(cached, schedule, **compile_kwargs)
        setattr(pipe, name, cached)
    elif not isinstance(cached, CachedModel):
        raise UnitError(f"pipe.{name} is not a CachedModel; pass a schedule to compile it")

    cls = type(pipe)
    if not getattr(cls, "_fxcache_attached", False):
        original_call = cls.__call__
        original_save = cls.save_pretrained

        @functools.wraps(original_call)
        def __call__(self, *args, **kwargs):
            denoiser_module = getattr(self, self._fxcache_denoiser)
            if isinstance(denoiser_module, CachedModel):
                with denoiser_module.generation():
                    return original_call(self, *args, **kwargs)
            return original_call(self, *args, **kwargs)

        @functools.wraps(original_save)
        def save_pretrained(self, *args, **kwargs):
            with _originals(self):
                return original_save(self, *args, **kwargs)

        sub = type(
            cls.__name__,
            (cls,),
            {"__call__": __call__, "save_pretrained": save_pretrained, "_fxcache_attached": True,
             "_fxcache_original_class": cls, "__module__": cls.__module__},
        )
        pipe.__class__ = sub
    pipe._fxcache_denoiser = name
    return pipe


def enable(target: Any, schedule: Schedule, *, denoiser: str | None = None, **options: Any) -> Any:
    """diffusers-style entry point (as ``CacheMixin.enable_cache``).

    A pipeline: its denoiser (``unet``/``transformer``/..., or ``denoiser=``) is cached,
    every pipeline call is a fresh generation, ``save_pretrained`` writes the original
    model; returns the pipeline. A model: returns ``fxcache.compile(model, schedule,
    **options)``. Undo with :func:`disable`."""
    if _is_pipeline(target):
        return attach(target, schedule, denoiser=denoiser, **options)
    if isinstance(target, CachedModel):
        target = target.model
    return compile(target, schedule, **options)


def disable(target: Any) -> Any:
    """Undo :func:`enable` / :func:`attach` / :func:`compile`: a pipeline gets its
    original components and class back (returned); a ``CachedModel`` gives its original
    model; anything else is returned as it is."""
    if isinstance(target, CachedModel):
        return target.model
    if _is_pipeline(target):
        for name, comp in _cached_components(target).items():
            setattr(target, name, comp.model)
        original = getattr(type(target), "_fxcache_original_class", None)
        if original is not None:
            target.__class__ = original
            target.__dict__.pop("_fxcache_denoiser", None)
        return target
    return target


detach = disable


def _register_with_diffusers() -> None:
    """Make ``pipe.save_pretrained`` save a ``CachedModel`` component that was assigned
    directly (``pipe.unet = fxcache.compile(...)``): diffusers saves components through
    its registry of libraries; fxcache registers ``CachedModel``, whose
    ``save_pretrained`` writes the original model and whose ``from_pretrained`` loads it
    back (uncached). The pipeline's ``model_index.json`` then names ``fxcache``, so
    loading it needs ``import fxcache`` first; :func:`enable` / :func:`attach` save a
    pipeline that names the original class and loads without fxcache."""
    try:
        from diffusers.pipelines import pipeline_loading_utils as plu
    except ImportError:  # pragma: no cover
        return
    entry = {"CachedModel": ["save_pretrained", "from_pretrained"]}
    plu.LOADABLE_CLASSES.setdefault("fxcache", entry)
    plu.ALL_IMPORTABLE_CLASSES.update(entry)


_register_with_diffusers()
