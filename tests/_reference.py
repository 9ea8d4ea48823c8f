"""Independent oracles for the tests: what a cache schedule means, written the obvious
way with forward hooks on the plain model, sharing no code with fxcache's rewrite,
runtime or calibration.

``hook_cache(model, modules, compute)`` is a context manager; while it is active every
call of ``model`` is one denoising step (counted by a pre-hook on the model itself) and
runs the whole model, and a forward hook on each listed submodule either records its
output (``compute(step)[i]`` true) or replaces it with the value recorded the last time
it was computed. A generation is everything called inside one ``with``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.utils._pytree as pytree

__all__ = ["hook_cache", "mask_rows", "every", "module_paths"]


def _clone(tree):
    return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree)


@contextlib.contextmanager
def hook_cache(model: torch.nn.Module, modules: Sequence[str], compute: Callable[[int], Sequence[bool]]):
    """Run ``model`` under a hook-based cache schedule (see the module doc). Yields a dict
    whose ``"step"`` is the number of calls made so far."""
    modules = list(modules)
    state = {"step": 0, "row": None}
    cache: dict[int, object] = {}

    def pre(mod, args, kwargs):
        row = [bool(c) for c in compute(state["step"])]
        if len(row) != len(modules):
            raise AssertionError(f"compute({state['step']}) has {len(row)} entries for {len(modules)} modules")
        state["row"] = row

    def post(mod, args, kwargs, out):
        state["step"] += 1
        state["row"] = None

    handles = [
        model.register_forward_pre_hook(pre, with_kwargs=True),
        model.register_forward_hook(post, with_kwargs=True),
    ]
    for i, path in enumerate(modules):

        def hook(mod, args, out, i=i, path=path):
            if state["row"] is None:
                raise AssertionError(f"{path} was called outside a call of the model")
            if state["row"][i]:
                cache[i] = _clone(out)
                return None
            if i not in cache:
                raise AssertionError(f"{path} is reused at step {state['step']} but no earlier step computed it")
            return _clone(cache[i])

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        yield state
    finally:
        for h in handles:
            h.remove()


def mask_rows(mask) -> Callable[[int], Sequence[bool]]:
    """``compute`` for a :class:`fxcache.Mask` (its table, wrapped when periodic)."""
    table = mask.table
    return lambda step: table[step % len(table)] if mask.periodic else table[step]


def every(interval: int, n: int) -> Callable[[int], Sequence[bool]]:
    """``compute`` of a uniform 1:interval schedule over ``n`` modules: all at steps 0, N, 2N, ..."""
    return lambda step: [step % interval == 0] * n


def module_paths(unitset, names: Sequence[str]) -> list[str]:
    """The submodule path of each named unit (units from :func:`fxcache.units`)."""
    by_name = unitset.by_name()
    return [by_name[n].module for n in names]
