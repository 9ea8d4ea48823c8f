"""Stage 3, schedule: the schedule configs and their lowering to an explicit :class:`Mask`.

Pure Python (no torch). A schedule is a small frozen dataclass, validated on
construction and serialisable to JSON (``to_json()`` / :func:`schedule_from_json`).
Every schedule *lowers* to a :class:`Mask`, the boolean table ``table[step][i]``
(True: ``units[i]`` is computed at that step and refreshes its cache; False: its cached
value is read)::

    mask = lower(schedule, unit_infos, num_steps)
    plan = Plan([info_by_name[n] for n in mask.units], mask.table, periodic=mask.periodic, ...)

Lowering dispatches on the config type through a registry (:func:`register_lowering`),
so a new method is a new dataclass plus one registered function.

==============  ==========================================  ==============================
schedule        paper                                        units it selects
==============  ==========================================  ==============================
DeepCache       deepcache.txt Eq. 6-7                        ``skip_branch.{branch}``
FORA            fora.txt Sec. 3.2                            attention/MLP sublayers of
                                                             transformer blocks (and Flux
                                                             single-block ``.branch``)
BlockCache      block-caching.txt Eq. 6-7                    units of given kinds / names
LearnedMask     timestep-aware-block-masking.txt             (learned by fxcache.learn_mask)
Mask            -                                            the units it names
==============  ==========================================  ==============================
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .errors import FxcacheError, UnitError
from .plan import UnitInfo

if TYPE_CHECKING:  # pragma: no cover
    from .calibrate.profile_data import Profile
    from .plan import Plan

__all__ = [
    "ScheduleError",
    "UnknownUnitError",
    "Mask",
    "DeepCache",
    "FORA",
    "BlockCache",
    "LearnedMask",
    "lower",
    "register_lowering",
    "registered_schedules",
    "schedule_from_dict",
    "schedule_from_json",
    "to_plan",
    "rectify",
    "deepcache_full_steps",
    "skip_branches",
    "fora_units",
    "select_units",
    "delta_refresh",
    "DEEPCACHE_DEFAULT_CENTER",
    "DEEPCACHE_DEFAULT_POWER",
]


class ScheduleError(FxcacheError, ValueError):
    """A schedule that is invalid, or that does not apply to the model's units.

    The message names the field, the bad value and what is allowed instead."""


class UnknownUnitError(ScheduleError, UnitError):
    """A schedule names a unit the model does not have (message lists close matches)."""


# ----------------------------------------------------------------------------- helpers
def _bad(cls: str, name: str, value: Any, allowed: str) -> ScheduleError:
    return ScheduleError(f"{cls}.{name} = {value!r} is not allowed; {name} must be {allowed}")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


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


def _kinds_found(units: Sequence[UnitInfo]) -> str:
    kinds = sorted({u.kind for u in units})
    return ", ".join(kinds) if kinds else "none"


def _unknown_units(missing: Sequence[str], available: Sequence[str], what: str) -> UnknownUnitError:
    parts = []
    for name in missing[:5]:
        close = difflib.get_close_matches(name, available, n=4, cutoff=0.5)
        parts.append(f"'{name}'" + (f" (close: {close})" if close else ""))
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    shown = list(available[:40])
    tail = f", ... ({len(available)} in all)" if len(available) > 40 else ""
    return UnknownUnitError(
        f"{what} names units this model does not have: {', '.join(parts)}{more}. "
        f"Available units: {shown}{tail}"
    )


def _units_seq(units: Any) -> list[UnitInfo]:
    if isinstance(units, (str, bytes)) or not isinstance(units, Iterable):
        raise ScheduleError(f"units must be a sequence of UnitInfo; got {type(units).__name__}")
    units = list(units)
    bad = [u for u in units if not isinstance(u, UnitInfo)]
    if bad:
        raise ScheduleError(f"units must be a sequence of UnitInfo; got {type(bad[0]).__name__} among them")
    return units


# ------------------------------------------------------------------ serialisation base
_SCHEDULE_TYPES: dict[str, type] = {}


def _serialisable(cls: type) -> type:
    _SCHEDULE_TYPES[cls.__name__] = cls
    return cls


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


def schedule_from_dict(d: dict):
    """Rebuild a schedule (or a :class:`Mask`) from :meth:`to_dict` output."""
    if not isinstance(d, dict):
        raise ScheduleError(f"a schedule dict is expected; got {type(d).__name__}")
    kind = d.get("type")
    if kind not in _SCHEDULE_TYPES:
        raise ScheduleError(f"schedule type = {kind!r} is unknown; allowed types: {sorted(_SCHEDULE_TYPES)}")
    cls = _SCHEDULE_TYPES[kind]
    body = {k: v for k, v in d.items() if k != "type"}
    names = {f.name for f in fields(cls)}
    extra = sorted(set(body) - names)
    if extra:
        raise ScheduleError(f"{kind} has no fields {extra}; its fields are {sorted(names)}")
    return cls._from_fields(body)


def schedule_from_json(s: str):
    """Rebuild a schedule (or a :class:`Mask`) from :meth:`to_json` output."""
    try:
        d = json.loads(s)
    except json.JSONDecodeError as exc:
        raise ScheduleError(f"not valid schedule JSON: {exc}") from None
    return schedule_from_dict(d)


# ----------------------------------------------------------------------------- registry
_LOWERINGS: dict[type, Callable[[Any, list[UnitInfo], int | None], "Mask"]] = {}


def register_lowering(cls: type):
    """Decorator: ``@register_lowering(MyConfig) def f(config, units, num_steps) -> Mask``."""

    def deco(fn):
        _LOWERINGS[cls] = fn
        return fn

    return deco


def registered_schedules() -> tuple[str, ...]:
    return tuple(sorted(c.__name__ for c in _LOWERINGS))


def lower(schedule: Any, units: Sequence[UnitInfo], num_steps: int | None = None) -> "Mask":
    """The explicit :class:`Mask` of ``schedule`` on a model with these ``units``.

    num_steps: steps of the generation, or None when unknown (periodic schedules do not
    need it; schedules that do say so).
    """
    fn = next((_LOWERINGS[c] for c in type(schedule).__mro__ if c in _LOWERINGS), None)
    if fn is None:
        raise ScheduleError(
            f"schedule = {schedule!r} of type {type(schedule).__name__} has no lowering; "
            f"allowed schedule types: {list(registered_schedules())} (register new ones with "
            f"@fxcache.schedules.register_lowering(YourConfig))"
        )
    infos = _units_seq(units)
    mask = fn(schedule, infos, _check_num_steps(num_steps))
    if not isinstance(mask, Mask):
        raise ScheduleError(f"the lowering of {type(schedule).__name__} returned {type(mask).__name__}, not a Mask")
    return mask


def to_plan(schedule: Any, units: Sequence[UnitInfo], num_steps: int | None = None, *, full_flops: int = 0) -> "Plan":
    """``lower`` then build the (unbound) :class:`~fxcache.plan.Plan`; for reports and tests."""
    from .plan import Plan

    mask = lower(schedule, units, num_steps)
    by_name = {u.name: u for u in units}
    return Plan(
        [by_name[n] for n in mask.units], mask.table, periodic=mask.periodic, full_flops=full_flops, schedule=schedule
    )


# --------------------------------------------------------------------------------- Mask
def _row_from(value: Any, step: int) -> tuple[bool, ...]:
    if isinstance(value, str):
        if set(value) - {"0", "1"}:
            raise ScheduleError(f"Mask.table row {step} = {value!r} is not allowed; a string row holds only '0'/'1'")
        return tuple(c == "1" for c in value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ScheduleError(f"Mask.table row {step} = {value!r} is not allowed; rows must be sequences of booleans")
    row = []
    for v in value:
        if isinstance(v, bool) or type(v).__name__ == "bool_":
            row.append(bool(v))
        elif _is_int(v) and int(v) in (0, 1):
            row.append(bool(v))
        else:
            raise ScheduleError(f"Mask.table row {step} has entry {v!r}; allowed entries: True/False (or 1/0)")
    return tuple(row)


@_serialisable
@dataclass(frozen=True, repr=False)
class Mask(_Config):
    """The explicit schedule: ``table[step][i]`` is True when ``units[i]`` is computed.

    ``periodic=True``: the table is one period that repeats (row ``step % len(table)``);
    otherwise it covers exactly ``len(table)`` steps. Rows and the table are tuples, so a
    mask is hashable. Saved as JSON with one ``"0"/"1"`` string per row.
    """

    table: tuple[tuple[bool, ...], ...]
    units: tuple[str, ...]
    periodic: bool = False

    def __post_init__(self) -> None:
        units = self.units
        if isinstance(units, str) or not isinstance(units, Iterable):
            raise _bad("Mask", "units", units, "a non-empty sequence of unit names")
        units = tuple(units)
        if not units or not all(isinstance(u, str) and u for u in units):
            raise _bad("Mask", "units", units, "a non-empty sequence of non-empty unit names")
        if len(set(units)) != len(units):
            dup = sorted({u for u in units if units.count(u) > 1})
            raise _bad("Mask", "units", units, f"unique names (repeated: {dup})")
        if isinstance(self.table, (str, bytes)) or not isinstance(self.table, Iterable):
            raise _bad("Mask", "table", self.table, "a non-empty sequence of rows")
        table = tuple(_row_from(r, s) for s, r in enumerate(self.table))
        if not table:
            raise _bad("Mask", "table", self.table, "a non-empty sequence of rows (one per step)")
        for s, row in enumerate(table):
            if len(row) != len(units):
                raise ScheduleError(
                    f"Mask.table row {s} has {len(row)} entries; allowed: exactly one per unit "
                    f"({len(units)} units)"
                )
        object.__setattr__(self, "units", units)
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "periodic", _check_bool("Mask", "periodic", self.periodic))

    # ----------------------------------------------------------------- helpers
    @classmethod
    def full(cls, units: Sequence[UnitInfo] | Sequence[str], num_steps: int | None = None) -> "Mask":
        """Everything computed at every step (periodic with one row when num_steps is None)."""
        names = tuple(u.name if isinstance(u, UnitInfo) else u for u in units)
        num_steps = _check_num_steps(num_steps)
        rows = 1 if num_steps is None else num_steps
        return cls(((True,) * len(names),) * rows, names, periodic=num_steps is None)

    @classmethod
    def from_steps(
        cls, computed: dict[str, Iterable[int]], num_steps: int, units: Sequence[str] | None = None
    ) -> "Mask":
        """A finite mask from ``{unit: steps at which it is computed}``."""
        names = tuple(units) if units is not None else tuple(computed)
        num_steps = _check_num_steps(num_steps) or 0
        sets = {n: set(computed.get(n, ())) for n in names}
        for n, steps in sets.items():
            bad = sorted(s for s in steps if not (_is_int(s) and 0 <= s < num_steps))
            if bad:
                raise ScheduleError(f"steps {bad} of unit '{n}' are outside 0..{num_steps - 1}")
        return cls(tuple(tuple(s in sets[n] for n in names) for s in range(num_steps)), names)

    @property
    def num_steps(self) -> int:
        """Rows of the table (one period for a periodic mask)."""
        return len(self.table)

    def row(self, step: int) -> tuple[bool, ...]:
        if self.periodic:
            return self.table[step % len(self.table)]
        if not 0 <= step < len(self.table):
            raise ScheduleError(f"step = {step} is outside this mask of {len(self.table)} steps (0..{len(self.table) - 1})")
        return self.table[step]

    def column(self, unit: str) -> tuple[bool, ...]:
        i = self._index(unit)
        return tuple(r[i] for r in self.table)

    def computed_steps(self, unit: str, num_steps: int | None = None) -> tuple[int, ...]:
        """Steps at which ``unit`` is computed (over ``num_steps`` steps for a periodic mask)."""
        i = self._index(unit)
        n = self.num_steps if num_steps is None else num_steps
        return tuple(s for s in range(n) if self.row(s)[i])

    def expand(self, num_steps: int) -> "Mask":
        """A finite mask of ``num_steps`` rows (repeating a periodic table)."""
        num_steps = _check_num_steps(num_steps)
        if num_steps is None:
            raise ScheduleError("Mask.expand needs num_steps, an integer >= 1")
        if not self.periodic and num_steps != self.num_steps:
            raise ScheduleError(f"this mask covers {self.num_steps} steps and is not periodic; it cannot cover {num_steps}")
        return Mask(tuple(self.row(s) for s in range(num_steps)), self.units)

    @property
    def computed_fraction(self) -> float:
        """Share of (step, unit) cells that are computed."""
        cells = len(self.table) * len(self.units)
        return sum(map(sum, self.table)) / cells

    def _index(self, unit: str) -> int:
        try:
            return self.units.index(unit)
        except ValueError:
            raise _unknown_units([unit], self.units, "the lookup") from None

    def __repr__(self) -> str:
        return (
            f"Mask(units={len(self.units)}, steps={self.num_steps}, periodic={self.periodic}, "
            f"computed={self.computed_fraction:.1%})"
        )

    def __str__(self) -> str:
        width = max(len(u) for u in self.units)
        head = f"Mask: {len(self.units)} units x {self.num_steps} {'steps per period' if self.periodic else 'steps'}"
        lines = [head]
        for i, u in enumerate(self.units):
            lines.append(f"  {u:<{width}} " + "".join("#" if r[i] else "." for r in self.table))
        return "\n".join(lines)

    # ----------------------------------------------------------- serialising
    def _field_values(self) -> dict:
        return {
            "units": list(self.units),
            "periodic": self.periodic,
            "table": ["".join("1" if v else "0" for v in row) for row in self.table],
        }

    @classmethod
    def _from_fields(cls, d: dict) -> "Mask":
        for key in ("table", "units"):
            if key not in d:
                raise ScheduleError(f"a Mask dict needs '{key}'")
        return cls(table=d["table"], units=d["units"], periodic=d.get("periodic", False))

    @classmethod
    def from_json(cls, s: str) -> "Mask":
        m = schedule_from_json(s)
        if not isinstance(m, Mask):
            raise ScheduleError(f"expected a Mask; the JSON holds a {type(m).__name__}")
        return m

    def save(self, path: str | os.PathLike) -> str:
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json(indent=1))
            f.write("\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Mask":
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ScheduleError(f"no mask at '{path}'")
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())


@register_lowering(Mask)
def _lower_mask(mask: Mask, units: list[UnitInfo], num_steps: int | None) -> Mask:
    available = [u.name for u in units]
    have = set(available)
    missing = [n for n in mask.units if n not in have]
    if missing:
        raise _unknown_units(missing, available, "the Mask")
    if not mask.periodic and num_steps is not None and num_steps != mask.num_steps:
        raise ScheduleError(
            f"Mask.table has {mask.num_steps} rows but the generation has num_steps = {num_steps}; "
            f"allowed: a mask of exactly {num_steps} rows, or a periodic mask (periodic=True)"
        )
    return mask


# ---------------------------------------------------------------------------- DeepCache
DEEPCACHE_DEFAULT_CENTER = 0.3
"""Default non-uniform centre as a fraction of the steps: the official DeepCache example
uses ``center=15`` for 50 steps (and ``pow=1.4``); the paper leaves them to its appendix."""
DEEPCACHE_DEFAULT_POWER = 1.4


def skip_branches(units: Sequence[UnitInfo]) -> dict[int, UnitInfo]:
    """DeepCache's branches by number (0 = shallowest skip connection)."""
    out: dict[int, UnitInfo] = {}
    for u in units:
        if u.kind != "skip_branch":
            continue
        idx = u.index
        if idx is None:
            tail = u.name.rsplit(".", 1)[-1]
            idx = int(tail) if tail.isdigit() else None
        if idx is not None:
            out[idx] = u
    return dict(sorted(out.items()))


