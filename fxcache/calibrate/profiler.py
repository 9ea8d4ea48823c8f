"""Profiling: how much each unit's contribution changes from one denoising step to the next.

:func:`profile` runs whole generations through a recording drop-in module and returns a
:class:`~fxcache.artefacts.Profile`, the input of
:class:`fxcache.BlockCache` (block caching paper, Sec. 3.2-3.3, Eq. 6-7)::

    run = lambda m, seed: generate(m, num_steps=20, num_samples=4, seed=seed)
    prof = profile(model, run, seeds=(0, 1, 2))
    cached = fxcache.compile(model, fxcache.BlockCache(threshold=0.5, profile=prof))

What is measured is what fxcache caches: the recorder does not hook the eager model, it
runs **the captured graph** (:func:`fxcache.capture.capture`), in a copy whose output
node also returns every selected unit's output values (``Unit.outputs``), so the values
profiled are exactly the tensors a cache slot would hold. One such graph is built per
input signature (shapes, dtypes, devices), like the runtime.

Residual contribution ``C`` (Eq. 4-6: ``B(x) = C(x) + x``):

- attention / MLP sublayers of transformer blocks and Flux's ``branch`` units: the unit's
  output *is* the residual branch (the add, and any adaLN gate, happen outside the unit),
  so ``C`` = the output;
- units whose module adds its input inside (kinds in :data:`RESIDUAL_KINDS`: U-Net
  ``resnet`` and ``mid_block``, U-Net ``attention`` modules (not sublayers of a
  transformer block), ``transformer_block``, ``single_block``): ``C`` = output − main
  input, where the main input is read from the graph's data flow: the input that
  reaches the output through the unit's residual adds (:func:`residual_input`; each
  stream of a Flux/SD3 block with its own input, whatever the shapes); when there is
  none (a resnet changing the channel count: its shortcut is a convolution) ``C`` = the
  output, and when several inputs would be it the profile refuses the unit;
- every other unit (down / up blocks, DeepCache skip branches): ``C`` = the output.

``profile.meta["residual"]`` records, per unit, the graph node subtracted from each
output (or None). A unit with several outputs is measured on all of them together (sums
of norms, dot products over the concatenation).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..analyze.residual import residual_source
from ..analyze.units import Unit, UnitSet, find_units
from ..capture import Captured, capture, flatten_call, signature_of
from ..schedules import select_units
from ..artefacts import Profile, ProfileError
from ..dropin import DropIn

__all__ = ["profile", "ProfileRecorder", "RESIDUAL_KINDS", "residual_input", "recording_graph"]

#: Unit kinds whose module returns ``input + branch``: their contribution is output − input.
#: ``attention`` joins them only for U-Net attention modules (``Unit.block is None``).
RESIDUAL_KINDS = frozenset({"resnet", "mid_block", "transformer_block", "single_block"})

_TIMESTEP_NAMES = ("timestep", "timesteps", "t")
_STATS = 5  # |C_t - C_prev|_1, |C_t|_1, <C_t, C_prev>, |C_t|^2, |C_prev|^2


def _is_residual(unit: Unit) -> bool:
    return unit.kind in RESIDUAL_KINDS or (unit.kind == "attention" and unit.block is None)


def residual_input(gm: fx.GraphModule, unit: Unit, k: int = 0) -> str | None:
    """Name of the node a residual unit's output ``k`` adds back: the input that reaches
    the output through the unit's residual adds, by data flow
    (:func:`fxcache.analyze.residual.residual_source`); None when there is none (a resnet
    whose shortcut is a convolution). Several such inputs are an
    :class:`~fxcache.errors.UnsupportedModelError`."""
    return residual_source(gm, unit.outputs[k], unit.region, what=f"unit '{unit.name}'")


def recording_graph(gm: fx.GraphModule, extra: Sequence[str]) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` (sharing its parameters) whose output also returns the nodes named
    in ``extra``, after the original outputs. Returns the copy and the number of original
    outputs. A pass: ``gm`` is not changed."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    orig = graph.graph_copy(gm.graph, val_map)
    orig = list(orig) if isinstance(orig, (tuple, list)) else [orig]
    by_name = {n.name: n for n in gm.graph.nodes}
    graph.output(tuple(orig) + tuple(val_map[by_name[name]] for name in extra))
    graph.lint()
    return fx.GraphModule(gm, graph, class_name="ProfileGraph"), len(orig)


@dataclass
class _Probe:
    name: str
    pairs: tuple  # per unit output: (index of the output, index of the subtracted input or None)


@dataclass
class _Entry:
    captured: Captured
    unitset: UnitSet
    gm: fx.GraphModule
    num_outputs: int
    probes: list
    residual: dict  # unit -> [input node name or None per output]


def _select(unitset: UnitSet, units) -> list[Unit]:
    if units is None:
        return [u for u in unitset if u.kind != "skip_branch"]
    infos = select_units(unitset.infos(), units, what="profile(units=...)")
    names = {i.name for i in infos}
    return [u for u in unitset if u.name in names]


class ProfileRecorder(DropIn):
    """A drop-in module that runs the captured graph of ``model`` and records, per call,
    the step-to-step change of each selected unit's contribution (see the module doc).

    Calls are steps: the first call after :meth:`start` is step 0 and each one is compared
    with the previous call. Attributes it does not have are read from ``model`` (so
    ``config``, ``dtype``, ``device`` answer as on the model).
    """

    def __init__(self, model: torch.nn.Module, units: str | Sequence[str] | None = None):
        super().__init__(model)
        self.selector = units
        self._entries: dict = {}
        self._forward_params = list(inspect.signature(model.forward).parameters)
        self.start()

    # ------------------------------------------------------------------ state
    def start(self) -> None:
        """Begin a new generation: forget the previous step and the recorded rows."""
        self._prev: list | None = None
        self._prev_shapes: tuple | None = None
        self._rows: list[torch.Tensor] = []
        self._timesteps: list = []

    @property
    def unit_names(self) -> tuple[str, ...]:
        if not self._entries:
            raise ProfileError("the units are known after the first call (or an `example`)")
        return tuple(p.name for p in next(iter(self._entries.values())).probes)

    def entry(self, args: tuple, kwargs: dict) -> _Entry:
        """The recording graph for a call with these inputs (captured on first use)."""
        flat, spec = flatten_call(self.model, args, kwargs)
        return self._entry(flat, spec)

    def _entry(self, flat: list, spec) -> _Entry:
        sig = signature_of(flat, spec)
        entry = self._entries.get(sig)
        if entry is not None:
            return entry
        args, kwargs = pytree.tree_unflatten(flat, spec)
        captured = capture(self.model, args, kwargs)
        unitset = find_units(captured.gm)
        chosen = _select(unitset, self.selector)
        if not chosen:
            raise ProfileError(f"profile(units={self.selector!r}) selects no unit of {type(self.model).__name__}")
        extra: list[str] = []
        probes, residual = [], {}
        for u in chosen:
            pairs, subtracted = [], []
            for k, out in enumerate(u.outputs):
                inp = residual_input(captured.gm, u, k) if _is_residual(u) else None
                pairs.append((len(extra), None if inp is None else len(extra) + 1))
                extra.append(out)
                if inp is not None:
                    extra.append(inp)
                subtracted.append(inp)
            probes.append(_Probe(u.name, tuple(pairs)))
            residual[u.name] = subtracted
        gm, n = recording_graph(captured.gm, extra)
        if self._entries:
            known = self.unit_names
            if tuple(p.name for p in probes) != known:
                raise ProfileError(
                    f"a call with new input shapes selects units {[p.name for p in probes][:6]}... but earlier "
                    f"calls selected {list(known)[:6]}...; profile with one input shape per run"
                )
        entry = _Entry(captured, unitset, gm, n, probes, residual)
        self._entries[sig] = entry
        return entry

    def _timestep(self, flat: list, spec):
        args, kwargs = pytree.tree_unflatten(flat, spec)
        try:
            bound = inspect.signature(self.model.forward).bind_partial(*args, **kwargs).arguments
        except TypeError:
            return None
        for name in _TIMESTEP_NAMES:
            v = bound.get(name)
            if isinstance(v, torch.Tensor) and v.numel():
                return v.reshape(-1)[0].detach().to("cpu", torch.float64, non_blocking=False)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return torch.tensor(float(v), dtype=torch.float64)
        return None

    # -------------------------------------------------------------------- run
    def forward(self, *args, **kwargs) -> Any:
        flat, spec = flatten_call(self.model, args, kwargs)
        entry = self._entry(flat, spec)
        with torch.no_grad():
            outs = entry.gm(*flat)
        vals = outs[entry.num_outputs :]
        current = []
        for probe in entry.probes:
            parts = []
            for i, j in probe.pairs:
                c = vals[i] if j is None else vals[i] - vals[j]
                parts.append(c.float() if c.dtype in (torch.float16, torch.bfloat16) else c)
            current.append(parts)
        shapes = tuple(tuple(p.shape) for parts in current for p in parts)
        if self._prev is not None and shapes != self._prev_shapes:
            raise ProfileError(
                "the model was called with different shapes within one generation; profile(run=...) needs a "
                "run that calls the model once per denoising step with the same input shapes"
            )
        with torch.no_grad():
            self._rows.append(_stats(current, self._prev))
        self._prev, self._prev_shapes = current, shapes
        self._timesteps.append(self._timestep(flat, spec))
        return pytree.tree_unflatten(list(outs[: entry.num_outputs]), entry.captured.out_spec)

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(l1rel, cosine, timesteps)`` of the generation since :meth:`start`; row 0 NaN."""
        if not self._rows:
            raise ProfileError(
                "the run never called the model; profile(model, run) needs run(model, seed) to call model(...) "
                "once per denoising step"
            )
        s = torch.stack([r.to("cpu") for r in self._rows]).numpy()  # [steps, units, 5]
        num, den, dot, a2, b2 = (s[..., i] for i in range(_STATS))
        with np.errstate(divide="ignore", invalid="ignore"):
            l1 = np.where(den > 0, num / den, np.where(num == 0, 0.0, np.nan))
            cos = np.clip(dot / np.sqrt(a2 * b2), -1.0, 1.0)
        l1[0], cos[0] = np.nan, np.nan
        ts = self._timesteps
        if all(t is not None for t in ts):
            steps = np.array([float(t) for t in ts])
        else:
            steps = np.arange(len(ts), dtype=np.float64)
        return l1, cos, steps


