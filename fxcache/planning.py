"""Stage 3, schedule → plan: a schedule config lowered on a model's units becomes a
validated :class:`~fxcache.plan.Plan`. Shared by ``fxcache.compile`` (through the
runtime), ``fxcache.plan_for`` and calibration, so that none of them imports another's
module: the runtime imports this, never ``fxcache.api``.
"""

from __future__ import annotations

from .analyze.units import UnitSet
from .errors import UnitError
from .plan import Plan
from .schedules import ModelFacts, adaptive_policy, lower
from .schedules.spans import is_span

__all__ = ["lower_to_plan", "check_laminar"]


def lower_to_plan(schedule, unitset: UnitSet, num_steps: int | None, model_class: str | None = None) -> Plan:
    """``schedule`` on these units → a validated :class:`Plan` (not yet bound to graphs).

    ``model_class`` (``type(model).__name__``) lets lowering check a schedule's artefacts
    (a profile recorded on another model class, with other unit shapes) against the model."""
    infos = unitset.infos()
    mask = lower(schedule, infos, num_steps, model=ModelFacts.of(unitset, model_class))
    for name in mask.units:  # residual spans the schedule names: built from the graph
        if is_span(name):
            unitset.add_span(name)
    by_name = unitset.by_name()
    missing = [n for n in mask.units if n not in by_name]
    if missing:
        raise UnitError(f"the schedule names units {missing} that this model does not have")
    check_laminar([by_name[n] for n in mask.units])
    notes = []
    skips = sorted((u for u in unitset if u.kind == "skip_branch"), key=lambda u: u.index)
    if skips and any(by_name[n].kind == "skip_branch" for n in mask.units):
        full = unitset.full_flops
        notes.append("partial step cost per DeepCache branch (FLOPs of a partial step / full step):")
        for u in skips:
            notes.append(f"  branch {u.index}: {(full - u.flops) / full:6.1%}  ({u.name})")
    return Plan(
        unitset.infos(list(mask.units)),
        mask.table,
        periodic=mask.periodic,
        full_flops=unitset.full_flops,
        schedule=schedule,
        notes=notes,
        adaptive=adaptive_policy(schedule, infos, num_steps),
    )


def check_laminar(units) -> None:
    for i, a in enumerate(units):
        for b in units[i + 1 :]:
            inter = a.region & b.region
            if inter and not (inter == a.region or inter == b.region):
                raise UnitError(
                    f"units '{a.name}' and '{b.name}' overlap without one containing the other "
                    f"({len(inter)} shared nodes); a plan's units must be nested or disjoint: drop one of them"
                )
