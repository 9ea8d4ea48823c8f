"""Lowering: a schedule config on a model's units → its explicit :class:`~.mask.Mask`
(:func:`lower`), and the unbound :class:`~fxcache.plan.Plan` of it (:func:`to_plan`).

Above :mod:`.registry` (the dispatch tables) and :mod:`.mask` (the Mask), so neither of
them imports the other: the methods' modules register into the registry, and this module
runs what they registered.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..plan import Plan, UnitInfo
from ._validate import ScheduleError, _check_num_steps, _units_seq
from .mask import Mask
from .registry import _CHECKS, ModelFacts, _dispatch, check_schedule
from .spans import is_span, span_info

__all__ = ["lower", "to_plan"]


def lower(
    schedule: Any, units: Sequence[UnitInfo], num_steps: int | None = None, *, model: ModelFacts | None = None
) -> Mask:
    """The explicit :class:`Mask` of ``schedule`` on a model with these ``units``.

    num_steps: steps of the generation, or None when unknown (periodic schedules do not
    need it; schedules that do say so).
    model:     optional :class:`ModelFacts` of the model; with them, artefacts a schedule
               carries (a profile, scale-shift adapters) are checked against the model's
               class and unit shapes, and a unit name that is a module fxcache does not
               cache is told apart from a typo (the error says why).
    """
    fn = check_schedule(schedule)
    infos = _units_seq(units)
    steps = _check_num_steps(num_steps)
    if model is not None:
        if not isinstance(model, ModelFacts):
            raise ScheduleError(f"lower(model=...) takes a ModelFacts; got {type(model).__name__}")
        check = _dispatch(_CHECKS, schedule)
        if check is not None:
            check(schedule, infos, model)
    mask = fn(schedule, infos, steps)
    if not isinstance(mask, Mask):
        raise ScheduleError(f"the lowering of {type(schedule).__name__} returned {type(mask).__name__}, not a Mask")
    return mask


def to_plan(
    schedule: Any,
    units: Sequence[UnitInfo],
    num_steps: int | None = None,
    *,
    full_flops: int = 0,
    model: ModelFacts | None = None,
) -> Plan:
    """``lower`` then build the (unbound) :class:`~fxcache.plan.Plan`; for reports and tests."""
    mask = lower(schedule, units, num_steps, model=model)
    by_name = {u.name: u for u in units}
    return Plan(
        [by_name[n] if n in by_name or not is_span(n) else span_info(n, units) for n in mask.units], mask.table,
        periodic=mask.periodic, full_flops=full_flops, schedule=schedule,
    )
