"""Timestep-aware block masking (timestep-aware-block-masking.txt, DESIGN.md §4) on tiny
random-weight models, a few iterations per step: the optimisation, the frozen model, the
learned Mask compiling, and rectification being what the compiler's liveness does."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxcache
from fxcache.analyze.units import find_units
from fxcache.planning import lower_to_plan
from fxcache.calibrate.mask_learning import (
    _liveness_rectify,
    learn_mask,
    learn_mask_details,
    timestep_weights,
)
from fxcache.capture import capture
from fxcache.rewrite.step_graphs import solve_steps
from fxcache.schedules import LearnedMask, Mask, ScheduleError, rectify
from fxcache.testing import tiny

from _reference import hook_cache, mask_rows

STEPS = [999, 666, 333, 0]
BLOCKS = ("transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2")


@pytest.fixture(scope="module")
def dit():
    return tiny("dit")


def _run(m, seed):
    """A 4-step loop: the call pattern of a sampler, not a real one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    labels = torch.tensor([3, 5])
    for t in STEPS:
        eps = m(x, timestep=torch.tensor([t, t]), class_labels=labels).sample
        x = x - 0.2 * eps
    return x


def _outputs(model, seed=0, run=None):
    """The model's output at every step of ``run`` (default ``_run``)."""
    outs = []

    class Tap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, *a, **k):
            out = self.m(*a, **k)
            outs.append(out.sample.clone())
            return out

    with torch.no_grad():
        (run or _run)(Tap(), seed)
    return outs


def _hook_outputs(model, mask, run=None, seed=0):
    """Per-step outputs of ``run`` on the plain model with the mask applied by forward
    hooks (tests/_reference.py): the independent meaning of the mask."""
    run = run or _run
    with hook_cache(model, mask.units, mask_rows(mask)):
        return _outputs(model, seed, run)


def _feature_changes(model, run_or_calls, module=None, seed=0):
    """r_t = |F(t) - F(t-1)|_1 / |F(t)|_1 recomputed by hand on the plain model: F is the
    output of ``module`` (a forward hook), or the model's output when ``module`` is None."""
    feats = []
    if module is not None:
        h = model.get_submodule(module).register_forward_hook(lambda m, a, out: feats.append(out.detach().double()))
    try:
        with torch.no_grad():
            if callable(run_or_calls):
                outs = _outputs(model, seed, run_or_calls)
            else:
                outs = [model(*a, **k).sample for a, k in run_or_calls]
    finally:
        if module is not None:
            h.remove()
    feats = feats if module is not None else [o.double() for o in outs]
    return np.array(
        [np.nan] + [float((feats[t] - feats[t - 1]).abs().sum() / feats[t].abs().sum()) for t in range(1, len(feats))]
    )


@pytest.fixture(scope="module")
def sparse(dit):
    """λ1 above λ2: the sparsity push beats the bimodal pull towards 1 (see test below)."""
    return learn_mask_details(dit.model, _run, LearnedMask(iters=25, lr=0.3, lambda_sparsity=0.05), progress=False)


# ----------------------------------------------------------------------- optimisation
def test_loss_goes_down(sparse):
    r = sparse
    assert r.loss.shape == r.feature_loss.shape == (len(STEPS), 25)
    assert np.isnan(r.loss[0]).all()  # step 0 computes everything and is not trained
    for t in range(1, len(STEPS)):
        assert r.loss[t, -3:].mean() < 0.5 * r.loss[t, :3].mean(), (t, r.loss[t])
    assert r.units == BLOCKS and r.feature == "transformer_blocks.2"
    assert r.alpha.shape == (len(STEPS), 3) and (r.alpha[0] == 1).all()


def test_feature_change_matches_hooks_on_the_plain_model(dit, sparse):
    """r_t (Eq. 9) of the final block's output over the teacher run, recomputed by hand
    from a forward hook on the plain model over the same steps and seed."""
    want = _feature_changes(dit.model, _run, "transformer_blocks.2", seed=LearnedMask().seed)
    np.testing.assert_allclose(sparse.change, want, rtol=1e-6, equal_nan=True)


