"""``fxcache.compile`` checks every argument itself (issue 17, "Right by default"): a bad
one is an ``OptionError`` (a ``FxcacheError`` and a ``ValueError``; ``OptionTypeError``,
also a ``TypeError``, for a wrong type) raised by ``compile``, naming the argument, the
value and what is allowed; never torch's own error at the first call."""

from __future__ import annotations

import pytest
import torch

import fxcache
from fxcache.errors import FxcacheError, OptionError, OptionTypeError
from fxcache.testing import tiny


class _Toy(torch.nn.Module):
    """Nothing to capture is ever reached: compile() must refuse before the first call."""

    def forward(self, x, timestep):  # pragma: no cover - never called
        raise AssertionError("compile() must not run the model")


SCHED = fxcache.FORA(interval=2)


@pytest.mark.parametrize(
    "kwargs, name, allowed, is_type",
    [
        (dict(backend="nonexistent"), "backend", "list_backends", False),
        (dict(backend=3), "backend", "callable", True),
        (dict(mode="bogus"), "mode", "max-autotune", False),
        (dict(mode=1), "mode", "reduce-overhead", True),
        (dict(num_steps=-3), "num_steps", ">= 1", False),
        (dict(num_steps=0), "num_steps", ">= 1", False),
        (dict(num_steps=2.5), "num_steps", ">= 1", True),
        (dict(num_steps=True), "num_steps", ">= 1", True),
        (dict(max_shapes="4"), "max_shapes", ">= 1", True),
        (dict(max_shapes=0), "max_shapes", ">= 1", False),
        (dict(max_shapes=None), "max_shapes", ">= 1", True),
        (dict(max_graphs=1.5), "max_graphs", ">= 1", True),
        (dict(max_graphs=0), "max_graphs", ">= 1", False),
        (dict(fuse="no"), "fuse", "True or False", True),
        (dict(fuse=None), "fuse", "True or False", True),
        (dict(freezing="yes"), "freezing", "True, False or None", True),
        (dict(options=["max_autotune"]), "options", "dict", True),
        (dict(options={1: True}), "options", "str", True),
        (dict(options={"no_such_option": 1}), "options", "list_options", False),
        (dict(segments="always"), "segments", "'auto'", False),
        (dict(timestep_rule="x"), "timestep_rule", "'values'", False),
        (dict(timestep_rule=None), "timestep_rule", "'values'", True),
        (dict(repeated_timesteps="False"), "repeated_timesteps", "True or False", True),
        (dict(forecast=3), "forecast", "0 (reuse), 1 or 2", False),
        (dict(forecast=True), "forecast", "0 (reuse), 1 or 2", True),
        (dict(forecast=1.0), "forecast", "0 (reuse), 1 or 2", True),
        (dict(scale_shift=3), "scale_shift", "ScaleShift", True),
        (dict(max_cache_bytes=0), "max_cache_bytes", ">= 1", False),
        (dict(max_cache_bytes=-1), "max_cache_bytes", ">= 1", False),
        (dict(max_cache_bytes=2.5e9), "max_cache_bytes", "whole number of bytes", True),
        (dict(max_cache_bytes="8GB"), "max_cache_bytes", "whole number of bytes", True),
        (dict(max_cache_bytes=True), "max_cache_bytes", "whole number of bytes", True),
    ],
)
def test_bad_argument_is_refused_by_compile(kwargs, name, allowed, is_type):
    with pytest.raises(OptionError) as info:
        fxcache.compile(_Toy(), SCHED, **kwargs)
    err = info.value
    assert isinstance(err, FxcacheError) and isinstance(err, ValueError)  # old `except ValueError` still works
    assert isinstance(err, TypeError) == is_type and isinstance(err, OptionTypeError) == is_type
    msg = str(err)
    value = next(iter(kwargs.values()))
    assert name in msg and allowed in msg and repr(value) in msg, msg


def test_forecast_message_is_unchanged():
    """Callers matched "forecast must be" when it was a plain ValueError."""
    with pytest.raises(ValueError, match="forecast must be"):
        fxcache.compile(_Toy(), SCHED, forecast=3)


def test_not_a_schedule_is_refused_by_compile():
    for bad in (None, "fora:2", 3):
        with pytest.raises(fxcache.ScheduleError, match="no lowering"):
            fxcache.compile(_Toy(), bad)


def test_a_missing_scale_shift_checkpoint_is_refused_by_compile(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(fxcache.CheckpointError, match="nope.safetensors"):
        fxcache.compile(_Toy(), SCHED, scale_shift=path)


def test_not_a_module_is_still_a_type_error():
    with pytest.raises(TypeError, match="nn.Module"):
        fxcache.compile(lambda x: x, SCHED)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(backend=None), dict(backend="inductor"), dict(backend="aot_eager"), dict(backend="eager"),
        dict(backend=lambda gm, inputs: gm), dict(mode="default"), dict(mode="reduce-overhead"),
        dict(mode="max-autotune"), dict(mode="max-autotune-no-cudagraphs"), dict(num_steps=20),
        dict(options={"max_autotune": False}), dict(freezing=False), dict(segments=True), dict(max_graphs=2),
        dict(timestep_rule="values"), dict(repeated_timesteps=True), dict(forecast=2), dict(num_steps=None),
        dict(max_cache_bytes=None), dict(max_cache_bytes=8 * 2**30),
    ],
)
def test_good_arguments_are_accepted(kwargs):
    cm = fxcache.compile(_Toy(), SCHED, **kwargs)
    assert isinstance(cm, fxcache.CachedModel)


def test_a_good_compile_still_runs():
    T = tiny("dit")
    cm = fxcache.compile(T.model, fxcache.FORA(interval=2), backend=None, num_steps=len(T.timesteps), max_shapes=2,
                         max_graphs=8, fuse=False, freezing=None, options=None)
    with torch.no_grad():
        for t in T.timesteps:
            T.call(cm, t)
    assert len(cm.plan.step_kinds) == 2