def _signed_pow(x: float, p: float) -> float:
    return math.copysign(abs(x) ** p, x)


def deepcache_full_steps(
    num_steps: int, interval: int, center: float | None = None, power: float | None = None
) -> tuple[tuple[int, ...], float]:
    """Non-uniform 1:N full steps (DeepCache Eq. 7) and the power actually used.

    ``k = ceil(T/N)`` points ``l`` evenly spaced from ``sign(-c)|c|^(1/p)`` to
    ``(T-c)^(1/p)`` (end excluded, as in the paper's ``linear space``), indices
    ``unique(int(l^p + c))`` with ``l^p`` read as ``sign(l)|l|^p``; ``p`` is lowered by
    0.02 (down to 1) until the ``k`` indices are distinct. At ``p = 1`` the points are
    ``T/k >= 1`` apart, so ``k`` distinct indices always exist. The first point gives
    index 0: step 0 is always full. ``int`` is ``floor`` with a 1e-9 tolerance so
    values like ``2.9999999999`` that are 3 in exact arithmetic count as 3.
    Defaults: ``c = 0.3 T`` (:data:`DEEPCACHE_DEFAULT_CENTER`), ``p = 1.4``.
    """
    T, N = int(num_steps), int(interval)
    if T < 1 or N < 1:
        raise ScheduleError(f"num_steps = {T} and interval = {N} must both be integers >= 1")
    k = math.ceil(T / N)
    c = DEEPCACHE_DEFAULT_CENTER * T if center is None else float(center)
    p0 = DEEPCACHE_DEFAULT_POWER if power is None else float(power)
    if not 0 <= c < T:
        raise _bad("DeepCache", "center", center, f"a step index in [0, num_steps) = [0, {T})")
    if not p0 >= 1:
        raise _bad("DeepCache", "power", power, "a number >= 1")
    j = 0
    while True:
        p = p0 if j == 0 else max(1.0, round(p0 - 0.02 * j, 10))
        start = _signed_pow(-c, 1.0 / p)
        end = (T - c) ** (1.0 / p)
        idx = set()
        for i in range(k):
            l_i = start + (end - start) * i / k
            v = _signed_pow(l_i, p) + c
            idx.add(min(T - 1, max(0, math.floor(v + 1e-9))))
        if len(idx) == k:
            if 0 not in idx:  # pragma: no cover - the first point maps to 0
                raise ScheduleError("internal error: non-uniform DeepCache lost step 0")
            return tuple(sorted(idx)), p
        if p == 1.0:  # pragma: no cover - impossible, see docstring
            raise ScheduleError(f"no power gives {k} distinct full steps for num_steps={T}, interval={N}")
        j += 1


