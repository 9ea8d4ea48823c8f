"""Published denoiser configs on the meta device (``fxcache.configs``) and ``fxcache plan
--config``: plans, FLOPs and cache bytes of real models without their weights."""

from __future__ import annotations

import pytest
import torch

import fxcache
from fxcache import configs
from fxcache.cli import main
from fxcache.errors import OptionError, OptionTypeError

# parameters of the published checkpoints (diffusers' count of the denoiser), in billions
PARAMS = {"sd15": 0.860, "sdxl": 2.567, "sd35-medium": 2.243, "flux-dev": 11.901, "wan21-t2v-14b": 14.288,
          "cogvideox-5b": 5.570}


@pytest.mark.parametrize("name", configs.NAMES)
def test_every_config_builds_on_meta_and_runs_its_pipeline_inputs(name):
    m = configs.info(name)
    model = configs.build(name)
    assert type(model).__name__ == configs.config(name)["_class_name"]
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert sum(p.numel() for p in params) / 1e9 == pytest.approx(PARAMS[name], abs=5e-4)
    assert m.dtype in {p.dtype for p in params}
    args, kwargs = configs.example_inputs(name)
    x = args[0] if args else kwargs["hidden_states"]
    with torch.no_grad():
        out = model(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out.sample
    assert out.shape == x.shape and out.device.type == "meta"


def test_latent_shapes_follow_the_vae_and_packing():
    shape = lambda name, **kw: tuple((lambda a, k: a[0] if a else k["hidden_states"])(*configs.example_inputs(name, **kw)).shape)
    assert shape("sd15") == (1, 4, 64, 64)
    assert shape("sdxl", batch=2) == (2, 4, 128, 128)
    assert shape("flux-dev") == (1, 64 * 64, 64)  # 1024 / 16 per side, 2x2 patches of 16 channels
    assert shape("wan21-t2v-14b") == (1, 16, 21, 60, 104)  # 81 frames -> 21, 480x832 -> 60x104
    assert shape("cogvideox-5b", num_frames=13) == (1, 4, 16, 60, 90)


@pytest.mark.parametrize("kwargs, error", [
    (dict(height=500), OptionError), (dict(width=0), OptionError), (dict(height=512.0), OptionTypeError),
    (dict(num_frames=9), OptionError), (dict(batch=0), OptionError),
])
def test_bad_sizes_are_refused(kwargs, error):
    with pytest.raises(error):
        configs.example_inputs("sd15", **kwargs)


def test_bad_names_and_frames_are_refused():
    with pytest.raises(OptionError, match="sd15"):
        configs.info("sd2")
    with pytest.raises(OptionTypeError):
        configs.info(3)
    with pytest.raises(OptionError, match="4k \\+ 1"):
        configs.example_inputs("wan21-t2v-14b", num_frames=80)


def test_plan_of_a_real_config_and_cache_bytes_scale_with_the_batch():
    model = configs.build("sd15")
    one = configs.plan_config("sd15", fxcache.DeepCache(interval=3, branch=0), height=256, width=256, model=model)
    two = configs.plan_config("sd15", fxcache.DeepCache(interval=3, branch=0), height=256, width=256, batch=2,
                              model=model)
    # skip branch 0 of SD 1.5: 320 channels at the latent resolution (32 x 32), fp16
    assert one.units == ("skip_branch.0",) and one.cache_bytes == 320 * 32 * 32 * 2
    # one state of a CFG batch of 2 holds what two contexts of batch 1 hold
    assert two.cache_bytes == one.total_cache_bytes(2)
    assert configs.flop_speedup(one, 50) == pytest.approx(50 * one.full_flops / sum(
        one.step_flops(s) for s in range(50)))


def test_cli_plan_prints_units_speedup_and_cache_bytes(capsys):
    from fxcache.plan import _fmt_bytes

    assert main(["plan", "--config", "sd15", "--height", "256", "--width", "256", "--steps", "10",
                 "--schedule", "deepcache:3:0"]) == 0
    out = capsys.readouterr().out
    assert "skip_branch.0" in out and "FLOP-ideal speed-up" in out
    per_state = 320 * 32 * 32 * 2
    assert f"{_fmt_bytes(per_state)} per cache state" in out
    assert f"total {_fmt_bytes(2 * per_state)} for 2 cache contexts" in out  # SD 1.5 runs CFG


def test_cli_plan_refuses_what_does_not_apply(capsys):
    assert main(["plan", "--config", "sd15", "--height", "250"]) == 2
    assert "multiple of 64" in capsys.readouterr().err
    assert main(["plan", "--config", "sd15", "--frames", "9"]) == 2
    assert "image model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--config", "sd2"])
    with pytest.raises(SystemExit):
        main(["plan", "--config", "sd15", "--contexts", "0"])


def test_plan_config_counts_what_the_runtime_allocates():
    """An adaptive schedule's state buffers are part of a cache state: plan_config's plan
    (the runtime's build path) counts them, and matches the buffers the runtime lays out."""
    from fxcache.runtime.build import build_entry, prepare
    from fxcache.runtime.options import CompileOptions

    model = configs.build("sd15")
    sched = fxcache.FirstBlockCache(0.1)
    plan = configs.plan_config("sd15", sched, height=256, width=256, model=model)
    args, kwargs = configs.example_inputs("sd15", height=256, width=256)
    entry = build_entry(prepare(model, sched, CompileOptions(backend=None, num_steps=50), args, kwargs),
                        CompileOptions(backend=None, num_steps=50), 0)
    specs = sum(torch.Size(shape).numel() * dtype.itemsize for shape, _, dtype in entry.buffer_specs.values())
    assert plan.state_bytes > 0 and plan.cache_bytes == specs
    # TeaCache needs an adaLN-modulated block input, which SD's U-Net has not: refused as at a first call
    with pytest.raises(fxcache.UnsupportedModelError, match="TeaCache"):
        configs.plan_config("sd15", fxcache.TeaCache(0.2), height=256, width=256, model=model)
