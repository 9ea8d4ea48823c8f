"""Block caching (block-caching.txt, Eq. 6-7, Sec. 3.4): per-unit refresh steps from a
profile of each unit's change per step. Pure Python: the profile (and the metadata of a
scale-shift checkpoint the config names) are read when the config is built; lowering
reads no file."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from ..plan import UnitInfo
from ._validate import (
    ScheduleError,
    UnknownUnitError,
    _check_path,
    _check_real,
    _check_selector,
    _Config,
    select_units,
)
from .mask import Mask, mask_from_dict
from .registry import ModelFacts, _serialisable, register_check, register_lowering

if TYPE_CHECKING:  # pragma: no cover
    from ..artefacts import Profile

__all__ = ["BlockCache", "delta_refresh"]


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
    profile:     a :class:`~fxcache.artefacts.Profile` or the path of a saved
                 one, read when the config is built (the config keeps the path: its JSON
                 names the file). The table covers ``profile.num_steps`` steps.
    units:       which units: a kind (default ``"attention"``; also ``"transformer_block"``,
                 ``"resnet"``, ...), or a tuple of kinds and/or unit names. Each selected
                 unit must be in the profile.
    scale_shift: optional path of a trained scale-shift checkpoint (Sec. 3.4), applied by
                 the rewrite. Its metadata is read when the config is built, and lowering
                 refuses a checkpoint trained for another table (another threshold, units
                 or profile).

    With the model's :class:`~.registry.ModelFacts`, lowering also refuses a profile (or a
    checkpoint) recorded on another model class or with other unit shapes.
    """

    threshold: float
    profile: Profile | str
    units: str | tuple[str, ...] = "attention"
    scale_shift: str | None = None

    def __post_init__(self) -> None:
        c = "BlockCache"
        object.__setattr__(self, "threshold", _check_real(c, "threshold", self.threshold, 0.0))
        from ..artefacts import Profile

        if isinstance(self.profile, Profile):
            loaded = self.profile
        else:
            path = _check_path(c, "profile", self.profile, optional=False)
            object.__setattr__(self, "profile", path)
            loaded = Profile.load(path)
        object.__setattr__(self, "units", _check_selector(c, "units", self.units))
        ss = _check_path(c, "scale_shift", self.scale_shift)
        object.__setattr__(self, "scale_shift", ss)
        header = None
        if ss is not None:
            from ..artefacts import read_scale_shift

            header = read_scale_shift(ss, parse_mask=mask_from_dict).header
        # read once, here; not fields (equality, hashing and JSON use the paths)
        object.__setattr__(self, "_profile", loaded)
        object.__setattr__(self, "_scale_shift_meta", header)

    def load_profile(self) -> "Profile":
        """The profile (read when the config was built)."""
        return self._profile  # type: ignore[attr-defined]

    def _describe(self) -> str:
        src = f" '{self.profile}'" if isinstance(self.profile, str) else ""
        return f"BlockCache(threshold={self.threshold}, units={self.units!r}) with profile{src}"

    def _field_values(self) -> dict:
        out = super()._field_values()
        if not isinstance(self.profile, str):
            out["profile"] = self.profile.to_dict()
        return out

    @classmethod
    def _from_fields(cls, d: dict) -> "BlockCache":
        d = dict(d)
        if isinstance(d.get("profile"), dict):
            from ..artefacts import Profile, ProfileError

            try:
                d["profile"] = Profile.from_dict(d["profile"])
            except ProfileError as exc:
                raise ScheduleError(f"BlockCache.profile (an inline profile) is not valid: {exc}") from None
        return cls(**d)


def _shapes_in_meta(value: Any) -> list[tuple[int, ...]] | None:
    """``[[dims...], ...]`` or ``[[[dims...], dtype], ...]`` (a profile's recorded output
    shapes of one unit) → shapes; None when it is neither."""
    if not isinstance(value, list):
        return None
    out = []
    for entry in value:
        if isinstance(entry, list) and entry and isinstance(entry[0], list):
            entry = entry[0]
        if not isinstance(entry, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in entry):
            return None
        out.append(tuple(entry))
    return out


