"""``fxcache.compile``: the stages in order (capture → analyze → schedule → rewrite →
compile → run). Capture and everything after it happen at the first call, when the
input shapes are known; a new input shape captures and plans again."""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import TYPE_CHECKING, Any, Union

import torch

from .analyze.units import UnitSet, find_units
from .calibrate.search import SearchResult
from .capture import capture
from .errors import OptionError, OptionTypeError, UnitError
from .schedules import check_schedule
from .plan import Plan
from .runtime import CachedModel, CompileOptions, engine_of
from .runtime import attach as _attach
from .runtime import detach as _detach
from .runtime.build import build_entry, prepare
from .runtime.pipeline import CallStart
from .runtime.voice import say, short

if TYPE_CHECKING:  # pragma: no cover
    from .calibrate.scale_shift import ScaleShift
    from .schedules import (
        FORA, AdaptiveDeepCache, BlockCache, DeepCache, FirstBlockCache, LearnedMask, MagCache, Mask, TeaCache,
    )

    Schedule = Union[
        Mask, DeepCache, FORA, BlockCache, LearnedMask, FirstBlockCache, AdaptiveDeepCache, MagCache, TeaCache
    ]

__all__ = ["compile", "units", "plan_for", "attach", "enable", "disable", "detach", "engine_of"]


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
    max_cache_bytes: int | None = None,
    verbose: bool = True,
    cache_dir: str | os.PathLike | None = None,
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
    max_cache_bytes: a budget, in bytes, for one cache state (``plan.cache_bytes``: the
    cache buffers of one input shape in one cache context, forecast history and adaptive
    state included). The plan of each input shape is checked when it is built, at the
    first call with that shape, before any buffer is allocated or graph compiled; a plan
    that needs more raises :class:`~fxcache.errors.CacheBudgetError` naming the biggest
    cached units. Each cache context (diffusers' ``cache_context("cond")`` /
    ``("uncond")``) holds its own state: ``plan.total_cache_bytes(contexts)``.
    verbose: say what the first call with each input shape does (capture, the plan,
    each step graph compiled and how long it took) on the ``"fxcache"`` logger;
    ``False`` for this model, ``fxcache.set_verbosity("WARNING")`` for all.
    cache_dir: warm start (``backend="inductor"`` only; ``~`` is expanded): each step graph is compiled
    with AOTInductor into a package in this folder, keyed by the graph, its inputs,
    the options and the torch/fxcache versions, and a later process that builds the
    same graph loads it instead of compiling (``docs/warm_start.md``).
    """
    if not isinstance(model, torch.nn.Module):
        raise OptionTypeError(f"fxcache.compile expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, CachedModel):
        raise OptionTypeError("this model is already a CachedModel; compile the original model instead")
    schedule, forecast = _searched(schedule, forecast, [model])
    check_schedule(schedule)
    opts = _options(
        backend=backend, mode=mode, num_steps=num_steps, max_shapes=max_shapes, fuse=fuse, options=options,
        freezing=freezing, segments=segments, max_graphs=max_graphs, scale_shift=scale_shift,
        timestep_rule=timestep_rule, repeated_timesteps=repeated_timesteps, forecast=forecast,
        max_cache_bytes=max_cache_bytes, verbose=verbose, cache_dir=cache_dir,
    )
    return CachedModel(model, schedule, opts)


def _options(*, backend="inductor", mode=None, num_steps=None, max_shapes=4, fuse=True, options=None,
             freezing=None, segments="auto", max_graphs=8, scale_shift=None, timestep_rule="auto",
             repeated_timesteps=False, forecast=0, max_cache_bytes=None, verbose=True,
             cache_dir=None) -> CompileOptions:
    """``compile``'s keyword arguments, checked, as :class:`CompileOptions` (``enable`` takes
    the same). A bad one is an OptionError (a ValueError; OptionTypeError for a wrong type,
    also a TypeError) naming the argument, the value and what is allowed, before anything
    is captured, never torch's error at the first call."""
    import numbers

    from .rewrite.compile import check_backend, check_mode, check_options
    from .runtime.options import TIMESTEP_RULES

    def _int(x) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    def bad(name, value, allowed, type_error=False):
        cls = OptionTypeError if type_error else OptionError
        return cls(f"fxcache.compile: {name} = {value!r} is not allowed; {name} must be {allowed}")

    check_backend(backend)
    check_mode(mode)
    check_options(options, backend)
    if num_steps is not None and (not _int(num_steps) or num_steps < 1):
        raise bad("num_steps", num_steps, "an integer >= 1 (the steps of a generation) or None",
                  type_error=not _int(num_steps))
    for name, value in (("max_shapes", max_shapes), ("max_graphs", max_graphs)):
        if not _int(value) or value < 1:
            raise bad(name, value, "an integer >= 1", type_error=not _int(value))
    for name, value in (("fuse", fuse), ("repeated_timesteps", repeated_timesteps), ("verbose", verbose)):
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
    if max_cache_bytes is not None and (not _int(max_cache_bytes) or max_cache_bytes < 1):
        raise bad("max_cache_bytes", max_cache_bytes,
                  "None (no budget) or a whole number of bytes >= 1 per cache state, e.g. 8 * 2**30",
                  type_error=not _int(max_cache_bytes))
    if cache_dir is not None:
        if isinstance(cache_dir, os.PathLike):
            cache_dir = os.fspath(cache_dir)
        if not isinstance(cache_dir, str) or not cache_dir:
            raise bad("cache_dir", cache_dir, "None or the path of a folder (str or os.PathLike) for the compiled "
                      "step graphs", type_error=not isinstance(cache_dir, str))
        cache_dir = os.path.expanduser(cache_dir)
        if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
            raise bad("cache_dir", cache_dir, "a folder (this path exists and is not one)")
        if backend != "inductor":
            raise bad("cache_dir", cache_dir, f"None with backend={backend!r}: the warm start stores AOTInductor "
                      f"packages, so it needs backend='inductor'")
        if mode == "reduce-overhead":
            raise bad("cache_dir", cache_dir, "None with mode='reduce-overhead': AOTInductor packages do not "
                      "use CUDA graphs")
        cache_dir = os.path.abspath(cache_dir)
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
    return CompileOptions(
        backend=backend, mode=mode, num_steps=None if num_steps is None else int(num_steps),
        max_shapes=int(max_shapes), fuse=fuse, options=options, freezing=freezing, segments=segments,
        max_graphs=int(max_graphs), scale_shift=scale_shift, timestep_rule=timestep_rule,
        repeated_timesteps=repeated_timesteps, forecast=int(forecast),
        max_cache_bytes=None if max_cache_bytes is None else int(max_cache_bytes), verbose=verbose,
        cache_dir=cache_dir,
    )