@_serialisable
@dataclass(frozen=True)
class DeepCache(_Config):
    """DeepCache (deepcache.txt): reuse the deep part of a U-Net behind skip branch m.

    interval: N of 1:N: one full step, then N-1 partial steps (1 = always full).
    branch:   skip connection m (0 = shallowest); a partial step reads the main-branch
              input of the up layer consuming skip m from the cache and skips all deeper.
    uniform:  True: full at steps 0, N, 2N, ... (a periodic mask of period N).
              False: the non-uniform 1:N of Eq. 7 (see :func:`deepcache_full_steps`):
              exactly ceil(T/N) full steps, densest around ``center``; needs the number
              of steps T (from ``num_steps`` here or from the generation).
    center:   non-uniform only: the step index (0 <= c < T) full steps cluster around;
              default ``0.3 * T`` (the official DeepCache example: 15 of 50 steps).
    power:    non-uniform only: the exponent p >= 1 (larger: more clustered); default 1.4
              as in the official example; lowered by 0.02 until the steps are distinct.
    num_steps: optional T fixed in the config (must agree with the generation's).
    """

    interval: int
    branch: int
    uniform: bool = True
    center: float | None = None
    power: float | None = None
    num_steps: int | None = None

    def __post_init__(self) -> None:
        c = "DeepCache"
        object.__setattr__(self, "interval", _check_int(c, "interval", self.interval, 1))
        object.__setattr__(self, "branch", _check_int(c, "branch", self.branch, 0))
        _check_bool(c, "uniform", self.uniform)
        object.__setattr__(self, "center", _check_real(c, "center", self.center, 0.0, optional=True))
        object.__setattr__(self, "power", _check_real(c, "power", self.power, 1.0, optional=True))
        object.__setattr__(self, "num_steps", _check_int(c, "num_steps", self.num_steps, 1, optional=True))
        if self.uniform and (self.center is not None or self.power is not None):
            which = "center" if self.center is not None else "power"
            raise _bad(c, which, getattr(self, which), "None when uniform=True (it shapes the non-uniform 1:N only)")
        if self.center is not None and self.num_steps is not None and self.center >= self.num_steps:
            raise _bad(c, "center", self.center, f"a step index in [0, num_steps) = [0, {self.num_steps})")