def test_timestep_weights(sparse):
    r = sparse
    assert np.isnan(r.change[0]) and (r.change[1:] > 0).all()
    np.testing.assert_allclose(r.weights, timestep_weights(r.change))
    assert r.weights[0] == 0 and r.weights[1:].mean() == pytest.approx(1.0)
    # small weight where the feature changes a lot, large where it changes little
    assert np.argmax(r.weights[1:]) == np.argmin(r.change[1:])
    assert np.argmin(r.weights[1:]) == np.argmax(r.change[1:])
    # the formula on hand-made changes: r̄ = 0.5, raw = clip(r̄/r, 1/4, 4) = clip(5, 0.5, 1.25)
    w = timestep_weights([np.nan, 0.1, 1.0, 0.4])
    np.testing.assert_allclose(w, [0.0] + [x / (5.75 / 3) for x in (4.0, 0.5, 1.25)])


def test_learned_mask_is_valid_and_compiles(dit, sparse, tmp_path):
    mask = sparse.mask
    assert isinstance(mask, Mask) and mask.units == BLOCKS and mask.num_steps == len(STEPS)
    assert all(mask.table[0])
    assert Mask.load(mask.save(tmp_path / "mask.json")) == mask
    assert not all(all(row) for row in mask.table[1:])  # something is reused
    cm = fxcache.compile(dit.model, mask, backend=None)
    got, want = _outputs(cm), _hook_outputs(dit.model, mask)
    assert len(got) == len(want) == len(STEPS)
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert cm.plan.planned_flops < cm.plan.full_flops * len(STEPS)


def test_huge_sparsity_reuses_and_zero_sparsity_computes(dit):
    huge = learn_mask(dit.model, _run, LearnedMask(iters=10, lr=0.5, lambda_sparsity=100.0), progress=False)
    assert not any(any(row) for row in huge.table[1:])  # every block reused after step 0
    zero = learn_mask(dit.model, _run, LearnedMask(iters=10, lr=0.5, lambda_sparsity=0.0), progress=False)
    assert all(all(row) for row in zero.table)
    cm = fxcache.compile(dit.model, zero, backend=None)
    for a, b in zip(_outputs(cm), _outputs(dit.model)):
        assert torch.equal(a, b)  # computing everything is the model itself


def test_bimodal_term_holds_alpha_at_one_when_it_outweighs_sparsity(dit):
    # d/dα [λ1 α + λ2 α(1-α)] = λ1 + λ2 (1 - 2α) < 0 near α = 1 when λ1 < λ2: nothing is reused
    r = learn_mask_details(
        dit.model, _run, LearnedMask(iters=15, lr=0.3, lambda_sparsity=0.005, lambda_bimodal=0.01), progress=False
    )
    assert (r.alpha[1:] > 0.9).all() and all(all(row) for row in r.mask.table)


def test_model_frozen_and_restored(dit):
    model = dit.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.pos_embed.proj.weight.requires_grad_(False)  # a mixed set of flags comes back as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(flags.values()) and not all(flags.values())
    model.train()
    try:
        learn_mask(model, _run, LearnedMask(iters=3), progress=False)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert model.training and all(m.training for m in model.modules())
        assert all(p.grad is None for p in model.parameters())
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not any(m._forward_hooks for m in model.modules())
        # also on error: a num_steps that does not match the run
        with pytest.raises(ScheduleError, match="num_steps"):
            learn_mask(model, _run, LearnedMask(iters=1, num_steps=7), progress=False)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert not any(m._forward_hooks for m in model.modules())
    finally:
        model.eval()
        model.pos_embed.proj.weight.requires_grad_(True)


