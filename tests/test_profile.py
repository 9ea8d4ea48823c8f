"""The profiler (block caching paper, Sec. 3.2, Eq. 6) on tiny random-weight models with a
hand-written 5-step loop: shapes and documented NaN row, agreement with a direct
computation from forward hooks on the eager model, persistence, plotting, and a
BlockCache schedule built from the profile running end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

import fxcache
from fxcache.artefacts import Profile, ProfileError
from fxcache.calibrate.profiler import ProfileRecorder, profile
from fxcache.schedules import UnknownUnitError
from fxcache.testing import tiny

from _reference import hook_cache, mask_rows, stream_residuals, tiny_flux_square

STEPS = [999, 749, 499, 249, 0]
SEEDS = (0, 1)



def _hooked_changes(model, run, units, measure, seeds, per_seed) -> None:
    """Run ``run(model, seed)`` per seed with a forward hook on each unit's module that
    records ``measure(unit, mod, args, kwargs, out)`` (tensors), and add each seed's
    changes between steps to ``per_seed``."""
    for seed in seeds:
        values = {u: [] for u in units}
        handles = []
        for unit in units:

            def hook(mod, args, kwargs, out, unit=unit):
                parts = measure(unit, mod, args, kwargs, out)
                values[unit].append(torch.cat([p.detach().double().flatten() for p in parts]))

            handles.append(model.get_submodule(unit).register_forward_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                run(model, seed)
        finally:
            for h in handles:
                h.remove()
        _add_changes(per_seed, values)


def _add_changes(per_seed, values) -> None:
    """Per unit, one seed's relative L1 change and cosine similarity between steps."""
    for unit, vals in values.items():
        per_seed[unit][0].append([math.nan] + [
            float((vals[t] - vals[t - 1]).abs().sum() / vals[t].abs().sum()) for t in range(1, len(vals))
        ])
        per_seed[unit][1].append([math.nan] + [
            float(torch.nn.functional.cosine_similarity(vals[t], vals[t - 1], dim=0)) for t in range(1, len(vals))
        ])

