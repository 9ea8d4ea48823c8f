"""``fxcache.enable`` attaches caching to the denoiser object itself: same class, same
names, same ``state_dict``, peft and diffusers hooks work on it, it pickles and
deep-copies, and ``disable`` leaves it as it was."""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

import fxcache
from fxcache.testing import tiny

EAGER = dict(backend=None)


def _full_mask(T):
    args, kwargs = T.inputs(T.timesteps[0])
    names = [u.name for u in fxcache.units(T.model, *args, **kwargs) if u.kind != "skip_branch"][:4]
    return fxcache.Mask([[True] * len(names)], names, periodic=True)


def _outs(T, model, n=4):
    with torch.no_grad():
        return [T.output(T.call(model, t)) for t in T.timesteps[:n]]


def _names(m):
    return ([n for n, _ in m.named_modules()], [n for n, _ in m.named_parameters()],
            [n for n, _ in m.named_buffers()], list(m.state_dict()))


@pytest.mark.parametrize("family", ["unet2d", "sd", "dit", "flux"])
def test_enable_keeps_the_model_what_it_is(family):
    T = tiny(family)
    m, cls = T.model, type(T.model)
    names, ref = _names(m), _outs(T, m)
    dict_before = set(m.__dict__)
    assert fxcache.enable(m, _full_mask(T), **EAGER) is m
    assert type(m) is cls and isinstance(m, cls)
    assert _names(m) == names
    got = _outs(T, m)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    engine = fxcache.engine_of(m)
    assert engine.captures == 1 and engine.plan.ideal_speedup == pytest.approx(1.0)
    assert fxcache.disable(m) is m
    assert set(m.__dict__) == dict_before and fxcache.engine_of(m) is None
    assert all(torch.equal(a, b) for a, b in zip(_outs(T, m), ref))


def test_enable_in_place_runs_the_same_steps_as_compile():
    T = tiny("dit")
    wrapper = fxcache.compile(T.model, fxcache.FORA(interval=2), **EAGER)
    by_wrapper = _outs(T, wrapper)
    plain = _outs(T, T.model)
    fxcache.enable(T.model, fxcache.FORA(interval=2), **EAGER)
    in_place = _outs(T, T.model)
    assert all(torch.equal(a, b) for a, b in zip(in_place, by_wrapper))
    assert not torch.equal(in_place[1], plain[1])  # step 1 reused: lossy, so the check above means something
    assert fxcache.engine_of(T.model).plan.ideal_speedup > 1.2


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_an_enabled_model_copies_with_its_caching(how, tmp_path):
    T = tiny("dit")
    m = fxcache.enable(T.model, fxcache.FORA(interval=2), **EAGER)
    ref = _outs(T, m)
    if how == "deepcopy":
        c = copy.deepcopy(m)
    elif how == "pickle":
        c = pickle.loads(pickle.dumps(m))
    else:
        torch.save(m, tmp_path / "m.pt")
        c = torch.load(tmp_path / "m.pt", weights_only=False)
    engine = fxcache.engine_of(c)
    assert engine is not None and engine is not fxcache.engine_of(m) and engine.model is c
    assert c.forward is engine and c.cache_context.__self__ is engine
    got = _outs(T, c)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert engine.captures == 1
    assert not any(p1 is p2 for p1, p2 in zip(c.parameters(), m.parameters()))


def test_peft_sees_the_plain_module_names():
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    T = tiny("sd")
    T.model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                        target_modules=["to_q", "to_k", "to_v"]))
    plain = get_peft_model_state_dict(T.model)
    fxcache.enable(T.model, fxcache.DeepCache(interval=2, branch=0), **EAGER)
    keys = get_peft_model_state_dict(T.model)
    assert len(plain) > 0 and list(keys) == list(plain)


