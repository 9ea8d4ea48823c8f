"""Training the scale-shift adjustment of block caching (block-caching.txt Sec. 3.4).

The adapters themselves (:class:`~fxcache.rewrite.adapters.ScaleShift`, re-exported
here) belong to the rewrite: at a cache read they give
``cached * (1 + scale) + shift`` with ``(scale, shift) = Linear(temb).chunk(2)``. This
module trains them, with the base model frozen, by distillation:

- **student**: the cached model unrolled from noise, i.e. the plan's own step graphs
  (:func:`fxcache.rewrite.step_graphs.solve_steps` with the adapters, the graphs the
  runtime runs), called eagerly, with ordinary tensors as cache buffers written by the
  computing steps;
- **teacher**: the uncached unit *on the student's own intermediate inputs* (not the
  teacher's own trajectory, which would drift elsewhere);
- **loss**: per (unit, step) where a cached value is read, between the adapted cache
  and the teacher's output, summed; gradients reach the adapters only.

Both come out of the same graph: at each cache read that the loss needs, the step
graph is built with that unit as a *probe* (``build_step_graph(..., probes=...)``), so
it also returns the adapted read and the unit computed from the values of this step (as
seen just outside the unit). Everything else in the graph sees the adapted read through
``aten.detach``: the forward records autograd history for the adapter arithmetic only,
the loss is backpropagated once per step, and nothing is kept between steps or across
the base model. So calibration trains exactly what inference runs (same liveness, same
fused ``scale_shift`` op, same embedding node), plus the probes.

Decisions
---------
- **Which units.** Those reused at one step at least where no enclosing unit of the
  plan is reused too (inside a reused enclosing unit nobody reads the inner value).
- **Several outputs.** One linear per unit output (``ScaleShift.key(unit, k)``); the
  probes give output ``k`` of a unit by its graph node, whatever the module returns.
- **Nested units.** A teacher is the unit as the rewrite computes it: units inside it
  follow the plan at that step (a reused one yields its cache, adapted when covered,
  as every read of an adapted slot is). The old hook-based student, kept in
  ``tests/_reference.py`` as the oracle, agrees.
- **The embedding** is the node the rewrite reads (``temb_output`` of module
  ``temb_module``, the first call of it), a ``(batch, dim)`` tensor.

Samplers
--------
``sampler(model, seed)`` unrolls one whole generation from noise (the noise a function of
``seed``) calling ``model(...)`` once per denoising step, e.g.
``lambda m, s: fxcache.models.generate(m, num_steps=10, num_samples=4, seed=s)``. It is
handed a drop-in for the model (same call signature, output type and attributes) that
runs the step graphs, so any pipeline-like loop works; every call must have the input
shapes of the first one, and classifier-free guidance must batch both branches in one
call, as ``generate`` does.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from ..dropin import DropIn
from ..errors import CheckpointError, UnsupportedModelError
from ..rewrite.adapters import ScaleShift

__all__ = ["ScaleShift", "StudentRun", "train_scale_shift", "evaluate_scale_shift"]

_LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}

Sampler = Callable[[nn.Module, int], Any]


# -------------------------------------------------------------------- the student
class _ProbeDone(Exception):
    pass


@dataclass
class _Setup:
    """What training and evaluation need about a model under a schedule."""

    model_class: str
    units: dict  # name -> Unit (the plan's units)
    plan: Any  # fxcache.plan.Plan, finite
    mask: Any  # fxcache.schedules.Mask, finite
    schedule: Any
    temb_module: str
    temb_dim: int
    device: torch.device
    reads: set = field(default_factory=set)  # (step, unit): the cache is read and its value used
    captured: Any = None  # fxcache.capture.Captured of the sampler's first call
    temb_node: str = ""  # the embedding's node in the captured graph

    @property
    def adapted_units(self) -> list[str]:
        names = {u for _, u in self.reads}
        return [u for u in self.plan.units if u in names]

    def unit_shapes(self) -> dict:
        return {u: self.units[u].out_shapes for u in self.adapted_units}

    def make_adapter(self) -> ScaleShift:
        return ScaleShift(
            self.unit_shapes(),
            self.temb_dim,
            temb_module=self.temb_module,
            model_class=self.model_class,
            schedule=self.schedule,
            mask=self.mask,
            num_steps=self.mask.num_steps,
        ).to(self.device)

    def check(self, adapter: ScaleShift) -> None:
        adapter.check_compatible(
            self.model_class, {n: u.out_shapes for n, u in self.units.items()}, self.mask.to_dict()
        )
        if adapter.temb_module != self.temb_module or adapter.temb_dim != self.temb_dim:
            raise CheckpointError(
                f"these adapters read a ({adapter.temb_dim})-wide embedding from '{adapter.temb_module}'; this "
                f"model's is ({self.temb_dim}) from '{self.temb_module}'"
            )


def _base_model(model: nn.Module) -> nn.Module:
    from ..runtime import CachedModel

    return model.model if isinstance(model, CachedModel) else model


_CAPTURES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _capture_of(model: nn.Module, args: tuple, kwargs: dict):
    """The capture of the model for these inputs and its units, remembered per model,
    input signature and identity of its modules and parameters (a replaced module or
    parameter captures again; in-place weight edits are seen, the graph shares the
    parameters), so that training and repeated evaluations capture once."""
    from ..analyze.units import find_units
    from ..capture import capture, flatten_call, signature_of

    ids = tuple(id(m) for m in model.modules()) + tuple(id(p) for p in model.parameters())
    key = (signature_of(*flatten_call(model, args, kwargs)), ids)
    memo = _CAPTURES.setdefault(model, {})
    if key not in memo:
        if len(memo) >= 4:
            memo.pop(next(iter(memo)))
        captured = capture(model, args, kwargs)
        memo[key] = (captured, find_units(captured.gm))
    return memo[key]


def _setup(model: nn.Module, schedule: Any, sampler: Sampler, seed: int, num_steps: int | None,
           temb_module: str | None) -> _Setup:
    """Run the sampler up to the model's first call (its inputs), capture, find the
    units, lower the schedule and validate the plan."""
    from ..analyze.units import temb_module as find_temb
    from ..analyze.units import temb_output
    from ..plan import Plan
    from ..schedules import ScheduleError, lower

    temb_path = temb_module or find_temb(model)
    model.get_submodule(temb_path)
    seen: dict[str, Any] = {}

    def pre(mod, args, kwargs):
        seen["call"] = (args, kwargs)
        raise _ProbeDone

    handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            sampler(model, seed)
    except _ProbeDone:
        pass
    finally:
        handle.remove()
    if "call" not in seen:
        raise ValueError("the sampler returned without calling the model; it must call model(...) once per step")
    args, kwargs = seen["call"]
    captured, unitset = _capture_of(model, args, kwargs)
    temb_node = temb_output(captured.gm, temb_path)
    temb = next(n for n in captured.gm.graph.nodes if n.name == temb_node).meta.get("val")
    if not isinstance(temb, torch.Tensor) or temb.ndim != 2:
        got = type(temb).__name__ if not isinstance(temb, torch.Tensor) else f"shape {tuple(temb.shape)}"
        raise UnsupportedModelError(
            f"module '{temb_path}' of {type(model).__name__} gave {got}, not a (batch, dim) embedding: pass "
            f"temb_module='path' naming the module whose output is the conditioning embedding"
        )
    mask = lower(schedule, unitset.infos(), num_steps)
    if mask.periodic:
        if num_steps is None:
            raise ScheduleError(
                f"{type(schedule).__name__} gives a periodic table; training unrolls whole generations, so "
                f"pass num_steps (the sampler's number of steps)"
            )
        mask = mask.expand(num_steps)
    by_name = unitset.by_name()
    plan = Plan(unitset.infos(list(mask.units)), mask.table)
    reads = set()
    for s in range(plan.num_steps):
        row = dict(zip(plan.units, plan.row(s)))
        for name in plan.units:
            if not row[name] and all(row[a] for a in plan.ancestors(name)):
                reads.add((s, name))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return _Setup(
        model_class=type(model).__name__,
        units={n: by_name[n] for n in plan.units},
        plan=plan,
        mask=mask,
        schedule=schedule,
        temb_module=temb_path,
        temb_dim=int(temb.shape[1]),
        device=device,
        reads=reads,
        captured=captured,
        temb_node=temb_node,
    )


class _GraphStudent(DropIn):
    """The cached model of the plan (with adapters) as its own step graphs, with a probe
    at every cache read the loss needs; records the per-(unit, step) distillation loss
    and, when training, backpropagates it into the adapters once per step."""

    def __init__(self, model: nn.Module, setup: _Setup, adapter: ScaleShift | None, loss: str, train: bool):
        from ..rewrite.step_graphs import solve_steps

        if loss not in _LOSSES:
            raise ValueError(f"loss = {loss!r} is not supported; choose one of {sorted(_LOSSES)}")
        super().__init__(model)
        self.setup, self.loss_fn, self.train_adapters = setup, _LOSSES[loss], train
        self.adapter = adapter
        gm = setup.captured.gm
        units = [setup.units[n] for n in setup.plan.units]
        probes: dict[int, list[str]] = {}
        for s, name in setup.reads:
            probes.setdefault(s, []).append(name)
        adapters = None if adapter is None else (adapter, setup.temb_node)
        solved = solve_steps(gm, units, setup.plan, adapters, probes)
        self.graphs = [solved.graphs[k] for k in solved.kind_of_step]
        self.num_outputs = len(gm.graph.find_nodes(op="output")[0].args[0])  # flat: then the probes
        nodes = {n.name: n for n in gm.graph.nodes}
        self.specs = {}
        for g in self.graphs:
            for slot in g.buffers:
                val = nodes[setup.units[slot[0]].outputs[slot[1]]].meta["val"]
                self.specs[slot] = (tuple(val.shape), tuple(val.stride()), val.dtype)
        self.reset()

    def reset(self) -> None:
        self.step = -1
        self.buffers: dict | None = None
        self.losses: dict[tuple[str, int], list[torch.Tensor]] = {}  # (unit, step) -> per output

    def finish(self) -> None:
        n = self.setup.plan.num_steps
        if self.step + 1 != n:
            raise ValueError(
                f"the sampler called the model {self.step + 1} times but the schedule covers {n} steps: "
                f"make them agree (one model call per denoising step)"
            )

    def forward(self, *args, **kwargs):
        from ..capture import flatten_call, signature_of

        self.step += 1
        step, n = self.step, self.setup.plan.num_steps
        if step >= n:
            raise ValueError(
                f"the sampler called the model more than {n} times in one generation; the schedule covers {n} "
                f"steps: pass num_steps / a schedule for the sampler's number of steps (one call per step)"
            )
        flat, spec = flatten_call(self.model, args, kwargs)
        captured = self.setup.captured
        if signature_of(flat, spec) != captured.signature:
            raise ValueError(
                f"the sampler's call at step {step} has other input shapes, dtypes or structure than its first "
                f"call; scale-shift training unrolls one generation with fixed inputs"
            )
        with torch.inference_mode(False):
            if self.buffers is None:
                device = next((x.device for x in flat if isinstance(x, torch.Tensor)), self.setup.device)
                self.buffers = {
                    slot: torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
                    for slot, (shape, stride, dtype) in self.specs.items()
                }
            graph = self.graphs[step]
            with torch.set_grad_enabled(self.train_adapters):
                out = graph.gm(*flat, *[self.buffers[s] for s in graph.buffers])
                outputs, taps = list(out[: self.num_outputs]), out[self.num_outputs:]
                total, i = None, 0
                for name in graph.probes:
                    losses = []
                    for _ in self.setup.units[name].outputs:
                        read, teacher = taps[i], taps[i + 1]
                        i += 2
                        losses.append(self.loss_fn(read.float(), teacher.detach().float()))
                    self.losses[(name, step)] = [v.detach() for v in losses]
                    for v in losses:
                        total = v if total is None else total + v
                if self.train_adapters and total is not None and total.requires_grad:
                    total.backward()
        return pytree.tree_unflatten([o.detach() for o in outputs], captured.out_spec)

    def total_loss(self) -> float:
        vals = [v for ls in self.losses.values() for v in ls]
        return float(torch.stack(vals).sum()) if vals else 0.0


def _unroll(student: _GraphStudent, sampler: Sampler, seed: int) -> Any:
    """One generation of the student from the noise of ``seed``: losses in ``student.losses``
    and, when it trains, the gradients in the adapters' ``.grad``."""
    student.reset()
    with torch.no_grad():
        out = sampler(student, seed)
    student.finish()
    return out


