"""Adaptive schedules (issue 10): the step kind is chosen from a statistic computed on the
device, one step late, with no host sync on the step path, no graph break and no
recompile after warm-up.

The oracle, :class:`AdaptiveReference`, shares no code with fxcache's rewrite or runtime:
the whole eager model runs, a forward hook measures the probe, Python decides with
``.item()`` from the previous step's statistic (the same one-step lag and host limits),
and forward hooks substitute the cached outputs of the reused modules."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch._dynamo.utils import counters

import fxcache
from fxcache.schedules import schedule_from_json
from fxcache.testing import tiny

from _reference import module_paths, stream_residuals, tiny_flux_square

EAGER = dict(backend=None, timestep_rule="off")
STEPS = [torch.tensor(999 - 100 * i) for i in range(10)]
# FirstBlockCache on the tiny DiT: reused are the attention and MLP sublayers of the
# blocks after the probe block 0; DeepCache branch 1 of the tiny U-Net: the deep part
# behind it, whose shallow input feature is the output of down_blocks.0.resnets.0.
DIT_REUSED = ["transformer_blocks.1.attn1", "transformer_blocks.1.ff", "transformer_blocks.2.attn1",
              "transformer_blocks.2.ff"]


def _clone(x):
    return x.detach().clone()


class Span:
    """A reuse target for :func:`_run_with_reuse_hooks`: the contiguous blocks ``blocks``
    as one residual per stream (``pairs``: ``(output index or None, input name)``), as
    :func:`_reference.hook_span` means it: at a computed step the last block's outputs
    minus the first block's inputs are stored; at a reused step the last block returns
    the first block's current inputs plus them."""

    def __init__(self, blocks, pairs):
        self.blocks, self.pairs = list(blocks), list(pairs)

    def install(self, model, compute, cache, handles):
        import inspect

        seen = {}

        def pre(mod, args, kwargs):
            seen["in"] = inspect.signature(mod.forward).bind(*args, **kwargs).arguments

        def post(mod, args, out):
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            idx = [0 if i is None else i for i, _ in self.pairs]
            if compute:
                cache["span"] = [_clone(outs[i] - seen["in"][n]) for i, (_, n) in zip(idx, self.pairs)]
                return None
            for i, (_, n), r in zip(idx, self.pairs, cache["span"]):
                outs[i] = seen["in"][n] + r
            return type(out)(outs) if isinstance(out, (tuple, list)) else outs[0]

        handles.append(model.get_submodule(self.blocks[0]).register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(model.get_submodule(self.blocks[-1]).register_forward_hook(post))


DIT_SPAN = Span(["transformer_blocks.1", "transformer_blocks.2"], [(None, "hidden_states")])


def _run_with_reuse_hooks(model, paths, compute, cache, handles, call):
    """One eager call: each module in ``paths`` stores its output in ``cache`` when
    ``compute``, else returns the stored one (``paths`` a :class:`Span`: the span's
    residuals); ``handles`` (hooks already installed, e.g. the probe's) are removed with
    these afterwards."""
    if isinstance(paths, Span):
        paths.install(model, compute, cache, handles)
        paths = []
    for path in paths:
        def hook(mod, args, out, path=path):
            if compute:
                cache[path] = _clone(out)
                return None
            return _clone(cache[path])

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return call(model)
    finally:
        for h in handles:
            h.remove()


class AdaptiveReference:
    """One generation of an adaptive schedule, the obvious way (module doc).

    probe:    module whose output is the probe value: the output itself (``residual``
              false), the output minus its first positional input (true), or, for a block
              with several streams, ``residual`` = ``[(output index, input name), ...]``:
              each such output minus the input of that name (:func:`stream_residuals`);
              statistic = sum_i |v_i - ref_i|_1 / sum_i |ref_i|_1 over the streams, with ref
              stored at the last computed step (inf without one); the next step may reuse
              when < threshold.
    reused:   module paths whose outputs are substituted at reused steps."""

    def __init__(self, model, reused, probe, residual, threshold, first_steps=1, last_steps=0, max_reuse=None,
                 num_steps=None):
        self.model, self.probe, self.residual = model, probe, residual
        self.reused = reused if isinstance(reused, Span) else list(reused)
        self.threshold, self.first, self.last, self.max_reuse, self.num_steps = (
            threshold, first_steps, last_steps, max_reuse, num_steps)

    def run(self, calls):
        """``calls``: per step, a function ``model -> output tensor``. Returns (outputs,
        computed per step, statistic per step)."""
        cache, ref, pending, run = {}, None, False, 0
        outs, computed, stats = [], [], []
        for step, call in enumerate(calls):
            forced = step < self.first or (self.last and step >= self.num_steps - self.last) or (
                self.max_reuse is not None and run >= self.max_reuse)
            compute = forced or not pending
            seen = {}
            handles = []

            def probe_hook(mod, args, kwargs, out):
                if isinstance(self.residual, bool):
                    seen["v"] = [(out - args[0]).float() if self.residual else out.float()]
                else:
                    seen["v"] = [v.float() for v in stream_residuals(mod, args, kwargs, out, self.residual)]

            handles.append(self.model.get_submodule(self.probe).register_forward_hook(probe_hook, with_kwargs=True))
            outs.append(_run_with_reuse_hooks(self.model, self.reused, compute, cache, handles, call))
            v = seen["v"]
            den = None if ref is None else sum(r.abs().sum() for r in ref)
            if den is None or not (den > 0).item():
                stat = torch.tensor(math.inf)
            else:
                stat = sum((a - r).abs().sum() for a, r in zip(v, ref)) / den
            pending = bool((stat < self.threshold).item())
            if compute:
                ref = v
            run = 0 if compute else run + 1
            computed.append(compute)
            stats.append(stat.item())
        return outs, computed, stats


def _dit_calls(T, steps=STEPS, xs=None):
    calls = []
    for i, t in enumerate(steps):
        args, kwargs = T.inputs(t)
        if xs is not None:
            args = (xs[i],) + tuple(args[1:])
        calls.append(lambda m, a=args, k=kwargs: T.output(m(*a, **k)))
    return calls


def _generation(cm, calls):
    with cm.generation(), torch.no_grad():
        return [c(cm) for c in calls]


def _fbc_ref(T, threshold, reuse="span", **limits):
    reused = DIT_SPAN if reuse == "span" else DIT_REUSED
    return AdaptiveReference(T.model, reused, "transformer_blocks.0", True, threshold, **limits)


def _adc_ref(T, threshold, branch=1, **limits):
    args, kwargs = T.inputs(T.timesteps[0])
    unit = fxcache.units(T.model, *args, **kwargs).by_name()[f"skip_branch.{branch}"]
    return AdaptiveReference(T.model, [unit.module], "down_blocks.0.resnets.0", False, threshold, **limits)


def _check(cm, ref, calls):
    outs = _generation(cm, calls)
    ref_outs, ref_computed, ref_stats = ref.run(calls)
    rec = cm.decisions()[None]
    assert list(rec) == ref_computed
    assert rec.statistic == ref_stats
    for step, (a, b) in enumerate(zip(outs, ref_outs)):
        assert torch.equal(a, b), step
    return rec


# ------------------------------------------------------------------ against the oracle
@pytest.mark.parametrize(
    "limits",
    [{}, dict(max_reuse=2), dict(first_steps=3, last_steps=2, num_steps=10)],
    ids=["default", "max_reuse", "first_last"],
)
@pytest.mark.parametrize("reuse", ["span", "sublayers"])
def test_first_block_cache_matches_reference(limits, reuse):
    limits = dict(limits)  # shared between the parametrised cases
    T = tiny("dit", batch=2)
    num_steps = limits.pop("num_steps", None)
    sched = fxcache.FirstBlockCache(0.15, reuse=reuse, **limits) if reuse != "span" else fxcache.FirstBlockCache(
        0.15, **limits)  # spans are the default on transformers
    cm = fxcache.compile(T.model, sched, num_steps=num_steps, **EAGER)
    rec = _check(cm, _fbc_ref(T, 0.15, reuse, num_steps=num_steps, **limits), _dit_calls(T))
    # the check means something: both kinds ran
    assert True in rec[2:] and False in rec
    want = ["span:transformer_blocks.1..transformer_blocks.2"] if reuse == "span" else DIT_REUSED
    assert set(cm.plan.units) == set(want) and cm.plan.adaptive is not None


def test_dbcache_is_first_block_cache_with_computed_trailing_blocks():
    """DBCache(Fn=1, Bn=1): block 0 probes, block 2 always runs, the span over block 1 is
    reused; against the hook oracle. DBCache(1, 0, t) lowers as FirstBlockCache(t)."""
    from fxcache.schedules import lower

    T = tiny("dit", batch=2)
    cm = fxcache.compile(T.model, fxcache.DBCache(1, 1, 0.15), **EAGER)
    ref = AdaptiveReference(T.model, Span(["transformer_blocks.1"], [(None, "hidden_states")]),
                            "transformer_blocks.0", True, 0.15)
    rec = _check(cm, ref, _dit_calls(T))
    assert True in rec[2:] and False in rec
    assert cm.plan.units == ("span:transformer_blocks.1..transformer_blocks.1",)
    args, kwargs = T.inputs(T.timesteps[0])
    infos = fxcache.units(T.model, *args, **kwargs).infos()
    assert lower(fxcache.DBCache(1, 0, 0.1), infos) == lower(fxcache.FirstBlockCache(0.1), infos)
    assert schedule_from_json(fxcache.DBCache(2, 1, 0.1).to_json()) == fxcache.DBCache(2, 1, 0.1)
    with pytest.raises(fxcache.ScheduleError, match="Fn"):
        lower(fxcache.DBCache(2, 1, 0.1), infos)
    with pytest.raises(fxcache.ScheduleError, match="Bn"):
        fxcache.DBCache(1, -1, 0.1)


@pytest.mark.parametrize("limits", [{}, dict(max_reuse=1, last_steps=1, num_steps=10)], ids=["default", "limits"])
def test_adaptive_deepcache_matches_reference(limits):
    T = tiny("unet2d", batch=2)
    num_steps = limits.pop("num_steps", None)
    cm = fxcache.compile(T.model, fxcache.AdaptiveDeepCache(0.045, branch=1, **limits), num_steps=num_steps, **EAGER)
    rec = _check(cm, _adc_ref(T, 0.045, num_steps=num_steps, **limits), _dit_calls(T))
    assert True in rec[2:] and False in rec
    assert cm.plan.units == ("skip_branch.1",)


FLUX_STEPS = [torch.tensor(1.0 - 0.1 * i) for i in range(10)]
# a Flux block returns (encoder_hidden_states, hidden_states): each stream's output adds
# back its own input
FLUX_STREAMS = [(1, "hidden_states"), (0, "encoder_hidden_states")]


def test_first_block_cache_on_flux_pairs_each_stream_with_its_own_input():
    """Flux with as many text tokens as image tokens: both streams of the double block
    have the same shape, so only data flow tells which input each output adds back. The
    statistic is each stream's residual (output - its own input) measured by hooks on the
    eager model, and the run uses the default generation rules (no ``timestep_rule``)."""
    T = tiny_flux_square(batch=2)
    args, kwargs = T.inputs(FLUX_STEPS[0])
    assert args[0].shape == kwargs["encoder_hidden_states"].shape[:2] + (16,)  # 16 image, 16 text tokens
    calls = _dit_calls(T, FLUX_STEPS)
    for reuse in ("span", "sublayers"):
        sched = fxcache.FirstBlockCache(0.2, max_reuse=2, reuse=reuse)
        cm = fxcache.compile(T.model, sched, backend=None)
        with torch.no_grad():
            outs = [c(cm) for c in calls]
        unitset = cm.entries[-1].units
        if reuse == "span":
            assert cm.plan.units == ("span:single_transformer_blocks.0..single_transformer_blocks.1",)
            reused = Span(["single_transformer_blocks.0", "single_transformer_blocks.1"],
                          [(0, "encoder_hidden_states"), (1, "hidden_states")])
        else:
            reused = module_paths(unitset, cm.plan.units)
            assert reused == ["single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out"]
        ref = AdaptiveReference(T.model, reused, "transformer_blocks.0", FLUX_STREAMS, 0.2, max_reuse=2)
        ref_outs, ref_computed, ref_stats = ref.run(calls)
        rec = cm.decisions()[None]
        assert rec.statistic[0] == math.inf
        assert rec.statistic[1:] == pytest.approx(ref_stats[1:], rel=1e-5)
        assert list(rec) == ref_computed and True in ref_computed[2:] and False in ref_computed
        for step, (a, b) in enumerate(zip(outs, ref_outs)):
            assert torch.equal(a, b), (reuse, step)
    # one probe value per stream, each subtracting a different input
    probes = cm.entries[-1].adaptive.probes
    assert [p[0] for p in probes] == list(unitset.by_name()["transformer_blocks.0"].outputs)
    assert len({p[1] for p in probes}) == 2


def test_threshold_zero_computes_everything_bit_exact():
    for family, sched in (("dit", fxcache.FirstBlockCache(0.0)), ("unet2d", fxcache.AdaptiveDeepCache(0.0, branch=0))):
        T = tiny(family, batch=2)
        cm = fxcache.compile(T.model, sched, **EAGER)
        calls = _dit_calls(T)
        outs = _generation(cm, calls)
        assert list(cm.decisions()[None]) == [True] * len(calls)
        with torch.no_grad():
            for c, out in zip(calls, outs):
                assert torch.equal(out, c(T.model))


@pytest.mark.parametrize(
    "limits,expected",
    [
        ({}, "TTFFFFFFFF"),
        (dict(max_reuse=2), "TTFFTFFTFF"),
        (dict(first_steps=3, max_reuse=3, last_steps=2, num_steps=10), "TTTFFFTFTT"),
    ],
)
def test_huge_threshold_reuses_as_the_limits_allow(limits, expected):
    """Step 1 computes whatever the limits say: its decision comes from step 0, which has
    no reference to compare with (the lag)."""
    T = tiny("dit", batch=1)
    num_steps = limits.pop("num_steps", None)
    cm = fxcache.compile(T.model, fxcache.FirstBlockCache(1e30, **limits), num_steps=num_steps, **EAGER)
    _check(cm, _fbc_ref(T, 1e30, num_steps=num_steps, **limits), _dit_calls(T))
    assert "".join("T" if c else "F" for c in cm.decisions()[None]) == expected


# --------------------------------------------------------- state across generations
def test_generation_boundaries_reset_the_adaptive_state():
    """Without the reset, the second generation's step 0 would compare with the first
    generation's reference and reuse at step 1."""
    T = tiny("dit", batch=2)
    cm = fxcache.compile(T.model, fxcache.FirstBlockCache(1.0), **EAGER)
    calls = _dit_calls(T)
    first = _generation(cm, calls)
    rec1 = cm.decisions()[None]  # the record of the last generation, after it ended
    second = _generation(cm, calls)
    rec2 = cm.decisions()[None]
    assert list(rec1) == list(rec2) and rec1[1] is True
    assert rec1.statistic == rec2.statistic
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # the same with diffusers' protocol and the timestep rule instead of generation()
    cm2 = fxcache.compile(T.model, fxcache.FirstBlockCache(1.0), backend=None)
    with torch.no_grad():
        for _ in range(2):
            outs = [c(cm2) for c in calls]
            assert list(cm2.decisions()[None]) == list(rec1)
            cm2._reset_stateful_cache()
    for a, b in zip(outs, first):
        assert torch.equal(a, b)


def test_two_cache_contexts_decide_separately():
    """``cond`` sees a fixed latent (small change: reuses), ``uncond`` a new random latent
    at every step (large change: computes); interleaved, each decides as if alone."""
    T = tiny("dit", batch=2)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 4, 8, 8, generator=g) for _ in STEPS]
    cond, uncond = _dit_calls(T), _dit_calls(T, xs=xs)
    sched = fxcache.FirstBlockCache(0.15)
    cm = fxcache.compile(T.model, sched, **EAGER)
    outs = {"cond": [], "uncond": []}
    with cm.generation(), torch.no_grad():
        for c, u in zip(cond, uncond):
            with cm.cache_context("cond"):
                outs["cond"].append(c(cm))
            with cm.cache_context("uncond"):
                outs["uncond"].append(u(cm))
    rec = cm.decisions()
    for name, calls in (("cond", cond), ("uncond", uncond)):
        ref_outs, ref_computed, _ = _fbc_ref(T, 0.15).run(calls)
        assert list(rec[name]) == ref_computed, name
        for a, b in zip(outs[name], ref_outs):
            assert torch.equal(a, b)
    assert list(rec["cond"]) != list(rec["uncond"])
    assert all(rec["uncond"]) and not all(rec["cond"])