@register_lowering(DeepCache)
def _lower_deepcache(s: DeepCache, units: list[UnitInfo], num_steps: int | None) -> Mask:
    branches = skip_branches(units)
    if not branches:
        raise UnknownUnitError(
            f"DeepCache applies to U-Nets with skip connections; this model has no skip_branch units "
            f"(unit kinds found: {_kinds_found(units)}). Use FORA (transformer blocks), BlockCache "
            f"(any residual unit, from a profile) or an explicit Mask instead."
        )
    if s.branch not in branches:
        raise _bad(
            "DeepCache",
            "branch",
            s.branch,
            f"one of this model's skip branches {list(branches)} (0 = shallowest skip connection)",
        )
    name = branches[s.branch].name
    steps = _resolve_steps("DeepCache", s.num_steps, num_steps)
    N = s.interval
    if s.uniform:
        return Mask(((True,),) + ((False,),) * (N - 1), (name,), periodic=True)
    if steps is None:
        raise ScheduleError(
            "DeepCache(uniform=False) needs the number of steps: set DeepCache.num_steps or pass num_steps "
            "to fxcache.compile / lower (allowed: an integer >= 1)"
        )
    if s.center is not None and not s.center < steps:
        raise _bad("DeepCache", "center", s.center, f"a step index in [0, num_steps) = [0, {steps})")
    full, _ = deepcache_full_steps(steps, N, s.center, s.power)
    full_set = set(full)
    return Mask(tuple((t in full_set,) for t in range(steps)), (name,))


