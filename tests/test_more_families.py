"""More transformer families (``fxcache.testing.MORE_FAMILIES``): HunyuanVideo, QwenImage,
LTX-Video, Sana and Chroma, found by structure and checked with the core exactness
checks every family gets: the units FORA caches per block, a compute-everything plan
bit for bit equal to the model in eager mode, FORA(2) equal to the hook reference
(``tests/_reference.py``) to fp32 round-off, and ``fxcache.enable`` in place.

Kept to three captures per family (units, the compute-everything wrapper, the in-place
engine); the graph contract is checked after every pass (``FXCACHE_CHECK=1``, set by
``conftest.py``). Also here: CogVideoX at a resolution other than its config's (its
patch embedding goes through ``Tensor.data``), in its pipeline and alone."""

import numpy as np
import pytest
import torch

import fxcache
from fxcache.schedules import lower
from fxcache.testing import MORE_FAMILIES, tiny

from _reference import NaiveReference

EAGER = dict(backend=None)

# per family: the units FORA caches in block 0 (attention and MLP sublayers by
# structure, or the whole residual branch of a single-stream block) and how many
# FORA units the tiny config has in all
FORA_UNITS = {
    # double-stream blocks as Flux, then single-stream blocks cached as their residual branch;
    # the token refiner inside context_embedder is a conditioning sub-network, not blocks
    "hunyuanvideo": (["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
                      "single_transformer_blocks.0.branch"], 8),
    # MLPs named img_mlp/txt_mlp, found by type (FeedForward); the last block's text
    # stream is never used, so its txt_mlp is not a unit (nothing leaves it)
    "qwenimage": (["transformer_blocks.0.attn", "transformer_blocks.0.img_mlp", "transformer_blocks.0.txt_mlp"], 5),
    "ltx": (["transformer_blocks.0.attn1", "transformer_blocks.0.attn2", "transformer_blocks.0.ff"], 6),
    # linear self-attention, cross-attention and a convolutional MLP (GLUMBConv, named ff)
    "sana": (["transformer_blocks.0.attn1", "transformer_blocks.0.attn2", "transformer_blocks.0.ff"], 6),
    "chroma": (["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
                "single_transformer_blocks.0.branch"], 8),
}


def _outputs(T, model):
    with torch.no_grad():
        return [T.output(T.call(model, t)).clone() for t in T.timesteps]


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_family_is_found_by_structure_and_exact(family):
    T = tiny(family)
    args, kwargs = T.inputs(T.timesteps[0])
    units = fxcache.units(T.model, *args, **kwargs)
    names = [u.name for u in units]
    first, count = FORA_UNITS[family]
    infos = units.infos()
    fora = lower(fxcache.FORA(2), infos)
    assert [n for n in fora.units if ".0." in n] == first, names
    assert len(fora.units) == count
    assert all(u.flops > 0 and u.cache_bytes > 0 for u in units if u.name in set(fora.units))
    # the model's blocks are its top-level lists: HunyuanVideo's token refiner (attention
    # blocks inside context_embedder) is a conditioning sub-network, so the first block
    # (FirstBlockCache's probe, TeaCache's block 0) is transformer_blocks.0
    blocks = [u.name for u in units if u.kind in ("transformer_block", "single_block")]
    singles = ["single_transformer_blocks.0", "single_transformer_blocks.1"] if family in ("hunyuanvideo", "chroma") else []
    assert blocks == ["transformer_blocks.0", "transformer_blocks.1"] + singles
    assert not [u for u in units if u.kind == "skip_branch"]

    plain = _outputs(T, T.model)
    # a plan that computes every unit at every step: the model's own output, bit for bit
    everything = fxcache.compile(T.model, fxcache.FORA(1), **EAGER)
    got = _outputs(T, everything)
    assert all(torch.equal(a, b) for a, b in zip(got, plain))
    assert everything.plan.ideal_speedup == pytest.approx(1.0) and len(everything.plan.step_kinds) == 1
    # the captured graph shares the model's parameters (nothing copied)
    params = dict(T.model.named_parameters())
    gm = everything.entries[-1].captured.gm
    assert all(p is params[name] for name, p in gm.named_parameters())

    # FORA(2): what the hook reference means (the sublayers' outputs reused at odd steps)
    ref = NaiveReference(T, fora, units)
    with torch.no_grad():
        expected = [ref(step, t).clone() for step, t in enumerate(T.timesteps)]
    assert torch.equal(expected[0], plain[0]) and not torch.equal(expected[1], plain[1])

    # attached in place: the same object, FORA(2) as the reference, then detached again
    assert fxcache.enable(T.model, fxcache.FORA(2), **EAGER) is T.model
    try:
        cached = _outputs(T, T.model)
        engine = fxcache.engine_of(T.model)
        assert engine.captures == 1 and engine.plan.ideal_speedup > 1.5
        assert list(engine.plan.units) == list(fora.units)
    finally:
        fxcache.disable(T.model)
    for step, (a, b) in enumerate(zip(cached, expected)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"step {step}")  # fp32 round-off only
    assert not torch.equal(cached[1], plain[1]) and torch.equal(cached[2], plain[2])
    assert all(torch.equal(a, b) for a, b in zip(_outputs(T, T.model), plain))



