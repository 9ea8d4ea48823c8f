"""Independent oracles for the tests: what a cache schedule means, written the obvious
way with forward hooks on the plain model, sharing no code with fxcache's rewrite,
runtime or calibration.

``hook_cache(model, modules, compute)`` is a context manager; while it is active every
call of ``model`` is one denoising step (counted by a pre-hook on the model itself) and
runs the whole model, and a forward hook on each listed submodule either records its
output (``compute(step)[i]`` true) or replaces it with the value recorded the last time
it was computed. A generation is everything called inside one ``with``.

``NaiveReference(T, mask)`` is the same meaning for a tiny model ``T`` called one step at
a time. ``HookStudent`` is scale-shift training's meaning (the adapted cache against the
module's real output on the cached model's own inputs, backpropagated into the
adapters), and ``hook_blend`` mask learning's relaxed cache read; both with hooks on the
plain model, the arithmetic written out here.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

__all__ = ["hook_cache", "mask_rows", "every", "module_paths", "NaiveReference", "HookStudent", "hook_blend"]


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


class NaiveReference:
    """The meaning of a plan, written the obvious way: the whole model runs, and a
    forward hook on each unit's module substitutes the value that unit produced the
    last time it was computed. ``ref(step, t)`` is the output of ``T``'s call at
    timestep ``t`` as step ``step`` of the generation."""

    def __init__(self, T, mask, units=None, forecast: int = 0):
        import fxcache

        self.T, self.mask = T, mask
        if units is None:
            args, kwargs = T.inputs(T.timesteps[0])
            units = fxcache.units(T.model, *args, **kwargs)
        self.units = units.by_name()
        self.cache = {}
        self.forecast = forecast
        self.taylor: dict = {}  # forecasting: unit -> (step, [D_0, D_1, ...] per output leaf) in float64

    def _update(self, name, step, out):
        """TaylorSeer's update, written on tensors: the new value is D_0; each higher
        derivative is the divided difference of the one below with the previous step's."""
        leaves = [x.double() for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
        prev = self.taylor.get(name)
        factors = []
        for i, x in enumerate(leaves):
            fs = [x]
            if prev is not None:
                s_prev, prev_fs = prev
                for j in range(min(self.forecast, len(prev_fs[i]))):
                    fs.append((fs[j] - prev_fs[i][j]) / (step - s_prev))
            factors.append(fs)
        self.taylor[name] = (step, factors)

    def _predict(self, name, step, like):
        s0, factors = self.taylor[name]
        k = step - s0
        it = iter(factors)

        def one(x):
            if not isinstance(x, torch.Tensor):
                return x
            fs = next(it)
            acc = torch.zeros_like(fs[0])
            for j, f in enumerate(fs):
                acc = acc + f * (k ** j / math.factorial(j))
            return acc.to(x.dtype)

        return pytree.tree_map(one, like)

    def __call__(self, step, t):
        row = self.mask.table[step % len(self.mask.table)]
        handles = []
        # inner modules first, so that an enclosing unit's hook runs last and wins
        order = sorted(zip(self.mask.units, row), key=lambda p: -self.units[p[0]].module.count("."))
        for name, compute in order:
            module = self.T.model.get_submodule(self.units[name].module)

            def hook(mod, inp, out, name=name, compute=compute):
                if compute:
                    self.cache[name] = pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, out)
                    if self.forecast:
                        self._update(name, step, out)
                    return out
                if self.forecast:
                    return self._predict(name, step, self.cache[name])
                return self.cache[name]

            handles.append(module.register_forward_hook(hook))
        try:
            return self.T.output(self.T.call(self.T.model, t))
        finally:
            for h in handles:
                h.remove()


