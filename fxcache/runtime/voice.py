"""What fxcache says while it works: one line per capture and plan, one per step graph
compiled (with the time it took), one when caching is attached to a model in place, and
a tqdm bar on stderr while the step graphs of one input shape compile
(:func:`compile_started`, :func:`compile_finished`). Nothing on the per-step path.

Everything goes through the ``logging`` logger ``"fxcache"`` at level INFO. Like
diffusers' and transformers' own loggers, it has a handler of its own (stderr, lines
``fxcache: ...``) so that a user sees why a first call takes a minute without configuring
logging; it does not propagate to the root logger (no double lines in an application
that logs). :func:`set_verbosity` changes the level (``logging.WARNING``: quiet);
``fxcache.compile(..., verbose=False)`` quiets one model. Only the ``"fxcache"`` logger
is touched, never the root logger or another library's.

The compile bar ("compiling 2 step graphs of UNet2DModel with inductor", one tick per
graph) is shown under the same conditions as the lines (``verbose`` and the logger at
INFO or below) and only when a backend compiles; it closes when every step graph of its
input shape has compiled or the shape's entry is dropped (evicted by ``max_shapes``,
rebuilt, or the model let go). fxcache's own lines clear and redraw it around
themselves, so the two never share a line; on a stderr that is not a terminal tqdm
writes its updates as plain text.
"""

from __future__ import annotations

import logging
import sys
import weakref

__all__ = ["logger", "set_verbosity", "say", "fmt_seconds", "short", "compile_started", "compile_finished",
           "compile_dropped"]


class _Handler(logging.StreamHandler):
    """stderr lines that clear a compile bar on the same stream and redraw it after."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _bars:
            return super().emit(record)
        from tqdm import tqdm

        with tqdm.external_write_mode(file=self.stream):
            super().emit(record)


logger = logging.getLogger("fxcache")
if not logger.handlers:
    _handler = _Handler(sys.stderr)
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


#: open compile bars: id of the owner (an engine entry) -> (the finalizer that closes it, the bar)
_bars: dict[int, tuple] = {}


def _close(key: int, bar) -> None:
    _bars.pop(key, None)
    bar.close()


def compile_started(owner, *, verbose: bool, total: int, done: int, desc: str) -> None:
    """A step graph of ``owner`` (one input shape's entry, ``total`` graphs, ``done`` of them
    compiled) starts compiling: open its bar unless one is open or fxcache is quiet."""
    if id(owner) in _bars or not verbose or not logger.isEnabledFor(logging.INFO):
        return
    from tqdm import tqdm

    bar = tqdm(total=total, initial=done, desc=desc, unit="graph", file=sys.stderr, leave=True)
    fin = weakref.finalize(owner, _close, id(owner), bar)  # the entry dropped: the bar closes
    fin.atexit = False
    _bars[id(owner)] = (fin, bar)


def compile_finished(owner, done: int) -> None:
    """``done`` step graphs of ``owner`` have compiled: advance its bar, close it at the total."""
    fin, bar = _bars.get(id(owner), (None, None))
    if bar is None:
        return
    bar.update(done - bar.n)
    if bar.n >= bar.total:
        fin()


def compile_dropped(owner) -> None:
    """``owner`` will not compile more: close its bar, if one is open."""
    fin, _ = _bars.get(id(owner), (None, None))
    if fin is not None:
        fin()


def fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def short(obj, width: int = 100) -> str:
    """``repr(obj)`` cut to ``width`` characters (a MagCache's ratios, a Mask's table)."""
    r = repr(obj)
    return r if len(r) <= width else r[: width - 4] + "...)"
