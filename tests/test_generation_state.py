"""The runtime's state model (issue 8): which cache slots are valid, when a generation
starts, threads, autograd and module changes. Every test here failed on the runtime
before it tracked valid slots per generation and signature."""

import gc
import threading
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

import fxcache
from fxcache.testing import tiny

EAGER = dict(backend=None)
PERIOD3 = fxcache.Mask([[True], [False], [False]], ["skip_branch.1"], periodic=True)


def _out(T, model, t, x=None):
    args, kwargs = T.inputs(t)
    if x is not None:
        args = (x,) + tuple(args[1:])
    return T.output(model(*args, **kwargs))


class Toy(torch.nn.Module):
    """Residual blocks on (B, N, C) tokens; the timestep scales the input. Casts the input
    to float32 like diffusers models cast their embeddings, so any input dtype runs."""

    def __init__(self, width=8, depth=3):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))

    def forward(self, x, timestep):
        h = x.float() * (1 + timestep.float().reshape(-1, 1, 1) / 1000)
        for b in self.transformer_blocks:
            h = h + torch.tanh(b(h))
        return (h,)


def _toy(seed=0):
    torch.manual_seed(seed)
    return Toy().eval()


TOY_MASK = fxcache.Mask([[True], [False], [False]], ["transformer_blocks.1"], periodic=True)


# ------------------------------------------------------- shape changes mid-generation


def test_batch_change_mid_generation_recomputes():
    """Classifier-free guidance switched off part-way: batch 2, then batch 1."""
    T2, T1 = tiny("unet2d", batch=2), tiny("unet2d", batch=1)
    T1.model = T2.model
    cm = fxcache.compile(T2.model, PERIOD3, **EAGER)
    fresh = fxcache.compile(T2.model, PERIOD3, **EAGER)
    ts = T2.timesteps
    with torch.no_grad():
        _out(T2, cm, ts[0])
        _out(T2, cm, ts[1])
        # step 2 reuses, but nothing was written for batch 1 in this generation
        assert torch.equal(_out(T1, cm, ts[2]), _out(T1, T2.model, ts[2]))
        assert cm.step == 3
        # step 3 computes again; step 4 reuses what step 3 wrote, exactly as a fresh
        # compile that starts at step 3's inputs
        a3, a4 = _out(T1, cm, ts[3]), _out(T1, cm, ts[4])
        b3, b4 = _out(T1, fresh, ts[3]), _out(T1, fresh, ts[4])
    assert torch.equal(a3, b3) and torch.equal(a4, b4)


def test_resolution_change_mid_generation_recomputes():
    T, S = tiny("unet2d", size=16), tiny("unet2d", size=8)
    S.model = T.model
    cm = fxcache.compile(T.model, PERIOD3, **EAGER)
    with torch.no_grad():
        _out(T, cm, T.timesteps[0])
        assert torch.equal(_out(S, cm, T.timesteps[1]), _out(S, T.model, T.timesteps[1]))


def test_dtype_change_mid_generation_recomputes():
    model = _toy()
    cm = fxcache.compile(model, TOY_MASK, **EAGER)
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        cm(x, torch.tensor([999, 999]))
        out = cm(x.half(), torch.tensor([899, 899]))[0]  # another signature: its slots were never written
        assert torch.equal(out, model(x.half(), torch.tensor([899, 899]))[0])


def test_returning_shape_reads_nothing_stale_and_eviction_is_safe():
    """Shape A, then B (which evicts A's entry with max_shapes=1), then A at a reuse step:
    A's buffers are new (and zero); the step must compute, not read them. Without
    eviction the same holds: A's slots hold values from before B ran, which the plan
    never means."""
    for max_shapes in (1, 4):
        model = _toy()
        cm = fxcache.compile(model, fxcache.Mask([[True], [False]], ["transformer_blocks.1"], periodic=True),
                             max_shapes=max_shapes, **EAGER)
        xa, xb = torch.randn(1, 4, 8), torch.randn(2, 4, 8)
        with torch.no_grad():
            cm(xa, torch.tensor([900]))
            cm(xa, torch.tensor([800]))
            cm(xb, torch.tensor([700, 700]))  # step 2: computes (a kind with no reads)
            out = cm(xa, torch.tensor([600]))[0]  # step 3 reuses: nothing valid for A any more
            assert torch.equal(out, model(xa, torch.tensor([600]))[0]), max_shapes


