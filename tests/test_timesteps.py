"""A Python or numpy number as the timestep (issue 17): the cached model converts it as
the model's own forward would, so a plan that computes everything gives the model's
output bit for bit. ``UNet2DModel`` truncates a non-tensor timestep to an integer
(``torch.tensor([t], dtype=torch.long)``), ``UNet2DConditionModel`` keeps a float as
float64, ``PriorTransformer`` truncates; capture used to make every float a float32
tensor (0.024 off the model on the tiny U-Net). Diffusers' DiT refuses a number: so
does the cached model, in a clear error, instead of an unrelated capture failure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fxcache
from fxcache.errors import FxcacheError
from fxcache.testing import tiny

EAGER = dict(backend=None, timestep_rule="off")


def _full_mask(model, args, kwargs):
    names = [u.name for u in fxcache.units(model, *args, **kwargs) if u.kind != "skip_branch"][:6]
    return fxcache.Mask([[True] * len(names)], names, periodic=True)


def _sample(out):
    if isinstance(out, tuple):
        return out[0]
    return out.sample if hasattr(out, "sample") else out.predicted_image_embedding


def _with_timestep(T, value):
    """The family's call with the timestep replaced by ``value`` (a Python/numpy number)."""
    args, kwargs = T.inputs(T.timesteps[0])
    if "timestep" in kwargs:
        return args, {**kwargs, "timestep": value}
    return (args[0], value, *args[2:]), kwargs


def _prior():
    """A tiny PriorTransformer: a transformer whose forward takes a Python number."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=16,
                                       num_embeddings=4, additional_embeddings=4).eval()
    g = torch.Generator().manual_seed(1)
    x, proj, enc = (torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g),
                    torch.randn(2, 4, 16, generator=g))
    return model, lambda t: ((x, t, proj), {"encoder_hidden_states": enc})


VALUES = [500.7, np.float64(250.5), 999.99, 3, np.int64(7), 0.5]


@pytest.mark.parametrize("family", ["unet2d", "sd", "prior"])
def test_number_timesteps_give_the_models_own_output(family):
    if family == "prior":
        model, call = _prior()
    else:
        T = tiny(family, batch=2)
        model, call = T.model, lambda t: _with_timestep(T, t)
    args, kwargs = call(torch.tensor([500]))
    cm = fxcache.compile(model, _full_mask(model, args, kwargs), **EAGER)
    with torch.no_grad():
        for value in VALUES:
            args, kwargs = call(value)
            ref = _sample(model(*args, **kwargs))
            out = _sample(cm(*args, **kwargs))
            assert torch.equal(out, ref), (family, value, float((out - ref).abs().max()))


def test_unet2d_float_timestep_is_truncated_as_the_model_does():
    """The case of the issue: 500.7 and 500 give the same output, as in UNet2DModel."""
    T = tiny("unet2d")
    args, kwargs = _with_timestep(T, 500)
    cm = fxcache.compile(T.model, _full_mask(T.model, args, kwargs), **EAGER)
    with torch.no_grad():
        a = T.output(T.call(cm, torch.tensor(500)))
        b = T.output(cm(*_with_timestep(T, 500.7)[0], **_with_timestep(T, 500.7)[1]))
    assert torch.equal(a, b)


def test_a_number_the_model_refuses_is_refused_clearly():
    """DiTTransformer2DModel's forward raises for a Python number; the cached model raises
    an FxcacheError naming the argument and the model's own error."""
    T = tiny("dit")
    args, kwargs = _with_timestep(T, 500.7)
    with torch.no_grad(), pytest.raises(Exception):
        T.model(*args, **kwargs)
    cm = fxcache.compile(T.model, fxcache.FORA(interval=2), **EAGER)
    with torch.no_grad(), pytest.raises(FxcacheError) as info:
        cm(*args, **kwargs)
    msg = str(info.value)
    assert "timestep" in msg and "500.7" in msg and "DiTTransformer2DModel" in msg and "tensor" in msg


def test_numpy_float32_timestep_is_refused_as_the_unet_refuses_it():
    """UNet2DModel's own conversion raises for a numpy float32 (``torch.tensor([np.float32],
    dtype=torch.long)``): capture made a float32 tensor of it and gave an output the model
    cannot give."""
    T = tiny("unet2d")
    args, kwargs = _with_timestep(T, np.float32(250.5))
    with torch.no_grad(), pytest.raises(TypeError):
        T.model(*args, **kwargs)
    cm = fxcache.compile(T.model, _full_mask(T.model, *_with_timestep(T, 3)), **EAGER)
    with torch.no_grad(), pytest.raises(FxcacheError, match="float32"):
        cm(*args, **kwargs)


def test_the_models_forward_runs_once_per_kind_of_number(monkeypatch):
    """How the forward converts a number is found once per model, argument and number
    type, not at every step."""
    T = tiny("unet2d")
    args, kwargs = _with_timestep(T, 3)
    cm = fxcache.compile(T.model, _full_mask(T.model, args, kwargs), **EAGER)
    calls = []
    original = type(T.model).forward

    def counting(self, *a, **k):
        calls.append(type(a[1] if len(a) > 1 else k.get("timestep")).__name__)
        return original(self, *a, **k)

    monkeypatch.setattr(type(T.model), "forward", counting)
    with torch.no_grad():
        for value in (500.7, 400.2, 300.1, 200.9):
            cm(*_with_timestep(T, value)[0], **_with_timestep(T, value)[1])
    assert calls.count("float") == 1, calls
