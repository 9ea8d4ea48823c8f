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
