"""Exception classes. Every message names the node or module, what is not supported,
and what to do instead."""

from __future__ import annotations

__all__ = [
    "FxcacheError",
    "CaptureError",
    "UnsupportedModelError",
    "UnitError",
    "CheckpointError",
    "ArtefactMismatchError",
    "ContractError",
    "OptionError",
    "OptionTypeError",
    "CacheBudgetError",
]


class FxcacheError(Exception):
    """Base class of fxcache's errors."""


class CaptureError(FxcacheError):
    """The model could not be captured into a graph."""


class UnsupportedModelError(FxcacheError, ValueError):
    """The model (or one of its modules) has a shape fxcache cannot cache."""


class UnitError(FxcacheError, ValueError):
    """A unit named by a schedule does not exist or cannot be cached as asked."""


class CheckpointError(FxcacheError, ValueError):
    """A saved artefact does not fit the model or schedule it is loaded into."""


class ArtefactMismatchError(CheckpointError):
    """An artefact recorded for one model or schedule is used with another: a profile of
    another model class or other unit shapes, scale-shift adapters trained for another
    schedule table. The message names both sides."""


class ContractError(FxcacheError):
    """A graph broke the compiler's contract (:mod:`fxcache.rewrite.contract`): an internal
    error of fxcache, raised instead of a silently wrong result."""


class OptionError(FxcacheError, ValueError):
    """An argument of :func:`fxcache.compile` (or of a command-line option that feeds it)
    that is not allowed: the message names the argument, the value given and what is
    allowed. A ``ValueError``, so code that caught the plain ``ValueError`` fxcache used
    to raise still works."""


class OptionTypeError(OptionError, TypeError):
    """An :class:`OptionError` for an argument of the wrong type (also a ``TypeError``)."""


class CacheBudgetError(FxcacheError, RuntimeError):
    """The plan built for an input shape needs more bytes per cache state than the
    ``max_cache_bytes`` given to :func:`fxcache.compile` / :func:`fxcache.enable`. Raised
    when that shape's plan is built (its first call), before any cache buffer is
    allocated or any graph compiled; the message names the biggest cached units with
    their bytes and what would need less."""