def test_shape_change_mid_generation_starts_the_state_afresh():
    """Batch 2 for five steps, then batch 1 (CFG switched off part-way): the batch-1 state
    has no decision from the step before, so it starts afresh (as a new generation would:
    full, then full for want of a reference) and from then on decides as the reference
    run on the batch-1 calls alone."""
    T2, T1 = tiny("dit", batch=2), tiny("dit", batch=1)
    T1.model = T2.model
    cm = fxcache.compile(T2.model, fxcache.FirstBlockCache(0.15), **EAGER)
    two, one = _dit_calls(T2)[:5], _dit_calls(T1)[5:]
    with cm.generation(), torch.no_grad():
        [c(cm) for c in two]
        outs = [c(cm) for c in one]
        rec = cm.decisions()[None]
    ref_outs, ref_computed, _ = _fbc_ref(T1, 0.15).run(one)
    assert list(rec[5:]) == ref_computed and False in ref_computed
    for a, b in zip(outs, ref_outs):
        assert torch.equal(a, b)


# ------------------------------------------------------- no sync, no break, no recompile
@contextlib.contextmanager
def _no_host_sync():
    names = ("item", "__bool__", "cpu", "tolist")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def boom(self, *args, **kwargs):
        raise AssertionError("a device-to-host read on the step path")

    for n in names:
        setattr(torch.Tensor, n, boom)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("backend", [None, "aot_eager"])
