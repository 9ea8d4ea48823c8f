"""DeepCache (deepcache.txt, Eq. 6-7): reuse the deep part of a U-Net behind skip branch
m; the partial steps run only the up path above it. Pure Python."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..plan import UnitInfo
from ._validate import (
    ScheduleError,
    UnknownUnitError,
    _bad,
    _check_bool,
    _check_int,
    _check_real,
    _Config,
    _kinds_found,
    _period,
    _resolve_steps,
)
from .mask import Mask
from .registry import _serialisable, register_lowering

__all__ = [
    "DeepCache",
    "deepcache_full_steps",
    "skip_branches",
    "DEEPCACHE_DEFAULT_CENTER",
    "DEEPCACHE_DEFAULT_POWER",
]

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
    k = -(-T // N)  # ceil(T / N) in integers: exact for any interval
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
        period = _period("DeepCache.interval", N, steps)
        return Mask(((True,),) + ((False,),) * (period - 1), (name,), periodic=True)
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
