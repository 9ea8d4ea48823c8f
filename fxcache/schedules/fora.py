"""FORA (fora.txt, Sec. 3.2): every ``interval`` steps compute the attention and MLP
sublayers of every transformer block and cache them; reuse them in between. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..plan import UnitInfo
from ._validate import UnknownUnitError, _check_int, _Config, _kinds_found, _period
from .mask import Mask
from .registry import _serialisable, register_lowering

__all__ = ["FORA", "fora_units"]


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
    period = _period("FORA.interval", s.interval, num_steps)
    return Mask(((True,) * n,) + ((False,) * n,) * (period - 1), names, periodic=True)