def test_per_step_inputs_instead_of_a_run(dit):
    calls = [dit.inputs(t) for t in dit.timesteps[:3]]
    r = learn_mask_details(dit.model, calls, LearnedMask(iters=2, units="attention"), progress=False)
    assert r.mask.num_steps == 3 and r.units == tuple(f"{b}.attn1" for b in BLOCKS)
    assert r.rectified_by == "liveness"  # attention sublayers are not a chain (residual adds between)
    np.testing.assert_allclose(r.change, _feature_changes(dit.model, calls, "transformer_blocks.2.attn1"),
                               rtol=1e-6, equal_nan=True)  # the last selected unit's output
    out = learn_mask_details(dit.model, calls, LearnedMask(iters=2), feature="output", progress=False)
    assert out.feature == "output"
    # r_t of the model's output, by hand from the plain model's outputs at the same inputs
    np.testing.assert_allclose(out.change, _feature_changes(dit.model, calls), rtol=1e-6, equal_nan=True)
    with pytest.raises(ScheduleError, match="feature"):
        learn_mask(dit.model, calls, LearnedMask(iters=1), feature="last", progress=False)
    with pytest.raises(ScheduleError, match="empty"):
        learn_mask(dit.model, [], LearnedMask(iters=1), progress=False)


def _unet_run(m, seed):
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    for t in STEPS:
        x = x - 0.2 * m(x, torch.tensor(t)).sample
    return x


def test_unet_resnets():
    T = tiny("unet2d")
    r = learn_mask_details(T.model, _unet_run, LearnedMask(iters=2, units="resnet"), progress=False)
    assert len(r.units) == 8 and r.rectified_by == "liveness"  # skip connections: not a chain
    assert r.feature == "up_blocks.1.resnets.1"
    cm = fxcache.compile(T.model, r.mask, backend=None)
    got, want = _outputs(cm, 0, _unet_run), _hook_outputs(T.model, r.mask, _unet_run)
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")


def test_unet_chain_rule_would_be_wrong_liveness_rectification_is_exact():
    """On a U-Net the paper's chain rule drops a resnet whose output a skip connection
    still reads; the liveness rectification used for non-chains changes nothing."""
    T = tiny("unet2d")
    c = capture(T.model, *T.inputs(T.timesteps[0]))
    us = find_units(c.gm)
    units = [u for u in us if u.kind == "resnet"]
    names = tuple(u.name for u in units)
    d0, d1 = names.index("down_blocks.0.resnets.0"), names.index("down_blocks.1.resnets.0")
    row = [True] * len(names)
    row[d1] = False  # the next resnet reuses: the chain rule drops d0 at step 1
    mask = Mask([[True] * len(names), row, [True] * len(names)], names)
    chain = rectify(mask)
    assert not chain.table[1][d0]
    live = _liveness_rectify(c.gm, us, units, mask)
    assert live.table[1][d0]  # its output feeds the skip connection of up_blocks.1

    def outputs(m):
        outs = []
        x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for t in STEPS[:3]:
                outs.append(m(x, torch.tensor(t)).sample)
                x = x - 0.2 * outs[-1]
        return outs, m

    ref, a = outputs(fxcache.compile(T.model, mask, backend=None))
    got, b = outputs(fxcache.compile(T.model, live, backend=None))
    bad, _ = outputs(fxcache.compile(T.model, chain, backend=None))
    assert all(torch.equal(x, y) for x, y in zip(ref, got))
    assert [a.plan.step_flops(s) for s in range(3)] == [b.plan.step_flops(s) for s in range(3)]
    # the mask's meaning, from hooks on the plain model, is what the compiled masks give;
    # the chain-rule mask means something else (d0 is stale at step 1)
    with hook_cache(T.model, names, mask_rows(mask)):
        meant, _ = outputs(T.model)
    for x, y in zip(ref, meant):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert (bad[1] - meant[1]).abs().max() > 1e-3


# ---------------------------------------------------------------------- rectification
HAND_MADE = [
    # block:    0      1      2
    (True, True, True),
    (True, False, True),  # block 1 reuses and block 0 recomputes at step 2: block 0 is dead here
    (True, True, False),  # block 2 reuses: block 1's value only feeds step 3's (dead) cache read
    (False, True, False),  # last step, block 2 reuses: nobody reads block 1
]