# --------------------------------------------------------------------------------- FORA
def fora_units(units: Sequence[UnitInfo]) -> list[UnitInfo]:
    """What FORA caches: attention and MLP sublayers of transformer blocks (``block`` set),
    and ``branch`` units (Flux single blocks: the whole residual branch), which replace
    the attention/MLP units of their own block."""
    branch_blocks = {u.block or u.parent for u in units if u.kind == "branch"}
    out = []
    for u in units:
        if u.kind == "branch":
            out.append(u)
        elif u.kind in ("attention", "mlp") and u.block is not None and u.block not in branch_blocks:
            out.append(u)
    return out


@_serialisable
@dataclass(frozen=True)
class FORA(_Config):
    """FORA (fora.txt Sec. 3.2): every ``interval`` steps (step 0 included) compute every
    transformer block's attention and MLP outputs and cache them; reuse them in between.
    The block's residual additions and adaLN gates still run at every step. Periodic."""

    interval: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval", _check_int("FORA", "interval", self.interval, 1))


@register_lowering(FORA)
def _lower_fora(s: FORA, units: list[UnitInfo], num_steps: int | None) -> Mask:
    chosen = fora_units(units)
    if not chosen:
        raise UnknownUnitError(
            f"FORA caches the attention and MLP sublayers of transformer blocks; this model has none "
            f"(unit kinds found: {_kinds_found(units)}). Use DeepCache (U-Nets with skip connections), "
            f"BlockCache (any residual unit, from a profile) or an explicit Mask instead."
        )
    names = tuple(u.name for u in chosen)
    n = len(names)
    return Mask(((True,) * n,) + ((False,) * n,) * (s.interval - 1), names, periodic=True)


