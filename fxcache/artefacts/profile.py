"""The data of a profile: how much each unit's output changes from step to step.

Pure data (numpy). A :class:`Profile` is what :class:`fxcache.schedules.BlockCache`
reads to place each unit's refresh steps (block caching paper, Eq. 6-7), and what the
timestep-aware loss weights of mask learning are computed from. Producing one (running
the model over seeds and prompts) is the profiler's job; this module only holds, checks,
saves, loads and plots the numbers.

Saved as one ``.safetensors`` file: the arrays as tensors, the unit names and ``meta``
as JSON in the file's metadata (key ``"fxcache.profile"``). No pickle anywhere.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import FxcacheError

__all__ = ["Profile", "ProfileError"]

_META_KEY = "fxcache.profile"
_FORMAT_VERSION = 1
_ARRAYS = ("l1rel", "cosine", "timesteps", "l1rel_std")


class ProfileError(FxcacheError, ValueError):
    """A profile whose arrays or names are inconsistent; the message names the field."""


def _as_array(name: str, value: Any, shape: tuple[int, ...] | None) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64)  # a copy: the profile owns its arrays
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"Profile.{name} must be an array of numbers; got {type(value).__name__} ({exc})") from None
    if shape is not None and arr.shape != shape:
        raise ProfileError(f"Profile.{name} has shape {arr.shape}; expected {shape}, the shape of l1rel / timesteps")
    arr.setflags(write=False)
    return arr


def _arrays_equal(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))


@dataclass(frozen=True, eq=False)
class Profile:
    """Per-step, per-unit change of the units' outputs, averaged over seeds/prompts.

    units:     unit names, one per column.
    l1rel:     ``[num_steps, num_units]``: ``|C(t) - C(t-1)|_1 / |C(t)|_1`` of the unit's
               output (its residual contribution ``C``), step ``t`` against step ``t-1``
               in denoising order (block caching paper, Eq. 6). Row 0 has no previous
               step: NaN (or 0). Values are >= 0; NaN elsewhere means "unknown" and the
               δ rule treats it as a change too large to reuse across.
    cosine:    ``[num_steps, num_units]`` cosine similarity of the same pair of outputs
               (row 0 NaN or 1), or None if not recorded.
    timesteps: ``[num_steps]`` the scheduler's timestep at each step (defaults to 0..T-1).
    meta:      JSON-serialisable facts: model class, seeds, prompts, scheduler, dtype...
    l1rel_std: optional ``[num_steps, num_units]`` standard deviation of ``l1rel`` over
               the samples averaged (drawn as a band by :meth:`plot`).
    """

    units: tuple[str, ...]
    l1rel: np.ndarray
    cosine: np.ndarray | None = None
    timesteps: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    l1rel_std: np.ndarray | None = None

    def __post_init__(self) -> None:
        units = self.units
        if isinstance(units, str) or not isinstance(units, Sequence):
            raise ProfileError(f"Profile.units must be a sequence of unit names; got {units!r}")
        units = tuple(units)
        if not units:
            raise ProfileError("Profile.units is empty; a profile needs at least one unit")
        bad = [u for u in units if not isinstance(u, str) or not u]
        if bad:
            raise ProfileError(f"Profile.units must be non-empty strings; got {bad[:5]!r}")
        if len(set(units)) != len(units):
            dup = sorted({u for u in units if units.count(u) > 1})
            raise ProfileError(f"Profile.units must be unique; repeated: {dup}")
        object.__setattr__(self, "units", units)

        l1 = _as_array("l1rel", self.l1rel, None)
        if l1.ndim != 2 or l1.shape[1] != len(units) or l1.shape[0] < 1:
            raise ProfileError(
                f"Profile.l1rel has shape {l1.shape}; expected (num_steps >= 1, num_units = {len(units)})"
            )
        if np.any(l1[~np.isnan(l1)] < 0):
            raise ProfileError("Profile.l1rel has negative values; a relative L1 change is >= 0 (or NaN at row 0)")
        if np.any(np.isinf(l1)):
            raise ProfileError("Profile.l1rel has infinite values; use NaN for 'unknown'")
        object.__setattr__(self, "l1rel", l1)
        shape = l1.shape
        if self.cosine is not None:
            object.__setattr__(self, "cosine", _as_array("cosine", self.cosine, shape))
        if self.l1rel_std is not None:
            object.__setattr__(self, "l1rel_std", _as_array("l1rel_std", self.l1rel_std, shape))
        ts = np.arange(shape[0], dtype=np.float64) if self.timesteps is None else self.timesteps
        object.__setattr__(self, "timesteps", _as_array("timesteps", ts, (shape[0],)))

        if not isinstance(self.meta, dict):
            raise ProfileError(f"Profile.meta must be a dict; got {type(self.meta).__name__}")
        try:
            meta = json.loads(json.dumps(self.meta))
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"Profile.meta must be JSON-serialisable (str keys, plain values): {exc}") from None
        object.__setattr__(self, "meta", meta)

    # ------------------------------------------------------------------ basics
    @property
    def num_steps(self) -> int:
        return int(self.l1rel.shape[0])

    @property
    def num_units(self) -> int:
        return len(self.units)

    def index(self, unit: str) -> int:
        """Column of ``unit``; a clear error naming close matches when it is absent."""
        try:
            return self.units.index(unit)
        except ValueError:
            import difflib

            close = difflib.get_close_matches(unit, self.units, n=5, cutoff=0.5)
            hint = f"; close matches: {close}" if close else ""
            raise ProfileError(
                f"unit '{unit}' is not in this profile ({len(self.units)} units{hint}); profile it first"
            ) from None

    def column(self, unit: str) -> np.ndarray:
        """``l1rel`` of one unit over the steps."""
        return self.l1rel[:, self.index(unit)]

    def select(self, units: Sequence[str]) -> "Profile":
        """A profile over a subset of the units (in the given order)."""
        cols = [self.index(u) for u in units]
        pick = lambda a: None if a is None else a[:, cols]  # noqa: E731
        return Profile(tuple(units), self.l1rel[:, cols], pick(self.cosine), self.timesteps, dict(self.meta), pick(self.l1rel_std))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Profile):
            return NotImplemented
        return (
            self.units == other.units
            and self.meta == other.meta
            and all(_arrays_equal(getattr(self, a), getattr(other, a)) for a in _ARRAYS)
        )

    def __hash__(self) -> int:
        return hash((self.units, self.l1rel.shape, np.nan_to_num(self.l1rel, nan=-1.0).tobytes()))

    def __repr__(self) -> str:
        model = self.meta.get("model") or self.meta.get("model_class")
        about = f", model={model!r}" if model else ""
        return f"Profile(units={len(self.units)}, steps={self.num_steps}{about})"

    # ------------------------------------------------------------ serialising
    def to_dict(self) -> dict:
        """Plain JSON data (NaN written as null), e.g. to inline a profile in a schedule."""

        def enc(a):
            if a is None:
                return None
            return [[None if math.isnan(x) else float(x) for x in row] for row in np.atleast_2d(a).tolist()]

        out = {"units": list(self.units), "l1rel": enc(self.l1rel), "meta": self.meta}
        out["timesteps"] = [None if math.isnan(x) else float(x) for x in self.timesteps.tolist()]
        if self.cosine is not None:
            out["cosine"] = enc(self.cosine)
        if self.l1rel_std is not None:
            out["l1rel_std"] = enc(self.l1rel_std)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        if not isinstance(d, dict):
            raise ProfileError(f"a profile dict is expected; got {type(d).__name__}")
        allowed = {"units", "l1rel", "cosine", "timesteps", "meta", "l1rel_std"}
        extra = sorted(set(d) - allowed)
        if extra:
            raise ProfileError(f"unknown profile fields {extra}; allowed: {sorted(allowed)}")
        if "units" not in d or "l1rel" not in d:
            raise ProfileError("a profile dict needs 'units' and 'l1rel'")

        if not isinstance(d["units"], (list, tuple)):
            raise ProfileError(f"a profile dict's 'units' must be a list of unit names; got {d['units']!r}")
        if not isinstance(d.get("meta") or {}, dict):
            raise ProfileError(f"a profile dict's 'meta' must be a dict; got {type(d['meta']).__name__}")

        def dec(name):
            a = d.get(name)
            if a is None:
                return None
            try:
                return np.array([[np.nan if x is None else x for x in row] for row in a], dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise ProfileError(f"a profile dict's '{name}' must be rows of numbers (null for NaN): {exc}") from None

        ts = d.get("timesteps")
        try:
            ts = None if ts is None else np.array([np.nan if x is None else x for x in ts], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"a profile dict's 'timesteps' must be a list of numbers: {exc}") from None
        return cls(
            units=tuple(d["units"]),
            l1rel=dec("l1rel"),
            cosine=dec("cosine"),
            timesteps=ts,
            meta=dict(d.get("meta") or {}),
            l1rel_std=dec("l1rel_std"),
        )

    def save(self, path: str | os.PathLike) -> str:
        """Write a ``.safetensors`` file (arrays) whose metadata holds units and meta as JSON."""
        from .store import write_artefact

        tensors = {a: np.ascontiguousarray(getattr(self, a)) for a in _ARRAYS if getattr(self, a) is not None}
        header = {"version": _FORMAT_VERSION, "units": list(self.units), "meta": self.meta}
        return write_artefact(path, key=_META_KEY, header=header, tensors=tensors)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        """Read a profile written by :meth:`save`. Any problem with the file is a
        :class:`~fxcache.errors.CheckpointError` naming it; the declared shapes are checked
        before any array is read."""
        from .store import read_artefact

        art = read_artefact(
            path,
            key=_META_KEY,
            what="profile",
            version=_FORMAT_VERSION,
            missing_hint="record one with the profiler (fxcache.profile, or `fxcache profile`) first",
        )
        units = art.field(
            "units",
            lambda v: isinstance(v, list) and bool(v) and all(isinstance(u, str) and u for u in v),
            "a non-empty list of unit names",
        )
        meta = art.field("meta", lambda v: isinstance(v, dict), "a JSON object", default={})
        stored = art.tensor("l1rel")
        if len(stored) != 2 or stored[1] != len(units) or stored[0] < 1:
            raise art.error(
                f"tensor 'l1rel' has shape {stored} but the metadata names {len(units)} units; expected "
                f"(num_steps >= 1, {len(units)})",
                "the file is damaged: profile again",
            )
        present = ["l1rel"]
        for name in _ARRAYS[1:]:
            if name in art.tensors:
                expected = stored[:1] if name == "timesteps" else stored
                art.tensor(name, expected, why=f", the {'steps' if name == 'timesteps' else 'shape'} of 'l1rel'")
                present.append(name)
        arrays = art.load(present)
        try:
            return cls(
                units=tuple(units),
                l1rel=arrays["l1rel"],
                cosine=arrays.get("cosine"),
                timesteps=arrays.get("timesteps"),
                meta=meta,
                l1rel_std=arrays.get("l1rel_std"),
            )
        except ProfileError as exc:
            raise art.error(str(exc), "the file is damaged: profile again") from None

    # --------------------------------------------------------------- plotting
    def plot(self, path: str | os.PathLike | None = None, units: Sequence[str] | None = None, *, max_lines: int = 16):
        """Draw the change per unit over the steps (block caching paper, Fig. 2b).

        One line per unit (with a ±std band when ``l1rel_std`` is present) for up to
        ``max_lines`` units, a heat map (units × steps) beyond; a second panel shows the
        cosine similarity when recorded. Saves a PNG at ``path`` when given; returns the
        matplotlib ``Figure``. Uses the Agg canvas directly, so no global backend is set.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        names = list(self.units if units is None else units)
        cols = [self.index(u) for u in names]
        steps = np.arange(self.num_steps)
        panels = 2 if self.cosine is not None else 1
        fig = Figure(figsize=(9, 3.6 * panels), constrained_layout=True)
        FigureCanvasAgg(fig)
        axes = [fig.add_subplot(panels, 1, i + 1) for i in range(panels)]
        title = "change of each unit's output per step"
        model = self.meta.get("model") or self.meta.get("model_class")
        if model:
            title += f" ({model})"

        def draw(ax, data, std, label):
            if len(cols) <= max_lines:
                for name, c in zip(names, cols):
                    (line,) = ax.plot(steps, data[:, c], label=name, linewidth=1.2)
                    if std is not None:
                        ax.fill_between(
                            steps, data[:, c] - std[:, c], data[:, c] + std[:, c], color=line.get_color(), alpha=0.15
                        )
                ax.legend(fontsize=6, ncol=2 if len(cols) > 8 else 1, loc="best")
                ax.set_ylabel(label)
            else:
                img = ax.imshow(data[:, cols].T, aspect="auto", interpolation="nearest", cmap="viridis")
                fig.colorbar(img, ax=ax, label=label)
                ax.set_ylabel("unit")
                tick = max(1, len(cols) // 24)
                ax.set_yticks(range(0, len(cols), tick))
                ax.set_yticklabels([names[i] for i in range(0, len(cols), tick)], fontsize=5)
            ax.set_xlabel("denoising step")

        draw(axes[0], self.l1rel, self.l1rel_std, "relative L1 change")
        axes[0].set_title(title)
        if self.cosine is not None:
            draw(axes[1], self.cosine, None, "cosine similarity to previous step")
        if path is not None:
            path = os.fspath(path)
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            from .store import atomic_path

            with atomic_path(path) as tmp:  # the format follows the extension, which tmp keeps
                fig.savefig(tmp, dpi=120)
        return fig