def test_rectification_is_what_liveness_already_does(dit):
    """The required check: a hand-made mask and its rectified version compile to the same
    computation: identical outputs at every step, identical executed FLOPs per step."""
    mask = Mask(HAND_MADE, BLOCKS)
    rect = rectify(mask)
    assert rect.table == (
        (True, True, True),
        (False, False, True),
        (True, True, False),
        (False, False, False),
    )
    a = fxcache.compile(dit.model, mask, backend=None)
    b = fxcache.compile(dit.model, rect, backend=None)
    outs_a, outs_b = _outputs(a), _outputs(b)
    assert len(outs_a) == len(STEPS)
    for step, (x, y) in enumerate(zip(outs_a, outs_b)):
        assert torch.equal(x, y), step
    assert a.plan.bound and b.plan.bound
    for step in range(len(STEPS)):
        assert a.plan.step_flops(step) == b.plan.step_flops(step), step
    assert a.plan.planned_flops == b.plan.planned_flops
    # the compiler removed what the mask asked to compute: the mask's own estimate is higher
    assert a.plan.planned_flops < sum(a.plan.estimated_flops(row) for row in mask.table)
    # the liveness version of rectification also sees that block 1 (and so block 0) at
    # step 2 is dead: step 3 reuses block 1, but nobody reads that value. The chain rule
    # keeps them (its next-step copy was itself rectified away); the compiler skips them.
    c = capture(dit.model, *dit.inputs(dit.timesteps[0]))
    us = find_units(c.gm)
    live = _liveness_rectify(c.gm, us, [u for u in us if u.name in BLOCKS], mask)
    assert live.table[:2] == rect.table[:2] and live.table[3] == rect.table[3]
    assert live.table[2] == (False, False, False)
    full = a.plan.full_flops
    block = next(u.flops for u in a.plan.unit_infos if u.name == BLOCKS[1])
    # no block runs at step 2 (nor the patch embedding that only feeds block 0)
    assert a.plan.step_flops(2) == b.plan.step_flops(2) <= full - 3 * block
    assert a.plan.step_flops(2) < a.plan.estimated_flops(rect.table[2])


@pytest.fixture(scope="module")
def dit_graph(dit):
    c = capture(dit.model, *dit.inputs(dit.timesteps[0]))
    us = find_units(c.gm)
    return c.gm, us, [u for u in us if u.name in BLOCKS]


def _executed(gm, us, units, mask):
    plan = lower_to_plan(mask, us, None)
    solved = solve_steps(gm, units, plan)
    plan = plan.bind(solved.kind_of_step, solved.step_kinds)
    return [solved.graphs[solved.kind_of_step[t]].executed for t in range(mask.num_steps)], [
        plan.step_flops(t) for t in range(mask.num_steps)
    ]


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_rectified_masks_execute_the_same_nodes(dit_graph, data):
    gm, us, units = dit_graph
    steps = data.draw(st.integers(2, 6))
    rows = [(True,) * 3] + [tuple(data.draw(st.lists(st.booleans(), min_size=3, max_size=3))) for _ in range(steps - 1)]
    mask = Mask(rows, BLOCKS)
    base = _executed(gm, us, units, mask)
    assert _executed(gm, us, units, rectify(mask)) == base
    assert _executed(gm, us, units, _liveness_rectify(gm, us, units, mask)) == base


# ------------------------------------------------------------------- the blend rewrite
BLEND_UNITS = {"dit": "transformer_block", "unet2d": "resnet"}


