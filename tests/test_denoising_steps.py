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
    with pytest.raises(fxcache.PlanError, match="table for 8 denoising steps, and this pipeline call runs 5"):
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