@pytest.mark.parametrize("sched", [fxcache.FirstBlockCache(0.15), fxcache.TeaCache(0.2)], ids=["fbc", "teacache"])
def test_no_host_sync_on_the_step_path(backend, sched):
    T = tiny("dit", batch=2)
    cm = fxcache.compile(T.model, sched, backend=backend, timestep_rule="off")
    calls = _dit_calls(T)
    warm = _generation(cm, calls)  # warm-up: captures and compiles both kinds
    expected = list(cm.decisions()[None])
    assert True in expected[2:] and False in expected
    with _no_host_sync():
        again = _generation(cm, calls)
    assert list(cm.decisions()[None]) == expected
    for a, b in zip(warm, again):
        assert torch.equal(a, b)


def _count_compiles(T, sched, backend, calls, **kw):
    torch._dynamo.reset()
    counters.clear()
    cm = fxcache.compile(T.model, sched, backend=backend, timestep_rule="off", **kw)
    _generation(cm, calls)
    graphs = counters["stats"]["unique_graphs"]
    first = list(cm.decisions()[None])
    _generation(cm, calls)
    assert list(cm.decisions()[None]) == first
    assert True in first[2:] and False in first  # both kinds ran in the warm-up
    assert dict(counters["graph_break"]) == {}
    assert graphs == 2 == cm.plan.compiled_graphs
    assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled
    return cm