def _stats(current: list, prev: list | None) -> torch.Tensor:
    """``[units, 5]`` float64 sums; zeros (and NaN later) when there is no previous step."""
    rows = []
    for u, parts in enumerate(current):
        den = sum(p.abs().sum(dtype=torch.float64) for p in parts)
        a2 = sum(p.square().sum(dtype=torch.float64) for p in parts)
        if prev is None:
            z = torch.zeros((), dtype=torch.float64, device=den.device)
            rows.append(torch.stack([z, den, z, a2, z]))
            continue
        q = prev[u]
        num = sum((p - r).abs().sum(dtype=torch.float64) for p, r in zip(parts, q))
        dot = sum((p * r).sum(dtype=torch.float64) for p, r in zip(parts, q))
        b2 = sum(r.square().sum(dtype=torch.float64) for r in q)
        rows.append(torch.stack([num, den, dot, a2, b2]))
    return torch.stack(rows)


def profile(
    model: torch.nn.Module,
    run: Callable[[torch.nn.Module, int], Any],
    *,
    units: str | Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    example: tuple[tuple, dict] | None = None,
    progress: bool = True,
) -> Profile:
    """Profile the step-to-step change of ``model``'s units over generations.

    run:      ``run(m, seed)`` performs one whole generation with ``m`` in place of the
              model, calling ``m(...)`` once per denoising step (e.g.
              ``lambda m, s: generate(m, num_steps=20, num_samples=4, seed=s)``). ``m`` is
              a :class:`ProfileRecorder`: a drop-in module running the captured graph.
    units:    a unit kind, or kinds / unit names (:func:`fxcache.schedules.select_units`);
              None: every unit except DeepCache's skip branches.
    seeds:    one generation per seed; the profile is the mean over them (``l1rel_std``
              the population standard deviation).
    example:  optional ``(args, kwargs)`` of one model call: capture and resolve ``units``
              before the first generation (a bad selector fails before any work).
    progress: a tqdm progress bar over the seeds.

    Per unit and step ``t >= 1``: ``l1rel[t] = |C(t) - C(t-1)|_1 / |C(t)|_1`` (Eq. 6, ``C``
    the unit's residual contribution, see the module doc) and ``cosine[t]`` = cosine
    similarity of ``C(t)`` and ``C(t-1)``. Row 0 (no previous step) is NaN in both.
    ``l1rel`` is 0 where ``C`` is 0 at both steps and NaN where only ``C(t)`` is 0.
    ``timesteps`` are the model's timestep inputs of the first seed's run (0..T-1 when
    the model takes none). ``meta``: model class, seeds, unit kinds, the residual inputs
    subtracted, and the metric.
    """
    seeds = list(seeds)
    if not seeds:
        raise ProfileError("profile(seeds=...) is empty; give at least one seed")
    if not callable(run):
        raise ProfileError(f"profile(run=...) must be callable as run(model, seed); got {type(run).__name__}")
    recorder = ProfileRecorder(model, units)
    if example is not None:
        ex_args, ex_kwargs = example
        recorder.entry(tuple(ex_args), dict(ex_kwargs or {}))

    from tqdm.auto import tqdm

    l1s, coss, steps = [], [], None
    for seed in tqdm(seeds, desc="profile", unit="seed", disable=not progress):
        recorder.start()
        run(recorder, seed)
        l1, cos, ts = recorder.finish()
        if l1s and l1.shape != l1s[0].shape:
            raise ProfileError(
                f"seed {seed} called the model {l1.shape[0]} times but seed {seeds[0]} called it "
                f"{l1s[0].shape[0]} times; every run must take the same number of steps"
            )
        l1s.append(l1)
        coss.append(cos)
        steps = ts if steps is None else steps
    entry = next(iter(recorder._entries.values()))
    names = recorder.unit_names
    kinds = {u.name: u.kind for u in entry.unitset if u.name in set(names)}
    stack = np.stack(l1s)
    meta = {
        "model_class": type(model).__name__,
        "seeds": [int(s) if isinstance(s, (int, np.integer)) else str(s) for s in seeds],
        "num_steps": int(stack.shape[1]),
        "kinds": kinds,
        "out_shapes": {u.name: [list(s) for s, _ in u.out_shapes] for u in entry.unitset if u.name in set(names)},
        "residual": entry.residual,
        "metric": "l1rel = |C(t)-C(t-1)|_1/|C(t)|_1 of the residual contribution C (block caching Eq. 6); "
        "cosine of C(t), C(t-1); mean over seeds, l1rel_std population std",
    }
    return Profile(
        units=names,
        l1rel=stack.mean(axis=0),
        cosine=np.stack(coss).mean(axis=0),
        timesteps=steps,
        meta=meta,
        l1rel_std=stack.std(axis=0),
    )
