"""Stage 3, schedule: the schedule configs and their lowering to an explicit :class:`Mask`.

Pure Python (no torch). A schedule is a small frozen dataclass, validated on
construction and serialisable to JSON (``to_json()`` / :func:`schedule_from_json`).
Every schedule *lowers* to a :class:`Mask`, the boolean table ``table[step][i]``
(True: ``units[i]`` is computed at that step and refreshes its cache; False: its cached
value is read)::

    mask = lower(schedule, unit_infos, num_steps, model=ModelFacts.of(unitset, "DiTTransformer2DModel"))
    plan = Plan([info_by_name[n] for n in mask.units], mask.table, periodic=mask.periodic, ...)

Lowering dispatches on the config type through a registry (:func:`register_lowering`),
so a new method is a new dataclass plus one registered function. Lowering is pure: a
config that refers to a file (a profile, a scale-shift checkpoint) reads it when it is
built. :class:`ModelFacts` (model class, unit shapes, modules that are not units) let
a registered check (:func:`register_check`) refuse artefacts recorded on another model.

=================  ==========================================  ==============================
schedule           paper                                       units it selects
=================  ==========================================  ==============================
DeepCache          deepcache.txt Eq. 6-7                       ``skip_branch.{branch}``
FORA               fora.txt Sec. 3.2                           attention/MLP sublayers of
                                                               transformer blocks (and Flux
                                                               single-block ``.branch``)
BlockCache         block-caching.txt Eq. 6-7                   units of given kinds / names
LearnedMask        timestep-aware-block-masking.txt            (learned by fxcache.learn_mask)
FirstBlockCache    FBCache (ParaAttention); adaptive           residual span after the probe
DBCache            cache-dit's DBCache; adaptive               span between Fn and Bn blocks
AdaptiveDeepCache  DeepCache, adaptive refresh (fxcache)       ``skip_branch.{branch}``
TeaCache           TeaCache; adaptive, fitted polynomial       residual span over all blocks
MagCache           MagCache; static table from calibrated      residual span over all blocks
                   magnitude ratios
Mask               -                                           the units it names
=================  ==========================================  ==============================

Modules: ``_validate`` (errors, field checks, unit selection, the JSON base),
``registry`` (dispatch, JSON), ``mask`` (:class:`Mask`, :func:`rectify`), ``lowering`` (:func:`lower`,
:func:`to_plan`: above both, so that neither imports the other), ``spans`` (residual spans),
and one module per method: ``deepcache``, ``fora``, ``block_cache``, ``learned_mask``;
``adaptive`` holds the adaptive schedules (two-row mask + :class:`AdaptivePolicy`);
``magcache``: MagCache, whose decision depends only on calibrated ratios (a static mask).
"""

from ._validate import ScheduleError, UnknownUnitError, select_units
from .registry import (
    ModelFacts,
    check_schedule,
    register_check,
    register_lowering,
    register_policy,
    adaptive_policy,
    registered_schedules,
    schedule_from_dict,
    schedule_from_json,
)
from .mask import Mask, mask_from_dict, rectify
from .lowering import lower, to_plan
from .deepcache import DEEPCACHE_DEFAULT_CENTER, DEEPCACHE_DEFAULT_POWER, DeepCache, deepcache_full_steps, skip_branches
from .fora import FORA, fora_units
from .block_cache import BlockCache, delta_refresh
from .learned_mask import LearnedMask
from .adaptive import AdaptiveDeepCache, AdaptivePolicy, DBCache, FirstBlockCache, TeaCache
from .spans import parse_span, span_name
from .magcache import MagCache, magcache_rows

__all__ = [
    "ScheduleError",
    "UnknownUnitError",
    "Mask",
    "DeepCache",
    "FORA",
    "BlockCache",
    "LearnedMask",
    "lower",
    "check_schedule",
    "register_lowering",
    "registered_schedules",
    "schedule_from_dict",
    "schedule_from_json",
    "to_plan",
    "rectify",
    "mask_from_dict",
    "deepcache_full_steps",
    "skip_branches",
    "fora_units",
    "select_units",
    "delta_refresh",
    "DEEPCACHE_DEFAULT_CENTER",
    "DEEPCACHE_DEFAULT_POWER",
    # added with the package: what lowering may check artefacts against
    "ModelFacts",
    "register_check",
    # adaptive schedules (issue 10): the step kind is chosen at run time, one step late
    "FirstBlockCache",
    "DBCache",
    "span_name",
    "parse_span",
    "AdaptiveDeepCache",
    "AdaptivePolicy",
    "MagCache",
    "magcache_rows",
    "TeaCache",
    "register_policy",
    "adaptive_policy",
]