def test_torch_compile_of_an_enabled_model_runs_the_cached_steps():
    T = tiny("dit")
    fxcache.enable(T.model, fxcache.FORA(interval=2), **EAGER)
    ref = _outs(T, T.model)
    fxcache.engine_of(T.model).reset()
    compiled = torch.compile(T.model, backend="eager")
    got = _outs(T, compiled)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_diffusers_cache_hooks_on_an_enabled_model_run_as_diffusers_makes_them_run():
    """diffusers' FirstBlockCache on a model fxcache is attached to: fxcache steps aside
    (warns once), the model's own ``cache_context`` reaches diffusers' hooks, and the
    output is diffusers' cache's own; ``disable_cache()`` and fxcache caches again."""
    from diffusers.hooks import FirstBlockCacheConfig

    T = tiny("flux")
    plain = copy.deepcopy(T.model)
    plain.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    m = fxcache.enable(T.model, fxcache.FORA(interval=2), **EAGER)
    m.enable_cache(FirstBlockCacheConfig(threshold=0.5))

    def run(model):
        outs = []
        for _ in range(2):  # two generations: each must start fresh (the reset reaches the hooks)
            with torch.no_grad(), model.cache_context("cond"):
                outs += [T.output(T.call(model, t)) for t in T.timesteps[:3]]
            model._reset_stateful_cache()
        return outs

    ref = run(plain)
    with pytest.warns(RuntimeWarning, match="not caching"):
        got = run(m)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert torch.equal(got[0], got[3])  # the second generation started fresh
    m.disable_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            for t in T.timesteps[:2]:
                T.call(m, t)
    assert fxcache.engine_of(m).captures == 1


def test_a_models_own_forward_hooks_run_once():
    T = tiny("dit")
    calls = []
    T.model.register_forward_hook(lambda mod, i, o: calls.append(1))
    ref = _outs(T, T.model, 2)
    fxcache.enable(T.model, _full_mask(T), **EAGER)
    calls.clear()
    got = _outs(T, T.model, 2)
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


# ------------------------------------------------------------------- pipelines
def _ddpm():
    from diffusers import DDPMPipeline, DDPMScheduler

    T = tiny("unet2d")
    return DDPMPipeline(unet=T.model, scheduler=DDPMScheduler(num_train_timesteps=1000)), T


def _run(pipe, **kw):
    g = torch.Generator().manual_seed(0)
    return pipe(batch_size=1, generator=g, num_inference_steps=4, output_type="np", **kw).images


def test_enable_on_a_pipeline_keeps_its_class_and_pickles(tmp_path):
    pipe, T = _ddpm()
    cls = type(pipe)
    fxcache.enable(pipe, fxcache.DeepCache(interval=2, branch=0), **EAGER)
    assert type(pipe) is cls and pipe.unet is T.model
    out = _run(pipe)
    clone = pickle.loads(pickle.dumps(pipe))
    np.testing.assert_array_equal(_run(clone), out)
    assert fxcache.engine_of(clone.unet) is not None
    fxcache.disable(pipe)
    assert "progress_bar" not in pipe.__dict__ and fxcache.engine_of(pipe.unet) is None


def test_an_interrupted_pipeline_call_does_not_leak_into_the_next():
    """An exception part-way (here from the scheduler) skips the pipeline's own reset at
    the end of its call; with a timestep rule that says nothing (``off``), only the start
    of the next call can start it fresh."""
    pipe, T = _ddpm()
    fxcache.enable(pipe, fxcache.DeepCache(interval=3, branch=0), timestep_rule="off", **EAGER)
    clean = _run(pipe)

    class Stop(Exception):
        pass

    step, n = type(pipe.scheduler).step.__get__(pipe.scheduler), [0]

    def boom(*a, **k):
        n[0] += 1
        if n[0] == 2:
            raise Stop
        return step(*a, **k)

    pipe.scheduler.step = boom
    with pytest.raises(Stop):
        _run(pipe)
    del pipe.scheduler.step
    assert fxcache.engine_of(pipe.unet).step == 2  # the interrupted generation's count is still there
    np.testing.assert_array_equal(_run(pipe), clean)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

    def forward(self, x, timestep):
        h = x * (1 + timestep.float().view(-1, 1, 1) / 1000)
        for b in self.transformer_blocks:
            h = h + torch.tanh(b(h))
        return (h,)


