"""fxcache inside real diffusers pipelines (built from configs, random weights)."""

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiTPipeline

import fxcache
from fxcache.testing import tiny

from _reference import every, hook_cache

EAGER = dict(backend=None)


def _ddpm():
    T = tiny("unet2d")
    return DDPMPipeline(unet=T.model, scheduler=DDPMScheduler(num_train_timesteps=1000)), T


def _run_ddpm(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe(batch_size=1, generator=g, num_inference_steps=4, output_type="np").images


def test_ddpm_pipeline_full_plan_is_exact():
    pipe, T = _ddpm()
    ref = _run_ddpm(pipe)
    pipe.unet = fxcache.compile(T.model, fxcache.Mask([[True]], ["skip_branch.0"], periodic=True), **EAGER)
    out = _run_ddpm(pipe)
    np.testing.assert_array_equal(out, ref)


def test_ddpm_pipeline_called_twice_starts_fresh_without_helper():
    pipe, T = _ddpm()
    pipe.unet = fxcache.compile(T.model, fxcache.DeepCache(interval=3, branch=1), **EAGER)
    first = _run_ddpm(pipe)
    second = _run_ddpm(pipe)  # timestep goes back up: a new generation, not the last image's cache
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, _run_ddpm(DDPMPipeline(unet=T.model, scheduler=pipe.scheduler)))  # lossy


def test_attach_resets_every_call():
    pipe, T = _ddpm()
    fxcache.attach(pipe, fxcache.DeepCache(interval=2, branch=0), **EAGER)
    engine = fxcache.engine_of(pipe.unet)
    a = _run_ddpm(pipe)
    engine._state().last_t = -1.0  # defeat timestep detection: only attach's reset remains
    b = _run_ddpm(pipe)
    np.testing.assert_array_equal(a, b)
    assert engine.step == 0  # reset after the call


def _dit_pipe(scheduler=None):
    T = tiny("dit", batch=2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=4,
        sample_size=8,
    ).eval()
    scheduler = scheduler or DDIMScheduler(num_train_timesteps=1000)
    return DiTPipeline(transformer=T.model, vae=vae, scheduler=scheduler), T


def _run_dit(pipe):
    g = torch.Generator().manual_seed(0)
    return pipe(class_labels=[1, 3], guidance_scale=1.0, generator=g, num_inference_steps=4, output_type="np").images


def _fora_by_hooks(model, interval):
    """FORA (fora.txt, Sec. 3.2) written by hand on the plain DiT: at steps 0, N, 2N, ...
    every block's attention and MLP outputs are stored, in between forward hooks return
    them; residual adds and adaLN gates run as usual, with the current step's values."""
    modules = [f"transformer_blocks.{i}.{name}" for i, block in enumerate(model.transformer_blocks)
               for name in ("attn1", "attn2", "ff") if getattr(block, name, None) is not None]
    return hook_cache(model, modules, every(interval, len(modules)))


def test_dit_pipeline_full_plan_is_exact_and_fora_is_close():
    pipe, T = _dit_pipe()
    ref = _run_dit(pipe)
    with _fora_by_hooks(T.model, 2) as hooked:
        fora_by_hand = _run_dit(pipe)
    assert hooked["step"] == 4  # one model call per denoising step
    names = [f"transformer_blocks.{i}" for i in range(3)]
    pipe.transformer = fxcache.compile(T.model, fxcache.Mask([[True] * 3], names, periodic=True), **EAGER)
    np.testing.assert_array_equal(_run_dit(pipe), ref)
    fxcache.attach(pipe, fxcache.FORA(interval=2), **EAGER)
    out = _run_dit(pipe)
    assert out.shape == ref.shape
    # the same pipeline with FORA written as hooks on the plain model: equal up to fp32
    # rounding (the captured graph and the eager modules may order a few ops differently)
    np.testing.assert_allclose(out, fora_by_hand, rtol=0, atol=1e-5)
    assert np.abs(out - ref).max() > 1e-3  # and FORA is lossy: the check above means something
    plan = fxcache.engine_of(pipe.transformer).plan
    print(plan)
    assert plan.ideal_speedup > 1.2