@pytest.mark.parametrize(
    "family,sched",
    [("dit", fxcache.FirstBlockCache(0.15)), ("unet2d", fxcache.AdaptiveDeepCache(0.045, branch=1)),
     ("dit", fxcache.TeaCache(0.2))],
    ids=["dit-fbc", "unet-adc", "dit-teacache"],
)
def test_no_graph_breaks_and_no_recompiles_aot_eager(family, sched):
    T = tiny(family, batch=2)
    cm = _count_compiles(T, sched, "aot_eager", _dit_calls(T))
    eager = fxcache.compile(T.model, sched, **EAGER)
    _generation(eager, _dit_calls(T))
    assert list(cm.decisions()[None]) == list(eager.decisions()[None])


def test_no_graph_breaks_and_no_recompiles_inductor():
    T = tiny("dit", batch=2)
    _count_compiles(T, fxcache.FirstBlockCache(0.15), "inductor", _dit_calls(T))


# --------------------------------------------------------------------- the schedules
def test_schedules_validate_and_round_trip_json():
    for s in (fxcache.FirstBlockCache(0.1, probe=2, first_steps=2, last_steps=1, max_reuse=3),
              fxcache.AdaptiveDeepCache(0.2, branch=1, max_reuse=None)):
        assert schedule_from_json(s.to_json()) == s
    bad = [
        lambda: fxcache.FirstBlockCache(-0.1),
        lambda: fxcache.FirstBlockCache(float("nan")),
        lambda: fxcache.FirstBlockCache(0.1, probe=0),
        lambda: fxcache.FirstBlockCache(0.1, first_steps=0),
        lambda: fxcache.FirstBlockCache(0.1, max_reuse=-1),
        lambda: fxcache.AdaptiveDeepCache(0.1, branch=-1),
        lambda: fxcache.AdaptiveDeepCache(0.1, branch=1, last_steps=1.5),
    ]
    for make in bad:
        with pytest.raises(fxcache.ScheduleError):
            make()


