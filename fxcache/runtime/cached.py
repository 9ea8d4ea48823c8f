"""``fxcache.compile``'s result: :class:`CachedModel`, a module that wraps the denoiser
(submodule ``model``) and runs it through an :class:`~fxcache.runtime.engine.Engine`.

What a wrapper cannot hide (``fxcache.enable`` attaches to the model itself instead and
has none of these): it is another class (``isinstance(cached, UNet2DModel)`` is False);
``named_modules()``/``named_parameters()``/``modules()`` carry the ``model.`` prefix and
the root is the wrapper; peft's ``get_peft_model_state_dict(cached)`` and other code that
walks module names see the prefix. ``state_dict()``/``load_state_dict()`` use the
model's own keys, attributes it lacks are the model's (``config``, ``dtype``, ...), and
``cache_context``/``_reset_stateful_cache`` reach the model's own diffusers hooks."""

from __future__ import annotations

from typing import Any

import torch

from ..dropin import DropIn
from ..errors import CheckpointError
from .engine import Engine
from .options import CompileOptions

__all__ = ["CachedModel"]


class CachedModel(DropIn):
    """A denoiser that runs each step with only what its plan says to recompute."""

    def __init__(self, model: torch.nn.Module, schedule, options: CompileOptions | None = None):
        super().__init__(model)
        # not a submodule: the engine holds the model, never its own copy of anything
        self.__dict__["engine"] = Engine(model, schedule, options)

    # ``torch.compile(cached)`` (every torch user's habit) is a pass-through: dynamo is
    # disabled for the call itself, whose Python bookkeeping is not a graph, and the step
    # graphs inside are fxcache's own compiled graphs (they still compile: a nested
    # torch.compile runs inside a disabled region). 0 graph breaks, 0 extra graphs.
    __call__ = torch.compiler.disable(torch.nn.Module.__call__)

    def forward(self, *args, **kwargs) -> Any:
        return self.engine(*args, **kwargs)

    def compile(self, *args, **kwargs) -> None:
        """``nn.Module.compile()`` in place: a no-op, the step graphs are compiled already
        (choose their backend with ``fxcache.compile(..., backend=...)``)."""
        return None

    # ------------------------------------------------------------- the engine's
    schedule = property(lambda self: self.engine.schedule)
    options = property(lambda self: self.engine.options)
    plan = property(lambda self: self.engine.plan, doc=Engine.plan.__doc__)
    entries = property(lambda self: self.engine.entries)
    step = property(lambda self: self.engine.step, doc=Engine.step.__doc__)
    captures = property(lambda self: self.engine.captures)
    scale_shift_adapters = property(lambda self: self.engine.scale_shift_adapters)
    _states = property(lambda self: self.engine._states)

    def reset(self) -> None:
        self.engine.reset()

    def decisions(self) -> dict:
        return self.engine.decisions()

    def cache_tensors(self) -> dict:
        return self.engine.cache_tensors()

    def generation(self):
        return self.engine.generation()

    def cache_context(self, name: str, step_index: int | None = None, **kwargs):
        return self.engine.cache_context(name, step_index=step_index, **kwargs)

    def _reset_stateful_cache(self, *args, **kwargs) -> None:
        self.engine._reset_stateful_cache(*args, **kwargs)

    for _name in ("reset", "decisions", "cache_tensors", "generation", "cache_context", "_reset_stateful_cache"):
        locals()[_name].__doc__ = getattr(Engine, _name).__doc__
    del _name

    # ------------------------------------------------------------- saving
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
