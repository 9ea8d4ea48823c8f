"""What fxcache says while it works: one line per capture and plan, one per step graph
compiled (with the time it took), one when caching is attached to a model in place.
Nothing on the per-step path.

Everything goes through the ``logging`` logger ``"fxcache"`` at level INFO. Like
diffusers' and transformers' own loggers, it has a handler of its own (stderr, lines
``fxcache: ...``) so that a user sees why a first call takes a minute without configuring
logging; it does not propagate to the root logger (no double lines in an application
that logs). :func:`set_verbosity` changes the level (``logging.WARNING``: quiet);
``fxcache.compile(..., verbose=False)`` quiets one model. Only the ``"fxcache"`` logger
is touched, never the root logger or another library's.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["logger", "set_verbosity", "say", "fmt_seconds", "short"]

logger = logging.getLogger("fxcache")
if not logger.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("fxcache: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def set_verbosity(level: int | str) -> None:
    """Level of fxcache's messages: ``logging.INFO`` (the default: capture, plan and compile
    lines), ``logging.WARNING`` (quiet), ``logging.DEBUG``, or their names."""
    if isinstance(level, str):
        name = level.upper()
        if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"set_verbosity({level!r}): a logging level is expected (e.g. 'INFO', 'WARNING')")
        level = getattr(logging, name)
    logger.setLevel(level)


def say(verbose: bool, msg: str) -> None:
    if verbose:
        logger.info(msg)


def fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def short(obj, width: int = 100) -> str:
    """``repr(obj)`` cut to ``width`` characters (a MagCache's ratios, a Mask's table)."""
    r = repr(obj)
    return r if len(r) <= width else r[: width - 4] + "...)"