# ------------------------------------------- CogVideoX at a resolution not its config's


def _cogvideox_2b(side_h=12, side_w=10):
    """CogVideoX 1.0 without rotary embeddings (as CogVideoX-2b): its patch embedding adds a
    sin-cos positional embedding, precomputed for the config's 8x8 latents and built in
    the forward (through ``Tensor.data``) for any other size; called here at 12x10."""
    import diffusers

    from fxcache.testing import Tiny

    torch.manual_seed(0)
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        max_text_seq_length=5, use_rotary_positional_embeddings=False,
    ).eval()
    g = torch.Generator().manual_seed(1)
    x, enc = torch.randn(1, 2, 4, side_h, side_w, generator=g), torch.randn(1, 5, 32, generator=g)
    inputs = lambda t: ((x,), {"encoder_hidden_states": enc, "timestep": t.reshape(1)})
    return Tiny("cogvideox", model, inputs, [torch.tensor(t) for t in (999, 749, 499, 249)], False)


def test_cogvideox_at_another_resolution_than_its_config():
    """Used to be a CaptureError ("We found a fake tensor in the exported program
    constant's list ... patch_embed.lifted_tensor_0"): capture reads ``.data`` as
    ``.detach()``, and the write through it is functionalised. In its own pipeline
    (96x80 pixels: 12x10 latents, CFG) a compute-everything plan is the uncached
    pipeline bit for bit; alone, FORA(2) is the hook reference."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    T = _cogvideox_2b()
    args, kwargs = T.inputs(T.timesteps[0])
    assert args[0].shape[-2:] != (T.model.config.sample_height, T.model.config.sample_width)
    # the pipeline with prompt embeddings given (no text encoder) and latents returned (no VAE)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=T.model,
                             scheduler=CogVideoXDDIMScheduler())

    def run():
        g = torch.Generator().manual_seed(0)
        embeds, negative = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
        with torch.no_grad():
            return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=96, width=80, num_frames=5,
                        num_inference_steps=3, max_sequence_length=5, generator=torch.Generator().manual_seed(1),
                        output_type="latent").frames

    plain = run()
    assert plain.shape[-2:] == (12, 10)
    fxcache.enable(pipe, fxcache.FORA(1), **EAGER)
    try:
        assert torch.equal(run(), plain)
        engine = fxcache.engine_of(T.model)
        assert engine.captures == 1
        units = engine.entries[-1].units
        params = dict(T.model.named_parameters())
        assert all(p is params[name] for name, p in engine.entries[-1].captured.gm.named_parameters())
    finally:
        fxcache.disable(pipe)

    reference = _outputs(T, T.model)
    cached = fxcache.compile(T.model, fxcache.FORA(2), **EAGER)
    got = _outputs(T, cached)
    ref = NaiveReference(T, lower(fxcache.FORA(2), units.infos()), units)
    with torch.no_grad():
        for step, t in enumerate(T.timesteps):
            torch.testing.assert_close(got[step], ref(step, t), rtol=1e-6, atol=1e-6)
    assert not torch.equal(got[1], reference[1])


def test_tensor_data_in_a_forward_reads_the_live_tensor():
    """``p.data`` in a forward is captured as a read of the parameter (not a baked copy),
    so a weight changed in place is seen; a write into a parameter through ``.data`` is
    refused like any other write into the model's state."""
    from fxcache.capture import capture
    from fxcache.errors import CaptureError

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w.data

    class Writes(Scale):
        def forward(self, x):
            self.w.data.copy_(x)
            return x * 2

    m = Scale()
    c = capture(m, (torch.ones(3),))
    with torch.no_grad():
        m.w.mul_(2)
    assert torch.equal(c.gm(torch.ones(3))[0], torch.full((3,), 2.0))
    with pytest.raises(CaptureError, match=r"writes parameter 'w' in place"):
        capture(Writes(), (torch.ones(3),))