# --------------------------------------------------------------------------- BlockCache
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


def delta_refresh(changes: Sequence[float], threshold: float) -> tuple[bool, ...]:
    """The δ rule of block caching (Eq. 7) for one unit: computed steps.

    ``changes[t]`` is the relative change from step t-1 to t (``changes[0]`` is ignored).
    Step 0 is computed. From each refresh step t_a the cache is kept at step t while
    ``sum(changes[t_a+1 .. t]) <= threshold``; the first step where the sum would exceed
    it is computed and becomes the new t_a. NaN counts as an unbounded change.
    """
    out = [True]
    acc = 0.0
    for x in list(changes)[1:]:
        x = float(x)
        acc += math.inf if math.isnan(x) else x
        if acc > threshold:
            out.append(True)
            acc = 0.0
        else:
            out.append(False)
    return tuple(out)


@_serialisable
@dataclass(frozen=True)
class BlockCache(_Config):
    """Block caching (block-caching.txt Eq. 6-7): per-unit refresh steps from a profile.

    threshold:   δ >= 0. For each unit, from each refresh step t_a the cache is kept while
                 the summed relative L1 change since t_a stays <= δ; the unit is recomputed
                 at the first step where it would exceed δ (:func:`delta_refresh`).
                 δ = 0 recomputes at every step whose profiled change is > 0.
    profile:     a :class:`~fxcache.calibrate.profile_data.Profile` or the path of a saved
                 one. The table covers ``profile.num_steps`` steps.
    units:       which units: a kind (default ``"attention"``; also ``"transformer_block"``,
                 ``"resnet"``, ...), or a tuple of kinds and/or unit names. Each selected
                 unit must be in the profile.
    scale_shift: optional path of a trained scale-shift checkpoint (Sec. 3.4); stored and
                 serialised here, applied by the rewrite.
    """

    threshold: float
    profile: Any
    units: str | tuple[str, ...] = "attention"
    scale_shift: str | None = None

    def __post_init__(self) -> None:
        c = "BlockCache"
        object.__setattr__(self, "threshold", _check_real(c, "threshold", self.threshold, 0.0))
        from .calibrate.profile_data import Profile

        if not isinstance(self.profile, Profile):
            object.__setattr__(self, "profile", _check_path(c, "profile", self.profile, optional=False))
        object.__setattr__(self, "units", _check_selector(c, "units", self.units))
        object.__setattr__(self, "scale_shift", _check_path(c, "scale_shift", self.scale_shift))

    def load_profile(self) -> "Profile":
        from .calibrate.profile_data import Profile

        return self.profile if isinstance(self.profile, Profile) else Profile.load(self.profile)

    def _field_values(self) -> dict:
        out = super()._field_values()
        if not isinstance(self.profile, str):
            out["profile"] = self.profile.to_dict()
        return out

    @classmethod
    def _from_fields(cls, d: dict) -> "BlockCache":
        d = dict(d)
        if isinstance(d.get("profile"), dict):
            from .calibrate.profile_data import Profile

            d["profile"] = Profile.from_dict(d["profile"])
        return cls(**d)


