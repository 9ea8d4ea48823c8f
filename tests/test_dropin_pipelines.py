"""A cached denoiser inside diffusers pipelines, as a user saves and restores them."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel

import fxcache
from fxcache.testing import tiny

EAGER = dict(backend=None)
SCHEDULE = fxcache.DeepCache(interval=2, branch=0)


def _pipe():
    T = tiny("unet2d")
    return DDPMPipeline(unet=T.model, scheduler=DDPMScheduler(num_train_timesteps=1000))


def _run(pipe):
    g = torch.Generator().manual_seed(0)
    return pipe(batch_size=1, generator=g, num_inference_steps=3, output_type="np").images


@pytest.mark.parametrize("how", ["assign", "attach", "enable"])
def test_save_pretrained_writes_the_original_model_and_reloads_uncached(tmp_path, how):
    pipe = _pipe()
    pipe.save_pretrained(tmp_path / "plain")
    ref = _run(DiffusionPipeline.from_pretrained(tmp_path / "plain"))  # a reload's scheduler config differs a little
    tmp_path = tmp_path / "cached"
    if how == "assign":
        pipe.unet = fxcache.compile(pipe.unet, SCHEDULE, **EAGER)
    elif how == "attach":
        fxcache.attach(pipe, SCHEDULE, **EAGER)
    else:
        assert fxcache.enable(pipe, SCHEDULE, **EAGER) is pipe
    if how == "assign":
        assert isinstance(pipe.unet, fxcache.CachedModel)
    else:  # attached in place: the component is the model itself
        assert type(pipe.unet) is UNet2DModel and fxcache.engine_of(pipe.unet) is not None
    cached_out = _run(pipe)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"][1] in ("UNet2DModel", "CachedModel") and None not in index["unet"]
    if how != "assign":
        assert index["unet"] == ["diffusers", "UNet2DModel"]  # loads without fxcache
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["_class_name"] == "UNet2DModel"
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.unet) is UNet2DModel
    np.testing.assert_array_equal(_run(loaded), ref)
    # the saving pipeline still caches
    assert isinstance(pipe.unet, fxcache.CachedModel) or fxcache.engine_of(pipe.unet) is not None
    np.testing.assert_array_equal(_run(pipe), cached_out)


def test_disable_restores_component_and_class():
    pipe = _pipe()
    cls, unet = type(pipe), pipe.unet
    ref = _run(pipe)
    fxcache.enable(pipe, SCHEDULE, **EAGER)
    assert type(pipe) is cls and pipe.unet is unet and not np.array_equal(_run(pipe), ref)
    assert fxcache.disable(pipe) is pipe
    assert type(pipe) is cls and pipe.unet is unet
    np.testing.assert_array_equal(_run(pipe), ref)
    assert fxcache.detach is fxcache.disable


def test_enable_and_disable_on_a_model():
    T = tiny("unet2d")
    assert fxcache.enable(T.model, SCHEDULE, **EAGER) is T.model
    assert fxcache.engine_of(T.model).schedule == SCHEDULE
    assert fxcache.disable(T.model) is T.model and fxcache.engine_of(T.model) is None
    cached = fxcache.compile(T.model, SCHEDULE, **EAGER)
    assert fxcache.disable(cached) is T.model
    # a wrapper given to enable is replaced by its model, which gets the new schedule in place
    assert fxcache.enable(cached, fxcache.DeepCache(interval=3, branch=0), **EAGER) is T.model
    assert fxcache.engine_of(T.model).schedule.interval == 3


def test_plan_for_a_pipeline_before_its_first_call():
    """plan_for(pipe, schedule, **call) runs the pipeline up to its denoiser's first call
    (text encoding, latents, scheduler set-up), plans on those very inputs and stops: the
    plan equals the one a real call builds, with the call's number of steps; nothing is
    left attached or cached."""
    pipe = _pipe()
    sched = fxcache.DeepCache(interval=2, branch=0, uniform=False)  # not periodic: needs the step count
    plan = fxcache.plan_for(pipe, sched, batch_size=2, num_inference_steps=5)
    assert plan.num_steps == 5 and plan.units == ("skip_branch.0",)
    assert fxcache.engine_of(pipe.unet) is None and not pipe.unet._forward_pre_hooks
    fxcache.enable(pipe, sched, backend=None)
    pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="np")
    cached = fxcache.engine_of(pipe.unet).plan
    assert cached.table == plan.table and cached.cache_bytes == plan.cache_bytes
    with pytest.raises(TypeError, match="example inputs"):
        fxcache.plan_for(pipe, sched, torch.zeros(1))
    engine = fxcache.engine_of(pipe.unet)
    with pytest.raises(RuntimeError, match="plan_for\\(pipe"):
        fxcache.compile(tiny("unet2d").model, SCHEDULE).plan
    assert engine is fxcache.engine_of(pipe.unet)  # planning an enabled pipeline leaves its engine
    again = fxcache.plan_for(pipe, sched, batch_size=2, num_inference_steps=5)
    assert again.table == plan.table and fxcache.engine_of(pipe.unet) is engine


def test_a_pipeline_tells_the_length_to_a_schedule_that_needs_it():
    """enable(pipe, schedule) without num_steps: a schedule that needs the number of steps
    (non-uniform DeepCache) takes the pipeline call's, and a call of another length plans
    again for that length rather than running a table made for the first."""
    pipe = _pipe()
    fxcache.enable(pipe, fxcache.DeepCache(interval=2, branch=0, uniform=False), backend=None)
    for n in (5, 4, 5):
        pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=n, output_type="np")
        assert fxcache.engine_of(pipe.unet).plan.num_steps == n
