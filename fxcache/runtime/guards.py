"""Guards: is the model still the one that was captured?

``torch.export`` turns every plain Python value the forward reads into a constant of the
graph: peft's active adapter names and scales, a disabled-adapters flag, FreeU's factors,
an attention processor's ``scale`` or backend name, ``self.config``, any attribute a
custom forward reads. A captured graph is only the model while all of that is unchanged.

The guard is a *snapshot of module state*, compared at the start of every generation
(and whenever a cache context starts afresh): for every module of the model, its type
and identity; every entry of its ``__dict__`` except the tensors' containers, which are
keyed by identity, dtype, shape and device (``_parameters``, ``_buffers``; in-place
value edits need no recapture, the graphs read the parameter objects at every call);
plain values by value (numbers, strings, enums, dtypes, devices, and lists, tuples,
dicts and sets of them); functions, hooks and modules by identity; any other object
(an attention processor, a peft config) by identity and, one level down, by the values
in its own ``__dict__``; and diffusers' process-wide active attention backend, which
``set_attention_backend`` on any model sets and every processor without a backend of its
own reads. A difference captures again.

Why a snapshot rather than dynamo's guards (capturing through ``torch.compile`` with an
fxcache backend): dynamo guards only what its trace read, which is exact, but it needs
the whole denoiser to trace without a graph break under dynamo (non-strict
``torch.export`` handles more diffusers models than a fullgraph dynamo trace), and its
guards run on every call. The snapshot over-approximates (an attribute the forward
never reads also triggers a recapture, which is correct, only slower) and runs once per
generation: :func:`snapshot` costs about a microsecond per module (``bench/guard_cost.py``
measures it on full-size configs).

Nothing here is global: no process-wide hook, no patch of torch or diffusers.
"""

from __future__ import annotations

import enum
import types

import torch

from .lora import lifted_scales

__all__ = ["snapshot", "foreign_hooks", "OWN_ATTRS"]

# attributes fxcache itself sets on a model it attaches to in place (runtime/inplace.py)
OWN_ATTRS = frozenset({"forward", "cache_context", "_reset_stateful_cache", "_fxcache"})

# module-dict entries that a forward never reads, or that change without changing what
# it computes (training mode: capture is in eval mode and the runtime warns about it)
_SKIP = frozenset({
    "_parameters", "_buffers", "_modules", "training", "_non_persistent_buffers_set",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
    "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook", "_compiled_call_impl",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
    "_diffusers_hook",  # the registry is judged by foreign_hooks
    "_child_registries_cache", "_hf_hook", "_old_forward",
})

_PLAIN = (type(None), bool, int, str, bytes, complex, torch.dtype, torch.device, enum.Enum, torch.Size)
_CALLABLE = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.LambdaType)
_MAX_ITEMS = 256


def _key(v, depth: int, seen: set):
    """A hashable, comparable key of ``v`` (see the module docstring)."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, float):
        return v if v == v else "nan"
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v), v.dtype, tuple(v.shape), v.device)
    if isinstance(v, (list, tuple)):
        if len(v) > _MAX_ITEMS:
            return (type(v), id(v), len(v))
        return (type(v), tuple(_key(x, depth, seen) for x in v))
    if isinstance(v, dict):
        if len(v) > _MAX_ITEMS:
            return (type(v), id(v), len(v))
        items = tuple((repr(k), _key(x, depth, seen)) for k, x in v.items())
        # a dict subclass may hold attributes too: diffusers' FrozenDict config answers
        # ``config.name`` from them, and ``config.name = value`` changes only them
        attrs = getattr(v, "__dict__", None)
        if attrs:
            items += tuple((k, _key(x, depth, seen)) for k, x in attrs.items() if not k.startswith("_FrozenDict"))
        return (type(v), items)
    if isinstance(v, (set, frozenset)):
        return (type(v), tuple(sorted(repr(x) for x in v)))
    if isinstance(v, torch.nn.Module) or isinstance(v, _CALLABLE) or isinstance(v, type):
        if isinstance(v, types.MethodType):
            return ("method", id(v.__func__), id(v.__self__))
        return ("id", id(v))
    d = getattr(v, "__dict__", None)
    if d is None or depth >= 2 or id(v) in seen:
        return (type(v), id(v))
    seen.add(id(v))
    return (type(v), id(v), tuple((k, _key(x, depth + 1, seen)) for k, x in d.items()))


def _process_state() -> tuple:
    """Process-wide values a diffusers forward reads: the active attention backend, which
    ``set_attention_backend`` on *any* model sets, and which every processor whose own
    backend is None uses."""
    import sys

    dispatch = sys.modules.get("diffusers.models.attention_dispatch")
    registry = getattr(dispatch, "_AttentionBackendRegistry", None)
    return ("attention_backend", getattr(registry, "_active_backend", None))


def snapshot(model: torch.nn.Module) -> tuple:
    """The state of ``model`` that a captured graph may have baked in (module docstring).
    Reads no tensor values: no device sync."""
    parts: list = [_process_state()]
    seen: set = set()
    for name, m in model.named_modules(remove_duplicate=False):
        d = m.__dict__
        parts.append((name, id(m), type(m)))
        for k, v in d.items():
            if k in _SKIP or (m is model and k in OWN_ATTRS and _is_own(model, v)):
                continue
            if k in ("_forward_hooks", "_forward_pre_hooks"):
                parts.append((k, tuple(id(h) for h in v.values())))
            elif k == "scaling" and lifted_scales(m):
                parts.append((k, tuple(v)))  # the scales are graph inputs (runtime/lora.py): only which adapters
            else:
                parts.append((k, _key(v, 0, seen)))
        for pname, p in m._parameters.items():
            parts.append((pname, None if p is None else (id(p), p.dtype, tuple(p.shape), p.device)))
        for bname, b in m._buffers.items():
            parts.append((bname, None if b is None else (id(b), b.dtype, tuple(b.shape), b.device)))
    return tuple(parts)


def _is_own(model, value) -> bool:
    engine = model.__dict__.get("_fxcache")
    if engine is None:
        return False
    return value is engine or getattr(value, "__self__", None) is engine


# diffusers hooks that are pure functions of their inputs and trace into the graph as
# what they do: context parallelism's split and gather (its collectives are captured)
_TRACEABLE_HOOKS = frozenset({"ContextParallelSplitHook", "ContextParallelGatherHook"})


def foreign_hooks(model: torch.nn.Module) -> list[str]:
    """Hooks of other libraries that change how the model runs and cannot be part of a
    captured graph: diffusers' hooks (``enable_cache``'s stateful caches, layerwise
    casting, group offloading, ...; every kind but the traceable ones above) on any
    module, and accelerate's hooks on a submodule (sequential offloading).
    ``["module: hook", ...]``, empty when there are none. Accelerate's hook on the model
    itself (model offloading) wraps the call from outside and is fine."""
    found = []
    for name, m in model.named_modules():
        registry = m.__dict__.get("_diffusers_hook")
        if registry is not None:
            for hook_name in getattr(registry, "_hook_order", ()):
                if type(registry.hooks.get(hook_name)).__name__ not in _TRACEABLE_HOOKS:
                    found.append(f"{name or '<model>'}: {hook_name}")
        if name and "_hf_hook" in m.__dict__:
            found.append(f"{name}: accelerate {type(m.__dict__['_hf_hook']).__name__}")
    return found