def test_schedules_refuse_models_and_settings_they_do_not_fit():
    from fxcache.schedules import lower

    T = tiny("dit")
    args, kwargs = T.inputs(T.timesteps[0])
    dit = fxcache.units(T.model, *args, **kwargs).infos()
    U = tiny("unet2d")
    args, kwargs = U.inputs(U.timesteps[0])
    unet = fxcache.units(U.model, *args, **kwargs).infos()
    with pytest.raises(fxcache.ScheduleError, match="transformer block"):
        lower(fxcache.FirstBlockCache(0.1), unet)
    with pytest.raises(fxcache.ScheduleError, match="probe"):
        lower(fxcache.FirstBlockCache(0.1, probe=3), dit)
    with pytest.raises(fxcache.ScheduleError, match="skip"):
        lower(fxcache.AdaptiveDeepCache(0.1, branch=0), dit)
    with pytest.raises(fxcache.ScheduleError, match="branch"):
        lower(fxcache.AdaptiveDeepCache(0.1, branch=9), unet)
    with pytest.raises(fxcache.ScheduleError, match="num_steps"):
        lower(fxcache.FirstBlockCache(0.1, last_steps=2), dit)
    mask = lower(fxcache.FirstBlockCache(0.1, probe=2, reuse="sublayers"), dit)
    assert mask.units == ("transformer_blocks.2.attn1", "transformer_blocks.2.ff") and mask.periodic
    mask = lower(fxcache.FirstBlockCache(0.1, probe=2), dit)
    assert mask.units == ("span:transformer_blocks.2..transformer_blocks.2",)
    with pytest.raises(fxcache.ScheduleError, match="reuse"):
        fxcache.FirstBlockCache(0.1, reuse="blocks")
    # SD's U-Net: its transformer blocks sit inside the stages; auto falls back to sublayers
    S = tiny("sd")
    args, kwargs = S.inputs(S.timesteps[0])
    sd = fxcache.units(S.model, *args, **kwargs).infos()
    assert not any(n.startswith("span:") for n in lower(fxcache.FirstBlockCache(0.1), sd).units)
    with pytest.raises(fxcache.ScheduleError, match="U-Net"):
        lower(fxcache.FirstBlockCache(0.1, reuse="span"), sd)


# ------------------------------------------------------------------------- MagCache
def _magcache_loop(ratios, threshold, first_steps, last_steps, max_reuse):
    """MagCache's eager loop (its reference implementation's accumulators), deciding per step."""
    n, computed = len(ratios), []
    accumulated_ratio, accumulated_err, accumulated_steps = 1.0, 0.0, 0
    for cnt in range(n):
        skip = False
        if first_steps <= cnt < n - last_steps:
            accumulated_ratio *= ratios[cnt]
            accumulated_steps += 1
            accumulated_err += abs(1 - accumulated_ratio)
            skip = accumulated_err < threshold and (max_reuse is None or accumulated_steps <= max_reuse)
        if not skip:
            accumulated_ratio, accumulated_err, accumulated_steps = 1.0, 0.0, 0
        computed.append(not skip)
    return computed


def test_magcache_rows_follow_the_magcache_loop():
    from fxcache.schedules.magcache import magcache_rows

    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        ratios = (1.0,) + tuple((0.9 + 0.15 * torch.rand(19, generator=g)).tolist())
        threshold = [0.0, 0.05, 0.2, 1e9][trial % 4]
        first, last, k = 1 + trial % 3, trial % 2 * 2, [None, 1, 2][trial % 3]
        rows = magcache_rows(ratios, threshold, first, last, k)
        assert list(rows) == _magcache_loop(ratios, threshold, first, last, k), trial
    assert all(magcache_rows(ratios, 0.0))
    assert "".join("T" if c else "F" for c in magcache_rows([1.0] * 8, 1e9, 1, 1, 2)) == "TFFTFFTT"


def _dit_run(T):
    def run(m, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 4, 8, 8, generator=g)
        with torch.no_grad():
            for t in STEPS:
                args, kwargs = T.inputs(t)
                m(x, *args[1:], **kwargs)
    return run