@pytest.mark.parametrize("family", ["dit", "unet2d"])
def test_blend_graph_is_the_model_at_one_and_the_cached_plan_at_zero(family):
    """The relaxed graph mask learning differentiates: with every weight 1 it is the
    model bit for bit (and its blended slots are the modules' outputs); with a 0/1
    row it is bit for bit what the runtime gives for that row of a Mask (a unit at 0
    yields the cache of the previous step)."""
    from fxcache.capture import flatten_call
    from fxcache.rewrite.blend import blend_graph

    T = tiny(family)
    model = T.model
    c = capture(model, *T.inputs(T.timesteps[0]))
    units = [u for u in find_units(c.gm) if u.kind == BLEND_UNITS[family]]
    names = [u.name for u in units]
    g = blend_graph(c.gm, units)
    flats = [flatten_call(model, *T.inputs(t))[0] for t in T.timesteps[:3]]
    ones = [torch.ones(()) for _ in units]
    by_name, nodes = {u.name: u for u in units}, {n.name: n for n in c.gm.graph.nodes}
    # caches that must not matter at weight 1
    garbage = [torch.full(nodes[by_name[u].outputs[k]].meta["val"].shape, 7.0) for u, k in g.slots]
    recorded = []
    hooks = [model.get_submodule(u.module).register_forward_hook(lambda m, a, o: recorded.append(o)) for u in units]
    try:
        with torch.no_grad():
            want = T.output(T.call(model, T.timesteps[0]))
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        outs, blocks = g(flats[0], ones, garbage)
    assert torch.equal(outs[0], want)
    assert len(blocks) == len(units) and all(torch.equal(b, r) for b, r in zip(blocks, recorded))

    # rows of 0/1 against the runtime running the same Mask
    rows = [[False] * len(units), [i % 2 == 0 for i in range(len(units))]]
    mask = Mask([[True] * len(units), *rows], names)
    cm = fxcache.compile(model, mask, backend=None)
    with torch.no_grad():
        runtime = [T.output(T.call(cm, t)) for t in T.timesteps[:3]]
        caches = blocks
        for step, row in enumerate(rows, start=1):
            weights = [torch.tensor(1.0 if v else 0.0) for v in row]
            outs, caches = g(flats[step], weights, caches)
            assert torch.equal(outs[0], runtime[step]), step
        full = T.output(T.call(model, T.timesteps[1]))
    assert not torch.equal(runtime[1], full)  # the reuse changes the output: the check above means something

    # without the model's outputs the graph stops at the last unit's output, same values
    h = blend_graph(c.gm, units, model_outputs=False)
    with torch.no_grad():
        none, again = h(flats[0], ones, garbage)
    assert none == [] and all(torch.equal(a, b) for a, b in zip(again, recorded))
    assert len(h.gm.graph.nodes) < len(g.gm.graph.nodes)


@pytest.mark.parametrize("rollout", [False, True], ids=["teacher-caches", "rollout"])
def test_first_relaxed_loss_is_the_hook_oracle(dit, rollout):
    """The loss of the first iteration at each trained step, recomputed independently:
    hooks on the plain model mix each block's output with a cache (tests/_reference.py),
    the straight-through sample redrawn from the same generator, the weights w_t from r_t
    measured by hand. The cache is the teacher's previous-step output (``rollout=False``)
    or what the masked model holds: the block's output at the last step whose learned
    (thresholded, unrectified) row computed it (``rollout=True``, the paper's training
    along the masked denoising). Then training lowers the loss."""
    from _reference import hook_blend

    model = dit.model
    calls = [dit.inputs(t) for t in dit.timesteps[:4]]
    a = torch.sigmoid(torch.full((3,), math.log(0.9 / 0.1), dtype=torch.float32))

    def sample(seed, t):
        return (torch.rand(3, generator=torch.Generator().manual_seed(seed * 1_000_003 + t)) < a).to(a.dtype)

    # a seed whose first sample reuses a block at step 1 (else the mix is the model itself)
    seed = next(s for s in range(100) if not bool(sample(s, 1).all()))
    config = LearnedMask(iters=20, lr=0.3, lambda_sparsity=0.05, seed=seed, rollout=rollout)
    r = learn_mask_details(model, calls, config, progress=False)
    rows = [[bool(v) for v in row] for row in r.unrectified.table]
    assert any(not all(row) for row in rows[1:-1])  # a reuse before the last step: the modes differ

    def block_outputs(args, kwargs, weights=None, caches=None):
        recorded = []
        hooks = [model.get_submodule(b).register_forward_hook(lambda m, i, o: recorded.append(o.detach()))
                 for b in BLOCKS]
        try:
            with torch.no_grad():
                if weights is None:
                    model(*args, **kwargs)
                    return recorded
                with hook_blend(model, BLOCKS, weights, caches) as mixed:
                    model(*args, **kwargs)
                return [x.detach() for x in mixed]
        finally:
            for h in hooks:
                h.remove()

    teacher = [block_outputs(*c) for c in calls]
    held = list(teacher[0])  # the caches the masked model holds after each step
    w = timestep_weights(_feature_changes(model, calls, BLOCKS[-1]))
    for t in range(1, len(calls)):
        caches = held if rollout else teacher[t - 1]
        m = sample(seed, t)
        with torch.no_grad(), hook_blend(model, BLOCKS, m, caches) as mixed:
            model(*calls[t][0], **calls[t][1])
        feat, target = mixed[-1].double(), teacher[t][-1].double()
        fl = float(((feat - target) ** 2).sum() / (target ** 2).sum())
        reg = float(config.lambda_sparsity * a.sum() + config.lambda_bimodal * (a * (1 - a)).sum())
        assert r.feature_loss[t, 0] == pytest.approx(fl, rel=1e-4, abs=1e-9), t
        assert r.loss[t, 0] == pytest.approx(fl + w[t] * reg, rel=1e-4), t
        if t == 1:
            assert fl > 0  # a block was reused: the feature term is not trivially 0
        # the optimisation lowers the loss below the independently computed start
        assert r.loss[t, -3:].mean() < fl + w[t] * reg, (t, r.loss[t])
        binary = torch.tensor([1.0 if v else 0.0 for v in rows[t]])
        held = block_outputs(*calls[t], binary, held)


