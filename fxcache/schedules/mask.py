"""The explicit schedule: :class:`Mask`, the boolean table every schedule lowers to, and
:func:`rectify`, the masking paper's rectification. Pure Python."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..plan import UnitInfo
from ._validate import (
    ScheduleError,
    _bad,
    _check_bool,
    _check_num_steps,
    _Config,
    _is_int,
    _is_numpy_bool,
    _shown,
    _unknown_units,
)
from .registry import ModelFacts, _serialisable, register_check, register_lowering, schedule_from_dict, schedule_from_json
from .spans import is_span, span_blocks

__all__ = ["Mask", "mask_from_dict", "rectify"]


def _row_from(value: Any, step: int) -> tuple[bool, ...]:
    if isinstance(value, str):
        if set(value) - {"0", "1"}:
            raise ScheduleError(f"Mask.table row {step} = {value!r} is not allowed; a string row holds only '0'/'1'")
        return tuple(c == "1" for c in value)
    if isinstance(value, (bytes, dict)) or not isinstance(value, Iterable):
        raise ScheduleError(
            f"Mask.table row {step} = {_shown(value)!r} is not allowed; rows must be sequences of booleans"
        )
    row = []
    for v in value:
        if isinstance(v, bool) or _is_numpy_bool(v):
            row.append(bool(v))
        elif _is_int(v) and int(v) in (0, 1):
            row.append(bool(v))
        else:
            raise ScheduleError(
                f"Mask.table row {step} has entry {_shown(v)!r}; allowed entries: True/False (or 1/0)"
            )
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
        from ..artefacts.store import write_text_atomic

        return write_text_atomic(path, self.to_json(indent=1) + "\n")  # a failed write leaves the old file

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Mask":
        """Read a mask written by :meth:`save`; any problem is a :class:`ScheduleError`
        naming the file."""
        try:
            path = os.fspath(path)
        except TypeError:
            raise ScheduleError(f"Mask.load(path = {path!r}): path must be a str or os.PathLike") from None
        if not os.path.exists(path):
            raise ScheduleError(f"no mask at '{path}'; write one with mask.save(path)")
        if os.path.isdir(path):
            raise ScheduleError(f"'{path}' is a directory, not a mask file: give the JSON file mask.save(path) wrote")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ScheduleError(f"mask file '{path}' cannot be read: {exc}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ScheduleError(
                f"mask file '{path}' is not UTF-8 text (a binary file?): give the JSON file mask.save(path) wrote"
            ) from None
        try:
            return cls.from_json(text)
        except ScheduleError as exc:
            raise ScheduleError(f"mask file '{path}': {exc}") from None


def _missing_units(names: Sequence[str], units: list[UnitInfo]) -> list[str]:
    """Names that are neither units nor spans of blocks (a span with bad ends raises)."""
    have = {u.name for u in units}
    missing = []
    for n in names:
        if n in have:
            continue
        if is_span(n):
            span_blocks(n, units)  # raises, saying what is wrong with it
            continue
        missing.append(n)
    return missing


@register_check(Mask)
def _check_mask(mask: Mask, units: list[UnitInfo], model: ModelFacts) -> None:
    available = [u.name for u in units]
    missing = _missing_units(mask.units, units)
    if missing:
        raise _unknown_units(missing, available, "the Mask", model.skipped)


@register_lowering(Mask)
def _lower_mask(mask: Mask, units: list[UnitInfo], num_steps: int | None) -> Mask:
    available = [u.name for u in units]
    missing = _missing_units(mask.units, units)
    if missing:
        raise _unknown_units(missing, available, "the Mask")
    if not mask.periodic and num_steps is not None and num_steps != mask.num_steps:
        raise ScheduleError(
            f"Mask.table has {mask.num_steps} rows but the generation has num_steps = {num_steps}; "
            f"allowed: a mask of exactly {num_steps} rows, or a periodic mask (periodic=True)"
        )
    return mask


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


def mask_from_dict(d: dict) -> Mask:
    """The :class:`Mask` a JSON object describes; :class:`ScheduleError` (a ``ValueError``)
    when it is not a valid Mask. The artefact readers take this as their Mask parser."""
    m = schedule_from_dict(d)
    if not isinstance(m, Mask):
        raise ScheduleError(f"it holds a {type(m).__name__}, not a Mask")
    return m