def test_fit_magcache_gives_the_magnitude_ratios_of_the_reused_sublayers():
    from fxcache.calibrate.fit import profile_magnitudes

    T = tiny("dit", batch=2)
    prof = profile_magnitudes(T.model, _dit_run(T), seeds=(0, 1))
    ratios = fxcache.fit_magcache(prof)
    # the oracle: hooks on the sublayers, |concat of their outputs|_2 per step, mean over seeds
    mags = []
    for seed in (0, 1):
        per_step, handles, acc = [], [], {"s": 0.0}

        def hook(mod, args, out):
            acc["s"] += out.double().square().sum().item()

        for path in ["transformer_blocks.0.attn1", "transformer_blocks.0.ff"] + DIT_REUSED:
            handles.append(T.model.get_submodule(path).register_forward_hook(hook))

        class Counting(torch.nn.Module):
            def forward(self, *a, **k):
                acc["s"] = 0.0
                out = T.model(*a, **k)
                per_step.append(math.sqrt(acc["s"]))
                return out

        try:
            _dit_run(T)(Counting(), seed)
        finally:
            for h in handles:
                h.remove()
        mags.append(per_step)
    mean = [(a + b) / 2 for a, b in zip(*mags)]
    expected = [1.0] + [mean[t] / mean[t - 1] for t in range(1, len(mean))]
    assert len(ratios) == len(STEPS)
    for a, b in zip(ratios, expected):
        assert a == pytest.approx(b, rel=1e-5)


def test_magcache_is_a_static_plan_matching_the_hook_reference():
    from test_core import NaiveReference

    T = tiny("dit", batch=2)
    ratios = (1.0, 0.97, 0.99, 1.02, 0.96, 0.99, 0.98, 1.05, 0.97, 0.99)
    sched = fxcache.MagCache(0.08, ratios=ratios, max_reuse=2, last_steps=1, reuse="sublayers")
    cm = fxcache.compile(T.model, sched, **EAGER)
    calls = _dit_calls(T)
    outs = _generation(cm, calls)
    plan = cm.plan
    assert plan.adaptive is None and not plan.periodic and plan.num_steps == 10
    mask = fxcache.Mask(plan.table, plan.units)
    expected = _magcache_loop(ratios, 0.08, 1, 1, 2)
    assert [row[0] for row in plan.table] == expected and False in expected
    ref = NaiveReference(T, mask, cm.entries[-1].units)
    with torch.no_grad():
        for step, (t, out) in enumerate(zip(STEPS, outs)):
            assert torch.equal(out, ref(step, t)), step
    assert schedule_from_json(sched.to_json()) == sched


def test_magcache_refuses_what_it_cannot_honour():
    from fxcache.schedules import lower

    T = tiny("dit")
    args, kwargs = T.inputs(T.timesteps[0])
    dit = fxcache.units(T.model, *args, **kwargs).infos()
    with pytest.raises(fxcache.ScheduleError, match="fit_magcache"):
        lower(fxcache.MagCache(0.1), dit)
    with pytest.raises(fxcache.ScheduleError, match="num_steps"):
        lower(fxcache.MagCache(0.1, ratios=[1.0, 0.9]), dit, 5)
    for bad in ([], [1.0, -0.5], [1.0, float("inf")], "1.0"):
        with pytest.raises(fxcache.ScheduleError, match="ratios"):
            fxcache.MagCache(0.1, ratios=bad)
    with pytest.raises(fxcache.ScheduleError):
        fxcache.MagCache(0.1, ratios=[1.0], first_steps=0)
    from fxcache.artefacts import Profile, ProfileError
    import numpy as np

    with pytest.raises(ProfileError, match="profile_magnitudes"):
        fxcache.fit_magcache(Profile(units=("a",), l1rel=np.zeros((3, 1))))


# ------------------------------------------------------------------------- TeaCache
DIT_ALL = ["transformer_blocks.0.attn1", "transformer_blocks.0.ff"] + DIT_REUSED


def _attn_input(model, path="transformer_blocks.0.attn1"):
    """``hook(seen) -> handle``: a pre-hook storing, as ``seen["m"]``, the ``hidden_states``
    that block 0's attention receives: the timestep-modulated input, wherever the model
    modulates it (inside ``norm1`` as DiT's adaLN-Zero, or in the block's forward after a
    plain ``norm1`` as PixArt's ``ada_norm_single``)."""

    def install(seen):
        def pre(mod, args, kwargs):
            seen["m"] = (args[0] if args else kwargs["hidden_states"]).float()

        return model.get_submodule(path).register_forward_pre_hook(pre, with_kwargs=True)

    return install


