"""Scale-shift adapters inserted at cache reads of the rewritten graphs."""

import pytest
import torch
import torch.utils._pytree as pytree

import fxcache
from fxcache.analyze.units import temb_module
from fxcache.calibrate.scale_shift import ScaleShift
from fxcache.kernels import scale_shift as scale_shift_op
from fxcache.testing import tiny

CASES = {
    "dit": (["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"],
            [[True, True, True], [False, True, False], [True, False, False], [False, False, True]]),
    "unet2d": (["skip_branch.1", "down_blocks.0.resnets.0"],
               [[True, True], [False, True], [True, False], [False, False]]),
}


def _adapter(T, names, seed=0):
    args, kwargs = T.inputs(T.timesteps[0])
    units = fxcache.units(T.model, *args, **kwargs).by_name()
    path = temb_module(T.model)
    temb = []
    h = T.model.get_submodule(path).register_forward_hook(lambda m, i, o: temb.append(o))
    T.call(T.model, T.timesteps[0])
    h.remove()
    adapter = ScaleShift({n: units[n].out_shapes for n in names}, temb[0].shape[1], temb_module=path,
                         model_class=type(T.model).__name__)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return adapter, units


def _reference(T, mask, adapter, units):
    """Hooks: a reused unit returns adapter(cache, temb of the current step)."""
    cache, outs = {}, []
    for step, t in enumerate(T.timesteps[: len(mask.table)]):
        row = mask.table[step]
        temb = []
        handles = [T.model.get_submodule(adapter.temb_module).register_forward_hook(lambda m, i, o: temb.append(o))]
        for name, compute in zip(mask.units, row):
            def hook(mod, inp, out, name=name, compute=compute):
                if compute:
                    cache[name] = pytree.tree_map(lambda x: x.clone(), out)
                    return out
                flat, spec = pytree.tree_flatten(cache[name])
                return pytree.tree_unflatten(
                    [adapter.apply(name, k, v, temb[0]) for k, v in enumerate(flat)], spec)
            handles.append(T.model.get_submodule(units[name].module).register_forward_hook(hook))
        try:
            outs.append(T.output(T.call(T.model, t)))
        finally:
            for h in handles:
                h.remove()
    return outs


@pytest.mark.parametrize("segments", [False, True], ids=["per-kind", "segments"])
@pytest.mark.parametrize("family", ["dit", "unet2d"])
def test_adapters_at_cache_reads_match_hook_reference(family, segments):
    T = tiny(family)
    names, table = CASES[family]
    mask = fxcache.Mask(table, names)
    adapter, units = _adapter(T, names)
    cm = fxcache.compile(T.model, mask, backend=None, scale_shift=adapter, segments=segments)
    ref = _reference(T, mask, adapter, units)
    with torch.no_grad():
        for step, t in enumerate(T.timesteps[: len(table)]):
            torch.testing.assert_close(T.output(T.call(cm, t)), ref[step], rtol=1e-5, atol=1e-5)
    if not segments:
        graphs = cm.entries[-1].solved.graphs
        assert any(n.target is scale_shift_op for g in graphs for n in g.gm.graph.nodes)


def test_zero_adapter_is_identity():
    T = tiny("dit")
    names, table = CASES["dit"]
    mask = fxcache.Mask(table, names)
    adapter, _ = _adapter(T, names)
    with torch.no_grad():
        for p in adapter.parameters():
            p.zero_()
    a = fxcache.compile(T.model, mask, backend=None, scale_shift=adapter)
    b = fxcache.compile(T.model, mask, backend=None)
    with torch.no_grad():
        for t in T.timesteps[: len(table)]:
            assert torch.equal(T.output(T.call(a, t)), T.output(T.call(b, t)))


def test_adapter_for_other_schedule_is_rejected(tmp_path):
    T = tiny("dit")
    adapter, _ = _adapter(T, ["transformer_blocks.1"])
    mask = fxcache.Mask([[True], [False]], ["transformer_blocks.0"])
    cm = fxcache.compile(T.model, mask, backend=None, scale_shift=adapter)
    with pytest.raises(fxcache.CheckpointError, match="transformer_blocks.1"):
        T.call(cm, T.timesteps[0])
    U = tiny("unet2d")
    path = tmp_path / "ss.safetensors"
    adapter.save(path)
    cm = fxcache.compile(U.model, fxcache.Mask([[True], [False]], ["skip_branch.1"]), backend=None, scale_shift=str(path))
    with pytest.raises(fxcache.CheckpointError, match="DiTTransformer2DModel"):
        U.call(cm, U.timesteps[0])


