"""Wan 2.2's two experts in a real ``WanPipeline``: ``transformer`` runs the steps whose
timestep is at or above ``boundary_ratio * num_train_timesteps``, ``transformer_2`` the
rest. ``fxcache.enable(pipe, schedule)`` attaches to both; they share the pipeline's step
source, each keeps its own caches (per expert and per cache context, cond/uncond), and a
schedule's step is the pipeline's step index, not the expert's own call count.

The pipeline is built without the Hub: two tiny ``WanTransformer3DModel`` experts, the
pipeline's own flow-matching scheduler, and prompt embeddings passed in (the pipeline's
documented ``prompt_embeds`` path, so no tokenizer or text encoder is needed); the
latents are returned (``output_type="latent"``), so no VAE runs.
"""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

import fxcache
from fxcache.testing import tiny

EAGER = dict(backend=None)
STEPS = 6  # timesteps 1000, 800.2, 600.4, 400.6, 200.8, 1.0: steps 0-2 on transformer, 3-5 on transformer_2


def _pipe():
    experts = [tiny("wan", seed=s).model for s in (0, 1)]
    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        transformer=experts[0], transformer_2=experts[1], boundary_ratio=0.5,
    )


def _run(pipe, cfg=True):
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 5, 32, generator=g)
    negative = torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return pipe(
            prompt_embeds=embeds, negative_prompt_embeds=negative if cfg else None, height=64, width=64,
            num_frames=5, num_inference_steps=STEPS, guidance_scale=5.0 if cfg else 1.0,
            guidance_scale_2=3.0 if cfg else None, generator=torch.Generator().manual_seed(1), output_type="latent",
        ).frames


def _hook_reference(pipe, modules, computes, by_pipeline_step, cfg=True):
    """The pipeline run with forward hooks on each expert's cached modules: a module's
    output is recorded at a step where ``computes(step)`` and replaced by its last
    recorded value otherwise, with one cache per expert and per CFG branch (cond, then
    uncond at each step) and a first call of each that computes (nothing to reuse yet).
    ``step`` is the pipeline's step index (the position of its current timestep) when
    ``by_pipeline_step``, else the number of steps that expert has run so far."""
    cache, handles = {}, []
    for expert in (pipe.transformer, pipe.transformer_2):
        state = {"calls": 0, "row": None, "key": None}

        def pre(mod, args, kwargs, state=state, expert=expert):
            branch = state["calls"] % 2 if cfg else 0
            if by_pipeline_step:
                step = int((pipe.scheduler.timesteps == pipe._current_timestep).nonzero()[0])
            else:
                step = state["calls"] // (2 if cfg else 1)
            state["calls"] += 1
            key = (id(expert), branch)
            first = not any(k[:2] == key for k in cache)
            state["key"], state["row"] = key, [True] * len(modules) if first else [computes(step)] * len(modules)

        handles.append(expert.register_forward_pre_hook(pre, with_kwargs=True))
        for i, path in enumerate(modules):

            def hook(mod, args, out, i=i, state=state):
                slot = (*state["key"], i)
                if state["row"][i]:
                    cache[slot] = out.clone()
                    return None
                return cache[slot].clone()

            handles.append(expert.get_submodule(path).register_forward_hook(hook))
    try:
        return _run(pipe, cfg)
    finally:
        for h in handles:
            h.remove()


def test_wan22_experts_share_the_pipeline_step_and_keep_their_own_caches():
    pipe = _pipe()
    plain = _run(pipe)
    first, second = pipe.transformer, pipe.transformer_2

    # a compute-everything plan: the uncached pipeline, bit for bit
    fxcache.enable(pipe, fxcache.FORA(1), **EAGER)
    assert fxcache.engine_of(first) is not None and fxcache.engine_of(second) is not None
    assert torch.equal(_run(pipe), plain)
    fxcache.disable(pipe)

    fxcache.enable(pipe, fxcache.FORA(2), **EAGER)
    e1, e2 = fxcache.engine_of(first), fxcache.engine_of(second)
    cached = _run(pipe)
    assert (pipe.scheduler.timesteps >= 500).tolist() == [True] * 3 + [False] * 3  # the boundary: steps 3-5 on transformer_2
    assert e1 is not e2 and e1.step_source is e2.step_source  # one step source: the pipeline's
    # each expert its own buffers, per cache context (cond, uncond), none shared
    ptrs = {}
    for name, engine in (("transformer", e1), ("transformer_2", e2)):
        tensors = engine.cache_tensors()
        assert {ctx for ctx, _ in tensors} == {"cond", "uncond"}
        for held in tensors.values():
            for t in held.values():
                assert t.untyped_storage().data_ptr() not in ptrs, f"{name} shares a buffer"
                ptrs[t.untyped_storage().data_ptr()] = name
    units = e1.entries[-1].units.by_name()
    modules = [units[n].module for n in e1.plan.units]
    assert list(e2.plan.units) == list(e1.plan.units) and len(modules) == 6  # 2 blocks x attn1, attn2, ffn
    fxcache.disable(pipe)

    by_step = _hook_reference(pipe, modules, lambda step: step % 2 == 0, by_pipeline_step=True)
    by_calls = _hook_reference(pipe, modules, lambda step: step % 2 == 0, by_pipeline_step=False)
    torch.testing.assert_close(cached, by_step, rtol=1e-6, atol=1e-6)  # fp32 round-off only
    # the two meanings differ here (transformer_2 starts at the odd step 3), so the match
    # above says which one fxcache runs; and reusing changed the result
    assert not torch.allclose(by_step, by_calls, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cached, plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(_run(pipe), plain)  # detached: the plain pipeline again