class TeaReference:
    """TeaCache, lagged, the obvious way: a hook reads block 0's modulated input (its
    ``norm1`` output 0, or ``probe(seen)``'s hook, e.g. :func:`_attn_input`); ``rel``
    against the previous step's, ``p(rel)`` by Horner; ``acc`` = 0 at a computed step,
    ``acc + p`` at a reused one; the next step reuses when ``acc + p < threshold`` (inf
    without a previous step); hooks substitute the output of every attention/MLP
    sublayer in ``reused`` (default: the tiny DiT's) at reused steps."""

    def __init__(self, model, threshold, coefficients=(1.0, 0.0), first_steps=1, last_steps=0, max_reuse=None,
                 num_steps=None, probe=None, reused=None):
        self.model, self.threshold, self.coefficients = model, threshold, coefficients
        self.first, self.last, self.max_reuse, self.num_steps = first_steps, last_steps, max_reuse, num_steps
        self.probe = probe or (lambda seen: model.get_submodule("transformer_blocks.0.norm1").register_forward_hook(
            lambda mod, args, out: seen.__setitem__("m", out[0].float())))
        self.reused = DIT_ALL if reused is None else reused if isinstance(reused, Span) else list(reused)

    def run(self, calls):
        cache, prev, pending, run = {}, None, False, 0
        acc = torch.zeros(())
        outs, computed, stats = [], [], []
        for step, call in enumerate(calls):
            forced = step < self.first or (self.last and step >= self.num_steps - self.last) or (
                self.max_reuse is not None and run >= self.max_reuse)
            compute = forced or not pending
            seen, handles = {}, []
            handles.append(self.probe(seen))
            outs.append(_run_with_reuse_hooks(self.model, self.reused, compute, cache, handles, call))
            m = seen["m"]
            if prev is None or not (prev.abs().sum() > 0).item():
                stat, acc = torch.tensor(math.inf), torch.zeros(())
            else:
                rel = (m - prev).abs().sum() / prev.abs().sum()
                p = None
                for c in self.coefficients:
                    p = rel * 0.0 if p is None else p * rel
                    p = p + c
                acc = acc * 0.0 if compute else acc + p
                stat = acc + p
            pending = bool((stat < self.threshold).item())
            prev = m
            run = 0 if compute else run + 1
            computed.append(compute)
            stats.append(stat.item())
        return outs, computed, stats


def _teacache_run(T):
    return _dit_run(T)


@pytest.mark.parametrize("limits", [{}, dict(max_reuse=2, last_steps=1, num_steps=10)], ids=["default", "limits"])
@pytest.mark.parametrize("reuse", ["span", "sublayers"])
def test_teacache_matches_reference(limits, reuse):
    limits = dict(limits)  # shared between the parametrised cases
    T = tiny("dit", batch=2)
    num_steps = limits.pop("num_steps", None)
    coefficients = (2.0, -0.5, 1.5, 0.01)
    cm = fxcache.compile(T.model, fxcache.TeaCache(0.25, coefficients=coefficients, reuse=reuse, **limits),
                         num_steps=num_steps, **EAGER)
    calls = _dit_calls(T)
    outs = _generation(cm, calls)
    reused = Span([f"transformer_blocks.{i}" for i in range(3)], [(None, "hidden_states")]) if reuse == "span" else None
    ref_outs, ref_computed, ref_stats = TeaReference(T.model, 0.25, coefficients, num_steps=num_steps,
                                                     reused=reused, **limits).run(calls)
    rec = cm.decisions()[None]
    assert list(rec) == ref_computed and True in ref_computed[2:] and False in ref_computed
    assert rec.statistic == ref_stats
    for a, b in zip(outs, ref_outs):
        assert torch.equal(a, b)
    want = ["span:transformer_blocks.0..transformer_blocks.2"] if reuse == "span" else DIT_ALL
    assert set(cm.plan.units) == set(want)


def test_teacache_on_pixart_probes_the_timestep_modulated_input():
    """PixArt's blocks (``ada_norm_single``) have a plain LayerNorm ``norm1`` and modulate
    its output in the block's forward (``norm1(x) * (1 + scale_msa) + shift_msa``). The
    probe is that modulated value: with only the timestep changed between two calls, the
    statistic is the hook-measured relative change of the attention's input, not 0."""
    T = tiny("pixart", batch=2)
    cm = fxcache.compile(T.model, fxcache.TeaCache(0.2), **EAGER)
    calls = _dit_calls(T, [torch.tensor(999), torch.tensor(500)])  # same latent, same text
    _generation(cm, calls)
    seen, ms = {}, []
    handle = _attn_input(T.model)(seen)
    try:
        with torch.no_grad():
            for c in calls:
                c(T.model)
                ms.append(seen["m"])
    finally:
        handle.remove()
    rel = ((ms[1] - ms[0]).abs().sum() / ms[0].abs().sum()).item()
    stat = cm.decisions()[None].statistic
    assert rel > 1e-3 and stat[1] == pytest.approx(rel, rel=1e-5)
    # a whole generation against the hook oracle
    coefficients = (2.0, -0.5, 1.5, 0.01)
    cm = fxcache.compile(T.model, fxcache.TeaCache(0.3, coefficients=coefficients, max_reuse=2, reuse="sublayers"),
                         **EAGER)
    calls = _dit_calls(T)
    outs = _generation(cm, calls)
    reused = module_paths(cm.entries[-1].units, cm.plan.units)
    assert len(reused) == 9  # attn1, attn2 and ff of the three blocks
    ref_outs, ref_computed, ref_stats = TeaReference(T.model, 0.3, coefficients, max_reuse=2, probe=_attn_input(T.model),
                                                     reused=reused).run(calls)
    rec = cm.decisions()[None]
    assert list(rec) == ref_computed and True in ref_computed[2:] and False in ref_computed
    assert rec.statistic[0] == math.inf and rec.statistic[1:] == pytest.approx(ref_stats[1:], rel=1e-5)
    for step, (a, b) in enumerate(zip(outs, ref_outs)):
        assert torch.equal(a, b), step