def test_rollout_takes_the_masked_models_own_steps(dit):
    """With ``run(m, seed)``, rollout learns along the masked model's own denoising: the
    generation the masked run returns is the compiled mask's generation (rectification
    changes no value), and its latents, not the teacher's, feed later steps."""
    config = LearnedMask(iters=15, lr=0.3, lambda_sparsity=0.05)
    seen = []

    def run(m, seed):
        seen.append(_run(m, seed))
        return seen[-1]

    r = learn_mask_details(dit.model, run, config, progress=False)
    assert len(seen) == 2  # the teacher's run and the masked run
    assert any(not all(row) for row in r.mask.table[1:])
    cm = fxcache.compile(dit.model, r.mask, backend=None)
    with torch.no_grad():
        cached = _run(cm, config.seed)
    # the masked run again, by hand with hooks: the same generation as the compiled mask
    with torch.no_grad(), hook_cache(dit.model, r.mask.units, mask_rows(r.mask)):
        by_hooks = _run(dit.model, config.seed)
    torch.testing.assert_close(cached, by_hooks, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen[1], cached, rtol=1e-5, atol=1e-6)  # what the masked run generated
    assert not torch.allclose(seen[0], cached)  # not the teacher's generation
    # and the teacher-cache variant of the same settings learns another mask here
    other = learn_mask_details(dit.model, _run, dataclasses.replace(config, rollout=False), progress=False)
    assert not np.allclose(other.alpha, r.alpha)


def test_a_run_that_changes_its_call_count_is_refused(dit):
    calls = {"n": 0}

    def run(m, seed):
        calls["n"] += 1
        steps = STEPS if calls["n"] == 1 else STEPS[:3]
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 4, 8, 8, generator=g)
        for t in steps:
            x = x - 0.2 * m(x, timestep=torch.tensor([t, t]), class_labels=torch.tensor([3, 5])).sample
        return x

    with pytest.raises(ScheduleError, match="same number of calls"):
        learn_mask(dit.model, run, LearnedMask(iters=1), progress=False)


