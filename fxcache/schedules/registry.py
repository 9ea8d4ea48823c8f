"""Dispatch on the config type: lowering a schedule to its :class:`~.mask.Mask`, checking
it against the model, and rebuilding a schedule from JSON.

A new method is a frozen dataclass plus one registered function::

    @register_lowering(MyConfig)
    def _lower(config, units, num_steps) -> Mask: ...

Lowering is pure: a function of the config, the units and the number of steps, with no
file I/O (a config that refers to a file reads it when it is built). What the units do
not carry (the model class, the units' output shapes, why a module is not a unit) comes
as a :class:`ModelFacts`; a config that can check its artefacts against them registers
a check with :func:`register_check`, which :func:`lower` runs before lowering. Whoever
lowers for a real model passes them::

    mask = lower(schedule, unitset.infos(), num_steps, model=ModelFacts.of(unitset, type(model).__name__))
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

from ..plan import UnitInfo
from ._validate import ScheduleError, _check_num_steps, _is_int, _units_seq

__all__ = [
    "ModelFacts",
    "check_schedule",
    "register_lowering",
    "register_check",
    "registered_schedules",
    "register_policy",
    "adaptive_policy",
    "schedule_from_dict",
    "schedule_from_json",
]


# ------------------------------------------------------------------------ model facts
def _shape_of(entry: Any) -> tuple[int, ...]:
    """``shape`` or ``(shape, dtype)`` (a ``Unit.out_shapes`` entry) → the shape."""
    if isinstance(entry, (tuple, list)) and entry and not _is_int(entry[0]):
        entry = entry[0]
    if isinstance(entry, str) or not isinstance(entry, Sequence) or not all(_is_int(d) and int(d) >= 0 for d in entry):
        raise ScheduleError(f"ModelFacts.out_shapes entry {entry!r} is not a shape (a sequence of integers >= 0)")
    return tuple(int(d) for d in entry)


@dataclass(frozen=True, eq=False)
class ModelFacts:
    """What lowering may check a schedule's artefacts against, beyond the units' names and
    kinds: the model class (``type(model).__name__``), each unit's output shapes
    (``Unit.out_shapes``) and the module paths that are not units with why
    (``UnitSet.skipped``). Build it with :meth:`of` from a ``UnitSet``."""

    model_class: str | None = None
    out_shapes: Mapping[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    skipped: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_class is not None and not isinstance(self.model_class, str):
            raise ScheduleError(f"ModelFacts.model_class = {self.model_class!r} must be a class name (str) or None")
        if not isinstance(self.out_shapes, Mapping) or not isinstance(self.skipped, Mapping):
            raise ScheduleError("ModelFacts.out_shapes and ModelFacts.skipped must be dicts keyed by unit name")
        shapes = {str(u): tuple(_shape_of(e) for e in outs) for u, outs in self.out_shapes.items()}
        object.__setattr__(self, "out_shapes", shapes)
        object.__setattr__(self, "skipped", {str(k): str(v) for k, v in self.skipped.items()})

    @classmethod
    def of(cls, unitset: Any, model_class: str | None = None) -> "ModelFacts":
        """From a ``fxcache.analyze.units.UnitSet`` (its units' ``out_shapes`` and its
        ``skipped``) and the model's class name."""
        shapes = {u.name: tuple(_shape_of(e) for e in u.out_shapes) for u in unitset}
        return cls(model_class, shapes, dict(getattr(unitset, "skipped", None) or {}))


# ----------------------------------------------------------------------------- registry
_SCHEDULE_TYPES: dict[str, type] = {}
_LOWERINGS: dict[type, Callable[[Any, list[UnitInfo], "int | None"], "Mask"]] = {}
_CHECKS: dict[type, Callable[[Any, list[UnitInfo], ModelFacts], None]] = {}
_POLICIES: dict[type, Callable[[Any, list[UnitInfo], "int | None"], Any]] = {}