def test_step_index_jump_never_reads_a_stale_slot():
    """A unit computed without writing its slot makes the slot stale. Table (block 1):
    compute, reuse, compute (no write: step 3 recomputes), compute (write), reuse. The
    slot written at step 0 is stale after step 2; a jump from step 2 to step 4 must not
    read it (the plan's value there is step 2's, which nobody kept), so it computes."""
    model = _toy()
    mask = fxcache.Mask([[True], [False], [True], [True], [False]], ["transformer_blocks.1"])
    cm = fxcache.compile(model, mask, **EAGER)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        for i, t in enumerate((900, 800, 700)):
            with cm.cache_context("c", step_index=i):
                cm(x, torch.tensor([t]))
        with cm.cache_context("c", step_index=4):
            out = cm(x * 2, torch.tensor([500]))[0]
    assert torch.equal(out, model(x * 2, torch.tensor([500]))[0])


# ------------------------------------------------------------ generation boundaries


def _ddpm(**kw):
    T = tiny("unet2d")
    pipe = DDPMPipeline(unet=T.model, scheduler=DDPMScheduler(num_train_timesteps=1000))
    return pipe, T


def _run(pipe, seed=0, steps=4):
    g = torch.Generator().manual_seed(seed)
    return pipe(batch_size=1, generator=g, num_inference_steps=steps, output_type="np").images


def test_pipeline_reset_protocol_starts_each_call_fresh():
    """diffusers pipelines call _reset_stateful_cache() on their components at the end of
    every call; with the timestep rule off, that alone must start the next generation."""
    pipe, T = _ddpm()
    pipe.unet = fxcache.compile(T.model, fxcache.DeepCache(interval=3, branch=1), timestep_rule="off", **EAGER)
    first = _run(pipe)
    assert pipe.unet.step == 0
    np.testing.assert_array_equal(first, _run(pipe))


def test_equal_first_timesteps_start_a_new_generation():
    """One-step generations back to back: each is step 0."""
    model = _toy()
    cm = fxcache.compile(model, TOY_MASK, **EAGER)
    with torch.no_grad():
        for seed in range(3):
            x = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(cm(x, torch.tensor([999]))[0], model(x, torch.tensor([999]))[0])
            assert cm.step == 1


def test_repeated_timesteps_option_continues_the_generation():
    model = _toy()
    cm = fxcache.compile(model, TOY_MASK, repeated_timesteps=True, **EAGER)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        for t in (999, 999, 500, 500):
            cm(x, torch.tensor([t]))
    assert cm.step == 4


def test_ascending_timesteps_keep_caching():
    """DDIM inversion walks timesteps upwards: still one generation."""
    model = _toy()
    cm = fxcache.compile(model, TOY_MASK, **EAGER)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        outs = [cm(x, torch.tensor([t]))[0] for t in (1, 201, 401, 601)]
        assert cm.step == 4
        assert not torch.equal(outs[1], model(x, torch.tensor([201]))[0])  # step 1 reused
        cm(x, torch.tensor([1]))  # turned back: a new generation
        assert cm.step == 1


def test_storage_rule_never_reads_the_timestep(monkeypatch):
    """On an accelerator the timestep is never read. Forced here on the CPU: a view of
    the scheduler's timesteps with a growing offset continues, an offset that does not
    grow or another scheduler tensor starts a new generation, a fresh tensor says nothing."""
    model = _toy()
    cm = fxcache.compile(model, TOY_MASK, timestep_rule="storage", **EAGER)
    x = torch.randn(1, 4, 8)

    def no_read(*a, **k):
        raise AssertionError("the storage rule read a timestep value")

    timesteps = torch.tensor([999, 666, 333, 0])
    with torch.no_grad():
        ref = [model(x, t.reshape(1))[0] for t in timesteps]
        for attr in ("__float__", "item", "tolist", "__bool__", "__index__", "__int__"):
            monkeypatch.setattr(torch.Tensor, attr, no_read)
        first = [cm(x, t.expand(1))[0] for t in timesteps]  # `for t in timesteps`: views
        assert cm.step == 4
        second = [cm(x, t.expand(1))[0] for t in timesteps]  # offset back to 0: new generation
        assert cm.step == 4
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        assert torch.equal(second[0], ref[0]) and not torch.equal(second[1], ref[1])
        other = timesteps.clone()  # a new set_timesteps: another storage
        cm(x, other[0].expand(1))
        cm(x, other[1].expand(1))
        assert cm.step == 2
        cm(x, other[2].expand(1) * 1)  # computed afresh: no information, the count goes on
        assert cm.step == 3
        cm(x, other[2].expand(1))  # offset 2 after 1: continues
        assert cm.step == 4