def test_flops_cost_weighs_each_unit_by_its_flops(dit):
    """``cost="flops"``: the sparsity term is Σ_b c_b α_b with c_b the unit's FLOPs over
    the mean unit's. The costs have mean 1, so at the first iteration (α = 0.9 everywhere)
    the term equals the paper's count; training then pushes the costlier units (the DiT's
    MLPs at these shapes) harder than the paper's count does."""
    calls = [dit.inputs(t) for t in dit.timesteps[:3]]
    args, kwargs = calls[0]
    flops = {u.name: u.flops for u in fxcache.units(dit.model, *args, **kwargs)}
    base = dict(iters=1, lr=1e-9, lambda_sparsity=0.5, lambda_bimodal=0.0, units=("attention", "mlp"), rollout=False)
    by_units = learn_mask_details(dit.model, calls, LearnedMask(**base), progress=False)
    by_flops = learn_mask_details(dit.model, calls, LearnedMask(**base, cost="flops"), progress=False)
    f = np.array([flops[n] for n in by_flops.units], dtype=np.float64)
    assert len(set(f)) > 1  # units of unequal cost: the test means something
    c = f / f.mean()
    for t in (1, 2):
        # the first iteration's regulariser at α = 0.9 everywhere (λ2 = 0)
        reg_units = 0.5 * 0.9 * len(f)
        reg_flops = 0.5 * 0.9 * c.sum()
        assert by_units.loss[t, 0] - by_units.feature_loss[t, 0] == pytest.approx(by_units.weights[t] * reg_units,
                                                                                rel=1e-5)
        assert by_flops.loss[t, 0] - by_flops.feature_loss[t, 0] == pytest.approx(by_flops.weights[t] * reg_flops,
                                                                                rel=1e-5)
    # and training pushes the costlier units harder: after some steps their α is lower
    train = dict(base, iters=30, lr=0.3, lambda_sparsity=0.02)
    r = learn_mask_details(dit.model, calls, LearnedMask(**train, cost="flops"), progress=False)
    u = learn_mask_details(dit.model, calls, LearnedMask(**train), progress=False)
    costly = c > 1
    assert (r.alpha[1:, costly].mean() - u.alpha[1:, costly].mean()) < (r.alpha[1:, ~costly].mean()
                                                                       - u.alpha[1:, ~costly].mean())


def test_learned_mask_config_checks_rollout_and_cost():
    with pytest.raises(ScheduleError, match="cost"):
        LearnedMask(cost="time")
    with pytest.raises(ScheduleError, match="rollout"):
        LearnedMask(rollout="yes")
    assert LearnedMask().rollout is True and LearnedMask().cost == "units"
    from fxcache.schedules.registry import schedule_from_dict

    conf = LearnedMask(rollout=False, cost="flops")
    assert schedule_from_dict(conf.to_dict()) == conf


def _returning_run(m, seed):
    return _run(m, seed)


