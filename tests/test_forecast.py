"""Forecasting cache reads (``fxcache.compile(..., forecast=1|2)``, TaylorSeer-style).

The meaning: a unit reused at step ``t`` yields TaylorSeer's Taylor expansion around its
last computed step, with derivatives from divided differences over its last computed
steps. The oracle (:class:`_reference.NaiveReference` with ``forecast``) writes that the
obvious way: forward hooks keep each unit's derivative estimates as float64 tensors and
update them recursively at every computed step, as diffusers' ``TaylorSeerCache`` does;
the compiled graphs instead keep the last values in static history slots and sum them with
weights the runtime computes per step. Different arithmetic, same meaning: they agree to
float round-off.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxcache
from fxcache.rewrite.step_graphs import forecast_weights
from fxcache.testing import tiny

from _reference import NaiveReference
from test_adaptive import _count_compiles, _dit_calls, _generation
from test_core import _candidate_units, _random_plan

EAGER = dict(backend=None)


# ------------------------------------------------------------------ the weights
def test_weights_worked_by_hand():
    # order 1, computed at 0 and 2, read at 3: F2 + (F2 - F0) / 2 * 1
    assert forecast_weights(3, [2, 0], 1) == [1.5, -0.5]
    # order 2, evenly spaced (N = 2, k = 1): F0 + dF/2 + d2F/8 with dF = F0 - F1, d2F = F0 - 2F1 + F2
    assert forecast_weights(5, [4, 2, 0], 2) == [1 + 1 / 2 + 1 / 8, -1 / 2 - 2 / 8, 1 / 8]
    # order 2 on uneven steps 5, 4, 1 read at 7 (k = 2): D1 = F0 - F1, D2 = (D1 - (F1 - F2) / 3) / 1
    w = forecast_weights(7, [5, 4, 1], 2)
    assert w == pytest.approx([1 + 2 + 2, -2 - 2 * (1 + 1 / 3), 2 / 3])
    # fewer points than the order: the lower-order expansion; one point: reuse
    assert forecast_weights(7, [4, 2], 2) == [2.5, -1.5, 0.0]
    assert forecast_weights(9, [4], 2) == [1.0, 0.0, 0.0]
    assert forecast_weights(3, [], 1) == [0.0, 0.0]


@pytest.mark.parametrize("order", [1, 2])
def test_weights_are_exact_on_lines_and_sum_to_one(order):
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        steps = sorted(torch.randperm(30, generator=g)[: order + 1].tolist(), reverse=True)
        t = steps[0] + 1 + int(torch.randint(0, 5, (1,), generator=g))
        w = forecast_weights(t, steps, order)
        assert math.isclose(sum(w), 1.0, abs_tol=1e-12)  # a constant is forecast as itself
        a, b = 0.7, -1.3
        assert math.isclose(sum(wi * (a + b * s) for wi, s in zip(w, steps)), a + b * t, abs_tol=1e-9)


# ------------------------------------------------------------- against the oracle
def _check_against_reference(T, sched, order, units=None, steps=None, tol=2e-5):
    # timesteps cycle in long runs: "off" keeps one generation (the reference has one)
    cm = fxcache.compile(T.model, sched, forecast=order, timestep_rule="off", **EAGER)
    ref = NaiveReference(T, sched, units, forecast=order)
    for step in range(steps or len(sched.table)):
        t = T.timesteps[step % len(T.timesteps)]
        out = T.output(T.call(cm, t))
        torch.testing.assert_close(out, ref(step, t), rtol=tol, atol=tol)
    return cm


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("family", ["unet2d", "dit", "flux"])
def test_random_plans_forecast_as_taylorseer(family, order):
    T = tiny(family)
    units, modules, cuts = _candidate_units(T)

    @settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        mask = _random_plan(data, T, modules, cuts)
        _check_against_reference(T, mask, order, units)

    check()


@pytest.mark.parametrize("order", [1, 2])
def test_fora_forecast_over_a_long_run(order):
    """Every read after the history fills: interval 3 over 10 steps (reads at distances 1 and 2)."""
    T = tiny("dit")
    _check_against_reference(T, _as_mask(T, fxcache.FORA(interval=3), 10), order)


def _as_mask(T, sched, steps):
    args, kwargs = T.inputs(T.timesteps[0])
    plan = fxcache.plan_for(T.model, sched, *args, **kwargs)
    return fxcache.Mask([list(plan.table[s % len(plan.table)]) for s in range(steps)], list(plan.units))


@pytest.mark.parametrize("family,sched", [
    ("unet2d", fxcache.DeepCache(interval=3, branch=1)),
    ("sd", fxcache.DeepCache(interval=2, branch=1)),
    ("pixart", fxcache.FORA(interval=3)),
    ("sd3", fxcache.FORA(interval=2)),
    ("flux", fxcache.FORA(interval=3)),
], ids=["unet2d-deepcache", "sd-deepcache", "pixart-fora", "sd3-fora", "flux-fora"])
def test_every_family_forecasts_as_taylorseer(family, sched):
    T = tiny(family)
    _check_against_reference(T, _as_mask(T, sched, 7), 2)


def test_forecast_zero_is_reuse_and_one_point_is_reuse():
    T = tiny("dit")
    sched = fxcache.FORA(interval=2)
    reuse = fxcache.compile(T.model, sched, **EAGER)
    f0 = fxcache.compile(T.model, sched, forecast=0, **EAGER)
    f1 = fxcache.compile(T.model, sched, forecast=1, **EAGER)
    outs = {}
    for step in range(4):
        t = T.timesteps[step % len(T.timesteps)]
        outs[step] = [T.output(T.call(m, t)) for m in (reuse, f0, f1)]
    for step in range(4):
        assert torch.equal(outs[step][0], outs[step][1])
    # step 1 reads a unit computed once: the forecast has one point, it is the stored value
    assert torch.equal(outs[1][2], outs[1][0])
    # step 3 has two points: it extrapolates
    assert (outs[3][2] - outs[3][0]).abs().max() > 1e-4


def test_cache_bytes_count_the_history_and_match_the_buffers():
    T = tiny("unet2d")
    sched = fxcache.DeepCache(interval=3, branch=1)
    sizes = {}
    for order in (0, 1, 2):
        cm = fxcache.compile(T.model, sched, forecast=order, **EAGER)
        T.call(cm, T.timesteps[0])
        held = sum(b.numel() * b.element_size() for bufs in cm.cache_tensors().values() for b in bufs.values())
        assert cm.plan.cache_bytes == held
        sizes[order] = cm.plan.cache_bytes
        assert cm.plan.forecast == order
    n = len(cm.plan.units)
    assert sizes[1] == 2 * sizes[0] + n * 2 * 4
    assert sizes[2] == 3 * sizes[0] + n * 3 * 4
    assert "forecast order 2" in cm.plan.explain()


@pytest.mark.parametrize("bad", [3, -1, True, 1.5, "1"])
def test_bad_forecast_is_a_clear_error(bad):
    T = tiny("dit")
    with pytest.raises(ValueError, match="forecast must be"):
        fxcache.compile(T.model, fxcache.FORA(interval=2), forecast=bad)


def test_a_new_generation_forgets_the_history():
    T = tiny("dit")
    cm = fxcache.compile(T.model, fxcache.FORA(interval=2), forecast=2, **EAGER)
    first = []
    for gen in range(2):
        outs = []
        with cm.generation():
            for step in range(6):
                outs.append(T.output(T.call(cm, T.timesteps[step % len(T.timesteps)])))
        first.append(outs)
    for a, b in zip(*first):
        assert torch.equal(a, b)


# --------------------------------------------------------------------- adaptive
def test_adaptive_with_forecast_threshold_zero_is_the_model():
    T = tiny("dit")
    cm = fxcache.compile(T.model, fxcache.FirstBlockCache(0.0), forecast=1, timestep_rule="off", **EAGER)
    for step in range(5):
        t = T.timesteps[step % len(T.timesteps)]
        assert torch.equal(T.output(T.call(cm, t)), T.output(T.call(T.model, t)))
    assert all(cm.decisions()[None])


def test_adaptive_forecast_reads_extrapolate_and_compile_once():
    T = tiny("dit", batch=2)
    sched = fxcache.FirstBlockCache(0.15)
    calls = _dit_calls(T)
    cm = _count_compiles(T, sched, "aot_eager", calls, forecast=1)  # 0 breaks, 2 graphs, 0 recompiles
    plain = fxcache.compile(T.model, sched, timestep_rule="off", **EAGER)
    a = _generation(plain, calls)
    b = _generation(cm, calls)
    decided = list(cm.decisions()[None])
    assert decided == list(plain.decisions()[None])
    reused = [i for i, d in enumerate(decided) if not d]
    # a reuse after two computed steps extrapolates; before them it equals the stored value
    two_points = [i for i in reused if sum(decided[:i]) >= 2]
    assert two_points and any((a[i] - b[i]).abs().max() > 1e-6 for i in two_points)


def test_inductor_forecast_matches_eager():
    T = tiny("dit")
    sched = fxcache.FORA(interval=2)
    eager = fxcache.compile(T.model, sched, forecast=2, **EAGER)
    ind = fxcache.compile(T.model, sched, forecast=2, backend="inductor")
    for step in range(6):
        t = T.timesteps[step % len(T.timesteps)]
        torch.testing.assert_close(T.output(T.call(ind, t)), T.output(T.call(eager, t)), rtol=1e-4, atol=1e-4)


def test_fora_reads_fuse_forecast_gate_and_residual_into_one_op():
    from fxcache.kernels import forecast, forecast_gated_residual

    T = tiny("dit")
    sched = fxcache.FORA(interval=2)
    fused = fxcache.compile(T.model, sched, forecast=2, timestep_rule="off", **EAGER)
    plain = fxcache.compile(T.model, sched, forecast=2, fuse=False, timestep_rule="off", **EAGER)
    for step in range(6):
        t = T.timesteps[step % len(T.timesteps)]
        assert torch.equal(T.output(T.call(fused, t)), T.output(T.call(plain, t)))  # fp32: the same arithmetic
    reuse = fused.entries[-1].solved.graphs[fused.plan.kind_of_step(1)]
    targets = [n.target for n in reuse.gm.graph.nodes if n.op == "call_function"]
    assert reuse.fused > 0 and targets.count(forecast_gated_residual) == reuse.fused
    # every forecast read is either fused or stands alone (a read no gate follows)
    plain_reuse = plain.entries[-1].solved.graphs[plain.plan.kind_of_step(1)]
    alone = [n for n in plain_reuse.gm.graph.nodes if n.target is forecast]
    assert len(alone) == targets.count(forecast) + targets.count(forecast_gated_residual)


@pytest.mark.parametrize("order", [0, 2])
def test_adaptive_cache_bytes_count_the_state_buffers(order):
    T = tiny("dit")
    cm = fxcache.compile(T.model, fxcache.FirstBlockCache(0.15), forecast=order, timestep_rule="off", **EAGER)
    T.call(cm, T.timesteps[0])
    held = sum(b.numel() * b.element_size() for bufs in cm.cache_tensors().values() for b in bufs.values())
    assert cm.plan.state_bytes > 0 and cm.plan.cache_bytes == held


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", ["unet2d", "dit"])
def test_low_precision_history(family, dtype, tol):
    T = tiny(family, dtype=dtype)
    sched = fxcache.DeepCache(interval=2, branch=1) if family == "unet2d" else fxcache.FORA(interval=2)
    cm = _check_against_reference(T, _as_mask(T, sched, 6), 1, tol=tol)
    bufs = [b for d in cm.cache_tensors().values() for s, b in d.items() if s[0] != "fxcache.forecast"]
    assert bufs and all(b.dtype == dtype for b in bufs)