@pytest.mark.parametrize("family", MORE_FAMILIES)
@pytest.mark.parametrize("schedule", ["FirstBlockCache", "TeaCache"])
def test_adaptive_schedules_on_spans(family, schedule):
    """FirstBlockCache and TeaCache lower onto one residual span on every new family:
    threshold 0 computes every step (bit-exact), a huge one reuses after the first two
    steps and changes the output."""
    T = tiny(family)
    make = getattr(fxcache, schedule)
    calls = [T.inputs(t) for t in T.timesteps]
    with torch.no_grad():
        plain = [T.output(T.model(*a, **k)) for a, k in calls]
        for threshold, reuses in ((0.0, False), (1e30, True)):
            cm = fxcache.compile(T.model, make(threshold), backend=None)
            with cm.generation():
                outs = [T.output(cm(*a, **k)) for a, k in calls]
            assert all(u.startswith("span:") for u in cm.plan.units), cm.plan.units
            assert (False in cm.decisions()[None]) == reuses
            same = [torch.equal(o, p) for o, p in zip(outs, plain)]
            assert all(same) if not reuses else not all(same)


def _steps(T, n=5):
    return list(T.timesteps[:n])


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_block_cache_from_a_real_profile(family):
    """Block caching on each newer family: a profile measured on the family's own calls
    (the profiler's captured graph, no hooks), BlockCache lowered from it, the compiled
    model equal to the hook reference at every step."""
    T = tiny(family)
    steps = _steps(T)

    def run(m, seed):
        with torch.no_grad():
            for t in steps:
                T.call(m, t)

    prof = fxcache.profile(T.model, run, units="transformer_block", seeds=(0,), progress=False)
    assert prof.num_steps == len(steps) and len(prof.units) >= 2
    assert np.isfinite(prof.l1rel[1:]).all() and (prof.l1rel[1:] > 0).all()
    # a δ that reuses some blocks and not others
    delta = float(np.median(prof.l1rel[1:]))
    cm = fxcache.compile(T.model, fxcache.BlockCache(threshold=delta, profile=prof, units="transformer_block"),
                         **EAGER)
    with torch.no_grad():
        outs = [T.output(T.call(cm, t)).clone() for t in steps]
    plan = cm.plan
    mask = fxcache.Mask(plan.table, plan.units, periodic=plan.periodic)
    assert any(not all(r) for r in mask.table[1:]), str(mask)
    with torch.no_grad():
        ref = NaiveReference(T, mask, cm.entries[-1].units)
        for step, t in enumerate(steps):
            torch.testing.assert_close(outs[step], ref(step, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_learned_mask_on_a_rollout(family):
    """Timestep-aware block masking on each newer family, learned along the masked
    model's own steps (``rollout``): the mask reuses something, and compiled it gives the
    hook reference's output at every step; the masked run's own outputs are that too."""
    T = tiny(family)
    steps = _steps(T)
    seen = []

    def run(m, seed):
        with torch.no_grad():
            seen.append([T.output(T.call(m, t)).clone() for t in steps])

    r = fxcache.learn_mask_details(T.model, run, fxcache.LearnedMask(iters=12, lr=0.3, lambda_sparsity=0.05,
                                                                    units="transformer_block"), progress=False)
    mask = r.mask
    assert mask.num_steps == len(steps) and any(not all(row) for row in mask.table[1:]), str(mask)
    cm = fxcache.compile(T.model, mask, **EAGER)
    with torch.no_grad():
        outs = [T.output(T.call(cm, t)).clone() for t in steps]
        ref = NaiveReference(T, mask, cm.entries[-1].units)
        for step, t in enumerate(steps):
            torch.testing.assert_close(outs[step], ref(step, t), rtol=1e-5, atol=1e-5)
    assert len(seen) == 2  # the teacher's run, then the masked run
    for a, b in zip(seen[1], outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