def test_cache_context_step_index_keyword():
    """diffusers' cache_context(name, step_index=..., ...) (Wan passes it)."""
    model = _toy()
    cm = fxcache.compile(model, TOY_MASK, timestep_rule="off", **EAGER)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        for i in range(3):
            with cm.cache_context("cond", step_index=i, num_inference_steps=3, sigma=0.5):
                cm(x, torch.tensor([900 - i]))
        with cm.cache_context("cond", step_index=0):
            assert cm.step == 0
            assert torch.equal(cm(x, torch.tensor([900]))[0], model(x, torch.tensor([900]))[0])


def test_generation_longer_than_a_non_periodic_plan_computes_everything():
    model = _toy()
    cm = fxcache.compile(model, fxcache.Mask([[True], [False]], ["transformer_blocks.1"]), **EAGER)
    x = torch.randn(1, 4, 8)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm(x, torch.tensor([900]))
        cm(x, torch.tensor([800]))
        for t in (700, 600):
            assert torch.equal(cm(x, torch.tensor([t]))[0], model(x, torch.tensor([t]))[0])
    assert cm.step == 4  # not wrapped to step 0 mid-image
    overrun = [w for w in caught if "longer than the plan" in str(w.message)]
    assert len(overrun) == 1


# --------------------------------------------------------------------- threads


def test_two_threads_never_mix_caches():
    model = _toy()
    cm = fxcache.compile(model, TOY_MASK, **EAGER)
    ref_model = fxcache.compile(model, TOY_MASK, **EAGER)
    ts = [torch.tensor([t]) for t in (999, 750, 500, 250)]
    inputs = {k: torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(k)) for k in range(2)}
    with torch.no_grad():
        expected = {}
        for k, x in inputs.items():
            ref_model.reset()
            expected[k] = [ref_model(x, t)[0] for t in ts]
    barrier = threading.Barrier(2)
    wrong, errors = [], []

    def worker(k):
        try:
            with torch.no_grad():
                for gen in range(8):
                    ctx = cm.cache_context("c") if gen % 2 else torch.no_grad()
                    with ctx:
                        for step, t in enumerate(ts):
                            barrier.wait(timeout=30)  # interleave the two threads step by step
                            if not torch.equal(cm(inputs[k], t)[0], expected[k][step]):
                                wrong.append((k, gen, step))
        except Exception as exc:  # surfaced below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert not wrong, f"{len(wrong)} steps mixed caches: {wrong[:5]}"


# -------------------------------------------------------------------- autograd


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_grad_mode_keeps_buffers_out_of_autograd_and_memory_flat():
    T = tiny("unet2d")
    cm = fxcache.compile(T.model, PERIOD3, **EAGER)
    assert torch.is_grad_enabled()

    def generation():
        cm.reset()
        return [_out(T, cm, t) for t in T.timesteps]

    generation()
    gc.collect()
    start = _rss_mib()
    for _ in range(50):
        outs = generation()
    gc.collect()
    growth = _rss_mib() - start
    bufs = [b for d in cm.cache_tensors().values() for b in d.values()]
    assert bufs and all(not b.requires_grad and b.grad_fn is None for b in bufs)
    assert all(o.grad_fn is None for o in outs)
    with torch.no_grad():
        cm.reset()
        assert all(torch.equal(a, b) for a, b in zip(outs, [_out(T, cm, t) for t in T.timesteps]))
    assert growth < 64, f"RSS grew {growth:.0f} MiB over 50 generations"


def test_inputs_that_require_grad_are_a_clear_error():
    T = tiny("unet2d")
    cm = fxcache.compile(T.model, PERIOD3, **EAGER)
    x = T.inputs(T.timesteps[0])[0][0].clone().requires_grad_()
    with pytest.raises(fxcache.FxcacheError, match="requires grad"):
        cm(x, T.timesteps[0])
    with torch.no_grad():
        cm(x, T.timesteps[0])  # under no_grad the same input is fine


