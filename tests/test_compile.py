"""torch.compile of the rewritten graphs: no graph breaks, one compilation per graph,
per-segment compilation for plans with many kinds of step, fusion at cache reads."""

import pytest
import torch
from torch._dynamo.utils import counters

import fxcache
from fxcache.kernels import gated_residual
from fxcache.testing import tiny


class CountingBackend:
    """A torch.compile backend that runs the graph as traced and counts compilations."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _generation(T, cm, steps=None):
    cm.reset()
    outs = []
    for t in (steps or T.timesteps):
        outs.append(T.output(T.call(cm, t)))
    return outs


@pytest.mark.parametrize(
    "family,schedule",
    [("unet2d", fxcache.DeepCache(interval=3, branch=1)), ("dit", fxcache.FORA(interval=2))],
    ids=["unet-deepcache", "dit-fora"],
)
def test_no_graph_breaks_and_no_recompiles(family, schedule):
    torch._dynamo.reset()
    counters.clear()
    T = tiny(family)
    backend = CountingBackend()
    cm = fxcache.compile(T.model, schedule, backend=backend)
    eager = fxcache.compile(T.model, schedule, backend=None)
    with torch.no_grad():
        first = _generation(T, cm)
        kinds = len(cm.plan.step_kinds)
        assert backend.graphs == kinds == cm.plan.compiled_graphs
        again = _generation(T, cm)  # a whole second generation: nothing compiles
        assert backend.graphs == kinds
        ref = _generation(T, eager)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == kinds
    for a, b, c in zip(first, again, ref):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert "compiled graphs: " in cm.plan.explain()


def _many_kinds_mask():
    # a different set of reused blocks at almost every step, as block caching gives
    table = [
        [True, True, True],
        [True, False, True],
        [False, True, True],
        [True, False, False],
        [False, False, True],
        [True, True, False],
    ]
    return fxcache.Mask(table, ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"])


def test_segments_bound_compiled_graphs_and_match_whole_graphs():
    T = tiny("dit")
    steps = [torch.tensor(999 - 150 * i) for i in range(6)]
    whole = fxcache.compile(T.model, _many_kinds_mask(), backend=None, segments=False)
    ref = _generation(T, whole, steps)
    kinds = len(whole.plan.step_kinds)
    assert kinds >= 5
    torch._dynamo.reset()
    backend = CountingBackend()
    seg = fxcache.compile(T.model, _many_kinds_mask(), backend=backend, max_graphs=2)
    with torch.no_grad():
        out = _generation(T, seg, steps)
        n = backend.graphs
        _generation(T, seg, steps)
    assert backend.graphs == n  # nothing recompiles in a second generation
    assert seg.plan.compiled_graphs >= n
    assert "segment" in seg.plan.compile_note
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    # per segment, not per step: at most a few segments per unit
    assert seg.plan.compiled_graphs <= 4 * 3 + 2
    eager_seg = fxcache.compile(T.model, _many_kinds_mask(), backend=None, segments=True)
    for a, b in zip(_generation(T, eager_seg, steps), ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3"])
def test_fora_gate_is_fused_at_cache_reads(family):
    T = tiny(family)
    fused = fxcache.compile(T.model, fxcache.FORA(interval=2), backend=None)
    plain = fxcache.compile(T.model, fxcache.FORA(interval=2), backend=None, fuse=False)
    a, b = _generation(T, fused), _generation(T, plain)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    reuse = fused.entries[-1].solved.graphs[fused.plan.kind_of_step(1)]
    targets = [n.target for n in reuse.gm.graph.nodes if n.op == "call_function"]
    assert gated_residual in targets
    assert reuse.fused >= 1
    plain_reuse = plain.entries[-1].solved.graphs[plain.plan.kind_of_step(1)]
    assert gated_residual not in [n.target for n in plain_reuse.gm.graph.nodes]


def test_reduce_overhead_is_noted_on_cpu():
    T = tiny("dit")
    cm = fxcache.compile(T.model, fxcache.FORA(interval=2), backend="eager", mode="reduce-overhead")
    with torch.no_grad():
        T.call(cm, T.timesteps[0])
    assert "CUDA graphs do not apply" in cm.plan.compile_note


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,schedule",
    [("unet2d", fxcache.DeepCache(interval=2, branch=1)), ("dit", fxcache.FORA(interval=2))],
    ids=["unet-deepcache", "dit-fora"],
)
def test_inductor_matches_eager(family, schedule):
    """Inductor (with freezing) compiles each step kind once; outputs equal the eager
    cached model's within fp32 reassociation error."""
    torch._dynamo.reset()
    T = tiny(family)
    compiled = fxcache.compile(T.model, schedule)
    eager = fxcache.compile(T.model, schedule, backend=None)
    with torch.no_grad():
        for a, b in zip(_generation(T, compiled), _generation(T, eager)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert compiled.plan.compiled_graphs == len(compiled.plan.step_kinds)
    assert "freezing=True" in compiled.plan.compile_note


# --------------------------------------------------------------------------- on CUDA
# The same properties on a GPU, with inductor generating Triton code (scripts/gpu_check.sh
# runs these with TRITON_INTERPRET=0 and FXCACHE_REQUIRE_CUDA=1); skipped without CUDA.
from _cuda import OpLog, need_cuda, on_device  # noqa: E402


def _cloned_generation(T, cm):
    """One generation from step 0, each output copied at once: under CUDA graphs a graph's
    outputs live in its memory pool and are overwritten by its next replay."""
    if isinstance(cm, fxcache.CachedModel):
        cm.reset()
    return [T.output(T.call(cm, t)).clone() for t in T.timesteps]


def _cuda_graph_functions(device_index):
    """The compiled functions that CUDA graph trees recorded on this device."""
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(device_index, create_if_none_exists=False)
    assert manager is not None, "no CUDA graph tree manager: nothing was recorded as a CUDA graph"
    seen, stack = set(), [n for nodes in manager.roots.values() for n in nodes]
    while stack:
        node = stack.pop()
        seen.add(node.wrapped_function.id)
        stack.extend(n for nodes in node.children.values() for n in nodes)
    return seen


@pytest.mark.parametrize(
    "family,schedule",
    [("unet2d", fxcache.DeepCache(interval=2, branch=1)), ("dit", fxcache.FORA(interval=2))],
    ids=["unet-deepcache", "dit-fora"],
)
def test_cuda_inductor_no_graph_breaks_and_no_recompiles(family, schedule):
    """Inductor on CUDA: one compilation per kind of step, no graph break, a second whole
    generation compiles nothing (dynamo raises on any recompile) and repeats the first
    bit for bit; outputs equal the eager cached model's within fp32 reassociation error."""
    need_cuda("compiling the step graphs with inductor on CUDA")
    torch._dynamo.reset()
    counters.clear()
    T = on_device(tiny(family, batch=2), "cuda")
    cm = fxcache.compile(T.model, schedule)
    eager = fxcache.compile(T.model, schedule, backend=None)
    with torch.no_grad():
        first = _cloned_generation(T, cm)
        kinds = len(cm.plan.step_kinds)
        assert counters["stats"]["unique_graphs"] == kinds == cm.plan.compiled_graphs
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = _cloned_generation(T, cm)
        ref = _cloned_generation(T, eager)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == kinds
    for a, b, c in zip(first, again, ref):
        assert a.device.type == "cuda"
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


def test_cuda_graphs_reduce_overhead_on_static_buffers():
    """mode="reduce-overhead": every kind of step is recorded as a CUDA graph (the cache
    buffers are static inputs written in place), nothing is skipped or recompiled, a
    second generation replays the graphs and repeats the first bit for bit."""
    need_cuda("CUDA graphs (mode='reduce-overhead')")
    torch._dynamo.reset()
    counters.clear()
    T = on_device(tiny("dit", batch=2), "cuda")
    cm = fxcache.compile(T.model, fxcache.FORA(interval=2), mode="reduce-overhead")
    eager = fxcache.compile(T.model, fxcache.FORA(interval=2), backend=None)
    with torch.no_grad():
        first = _cloned_generation(T, cm)  # each kind: warm-up run, then recorded
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = _cloned_generation(T, cm)  # replays
        ref = _cloned_generation(T, eager)
    kinds = len(cm.plan.step_kinds)
    assert graphs == counters["stats"]["unique_graphs"] == cm.plan.compiled_graphs == kinds == 2
    assert dict(counters["graph_break"]) == {}
    note = cm.plan.compile_note
    assert "mode='reduce-overhead'" in note and "do not apply" not in note, note
    assert counters["inductor"]["cudagraph_skips"] == 0, "a graph fell back from CUDA graphs (TORCH_LOGS=perf_hints says why)"
    assert len(_cuda_graph_functions(torch.cuda.current_device())) == kinds
    for a, b, c in zip(first, second, ref):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


def test_cuda_fused_cache_reads_match_unfused():
    """backend=None on CUDA: the fused cache reads (whatever fxcache.kernels dispatches to
    there) give the unfused graph's outputs within fp32 rounding (a fused kernel may
    contract ``x + gate * cache`` into one FMA)."""
    need_cuda("the fused cache reads on CUDA")
    T = on_device(tiny("dit", batch=2), "cuda")
    fused = fxcache.compile(T.model, fxcache.FORA(interval=2), backend=None)
    plain = fxcache.compile(T.model, fxcache.FORA(interval=2), backend=None, fuse=False)
    with torch.no_grad(), OpLog() as log:
        a = _cloned_generation(T, fused)
    with torch.no_grad():
        b = _cloned_generation(T, plain)
    assert fused.entries[-1].solved.graphs[fused.plan.kind_of_step(1)].fused >= 1
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    print(f"fused cache reads on CUDA dispatched {len(log.custom_kernel_calls())} custom kernel calls")
