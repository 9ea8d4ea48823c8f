"""MagCache (Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware
Cache"): skip a step while the error accumulated from calibrated magnitude ratios stays
below a threshold. Pure Python.

MagCache's decision depends only on the calibrated ratios and the step index, not on
the features of the generation being run, so it needs no run-time decision at all: it
lowers to a static :class:`~.mask.Mask` (the table MagCache's eager loop would follow),
compiled like any static schedule. The ratios come from :func:`fxcache.fit_magcache` on
a profile of :func:`fxcache.calibrate.fit.profile_magnitudes`, or are given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..plan import UnitInfo
from ._validate import ScheduleError, UnknownUnitError, _bad, _check_int, _check_real, _Config, _is_real, _kinds_found
from .fora import fora_units
from .mask import Mask
from .registry import _serialisable, register_lowering
from .spans import block_units
from .adaptive import REUSE_FORMS, reused_blocks

__all__ = ["MagCache", "magcache_rows"]


def magcache_rows(
    ratios: Sequence[float], threshold: float, first_steps: int = 1, last_steps: int = 0, max_reuse: int | None = None
) -> tuple[bool, ...]:
    """Computed steps by MagCache's rule: from each computed step, for every next step t
    multiply the accumulated ratio by ``ratios[t]`` and add ``|1 - accumulated ratio|`` to
    the accumulated error; reuse at t while the error is ``< threshold`` and at most
    ``max_reuse`` steps were reused in a row; otherwise compute and start again. The first
    ``first_steps`` and last ``last_steps`` steps compute."""
    n = len(ratios)
    out = []
    acc_ratio, acc_err, run = 1.0, 0.0, 0
    for t in range(n):
        if t < first_steps or t >= n - last_steps:
            out.append(True)
            acc_ratio, acc_err, run = 1.0, 0.0, 0
            continue
        acc_ratio *= float(ratios[t])
        acc_err += abs(1.0 - acc_ratio)
        if acc_err < threshold and (max_reuse is None or run < max_reuse):
            out.append(False)
            run += 1
        else:
            out.append(True)
            acc_ratio, acc_err, run = 1.0, 0.0, 0
    return tuple(out)


@_serialisable
@dataclass(frozen=True)
class MagCache(_Config):
    """MagCache (magnitude-aware cache, Ma et al. 2025): reuse every transformer block
    while the error accumulated from the calibrated per-step magnitude ratios stays
    below ``threshold`` (:func:`magcache_rows`): as one residual span over all blocks
    (``reuse="span"``, the default on transformers: MagCache's cached residual of the
    whole stack, added to the current input), or as FORA's attention and MLP sublayers of
    every block (``reuse="sublayers"``; Flux single blocks: the residual branch).

    The decision depends only on ``ratios``, so this is a static plan of
    ``len(ratios)`` steps (no run-time statistic, no lag).

    threshold:   >= 0; 0 computes every step (MagCache's default for Wan: 0.12).
    ratios:      one magnitude ratio per step, ``ratios[t] = |C(t)| / |C(t-1)|`` (``ratios[0]``
                 is not used), from :func:`fxcache.fit_magcache`; required.
    first_steps: steps computed at the start (MagCache's retention ratio x steps), >= 1.
    last_steps:  steps computed at the end.
    max_reuse:   most consecutive reused steps (MagCache's K; None: no limit).
    reuse:       ``"auto"``, ``"span"`` or ``"sublayers"``, as for
                 :class:`~.adaptive.FirstBlockCache`.
    """

    threshold: float
    ratios: tuple[float, ...] | None = None
    first_steps: int = 1
    last_steps: int = 0
    max_reuse: int | None = None
    reuse: str = "auto"

    def __post_init__(self) -> None:
        c = "MagCache"
        if self.reuse not in REUSE_FORMS:
            raise _bad(c, "reuse", self.reuse, f"one of {list(REUSE_FORMS)}")
        object.__setattr__(self, "threshold", _check_real(c, "threshold", self.threshold, 0.0))
        object.__setattr__(self, "first_steps", _check_int(c, "first_steps", self.first_steps, 1))
        object.__setattr__(self, "last_steps", _check_int(c, "last_steps", self.last_steps, 0))
        object.__setattr__(self, "max_reuse", _check_int(c, "max_reuse", self.max_reuse, 0, optional=True))
        r = self.ratios
        if r is None:
            return
        allowed = "a non-empty sequence of finite numbers > 0 (one per step), e.g. fxcache.fit_magcache(profile)"
        if isinstance(r, (str, bytes)) or not isinstance(r, Sequence) or not r:
            raise _bad(c, "ratios", r, allowed)
        if not all(_is_real(x) and math.isfinite(float(x)) and float(x) > 0 for x in r):
            raise _bad(c, "ratios", r, allowed)
        object.__setattr__(self, "ratios", tuple(float(x) for x in r))


@register_lowering(MagCache)
def _lower_magcache(s: MagCache, units: list[UnitInfo], num_steps: int | None) -> Mask:
    if s.ratios is None:
        raise ScheduleError(
            "MagCache.ratios = None: MagCache needs calibrated magnitude ratios, one per step; fit them with "
            "fxcache.fit_magcache(fxcache.calibrate.fit.profile_magnitudes(model, run)) and pass ratios=..."
        )
    n = len(s.ratios)
    if num_steps is not None and num_steps != n:
        raise ScheduleError(
            f"MagCache.ratios has {n} steps but the generation has num_steps = {num_steps}; fit the ratios "
            f"with a run of {num_steps} steps"
        )
    if not fora_units(units):
        raise UnknownUnitError(
            f"MagCache reuses the transformer blocks; this model has none (unit kinds found: {_kinds_found(units)})"
        )
    names = tuple(reused_blocks("MagCache", s.reuse, block_units(units), units))
    rows = magcache_rows(s.ratios, s.threshold, s.first_steps, s.last_steps, s.max_reuse)
    return Mask(tuple((c,) * len(names) for c in rows), names)
