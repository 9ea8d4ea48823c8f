"""pytest plugin: run diffusers' own pipeline tests with fxcache on every pipeline's denoiser.

Loaded with ``-p fxcache_suite_plugin`` (``scripts/diffusers_suite.sh`` puts this folder
on ``PYTHONPATH``). Environment:

``FXCACHE_SUITE``          ``off`` (default: nothing is patched), ``full`` or ``real``.
``FXCACHE_SUITE_EVENTS``   a JSON-lines file; one line per test that built a pipeline
                           (how many pipelines were cached, cached calls, refusals,
                           schedule switches, bit-exactness checks).
``FXCACHE_SUITE_VERIFY``   ``1``: at every cached call of a denoiser also run the plain
                           model on the same inputs and require the outputs to be equal
                           bit for bit (default ``1`` for ``full``, ``0`` for ``real``).

How it hooks in. Every ``DiffusionPipeline`` subclass's ``__init__`` (those already
imported and, through ``__init_subclass__``, those diffusers' lazy modules define later)
is wrapped; when the outermost ``__init__`` of a pipeline returns, the pipeline is
complete and ``fxcache.enable(pipe, schedule, backend=None)`` attaches caching to its
denoiser(s) in place (eager rewritten graphs, no ``torch.compile``). This covers
``Pipeline(**components)``, ``Pipeline.from_pretrained(...)`` and
``Pipeline.from_pipe(...)`` alike. The cached calls are seen by wrapping the call of
fxcache's in-place engine class (the model's ``forward`` instance attribute), so deep
copies of a cached model (their own engines) are checked too.

Schedules. ``full``: a compute-everything plan, ``DeepCache(interval=1, branch=0)`` for U-Nets and
``FORA(interval=1)`` for everything else; ``real``: the same with ``interval=2``. If the
first choice does not apply to the model (an ``FxcacheError`` at the first call that is
not a capture error), the other one is attached to the model instead, and for ``full``
then ``Mask.full(fxcache.units(model, *inputs))``. Each switch is recorded.

Verification (``full``): after each cached call the plain model's output,
``type(model).forward(model, *args, **kwargs)`` under ``torch.no_grad`` (the class
forward: the engine and its state are not involved), must equal the cached output bit
for bit. Skipped while hooks that fxcache steps aside for are on the model
(``fxcache.runtime.guards.foreign_hooks``: diffusers' ``enable_cache``, layerwise
casting, group offloading; accelerate's per-submodule hooks): fxcache runs the model as
the hooks make it run, and a second run would disturb the hooks' state. Those calls are
counted as ``hooked_calls``, not as cached, and are not the "first call" below.

Refusals. An ``FxcacheError`` raised by ``fxcache.enable`` or by the denoiser's first
call (after the alternatives above) makes the plugin detach fxcache
(``fxcache.disable(pipe)``; the first call is answered by the plain model) and record a
refusal. Any other exception propagates: the test fails, and that counts against
fxcache. A later call that raises ``FxcacheError`` is a failure too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import weakref
from typing import Any

import pytest

MODE = os.environ.get("FXCACHE_SUITE", "off").strip().lower()
if MODE not in ("off", "full", "real"):
    raise pytest.UsageError(f"FXCACHE_SUITE must be off, full or real, got {MODE!r}")
VERIFY = os.environ.get("FXCACHE_SUITE_VERIFY", "1" if MODE == "full" else "0") == "1"
EVENTS = os.environ.get("FXCACHE_SUITE_EVENTS")

_current_test: str | None = None
_record: dict[str, Any] = {}
_state: "weakref.WeakKeyDictionary[Any, _EngineState]" = weakref.WeakKeyDictionary()  # by engine


@dataclasses.dataclass
class _EngineState:
    pipe: Any  # weakref to the pipeline, or None (an engine the plugin did not attach: a deep copy's)
    alternatives: list  # schedules still to try if the first call says the schedule does not apply
    first_done: bool = False


def _new_record() -> dict[str, Any]:
    return {"enabled": 0, "cached_calls": 0, "verified_calls": 0, "hooked_calls": 0,
            "mismatches": [], "refusals": [], "switches": [], "pipelines": []}


def _rec() -> dict[str, Any]:
    global _record
    if not _record:
        _record = _new_record()
    return _record


def _short(exc: BaseException) -> str:
    line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {line}"[:400]


# ---------------------------------------------------------------- schedules

def _schedules(model) -> list:
    import fxcache

    interval = 1 if MODE == "full" else 2
    unet_first = "unet" in type(model).__name__.lower()
    deep, fora = fxcache.DeepCache(interval=interval, branch=0), fxcache.FORA(interval=interval)
    order = [deep, fora] if unet_first else [fora, deep]
    if MODE == "full":
        order.append("mask-full")  # built from the units at the first call
    return order


# the attributes fxcache.enable(pipe) caches: the first of the first four, and a second expert
_DENOISER_ATTRS = ("unet", "transformer", "prior", "decoder", "transformer_2", "unet_2")


def _denoisers(pipe) -> list:
    import torch

    return [m for m in (getattr(pipe, a, None) for a in _DENOISER_ATTRS) if isinstance(m, torch.nn.Module)]


# ---------------------------------------------------------------- enabling

def _enable(pipe) -> None:
    import fxcache
    from fxcache import FxcacheError

    models = _denoisers(pipe)
    if not models:
        return  # no denoiser (a VAE-only or audio pipeline): nothing to cache
    order = _schedules(models[0])
    rec = _rec()
    rec["pipelines"].append(f"{type(pipe).__name__}: {', '.join(type(m).__name__ for m in models)}")
    try:
        fxcache.enable(pipe, order[0], backend=None)
    except FxcacheError as exc:
        rec["refusals"].append({"stage": "enable", "pipeline": type(pipe).__name__,
                                "model": type(models[0]).__name__, "error": _short(exc)})
        fxcache.disable(pipe)
        return
    for model in models:
        engine = fxcache.engine_of(model)
        if engine is not None:
            _state[engine] = _EngineState(weakref.ref(pipe), order[1:])
    rec["enabled"] += 1


def _wrap_init(cls) -> None:
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_fxcache_suite", False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        depth = self.__dict__.get("_fxcache_suite_depth", 0)
        self.__dict__["_fxcache_suite_depth"] = depth + 1
        try:
            init(self, *args, **kwargs)
        finally:
            if depth:
                self.__dict__["_fxcache_suite_depth"] = depth
            else:
                self.__dict__.pop("_fxcache_suite_depth", None)
        if depth == 0:
            _enable(self)

    __init__._fxcache_suite = True
    cls.__init__ = __init__


def _install_pipeline_hook() -> None:
    from diffusers import DiffusionPipeline

    seen, todo = set(), [DiffusionPipeline]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if cls is not DiffusionPipeline:
            _wrap_init(cls)
        todo.extend(cls.__subclasses__())

    previous = DiffusionPipeline.__dict__.get("__init_subclass__")

    def __init_subclass__(cls, **kwargs):
        if previous is not None:
            previous.__func__(cls, **kwargs)
        else:
            super(DiffusionPipeline, cls).__init_subclass__(**kwargs)
        _wrap_init(cls)

    DiffusionPipeline.__init_subclass__ = classmethod(__init_subclass__)


# ---------------------------------------------------------------- calls

def _compare(a, b, path="out") -> str | None:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{path}: shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs()
            return f"{path}: max |diff| {diff.max().item():.3e}, {int((diff > 0).sum())} of {diff.numel()} differ"
        return None
    if isinstance(a, dict) or hasattr(a, "keys") and hasattr(a, "values"):
        ka, kb = list(a.keys()), list(b.keys())
        if ka != kb:
            return f"{path}: keys {ka} vs {kb}"
        for k in ka:
            r = _compare(a[k], b[k], f"{path}.{k}")
            if r:
                return r
        return None
    if isinstance(a, (tuple, list)):
        if not isinstance(b, (tuple, list)) or len(a) != len(b):
            return f"{path}: {type(a).__name__} of {len(a)} vs {type(b).__name__}"
        for i, (x, y) in enumerate(zip(a, b)):
            r = _compare(x, y, f"{path}[{i}]")
            if r:
                return r
        return None
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def _first_call_fallback(engine, st: _EngineState, first_exc, args, kwargs):
    """The first call raised an FxcacheError: attach the other schedules, else detach."""
    import fxcache
    from fxcache import CaptureError, FxcacheError

    rec = _rec()
    model = engine.model
    pipe = st.pipe() if st.pipe is not None else None
    errors = [_short(first_exc)]
    if not isinstance(first_exc, CaptureError):
        for alt in st.alternatives:
            fxcache.disable(model)  # fxcache.units captures the model as written
            try:
                schedule = fxcache.Mask.full(list(fxcache.units(model, *args, **kwargs))) \
                    if alt == "mask-full" else alt
                fxcache.enable(model, schedule, backend=None)  # the model only: the pipeline keeps its step counter
                new = fxcache.engine_of(model)
                new.step_source = engine.step_source  # this pipeline call's denoising steps
                _state[new] = _EngineState(st.pipe, [], first_done=True)
                out = model.forward(*args, **kwargs)  # the new engine (checked like any cached call)
            except FxcacheError as exc:
                errors.append(_short(exc))
                continue
            rec["switches"].append({"model": type(model).__name__, "to": repr(schedule)[:120],
                                    "because": errors[0]})
            return out
    rec["refusals"].append({"stage": "first-call", "pipeline": type(pipe).__name__ if pipe is not None else None,
                            "model": type(model).__name__, "error": errors[0], "alternatives": errors[1:]})
    if pipe is not None:
        fxcache.disable(pipe)  # its step counter and progress bar too
    fxcache.disable(model)
    return model.forward(*args, **kwargs)  # the class forward again


def _install_call_hook() -> None:
    import torch
    from fxcache import FxcacheError
    from fxcache.runtime.guards import foreign_hooks  # the hooks while which fxcache steps aside
    from fxcache.runtime.inplace import _Forward  # the class of the engine enable() puts on model.forward

    call = _Forward.__call__
    if getattr(call, "_fxcache_suite", False):
        return

    def wrapped(engine, *args, **kwargs):
        if not engine.enabled:  # detached: fxcache passes the call through
            return call(engine, *args, **kwargs)
        st = _state.setdefault(engine, _EngineState(None, []))
        rec = _rec()
        # while diffusers' hooks (enable_cache, layerwise casting, group offloading) or
        # accelerate's per-submodule hooks run the model, fxcache steps aside (it warns
        # "not caching"); running the plain model again would disturb the hooks' state
        hooked = bool(foreign_hooks(engine.model))
        if not st.first_done and not hooked:  # the first call fxcache captures at
            st.first_done = True
            try:
                out = call(engine, *args, **kwargs)
            except FxcacheError as exc:
                return _first_call_fallback(engine, st, exc, args, kwargs)
        else:
            out = call(engine, *args, **kwargs)
        if hooked:
            rec["hooked_calls"] += 1
            return out
        rec["cached_calls"] += 1
        if VERIFY:
            model = engine.model
            with torch.no_grad():
                ref = type(model).forward(model, *args, **kwargs)
            rec["verified_calls"] += 1
            diff = _compare(out, ref)
            if diff is not None:
                rec["mismatches"].append(f"{type(model).__name__}: {diff}")
                raise AssertionError(f"fxcache full plan is not bit-identical to the model: "
                                     f"{type(model).__name__} {diff}")
        return out

    wrapped._fxcache_suite = True
    _Forward.__call__ = torch.compiler.disable(wrapped)
    _Forward.__call__._fxcache_suite = True


# ---------------------------------------------------------------- pytest hooks

def pytest_configure(config):
    if MODE == "off":
        return
    import fxcache  # noqa: F401  (fails loudly here if fxcache is not importable)

    _install_pipeline_hook()
    _install_call_hook()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _current_test, _record
    _current_test, _record = item.nodeid, {}
    yield
    if EVENTS and _record:
        with open(EVENTS, "a") as f:
            f.write(json.dumps({"test": item.nodeid, "mode": MODE, **_record}) + "\n")
    _current_test, _record = None, {}


def pytest_report_header(config):
    return f"fxcache suite plugin: mode={MODE} verify={VERIFY} events={EVENTS}"
