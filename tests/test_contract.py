"""The graph contract (DESIGN.md §2): a cached model gives what its plan means or raises.

- every graph the rewrite sees is free of mutation (capture functionalises; a mutation
  of model state or of an input that cannot be functionalised away is a CaptureError);
- a cache read is fused with its gate only when shapes prove the gate per-sample or
  per-channel;
- no graph output shares storage with a cache buffer;
- ``fxcache.rewrite.contract.check_graph`` states these invariants and runs after every
  pass when ``FXCACHE_CHECK=1`` (on in the whole test suite, see conftest.py).
"""

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxcache
from fxcache.analyze.units import Unit
from fxcache.capture import capture
from fxcache.testing import FAMILIES, Tiny, tiny
from _reference import NaiveReference

EAGER = dict(backend=None)


def _toy(model, x, timesteps=(1.0, 0.8, 0.6, 0.4, 0.2)):
    return Tiny("toy", model.eval(), lambda t: ((x, t), {}), [torch.tensor(t) for t in timesteps], unet=False)


def _mutable(node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable


def _against_reference(T, mask, cm, exact=True):
    ref = NaiveReference(T, mask, cm.entries[-1].units if cm.entries else None)
    outs = []
    with torch.no_grad():
        for step, t in enumerate(T.timesteps):
            outs.append(T.output(T.call(cm, t)))
        for step, t in enumerate(T.timesteps):
            expected = ref(step, t)
            if exact:
                assert torch.equal(outs[step], expected), f"step {step}"
            else:
                torch.testing.assert_close(outs[step], expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------ mutation


class _MutBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x):
        h = self.lin1(x)
        h.mul_(2)
        h += x
        h[:, :1].mul_(0.5)  # through a view: the later use of h reads the base
        q = self.lin2(h)
        q[:, :, 4:] = q[:, :, 4:] * 3  # slice assignment, as CogVideoX's rotary embedding
        return q


class _Mutating(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([_MutBlock(c), _MutBlock(c)])

    def forward(self, x, timestep):
        h = x * timestep
        for block in self.transformer_blocks:
            h = block(h)
        return (h,)


def test_in_place_ops_survive_the_rewrite():
    torch.manual_seed(0)
    T = _toy(_Mutating(), torch.randn(2, 3, 8))
    names = ["transformer_blocks.0", "transformer_blocks.1"]
    everything = fxcache.compile(T.model, fxcache.Mask([[True, True]], names, periodic=True), **EAGER)
    with torch.no_grad():
        for t in T.timesteps:
            assert torch.equal(T.output(T.call(everything, t)), T.output(T.call(T.model, t)))
    graph = everything.entries[-1].captured.gm.graph
    assert not [n.name for n in graph.nodes if _mutable(n)]
    # and a plan that reuses block 1 means what the hook reference means
    mask = fxcache.Mask([[True, True], [True, False]], names, periodic=True)
    _against_reference(T, mask, fxcache.compile(T.model, mask, **EAGER))


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_graph_is_free_of_mutation(family):
    T = tiny(family)
    args, kwargs = T.inputs(T.timesteps[1])
    gm = capture(T.model, args, kwargs).gm
    assert not [n.name for n in gm.graph.nodes if _mutable(n)]


# forced functionalisation doubles capture time: two families here (a U-Net with cross
# attention and a DiT) keep the suite short; CogVideoX, which needs it, has its own test
@pytest.mark.parametrize("family", ["sd", "dit"])
def test_functionalised_capture_keeps_every_family_working(family, monkeypatch):
    """A program without in-place ops is kept as exported (functionalising it would
    double the capture time); forced, the functionalised graph of every family is still
    exact, shares the parameters, and has the same units, FLOPs and cache shapes."""
    import torch.utils._pytree as pytree

    import fxcache.capture as capture_module
    from fxcache.analyze.units import find_units

    T = tiny(family)
    args, kwargs = T.inputs(T.timesteps[1])
    plain = find_units(capture(T.model, args, kwargs).gm)
    monkeypatch.setattr(capture_module, "FUNCTIONALIZE", "always")
    c = capture(T.model, args, kwargs)
    out = c.call(c.gm, pytree.tree_flatten((args, kwargs))[0])
    assert torch.equal(T.output(out), T.output(T.model(*args, **kwargs)))
    params = dict(T.model.named_parameters())
    assert all(p is params[name] for name, p in c.gm.named_parameters())
    # eval-mode dropout became a plain clone in functionalisation; capture removes it again
    assert not [n.name for n in c.gm.graph.nodes if n.target is torch.ops.aten.clone.default and not n.kwargs]
    units = find_units(c.gm)
    assert units.full_flops == plain.full_flops
    summary = lambda us: [(u.name, u.kind, u.flops, u.out_shapes) for u in us]
    assert summary(units) == summary(plain)
    if family in ("unet2d", "dit"):  # and the rewrite of a functionalised graph means the plan
        name = "skip_branch.1" if family == "unet2d" else "transformer_blocks.1"
        mask = fxcache.Mask([[True], [False]], [name], periodic=True)
        _against_reference(T, mask, fxcache.compile(T.model, mask, **EAGER), exact=False)


def test_cogvideox_with_rotary_embedding_is_bit_exact_and_caches():
    """Its attention processor writes the rotary embedding by slice assignment; the
    rewrite used to drop it (compute-everything plans were 0.04-0.2 off)."""
    T = tiny("cogvideox")
    args, kwargs = T.inputs(T.timesteps[0])
    names = [u.name for u in fxcache.units(T.model, *args, **kwargs)]
    assert {"transformer_blocks.0.attn1", "transformer_blocks.1.ff", "transformer_blocks.1"} <= set(names)
    full = fxcache.compile(T.model, fxcache.Mask([[True] * len(names)], names, periodic=True), **EAGER)
    with torch.no_grad():
        for t in T.timesteps:
            assert torch.equal(T.output(T.call(full, t)), T.output(T.call(T.model, t)))
    cm = fxcache.compile(T.model, fxcache.FORA(interval=2), **EAGER)
    with torch.no_grad():
        T.call(cm, T.timesteps[0])
    plan = cm.plan
    _against_reference(T, fxcache.Mask(plan.table, plan.units, periodic=plan.periodic),
                       fxcache.compile(T.model, fxcache.FORA(interval=2), **EAGER), exact=False)


class _CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.lin(x) * self.calls


class _StatefulModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([_CountsCalls()])

    def forward(self, x, timestep):
        return self.transformer_blocks[0](x * timestep)


class _MutatesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, x, timestep):
        x.mul_(timestep)
        return self.transformer_blocks[0](x)


def test_mutation_of_model_state_is_a_capture_error():
    cm = fxcache.compile(_StatefulModel(), fxcache.Mask([[True]], ["transformer_blocks.0"]), **EAGER)
    with pytest.raises(fxcache.CaptureError, match=r"buffer 'transformer_blocks\.0\.calls'.*module 'transformer_blocks\.0'"):
        cm(torch.randn(2, 4), torch.tensor(1.0))


def test_mutation_of_an_input_is_a_capture_error():
    cm = fxcache.compile(_MutatesInput(), fxcache.Mask([[True]], ["transformer_blocks.0"]), **EAGER)
    with pytest.raises(fxcache.CaptureError, match=r"input 'x'"):
        cm(torch.randn(2, 4), torch.tensor(2.0))


# ------------------------------------------------------------ fusion proven by shapes


class _GateBlock(nn.Module):
    def __init__(self, gate_shape, c):
        super().__init__()
        self.attn = nn.Linear(c, c)
        self.gate = nn.Parameter(torch.randn(gate_shape))

    def forward(self, x, t):
        gate = torch.tanh(self.gate * t)
        return x + gate * self.attn(x)


class _Gated(nn.Module):
    def __init__(self, gate_shape, c=8):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([_GateBlock(gate_shape, c)])

    def forward(self, x, timestep):
        h = x * timestep
        for block in self.transformer_blocks:
            h = block(h, timestep)
        return (h,)


@pytest.mark.parametrize(
    "gate_shape,fused",
    [((4, 8), False), ((1, 4, 8), False), ((4, 4, 8), False), ((4, 1, 8), True), ((1, 1, 8), True), ((8,), True)],
    ids=["per-token-2d", "per-token-3d", "per-element", "per-sample", "per-channel-3d", "per-channel"],
)
def test_gate_fusion_is_proven_by_shapes(gate_shape, fused):
    """B == N == 4: a (4, 8) gate broadcasts against (4, 4, 8) per token, not per sample."""
    torch.manual_seed(0)
    T = _toy(_Gated(gate_shape), torch.randn(4, 4, 8))
    mask = fxcache.Mask([[True], [False]], ["transformer_blocks.0.attn"], periodic=True)
    cm = fxcache.compile(T.model, mask, **EAGER)
    _against_reference(T, mask, cm, exact=False)
    reuse = cm.entries[-1].solved.graphs[cm.plan.kind_of_step(1)]
    assert reuse.fused == (1 if fused else 0)
    # the pass says what it did: the site fused, or the candidate refused and why
    result = reuse.fused
    assert result.count == len(result.sites) == (1 if fused else 0)
    if fused:
        assert result.sites[0].gate_shape == gate_shape and result.refused == ()
    else:
        assert len(result.refused) == 1
        reason = result.refused[0].reason
        assert "not per sample and channel" in reason or "broadcasts the cached value" in reason, reason


class _OrderBlock(nn.Module):
    def __init__(self, order, c=8):
        super().__init__()
        self.order = order
        self.attn = nn.Linear(c, c)
        self.gate = nn.Parameter(torch.randn(c))

    def forward(self, x, t):
        gate, h = torch.tanh(self.gate * t), self.attn(x)
        return {
            "x+g*c": lambda: x + gate * h,
            "x+c*g": lambda: x + h * gate,
            "g*c+x": lambda: gate * h + x,
            "c*g+x": lambda: h * gate + x,
            "alpha": lambda: torch.add(x, gate * h, alpha=2.0),  # not x + gate * cache
            "shared": lambda: self._shared(x, gate * h),  # the product is needed on its own
        }[self.order]()

    @staticmethod
    def _shared(x, p):
        return (x + p) * p


@pytest.mark.parametrize(
    "order,fused", [("x+g*c", 1), ("x+c*g", 1), ("g*c+x", 1), ("c*g+x", 1), ("alpha", 0), ("shared", 0)]
)
def test_gate_fusion_pattern_in_every_argument_order(order, fused):
    """The declared patterns match ``x + gate * cache`` however the commutative ops are
    written, and nothing else: not ``add`` with ``alpha``, not a product used elsewhere."""
    torch.manual_seed(0)
    model = _Gated((8,))
    model.transformer_blocks = nn.ModuleList([_OrderBlock(order)])
    T = _toy(model, torch.randn(4, 4, 8))
    mask = fxcache.Mask([[True], [False]], ["transformer_blocks.0.attn"], periodic=True)
    cm = fxcache.compile(T.model, mask, **EAGER)
    _against_reference(T, mask, cm, exact=False)
    assert cm.entries[-1].solved.graphs[cm.plan.kind_of_step(1)].fused == fused


def test_dit_gate_is_still_fused():
    T = tiny("dit")
    cm = fxcache.compile(T.model, fxcache.FORA(interval=2), **EAGER)
    with torch.no_grad():
        T.call(cm, T.timesteps[0])
    assert cm.entries[-1].solved.graphs[cm.plan.kind_of_step(1)].fused >= 1


# ------------------------------------------------------------ outputs never alias buffers


class _LastUnit(nn.Module):
    def __init__(self, view: bool, c=8):
        super().__init__()
        self.view = view
        self.transformer_blocks = nn.ModuleList([nn.Linear(c, c), nn.Linear(c, c)])

    def forward(self, x, timestep):
        h = x * timestep
        for block in self.transformer_blocks:
            h = block(h)
        return (h.transpose(0, 1)[1:],) if self.view else (h,)


@pytest.mark.parametrize("backend", [None, "aot_eager"], ids=["eager", "aot_eager"])
@pytest.mark.parametrize("segments", [False, True], ids=["whole", "segments"])
@pytest.mark.parametrize("view", [False, True], ids=["buffer", "view"])
def test_output_never_aliases_a_cache_buffer(view, segments, backend):
    torch.manual_seed(0)
    T = _toy(_LastUnit(view), torch.randn(3, 5, 8))
    mask = fxcache.Mask([[True], [False]], ["transformer_blocks.1"], periodic=True)
    cm = fxcache.compile(T.model, mask, backend=backend, segments=segments)
    with torch.no_grad():
        T.call(cm, T.timesteps[0])
        held = T.output(T.call(cm, T.timesteps[1]))  # the reused block's value
        expected = held.clone()
        T.call(cm, T.timesteps[2])  # computes block 1 again and writes its buffer
    assert ("segment" in cm.plan.compile_note) == segments
    assert torch.equal(held, expected)
    bufs = [b for d in cm.cache_tensors().values() for b in d.values()]
    assert bufs
    assert all(held.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() for b in bufs)
    _against_reference(T, mask, fxcache.compile(T.model, mask, backend=backend, segments=segments))


# ------------------------------------------------------------ the invariants in one place


def _reuse_mask(T):
    args, kwargs = T.inputs(T.timesteps[0])
    units = [u for u in fxcache.units(T.model, *args, **kwargs) if u.kind != "skip_branch"]
    names = [units[0].name, units[-1].name]
    return fxcache.Mask([[True, True], [False, True], [True, False]], names, periodic=True)


@pytest.mark.parametrize(
    "family,segments",
    [(f, False) for f in FAMILIES] + [(f, True) for f in ("unet2d", "flux", "cogvideox")],
    ids=[f"{f}-whole" for f in FAMILIES] + [f"{f}-segments" for f in ("unet2d", "flux", "cogvideox")],
)
def test_contract_holds_after_every_pass(family, segments, monkeypatch):
    from fxcache.rewrite import contract

    monkeypatch.setenv("FXCACHE_CHECK", "1")
    seen = []
    check = contract.check_graph

    def recording(gm, *, units=None, where="graph"):
        seen.append(where)
        return check(gm, units=units, where=where)

    monkeypatch.setattr(contract, "check_graph", recording)
    T = tiny(family)
    mask = _reuse_mask(T)
    cm = fxcache.compile(T.model, mask, segments=segments, **EAGER)
    with torch.no_grad():
        for t in T.timesteps[:3]:
            T.call(cm, t)
    assert {"capture", "step graph", "fusion"} <= set(seen)
    assert ("segment" in seen) == segments
    entry = cm.entries[-1]
    plan_units = [u for u in entry.units if u.name in set(entry.plan.units)]
    for g in entry.solved.graphs:
        check(g.gm, units=plan_units)


def _graph(*, mutate=None, output="clone", write_into="buffer"):
    """x, a cache buffer read, one written -> y = x * 2 [mutated], written into the second
    buffer [or into x]; returns y and something made of the first buffer."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.zeros(2, 3)
    buf, written = graph.placeholder("cache__u__0"), graph.placeholder("cache__v__0")
    for node, slot in ((buf, ("u", 0)), (written, ("v", 0))):
        node.meta["val"] = torch.zeros(2, 3)
        node.meta["fxcache.buffer"] = slot
    y = graph.call_function(torch.ops.aten.mul.Tensor, (x, 2))
    if mutate is not None:
        graph.call_function(mutate, (y, 2))
    target = {"buffer": written, "input": x, "read": buf}[write_into]
    graph.call_function(torch.ops.aten.copy_.default, (target, y))
    if output == "clone":
        out = graph.call_function(torch.ops.aten.clone.default, (buf,))
    elif output == "buffer":
        out = buf
    elif output == "view":
        t = graph.call_function(torch.ops.aten.t.default, (buf,))
        out = graph.call_function(torch.ops.aten.slice.Tensor, (t, 0, 1))
    elif output == "split":
        parts = graph.call_function(torch.ops.aten.split.Tensor, (buf, 1))
        out = graph.call_function(operator.getitem, (parts, 0))
    graph.output((y, out))
    return fx.GraphModule(nn.Module(), graph)


def test_check_graph_accepts_cache_writes_and_fresh_outputs():
    from fxcache.rewrite.contract import check_graph

    check_graph(_graph())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mutate=torch.ops.aten.mul_.Tensor), r"mutating op aten\.mul_\.Tensor"),
        (dict(write_into="input"), r"copy_.*'x'.*not a cache buffer"),
        (dict(write_into="read"), r"buffer 'cache__u__0' is written by '\w+' and read by \['\w+'\]"),
        (dict(output="buffer"), r"output.*cache__u__0"),
        (dict(output="view"), r"output.*view of cache buffer 'cache__u__0'"),
        (dict(output="split"), r"output.*view of cache buffer 'cache__u__0'"),
    ],
    ids=["mul_", "write-into-input", "write-and-read", "output-is-buffer", "output-is-view", "output-is-split"],
)
def test_check_graph_catches_each_violation(kwargs, match):
    from fxcache.errors import ContractError, FxcacheError
    from fxcache.rewrite.contract import check_graph

    assert issubclass(ContractError, FxcacheError)
    with pytest.raises(ContractError, match=match):
        check_graph(_graph(**kwargs))


def test_check_graph_catches_overlapping_units():
    from fxcache.errors import ContractError
    from fxcache.rewrite.contract import check_graph

    gm = _graph()
    a = Unit("a", "attention", frozenset({"x", "mul"}), ("mul",))
    b = Unit("b", "mlp", frozenset({"mul", "copy_"}), ("copy_",))
    inner = Unit("c", "mlp", frozenset({"mul"}), ("mul",))
    check_graph(gm, units=[a, inner])
    with pytest.raises(ContractError, match=r"units 'a' and 'b' overlap"):
        check_graph(gm, units=[a, b])


def test_check_is_off_by_default(monkeypatch):
    from fxcache.rewrite import contract

    monkeypatch.delenv("FXCACHE_CHECK", raising=False)
    assert not contract.enabled()
    contract.maybe_check(_graph(output="buffer"), where="test")  # off: no error
    monkeypatch.setenv("FXCACHE_CHECK", "1")
    with pytest.raises(fxcache.FxcacheError):
        contract.maybe_check(_graph(output="buffer"), where="test")
