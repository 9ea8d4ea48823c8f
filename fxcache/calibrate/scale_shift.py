"""Scale-shift adjustment of block caching (block-caching.txt Sec. 3.4).

Reusing a unit's cached output at a later step is a little wrong: the unit's true
output has drifted since. The paper gives every unit that reads a cached value a linear
layer from the timestep embedding to a per-sample, per-channel scale and shift::

    adapted = cached * (1 + scale) + shift,    (scale, shift) = Linear(temb).chunk(2)

and trains only those layers, with the base model frozen, by distillation:

- **student**: the cached model unrolled from noise, following the schedule's table
  (a unit reused at a step returns ``adapter(cache, temb_t)``; a unit computed at a
  step refreshes its cache);
- **teacher**: the full model's unit outputs *on the student's own intermediate
  inputs* (not the teacher's own trajectory, which would drift elsewhere);
- **loss**: per (unit, step) where a cached value is read, between the adapted cache
  and the teacher's output, summed; gradients reach the adapters only.

The student is run as the eager model with forward hooks, the same way the test suite's
naive reference gives a plan its meaning: the whole model runs, so each unit module's
hook receives the module's real output computed from the student's current input (the
teacher's value) and returns the adapted cache (the student's value), which is what the
rest of the network sees. The forward runs under ``no_grad``; only the adapter
arithmetic in the hooks records a (tiny) graph, backpropagated at once, so nothing is
kept between steps or across the base model.

Decisions
---------
- **Several outputs.** A unit with several outputs (a U-Net down block: its hidden
  state and its skip tensors; an MM-DiT block: image and text tokens) gets one linear
  per output: ``key(unit, k)`` for output ``k``, where ``k`` indexes the unit's outputs in
  graph order (``Unit.outputs`` / ``Unit.out_shapes``, the ``(unit, k)`` of the cache
  buffers). During training the hooks find output ``k`` in the module's returned
  structure by its shape (batch ignored); a unit whose structure holds two different
  tensors of the same shape cannot be matched and is refused with an error.
- **Which units.** Those reused at one step at least where no enclosing unit of the
  plan is reused too (inside a reused enclosing unit nobody reads the inner value).
- **Layout.** ``channel_dim`` is 1 for ``(B, C, *spatial)`` outputs (4-D and more) and
  -1 for ``(B, *tokens, C)`` / ``(B, C)`` outputs (2-D, 3-D).
- **Precision.** The linears are float32; the embedding is cast to float32 and scale /
  shift to the cache's dtype, so the adapted value keeps the cache's dtype.
- **Zero init.** Weights and biases start at zero: an untrained adapter returns the
  cache bit for bit (``x * (1 + 0) + 0``).
- **Checkpoints** are one ``.safetensors`` file: the linears' weights, and ``meta`` as
  JSON in the file's metadata (key ``"fxcache.scale_shift"``). No pickle.
  :meth:`ScaleShift.check_compatible` refuses another model class, a missing unit,
  another channel count or another schedule.

Samplers
--------
``sampler(model, seed)`` unrolls one whole generation from noise (the noise a function of
``seed``) calling ``model(...)`` once per denoising step, e.g.
``lambda m, s: fxcache.models.generate(m, num_steps=10, num_samples=4, seed=s)``. It is
handed the eager model itself (with hooks), so any pipeline-like loop works; classifier-
free guidance must batch both branches in one call, as ``generate`` does.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from ..errors import CheckpointError, UnsupportedModelError
from ..schedules import mask_from_dict
from ..artefacts import (
    SCALE_SHIFT_KEY,
    SCALE_SHIFT_VERSION,
    adapter_key,
    check_trained_table,
    describe_schedule,
    read_scale_shift,
    write_artefact,
)

__all__ = ["ScaleShift", "StudentRun", "train_scale_shift", "evaluate_scale_shift"]

_META_KEY = SCALE_SHIFT_KEY
_FORMAT_VERSION = SCALE_SHIFT_VERSION
_LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}

Sampler = Callable[[nn.Module, int], Any]


# ------------------------------------------------------------------------- helpers
def _channel_dim_of(shape: Sequence[int], where: str) -> int:
    nd = len(shape)
    if nd >= 4:
        return 1
    if nd in (2, 3):
        return -1
    raise UnsupportedModelError(
        f"{where} has shape {tuple(shape)}; a scale-shift adapter needs a (B, C, ...) or (B, ..., C) "
        f"feature of 2 dimensions or more: leave this unit out of the schedule"
    )


def _channels_of(shape: Sequence[int], where: str) -> int:
    return int(shape[_channel_dim_of(shape, where)])


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _norm_shapes(out_shapes: Any, unit: str) -> list[tuple[tuple[int, ...], str]]:
    """``((shape, dtype), ...)``, ``((shape,), ...)`` or ``(shape, ...)`` → ``[(shape, dtype name), ...]``."""
    if hasattr(out_shapes, "out_shapes"):  # a Unit
        out_shapes = out_shapes.out_shapes
    out = []
    for entry in out_shapes:
        if (
            isinstance(entry, (tuple, list))
            and len(entry) in (1, 2)
            and isinstance(entry[0], (tuple, list, torch.Size))
            and not (len(entry) == 2 and isinstance(entry[1], (tuple, list, torch.Size)))
        ):
            shape, dtype = entry[0], (entry[1] if len(entry) == 2 else "float32")
        else:
            shape, dtype = entry, "float32"
        out.append((tuple(int(s) for s in shape), _dtype_name(dtype)))
    if not out:
        raise CheckpointError(f"unit '{unit}' is given no output shapes")
    return out


def _unit_shapes_arg(unit_shapes: Any) -> dict[str, list[tuple[tuple[int, ...], str]]]:
    """A dict ``{unit: out_shapes}``, a ``UnitSet`` or a list of ``Unit``s → normalised dict."""
    if isinstance(unit_shapes, Mapping):
        return {name: _norm_shapes(v, name) for name, v in unit_shapes.items()}
    return {u.name: _norm_shapes(u.out_shapes, u.name) for u in unit_shapes}


def _is_plan(x: Any) -> bool:
    """A ``Plan`` (a table over units, not a serialisable schedule)."""
    return not hasattr(x, "to_dict") and all(hasattr(x, a) for a in ("table", "units", "periodic"))


def _schedule_dict(schedule: Any) -> dict | None:
    """A schedule config, a ``Mask``, its dict or its JSON → its dict (None stays None)."""
    if schedule is None:
        return None
    if isinstance(schedule, (str, bytes)):
        try:
            schedule = json.loads(schedule)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"schedule_json is not valid JSON: {exc}") from None
    if hasattr(schedule, "to_dict"):
        schedule = schedule.to_dict()
    elif _is_plan(schedule):  # its table, as a Mask
        schedule = {
            "type": "Mask",
            "units": list(schedule.units),
            "table": ["".join("1" if v else "0" for v in row) for row in schedule.table],
            "periodic": bool(schedule.periodic),
        }
    if not isinstance(schedule, dict):
        raise CheckpointError(f"a schedule, its dict or its JSON is expected; got {type(schedule).__name__}")
    return json.loads(json.dumps(schedule))  # a plain copy (tuples → lists)


def _strip_schedule(d: dict) -> dict:
    # The checkpoint path a BlockCache names is not part of what the adapters were trained for.
    return {k: v for k, v in d.items() if k != "scale_shift"}


# ----------------------------------------------------------------------- ScaleShift
class ScaleShift(nn.Module):
    """Scale-shift adapters for the units of a cached model that read cached values.

    ``unit_shapes``: ``{unit: ((shape, dtype), ...)}`` per output (``Unit.out_shapes``)
    of the units to adapt, in plan order. ``temb_dim``: width of the conditioning
    embedding, the output of module ``temb_module`` (``fxcache.analyze.units.temb_module``).

    Used by the compiler, at a read of cache buffer ``(unit, k)``::

        lin = adapters.linears[adapters.key(unit, k)]    # nn.Linear(temb_dim, 2 * C)
        y = adapters.apply(unit, k, cached, temb)         # fxcache.kernels.scale_shift
    """

    def __init__(
        self,
        unit_shapes: Mapping[str, Any],
        temb_dim: int,
        *,
        temb_module: str,
        model_class: str = "",
        schedule: Any = None,
        mask: Any = None,
        num_steps: int | None = None,
    ):
        super().__init__()
        shapes = _unit_shapes_arg(unit_shapes)
        if not shapes:
            raise UnsupportedModelError(
                "no unit reads a cached value under this schedule, so there is nothing to adapt: "
                "use a schedule that reuses at least one unit at one step"
            )
        if not (isinstance(temb_dim, int) and temb_dim >= 1):
            raise ValueError(f"temb_dim must be a positive int, got {temb_dim!r}")
        self.units: tuple[str, ...] = tuple(shapes)
        self.temb_module: str = str(temb_module)
        self.temb_dim = int(temb_dim)
        self._channel_dims: dict[tuple[str, int], int] = {}
        self.linears = nn.ModuleDict()
        for unit, outs in shapes.items():
            for k, (shape, _) in enumerate(outs):
                where = f"output {k} of unit '{unit}'"
                self._channel_dims[(unit, k)] = _channel_dim_of(shape, where)
                lin = nn.Linear(self.temb_dim, 2 * _channels_of(shape, where))
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
                self.linears[self.key(unit, k)] = lin
        sched = _schedule_dict(schedule)
        mask_d = _schedule_dict(mask)
        if num_steps is None and mask_d is not None and not mask_d.get("periodic"):
            num_steps = len(mask_d["table"])
        self.meta: dict[str, Any] = {
            "format": _META_KEY,
            "version": _FORMAT_VERSION,
            "model_class": str(model_class),
            "units": list(self.units),
            "out_shapes": {u: [[list(s), d] for s, d in outs] for u, outs in shapes.items()},
            "temb_module": self.temb_module,
            "temb_dim": self.temb_dim,
            "outputs": "all",  # one linear per unit output
            "schedule": None if sched is None else _strip_schedule(sched),
            "mask": mask_d,
            "num_steps": num_steps,
        }

    # ------------------------------------------------------------- lookups
    @staticmethod
    def key(unit: str, k: int = 0) -> str:
        """ModuleDict key of output ``k`` of ``unit``: dots (never in a key) become ``-``
        (never in a module path), so keys are unique; ``:k`` names the output."""
        return adapter_key(unit, k)

    def has(self, unit: str, k: int = 0) -> bool:
        """Whether output ``k`` of ``unit`` has an adapter."""
        return self.key(unit, k) in self.linears

    def num_outputs(self, unit: str) -> int:
        self._check_unit(unit)
        return len(self.meta["out_shapes"][unit])

    def channel_dim(self, unit: str, k: int = 0) -> int:
        """1 for ``(B, C, *spatial)`` outputs, -1 for ``(B, *tokens, C)`` outputs."""
        self._check_key(unit, k)
        return self._channel_dims[(unit, int(k))]

    def _check_unit(self, unit: str) -> None:
        if unit not in self.meta["out_shapes"]:
            raise KeyError(f"no scale-shift adapter for unit '{unit}'; adapted units: {list(self.units)}")

    def _check_key(self, unit: str, k: int) -> None:
        self._check_unit(unit)
        if not self.has(unit, k):
            raise KeyError(f"unit '{unit}' has {self.num_outputs(unit)} adapted outputs; output {k} is not one")

    # --------------------------------------------------------------- apply
    def scale_shift(self, unit: str, k: int, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (B, C) scale and shift for output ``k`` of ``unit`` at embedding ``temb`` (float32)."""
        self._check_key(unit, k)
        lin = self.linears[self.key(unit, k)]
        if temb.ndim != 2 or temb.shape[1] != self.temb_dim:
            raise UnsupportedModelError(
                f"the embedding read from '{self.temb_module}' has shape {tuple(temb.shape)}; the adapters "
                f"need (batch, {self.temb_dim})"
            )
        return lin(temb.to(lin.weight.dtype)).chunk(2, dim=1)

    def apply(self, unit, k=None, cached=None, temb=None):  # type: ignore[override]
        """``cached * (1 + scale) + shift`` with ``(scale, shift) = linears[key(unit, k)](temb)``,
        via :func:`fxcache.kernels.scale_shift`; keeps ``cached``'s dtype.

        (``apply(fn)`` with one callable still means :meth:`torch.nn.Module.apply`.)
        """
        if k is None and cached is None and temb is None and callable(unit):
            return super().apply(unit)
        from ..kernels import scale_shift as _kernel

        scale, shift = self.scale_shift(unit, k, temb)
        return _kernel(cached, scale.to(cached.dtype), shift.to(cached.dtype), self.channel_dim(unit, k))

    def forward(self, unit: str, k: int, cached: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.apply(unit, k, cached, temb)

    # ---------------------------------------------------------- checking
    def check_compatible(self, model_class_name: str, unit_shapes: Any, schedule_json: Any = None) -> None:
        """Raise :class:`~fxcache.errors.CheckpointError` unless these adapters fit a model of
        class ``model_class_name`` whose units have ``unit_shapes`` (``{unit: out_shapes}``,
        a ``UnitSet`` or a list of ``Unit``s), and, when given, the schedule
        ``schedule_json`` (a schedule, a ``Mask``, a ``Plan``, their dict or JSON). Batch
        and spatial sizes may differ; channel counts and layouts may not. A ``Mask`` or a
        ``Plan`` is compared table against the table the adapters were trained for (the
        robust check; what the runtime passes when it attaches adapters to a plan); a
        schedule config field by field, ignoring ``BlockCache.scale_shift``.
        """
        m = self.meta
        want = m.get("model_class") or ""
        if want and model_class_name != want:
            raise CheckpointError(
                f"these scale-shift adapters were trained for a {want}, not a {model_class_name}: "
                f"train adapters for this model with fxcache.calibrate.scale_shift.train_scale_shift"
            )
        have = _unit_shapes_arg(unit_shapes)
        for unit in self.units:
            if unit not in have:
                raise CheckpointError(
                    f"unit '{unit}' has scale-shift adapters in this checkpoint but is not a unit of this "
                    f"{model_class_name}; the checkpoint adapts {list(self.units)}: train adapters for this model"
                )
            saved = m["out_shapes"][unit]
            if len(have[unit]) != len(saved):
                raise CheckpointError(
                    f"unit '{unit}' has {len(have[unit])} outputs in this {model_class_name} but "
                    f"{len(saved)} in the checkpoint: train adapters for this model"
                )
            for k, ((shape, _), (saved_shape, _)) in enumerate(zip(have[unit], saved)):
                where = f"output {k} of unit '{unit}'"
                if _channel_dim_of(shape, where) != self._channel_dims[(unit, k)] or len(shape) != len(saved_shape):
                    raise CheckpointError(
                        f"{where} has shape {tuple(shape)} here but {tuple(saved_shape)} in the checkpoint "
                        f"(another layout): train adapters for this model"
                    )
                c, c_saved = _channels_of(shape, where), _channels_of(saved_shape, where)
                if c != c_saved:
                    raise CheckpointError(
                        f"{where} has {c} channels here but {c_saved} in the checkpoint "
                        f"(shape {tuple(shape)} vs {tuple(saved_shape)}): train adapters for this model"
                    )
        if _is_plan(schedule_json) and m.get("mask") is None:
            # no recorded table to compare the plan's with: compare the schedule it came from
            schedule_json = getattr(schedule_json, "schedule", None)
        if schedule_json is not None:
            self._check_schedule(_schedule_dict(schedule_json))

    def _check_schedule(self, given: dict) -> None:
        m = self.meta
        if given.get("type") == "Mask" and m.get("mask") is not None:
            check_trained_table(m["mask"], m.get("num_steps"), given, trained_for=describe_schedule(m.get("schedule")))
            return
        saved = m.get("schedule")
        if saved is None:
            return
        g = _strip_schedule(given)
        if g != saved:
            if g.get("type") != saved.get("type"):
                what = f"a {g.get('type')} schedule, but these adapters were trained for a {saved.get('type')}"
            else:
                diff = sorted(k for k in set(g) | set(saved) if g.get(k) != saved.get(k))
                what = f"a {g.get('type')} schedule whose fields {diff} differ from the one these adapters were trained for"
            raise CheckpointError(
                f"the schedule is {what}: train adapters for this schedule (or pass the lowered Mask to "
                f"compare the tables themselves)"
            )

    # ------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> str:
        """Write one ``.safetensors`` file: the weights, and ``meta`` as JSON in its metadata
        (with the table the adapters were trained for, ``meta["mask"]``, when known)."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        return write_artefact(path, key=_META_KEY, header=self.meta, tensors=tensors, framework="pt")

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "ScaleShift":
        """Read a checkpoint written by :meth:`save`. Any problem with the file is a
        :class:`~fxcache.errors.CheckpointError` naming it; every size the metadata declares
        is checked against the stored tensors before anything is allocated."""
        art = read_scale_shift(path, parse_mask=mask_from_dict)
        meta = art.header
        shapes = {u: [(tuple(s), d) for s, d in meta["out_shapes"][u]] for u in meta["units"]}
        obj = cls(
            shapes,
            meta["temb_dim"],
            temb_module=meta["temb_module"],
            model_class=meta.get("model_class", ""),
            mask=meta.get("mask"),
            num_steps=meta.get("num_steps"),
        )
        obj.meta = meta
        names = list(obj.state_dict())
        if sorted(names) != sorted(art.tensors):  # pragma: no cover - read_scale_shift checked the names
            raise art.error(f"its tensors {sorted(art.tensors)[:6]} are not the adapters' {sorted(names)[:6]}")
        try:
            obj.load_state_dict(art.load(names, framework="pt"))
        except RuntimeError as exc:
            raise art.error(str(exc), "the file is damaged: train and save the adapters again") from None
        return obj.to(device)

    def extra_repr(self) -> str:
        return f"units={len(self.units)}, temb_module={self.temb_module!r}, temb_dim={self.temb_dim}"


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


_UNITS_MEMO: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _units_of(model: nn.Module, args: tuple, kwargs: dict):
    """``find_units`` of the model's capture for these inputs, remembered per model and
    input signature (units depend on the modules and shapes, not the weights), so that
    training and repeated evaluations capture once."""
    from ..analyze.units import find_units
    from ..capture import capture, flatten_call, signature_of

    key = signature_of(*flatten_call(model, args, kwargs))
    memo = _UNITS_MEMO.setdefault(model, {})
    if key not in memo:
        if len(memo) >= 4:
            memo.pop(next(iter(memo)))
        memo[key] = find_units(capture(model, args, kwargs).gm)
    return memo[key]


def _setup(model: nn.Module, schedule: Any, sampler: Sampler, seed: int, num_steps: int | None,
           temb_module: str | None) -> _Setup:
    """Run the sampler up to the end of the model's first call (its inputs and the
    embedding), find the units, lower the schedule and validate the plan."""
    from ..analyze.units import temb_module as find_temb
    from ..plan import Plan
    from ..schedules import ScheduleError, lower

    temb_path = temb_module or find_temb(model)
    temb_mod = model.get_submodule(temb_path)
    seen: dict[str, Any] = {}

    def pre(mod, args, kwargs):
        seen["call"] = (args, kwargs)

    def on_temb(mod, args, out):
        seen["temb"] = out

    def post(mod, args, out):
        raise _ProbeDone

    handles = [
        model.register_forward_pre_hook(pre, with_kwargs=True),
        temb_mod.register_forward_hook(on_temb),
        model.register_forward_hook(post),
    ]
    try:
        with torch.no_grad():
            sampler(model, seed)
    except _ProbeDone:
        pass
    finally:
        for h in handles:
            h.remove()
    if "call" not in seen:
        raise ValueError("the sampler returned without calling the model; it must call model(...) once per step")
    temb = seen.get("temb")
    if not isinstance(temb, torch.Tensor) or temb.ndim != 2:
        got = type(temb).__name__ if not isinstance(temb, torch.Tensor) else f"shape {tuple(temb.shape)}"
        raise UnsupportedModelError(
            f"module '{temb_path}' of {type(model).__name__} gave {got}, not a (batch, dim) embedding: pass "
            f"temb_module='path' naming the module whose output is the conditioning embedding"
        )
    args, kwargs = seen["call"]
    unitset = _units_of(model, args, kwargs)
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
    modules: dict[str, str] = {}
    for name in plan.units:
        mod = by_name[name].module
        if mod in modules:
            raise UnsupportedModelError(
                f"units '{modules[mod]}' and '{name}' both take their value from module '{mod}'; scale-shift "
                f"training tells units apart by module: keep one of them in the schedule"
            )
        modules[mod] = name
    reads = set()
    for s in range(plan.num_steps):
        row = dict(zip(plan.units, plan.row(s)))
        for name in plan.units:
            if not row[name] and all(row[a] for a in plan.ancestors(name)):
                reads.add((s, name))
    return _Setup(
        model_class=type(model).__name__,
        units={n: by_name[n] for n in plan.units},
        plan=plan,
        mask=mask,
        schedule=schedule,
        temb_module=temb_path,
        temb_dim=int(temb.shape[1]),
        device=temb.device,
        reads=reads,
    )


def _clone(x: Any) -> Any:
    return pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, x)


class _Student:
    """Forward hooks that make the eager model the cached model of a plan (with adapters),
    and record the per-(unit, step) distillation loss against the teacher: the module's
    real output on the student's input."""

    def __init__(self, model: nn.Module, setup: _Setup, adapter: ScaleShift | None, loss: str, train: bool):
        if loss not in _LOSSES:
            raise ValueError(f"loss = {loss!r} is not supported; choose one of {sorted(_LOSSES)}")
        self.model, self.setup, self.adapter = model, setup, adapter
        self.loss_fn, self.train = _LOSSES[loss], train
        self.groups: dict[str, list[list[int]]] = {}
        self.handles: list = []
        self.reset()

    def reset(self) -> None:
        self.step = -1
        self.cache: dict[str, Any] = {}
        self.temb: torch.Tensor | None = None
        self.losses: dict[tuple[str, int], list[torch.Tensor]] = {}  # (unit, step) -> per output

    # ---------------------------------------------------------------- hooks
    def __enter__(self) -> "_Student":
        m = self.model
        self.handles.append(m.register_forward_pre_hook(self._on_call))
        self.handles.append(m.get_submodule(self.setup.temb_module).register_forward_hook(self._on_temb))
        for name, unit in self.setup.units.items():
            self.handles.append(m.get_submodule(unit.module).register_forward_hook(self._unit_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _on_call(self, mod, args) -> None:
        self.step += 1
        self.temb = None
        n = self.setup.plan.num_steps
        if self.step >= n:
            raise ValueError(
                f"the sampler called the model more than {n} times in one generation; the schedule covers {n} "
                f"steps: pass num_steps / a schedule for the sampler's number of steps (one call per step)"
            )

    def _on_temb(self, mod, args, out) -> None:
        with torch.inference_mode(False):
            self.temb = out.detach().clone()

    def finish(self) -> None:
        n = self.setup.plan.num_steps
        if self.step + 1 != n:
            raise ValueError(
                f"the sampler called the model {self.step + 1} times but the schedule covers {n} steps: "
                f"make them agree (one model call per denoising step)"
            )

    def _match(self, name: str, out: Any) -> list[list[int]]:
        """Leaf indices in the module's output structure of each of the unit's outputs."""
        if name in self.groups:
            return self.groups[name]
        leaves = pytree.tree_leaves(out)
        groups = []
        for k, (shape, _) in enumerate(self.setup.units[name].out_shapes):
            idx = [
                i for i, v in enumerate(leaves)
                if isinstance(v, torch.Tensor) and v.ndim == len(shape) and tuple(v.shape[1:]) == tuple(shape[1:])
            ]
            distinct = {id(leaves[i]) for i in idx}
            if len(distinct) != 1:
                raise UnsupportedModelError(
                    f"module '{self.setup.units[name].module}' returns {len(distinct)} different tensors of the "
                    f"shape of output {k} of unit '{name}' {tuple(shape)}, so scale-shift training cannot tell "
                    f"which one the unit's output {k} is: schedule its sublayers instead"
                )
            groups.append(idx)
        self.groups[name] = groups
        return groups

    def _unit_hook(self, name: str):
        i = self.setup.plan.units.index(name)

        def hook(mod, args, out):
            step = self.step
            if self.setup.plan.row(step)[i]:
                with torch.inference_mode(False):
                    self.cache[name] = _clone(out)
                return None
            if name not in self.cache:  # inside a reused enclosing unit: nobody reads it
                return None
            # a copy goes downstream, so that in-place ops there cannot change the cache
            with torch.inference_mode(False):
                cached = _clone(self.cache[name])
            if (step, name) not in self.setup.reads:
                return cached
            if self.temb is None:
                raise UnsupportedModelError(
                    f"unit '{name}' produced its value before module '{self.setup.temb_module}' computed the "
                    f"embedding its adapter reads; this model cannot be adapted with that embedding module"
                )
            groups = self._match(name, out)
            leaves, spec = pytree.tree_flatten(cached)
            real = pytree.tree_leaves(out)
            losses = []
            for k, idx in enumerate(groups):
                c = leaves[idx[0]]
                with torch.inference_mode(False), torch.set_grad_enabled(self.train):
                    teacher = real[idx[0]].detach().clone().float()
                    y = c if self.adapter is None else self.adapter.apply(name, k, c, self.temb)
                    loss = self.loss_fn(y.float(), teacher)
                    if self.train and loss.requires_grad:
                        loss.backward()
                losses.append(loss.detach())
                y = y.detach()
                for j in idx:
                    leaves[j] = y
            self.losses[(name, step)] = losses
            return pytree.tree_unflatten(leaves, spec)

        return hook

    def total_loss(self) -> float:
        vals = [v for ls in self.losses.values() for v in ls]
        return float(torch.stack(vals).sum()) if vals else 0.0


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
    canvas.print_png(path)


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
    with _frozen(model), _Student(model, setup, adapter, loss, train=True) as student:
        for it in bar:
            opt.zero_grad(set_to_none=True)
            student.reset()
            with torch.no_grad():
                sampler(model, seed_list[it % len(seed_list)])
            student.finish()
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
    with torch.no_grad(), _Student(model, setup, adapter, loss, train=False) as student:
        for seed in seed_list:
            student.reset()
            outputs.append(sampler(model, seed))
            student.finish()
            totals.append(student.total_loss())
            for key, ls in student.losses.items():
                pairs[key] = pairs.get(key, 0.0) + float(torch.stack(ls).sum()) / len(seed_list)
    return StudentRun(loss=sum(totals) / len(totals), pairs=pairs, outputs=outputs)