def test_step_sensitivity_is_the_final_move_per_perturbation(dit):
    """s_t recomputed by hand: the same perturbation added to step t's output by a wrapper
    written here, the final latent's relative move over eps. The last step of this loop
    passes its output straight to the result (x - 0.2 eps), so its s_t is exact: 0.2 |ε_T|
    / |x_T|, a check that does not go through any model."""
    from fxcache.calibrate.mask_learning import step_sensitivity

    model, eps = dit.model, 1e-2
    s = step_sensitivity(model, _returning_run, 0, len(STEPS), eps=eps)
    with torch.no_grad():
        ref = _run(model, 0).double()
        outs = _outputs(model, 0)
    assert s.shape == (len(STEPS),) and (s > 0).all()
    for t in range(len(STEPS)):
        g = torch.Generator().manual_seed(1_000_003 + t)

        class Push(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.i = 0

            def forward(self, *a, **k):
                out = model(*a, **k)
                if self.i == t:
                    x = out.sample
                    out.sample = x + eps * x.pow(2).mean().sqrt() * torch.randn(x.shape, generator=g)
                self.i += 1
                return out

        with torch.no_grad():
            moved = _run(Push(), 0).double()
        assert s[t] == pytest.approx(float((moved - ref).norm() / ref.norm()) / eps, rel=1e-6)
    last = outs[-1].double()
    noise = torch.randn(last.shape, generator=torch.Generator().manual_seed(1_000_003 + len(STEPS) - 1)).double()
    exact = float((0.2 * eps * last.pow(2).mean().sqrt() * noise).norm() / ref.norm()) / eps
    assert s[-1] == pytest.approx(exact, rel=1e-5)


def test_sensitivity_weights():
    from fxcache.calibrate.mask_learning import sensitivity_weights

    w = sensitivity_weights([np.nan, 2.0, 1.0, 0.5], 2.0)
    assert w[0] == 0 and w[1:].mean() == pytest.approx(1.0)
    assert w[1] / w[2] == pytest.approx(0.25) and w[3] / w[2] == pytest.approx(4.0)
    assert sensitivity_weights([np.nan, 1.0, 0.0], 1.0)[2] / sensitivity_weights([np.nan, 1.0, 0.0], 1.0)[1] == \
        pytest.approx(2000.0)  # floored at mean / 1000
    assert (sensitivity_weights([np.nan, 0.0, 0.0], 1.0)[1:] == 1).all()


def test_sensitivity_scaling_and_l2_loss(dit):
    """``loss_scaling="sensitivity"`` weights the regulariser by s_t^-p (p = 1 with the l2
    feature loss) from the measured s_t, and the l2 feature term is the square root of the
    squared one. It needs a run that returns the samples: one that returns nothing is
    refused after the teacher's run, per-step inputs before any work."""
    from fxcache.calibrate.mask_learning import sensitivity_weights, step_sensitivity

    conf = LearnedMask(iters=3, lr=0.3, lambda_sparsity=0.05, loss_scaling="sensitivity", feature_loss="l2")
    r = learn_mask_details(dit.model, _returning_run, conf, progress=False)
    s = step_sensitivity(dit.model, _returning_run, conf.seed, len(STEPS))
    np.testing.assert_allclose(r.sensitivity, s, rtol=1e-9)
    np.testing.assert_allclose(r.weights, sensitivity_weights(s, 1.0), rtol=1e-9)
    mse = learn_mask_details(dit.model, _returning_run, dataclasses.replace(conf, feature_loss="mse"),
                             progress=False)
    np.testing.assert_allclose(mse.weights, sensitivity_weights(s, 2.0), rtol=1e-9)
    # same first sample, same caches at step 1: the l2 term is the root of the squared one
    assert r.feature_loss[1, 0] == pytest.approx(math.sqrt(mse.feature_loss[1, 0]), rel=1e-5)
    def silent(m, seed):
        _run(m, seed)

    with pytest.raises(ScheduleError, match="must return"):
        learn_mask(dit.model, silent, conf, progress=False)
    with pytest.raises(ScheduleError, match="not per-step inputs"):
        learn_mask(dit.model, [dit.inputs(t) for t in dit.timesteps[:3]], conf, progress=False)
    with pytest.raises(ScheduleError, match="loss_scaling"):
        LearnedMask(loss_scaling="always")
    with pytest.raises(ScheduleError, match="feature_loss"):
        LearnedMask(feature_loss="l1")


@pytest.mark.parametrize("k", [1, 2])
def test_max_reuse_bounds_each_units_run_of_reuse(dit, k):
    """With a sparsity push that reuses everything it can, ``max_reuse=K`` still computes
    every unit after K reuses in a row (in the learned, unrectified table), and the mask
    compiles to the hook reference's outputs; without it, runs are longer than K."""
    steps = [999, 800, 600, 400, 200, 0]

    def run(m, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 4, 8, 8, generator=g)
        for t in steps:
            x = x - 0.1 * m(x, timestep=torch.tensor([t, t]), class_labels=torch.tensor([3, 5])).sample
        return x

    conf = LearnedMask(iters=8, lr=0.5, lambda_sparsity=50.0, max_reuse=k)
    r = learn_mask_details(dit.model, run, conf, progress=False)

    def longest_run(table):
        best = 0
        for b in range(len(table[0])):
            n = 0
            for row in table[1:]:
                n = 0 if row[b] else n + 1
                best = max(best, n)
        return best

    assert longest_run(r.unrectified.table) == k
    free = learn_mask_details(dit.model, run, dataclasses.replace(conf, max_reuse=None), progress=False)
    assert longest_run(free.unrectified.table) > k
    cm = fxcache.compile(dit.model, r.mask, backend=None)

    with torch.no_grad():
        cached = run(cm, conf.seed)
        with hook_cache(dit.model, r.mask.units, mask_rows(r.mask)):
            by_hooks = run(dit.model, conf.seed)
    torch.testing.assert_close(cached, by_hooks, rtol=1e-5, atol=1e-6)
    with pytest.raises(ScheduleError, match="max_reuse"):
        LearnedMask(max_reuse=0)