def units(model: torch.nn.Module, *example_args, **example_kwargs) -> UnitSet:
    """The cacheable units of ``model`` for these example inputs (captures once)."""
    return find_units(capture(model, example_args, example_kwargs).gm)


def plan_for(model: torch.nn.Module, schedule: Schedule, *example_args, num_steps: int | None = None, **example_kwargs) -> Plan:
    """The plan ``schedule`` gives on ``model`` for these inputs, bound to its rewritten
    graphs: the runtime's own build path up to compiling (capture, units, step graphs, an
    adaptive schedule's statistic and the buffer layout), so ``cache_bytes`` is what the
    first call allocates per cache state and what that call refuses is refused here.

    ``model`` may be a diffusers pipeline: ``plan_for(pipe, schedule, prompt=...,
    height=..., width=..., num_inference_steps=...)`` takes the pipeline call's keyword
    arguments, runs the pipeline up to its denoiser's first call (text encoders,
    latents, the scheduler's set-up), plans on exactly those inputs and stops there; the
    number of steps is the call's (``num_inference_steps``, or the pipeline's default).
    ``denoiser=`` names the component when it is not ``unet``/``transformer``."""
    if _is_pipeline(model):
        return _plan_for_pipeline(model, schedule, example_args, num_steps, example_kwargs)
    schedule, forecast = _searched(schedule, 0, [model])
    options = CompileOptions(num_steps=num_steps, backend=None, forecast=forecast)
    engine = engine_of(model)  # a model cached in place is planned as written
    with engine._as_written() if engine is not None else contextlib.nullcontext():
        prepared = prepare(model, schedule, options, example_args, example_kwargs)
    return build_entry(prepared, options, 0).plan


def _searched(schedule, forecast: int, models) -> tuple:
    """A :class:`~fxcache.calibrate.search.SearchResult` given as the schedule: its table
    and its forecast order, after checking it was searched on this kind of model."""
    if not isinstance(schedule, SearchResult):
        return schedule, forecast
    for m in models:
        schedule.check_model(m)
    if forecast not in (0, schedule.forecast):
        raise OptionError(f"forecast = {forecast!r}, but this schedule was searched with forecast order "
                          f"{schedule.forecast}; leave forecast out (it comes with the schedule)")
    return schedule.mask, schedule.forecast


class _FirstCall(Exception):
    """Raised by a pre-hook at a pipeline's first denoiser call, carrying its inputs."""