@pytest.mark.parametrize("how", ["compile", "enable"])
def test_the_models_own_hooks_apply_once(how):
    """The model's own forward pre-hook and hook change input and output: applied once
    (not traced into the graph and run again around it)."""
    torch.manual_seed(0)
    m = _Toy().eval()
    m.register_forward_hook(lambda mod, i, o: (o[0] * 2,))
    m.register_forward_pre_hook(lambda mod, i: (i[0] + 1, i[1]))
    x, t = torch.randn(1, 4, 8), torch.tensor([5])
    with torch.no_grad():
        ref = m(x, t)[0]
        mask = fxcache.Mask([[True]], ["transformer_blocks.1"], periodic=True)
        run = fxcache.compile(m, mask, **EAGER) if how == "compile" else fxcache.enable(m, mask, **EAGER)
        assert torch.equal(run(x, t)[0], ref)
        assert torch.equal(run(x, t)[0], ref)


def _layerwise(m):
    m.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)


def _group_offload(m):
    m.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1)


def _taylorseer(m):
    from diffusers.hooks import TaylorSeerCacheConfig

    m.enable_cache(TaylorSeerCacheConfig(cache_interval=2, max_order=1, disable_cache_before_step=1))


@pytest.mark.parametrize("how", ["compile", "enable"])
@pytest.mark.parametrize("hooks", [_layerwise, _group_offload, _taylorseer], ids=["layerwise_casting",
                                                                                  "group_offload", "taylorseer"])
def test_diffusers_hooks_added_after_caching_run_as_diffusers_makes_them_run(hooks, how):
    T = tiny("flux")
    plain = copy.deepcopy(T.model)
    hooks(plain)
    schedule = fxcache.FORA(interval=2)
    run = fxcache.compile(T.model, schedule, **EAGER) if how == "compile" else fxcache.enable(T.model, schedule, **EAGER)
    _outs(T, run, 2)  # captured and cached before the hooks come
    hooks(T.model)

    def gen(model):
        with torch.no_grad(), model.cache_context("cond"):
            outs = [T.output(T.call(model, t)) for t in T.timesteps[:4]]
        model._reset_stateful_cache()
        return outs

    ref = gen(plain)
    run.reset() if how == "compile" else fxcache.engine_of(run).reset()
    with pytest.warns(RuntimeWarning, match="not caching"):
        got = gen(run)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.fixture
def _restore_attention_backend():
    """diffusers' set_attention_backend also sets a process-wide active backend."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    previous = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(previous)


def test_set_attention_backend_is_guarded(_restore_attention_backend):
    """The backend is a processor attribute: a new one captures again, and the steps are
    those of a model captured with that backend from the start. (The math backend's
    captured graph is itself within 4e-7 of eager, not bit-exact: a capture-fidelity
    limit of that backend under torch.export, not of the guard.)"""
    T = tiny("flux")
    fresh = copy.deepcopy(T.model)
    fresh.set_attention_backend("_native_math")
    ref = _outs(T, fxcache.compile(fresh, _full_mask(T), **EAGER), 2)
    m = fxcache.enable(T.model, _full_mask(T), **EAGER)
    _outs(T, m, 2)
    m.set_attention_backend("_native_math")
    fxcache.engine_of(m).reset()
    got = _outs(T, m, 2)
    assert fxcache.engine_of(m).captures == 2
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_a_python_number_timestep_on_an_enabled_unet():
    """The number-timestep probe runs the model's forward: attached in place, that is the
    class's forward, not the engine again."""
    T = tiny("unet2d")
    args, _ = T.inputs(T.timesteps[0])
    with torch.no_grad():
        ref = T.model(args[0], 500.7).sample
        fxcache.enable(T.model, _full_mask(T), **EAGER)
        assert torch.equal(T.model(args[0], 500.7).sample, ref)


def test_another_models_attention_backend_is_guarded(_restore_attention_backend):
    """``set_attention_backend`` on another model changes diffusers' process-wide active
    backend, which this model's processors (no backend of their own) read: captured again."""
    T = tiny("flux")
    m = fxcache.enable(T.model, _full_mask(T), **EAGER)
    _outs(T, m, 2)
    tiny("flux").model.set_attention_backend("_native_math")
    fxcache.engine_of(m).reset()
    _outs(T, m, 2)
    assert fxcache.engine_of(m).captures == 2