def _dit_run(m, seed):
    """A 5-step loop: the call pattern of a sampler, not a real one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    labels = torch.tensor([1, 7])
    for t in STEPS:
        eps = m(x, timestep=torch.tensor([t, t]), class_labels=labels).sample
        x = x - 0.2 * eps
    return x


def _unet_run(m, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, 16, 16, generator=g)
    for t in STEPS:
        eps = m(x, torch.tensor(t)).sample
        x = x - 0.2 * eps
    return x


@pytest.fixture(scope="module")
def dit():
    return tiny("dit")


@pytest.fixture(scope="module")
def dit_profile(dit):
    return profile(dit.model, _dit_run, seeds=SEEDS, progress=False)


@pytest.fixture(scope="module")
def unet():
    return tiny("unet2d")


@pytest.fixture(scope="module")
def unet_profile(unet):
    return profile(unet.model, _unet_run, seeds=SEEDS, progress=False)


def _hook_stats(model, run, residual, seeds=SEEDS):
    """Eq. 6 computed directly for several units at once: a forward hook on each eager
    module records, per step, C(t) = its output (all distinct output tensors, flattened
    and concatenated), minus the module's first input where ``residual[unit]`` says so
    and the two have the same shape;
    returns ``{unit: (mean L1rel over seeds, mean cosine over seeds)}``."""
    per_seed = {u: ([], []) for u in residual}
    def measure(unit, mod, args, kwargs, out):
        res = residual[unit]
        tensors = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
        leaves = list({id(x): x for x in tensors}.values())  # a tensor returned twice counts once
        x = args[0] if args else kwargs["hidden_states"]
        if res and x.shape == leaves[0].shape:
            leaves = [leaves[0] - x]
        return leaves

    _hooked_changes(model, run, residual, measure, seeds, per_seed)
    return {u: (np.mean(l1, axis=0), np.mean(cos, axis=0)) for u, (l1, cos) in per_seed.items()}


def _hook_l1rel(model, run, module_path, residual, seeds=SEEDS):
    """Eq. 6 for one unit (see ``_hook_stats``)."""
    return _hook_stats(model, run, {module_path: residual}, seeds)[module_path]


# ------------------------------------------------------------------------------- DiT
def test_dit_profile_shapes_and_row0(dit, dit_profile):
    p = dit_profile
    args, kwargs = dit.inputs(dit.timesteps[0])
    units = fxcache.units(dit.model, *args, **kwargs)
    expected = tuple(u.name for u in units if u.kind != "skip_branch")
    assert p.units == expected and len(p.units) == 9  # 3 blocks x (block, attn1, ff)
    assert p.l1rel.shape == p.cosine.shape == p.l1rel_std.shape == (len(STEPS), 9)
    # row 0 has no previous step: NaN, as documented
    assert np.isnan(p.l1rel[0]).all() and np.isnan(p.cosine[0]).all()
    assert (p.l1rel_std[1:] >= 0).all()
    np.testing.assert_array_equal(p.timesteps, STEPS)
    assert p.meta["seeds"] == list(SEEDS) and p.meta["model_class"] == "DiTTransformer2DModel"
    assert p.meta["num_steps"] == len(STEPS)
    # blocks are measured as output - input, sublayers as their output: every column equals
    # Eq. 6 recomputed from forward hooks on the eager model over the same steps and seeds
    hooks = _hook_stats(dit.model, _dit_run, {u: p.meta["kinds"][u] == "transformer_block" for u in p.units})
    for unit, (l1, cos) in hooks.items():
        col = p.index(unit)
        np.testing.assert_allclose(p.l1rel[:, col], l1, rtol=1e-4, atol=1e-6, err_msg=unit)
        np.testing.assert_allclose(p.cosine[:, col], cos, rtol=1e-5, atol=1e-6, err_msg=unit)
    # the node a block's contribution subtracts is its input: the previous block's output
    # (units found on the same call as the profiled steps)
    g = torch.Generator().manual_seed(0)
    call_units = fxcache.units(dit.model, torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([999, 999]),
                               class_labels=torch.tensor([1, 7])).by_name()
    for i in (1, 2):
        assert p.meta["residual"][f"transformer_blocks.{i}"] == list(call_units[f"transformer_blocks.{i - 1}"].outputs)
    assert p.meta["residual"]["transformer_blocks.1.attn1"] == [None]


@pytest.mark.parametrize(
    "unit, residual",
    [("transformer_blocks.1", True), ("transformer_blocks.2.attn1", False), ("transformer_blocks.0.ff", False)],
)
def test_dit_matches_hooks_on_eager_model(dit, dit_profile, unit, residual):
    l1, cos = _hook_l1rel(dit.model, _dit_run, unit, residual)
    col = dit_profile.index(unit)
    # graph vs eager differ by fp32 round-off only
    np.testing.assert_allclose(dit_profile.l1rel[:, col], l1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dit_profile.cosine[:, col], cos, rtol=1e-5, atol=1e-6)


def test_std_over_seeds(dit, dit_profile):
    col = dit_profile.index("transformer_blocks.1")
    per_seed = [_hook_l1rel(dit.model, _dit_run, "transformer_blocks.1", True, seeds=(s,))[0] for s in SEEDS]
    np.testing.assert_allclose(dit_profile.l1rel_std[1:, col], np.std(per_seed, axis=0)[1:], rtol=1e-3, atol=1e-6)


def test_recorder_is_a_drop_in(dit):
    ref = _dit_run(dit.model, 3)
    rec = ProfileRecorder(dit.model, units="transformer_block")
    out = _dit_run(rec, 3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert rec.config is dit.model.config  # attributes answer as on the model
    assert rec.unit_names == ("transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2")


def test_unit_selection_and_errors(dit):
    example = dit.inputs(dit.timesteps[0])
    calls = []
    with pytest.raises(UnknownUnitError, match="resnet"):  # fails at the example, before any run
        profile(dit.model, lambda m, s: calls.append(s), units="resnet", example=example, progress=False)
    assert calls == []
    with pytest.raises(ProfileError, match="never called"):
        profile(dit.model, lambda m, s: None, progress=False)

    def uneven(m, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 4, 8, 8, generator=g)
        for t in STEPS[: 3 + seed]:
            m(x, timestep=torch.tensor([t, t]), class_labels=torch.tensor([0, 1]))

    with pytest.raises(ProfileError, match="same number of steps"):
        profile(dit.model, uneven, units="attention", seeds=(0, 1), progress=False)


def test_save_load_and_plot(dit_profile, tmp_path):
    path = dit_profile.save(tmp_path / "p.safetensors")
    back = Profile.load(path)
    assert back == dit_profile
    assert back.meta["residual"] == dit_profile.meta["residual"]
    png = tmp_path / "profile.png"
    dit_profile.plot(png)
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_block_cache_from_profile_runs(dit, dit_profile):
    # delta between the smallest and largest per-step change: some reuse, some recompute
    attn = dit_profile.select([u for u in dit_profile.units if u.endswith("attn1")])
    delta = float(np.nanmax(attn.l1rel)) * 1.5
    schedule = fxcache.BlockCache(threshold=delta, profile=dit_profile, units="attention")
    cm = fxcache.compile(dit.model, schedule, backend=None)
    cached = _dit_run(cm, 0)
    full = _dit_run(dit.model, 0)
    table = np.array(cm.plan.table)
    assert table.shape == (len(STEPS), 3) and table[0].all() and not table.all()
    assert cm.plan.planned_flops < cm.plan.full_flops * len(STEPS)
    # what the plan means, by forward hooks on the eager model: a reused attention
    # sublayer returns its output of the last step that computed it
    mask = fxcache.Mask(cm.plan.table, cm.plan.units, periodic=cm.plan.periodic)
    with hook_cache(dit.model, mask.units, mask_rows(mask)), torch.no_grad():
        meant = _dit_run(dit.model, 0)
    torch.testing.assert_close(cached, meant, rtol=1e-5, atol=1e-5)
    # lossy on purpose: the attention outputs of skipped steps are stale
    assert (cached - full).abs().max() > 1e-3


# ---------------------------------------------------------------------------- U-Net
def test_unet_profile(unet, unet_profile):
    p = unet_profile
    assert not any(u.startswith("skip_branch") for u in p.units)
    assert "down_blocks.0.resnets.0" in p.units and "up_blocks.1" in p.units
    assert p.l1rel.shape == (len(STEPS), len(p.units))
    assert np.isnan(p.l1rel[0]).all()
    # every column is Eq. 6 recomputed from forward hooks on the eager model: resnets, the
    # mid block and U-Net attention modules as output - input where the two have the same
    # shape, the others (down/up blocks, all their outputs together) as their output
    residual_kinds = ("resnet", "mid_block", "attention")
    hooks = _hook_stats(unet.model, _unet_run, {u: p.meta["kinds"][u] in residual_kinds for u in p.units})
    for unit, (l1, cos) in hooks.items():
        col = p.index(unit)
        np.testing.assert_allclose(p.l1rel[:, col], l1, rtol=1e-4, atol=1e-6, err_msg=unit)
        np.testing.assert_allclose(p.cosine[:, col], cos, rtol=1e-5, atol=1e-6, err_msg=unit)
    res = p.meta["residual"]
    assert res["down_blocks.0.resnets.0"] != [None]  # output - input
    assert res["mid_block.attentions.0"] != [None]  # U-Net attention module adds its input
    assert res["up_blocks.0.resnets.0"] == [None]  # input has the skip concatenated: no residual form
    assert res["up_blocks.1"] == [None] and res["down_blocks.0"] == [None, None]  # blocks: raw outputs
    assert p.meta["kinds"]["mid_block.attentions.0"] == "attention"


@pytest.mark.parametrize(
    "unit, residual",
    [("down_blocks.0.resnets.0", True), ("mid_block.attentions.0", True), ("up_blocks.0.resnets.0", False)],
)
def test_unet_matches_hooks_on_eager_model(unet, unet_profile, unit, residual):
    l1, cos = _hook_l1rel(unet.model, _unet_run, unit, residual)
    col = unet_profile.index(unit)
    np.testing.assert_allclose(unet_profile.l1rel[:, col], l1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(unet_profile.cosine[:, col], cos, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- Flux
FLUX_STEPS = [1.0, 0.75, 0.5, 0.25, 0.01]


def _stream_hook_stats(model, run, streams, seeds=SEEDS):
    """Eq. 6 for blocks with several streams, from forward hooks on the eager model:
    ``C(t)`` = the concatenation of ``out[i] - input`` over ``streams[unit]`` =
    ``[(output index, input argument name), ...]`` (:func:`stream_residuals`: each
    stream's output minus its own input, found by name, not by shape)."""
    per_seed = {u: ([], []) for u in streams}
    _hooked_changes(model, run, streams,
                    lambda unit, mod, args, kwargs, out: stream_residuals(mod, args, kwargs, out, streams[unit]),
                    seeds, per_seed)
    return {u: (np.mean(l1, axis=0), np.mean(cos, axis=0)) for u, (l1, cos) in per_seed.items()}


def test_flux_blocks_subtract_each_streams_own_input():
    """A tiny Flux with as many text tokens as image tokens: both inputs of a block have
    the shape of both its outputs, so a shape rule pairs the text output with the image
    input. Every block column must equal Eq. 6 from hooks that subtract each stream's
    own input (the double block and the first single block return both streams; the
    last single block's text output is unused, so only its image stream is a unit
    output)."""
    T = tiny_flux_square(batch=1)

    def run(m, seed):
        g = torch.Generator().manual_seed(seed)
        x = None
        for t in FLUX_STEPS:
            args, kwargs = T.inputs(torch.tensor(t))
            x = torch.randn(args[0].shape, generator=g) if x is None else x - 0.2 * out
            out = m(x, **kwargs).sample
        return x

    both = [(1, "hidden_states"), (0, "encoder_hidden_states")]
    streams = {"transformer_blocks.0": both, "single_transformer_blocks.0": both,
               "single_transformer_blocks.1": [(1, "hidden_states")]}
    p = profile(T.model, run, units=list(streams), seeds=SEEDS, progress=False)
    assert p.units == tuple(streams)
    hooks = _stream_hook_stats(T.model, run, streams)
    for unit, (l1, cos) in hooks.items():
        col = p.index(unit)
        np.testing.assert_allclose(p.l1rel[:, col], l1, rtol=1e-4, atol=1e-6, err_msg=unit)
        np.testing.assert_allclose(p.cosine[:, col], cos, rtol=1e-5, atol=1e-6, err_msg=unit)
    # each output subtracts a different node
    for unit in ("transformer_blocks.0", "single_transformer_blocks.0"):
        res = p.meta["residual"][unit]
        assert None not in res and len(set(res)) == 2, unit