def _plan_for_pipeline(pipe, schedule, example_args: tuple, num_steps: int | None, call: dict) -> Plan:
    if example_args:
        raise TypeError(
            f"plan_for({type(pipe).__name__}, schedule, ...): a pipeline is planned from the keyword arguments of "
            f"its call (prompt=, height=, width=, num_inference_steps=, ...), not from example inputs"
        )
    check_schedule(schedule)
    call = dict(call)
    name = _denoisers(pipe, call.pop("denoiser", None))[0]
    module = getattr(pipe, name)
    if isinstance(module, CachedModel):
        module = module.model
    if num_steps is None:
        num_steps = call.get("num_inference_steps")
        if num_steps is None:
            param = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
            num_steps = param.default if param is not None and isinstance(param.default, int) else None

    def first_call(mod, args, kwargs):
        raise _FirstCall(args, kwargs)

    handle = module.register_forward_pre_hook(first_call, with_kwargs=True, prepend=True)
    try:
        with torch.no_grad():
            pipe(**call)
    except _FirstCall as got:
        args, kwargs = got.args
    else:
        raise UnitError(f"{type(pipe).__name__}(...) returned without calling its denoiser '{name}'; nothing to plan")
    finally:
        handle.remove()
    return plan_for(module, schedule, *args, num_steps=num_steps, **kwargs)


_DENOISER_ATTRS = ("unet", "transformer", "prior", "decoder")
_SECOND_DENOISERS = ("transformer_2", "unet_2")  # two-expert pipelines (Wan 2.2): both are cached


def _is_pipeline(obj) -> bool:
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(obj, DiffusionPipeline)


def _denoisers(pipe, denoiser: str | None) -> list[str]:
    if denoiser is not None:
        if not isinstance(getattr(pipe, denoiser, None), torch.nn.Module):
            raise UnitError(f"{type(pipe).__name__}.{denoiser} is not a module")
        return [denoiser]
    first = next((a for a in _DENOISER_ATTRS if isinstance(getattr(pipe, a, None), torch.nn.Module)), None)
    if first is None:
        raise UnitError(
            f"{type(pipe).__name__} has none of the attributes {_DENOISER_ATTRS}; pass denoiser='name' "
            f"to say which component is the denoiser"
        )
    return [first] + [a for a in _SECOND_DENOISERS if isinstance(getattr(pipe, a, None), torch.nn.Module)]


def enable(target: Any, schedule: Schedule, *, denoiser: str | None = None, **options: Any) -> Any:
    """Attach caching in place (as ``nn.Module.compile()`` and diffusers' ``enable_cache``):
    the model keeps its class, names, ``state_dict`` keys and hooks, and pickles.

    A pipeline: its denoiser (``unet``/``transformer``/..., with ``transformer_2`` where
    there is one, or ``denoiser=``) is cached in place; every pipeline call starts a
    new generation, and the pipeline's scheduler says which denoising step each model
    call belongs to (:mod:`fxcache.runtime.pipeline`); returns the pipeline. A model:
    returns the model itself.
    ``options`` are ``fxcache.compile``'s. :func:`engine_of` gives the plan and the
    decisions; :func:`disable` detaches. A ``CachedModel`` wrapper given here (or found
    in the pipeline) is replaced by its model."""
    if isinstance(schedule, SearchResult):
        models = [getattr(target, n) for n in _denoisers(target, denoiser)] if _is_pipeline(target) else [target]
        schedule, options["forecast"] = _searched(schedule, options.get("forecast", 0), models)
    check_schedule(schedule)
    opts = _options(**options)
    if _is_pipeline(target):
        names = _denoisers(target, denoiser)
        engines = []
        for name in names:
            model = getattr(target, name)
            if isinstance(model, CachedModel):
                model = model.model
                setattr(target, name, model)
            engines.append(_attach(model, schedule, opts))
            say(opts.verbose, f"caching {type(target).__name__}.{name} ({type(model).__name__}) with {short(schedule)}; "
                              f"its step graphs are built at the first call")
        old = target.__dict__.get("progress_bar")
        if isinstance(old, CallStart):
            old.remove()
        target.__dict__["progress_bar"] = CallStart(target, names, engines)
        return target
    if isinstance(target, CachedModel):
        target = target.model
    if not isinstance(target, torch.nn.Module):
        raise TypeError(f"fxcache.enable expects a diffusers pipeline or an nn.Module, got {type(target).__name__}")
    _attach(target, schedule, opts)
    say(opts.verbose, f"caching {type(target).__name__} in place with {short(schedule)}; its step graphs are built at "
                      f"the first call")
    return target


attach = enable


def disable(target: Any) -> Any:
    """Undo :func:`enable` / :func:`compile`: a pipeline's denoisers and a model lose
    their caching (returned as they are); a ``CachedModel`` gives its original model;
    anything else is returned as it is."""
    if isinstance(target, CachedModel):
        return target.model
    if _is_pipeline(target):
        hook = target.__dict__.get("progress_bar")
        if isinstance(hook, CallStart):
            hook.remove()
            del target.__dict__["progress_bar"]
        names = hook.names if isinstance(hook, CallStart) else _DENOISER_ATTRS + _SECOND_DENOISERS
        for name in names:
            comp = getattr(target, name, None)
            if isinstance(comp, CachedModel):
                setattr(target, name, comp.model)
            elif isinstance(comp, torch.nn.Module):
                _detach(comp)
        return target
    if isinstance(target, torch.nn.Module):
        _detach(target)
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
