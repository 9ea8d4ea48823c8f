"""fxcache: feature caching for diffusion denoisers, as an FX compiler pass.

    cached = fxcache.compile(model, fxcache.FORA(interval=3))

The stages, in order: capture (``fxcache.capture``) → analyze (``fxcache.analyze``)
→ schedule (``fxcache.schedules`` → ``fxcache.plan``) → rewrite (``fxcache.rewrite``)
→ compile → run (``fxcache.runtime.CachedModel``).
"""

from .api import attach, compile, detach, disable, enable, engine_of, plan_for, units
from .errors import (
    CacheBudgetError, CaptureError, CheckpointError, FxcacheError, OptionError, UnitError, UnsupportedModelError,
)
from .plan import Plan, PlanError, UnitInfo
from .runtime import CachedModel
from .runtime.voice import set_verbosity
from .schedules import FORA, BlockCache, DeepCache, LearnedMask, Mask, ScheduleError, rectify
from .schedules import AdaptiveDeepCache, DBCache, FirstBlockCache, MagCache, TeaCache
from .calibrate.fit import fit_magcache, fit_teacache
from .calibrate.mask_learning import MaskLearningResult, learn_mask, learn_mask_details
from .artefacts import Profile
from .calibrate.profiler import profile
from .calibrate.search import SearchResult, search
from .calibrate.scale_shift import evaluate_scale_shift, train_scale_shift
from .rewrite.adapters import ScaleShift

__all__ = [
    "compile",
    "units",
    "plan_for",
    "attach",
    "enable",
    "disable",
    "detach",
    "engine_of",
    "set_verbosity",
    "CachedModel",
    "Plan",
    "UnitInfo",
    "Mask",
    "DeepCache",
    "FORA",
    "BlockCache",
    "LearnedMask",
    "FirstBlockCache",
    "DBCache",
    "AdaptiveDeepCache",
    "MagCache",
    "fit_magcache",
    "TeaCache",
    "fit_teacache",
    "rectify",
    "profile",
    "Profile",
    "learn_mask",
    "learn_mask_details",
    "search",
    "SearchResult",
    "MaskLearningResult",
    "ScaleShift",
    "train_scale_shift",
    "evaluate_scale_shift",
    "FxcacheError",
    "CaptureError",
    "UnsupportedModelError",
    "UnitError",
    "CheckpointError",
    "OptionError",
    "CacheBudgetError",
    "PlanError",
    "ScheduleError",
]

__version__ = "0.1.0"