def test_inference_mode_generation_does_not_poison_no_grad():
    T = tiny("unet2d")
    cm = fxcache.compile(T.model, PERIOD3, **EAGER)
    with torch.inference_mode():
        a = [_out(T, cm, t) for t in T.timesteps]
    cm.reset()
    with torch.no_grad():
        b = [_out(T, cm, t) for t in T.timesteps]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------ module changes


def _set_new_weight(model):
    lin = model.transformer_blocks[1]
    lin.weight = torch.nn.Parameter(lin.weight.detach() * -1.0)


def _assign_state_dict(model):
    sd = {k: v * 0.5 for k, v in model.state_dict().items()}
    model.load_state_dict(sd, assign=True)


def _swap_module(model):
    model.transformer_blocks[2] = torch.nn.Linear(8, 8)


@pytest.mark.parametrize("change", [_set_new_weight, _assign_state_dict, _swap_module])
@pytest.mark.parametrize("when", ["new_generation", "mid_generation"])
def test_replaced_parameters_and_modules_are_seen(change, when):
    """A change between generations is seen at once; one in the middle of a generation
    at the next generation start (the guard runs at generation starts: a snapshot of
    the whole model costs milliseconds, bench/guard_cost.py)."""
    model = _toy()
    cm = fxcache.compile(model, TOY_MASK, **EAGER)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        cm(x, torch.tensor([900]))
        cm(x, torch.tensor([800]))
        change(model)
        if when == "mid_generation":
            cm(x, torch.tensor([700]))
        cm.reset()
        out = cm(x, torch.tensor([700]))[0]
        assert torch.equal(out, model(x, torch.tensor([700]))[0])
    assert cm.captures == 2


def test_in_place_weight_edits_need_no_recapture():
    model = _toy()
    cm = fxcache.compile(model, TOY_MASK, **EAGER)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        cm(x, torch.tensor([900]))
        entry = cm.entries[0]
        model.transformer_blocks[0].weight.mul_(2)
        cm.reset()
        assert torch.equal(cm(x, torch.tensor([900]))[0], model(x, torch.tensor([900]))[0])
    assert cm.entries[0] is entry


