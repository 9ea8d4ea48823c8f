"""What fxcache says (issue 20): a line for capture and plan, one per step graph compiled
with the time it took, one at ``enable``; quiet per model (``verbose=False``) or for all
(``fxcache.set_verbosity``); only the ``"fxcache"`` logger is touched."""

from __future__ import annotations

import logging

import pytest
import torch

import fxcache
from fxcache.errors import OptionTypeError
from fxcache.testing import tiny


@pytest.fixture
def lines():
    logger = logging.getLogger("fxcache")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        fxcache.set_verbosity(logging.INFO)


def _run(cm, T):
    with torch.no_grad():
        for t in T.timesteps:
            T.call(cm, t)


def test_first_call_says_what_it_captures_plans_and_compiles(lines):
    T = tiny("dit")
    _run(fxcache.compile(T.model, fxcache.FORA(2), backend="eager"), T)
    assert any("captured and planned" in m and "FORA(interval=2)" in m and "FLOP-ideal" in m and "over one period" in m
               and "per cache state" in m for m in lines), lines
    compiled = [m for m in lines if "compiled and run in" in m]
    assert len(compiled) == 2, lines  # one line per step graph, once
    n = len(lines)
    _run(fxcache.compile(T.model, fxcache.FORA(2), backend=None), T)
    assert not any("compil" in m for m in lines[n:] if "step graph" in m)  # eager graphs: nothing compiles


def test_quiet_per_model_and_for_all(lines):
    T = tiny("dit")
    _run(fxcache.compile(T.model, fxcache.FORA(2), backend="eager", verbose=False), T)
    assert lines == []
    fxcache.set_verbosity("WARNING")
    _run(fxcache.compile(T.model, fxcache.FORA(2), backend="eager"), T)
    assert lines == []
    with pytest.raises(ValueError, match="logging level"):
        fxcache.set_verbosity("loud")
    with pytest.raises(OptionTypeError, match="verbose"):
        fxcache.compile(T.model, fxcache.FORA(2), verbose="yes")


def test_enable_says_one_line(lines):
    T = tiny("dit")
    fxcache.enable(T.model, fxcache.FORA(2), backend=None)
    try:
        assert len(lines) == 1 and "in place" in lines[0] and "FORA" in lines[0]
    finally:
        fxcache.disable(T.model)


def test_only_fxcaches_logger_is_configured():
    logger = logging.getLogger("fxcache")
    assert logger.handlers and not logger.propagate
    assert logging.getLogger().handlers == [] or all(
        not getattr(h, "formatter", None) or "fxcache" not in (h.formatter._fmt or "") for h in logging.getLogger().handlers)


def test_one_flop_ideal_figure_over_the_generation():
    """The plan's own figure is over its table (one period of a periodic plan) and says so;
    over a generation of 20 steps it is the figure the speed report and the demo print."""
    T = tiny("unet2d")
    args, kwargs = T.inputs(T.timesteps[0])
    plan = fxcache.plan_for(T.model, fxcache.DeepCache(interval=3, branch=0), *args, **kwargs)
    full, kinds = plan.full_flops, [plan.step_flops(s) for s in range(20)]
    assert plan.ideal_speedup_over(20) == pytest.approx(20 * full / sum(kinds))
    assert plan.ideal_speedup_over(20) != pytest.approx(plan.ideal_speedup)  # 20 is no multiple of 3
    text = plan.explain(steps=20)
    assert f"{plan.ideal_speedup_over(20):.2f}x over the generation of 20 steps" in text
    assert f"({plan.ideal_speedup:.2f}x over one period)" in text
    assert "over one period" in str(plan)


def _live_bars() -> list:
    from tqdm import tqdm

    return [b for b in list(tqdm._instances) if "step graph" in str(b.desc)]


def test_compile_bar_on_stderr_while_step_graphs_compile(capsys):
    """Issue 20, item 2: "compiling 2 step graphs with <backend>" with a progress bar on
    stderr, advanced as each graph compiles and closed when all have; nothing per step
    once compiled; stderr is not a tty here."""
    T = tiny("dit")
    cm = fxcache.compile(T.model, fxcache.FORA(2), backend="eager")
    _run(cm, T)
    err = capsys.readouterr().err
    assert "compiling 2 step graphs of DiTTransformer2DModel with eager" in err, err
    assert "2/2" in err and "1/2" in err, err
    assert _live_bars() == []  # closed once both had compiled
    _run(cm, T)
    assert "step graph" not in capsys.readouterr().err  # compiled: no bar, nothing per step


def test_compile_bar_closed_when_its_entry_is_dropped(capsys):
    """An entry dropped before all its graphs compiled (max_shapes evicts it, or the
    model is let go) closes its bar."""
    import gc

    T, T2 = tiny("dit"), tiny("dit", batch=2)
    cm = fxcache.compile(T.model, fxcache.FORA(2), backend="eager", max_shapes=1)
    with torch.no_grad():
        T.call(cm, T.timesteps[0])  # compiles the first of this shape's two graphs
        (first,) = _live_bars()
        cm.reset()
        T2.call(cm, T2.timesteps[0])  # another shape: the first entry is evicted, the new one compiles
    bars = _live_bars()
    assert len(bars) == 1 and bars[0] is not first, bars  # (tqdm compares bars by position)
    del cm, bars
    gc.collect()
    assert _live_bars() == []
    capsys.readouterr()


def test_compile_bar_quiet(capsys):
    T = tiny("dit")
    _run(fxcache.compile(T.model, fxcache.FORA(2), backend="eager", verbose=False), T)
    assert "step graph" not in capsys.readouterr().err
    fxcache.set_verbosity("WARNING")
    try:
        _run(fxcache.compile(T.model, fxcache.FORA(2), backend="eager"), T)
    finally:
        fxcache.set_verbosity("INFO")
    assert "step graph" not in capsys.readouterr().err
    _run(fxcache.compile(T.model, fxcache.FORA(2), backend=None), T)  # nothing compiles: no bar
    assert "step graph" not in capsys.readouterr().err
