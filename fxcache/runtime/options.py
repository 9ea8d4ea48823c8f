"""What ``fxcache.compile`` was asked for (:class:`CompileOptions`) and the runtime's own error."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FxcacheError

__all__ = ["CompileOptions", "TIMESTEP_RULES", "UnsupportedCallError"]

TIMESTEP_RULES = ("auto", "values", "storage", "off")


class UnsupportedCallError(FxcacheError, RuntimeError):
    """A call that the cached graphs cannot honour (e.g. inputs that require grad)."""

@dataclass(frozen=True)
class CompileOptions:
    """How step graphs are compiled. ``backend=None`` runs the FX graphs as they are."""

    backend: str | None = "inductor"
    mode: str | None = None
    num_steps: int | None = None
    max_shapes: int = 4
    fuse: bool = True
    freezing: bool | None = None  # inductor only; None means True (see rewrite/compile.py)
    options: dict | None = None
    segments: bool | str = "auto"  # per-segment graphs when kinds of step > max_graphs
    max_graphs: int = 8
    scale_shift: object = None  # ScaleShift adapters or a path to their checkpoint
    timestep_rule: str = "auto"  # see "When does a new generation start?"
    repeated_timesteps: bool = False  # Heun-like schedulers: equal timesteps continue a generation
    forecast: int = 0  # cache reads: 0 reuse, 1/2 extrapolate over the last computed steps
    verbose: bool = True  # capture, plan and compile lines on the "fxcache" logger (runtime/voice.py)
    max_cache_bytes: int | None = None  # budget of one cache state, checked when a shape's plan is built
    cache_dir: str | None = None  # warm start: AOTInductor packages of the step graphs (rewrite/warm.py)


