"""Each method end to end on the tiny families it supports, against the naive hook
reference of the core tests (the whole model runs; hooks substitute cached values)."""

import numpy as np
import pytest
import torch

import fxcache
from fxcache.artefacts import Profile
from fxcache.testing import tiny
from _reference import NaiveReference


def _check_against_reference(T, schedule, steps=5, **kw):
    cm = fxcache.compile(T.model, schedule, backend=None, **kw)
    timesteps = [torch.tensor(999 - 180 * i) if T.family not in ("sd3", "flux") else T.timesteps[0] * (1 - 0.18 * i)
                 for i in range(steps)]
    outs = []
    with torch.no_grad():
        for t in timesteps:
            outs.append(T.output(T.call(cm, t)))
        plan = cm.plan
        mask = fxcache.Mask(plan.table, plan.units, periodic=plan.periodic)
        ref = NaiveReference(T, mask, cm.entries[-1].units)
        for step, t in enumerate(timesteps):
            torch.testing.assert_close(outs[step], ref(step, t), rtol=1e-5, atol=1e-5)
    assert plan.ideal_speedup > 1.0
    return cm


@pytest.mark.parametrize("family", ["unet2d", "sd", "sdxl"])
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "non-uniform"])
def test_deepcache(family, uniform):
    T = tiny(family)
    sched = fxcache.DeepCache(interval=2, branch=1) if uniform else fxcache.DeepCache(
        interval=2, branch=1, uniform=False, num_steps=5)
    cm = _check_against_reference(T, sched)
    assert cm.plan.units == ("skip_branch.1",)
    assert "branch 0:" in cm.plan.explain()


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux", "sd"])
def test_fora(family):
    T = tiny(family)
    cm = _check_against_reference(T, fxcache.FORA(interval=2))
    kinds = {u.kind for u in cm.plan.unit_infos}
    assert kinds <= {"attention", "mlp", "branch"}
    if family == "flux":
        assert any(n.endswith(".branch") for n in cm.plan.units)


def _synthetic_profile(units, steps, seed=0):
    rng = np.random.default_rng(seed)
    l1 = rng.uniform(0.02, 0.3, size=(steps, len(units)))
    l1[0] = np.nan
    return Profile(units=tuple(units), l1rel=l1)


@pytest.mark.parametrize("family,kind", [("dit", "transformer_block"), ("unet2d", "attention")])
def test_block_cache(family, kind):
    T = tiny(family)
    args, kwargs = T.inputs(T.timesteps[0])
    names = [u.name for u in fxcache.units(T.model, *args, **kwargs) if u.kind == kind]
    profile = _synthetic_profile(names, 5)
    cm = _check_against_reference(T, fxcache.BlockCache(threshold=0.35, profile=profile, units=kind))
    assert not cm.plan.periodic and cm.plan.num_steps == 5


def test_learned_mask_runs_like_any_mask():
    """A learned mask is an ordinary Mask: compiled, it gives at every step what the naive
    hook reference gives for the same table."""
    T = tiny("dit")
    steps = T.timesteps[:4]
    inputs = [T.inputs(t) for t in steps]
    config = fxcache.LearnedMask(lambda_sparsity=0.05, iters=10, lr=0.3)
    result = fxcache.learn_mask_details(T.model, inputs, config, progress=False)
    mask = result.mask
    assert isinstance(mask, fxcache.Mask) and mask.num_steps == len(steps)
    # the mask is what its learned α says: α > threshold, step 0 computed, then the
    # paper's chain rectification (DiT blocks form a chain)
    raw = [[True] * len(result.units)] + [[bool(a > config.threshold) for a in row] for row in result.alpha[1:]]
    assert result.rectified_by == "chain"
    assert mask == fxcache.rectify(fxcache.Mask(raw, result.units), order=result.units)
    assert (result.alpha[1:] < 0.9).any()  # α moved from its start (0.9)
    assert not all(all(row) for row in mask.table[1:])  # it reuses something: the check below means something
    cm = fxcache.compile(T.model, mask, backend=None)
    ref = NaiveReference(T, mask)
    with torch.no_grad():
        outs = [T.output(T.call(cm, t)) for t in steps]
        for step, t in enumerate(steps):
            torch.testing.assert_close(outs[step], ref(step, t), rtol=1e-5, atol=1e-5)
    full = [T.output(T.call(T.model, t)) for t in steps]
    assert any(not torch.equal(a, b) for a, b in zip(outs, full))  # and reusing changed the output
