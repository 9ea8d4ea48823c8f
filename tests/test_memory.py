"""Memory as a first-class figure (issue 18, part 3): the bytes of one cache state and of
all of them (one per cache context), and ``max_cache_bytes``, a budget checked when the
plan of an input shape is built, before anything is allocated or compiled."""

from __future__ import annotations

import pytest
import torch

import fxcache
from fxcache.errors import CacheBudgetError, FxcacheError, OptionError, OptionTypeError
from fxcache.testing import tiny

EAGER = dict(backend=None, timestep_rule="off")


def _held(cm) -> int:
    return sum(b.numel() * b.element_size() for bufs in cm.cache_tensors().values() for b in bufs.values())


def _plan(T, schedule):
    args, kwargs = T.inputs(T.timesteps[0])
    return fxcache.plan_for(T.model, schedule, *args, **kwargs)


def test_total_cache_bytes_is_one_state_per_cache_context():
    T = tiny("dit")
    cm = fxcache.compile(T.model, fxcache.FORA(interval=2), **EAGER)
    with torch.no_grad():
        for name in ("cond", "uncond"):
            with cm.cache_context(name):
                T.call(cm, T.timesteps[0])
    plan = cm.plan
    assert plan.cache_bytes > 0
    assert _held(cm) == plan.total_cache_bytes(2) == 2 * plan.cache_bytes
    assert plan.total_cache_bytes() == plan.cache_bytes
    text = plan.explain()
    assert "per cache state" in text and "total" in text
    # the biggest slots first, summing (without forecast) to the cache bytes
    by_unit = plan.cache_bytes_by_unit()
    assert sum(by_unit.values()) == plan.cache_bytes
    assert list(by_unit.values()) == sorted(by_unit.values(), reverse=True)


def test_explain_prints_the_total_for_the_contexts_asked():
    T = tiny("dit")
    plan = _plan(T, fxcache.FORA(interval=2))
    two = plan.explain(contexts=2)
    assert "2 cache contexts" in two
    from fxcache.plan import _fmt_bytes

    assert _fmt_bytes(2 * plan.cache_bytes) in two
    assert str(plan) == plan.explain()


@pytest.mark.parametrize("bad, is_type", [(0, False), (-1, False), (1.5, True), ("2", True), (True, True)])
def test_total_cache_bytes_refuses_a_bad_number_of_contexts(bad, is_type):
    T = tiny("dit")
    plan = _plan(T, fxcache.FORA(interval=2))
    with pytest.raises(ValueError if not is_type else TypeError, match="contexts"):
        plan.total_cache_bytes(bad)


def _needed(T, schedule, **opts) -> int:
    cm = fxcache.compile(T.model, schedule, **EAGER, **opts)
    with torch.no_grad():
        T.call(cm, T.timesteps[0])
    return cm.plan.cache_bytes


@pytest.mark.parametrize("family, schedule", [("dit", fxcache.FORA(interval=2)), ("flux", fxcache.FirstBlockCache(0.1))])
def test_a_budget_below_the_plan_raises_at_the_first_call(family, schedule):
    T = tiny(family)
    need = _needed(T, schedule)
    cm = fxcache.compile(T.model, schedule, max_cache_bytes=need - 1, **EAGER)
    with torch.no_grad(), pytest.raises(CacheBudgetError) as info:
        T.call(cm, T.timesteps[0])
    err = info.value
    assert isinstance(err, FxcacheError)
    msg = str(err)
    assert "max_cache_bytes" in msg and str(need) in msg and "per cache state" in msg
    # names the biggest units with their bytes, and suggests a cheaper schedule
    plan = _plan(T, schedule)
    biggest = next(iter(plan.cache_bytes_by_unit()))
    assert biggest in msg
    assert "cheaper" in msg
    assert cm.cache_tensors() == {}  # nothing was allocated


@pytest.mark.parametrize("family, schedule", [("dit", fxcache.FORA(interval=2)), ("flux", fxcache.FirstBlockCache(0.1))])
def test_a_budget_at_or_above_the_plan_passes(family, schedule):
    T = tiny(family)
    need = _needed(T, schedule)
    for budget in (need, 10 * need):
        cm = fxcache.compile(T.model, schedule, max_cache_bytes=budget, **EAGER)
        with torch.no_grad():
            out = T.call(cm, T.timesteps[0])
        assert T.output(out).shape == T.output(T.call(T.model, T.timesteps[0])).shape
        assert _held(cm) == need <= budget


def test_the_budget_counts_the_forecast_history():
    T = tiny("dit")
    sched = fxcache.FORA(interval=2)
    need0, need2 = _needed(T, sched), _needed(T, sched, forecast=2)
    assert need2 > 3 * need0
    cm = fxcache.compile(T.model, sched, forecast=2, max_cache_bytes=need0 * 2, **EAGER)
    with torch.no_grad(), pytest.raises(CacheBudgetError, match="forecast"):
        T.call(cm, T.timesteps[0])


def test_enable_takes_the_budget_too():
    T = tiny("dit")
    model = T.model
    fxcache.enable(model, fxcache.FORA(interval=2), max_cache_bytes=1, **EAGER)
    try:
        with torch.no_grad(), pytest.raises(CacheBudgetError):
            T.call(model, T.timesteps[0])
    finally:
        fxcache.disable(model)


@pytest.mark.parametrize("bad, is_type", [(0, False), (-5, False), (1.5, True), (1e9, True), ("1GB", True),
                                          (True, True)])
def test_a_bad_budget_is_refused_by_compile_and_enable(bad, is_type):
    T = tiny("dit")
    for call in (lambda: fxcache.compile(T.model, fxcache.FORA(2), max_cache_bytes=bad),
                 lambda: fxcache.enable(T.model, fxcache.FORA(2), max_cache_bytes=bad)):
        with pytest.raises(OptionError) as info:
            call()
        assert isinstance(info.value, OptionTypeError) == is_type
        assert "max_cache_bytes" in str(info.value) and repr(bad) in str(info.value)
    assert fxcache.engine_of(T.model) is None  # enable refused before attaching anything


@pytest.mark.parametrize("family,schedule", [("dit", fxcache.FirstBlockCache(0.1)), ("flux", fxcache.TeaCache(0.1)),
                                             ("dit", fxcache.FORA(2)), ("flux", fxcache.FORA(2))])
def test_plan_for_counts_what_the_first_call_allocates(family, schedule):
    """plan_for is the runtime's build path up to compiling: an adaptive schedule's state
    buffers are counted as the compiled model's plan counts them, and the buffers hold
    exactly that (batch 2: a cached value that is a view into a larger tensor, as Flux's
    image stream sliced from the joint sequence, gets a dense buffer, not the view's
    strides over the whole sequence)."""
    T = tiny(family, batch=2)
    args, kwargs = T.inputs(T.timesteps[0])
    before = fxcache.plan_for(T.model, schedule, *args, **kwargs)
    cm = fxcache.compile(T.model, schedule, backend=None)
    with torch.no_grad():
        T.call(cm, T.timesteps[0])
    assert before.cache_bytes == cm.plan.cache_bytes
    held = sum(t.untyped_storage().nbytes() for bufs in fxcache.engine_of(cm).cache_tensors().values()
               for t in bufs.values())
    assert held == cm.plan.cache_bytes


def test_plan_for_refuses_what_the_first_call_refuses():
    T = tiny("sd")
    args, kwargs = T.inputs(T.timesteps[0])
    with pytest.raises(fxcache.UnsupportedModelError, match="TeaCache"):
        fxcache.plan_for(T.model, fxcache.TeaCache(0.1), *args, **kwargs)