class _Doubling:
    """An attention processor that changes the output (×2), to see that it is used."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor

        self.inner = AttnProcessor()

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return 2 * self.inner(attn, hidden_states, *args, **kwargs)


@pytest.mark.parametrize("family", ["sd", "dit"])
def test_set_attn_processor_is_seen_at_the_next_generation(family):
    T = tiny(family)
    mask = fxcache.Mask([[True], [False]], [u for u in _unit_names(T) if u.startswith(("skip_branch.1", "transformer_blocks.1"))][:1], periodic=True)
    cm = fxcache.compile(T.model, mask, **EAGER)
    with torch.no_grad():
        before = _out(T, cm, T.timesteps[0])
        for m in T.model.modules():
            if hasattr(m, "set_processor"):
                m.set_processor(_Doubling())
        cm.reset()  # what a pipeline does at the end of a call
        after = _out(T, cm, T.timesteps[0])
        assert torch.equal(after, _out(T, T.model, T.timesteps[0]))
        assert not torch.equal(before, after)


def _unit_names(T):
    args, kwargs = T.inputs(T.timesteps[0])
    return [u.name for u in fxcache.units(T.model, *args, **kwargs)]


def test_peft_lora_adapter_is_seen():
    peft = pytest.importorskip("peft")
    T = tiny("sd")
    mask = fxcache.Mask([[True], [False]], ["skip_branch.1"], periodic=True)
    cm = fxcache.compile(T.model, mask, **EAGER)
    with torch.no_grad():
        plain = _out(T, cm, T.timesteps[0])
        T.model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        cm.reset()
        lora = _out(T, cm, T.timesteps[0])
        assert torch.equal(lora, _out(T, T.model, T.timesteps[0]))
        assert not torch.equal(plain, lora)


@pytest.mark.slow
def test_in_place_weight_edits_are_seen_under_inductor_freezing():
    """Inductor's freezing (on by default) does not bake the weights in: the compiled
    graphs see in-place edits, without compiling again."""
    from torch._dynamo.utils import counters

    model = _toy()
    cm = fxcache.compile(model, TOY_MASK)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        for t in (900, 800, 700):
            cm(x, torch.tensor([t]))
        graphs = counters["stats"]["unique_graphs"]
        model.transformer_blocks[0].weight.mul_(2)
        cm.reset()
        out = cm(x, torch.tensor([900]))[0]
        torch.testing.assert_close(out, model(x, torch.tensor([900]))[0], rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs


def test_forward_hook_added_after_capture_is_seen():
    """A graph captured before a hook was registered would silently skip it."""
    model = _toy()
    cm = fxcache.compile(model, TOY_MASK, **EAGER)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        cm(x, torch.tensor([900]))
        handle = model.transformer_blocks[2].register_forward_hook(lambda m, i, o: o * 3)
        cm.reset()
        assert torch.equal(cm(x, torch.tensor([900]))[0], model(x, torch.tensor([900]))[0])
        handle.remove()
        cm.reset()
        assert torch.equal(cm(x, torch.tensor([900]))[0], model(x, torch.tensor([900]))[0])


def test_plan_error_is_an_fxcache_error():
    assert issubclass(fxcache.PlanError, fxcache.FxcacheError)


def test_training_mode_warns_once():
    model = _toy().train()
    cm = fxcache.compile(model, TOY_MASK, **EAGER)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in (900, 800):
            cm(torch.randn(1, 4, 8), torch.tensor([t]))
    assert len([w for w in caught if "training mode" in str(w.message)]) == 1


def test_pickle_and_deepcopy_drop_graphs_and_state():
    import copy

    model = _toy()
    cm = fxcache.compile(model, TOY_MASK, **EAGER)
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        cm(x, torch.tensor([900]))
        cm(x, torch.tensor([800]))
        for clone in (copy.deepcopy(cm), _roundtrip(cm)):
            assert clone.entries == [] and clone.step == 0
            for t in (900, 800, 700):
                assert torch.equal(clone(x, torch.tensor([t]))[0], _fresh(model, x, t, (900, 800, 700)))


def _roundtrip(cm):
    import io

    buf = io.BytesIO()
    torch.save(cm, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _fresh(model, x, t, ts):
    cm = fxcache.compile(model, TOY_MASK, **EAGER)
    for s in ts:
        out = cm(x, torch.tensor([s]))[0]
        if s == t:
            return out


def test_state_dict_has_the_model_keys_both_ways():
    model = _toy()
    cm = fxcache.compile(model, TOY_MASK, **EAGER)
    assert list(cm.state_dict()) == list(model.state_dict())
    other = _toy(seed=1)
    other.load_state_dict(cm.state_dict())
    cm.load_state_dict({k: v * 2 for k, v in other.state_dict().items()})
    assert torch.equal(model.transformer_blocks[0].weight, 2 * other.transformer_blocks[0].weight)


def test_torch_compile_of_a_cached_model_is_a_pass_through():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _toy()
    cm = fxcache.compile(model, TOY_MASK, backend="eager")
    ref = fxcache.compile(model, TOY_MASK, **EAGER)
    outer = torch.compile(cm, backend="eager")
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        for t in (900, 800, 700, 600):
            assert torch.equal(outer(x, torch.tensor([t]))[0], ref(x, torch.tensor([t]))[0])
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == len(cm.plan.step_kinds)  # fxcache's own graphs only
    cm.compile()  # nn.Module.compile in place: a no-op


@pytest.mark.parametrize("kind", ["int64", "int32", "float64"])  # the plain UNet2DModel rejects np.float32
def test_numpy_scalar_timesteps_work_as_with_the_plain_model(kind):
    T = tiny("unet2d")
    cm = fxcache.compile(T.model, PERIOD3, **EAGER)
    x = T.inputs(T.timesteps[0])[0][0]
    with torch.no_grad():
        for i, t in enumerate(np.array([999, 500, 1], dtype=kind)):
            out = cm(x, t).sample
            if i == 0:
                assert torch.equal(out, T.model(x, t).sample)
        assert cm.step == 3 and len(cm.entries) == 1  # one signature: the value is not baked in


def test_buffers_are_kept_only_for_the_shapes_kept():
    """``max_shapes=1``: the buffers of an evicted input shape are dropped with its graphs
    (every batch size seen used to keep its own buffer set)."""
    model = _toy()
    cm = fxcache.compile(model, TOY_MASK, max_shapes=1, **EAGER)
    with torch.no_grad():
        for b in range(1, 7):
            x = torch.randn(b, 4, 8)
            for t in (900, 800):
                cm(x, torch.tensor([t] * b))
            assert len(cm.cache_tensors()) == 1
    assert len(cm.entries) == 1