def _serialisable(cls: type) -> type:
    """Class decorator: ``schedule_from_dict`` rebuilds this type from ``{"type": name}``."""
    _SCHEDULE_TYPES[cls.__name__] = cls
    return cls


def register_lowering(cls: type):
    """Decorator: ``@register_lowering(MyConfig) def f(config, units, num_steps) -> Mask``."""

    def deco(fn):
        _LOWERINGS[cls] = fn
        return fn

    return deco


def register_check(cls: type):
    """Decorator: ``@register_check(MyConfig) def f(config, units, model: ModelFacts)``
    raises when the config's artefacts do not fit the model; run by :func:`lower` before
    lowering, when the caller has the :class:`ModelFacts`."""

    def deco(fn):
        _CHECKS[cls] = fn
        return fn

    return deco


def register_policy(cls: type):
    """Decorator for adaptive schedules: ``@register_policy(MyConfig) def f(config, units,
    num_steps) -> AdaptivePolicy`` (:mod:`.adaptive`): what the statistic pass measures and
    what the runtime decides from it, beside the two-row mask the config lowers to."""

    def deco(fn):
        _POLICIES[cls] = fn
        return fn

    return deco


def adaptive_policy(schedule: Any, units: Sequence[UnitInfo], num_steps: int | None = None):
    """The :class:`~.adaptive.AdaptivePolicy` of an adaptive schedule on these units, or
    None for a static schedule (its step kinds follow from the step index alone)."""
    fn = _dispatch(_POLICIES, schedule)
    if fn is None:
        return None
    return fn(schedule, _units_seq(units), _check_num_steps(num_steps))


def registered_schedules() -> tuple[str, ...]:
    return tuple(sorted(c.__name__ for c in _LOWERINGS))


def _dispatch(table: dict, schedule: Any):
    return next((table[c] for c in type(schedule).__mro__ if c in table), None)


def check_schedule(schedule: Any) -> Callable:
    """The lowering of ``schedule``, or a :class:`ScheduleError` when it is not a schedule
    (no lowering is registered for its type): what ``fxcache.compile`` checks up front."""
    fn = _dispatch(_LOWERINGS, schedule)
    if fn is None:
        raise ScheduleError(
            f"schedule = {schedule!r} of type {type(schedule).__name__} has no lowering; "
            f"allowed schedule types: {list(registered_schedules())} (register new ones with "
            f"@fxcache.schedules.register_lowering(YourConfig))"
        )
    return fn


# --------------------------------------------------------------------------------- JSON
def schedule_from_dict(d: dict):
    """Rebuild a schedule (or a :class:`Mask`) from :meth:`to_dict` output."""
    if not isinstance(d, dict):
        raise ScheduleError(f"a schedule dict is expected; got {type(d).__name__}")
    kind = d.get("type")
    if not isinstance(kind, str) or kind not in _SCHEDULE_TYPES:
        raise ScheduleError(f"schedule type = {kind!r} is unknown; allowed types: {sorted(_SCHEDULE_TYPES)}")
    cls = _SCHEDULE_TYPES[kind]
    body = {k: v for k, v in d.items() if k != "type"}
    names = {f.name for f in fields(cls)}
    extra = sorted(set(body) - names)
    if extra:
        raise ScheduleError(f"{kind} has no fields {extra}; its fields are {sorted(names)}")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [n for n in required if n not in body]
    if missing and kind != "Mask":  # a Mask dict says which of its keys is missing itself
        raise ScheduleError(f"{kind} needs the fields {missing}; its fields are {sorted(names)}")
    try:
        return cls._from_fields(body)
    except TypeError as exc:  # a registered type's own constructor refusing the dict
        raise ScheduleError(f"{kind} cannot be built from {sorted(body)}: {exc}") from None


def schedule_from_json(s: str):
    """Rebuild a schedule (or a :class:`Mask`) from :meth:`to_json` output."""
    try:
        d = json.loads(s)
    except RecursionError:
        raise ScheduleError("not valid schedule JSON: it is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        raise ScheduleError(f"not valid schedule JSON: {exc}") from None
    return schedule_from_dict(d)