def test_step_graphs_own_the_adapter_and_the_captured_graph_is_untouched():
    T = tiny("dit")
    names, table = CASES["dit"]
    adapter, _ = _adapter(T, names)
    cm = fxcache.compile(T.model, fxcache.Mask(table, names), backend=None, scale_shift=adapter)
    with torch.no_grad():
        T.call(cm, T.timesteps[0])
    entry = cm.entries[-1]
    assert not hasattr(entry.captured.gm, "fxcache_scale_shift")
    for g in (*entry.solved.graphs, entry.repair_graph):
        assert g.gm.get_submodule("fxcache_scale_shift") is adapter
    # the model's parameters are shared, never copied
    graph_params = {id(p) for g in entry.solved.graphs for p in g.gm.parameters()}
    assert {id(p) for p in adapter.parameters()} <= graph_params
    assert {id(p) for p in T.model.parameters()} & graph_params


# ------------------------------------------------- training on the step graphs
STEPS, BATCH = 4, 2
TRAIN_UNITS = {
    # down_blocks.0 has two outputs (its skip tensor and its downsampled hidden state)
    "unet2d": ["down_blocks.0", "down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.1"],
    # a block and a sublayer inside it: the sublayer's reads count only where the block computes
    "dit": ["transformer_blocks.0", "transformer_blocks.0.attn1", "transformer_blocks.1.attn1",
            "transformer_blocks.2.ff"],
}
TRAIN_TABLES = {
    "unet2d": [[True] * 4, [False] * 4, [True, False, False, True], [True, False, False, False]],
    "dit": [[True] * 4, [True, False, False, False], [False, False, True, False], [True, True, False, False]],
}


def _ddim_sampler(T):
    from diffusers import DDIMScheduler

    def run(model, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(BATCH, *((4, 8, 8) if T.family == "dit" else (3, 16, 16)), generator=g)
        labels = torch.arange(BATCH) % 10
        sched = DDIMScheduler(num_train_timesteps=1000)
        sched.set_timesteps(STEPS)
        for t in sched.timesteps:
            tt = t.expand(BATCH)
            out = model(x, timestep=tt, class_labels=labels) if T.family == "dit" else model(x, tt)
            x = sched.step(T.output(out), t, x).prev_sample
        return x

    return run


@pytest.mark.parametrize("family", ["unet2d", "dit"])
def test_graph_student_loss_and_gradients_match_the_hook_oracle(family):
    """The student is the plan's own step graphs with probes; the oracle is the old
    hook-based student (tests/_reference.py): the whole eager model runs and hooks swap
    in the adapted cache. At the first iteration (same random adapters, same seed) the
    per-(unit, step) losses, the adapter gradients and the generated sample agree bit for
    bit (the captured graph computes what the eager modules compute, op for op)."""
    import copy

    from fxcache.calibrate.scale_shift import _frozen, _setup, _GraphStudent, _unroll
    from _reference import HookStudent

    T = tiny(family)
    model, sampler = T.model, _ddim_sampler(T)
    mask = fxcache.Mask(TRAIN_TABLES[family], TRAIN_UNITS[family])
    setup = _setup(model, mask, sampler, 0, None, None)
    adapter = setup.make_adapter()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    oracle_adapter = copy.deepcopy(adapter)
    adapter.requires_grad_(True)
    oracle_adapter.requires_grad_(True)

    with _frozen(model):
        student = _GraphStudent(model, setup, adapter, "mse", train=True)
        sample = _unroll(student, sampler, 3)

    units = {n: (setup.units[n].module, setup.units[n].out_shapes) for n in mask.units}
    with torch.no_grad(), HookStudent(model, units, mask.table, setup.temb_module, oracle_adapter) as oracle:
        want = sampler(model, 3)

    # which (unit, step) pairs read a cache: counted by hand from the table
    assert set(student.losses) == set(oracle.losses)
    if family == "dit":
        # attn1 of block 0 reused at step 1 inside a computed block 0: a read; at step 2
        # block 0 itself is reused, so its attn1 is not read
        assert ("transformer_blocks.0.attn1", 1) in oracle.losses
        assert ("transformer_blocks.0.attn1", 2) not in oracle.losses
        assert ("transformer_blocks.0", 2) in oracle.losses
    for key, losses in oracle.losses.items():
        got = torch.stack(student.losses[key])
        assert torch.equal(got, torch.stack(losses)), key
    assert all(float(v) > 0 for ls in oracle.losses.values() for v in ls)  # nothing trivially equal
    for (name, p), q in zip(adapter.named_parameters(), oracle_adapter.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert p.grad.abs().sum() > 0, name
        assert torch.equal(p.grad, q.grad), name
    assert torch.equal(sample, want)
    for p in model.parameters():
        assert p.grad is None