@register_lowering(BlockCache)
def _lower_block_cache(s: BlockCache, units: list[UnitInfo], num_steps: int | None) -> Mask:
    profile = s.load_profile()
    if num_steps is not None and num_steps != profile.num_steps:
        raise ScheduleError(
            f"BlockCache.profile covers {profile.num_steps} steps but the generation has num_steps = {num_steps}; "
            f"allowed: num_steps = {profile.num_steps}, or profile again with {num_steps} steps"
        )
    chosen = select_units(units, s.units, what="BlockCache.units")
    if not chosen:
        raise UnknownUnitError(f"BlockCache.units = {s.units!r} selects no unit of this model")
    missing = [u.name for u in chosen if u.name not in profile.units]
    if missing:
        raise UnknownUnitError(
            f"BlockCache.units = {s.units!r} selects units the profile does not cover: {missing[:8]}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            + f"; the profile has {list(profile.units)[:12]}{' ...' if len(profile.units) > 12 else ''}. "
            "Profile these units, or pass BlockCache(units=(...names in the profile...))"
        )
    columns = [delta_refresh(profile.column(u.name).tolist(), s.threshold) for u in chosen]
    table = tuple(tuple(col[t] for col in columns) for t in range(profile.num_steps))
    return Mask(table, tuple(u.name for u in chosen))