# --------------------------------------------------------------------- public verbs
def _seed_list(seeds: Any, n: int) -> list[int]:
    if seeds is None:
        return list(range(n))
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds = {seeds}: an int means 'cycle over range(seeds)' and must be >= 1")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise ValueError("seeds is empty; give at least one seed")
    return out


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Base parameters frozen for the duration; their requires_grad flags restored after."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _plot_losses(losses: Sequence[float], path: str | os.PathLike, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), constrained_layout=True)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(range(1, len(losses) + 1), losses, lw=1.2)
    if losses and all(v > 0 and math.isfinite(v) for v in losses):
        ax.set_yscale("log")
    ax.set_xlabel("iteration (one unrolled generation)")
    ax.set_ylabel("distillation loss (sum over reused unit-steps)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    from ..artefacts.store import atomic_path

    with atomic_path(path) as tmp:
        canvas.print_png(tmp)


def train_scale_shift(
    model: nn.Module,
    schedule: Any,
    sampler: Sampler,
    *,
    iters: int = 200,
    lr: float = 1e-3,
    num_steps: int | None = None,
    seeds: Iterable[int] | int | None = None,
    loss: str = "mse",
    progress: bool = True,
    loss_plot: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    temb_module: str | None = None,
    adapter: ScaleShift | None = None,
) -> ScaleShift:
    """Train scale-shift adapters for ``model`` under ``schedule`` (block-caching.txt Sec. 3.4).

    model:     the denoiser (a ``CachedModel`` is unwrapped); its parameters are not changed
               and their ``requires_grad`` flags are restored afterwards.
    schedule:  a ``BlockCache``, ``Mask`` or any schedule with a finite table (a periodic
               one needs ``num_steps``).
    sampler:   ``sampler(model, seed)`` runs one whole generation from noise, calling
               ``model(...)`` once per step (see the module docstring).
    iters:     optimiser steps; each unrolls one generation (seed ``seeds[i % len(seeds)]``;
               ``seeds=None``: seed ``i``; an int ``n``: ``range(n)``) and sums the loss over
               every (unit, step) that reads a cache.
    loss:      ``"mse"`` or ``"l1"`` per (unit, output, step), between the adapted cache and
               the teacher's output (computed in float32).
    adapter:   continue training these adapters instead of starting from zero.
    loss_plot: write the loss curve as a PNG. checkpoint: save the adapters (safetensors).

    Returns the adapters, with ``.losses`` (one float per iteration) and a ``"train"``
    summary in ``meta``.
    """
    if not (isinstance(iters, int) and iters >= 1):
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if not (lr > 0):
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if loss not in _LOSSES:
        raise ValueError(f"loss = {loss!r} is not supported; choose one of {sorted(_LOSSES)}")
    model = _base_model(model)
    seed_list = _seed_list(seeds, iters)
    setup = _setup(model, schedule, sampler, seed_list[0], num_steps, temb_module)
    if adapter is None:
        adapter = setup.make_adapter()
    else:
        setup.check(adapter)
    adapter.requires_grad_(True)
    opt = torch.optim.Adam(adapter.parameters(), lr=lr)
    losses: list[float] = []
    from tqdm.auto import tqdm

    bar = tqdm(range(iters), desc="scale-shift", disable=not progress, leave=False)
    student = _GraphStudent(model, setup, adapter, loss, train=True)
    with _frozen(model):
        for it in bar:
            opt.zero_grad(set_to_none=True)
            _unroll(student, sampler, seed_list[it % len(seed_list)])
            opt.step()
            losses.append(student.total_loss())
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    bar.close()
    opt.zero_grad(set_to_none=True)
    adapter.requires_grad_(False)
    adapter.losses = losses
    adapter.meta["train"] = {
        "iters": iters,
        "lr": lr,
        "loss": loss,
        "seeds": len(seed_list),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "reads": len(setup.reads),
    }
    if loss_plot is not None:
        _plot_losses(losses, loss_plot, f"scale-shift training, {setup.model_class}, {len(setup.reads)} cache reads")
    if checkpoint is not None:
        adapter.save(checkpoint)
    return adapter


@dataclass
class StudentRun:
    """The cached model (with or without adapters) unrolled over some seeds.

    loss:    mean over seeds of the summed distillation loss.
    pairs:   ``{(unit, step): loss}`` averaged over seeds (outputs summed).
    outputs: what the sampler returned, per seed.
    """

    loss: float
    pairs: dict
    outputs: list


def evaluate_scale_shift(
    model: nn.Module,
    schedule: Any,
    sampler: Sampler,
    adapter: ScaleShift | None = None,
    *,
    seeds: Iterable[int] = (0,),
    num_steps: int | None = None,
    loss: str = "mse",
    temb_module: str | None = None,
) -> StudentRun:
    """Unroll the cached model (adapted by ``adapter``; ``None``: plain cache reads) from
    noise for each seed and measure the distillation loss the training minimises."""
    model = _base_model(model)
    seed_list = _seed_list(seeds, 1)
    setup = _setup(model, schedule, sampler, seed_list[0], num_steps, temb_module or (adapter and adapter.temb_module))
    if adapter is not None:
        setup.check(adapter)
    totals, pairs, outputs = [], {}, []
    student = _GraphStudent(model, setup, adapter, loss, train=False)
    for seed in seed_list:
        outputs.append(_unroll(student, sampler, seed))
        totals.append(student.total_loss())
        for key, ls in student.losses.items():
            pairs[key] = pairs.get(key, 0.0) + float(torch.stack(ls).sum()) / len(seed_list)
    return StudentRun(loss=sum(totals) / len(totals), pairs=pairs, outputs=outputs)