def _adapt(linear: torch.nn.Linear, cached: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """``cached * (1 + scale) + shift``, ``(scale, shift) = linear(temb).chunk(2)``, per sample
    and channel: dim 1 of a 4-D feature, the last dim of a 2-D or 3-D one."""
    scale, shift = linear(temb.float()).chunk(2, dim=1)
    scale, shift = scale.to(cached.dtype), shift.to(cached.dtype)
    if cached.ndim >= 4:
        view = (cached.shape[0], cached.shape[1]) + (1,) * (cached.ndim - 2)
    else:
        view = (cached.shape[0],) + (1,) * (cached.ndim - 2) + (cached.shape[-1],)
    return cached * (1 + scale.reshape(view)) + shift.reshape(view)


class HookStudent:
    """Scale-shift training written the obvious way (block-caching.txt Sec. 3.4): the
    whole plain model runs at every step, under ``no_grad``; a forward hook on each
    unit's module records its output at the steps that compute it and, at a step that
    reuses it while every enclosing unit computes, returns ``adapt(cache)`` (the adapter
    arithmetic written out in :func:`_adapt`) and backpropagates at once the loss between
    it and the module's real output there (the teacher: the uncached unit on the
    student's own inputs). Nothing downstream carries gradients. Inside an enclosing
    unit reused at this step, a reused unit yields its adapted cache too (every read of
    an adapted slot is adapted), which only that enclosing unit's teacher sees.

    ``units``: ``{name: (module path, out_shapes)}`` in the schedule's column order;
    ``table``: one row of booleans per step; ``adapter``: a ``ScaleShift`` (its
    ``linears`` and ``key`` only) or None. Each unit output is found in the module's
    returned structure by its shape. ``losses[(name, step)]``: the losses per output.
    """

    def __init__(self, model, units: dict, table, temb_module: str, adapter=None, loss_fn=F.mse_loss):
        self.model, self.units, self.table = model, dict(units), [list(r) for r in table]
        self.temb_module, self.adapter, self.loss_fn = temb_module, adapter, loss_fn
        names = list(self.units)
        paths = {n: self.units[n][0] for n in names}
        # enclosing units: those whose module path is a prefix of this one's
        self.enclosing = {n: [m for m in names if m != n and paths[n].startswith(paths[m] + ".")] for n in names}
        self.step, self.cache, self.temb, self.losses, self.handles = -1, {}, None, {}, []

    def __enter__(self):
        m = self.model

        def pre(mod, args):
            self.step += 1
            self.temb = None

        def on_temb(mod, args, out):
            if self.temb is None:  # the first call of the embedding module at this step
                self.temb = out.detach().clone()

        self.handles.append(m.register_forward_pre_hook(pre))
        self.handles.append(m.get_submodule(self.temb_module).register_forward_hook(on_temb))
        for i, name in enumerate(self.units):
            self.handles.append(m.get_submodule(self.units[name][0]).register_forward_hook(self._hook(i, name)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _hook(self, i, name):
        names = list(self.units)

        def hook(mod, args, out):
            row = dict(zip(names, self.table[self.step]))
            if row[name]:
                self.cache[name] = pytree.tree_map(lambda x: x.detach().clone(), out)
                return None
            if name not in self.cache:  # inside a reused enclosing unit: nobody reads it
                return None
            cached = pytree.tree_map(lambda x: x.detach().clone(), self.cache[name])
            read = all(row[e] for e in self.enclosing[name])  # else only an enclosing unit's teacher sees it
            leaves, spec = pytree.tree_flatten(cached)
            real = pytree.tree_leaves(out)
            losses = []
            for k, (shape, _) in enumerate(self.units[name][1]):
                idx = [j for j, v in enumerate(real) if v.ndim == len(shape) and tuple(v.shape[1:]) == tuple(shape[1:])]
                assert len({id(real[j]) for j in idx}) == 1, f"output {k} of {name} is ambiguous by shape"
                with torch.enable_grad():
                    c = leaves[idx[0]]
                    y = c if self.adapter is None else _adapt(self.adapter.linears[self.adapter.key(name, k)], c,
                                                               self.temb)
                    if read:
                        loss = self.loss_fn(y.float(), real[idx[0]].detach().float())
                        if loss.requires_grad:
                            loss.backward()
                        losses.append(loss.detach())
                for j in idx:
                    leaves[j] = y.detach()
            if read:
                self.losses[(name, self.step)] = losses
            return pytree.tree_unflatten(leaves, spec)

        return hook


@contextlib.contextmanager
def hook_blend(model: torch.nn.Module, modules: Sequence[str], weights: Sequence, caches: Sequence):
    """Mask learning's relaxed cache read with forward hooks on disjoint modules: module i
    returns ``w_i * out + (1 - w_i) * caches[i]`` (``w_i`` cast to the output's dtype).
    Yields the list of the blended outputs, filled as the modules run."""
    seen: list = [None] * len(modules)
    handles = []
    for i, path in enumerate(modules):

        def hook(mod, args, out, i=i):
            w = weights[i]
            value = w.to(out.dtype) * out + (1 - w).to(out.dtype) * caches[i]
            seen[i] = value
            return value

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def tiny_flux_square(batch: int = 1, seed: int = 0):
    """``fxcache.testing.tiny("flux")`` with as many text tokens as image tokens (16 and
    16), so the two streams of its blocks have the same shape: only data flow tells
    which input a block output adds back (Flux-schnell at 256 px is such a case)."""
    from fxcache.testing import tiny

    T = tiny("flux", batch=batch, seed=seed)
    args, kwargs = T.inputs(T.timesteps[0])
    n = args[0].shape[1]
    g = torch.Generator().manual_seed(seed + 7)
    enc = torch.randn(batch, n, kwargs["encoder_hidden_states"].shape[-1], generator=g)
    txt_ids = torch.zeros(n, 3)

    def inputs(t, base=T.inputs):
        a, k = base(t)
        return a, {**k, "encoder_hidden_states": enc, "txt_ids": txt_ids}

    T.inputs = inputs
    return T


def stream_residuals(module: torch.nn.Module, args, kwargs, out, pairs) -> list:
    """``out[i] - input`` for each ``(i, argument name)`` of ``pairs``: a block's output
    minus the input of that name (bound to the module's forward signature), e.g. for a
    Flux block ``[(1, "hidden_states"), (0, "encoder_hidden_states")]``."""
    import inspect

    bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [outs[i] - bound[name] for i, name in pairs]


@contextlib.contextmanager
def hook_span(model: torch.nn.Module, blocks: Sequence[str], pairs, compute: Callable[[int], bool], forecast: int = 0):
    """Run ``model`` with the contiguous blocks ``blocks`` cached as one residual per
    stream, written the obvious way: a pre-hook on the first block keeps its inputs at
    every step; a forward hook on the last block, at a computed step (``compute(step)``),
    stores ``out[i] - input`` for each ``(i, argument name)`` of ``pairs``
    (:func:`stream_residuals`; ``i`` None: the block returns one tensor) and, at a reused
    step, returns ``input_now + stored`` in place of those outputs. The blocks still run
    (they are pure), which is what skipping them means.

    A name may be a tuple of argument names: those inputs concatenated along dim 1 (a
    joint text+image stream).

    ``forecast=1``: a reused step adds the line through the residuals of the last two
    computed steps, evaluated at this step (one computed step so far: the last one)."""
    import inspect

    state = {"step": 0, "compute": None, "inputs": None}
    history: list = []  # [(step, [residual, ...])], most recent first

    def pre_model(mod, args, kwargs):
        state["compute"] = bool(compute(state["step"]))

    def post_model(mod, args, kwargs, out):
        state["step"] += 1

    first, last = model.get_submodule(blocks[0]), model.get_submodule(blocks[-1])

    def value(ins, name):  # a tuple of names: those inputs joined along the tokens (Chroma's joint stream)
        return torch.cat([ins[n] for n in name], dim=1) if isinstance(name, tuple) else ins[name]

    def pre_first(mod, args, kwargs):
        state["inputs"] = inspect.signature(mod.forward).bind(*args, **kwargs).arguments

    def post_last(mod, args, kwargs, out):
        ins = state["inputs"]
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        idx = [0 if i is None else i for i, _ in pairs]
        if state["compute"]:
            history.insert(0, (state["step"], [outs[i] - value(ins, name) for i, (_, name) in zip(idx, pairs)]))
            del history[forecast + 1:]
            return None
        if not history:
            raise AssertionError(f"span {blocks[0]}..{blocks[-1]} reused at step {state['step']} before any computed step")
        s0, r0 = history[0]
        res = r0
        if forecast and len(history) > 1:
            s1, r1 = history[1]
            res = [a + (a - b) / (s0 - s1) * (state["step"] - s0) for a, b in zip(r0, r1)]
        for i, (_, name), r in zip(idx, pairs, res):
            outs[i] = value(ins, name) + r
        return outs[0] if not isinstance(out, (tuple, list)) else type(out)(outs)

    handles = [
        model.register_forward_pre_hook(pre_model, with_kwargs=True),
        model.register_forward_hook(post_model, with_kwargs=True),
        first.register_forward_pre_hook(pre_first, with_kwargs=True),
        last.register_forward_hook(post_last, with_kwargs=True),
    ]
    try:
        yield state
    finally:
        for h in handles:
            h.remove()