# -------------------------------------------------------------------------- LearnedMask
@_serialisable
@dataclass(frozen=True)
class LearnedMask(_Config):
    """Hyper-parameters of timestep-aware block masking (timestep-aware-block-masking.txt).

    Not lowerable by itself: ``mask = fxcache.learn_mask(model, LearnedMask(...), ...)``
    learns a :class:`Mask`, which is what gets compiled.

    lambda_sparsity: λ1, weight of Σ_b α_b (push towards reuse).
    lambda_bimodal:  λ2, weight of Σ_b α_b (1 - α_b) (push α to 0/1).
    lr, iters:       optimiser step size and iterations per timestep.
    threshold:       α > threshold → compute (1), else reuse (0).
    units:           which units the mask covers (a kind, or kinds / unit names).
    num_steps:       steps to learn the mask for (None: the generation's).
    loss_scaling:    use the timestep-aware weights w_t (Sec. 3.4).
    rectify:         apply :func:`rectify` to the thresholded mask (Sec. 3.5).
    seed:            seed of the noise and of the mask sampling.
    """

    # λ1 > λ2: near α = 1 the regulariser's slope is λ1 - λ2 and the feature loss only
    # rewards computing, so with λ1 <= λ2 nothing is ever reused (measured on the
    # embedded DiT: 3e-3 / 1e-3 computes half the blocks at 10 steps).
    lambda_sparsity: float = 3e-3
    lambda_bimodal: float = 1e-3
    lr: float = 1e-1
    iters: int = 100
    threshold: float = 0.5
    units: str | tuple[str, ...] = "transformer_block"
    num_steps: int | None = None
    loss_scaling: bool = True
    rectify: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        c = "LearnedMask"
        object.__setattr__(self, "lambda_sparsity", _check_real(c, "lambda_sparsity", self.lambda_sparsity, 0.0))
        object.__setattr__(self, "lambda_bimodal", _check_real(c, "lambda_bimodal", self.lambda_bimodal, 0.0))
        lr = _check_real(c, "lr", self.lr, 0.0)
        if lr == 0.0:
            raise _bad(c, "lr", self.lr, "a finite number > 0")
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "iters", _check_int(c, "iters", self.iters, 1))
        threshold = _check_real(c, "threshold", self.threshold, 0.0, maximum=1.0)
        object.__setattr__(self, "threshold", threshold)
        object.__setattr__(self, "units", _check_selector(c, "units", self.units))
        object.__setattr__(self, "num_steps", _check_int(c, "num_steps", self.num_steps, 1, optional=True))
        _check_bool(c, "loss_scaling", self.loss_scaling)
        _check_bool(c, "rectify", self.rectify)
        object.__setattr__(self, "seed", _check_int(c, "seed", self.seed, 0))


@register_lowering(LearnedMask)
def _lower_learned(s: LearnedMask, units: list[UnitInfo], num_steps: int | None) -> Mask:
    raise ScheduleError(
        "LearnedMask holds the hyper-parameters of mask learning and has no table to lower; learn the mask "
        "first with `mask = fxcache.learn_mask(model, LearnedMask(...), ...)` (it returns a Mask, which can "
        "be saved with mask.save(path)), then compile with that Mask"
    )


# ------------------------------------------------------------------------ rectification
def rectify(mask: Mask, order: Sequence[str] | None = None) -> Mask:
    """The masking paper's rectification (Sec. 3.5, Eq. 12) for a chain of blocks.

    ``order``: the blocks in the order data flows through them (default: ``mask.units``);
    other units of the mask are left unchanged. Walking from the last step to the first
    and, within a step, from the last block to the first, set ``m[t, b] = 0`` when the
    next block at t reuses its cache (``m[t, b+1] = 0``: it does not read block b's output)
    and the same block at the next step recomputes (``m[t+1, b] = 1``: nobody reads b's
    cache either). The last block feeds the model's output and is never changed. After the
    last step of a finite mask nobody reads a cache, so the last step counts as followed by
    a recompute; a periodic mask wraps to its row 0, which (as the first step of every
    generation, where the caches are filled) is itself left unchanged.

    Only sets 1 → 0, and one pass reaches the fixed point (idempotent). fxcache's compiler
    does this automatically, for any graph shape: the rewrite's cross-step liveness runs a
    unit only when a consumer at the same step or a later cache read needs its value
    (and removes some dead work this chain rule cannot see, e.g. a block whose next-step
    copy was itself rectified away). ``rectify`` is provided to report and compare masks.
    """
    names = list(mask.units if order is None else order)
    missing = [n for n in names if n not in mask.units]
    if missing:
        raise _unknown_units(missing, list(mask.units), "rectify(order=...)")
    if len(set(names)) != len(names):
        raise ScheduleError(f"rectify order = {names!r} repeats units; allowed: each unit at most once")
    cols = [mask.units.index(n) for n in names]
    m = [list(r) for r in mask.table]
    T = len(m)
    first = 1 if mask.periodic else 0
    for t in range(T - 1, first - 1, -1):
        if t + 1 < T:
            nxt = m[t + 1]
        elif mask.periodic:
            nxt = m[0]
        else:
            nxt = None  # end of the generation: nobody reads the cache
        for j in range(len(cols) - 2, -1, -1):
            b, b_next = cols[j], cols[j + 1]
            if m[t][b] and not m[t][b_next] and (nxt is None or nxt[b]):
                m[t][b] = False
    return Mask(tuple(tuple(r) for r in m), mask.units, periodic=mask.periodic)