def _named(selector: str | tuple[str, ...]) -> tuple[str, ...]:
    return (selector,) if isinstance(selector, str) else tuple(selector)


@register_check(BlockCache)
def _check_block_cache(s: BlockCache, units: list[UnitInfo], model: ModelFacts) -> None:
    """The profile and the scale-shift checkpoint against the model they are used on."""
    from ..artefacts import feature_channels
    from ..errors import ArtefactMismatchError

    have = {u.name for u in units}
    kinds = {u.kind for u in units}
    skipped = [n for n in _named(s.units) if n not in have and n not in kinds and n in model.skipped]
    if skipped:
        raise UnknownUnitError(
            f"BlockCache.units = {s.units!r} names '{skipped[0]}', a module of this model that is not a unit: "
            f"{model.skipped[skipped[0]]}. Name units of this model instead (fxcache.units(model, ...) lists them)"
        )
    profile = s.load_profile()
    recorded = profile.meta.get("model_class")
    if recorded and model.model_class and recorded != model.model_class:
        raise ArtefactMismatchError(
            f"{s._describe()}: the profile was recorded on a {recorded}, but the schedule is applied to a "
            f"{model.model_class}; profile this model (fxcache.profile(model, run) or `fxcache profile`) and "
            f"build the BlockCache from that profile"
        )
    shapes = profile.meta.get("out_shapes")
    if isinstance(shapes, dict):
        for unit in select_units(units, s.units, what="BlockCache.units"):
            saved, here = shapes.get(unit.name), model.out_shapes.get(unit.name)
            if saved is None or here is None:
                continue
            saved_shapes = _shapes_in_meta(saved)
            if saved_shapes is None:
                raise ArtefactMismatchError(
                    f"{s._describe()}: the profile's meta['out_shapes'][{unit.name!r}] = {saved!r} is not a list "
                    f"of shapes; profile this model again"
                )
            saved = saved_shapes
            what = f"{s._describe()}: unit '{unit.name}'"
            if len(saved) != len(here):
                raise ArtefactMismatchError(
                    f"{what} was profiled with {len(saved)} outputs but this {model.model_class or 'model'} gives "
                    f"{len(here)}: the profile is of another model configuration; profile this model"
                )
            for k, (a, b) in enumerate(zip(saved, here)):
                if len(a) != len(b) or feature_channels(a) != feature_channels(b):
                    raise ArtefactMismatchError(
                        f"{what} was profiled with output {k} of shape {a} ({feature_channels(a)} channels) but "
                        f"this {model.model_class or 'model'} gives {b} ({feature_channels(b)} channels): the "
                        f"profile is of another model configuration; profile this model"
                    )
    meta = s._scale_shift_meta  # type: ignore[attr-defined]
    trained_for = meta.get("model_class") if meta else None
    if trained_for and model.model_class and trained_for != model.model_class:
        raise ArtefactMismatchError(
            f"BlockCache.scale_shift = '{s.scale_shift}': these scale-shift adapters were trained for a "
            f"{trained_for}, not a {model.model_class}: train adapters for this model with "
            f"fxcache.train_scale_shift(model, schedule, run, checkpoint=path)"
        )


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
    mask = Mask(table, tuple(u.name for u in chosen))
    meta = s._scale_shift_meta  # type: ignore[attr-defined]
    if meta is not None and meta.get("mask") is not None:
        from ..artefacts import check_trained_table, describe_schedule

        check_trained_table(
            meta["mask"],
            meta.get("num_steps"),
            mask.to_dict(),
            where=f"{s._describe()} and scale_shift = '{s.scale_shift}'",
            trained_for=describe_schedule(meta.get("schedule")),
        )
    return mask