def test_teacache_threshold_zero_computes_everything_and_huge_reuses_as_allowed():
    T = tiny("dit", batch=2)
    calls = _dit_calls(T)
    cm = fxcache.compile(T.model, fxcache.TeaCache(0.0), **EAGER)
    outs = _generation(cm, calls)
    assert all(cm.decisions()[None])
    with torch.no_grad():
        for c, out in zip(calls, outs):
            assert torch.equal(out, c(T.model))
    cm = fxcache.compile(T.model, fxcache.TeaCache(1e30, max_reuse=3), **EAGER)
    _generation(cm, calls)
    assert "".join("T" if c else "F" for c in cm.decisions()[None]) == "TTFFFTFFFT"


def test_fit_teacache_fits_the_recorded_changes():
    import numpy as np

    from fxcache.calibrate.fit import profile_teacache

    T = tiny("dit", batch=2)
    prof = profile_teacache(T.model, _dit_run(T), seeds=(0, 1))
    coefficients = fxcache.fit_teacache(prof, degree=2)
    # the oracle: eager hooks on block 0's norm1 and the model output, float64
    xs, ys = [], []
    for seed in (0, 1):
        seen, prev = {}, {}
        h = T.model.get_submodule("transformer_blocks.0.norm1").register_forward_hook(
            lambda mod, args, out: seen.__setitem__("m", out[0].double()))

        class Rec(torch.nn.Module):
            def forward(self, *a, **k):
                out = T.model(*a, **k)
                now = {"m": seen["m"], "o": out.sample.double()}
                if prev:
                    xs.append(((now["m"] - prev["m"]).abs().sum() / prev["m"].abs().sum()).item())
                    ys.append(((now["o"] - prev["o"]).abs().sum() / prev["o"].abs().sum()).item())
                prev.update(now)
                return out

        try:
            _dit_run(T)(Rec(), seed)
        finally:
            h.remove()
    got = np.asarray(prof.meta["teacache"]["input"])[:, 1:].reshape(-1)
    np.testing.assert_allclose(got, xs, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(prof.meta["teacache"]["output"])[:, 1:].reshape(-1), ys, rtol=1e-5)
    np.testing.assert_allclose(coefficients, np.polyfit(xs, ys, 2), rtol=1e-3, atol=1e-6)
    # and the fitted polynomial drives a compiled TeaCache
    cm = fxcache.compile(T.model, fxcache.TeaCache(0.3, coefficients=coefficients), **EAGER)
    calls = _dit_calls(T)
    _generation(cm, calls)
    _, ref_computed, _ = TeaReference(T.model, 0.3, coefficients).run(calls)
    assert list(cm.decisions()[None]) == ref_computed


def test_teacache_refuses_what_it_cannot_honour():
    import numpy as np

    from fxcache.artefacts import Profile, ProfileError
    from fxcache.schedules import lower

    for bad in ([], [1.0, float("nan")], "1", [True]):
        with pytest.raises(fxcache.ScheduleError, match="coefficients"):
            fxcache.TeaCache(0.1, coefficients=bad)
    s = fxcache.TeaCache(0.1, coefficients=[1.0, 2.0], max_reuse=2)
    assert schedule_from_json(s.to_json()) == s
    U = tiny("unet2d")
    args, kwargs = U.inputs(U.timesteps[0])
    with pytest.raises(fxcache.ScheduleError, match="transformer block"):
        lower(fxcache.TeaCache(0.1), fxcache.units(U.model, *args, **kwargs).infos())
    with pytest.raises(ProfileError, match="profile_teacache"):
        fxcache.fit_teacache(Profile(units=("a",), l1rel=np.zeros((3, 1))))
    # SD's U-Net transformer blocks: a plain LayerNorm norm1 and no timestep modulation
    # after it (their input depends on the timestep only through the resnets before)
    S = tiny("sd")
    cm = fxcache.compile(S.model, fxcache.TeaCache(0.1), **EAGER)
    with pytest.raises(fxcache.UnsupportedModelError, match="does not depend on the timestep"):
        with torch.no_grad():
            S.call(cm, S.timesteps[0])


def test_bf16_reference_is_stored_in_the_probe_dtype():
    """On a bf16 model the adaptive reference is kept in bf16 (half the state bytes of
    float32) and the statistic is the same as the float32 oracle's: a bf16 value cast to
    float32 and back is unchanged."""
    T = tiny("dit", batch=2, dtype=torch.bfloat16)
    T.model.to(torch.bfloat16)
    sched = fxcache.FirstBlockCache(0.15)
    cm = fxcache.compile(T.model, sched, **EAGER)
    calls = _dit_calls(T)
    _generation(cm, calls)
    ref_outs, ref_computed, ref_stats = _fbc_ref(T, 0.15).run(calls)
    rec = cm.decisions()[None]
    assert list(rec) == ref_computed and False in ref_computed
    assert rec.statistic == pytest.approx(ref_stats, rel=1e-6)
    entry = cm.entries[-1]
    refs = [spec for slot, spec in entry.adaptive.specs.items() if slot[1] == "ref"]
    assert refs and all(dtype == torch.bfloat16 for _, _, dtype in refs)
