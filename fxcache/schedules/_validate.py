"""The schedules' errors, the checks their fields go through, unit selection, and the
JSON base of the config dataclasses. Pure Python."""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
from dataclasses import fields
from typing import Any, Iterable, Mapping, Sequence

from ..errors import FxcacheError, UnitError
from ..plan import UnitInfo

MAX_PERIOD = 1000
"""The longest period a schedule lowers to when the number of steps is unknown; longer
intervals need ``num_steps`` (then an interval >= num_steps means only step 0 is full)."""


class ScheduleError(FxcacheError, ValueError):
    """A schedule that is invalid, or that does not apply to the model's units.

    The message names the field, the bad value and what is allowed instead."""


class UnknownUnitError(ScheduleError, UnitError):
    """A schedule names a unit the model does not have (message lists close matches, or
    why the module it names is not a unit)."""


# ---------------------------------------------------------------------------- fields
def _bad(cls: str, name: str, value: Any, allowed: str) -> ScheduleError:
    return ScheduleError(f"{cls}.{name} = {value!r} is not allowed; {name} must be {allowed}")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_numpy_bool(x: Any) -> bool:
    # numpy 1 calls the type ``bool_``, numpy 2 ``bool``; numpy is not imported for this
    t = type(x)
    return t.__module__ == "numpy" and t.__name__ in ("bool", "bool_")


def _shown(x: Any) -> Any:
    """A numpy scalar as the Python number it holds (``2``, not ``np.int64(2)``)."""
    return x.item() if type(x).__module__ == "numpy" and hasattr(x, "item") else x


def _check_int(cls: str, name: str, value: Any, minimum: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not _is_int(value) or int(value) < minimum:
        more = " or None" if optional else ""
        raise _bad(cls, name, value, f"an integer >= {minimum}{more}")
    return int(value)


def _check_real(
    cls: str, name: str, value: Any, minimum: float | None = None, optional: bool = False, maximum: float | None = None
) -> float | None:
    if value is None and optional:
        return None
    ok = _is_real(value) and math.isfinite(float(value))
    ok = ok and (minimum is None or float(value) >= minimum) and (maximum is None or float(value) <= maximum)
    if not ok:
        rng = []
        if minimum is not None:
            rng.append(f">= {minimum}")
        if maximum is not None:
            rng.append(f"<= {maximum}")
        more = " or None" if optional else ""
        raise _bad(cls, name, value, f"a finite number {' and '.join(rng)}{more}".replace("  ", " "))
    return float(value)


def _check_bool(cls: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(cls, name, value, "True or False")
    return value


def _check_selector(cls: str, name: str, value: Any) -> str | tuple[str, ...]:
    allowed = 'a unit kind ("attention", "transformer_block", "resnet", ...) or a non-empty tuple of kinds / unit names'
    if isinstance(value, str):
        if not value:
            raise _bad(cls, name, value, allowed)
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        if len(set(value)) != len(value):
            raise _bad(cls, name, value, allowed + " without repeats")
        return tuple(value)
    raise _bad(cls, name, value, allowed)


def _check_path(cls: str, name: str, value: Any, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise _bad(cls, name, value, "a file path (str or os.PathLike)" + (" or None" if optional else ""))
    return value


def _check_num_steps(num_steps: Any) -> int | None:
    if num_steps is None:
        return None
    if not _is_int(num_steps) or int(num_steps) < 1:
        raise ScheduleError(f"num_steps = {num_steps!r} is not allowed; num_steps must be an integer >= 1 or None")
    return int(num_steps)


def _resolve_steps(cls: str, configured: int | None, given: int | None) -> int | None:
    if configured is not None and given is not None and configured != given:
        raise ScheduleError(
            f"{cls}.num_steps = {configured} but the generation has num_steps = {given}; "
            f"set {cls}.num_steps to {given} (or leave it None to take the generation's)"
        )
    return configured if configured is not None else given


def _period(what: str, interval: int, num_steps: int | None) -> int:
    """Rows of a periodic table "full every ``interval`` steps": ``interval``, bounded by
    the steps of the generation (an interval >= num_steps means only step 0 is full),
    so a huge interval never builds a huge table."""
    if num_steps is not None:
        return min(interval, num_steps)
    if interval > MAX_PERIOD:
        raise ScheduleError(
            f"{what} = {interval} is longer than {MAX_PERIOD} steps and the number of steps is unknown; "
            f"pass num_steps (to fxcache.compile or lower): an interval >= num_steps means only step 0 is full"
        )
    return interval


# ----------------------------------------------------------------------------- units
def _units_seq(units: Any) -> list[UnitInfo]:
    if isinstance(units, (str, bytes)) or not isinstance(units, Iterable):
        raise ScheduleError(f"units must be a sequence of UnitInfo; got {type(units).__name__}")
    units = list(units)
    bad = [u for u in units if not isinstance(u, UnitInfo)]
    if bad:
        raise ScheduleError(f"units must be a sequence of UnitInfo; got {type(bad[0]).__name__} among them")
    return units


def _kinds_found(units: Sequence[UnitInfo]) -> str:
    kinds = sorted({u.kind for u in units})
    return ", ".join(kinds) if kinds else "none"


def _unknown_units(
    missing: Sequence[str], available: Sequence[str], what: str, skipped: Mapping[str, str] | None = None
) -> UnknownUnitError:
    """The error for names that are not units: why, when the module is known but is not a
    unit (``skipped``: module path → reason, from ``UnitSet.skipped``), else close names."""
    skipped = skipped or {}
    parts = []
    for name in missing[:5]:
        if name in skipped:
            parts.append(f"'{name}' (the module exists but is not a unit: {skipped[name]})")
            continue
        close = difflib.get_close_matches(name, available, n=4, cutoff=0.5)
        parts.append(f"'{name}'" + (f" (close: {close})" if close else ""))
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    shown = list(available[:40])
    tail = f", ... ({len(available)} in all)" if len(available) > 40 else ""
    return UnknownUnitError(
        f"{what} names units this model does not have: {', '.join(parts)}{more}. "
        f"Name units of this model instead (fxcache.units(model, ...) lists them). Available units: {shown}{tail}"
    )


def select_units(units: Sequence[UnitInfo], selector: str | Sequence[str], *, what: str = "units") -> list[UnitInfo]:
    """Units picked by a kind (``"attention"``), or a sequence of kinds and/or unit names,
    in model order. Errors name unknown entries and list the kinds and close names."""
    items = (selector,) if isinstance(selector, str) else tuple(selector)
    by_name = {u.name: u for u in units}
    kinds = {u.kind for u in units}
    picked: set[str] = set()
    unknown = []
    for item in items:
        if item in by_name:
            picked.add(item)
        elif item in kinds:
            picked.update(u.name for u in units if u.kind == item)
        else:
            unknown.append(item)
    if unknown:
        close = sorted({c for x in unknown for c in difflib.get_close_matches(x, list(by_name), n=3, cutoff=0.6)})
        raise UnknownUnitError(
            f"{what} = {selector!r}: {unknown} is neither a unit kind of this model nor a unit name; "
            f"allowed kinds: {sorted(kinds)}" + (f"; close unit names: {close}" if close else "")
        )
    return [u for u in units if u.name in picked]


# ------------------------------------------------------------------ serialisation base
class _Config:
    """to_dict / to_json for the frozen schedule dataclasses (``"type"`` names the class)."""

    def _field_values(self) -> dict:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **self._field_values()}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def _from_fields(cls, d: dict):
        return cls(**d)
