"""Adaptive schedules: the step kind is chosen at run time from a statistic computed on
the device. Pure Python (no torch): a config lowers to

- a two-row periodic :class:`~.mask.Mask` over the units it may reuse: row 0 computes
  them all (the *full* kind, which also writes every cache slot the other kind reads),
  row 1 reuses them all (the *reuse* kind). Liveness across steps (the rewrite's
  ``solve_steps``) then builds exactly these two step graphs, and a full step may be
  followed by any number of reused steps;
- an :class:`AdaptivePolicy`: what the statistic pass (:mod:`fxcache.rewrite.adaptive`)
  measures and what the runtime decides from it.

**The one-step lag.** Each step graph computes the statistic of the step it runs and
writes, into a static state buffer, whether the *next* step may reuse; the runtime
copies that flag to the host without blocking and reads it when the next step is
called. A decision made inside the graph for the *same* step would need a control-flow
op (``torch.cond``), whose predicate inductor evaluates on the host (``.item()`` in the
generated wrapper: a device sync per step) and which CUDA graphs cannot capture. See the
docs/schedules.md, "Adaptive caching".

Host-side limits on top of the device's flag, common to every policy: the first
``first_steps`` steps and the last ``last_steps`` steps compute everything, and at most
``max_reuse`` consecutive steps reuse (None: no limit).

==================  ==============================================  =====================
schedule            follows                                         reuses
==================  ==============================================  =====================
FirstBlockCache     FBCache (ParaAttention), diffusers'              one residual span over
                    FirstBlockCache                                  the blocks after the
                                                                     probe (or their
                                                                     sublayers)
DBCache             cache-dit's DBCache (Fn probe blocks, Bn         the span between them
                    trailing blocks)
AdaptiveDeepCache   DeepCache (deepcache.txt) with an adaptive      ``skip_branch.{branch}``
                    refresh (fxcache)
TeaCache            TeaCache (Liu et al. 2025), polynomial fitted    one residual span over
                    by fxcache.fit_teacache                          every block (or their
                                                                     sublayers)
==================  ==============================================  =====================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..plan import UnitInfo
import math

from ._validate import UnknownUnitError, _bad, _check_int, _check_real, _Config, _is_real, _kinds_found
from .deepcache import skip_branches
from .fora import fora_units
from .mask import Mask
from .registry import _serialisable, register_lowering, register_policy
from .spans import BLOCK_KINDS, block_units, span_name

__all__ = ["AdaptivePolicy", "FirstBlockCache", "DBCache", "AdaptiveDeepCache", "TeaCache", "BLOCK_KINDS",
           "REUSE_FORMS", "reused_blocks"]

#: how the transformer schedules reuse blocks: ``"span"``: one residual over the run of
#: blocks (:mod:`.spans`, the published form of FBCache, TeaCache, MagCache, DBCache);
#: ``"sublayers"``: FORA's attention/MLP units of each block (the current adaLN gates
#: applied to cached branch outputs); ``"auto"``: spans, except on U-Nets, whose
#: transformer blocks sit inside the U-Net's stages (no chain of blocks to span)
REUSE_FORMS = ("auto", "span", "sublayers")
_UNET_KINDS = {"down_block", "up_block", "mid_block", "resnet", "skip_branch"}


def _check_reuse(cls: str, s) -> None:
    if s.reuse not in REUSE_FORMS:
        raise _bad(cls, "reuse", s.reuse, "'auto', 'span' (one residual over the blocks) or 'sublayers' "
                                         "(FORA's attention/MLP units of each block)")


def reused_blocks(cls: str, reuse: str, blocks: Sequence[UnitInfo], units: Sequence[UnitInfo]) -> list[str]:
    """The units a transformer schedule reuses over the run of blocks ``blocks`` (a
    contiguous slice of the model's blocks): one span, or their FORA sublayers."""
    if not blocks:
        raise UnknownUnitError(f"{cls}: no transformer blocks are left to reuse")
    unet = bool(_UNET_KINDS & {u.kind for u in units})
    if reuse == "span" or (reuse == "auto" and not unet):
        if unet:
            raise UnknownUnitError(
                f"{cls}(reuse='span'): this model's transformer blocks sit inside U-Net stages, not in one chain "
                f"that a residual span can cover; use reuse='sublayers' (or 'auto')"
            )
        return [span_name(blocks[0].name, blocks[-1].name)]
    names = {b.name for b in blocks}
    rest = [u.name for u in fora_units(units) if (u.block or u.parent) in names]
    if not rest:
        raise UnknownUnitError(
            f"{cls} found no attention/MLP sublayers in the blocks {sorted(names)} to reuse "
            f"(unit kinds found: {_kinds_found(units)})"
        )
    return rest


@dataclass(frozen=True)
class AdaptivePolicy:
    """What an adaptive schedule asks of the statistic pass and of the runtime.

    name:       the schedule's class name (for messages).
    statistic:  ``"rel_l1"``: ``sum_i |v_i - ref_i|_1 / sum_i |ref_i|_1`` over the probe
                values ``v_i`` of the current step and ``ref_i`` stored at the last fully
                computed step (infinite when there is no reference yet).
                ``"rescaled_acc"`` (TeaCache): ``p(rel)`` with ``rel`` the relative L1
                change of the probe since the *previous* step and ``p`` the polynomial
                ``coefficients``; ``acc`` sums ``p(rel)`` over the reused steps since the
                last full step (0 at a full step), and the statistic is ``acc + p(rel)``,
                the sum the next step would reach if it changed as much as this one.
    probe:      what is measured: ``("residual", (block, ...))``: each output of the
                last of these blocks minus the input of the first one that its residual
                adds bring back (found by data flow: each stream of a two-stream block
                with its own input); ``("inputs", (unit,))``: the tensors that enter the
                unit's region from outside (feature maps computed at every step);
                ``("modulated", (block,))``: the timestep-modulated input of the block
                (its adaLN ``norm1`` output, or a plain ``norm1`` output after the
                block's timestep-dependent scale and shift, as PixArt's
                ``ada_norm_single``); see :mod:`fxcache.rewrite.adaptive`.
    threshold:  the next step may reuse when the statistic is below it (``<``).
    first_steps, last_steps, max_reuse: the host-side limits (module doc).
    num_steps:  the generation's number of steps, when known (``last_steps`` needs it).
    """

    name: str
    statistic: str
    probe: tuple
    threshold: float
    first_steps: int
    last_steps: int
    max_reuse: int | None
    num_steps: int | None = None
    coefficients: tuple = ()  # "rescaled_acc" only: the rescaling polynomial, highest power first

    def forced_full(self, step: int, run: int) -> bool:
        """Whether the host limits alone make ``step`` compute everything (``run``: the
        consecutive reused steps just before it)."""
        if step < self.first_steps:
            return True
        if self.last_steps and self.num_steps is not None and step >= self.num_steps - self.last_steps:
            return True
        return self.max_reuse is not None and run >= self.max_reuse


def _check_limits(cls: str, s) -> None:
    object.__setattr__(s, "threshold", _check_real(cls, "threshold", s.threshold, 0.0))
    first = _check_int(cls, "first_steps", s.first_steps, 1)
    object.__setattr__(s, "first_steps", first)
    object.__setattr__(s, "last_steps", _check_int(cls, "last_steps", s.last_steps, 0))
    object.__setattr__(s, "max_reuse", _check_int(cls, "max_reuse", s.max_reuse, 0, optional=True))


def _needs_num_steps(cls: str, s, num_steps: int | None) -> None:
    if s.last_steps and num_steps is None:
        raise _bad(
            cls, "last_steps", s.last_steps,
            "0 when the number of steps is unknown; pass num_steps to fxcache.compile to compute the last steps",
        )


def _two_rows(names: Sequence[str]) -> Mask:
    n = len(names)
    return Mask(((True,) * n, (False,) * n), tuple(names), periodic=True)


# ------------------------------------------------------------------ FirstBlockCache
@_serialisable
@dataclass(frozen=True)
class FirstBlockCache(_Config):
    """First-block cache (FBCache, ParaAttention; diffusers' ``FirstBlockCache``): the
    first ``probe`` transformer block(s) always run; when the relative L1 change of their
    residual (each output of the last probe block minus the input of the first that its
    residual adds bring back, by data flow: on Flux the text output minus the text input
    and the image output minus the image input) since the last fully computed step is
    below ``threshold``, the rest is reused.

    Reused (``reuse="span"``, the default on transformers) is one residual span over every
    block after the probe (:mod:`.spans`): the current probe output plus the residual
    ``out - in`` of the remaining blocks stored at the last full step, per stream, which
    is FBCache's "add the cached residual of the remaining blocks". ``reuse="sublayers"``
    reuses the attention and MLP sublayers (Flux single blocks: the residual branch) of
    those blocks instead, as FORA: the current adaLN gates apply to the cached branch
    outputs, at the memory cost of two or three tensors per block.

    Decided one step late (module doc): the statistic of step k, measured against the
    probe residual stored at the last full step, chooses the kind of step k+1. At the
    first step there is no reference, so the step after it is computed too.

    threshold:   >= 0; 0 computes every step. Typical: 0.05-0.2.
    probe:       number of leading blocks always computed (>= 1).
    first_steps: steps computed at the start of a generation (>= 1).
    last_steps:  steps computed at the end (needs ``num_steps``).
    max_reuse:   most consecutive reused steps (None: no limit).
    reuse:       ``"auto"`` (spans on transformers, sublayers on U-Nets), ``"span"`` or
                 ``"sublayers"`` (:data:`REUSE_FORMS`).
    """

    threshold: float
    probe: int = 1
    first_steps: int = 1
    last_steps: int = 0
    max_reuse: int | None = None
    reuse: str = "auto"

    def __post_init__(self) -> None:
        _check_limits("FirstBlockCache", self)
        object.__setattr__(self, "probe", _check_int("FirstBlockCache", "probe", self.probe, 1))
        _check_reuse("FirstBlockCache", self)


def _probe_split(cls: str, probe: int, tail: int, reuse: str, units: list[UnitInfo]) -> tuple[list[str], list[str]]:
    """FirstBlockCache and DBCache: the ``probe`` leading blocks always run, the last
    ``tail`` blocks always run, the blocks between are reused."""
    blocks = block_units(units)
    if not blocks:
        raise UnknownUnitError(
            f"{cls} probes the first transformer block(s); this model has none (unit kinds found: "
            f"{_kinds_found(units)}). Use AdaptiveDeepCache (U-Nets) instead."
        )
    if probe + tail >= len(blocks):
        what = "probe" if cls == "FirstBlockCache" else "Fn + Bn"
        raise _bad(cls, "probe" if cls == "FirstBlockCache" else "Fn", probe,
                   f"such that {what} is less than the model's {len(blocks)} transformer blocks (Bn = {tail})")
    middle = blocks[probe: len(blocks) - tail]
    return [u.name for u in blocks[:probe]], reused_blocks(cls, reuse, middle, units)


# -------------------------------------------------------------------------- DBCache
@_serialisable
@dataclass(frozen=True)
class DBCache(_Config):
    """Dual-block cache (cache-dit's DBCache): the first ``Fn`` transformer blocks always
    run and are the probe (the relative L1 change of their residual since the last full
    step, as :class:`FirstBlockCache` with ``probe=Fn``); the last ``Bn`` blocks always
    run too, refining the approximate hidden states; the blocks between are one residual
    span (:mod:`.spans`), reused while the change stays below ``threshold``.

    ``DBCache(1, 0, t)`` is ``FirstBlockCache(t)``. Decided one step late, like every
    adaptive schedule here (module doc).

    Fn:        leading blocks computed and probed (>= 1).
    Bn:        trailing blocks computed (>= 0).
    threshold: >= 0; 0 computes every step (cache-dit uses 0.05-0.12).
    first_steps, last_steps, max_reuse: as for :class:`FirstBlockCache`.
    """

    Fn: int
    Bn: int
    threshold: float
    first_steps: int = 1
    last_steps: int = 0
    max_reuse: int | None = None

    def __post_init__(self) -> None:
        _check_limits("DBCache", self)
        object.__setattr__(self, "Fn", _check_int("DBCache", "Fn", self.Fn, 1))
        object.__setattr__(self, "Bn", _check_int("DBCache", "Bn", self.Bn, 0))


def _probe_rule(s) -> tuple[str, int, int, str]:
    """FirstBlockCache and DBCache are one rule: (name, probe blocks, trailing blocks, reuse form)."""
    if isinstance(s, DBCache):
        return "DBCache", s.Fn, s.Bn, "span"
    return "FirstBlockCache", s.probe, 0, s.reuse


def _lower_probe_rule(s, units: list[UnitInfo], num_steps: int | None) -> Mask:
    name, probe, tail, reuse = _probe_rule(s)
    _needs_num_steps(name, s, num_steps)
    return _two_rows(_probe_split(name, probe, tail, reuse, units)[1])


def _policy_probe_rule(s, units: list[UnitInfo], num_steps: int | None) -> AdaptivePolicy:
    name, probe, tail, reuse = _probe_rule(s)
    blocks, _ = _probe_split(name, probe, tail, reuse, units)
    return AdaptivePolicy(
        name, "rel_l1", ("residual", tuple(blocks)), s.threshold, s.first_steps, s.last_steps, s.max_reuse, num_steps,
    )


for _cls in (FirstBlockCache, DBCache):
    register_lowering(_cls)(_lower_probe_rule)
    register_policy(_cls)(_policy_probe_rule)


# ---------------------------------------------------------------- AdaptiveDeepCache
@_serialisable
@dataclass(frozen=True)
class AdaptiveDeepCache(_Config):
    """Adaptive DeepCache (DeepCache, deepcache.txt, with an adaptive refresh; fxcache's
    own: no peer caches U-Nets adaptively): the shallow layers run at every step; the deep
    part behind skip branch ``branch`` is refreshed when the relative L1 change of the
    shallow features entering it, since the last full step, reaches ``threshold``, and
    reused otherwise.

    Decided one step late (see :class:`FirstBlockCache`); the step after the first is
    computed (no reference yet).

    threshold: >= 0; 0 computes every step.
    branch:    DeepCache's skip branch (0 = shallowest: the cheapest partial step).
    first_steps, last_steps, max_reuse: as for :class:`FirstBlockCache`.
    """

    threshold: float
    branch: int
    first_steps: int = 1
    last_steps: int = 0
    max_reuse: int | None = None

    def __post_init__(self) -> None:
        _check_limits("AdaptiveDeepCache", self)
        object.__setattr__(self, "branch", _check_int("AdaptiveDeepCache", "branch", self.branch, 0))


def _adc_unit(s: AdaptiveDeepCache, units: list[UnitInfo]) -> str:
    branches = skip_branches(units)
    if not branches:
        raise UnknownUnitError(
            f"AdaptiveDeepCache applies to U-Nets with skip connections; this model has no skip_branch units "
            f"(unit kinds found: {_kinds_found(units)}). Use FirstBlockCache for transformers."
        )
    if s.branch not in branches:
        raise _bad(
            "AdaptiveDeepCache", "branch", s.branch,
            f"one of this model's skip branches {list(branches)} (0 = shallowest skip connection)",
        )
    return branches[s.branch].name


@register_lowering(AdaptiveDeepCache)
def _lower_adc(s: AdaptiveDeepCache, units: list[UnitInfo], num_steps: int | None) -> Mask:
    _needs_num_steps("AdaptiveDeepCache", s, num_steps)
    return _two_rows([_adc_unit(s, units)])


@register_policy(AdaptiveDeepCache)
def _policy_adc(s: AdaptiveDeepCache, units: list[UnitInfo], num_steps: int | None) -> AdaptivePolicy:
    return AdaptivePolicy(
        "AdaptiveDeepCache", "rel_l1", ("inputs", (_adc_unit(s, units),)), s.threshold, s.first_steps,
        s.last_steps, s.max_reuse, num_steps,
    )


# ------------------------------------------------------------------------- TeaCache
@_serialisable
@dataclass(frozen=True)
class TeaCache(_Config):
    """TeaCache (Liu et al. 2025, "Timestep Embedding Tells: It's Time to Cache for Video
    Diffusion Model"): the timestep-modulated input of the first block (its adaLN
    ``norm1`` output; for PixArt's ``ada_norm_single`` blocks, whose ``norm1`` is a plain
    LayerNorm, that output after the block's ``* (1 + scale_msa) + shift_msa``; a model
    without one, as SD's U-Net, is refused) is compared with the previous step's; its relative L1 change,
    rescaled by the polynomial ``coefficients`` (fitted by :func:`fxcache.fit_teacache`
    from a profile run), is accumulated over the reused steps since the last full step;
    every block is reused while the accumulated value stays below ``threshold``: one
    residual span over all blocks (``reuse="span"``, the default on transformers:
    TeaCache's "previous residual" added to the current input of the first block), or
    FORA's attention and MLP sublayers of every block (``reuse="sublayers"``).

    Decided one step late (module doc): after step k the statistic is the accumulated
    value plus step k's rescaled change, i.e. what step k+1 would accumulate if it
    changed as much as step k; the next step reuses when it is below ``threshold``. The
    step after the first is computed (no previous step to compare with).

    threshold:    >= 0; 0 computes every step. TeaCache uses 0.1-0.3 on its models.
    coefficients: the rescaling polynomial, highest power first (``numpy.polyval``
                  order, as TeaCache's published coefficients); None: no rescaling
                  (``p(x) = x``).
    first_steps, last_steps, max_reuse: as for :class:`FirstBlockCache` (TeaCache
                  computes the first and the last step: ``last_steps=1``).
    reuse:        as for :class:`FirstBlockCache`.
    """

    threshold: float
    coefficients: tuple[float, ...] | None = None
    first_steps: int = 1
    last_steps: int = 0
    max_reuse: int | None = None
    reuse: str = "auto"

    def __post_init__(self) -> None:
        _check_limits("TeaCache", self)
        _check_reuse("TeaCache", self)
        c = self.coefficients
        if c is None:
            return
        allowed = "a non-empty sequence of finite numbers (highest power first), e.g. fxcache.fit_teacache(profile)"
        if isinstance(c, (str, bytes)) or not isinstance(c, Sequence) or not c:
            raise _bad("TeaCache", "coefficients", c, allowed)
        if not all(_is_real(x) and math.isfinite(float(x)) for x in c):
            raise _bad("TeaCache", "coefficients", c, allowed)
        object.__setattr__(self, "coefficients", tuple(float(x) for x in c))


def _teacache_split(s: TeaCache, units: list[UnitInfo]) -> tuple[str, list[str]]:
    blocks = block_units(units)
    if not blocks or not fora_units(units):
        raise UnknownUnitError(
            f"TeaCache probes the first transformer block and reuses the blocks; this model has none (unit kinds "
            f"found: {_kinds_found(units)}). Use AdaptiveDeepCache for U-Nets."
        )
    return blocks[0].name, reused_blocks("TeaCache", s.reuse, blocks, units)


@register_lowering(TeaCache)
def _lower_teacache(s: TeaCache, units: list[UnitInfo], num_steps: int | None) -> Mask:
    _needs_num_steps("TeaCache", s, num_steps)
    return _two_rows(_teacache_split(s, units)[1])


@register_policy(TeaCache)
def _policy_teacache(s: TeaCache, units: list[UnitInfo], num_steps: int | None) -> AdaptivePolicy:
    probe, _ = _teacache_split(s, units)
    return AdaptivePolicy(
        "TeaCache", "rescaled_acc", ("modulated", (probe,)), s.threshold, s.first_steps, s.last_steps,
        s.max_reuse, num_steps, s.coefficients if s.coefficients is not None else (1.0, 0.0),
    )
