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
