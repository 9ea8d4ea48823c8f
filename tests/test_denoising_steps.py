"""Steps are denoising steps: attached to a pipeline (``fxcache.enable(pipe, ...)``), the
plan is applied per denoising step as the pipeline's scheduler counts them, for every
scheduler: Heun and KDPM2 call the model twice per step (one step), PNDM once per loop
iteration (its repeated timestep is a step of its own).

The reference is the plan written with forward hooks on the plain model
(``tests/_reference.py``), whose step is ``model call // scheduler.order``: no fxcache
code decides it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fxcache
from fxcache.testing import tiny

from _reference import every, hook_cache
from test_pipelines import _dit_pipe

EAGER = dict(backend=None)
STEPS = 5

# (scheduler class name, config overrides): every discrete-time scheduler diffusers ships
# that DiTPipeline (an epsilon-prediction model) can run
SCHEDULERS = [
    ("DDIMScheduler", {}),
    ("DDPMScheduler", {}),
    ("PNDMScheduler", {"skip_prk_steps": True}),
    ("PNDMScheduler", {"skip_prk_steps": False}),
    ("HeunDiscreteScheduler", {}),
    ("KDPM2DiscreteScheduler", {}),
    ("KDPM2AncestralDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("LMSDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverSinglestepScheduler", {}),
    ("UniPCMultistepScheduler", {}),
    ("DEISMultistepScheduler", {}),
    ("LCMScheduler", {}),
    ("TCDScheduler", {}),
    ("IPNDMScheduler", {}),
]


def _scheduler(name, overrides):
    import diffusers

    return getattr(diffusers, name)(num_train_timesteps=1000, **overrides)


def _run_dit(pipe, steps=STEPS):
    torch.manual_seed(0)  # ancestral schedulers draw from the global generator
    g = torch.Generator().manual_seed(0)
    return pipe(class_labels=[1, 3], guidance_scale=1.0, generator=g, num_inference_steps=steps,
                output_type="np").images


def _fora_modules(model):
    return [f"transformer_blocks.{i}.{name}" for i, block in enumerate(model.transformer_blocks)
            for name in ("attn1", "ff") if getattr(block, name, None) is not None]


@pytest.mark.parametrize("name,overrides", SCHEDULERS,
                         ids=[n + ("-prk" if o.get("skip_prk_steps") is False else "") for n, o in SCHEDULERS])
def test_dit_fora_applies_the_plan_per_denoising_step(name, overrides):
    scheduler = _scheduler(name, overrides)
    pipe, T = _dit_pipe(scheduler)
    order = scheduler.order
    modules = _fora_modules(T.model)
    base = every(2, len(modules))
    with hook_cache(T.model, modules, lambda call: base(call // order)) as hooked:
        ref = _run_dit(pipe)
    calls = hooked["step"]
    fxcache.enable(pipe, fxcache.FORA(interval=2), **EAGER)
    out = _run_dit(pipe)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    assert fxcache.engine_of(T.model).step_source.calls == calls  # one scheduler step per model call
    # and a second call is the same (each call starts fresh)
    np.testing.assert_array_equal(_run_dit(pipe), out)


def test_a_non_periodic_plan_of_another_length_is_an_error():
    pipe, T = _dit_pipe(_scheduler("DDIMScheduler", {}))
    mask = fxcache.Mask.from_steps({"transformer_blocks.1": [0, 3, 5]}, num_steps=8)
    fxcache.enable(pipe, mask, **EAGER)
    with pytest.raises(fxcache.PlanError, match="table for 8 denoising steps, and this generation runs 5"):
        _run_dit(pipe, steps=5)
    _run_dit(pipe, steps=8)


def test_a_bare_generation_shorter_than_the_plan_warns():
    T = tiny("dit")
    mask = fxcache.Mask.from_steps({"transformer_blocks.1": [0, 3]}, num_steps=8)
    cm = fxcache.compile(T.model, mask, **EAGER)
    with torch.no_grad():
        for t in T.timesteps[:3]:
            T.call(cm, t)
        cm.reset()
        with pytest.warns(RuntimeWarning, match="ended after 3 of its plan's 8 steps"):
            T.call(cm, T.timesteps[0])


def test_cache_context_step_index_wins_over_the_timestep_rule():
    """Called twice per timestep inside ``cache_context(step_index=i)``: the given step
    stands (the timestep rule used to start a new generation at the repeated timestep)."""
    T = tiny("dit")
    cm = fxcache.compile(T.model, fxcache.FORA(interval=2), **EAGER)
    with torch.no_grad():
        for i, t in enumerate(T.timesteps[:3]):
            for _ in range(2):
                with cm.cache_context("c", step_index=i):
                    assert cm.step == i
                    T.call(cm, t)


def test_a_bare_model_that_never_reuses_warns_once():
    T = tiny("dit")
    cm = fxcache.compile(T.model, fxcache.FORA(interval=2), **EAGER)
    t = T.timesteps[1]
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="caching saved nothing"):
        for _ in range(4):
            T.call(cm, t)  # the same timestep each call: every call starts a new generation


# ------------------------------------------------- diffusers' order-aware loop
class _LoopPipeline:
    """Built lazily (diffusers import): a DiffusionPipeline with the denoising loop of
    diffusers' text-to-image pipelines (progress bar of ``num_inference_steps``, updated
    every ``scheduler.order`` iterations after the warm-up), for a bare denoiser."""

    @staticmethod
    def make(name, denoiser, scheduler, call):
        from diffusers import DiffusionPipeline

        class LoopPipeline(DiffusionPipeline):
            def __init__(self, scheduler, unet=None, transformer=None):
                super().__init__()
                self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer)

            @torch.no_grad()
            def __call__(self, latents, num_inference_steps):
                self.scheduler.set_timesteps(num_inference_steps)
                timesteps = self.scheduler.timesteps
                warmup = len(timesteps) - num_inference_steps * self.scheduler.order
                denoiser = getattr(self, name)
                with self.progress_bar(total=num_inference_steps) as bar:
                    for i, t in enumerate(timesteps):
                        scale = getattr(self.scheduler, "scale_model_input", None)  # flow matching has none
                        out = call(denoiser, scale(latents, t) if scale else latents, t)
                        latents = self.scheduler.step(out, t, latents).prev_sample
                        if i == len(timesteps) - 1 or ((i + 1) > warmup and (i + 1) % self.scheduler.order == 0):
                            bar.update()
                self.maybe_free_model_hooks()
                return latents

        return LoopPipeline(scheduler=scheduler, **{name: denoiser})


def _per_step_against_hooks(T, name, scheduler, mask_units, call, latents):
    pipe = _LoopPipeline.make(name, T.model, scheduler, call)
    order = scheduler.order
    rows = lambda step: [step % 2 == 0] * len(mask_units)
    torch.manual_seed(0)
    with hook_cache(T.model, mask_units, lambda c: rows(c // order)):
        ref = pipe(latents.clone(), STEPS)
    mask = fxcache.Mask([[True] * len(mask_units), [False] * len(mask_units)], mask_units, periodic=True)
    fxcache.enable(pipe, mask, **EAGER)
    torch.manual_seed(0)
    out = pipe(latents.clone(), STEPS)
    # the captured graph and eager modules may order a few fp32 ops differently; Karras-sigma
    # schedulers carry latents of magnitude ~100, hence a relative tolerance
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    assert torch.equal(pipe(latents.clone(), STEPS), out)  # each call starts fresh


@pytest.mark.parametrize("name,overrides", SCHEDULERS,
                         ids=[n + ("-prk" if o.get("skip_prk_steps") is False else "") for n, o in SCHEDULERS])
def test_unet_applies_the_plan_per_denoising_step(name, overrides):
    T = tiny("unet2d")
    args, _ = T.inputs(T.timesteps[0])
    _per_step_against_hooks(T, "unet", _scheduler(name, overrides), ["down_blocks.1", "mid_block"],
                            lambda m, x, t: m(x, t).sample, args[0])


@pytest.mark.parametrize("name", ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"])
def test_flux_applies_the_plan_per_denoising_step(name):
    """Flux is called with ``t / 1000``, a timestep computed afresh at every call: it says
    nothing about generations; the pipeline's scheduler does."""
    import diffusers

    T = tiny("flux")
    args, kwargs = T.inputs(T.timesteps[0])

    def call(m, x, t):
        kw = dict(kwargs, timestep=(t / 1000).expand(x.shape[0]))
        return m(x, **kw).sample

    units = ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "single_transformer_blocks.0.attn"]
    _per_step_against_hooks(T, "transformer", getattr(diffusers, name)(), units, call, args[0])


def test_cache_context_num_inference_steps_checks_the_length_before_the_first_step():
    T = tiny("dit")
    mask = fxcache.Mask.from_steps({"transformer_blocks.1": [0, 3]}, num_steps=8)
    cm = fxcache.compile(T.model, mask, **EAGER)
    with torch.no_grad(), cm.cache_context("cond", num_inference_steps=5):
        with pytest.raises(fxcache.PlanError, match="generation runs 5"):
            T.call(cm, T.timesteps[0])
    with torch.no_grad(), cm.cache_context("cond", num_inference_steps=8):
        T.call(cm, T.timesteps[0])
