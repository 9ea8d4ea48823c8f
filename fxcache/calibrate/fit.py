"""Calibration for the caching policies whose decision comes from a profile run:
MagCache's magnitude ratios and TeaCache's rescaling polynomial.

:func:`profile_magnitudes` records, besides what :func:`fxcache.profile` records, the
magnitude of the residual contribution of the selected units at every step (a statistic
the profiler computes per step but does not keep); :func:`fit_magcache` turns it into
MagCache's per-step magnitude ratios::

    run = lambda m, seed: generate(m, num_steps=20, num_samples=4, seed=seed)
    prof = fxcache.calibrate.fit.profile_magnitudes(dit, run, seeds=(0, 1))
    cached = fxcache.compile(dit, fxcache.MagCache(0.1, ratios=fxcache.fit_magcache(prof)), num_steps=20)

:func:`profile_teacache` records, per step, the relative L1 change of the first block's
timestep-modulated input and of the model output; :func:`fit_teacache` fits the
polynomial from the one to the other (``numpy.polyfit``), as TeaCache's authors did::

    coefficients = fxcache.fit_teacache(fxcache.calibrate.fit.profile_teacache(dit, run))
    cached = fxcache.compile(dit, fxcache.TeaCache(0.2, coefficients=coefficients))
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree

from ..analyze.units import find_units
from ..artefacts import Profile, ProfileError
from ..capture import capture, flatten_call, signature_of
from ..dropin import DropIn
from ..schedules import fora_units
from .profiler import ProfileRecorder, recording_graph

__all__ = ["profile_magnitudes", "fit_magcache", "profile_teacache", "fit_teacache"]


def profile_magnitudes(
    model: torch.nn.Module, run: Callable[[torch.nn.Module, int], Any], *, seeds: Sequence[int] = (0, 1, 2)
) -> Profile:
    """:func:`fxcache.profile` of every unit (same ``run`` and ``seeds``) plus
    ``meta["magnitude"]``: per step, the L2 norm of the concatenated residual
    contributions of what MagCache reuses (the attention and MLP sublayers of the
    transformer blocks, Flux single blocks' branches: FORA's units), mean over seeds."""
    seeds = list(seeds)
    if not seeds:
        raise ProfileError("profile_magnitudes(seeds=...) is empty; give at least one seed")
    recorder = ProfileRecorder(model, None)
    l1s, coss, mags, steps = [], [], [], None
    for seed in seeds:
        recorder.start()
        run(recorder, seed)
        l1, cos, ts = recorder.finish()
        rows = torch.stack([r.to("cpu") for r in recorder._rows]).numpy()  # [steps, units, 5]: a2 at index 3
        entry = next(iter(recorder._entries.values()))
        names = recorder.unit_names
        cols = [names.index(u.name) for u in fora_units(entry.unitset.infos()) if u.name in names]
        if not cols:
            raise ProfileError(f"{type(model).__name__} has no attention/MLP sublayers of transformer blocks to measure")
        rows = rows[:, cols]
        if mags and rows.shape[0] != len(mags[0]):
            raise ProfileError(f"seed {seed} called the model {rows.shape[0]} times, seed {seeds[0]} {len(mags[0])} times")
        mags.append(np.sqrt(rows[..., 3].sum(axis=1)))
        l1s.append(l1)
        coss.append(cos)
        steps = ts if steps is None else steps
    return Profile(
        units=recorder.unit_names,
        l1rel=np.stack(l1s).mean(axis=0),
        cosine=np.stack(coss).mean(axis=0),
        timesteps=steps,
        meta={
            "model_class": type(model).__name__,
            "seeds": [int(s) for s in seeds],
            "num_steps": int(len(mags[0])),
            "magnitude": [float(x) for x in np.stack(mags).mean(axis=0)],
            "metric": "magnitude = |concat of the units' residual contributions C(t)|_2, mean over seeds",
        },
    )


def fit_magcache(profile: Profile) -> tuple[float, ...]:
    """MagCache's magnitude ratios from a profile of :func:`profile_magnitudes`:
    ``ratios[t] = magnitude[t] / magnitude[t-1]`` (``ratios[0] = 1``), one per step."""
    mag = profile.meta.get("magnitude") if isinstance(profile, Profile) else None
    if not isinstance(mag, list) or not mag or not all(isinstance(x, (int, float)) for x in mag):
        raise ProfileError(
            "fit_magcache needs a profile with per-step magnitudes (meta['magnitude']); record one with "
            "fxcache.calibrate.fit.profile_magnitudes(model, run, seeds=...)"
        )
    m = np.asarray(mag, dtype=np.float64)
    if np.any(~np.isfinite(m)) or np.any(m[:-1] <= 0):
        raise ProfileError("the profile's magnitudes must be finite and > 0 to form ratios")
    return (1.0,) + tuple(float(x) for x in m[1:] / m[:-1])


# ------------------------------------------------------------------------- TeaCache
class _TeaRecorder(DropIn):
    """Runs the captured graph of ``model``, also returning the first block's
    timestep-modulated input (TeaCache's probe), and records per call the relative L1
    change of that input and of the model's (first) output against the previous call:
    ``|a_t - a_{t-1}|_1 / |a_{t-1}|_1``, in float64 (the statistic the step graphs
    compute, with the previous step as the denominator)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self._entries: dict = {}
        self.start()

    def start(self) -> None:
        self._prev = None
        self.rows: list = []

    def _entry(self, flat, spec):
        sig = signature_of(flat, spec)
        if sig not in self._entries:
            from ..rewrite.adaptive import probe_values
            from ..schedules import TeaCache, adaptive_policy

            args, kwargs = pytree.tree_unflatten(flat, spec)
            captured = capture(self.model, args, kwargs)
            unitset = find_units(captured.gm)
            policy = adaptive_policy(TeaCache(0.0), unitset.infos())
            (probe, _), = probe_values(captured.gm, unitset, policy)
            gm, n = recording_graph(captured.gm, [probe])
            self._entries[sig] = (captured, gm, n)
        return self._entries[sig]

    def forward(self, *args, **kwargs):
        flat, spec = flatten_call(self.model, args, kwargs)
        captured, gm, n = self._entry(flat, spec)
        with torch.no_grad():
            outs = gm(*flat)
        out = next(o for o in outs[:n] if isinstance(o, torch.Tensor))
        now = (outs[n].detach().double(), out.detach().double())
        if self._prev is None:
            self.rows.append((float("nan"), float("nan")))
        else:
            self.rows.append(tuple(
                float(((a - b).abs().sum() / b.abs().sum()).item()) for a, b in zip(now, self._prev)
            ))
        self._prev = now
        return pytree.tree_unflatten(list(outs[:n]), captured.out_spec)


def profile_teacache(
    model: torch.nn.Module, run: Callable[[torch.nn.Module, int], Any], *, seeds: Sequence[int] = (0, 1, 2)
) -> Profile:
    """What :func:`fit_teacache` fits: per seed and step, the relative L1 change of the
    first block's timestep-modulated input and of the model output since the previous
    step. ``run(m, seed)`` runs one generation with ``m`` in place of the model (as for
    :func:`fxcache.profile`). The profile's two columns (``teacache.input``,
    ``teacache.output``) are the means over seeds; ``meta["teacache"]`` keeps every pair."""
    seeds = list(seeds)
    if not seeds:
        raise ProfileError("profile_teacache(seeds=...) is empty; give at least one seed")
    recorder = _TeaRecorder(model)
    per_seed = []
    for seed in seeds:
        recorder.start()
        run(recorder, seed)
        if not recorder.rows:
            raise ProfileError("the run never called the model; run(model, seed) must call it once per step")
        if per_seed and len(recorder.rows) != len(per_seed[0]):
            raise ProfileError(f"seed {seed} called the model {len(recorder.rows)} times, seed {seeds[0]} "
                               f"{len(per_seed[0])} times")
        per_seed.append(list(recorder.rows))
    arr = np.asarray(per_seed, dtype=np.float64)  # [seeds, steps, 2]
    return Profile(
        units=("teacache.input", "teacache.output"),
        l1rel=arr.mean(axis=0),  # row 0 (no previous step) stays NaN
        meta={
            "model_class": type(model).__name__,
            "seeds": [int(s) for s in seeds],
            "teacache": {"input": arr[..., 0].tolist(), "output": arr[..., 1].tolist()},
            "metric": "teacache: |a_t - a_(t-1)|_1 / |a_(t-1)|_1 of the first block's modulated input and of "
            "the model output (denominator: the previous step)",
        },
    )


def fit_teacache(profile: Profile, degree: int = 4) -> tuple[float, ...]:
    """TeaCache's rescaling polynomial, fitted by least squares (``numpy.polyfit``) from
    the modulated-input change to the output change over every seed and step of a
    :func:`profile_teacache` profile; coefficients highest power first (TeaCache's order).
    ``degree`` 4 as TeaCache's published fits."""
    t = profile.meta.get("teacache") if isinstance(profile, Profile) else None
    if not isinstance(t, dict) or "input" not in t or "output" not in t:
        raise ProfileError(
            "fit_teacache needs a profile of fxcache.calibrate.fit.profile_teacache(model, run, seeds=...) "
            "(meta['teacache'])"
        )
    x = np.asarray(t["input"], dtype=np.float64).reshape(-1)
    y = np.asarray(t["output"], dtype=np.float64).reshape(-1)
    ok = np.isfinite(x) & np.isfinite(y)
    if not isinstance(degree, int) or degree < 1:
        raise ProfileError(f"fit_teacache(degree={degree!r}): an integer >= 1")
    if ok.sum() <= degree:
        raise ProfileError(f"fit_teacache: {int(ok.sum())} finite samples cannot fit a polynomial of degree {degree}")
    return tuple(float(c) for c in np.polyfit(x[ok], y[ok], degree))
