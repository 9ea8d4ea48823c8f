"""Caching attached to the denoiser object itself (``fxcache.enable``), as
``nn.Module.compile()`` and diffusers' ``enable_cache`` do: the model keeps its class,
``isinstance``, module and parameter names, ``state_dict`` keys, ``save_pretrained`` /
``from_pretrained``, peft and diffusers' hooks; it pickles and deep-copies (the copy is
cached too, with its own engine; compiled graphs and buffers are rebuilt at its first
call).

Mechanism: the model's instance gets four attributes, nothing else changes:

- ``forward``: the :class:`~fxcache.runtime.engine.Engine`, a callable that presents the
  class forward's signature (pipelines inspect ``denoiser.forward``). ``Module.__call__``
  runs the model's own forward hooks around it, as around any forward; while fxcache
  captures, a call of ``forward`` runs the class's forward;
- ``cache_context`` and ``_reset_stateful_cache``: the engine's, which also call the
  class's own (diffusers' ``CacheMixin``), so diffusers' hooks see contexts and resets;
- ``_fxcache``: the engine, for :func:`engine_of`.

:func:`detach` removes them. Nothing global is touched.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from typing import Any

import torch

from ..errors import FxcacheError
from .engine import Engine
from .guards import OWN_ATTRS
from .options import CompileOptions

__all__ = ["attach", "detach", "engine_of", "ClassForward"]


_ROOT_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


class ClassForward:
    """The model's forward as written (its class's ``forward`` bound to it): what the
    engine runs while capturing or while other hooks drive the model. Pickles as a
    reference to the model (a bound method of ``model.forward`` would resolve to the
    engine again after unpickling)."""

    def __init__(self, model: torch.nn.Module, previous: Any = None):
        self.model = model
        self.previous = previous  # an instance-level forward that was there before fxcache

    def __call__(self, *args, **kwargs):
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.model).forward(self.model, *args, **kwargs)


class _Forward(Engine):
    """The engine as the model's ``forward``: with the class forward's signature.
    ``torch.compile(model)`` runs it as a disabled region (its bookkeeping is host Python;
    the step graphs are fxcache's own compiled graphs), as ``CachedModel.__call__``."""

    __call__ = torch.compiler.disable(Engine.__call__)

    @contextlib.contextmanager
    def _as_written(self):
        """torch.export reads ``model.forward.__code__``: the instance attribute is taken
        off while capturing (under the engine's lock; another thread calling the model
        meanwhile runs it uncached, never wrong). So are the model's own forward hooks:
        ``Module.__call__`` runs them around the engine, and a capture through them
        would apply them twice."""
        d = self.model.__dict__
        hooks = {k: d[k] for k in _ROOT_HOOKS if d.get(k)}
        for k in hooks:
            d[k] = type(hooks[k])()
        mine = d.get("forward") is self
        previous = self.fallback.previous if isinstance(self.fallback, ClassForward) else None
        if mine:
            if previous is not None:
                d["forward"] = previous
            else:
                del d["forward"]
        try:
            yield
        finally:
            d.update(hooks)
            if mine:
                d["forward"] = self

    @property
    def __signature__(self):
        return inspect.signature(type(self.model).forward).replace(
            parameters=list(inspect.signature(type(self.model).forward).parameters.values())[1:])

    @property
    def __name__(self):  # functools/inspect users expect a forward to have one
        return "forward"

    @property
    def __doc__(self):
        return type(self.model).forward.__doc__


def engine_of(model: torch.nn.Module) -> Engine | None:
    """The engine attached to ``model`` in place, or the engine of a ``CachedModel``
    (``fxcache.compile``'s result), or None."""
    if isinstance(model, torch.nn.Module):
        engine = model.__dict__.get("_fxcache")
        if engine is None and isinstance(model.__dict__.get("engine"), Engine):
            engine = model.__dict__["engine"]
        return engine
    return None


def attach(model: torch.nn.Module, schedule, options: CompileOptions) -> Engine:
    """Attach caching to ``model`` in place (replacing an engine already attached)."""
    if engine_of(model) is not None:
        detach(model)
    taken = [k for k in OWN_ATTRS if k in model.__dict__ and k != "forward"]
    if taken:
        raise FxcacheError(
            f"{type(model).__name__} already has instance attributes {taken}; fxcache cannot attach to it in place"
        )
    previous = model.__dict__.get("forward")
    engine = _Forward(model, schedule, options, fallback=ClassForward(model, previous))
    d = model.__dict__
    d["_fxcache"] = engine
    d["forward"] = engine
    d["cache_context"] = engine.cache_context
    d["_reset_stateful_cache"] = engine._reset_stateful_cache
    return engine


def detach(model: torch.nn.Module) -> torch.nn.Module:
    """Remove what :func:`attach` set; the model runs as before. A forward that another
    library wrapped around fxcache's since (``model.forward`` is no longer the engine)
    stays, and the engine inside it passes every call through."""
    engine = engine_of(model)
    if engine is None:
        return model
    engine.enabled = False
    d = model.__dict__
    previous = engine.fallback.previous if isinstance(engine.fallback, ClassForward) else None
    if d.get("forward") is engine:
        if previous is not None:
            d["forward"] = previous
        else:
            del d["forward"]
    for k in ("cache_context", "_reset_stateful_cache"):
        v = d.get(k)
        if isinstance(v, types.MethodType) and v.__self__ is engine:
            del d[k]
    del d["_fxcache"]
    return model
