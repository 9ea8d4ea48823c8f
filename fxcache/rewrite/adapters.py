"""Scale-shift adapters of block caching (block-caching.txt Sec. 3.4): what a cache read
becomes when trained adapters are attached to a plan.

Reusing a unit's cached output at a later step is a little wrong: the unit's true output
has drifted since. The paper gives every unit that reads a cached value a linear layer
from the timestep embedding to a per-sample, per-channel scale and shift::

    adapted = cached * (1 + scale) + shift,    (scale, shift) = Linear(temb).chunk(2)

:class:`ScaleShift` holds those linears. It belongs to the rewrite: a step graph built
with adapters (:func:`fxcache.rewrite.step_graphs.build_step_graph`) owns the module as
its submodule ``fxcache_scale_shift`` and reads the linears' parameters from there, at
every adapted cache read, as one fused :func:`fxcache.kernels.scale_shift`. Training
them is calibration (:func:`fxcache.calibrate.scale_shift.train_scale_shift`), which
trains through the same step graphs.

Decisions
---------
- **Several outputs.** A unit with several outputs (a U-Net down block: its hidden
  state and its skip tensors; an MM-DiT block: image and text tokens) gets one linear
  per output: ``key(unit, k)`` for output ``k``, where ``k`` indexes the unit's outputs in
  graph order (``Unit.outputs`` / ``Unit.out_shapes``, the ``(unit, k)`` of the cache
  buffers).
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
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..artefacts import (
    SCALE_SHIFT_KEY,
    SCALE_SHIFT_VERSION,
    adapter_key,
    check_trained_table,
    describe_schedule,
    read_scale_shift,
    write_artefact,
)
from ..errors import CheckpointError, UnsupportedModelError
from ..schedules import mask_from_dict

__all__ = ["ScaleShift", "ADAPTER_ATTR"]

#: Name of the adapter submodule in a step graph built with adapters.
ADAPTER_ATTR = "fxcache_scale_shift"

_META_KEY = SCALE_SHIFT_KEY
_FORMAT_VERSION = SCALE_SHIFT_VERSION


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
