"""fxcache.kernels: the Triton kernels against their PyTorch references.

The kernel tests run where the kernels were built for: on CPU tensors in Triton's
interpreter (``TRITON_INTERPRET=1``, what scripts/test.sh and tests/conftest.py set), or
natively on CUDA tensors (``TRITON_INTERPRET=0`` on a GPU machine, what
scripts/gpu_check.sh runs). Triton reads TRITON_INTERPRET when ``@triton.jit``
decorates a kernel (when fxcache.kernels is first imported), not at launch, so the
variable must be set before Python starts; the tests skip, saying so, when neither
applies. Inputs are made on the CPU and moved; results are compared on the CPU with the
reference computed on the CPU. The CUDA path as far as it goes without a GPU
(registered op, fake-tensor tracing, an sm_90 build) and the no-triton install are
checked in subprocesses, whose environment this file controls.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import fxcache.kernels as K
from fxcache.kernels import KernelArgumentError

from _cuda import REQUIRE_CUDA, OpLog, need_cuda

_affine = importlib.import_module("fxcache.kernels.affine")

# Tolerances travel with the dtype. Kernel and reference both compute in fp32 and
# round once, so the only differences are contraction into FMA on a GPU (fp32) and
# the last rounding: Triton's interpreter truncates fp32 -> bf16 where the GPU and
# PyTorch round to nearest, i.e. up to 1 bf16 ulp = 2**-8 relative (< rtol 1e-2).
DTYPES = [
    pytest.param(torch.float32, 1e-6, 1e-6, id="fp32"),
    pytest.param(torch.float16, 1e-3, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
]

# (shape, channel_dim). A program handles a tile of at most 1024 columns (channels
# when channel-last, positions when channel-first) by up to 2048/columns rows, padded
# to powers of two and masked: none of these sizes is a multiple of anything, and the
# last two need several column tiles, the last one partial.
SHAPES = [
    pytest.param((2, 5, 7, 3), 1, id="nchw-2x5x7x3"),
    pytest.param((2, 3, 20, 21), 1, id="nchw-2x3x20x21"),
    pytest.param((2, 6, 11), 1, id="ncl-2x6x11"),
    pytest.param((3, 17, 33), -1, id="bnc-3x17x33"),
    pytest.param((1, 1, 5), -1, id="bnc-1x1x5"),
    pytest.param((4, 9), -1, id="bc-4x9"),
    pytest.param((1, 2, 33, 40), 1, id="nchw-1x2x33x40"),
    pytest.param((2, 3, 1100), -1, id="bnc-2x3x1100"),
]

BCAST = ["BC", "1C", "C"]


def _param(mode, B, C, dtype, gen):
    shape = {"BC": (B, C), "1C": (1, C), "C": (C,)}[mode]
    return (0.5 * torch.randn(shape, generator=gen)).to(dtype)


def _channels(shape, channel_dim):
    return shape[channel_dim]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _assert_close(got, want, atol, rtol):
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    torch.testing.assert_close(got.cpu().float(), want.cpu().float(), atol=atol, rtol=rtol)


def _kernels_interpreted() -> bool:
    from fxcache.kernels._common import is_interpreted

    return is_interpreted(_affine._affine_kernel)


@pytest.fixture(scope="module")
def dev():
    """The device the Triton kernels run on here: ``cpu`` when they were built for the
    interpreter, ``cuda`` when built for the GPU and a GPU is present; skip otherwise
    (fail under FXCACHE_REQUIRE_CUDA=1, i.e. in gpu_check.sh's GPU mode, unless native)."""
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels are not tested")
    if not K.HAS_TRITON:
        from fxcache.kernels._common import TRITON_UNAVAILABLE_REASON

        pytest.skip(f"triton is installed but fxcache.kernels cannot use it: {TRITON_UNAVAILABLE_REASON}")
    if _kernels_interpreted():
        if REQUIRE_CUDA:
            pytest.fail("FXCACHE_REQUIRE_CUDA=1 but the kernels were built for the interpreter: set TRITON_INTERPRET=0")
        return "cpu"
    need_cuda(
        "running the Triton kernels built for the GPU (TRITON_INTERPRET=1 set before Python starts "
        "runs them in the interpreter instead)"
    )
    return "cuda"


# --------------------------------------------------------------------------- kernel vs reference
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("mode", BCAST)
@pytest.mark.parametrize("shape,channel_dim", SHAPES)
def test_scale_shift_kernel_matches_reference(dev, shape, channel_dim, mode, dtype, atol, rtol):
    g = _gen()
    B, C = shape[0], _channels(shape, channel_dim)
    cache = torch.randn(shape, generator=g).to(dtype)
    scale = _param(mode, B, C, dtype, g)
    shift = _param(BCAST[(BCAST.index(mode) + 1) % 3], B, C, dtype, g)  # mix the two modes
    got = K.scale_shift_triton(cache.to(dev), scale.to(dev), shift.to(dev), channel_dim)
    _assert_close(got, K.scale_shift_reference(cache, scale, shift, channel_dim), atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("mode", BCAST)
@pytest.mark.parametrize("shape,channel_dim", SHAPES)
def test_gated_residual_kernel_matches_reference(dev, shape, channel_dim, mode, dtype, atol, rtol):
    g = _gen(1)
    B, C = shape[0], _channels(shape, channel_dim)
    x = torch.randn(shape, generator=g).to(dtype)
    cache = torch.randn(shape, generator=g).to(dtype)
    gate = _param(mode, B, C, dtype, g)
    got = K.gated_residual_triton(x.to(dev), gate.to(dev), cache.to(dev), channel_dim)
    _assert_close(got, K.gated_residual_reference(x, gate, cache, channel_dim), atol, rtol)


def test_reference_is_the_unfused_expression():
    """In fp32 the references are the eager expressions they replace, bit for bit."""
    g = _gen(2)
    cache, x = torch.randn(2, 5, 7, 3, generator=g), torch.randn(2, 5, 7, 3, generator=g)
    scale, shift, gate = (torch.randn(2, 5, generator=g) for _ in range(3))
    v = lambda p: p[:, :, None, None]  # noqa: E731
    assert torch.equal(K.scale_shift_reference(cache, scale, shift, 1), cache * (1 + v(scale)) + v(shift))
    assert torch.equal(K.gated_residual_reference(x, gate, cache, 1), x + v(gate) * cache)
    seq, tok = torch.randn(2, 9, 5, generator=g), torch.randn(2, 9, 5, generator=g)
    assert torch.equal(
        K.scale_shift_reference(seq, scale, shift, -1), seq * (1 + scale[:, None]) + shift[:, None]
    )
    assert torch.equal(K.gated_residual_reference(seq, gate, tok, -1), seq + gate[:, None] * tok)


def test_output_dtype_follows_type_promotion(dev):
    """bf16 features with fp32 scale/gate give fp32, as the unfused expression does."""
    g = _gen(3)
    cache = torch.randn(2, 7, 6, generator=g).bfloat16()
    scale, shift = torch.randn(2, 6, generator=g), torch.randn(6, generator=g).bfloat16()
    want = K.scale_shift_reference(cache, scale, shift, -1)
    assert want.dtype == (cache * (1 + scale[:, None]) + shift).dtype == torch.float32
    _assert_close(K.scale_shift_triton(cache.to(dev), scale.to(dev), shift.to(dev), -1), want, 1e-6, 1e-6)
    x = torch.randn(2, 7, 6, generator=g).bfloat16()
    got = K.gated_residual_triton(x.to(dev), scale.to(dev), cache.to(dev), -1)
    _assert_close(got, K.gated_residual_reference(x, scale, cache, -1), 1e-6, 1e-6)


def test_channels_last_is_read_in_place(dev):
    """NCHW in channels_last memory format runs the channel-last variant, keeps the format."""
    g = _gen(4)
    cache = torch.randn(2, 5, 7, 3, generator=g).to(dev).to(memory_format=torch.channels_last)
    x = torch.randn(2, 5, 7, 3, generator=g).to(dev).to(memory_format=torch.channels_last)
    scale, shift = torch.randn(2, 5, generator=g).to(dev), torch.randn(1, 5, generator=g).to(dev)
    got = K.scale_shift_triton(cache, scale, shift, 1)
    assert got.is_contiguous(memory_format=torch.channels_last)
    _assert_close(got, K.scale_shift_reference(cache, scale, shift, 1), 1e-6, 1e-6)
    got = K.gated_residual_triton(x, scale, cache, 1)
    assert got.is_contiguous(memory_format=torch.channels_last)
    _assert_close(got, K.gated_residual_reference(x, scale, cache, 1), 1e-6, 1e-6)
    # mixed formats: cache is brought to x's format
    got = K.gated_residual_triton(x.contiguous(), scale, cache, 1)
    _assert_close(got, K.gated_residual_reference(x.contiguous(), scale, cache, 1), 1e-6, 1e-6)


def test_noncontiguous_inputs(dev):
    """Strided features are copied to contiguous by the launcher; strided parameters
    (adaLN's ``emb.chunk(k, dim=1)`` views, channel steps) are read through their strides.
    Inputs are never modified."""
    g = _gen(5)
    B, N, C = 3, 11, 6
    # the views are taken on the device (moving a view would make it contiguous)
    cache = torch.randn(B, C, N, generator=g).to(dev).transpose(1, 2)  # (B, N, C), not contiguous
    x = torch.randn(B, N, 2 * C, generator=g).to(dev)[..., ::2]  # (B, N, C), channel step 2
    emb = torch.randn(B, 3 * C, generator=g).to(dev)
    scale, shift, gate = emb.chunk(3, dim=1)  # (B, C) views with batch stride 3C
    strided = torch.randn(1, 2 * C, generator=g).to(dev)[:, ::2]  # (1, C), channel stride 2
    assert not (cache.is_contiguous() or x.is_contiguous() or scale.is_contiguous() or strided.is_contiguous())
    before = [t.clone() for t in (cache, x, emb, strided)]

    for sc, sh in [(scale, shift), (strided, shift), (scale, strided)]:
        got = K.scale_shift_triton(cache, sc, sh, -1)
        _assert_close(got, K.scale_shift_reference(cache, sc, sh, -1), 1e-6, 1e-6)
    for gt in (gate, strided):
        got = K.gated_residual_triton(x, gt, cache, -1)
        _assert_close(got, K.gated_residual_reference(x, gt, cache, -1), 1e-6, 1e-6)
    # NCHW with a permuted (neither contiguous nor channels_last) feature map
    nchw = torch.randn(2, 7, 5, 3, generator=g).to(dev).permute(0, 2, 1, 3)  # (2, 5, 7, 3)
    s2 = torch.randn(2, 5, generator=g).to(dev)
    _assert_close(K.scale_shift_triton(nchw, s2, s2, 1), K.scale_shift_reference(nchw, s2, s2, 1), 1e-6, 1e-6)
    for t, b in zip((cache, x, emb, strided), before):
        assert torch.equal(t, b)


def test_empty_tensor(dev):
    cache = torch.empty(0, 4, 3, device=dev)
    p = torch.empty(3, device=dev)
    assert K.scale_shift_triton(cache, p, p, -1).shape == (0, 4, 3)
    assert K.gated_residual_triton(cache, p, cache, -1).shape == (0, 4, 3)


# Values worked out by hand (not by any implementation), exact in fp32, fp16 and bf16:
# cache[b, n, :] = 3 * (2b + n) + (0, 1, 2), B = N = 2, C = 3.
_CACHE = [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]
_SCALE = [[0, 1, -1], [0.5, 2, 0]]  # (B, C)
_SHIFT = [1, 0, -2]  # (C,)
# cache * (1 + scale) + shift: factors (1, 2, 0) for sample 0, (1.5, 3, 1) for sample 1
_SCALE_SHIFT = [[[1, 2, -2], [4, 8, -2]], [[10, 21, 6], [14.5, 30, 9]]]
_X = [[[1, 1, 1], [2, 2, 2]], [[0, 0, 0], [-1, -1, -1]]]
_GATE = [[2, -1, 0.5]]  # (1, C)
# x + gate * cache
_GATED = [[[1, 0, 2], [8, -2, 4.5]], [[12, -7, 4], [17, -11, 4.5]]]


def _known(dtype, channel_dim, device):
    """The worked example as (B, N, C) (channel_dim -1) or (B, C, N) (channel_dim 1)."""
    def t(v, feature=True):
        v = torch.tensor(v, dtype=dtype)
        return v.transpose(1, 2).contiguous().to(device) if feature and channel_dim == 1 else v.to(device)
    return (t(_CACHE), t(_SCALE, False), t(_SHIFT, False), t(_X), t(_GATE, False),
            t(_SCALE_SHIFT).cpu(), t(_GATED).cpu())


@pytest.mark.parametrize("channel_dim", [-1, 1], ids=["tokens", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_kernel_gives_the_worked_example(dev, dtype, channel_dim):
    """Both modes of the one kernel, and the references, against values worked out by
    hand (an expectation independent of every implementation; exact in every dtype)."""
    cache, scale, shift, x, gate, want_ss, want_gr = _known(dtype, channel_dim, dev)
    for fn in (K.scale_shift_triton, K.scale_shift_reference):
        assert torch.equal(fn(cache, scale, shift, channel_dim).cpu(), want_ss), fn.__name__
    for fn in (K.gated_residual_triton, K.gated_residual_reference):
        assert torch.equal(fn(x, gate, cache, channel_dim).cpu(), want_gr), fn.__name__


# --------------------------------------------------------------------------- argument errors
def _impls(name):
    """The implementations of one op that must all refuse bad arguments the same way."""
    ref = getattr(K, f"{name}_reference")
    kernel = getattr(K, f"{name}_triton")
    return [
        pytest.param(ref, id="reference"),
        pytest.param(getattr(K, name), id="dispatch"),
        pytest.param(
            kernel,
            id="triton",
            marks=pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not available"),
        ),
    ]


SCALE_SHIFT_ERRORS = [
    pytest.param(
        ((2, 5, 7, 3), (3, 5), (5,), 1),
        "scale_shift: `scale` has shape (3, 5); expected (2, 5), (1, 5) or (5,)",
        id="scale-batch",
    ),
    pytest.param(
        ((2, 5, 7, 3), (2, 5), (6,), 1),
        "scale_shift: `shift` has shape (6,); expected (2, 5), (1, 5) or (5,)",
        id="shift-channels",
    ),
    pytest.param(
        ((3, 17, 33), (3, 33, 1), (33,), -1),
        "scale_shift: `scale` has shape (3, 33, 1); expected (3, 33), (1, 33) or (33,)",
        id="scale-rank",
    ),
    pytest.param(
        ((3, 17, 33), (3, 17), (33,), -1),
        "scale_shift: `scale` has shape (3, 17); expected (3, 33), (1, 33) or (33,)",
        id="wrong-channel-dim-for-params",
    ),
    pytest.param(((7,), (7,), (7,), -1), "scale_shift: `cache` has shape (7,); expected at least 2 dims", id="cache-1d"),
    pytest.param(
        ((2, 5, 7, 3), (2, 5), (5,), 2),
        "scale_shift: channel_dim=2 is not supported for `cache` of shape (2, 5, 7, 3); use 1",
        id="channel-dim",
    ),
]


@pytest.mark.parametrize("fn", _impls("scale_shift"))
@pytest.mark.parametrize("shapes,message", SCALE_SHIFT_ERRORS)
def test_scale_shift_bad_arguments(fn, shapes, message):
    cshape, sshape, hshape, channel_dim = shapes
    with pytest.raises(KernelArgumentError, match=re.escape(message)) as info:
        fn(torch.randn(cshape), torch.randn(sshape), torch.randn(hshape), channel_dim)
    assert isinstance(info.value, ValueError)


GATED_RESIDUAL_ERRORS = [
    pytest.param(
        ((2, 7, 5), (2, 5), (2, 7, 6), -1),
        "gated_residual: `cache` has shape (2, 7, 6); expected (2, 7, 5), the shape of `x`",
        id="cache-shape",
    ),
    pytest.param(
        ((2, 7, 5), (2, 7), (2, 7, 5), -1),
        "gated_residual: `gate` has shape (2, 7); expected (2, 5), (1, 5) or (5,)",
        id="gate-channels",
    ),
    pytest.param(
        ((2, 5, 4, 4), (4, 5), (2, 5, 4, 4), 1),
        "gated_residual: `gate` has shape (4, 5); expected (2, 5), (1, 5) or (5,)",
        id="gate-batch",
    ),
]


@pytest.mark.parametrize("fn", _impls("gated_residual"))
@pytest.mark.parametrize("shapes,message", GATED_RESIDUAL_ERRORS)
def test_gated_residual_bad_arguments(fn, shapes, message):
    xshape, gshape, cshape, channel_dim = shapes
    with pytest.raises(KernelArgumentError, match=re.escape(message)):
        fn(torch.randn(xshape), torch.randn(gshape), torch.randn(cshape), channel_dim)


def test_kernel_refuses_unsupported_dtype():
    pytest.importorskip("triton", reason="triton is not installed")
    if not K.HAS_TRITON:
        pytest.skip("triton is not available")
    cache, p = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(4)
    with pytest.raises(KernelArgumentError, match=re.escape("`cache` has dtype torch.float64")):
        K.scale_shift_triton(cache, p, p, -1)
    with pytest.raises(KernelArgumentError, match=re.escape("`gate` has dtype torch.float64")):
        K.gated_residual_triton(cache.float(), p.double(), cache.float(), -1)
    # the references (the CPU implementation) take any floating dtype
    assert K.scale_shift(cache, p, p, -1).dtype == torch.float64


# --------------------------------------------------------------------------- the CPU dispatch path
def _count_calls(monkeypatch, module, name):
    """Replace ``module.name`` by a wrapper that counts its calls (the dispatch functions
    look the reference up on its module at call time)."""
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _dispatch_inputs(dtype, device):
    g = _gen(6)
    cache, x = torch.randn(2, 5, 7, 3, generator=g), torch.randn(2, 5, 7, 3, generator=g)
    scale, shift = torch.randn(2, 5, generator=g), torch.randn(5, generator=g)
    return [t.to(dtype).to(device) for t in (cache, x, scale, shift)]


def _by_hand(cache, x, scale, shift):
    """The two expressions written out in fp32 (what both implementations compute), NCHW."""
    f = [t.float() for t in (cache, x, scale, shift)]
    c, xx, sc, sh = f
    return c * (1 + sc[:, :, None, None]) + sh[None, :, None, None], xx + sc[:, :, None, None] * c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dispatch_on_cpu_runs_the_reference_not_the_op(dtype, monkeypatch):
    """On CPU tensors the dispatch functions call the PyTorch reference (counted) and no
    fxcache op or Triton kernel is dispatched (every dispatched operator is logged); the
    result is the expression computed by hand in fp32 and rounded once."""
    ss_calls = _count_calls(monkeypatch, _affine, "scale_shift_reference")
    gr_calls = _count_calls(monkeypatch, _affine, "gated_residual_reference")
    cache, x, scale, shift = _dispatch_inputs(dtype, "cpu")
    with OpLog() as log:
        y = K.scale_shift(cache, scale, shift, 1)
        z = K.gated_residual(x, scale, cache, 1)
    assert len(ss_calls) == 1 and len(gr_calls) == 1
    assert log.custom_kernel_calls() == [] and log.names  # the reference's aten ops, nothing else
    want_y, want_z = _by_hand(cache, x, scale, shift)
    assert y.dtype == z.dtype == dtype
    assert torch.equal(y, want_y.to(dtype)) and torch.equal(z, want_z.to(dtype))


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_dispatch_on_cuda_runs_the_op(dev, dtype, atol, rtol, monkeypatch):
    """On CUDA tensors, with the kernels built for the GPU, the dispatch functions run the
    registered Triton op (logged), not the reference, and give the hand-written result."""
    if dev != "cuda":
        pytest.skip("the dispatch to the Triton op is for CUDA tensors and GPU-built kernels "
                    "(here the kernels run in the interpreter, where the dispatch uses the reference)")
    ss_calls = _count_calls(monkeypatch, _affine, "scale_shift_reference")
    gr_calls = _count_calls(monkeypatch, _affine, "gated_residual_reference")
    cache, x, scale, shift = _dispatch_inputs(dtype, "cuda")
    with OpLog() as log:
        y = K.scale_shift(cache, scale, shift, 1)
        z = K.gated_residual(x, scale, cache, 1)
    assert ss_calls == [] and gr_calls == []
    assert len(log.custom_kernel_calls()) >= 2, log.names
    want_y, want_z = _by_hand(cache.cpu(), x.cpu(), scale.cpu(), shift.cpu())
    _assert_close(y, want_y.to(dtype), atol, rtol)
    _assert_close(z, want_z.to(dtype), atol, rtol)


def test_dispatch_compiles_fullgraph_on_cpu():
    """What the graph rewrite relies on: the dispatch functions trace with no graph break."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def block(h, cache, emb):
        shift, scale, gate = emb.chunk(3, dim=1)
        y = K.scale_shift(cache, scale, shift, -1)
        return K.gated_residual(h, gate, y, -1).relu()

    g = _gen(7)
    h, cache, emb = torch.randn(2, 9, 6, generator=g), torch.randn(2, 9, 6, generator=g), torch.randn(2, 18, generator=g)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    got = compiled(h, cache, emb)
    assert counter.frame_count == 1  # one graph: fullgraph=True would have raised on a break
    # against the expression written out here (not the reference it runs) ...
    shift, scale, gate = (c[:, None, :] for c in emb.chunk(3, dim=1))
    assert torch.equal(got, (h + gate * (cache * (1 + scale) + shift)).relu())
    # ... and against the Triton kernel, where it runs here (the interpreter)
    if K.HAS_TRITON and _kernels_interpreted():
        s, sc, gt = emb.chunk(3, dim=1)
        want = K.gated_residual_triton(h, gt, K.scale_shift_triton(cache, sc, s, -1), -1).relu()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    calls = [n.target for gm in counter.graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert not any("fxcache" in str(t) for t in calls)  # reference arithmetic, not the triton op
    torch._dynamo.reset()


# --------------------------------------------------------------------------- subprocesses
def _run(code, env_update, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_update)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_package_imports_without_triton():
    out = _run(
        """
        import sys
        sys.modules["triton"] = None  # as if triton were not installed
        import torch
        import fxcache.kernels as K
        assert K.HAS_TRITON is False
        assert not hasattr(torch.ops.fxcache, "scale_shift")
        x, p = torch.randn(2, 3, 4), torch.randn(4)
        assert torch.equal(K.scale_shift(x, p, p, -1), x * (1 + p) + p)
        assert torch.equal(K.gated_residual(x, p, x, -1), x + p * x)
        for fn, args in [(K.scale_shift_triton, (x, p, p, -1)), (K.gated_residual_triton, (x, p, x, -1))]:
            try:
                fn(*args)
            except RuntimeError as e:
                assert "needs Triton" in str(e), e
            else:
                raise AssertionError("no RuntimeError")
        print("ok")
        """,
        {},
        drop=("TRITON_INTERPRET",),
    )
    assert out.strip() == "ok"


_GPU_BUILD_SCRIPT = r"""
import json, logging, traceback
import torch
import fxcache.kernels as K

results = {}


def check(name):
    def run(fn):
        try:
            fn()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    return run


@check("refuse_cpu")
def _():
    x = torch.randn(2, 3, 4)
    try:
        K.scale_shift_triton(x, x[:, 0], x[:, 0], -1)
    except RuntimeError as e:
        assert "TRITON_INTERPRET=1" in str(e), e
    else:
        raise AssertionError("CPU launch of a GPU kernel was not refused")


@check("fake_cuda_trace")
def _():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    # no GPU driver: the mutation analysis of the kernel warns and assumes every arg mutated
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
    fake = FakeTensorMode()
    with fake:
        c = torch.empty(2, 5, 7, 3, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        s = torch.empty(2, 5, device="cuda", dtype=torch.bfloat16)
        h = torch.empty(5, device="cuda", dtype=torch.float32)
        t = torch.empty(2, 9, 5, device="cuda", dtype=torch.float16)
        g = torch.empty(1, 5, device="cuda", dtype=torch.float16)
        y = K.scale_shift(c, s, h, 1)
        assert (y.shape, y.dtype, y.device.type) == ((2, 5, 7, 3), torch.float32, "cuda")
        assert y.is_contiguous(memory_format=torch.channels_last)
        z = K.gated_residual(t, g, t, -1)
        assert (z.shape, z.dtype) == ((2, 9, 5), torch.float16)

    f = lambda c, s, h, t, g: (K.scale_shift(c, s, h, 1), K.gated_residual(t, g, t, -1))
    gm = make_fx(f, tracing_mode="fake")(c, s, h, t, g)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == ["fxcache.scale_shift.default", "fxcache.gated_residual.default"], targets
    # the op decomposed (functionalised) into one launch of the one kernel per call,
    # in its two modes (what inductor would get if the op reached it: see below)
    gm = make_fx(dispatch_functionalize(f), tracing_mode="fake")(c, s, h, t, g)
    calls = [n.kwargs["kwargs"] for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(calls) == 2, gm.code
    # channels_last NCHW is read in place as (B*H*W, C); (B, N, C) as (B*N, C)
    got = [(k["MODE"], k["CHANNEL_LAST"], k["R"], k["K"], k["rows_per_sample"]) for k in calls]
    assert got == [(0, True, 42, 5, 21), (1, True, 18, 5, 9)], got
    # under torch.compile (dynamo traces the fake CUDA tensors) the same calls are the
    # reference arithmetic, which inductor fuses with its neighbours; never the op
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with fake:
        out = torch.compile(f, backend=capture, fullgraph=True)(c, s, h, t, g)
        assert out[0].is_contiguous(memory_format=torch.channels_last)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets and not any("fxcache" in t or "triton" in t for t in targets), graphs[0].code
    # float64 (no kernel for it) stays on the reference arithmetic, on CUDA too
    with FakeTensorMode():
        d = torch.empty(2, 9, 5, device="cuda", dtype=torch.float64)
        dg = torch.empty(5, device="cuda", dtype=torch.float64)
    gm = make_fx(lambda t, g: K.gated_residual(t, g, t, -1), tracing_mode="fake")(d, dg)
    assert not any("fxcache" in str(n.target) for n in gm.graph.nodes), gm.code


@check("compile_sm90")
def _():
    import triton
    import triton.backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        results["compile_sm90"] = "skip: triton has no nvidia backend here"
        return
    kernel = __import__("fxcache.kernels.affine", fromlist=["_"])._affine_kernel
    names = kernel.arg_names
    # mode 0 (scale_shift), mode 1 (gated_residual), each in both layout variants
    for mode, ptrs in [(0, ["*bf16", "*bf16", "*fp32", "*fp32"]), (1, ["*fp16", "*fp16", "*fp16", "*fp16"])]:
        for channel_last, block_r, block_k in [(True, 2, 1024), (False, 256, 8)]:
            const = {"MODE": mode, "CHANNEL_LAST": channel_last, "BLOCK_R": block_r, "BLOCK_K": block_k}
            sig = {n: ptrs[i] if i < 4 else ("constexpr" if n in const else "i32") for i, n in enumerate(names)}
            out = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
            assert "cubin" in out.asm, list(out.asm)


print("RESULTS=" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def gpu_build(tmp_path_factory):
    """One subprocess with the kernels built for the GPU (no TRITON_INTERPRET), shared
    by the tests below: on this GPU-less machine it checks the CUDA path as far as it
    goes without running a kernel."""
    pytest.importorskip("triton", reason="triton is not installed")
    if not K.HAS_TRITON:
        pytest.skip("triton is not available to fxcache.kernels")
    cache_dir = tmp_path_factory.mktemp("triton-cache")  # a real compile, not a cache hit
    out = _run(_GPU_BUILD_SCRIPT, {"TRITON_CACHE_DIR": str(cache_dir)}, drop=("TRITON_INTERPRET",))
    line = [ln for ln in out.splitlines() if ln.startswith("RESULTS=")][-1]
    return json.loads(line[len("RESULTS="):])


def _expect(results, name):
    r = results[name]
    if r.startswith("skip: "):
        pytest.skip(r[len("skip: "):])
    assert r == "ok", r


def test_launcher_refuses_cpu_tensors_without_interpreter(gpu_build):
    """A GPU-built kernel given CPU tensors: a RuntimeError that says to set TRITON_INTERPRET=1."""
    _expect(gpu_build, "refuse_cpu")


def test_ops_trace_on_fake_cuda_tensors(gpu_build):
    """The registered ops give the right output shape, dtype and memory format on fake CUDA
    tensors and decompose into one launch each of the one kernel, in its two modes, with
    the expected tiling; under torch.compile the dispatch functions give the reference
    arithmetic instead (inductor fuses it with its neighbours; the op would block that)."""
    _expect(gpu_build, "fake_cuda_trace")


def test_kernels_compile_for_sm90(gpu_build):
    """The kernel, in both modes and both layout variants, compiles to a cubin for sm_90
    (the interpreter accepts programs the compiler would not)."""
    _expect(gpu_build, "compile_sm90")


# --------------------------------------------------------------------------- forecast
# The forecasting cache read (fxcache.kernels.forecast): sum_j coef[j] * h_j over 2 or 3
# history tensors, alone (any layout, e.g. a U-Net's NCHW skip feature) or fused with
# FORA's gated residual ((B, N, C) tokens, gate per sample and channel).
FORECAST_SHAPES = [
    pytest.param((2, 5, 7, 3), id="nchw-2x5x7x3"),
    pytest.param((2, 3, 20, 21), id="nchw-2x3x20x21"),
    pytest.param((3, 17, 33), id="bnc-3x17x33"),
    pytest.param((1, 1, 5), id="bnc-1x1x5"),
    pytest.param((2, 3, 1100), id="bnc-2x3x1100"),
    pytest.param((3, 7), id="odd-3x7"),
]
TOKEN_SHAPES = [pytest.param((3, 17, 33), id="3x17x33"), pytest.param((1, 1, 5), id="1x1x5"),
                pytest.param((2, 3, 1100), id="2x3x1100")]


def _history(shape, n, dtype, gen, device):
    hist = [torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(n)]
    coef = torch.randn(n, generator=gen).to(device)
    return coef, hist + [None] * (3 - n)


@pytest.mark.parametrize("n", [2, 3], ids=["order1", "order2"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", FORECAST_SHAPES)
def test_forecast_kernel_matches_reference(dev, shape, dtype, atol, rtol, n):
    coef, (h0, h1, h2) = _history(shape, n, dtype, _gen(), dev)
    want = K.forecast_reference(coef.cpu(), h0.cpu(), h1.cpu(), None if h2 is None else h2.cpu())
    _assert_close(K.forecast_triton(coef, h0, h1, h2), want, atol * 4, rtol * 4)  # |coef| sums up to ~3


@pytest.mark.parametrize("n", [2, 3], ids=["order1", "order2"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("mode", BCAST)
@pytest.mark.parametrize("shape", TOKEN_SHAPES)
def test_forecast_gated_residual_kernel_matches_reference(dev, shape, mode, dtype, atol, rtol, n):
    g = _gen(1)
    coef, (h0, h1, h2) = _history(shape, n, dtype, g, dev)
    x = torch.randn(shape, generator=g).to(dtype).to(dev)
    gate = _param(mode, shape[0], shape[-1], dtype, g).to(dev)
    cpu = [None if t is None else t.cpu() for t in (x, gate, coef, h0, h1, h2)]
    want = K.forecast_gated_residual_reference(*cpu, -1)
    _assert_close(K.forecast_gated_residual_triton(x, gate, coef, h0, h1, h2, -1), want, atol * 4, rtol * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_forecast_gives_the_worked_example(dev, dtype):
    """Values worked out by hand, exact in every dtype: TaylorSeer order 2 on evenly spaced
    steps (weights 13/8, -6/8, 1/8) of h = 1, 2, 4 gives 13/8 - 12/8 + 4/8 = 5/8; gated with
    x = 1 and gate = 2: 1 + 2 * 5/8 = 9/4. Order 1 (weights 3/2, -1/2): 3/2 - 1 = 1/2."""
    full = lambda v: torch.full((1, 2, 4), v, dtype=dtype, device=dev)  # noqa: E731
    h0, h1, h2, x = full(1.0), full(2.0), full(4.0), full(1.0)
    gate = torch.full((1, 4), 2.0, dtype=dtype, device=dev)
    c2 = torch.tensor([13 / 8, -6 / 8, 1 / 8], device=dev)
    c1 = torch.tensor([1.5, -0.5], device=dev)
    for fn in (K.forecast_triton, K.forecast_reference, K.forecast):
        assert torch.equal(fn(c2, h0, h1, h2).cpu(), full(5 / 8).cpu()), fn.__name__
        assert torch.equal(fn(c1, h0, h1, None).cpu(), full(0.5).cpu()), fn.__name__
    for fn in (K.forecast_gated_residual_triton, K.forecast_gated_residual_reference, K.forecast_gated_residual):
        assert torch.equal(fn(x, gate, c2, h0, h1, h2, -1).cpu(), full(9 / 4).cpu()), fn.__name__


def test_forecast_reads_channels_last_history(dev):
    g = _gen(2)
    hist = [torch.randn(2, 5, 6, 7, generator=g).to(memory_format=torch.channels_last).to(dev) for _ in range(3)]
    coef = torch.tensor([1.625, -0.75, 0.125], device=dev)
    got = K.forecast_triton(coef, *hist)
    assert got.is_contiguous(memory_format=torch.channels_last)
    _assert_close(got, K.forecast_reference(coef.cpu(), *[h.cpu() for h in hist]), 1e-6, 1e-6)


FORECAST_ERRORS = [
    pytest.param(dict(coef=torch.ones(3)), "`coef` is (3,); expected a vector of 2 weights", id="coef-length"),
    pytest.param(dict(coef=torch.ones(2, dtype=torch.float64)), "`coef` has dtype torch.float64", id="coef-dtype"),
    pytest.param(dict(h1=torch.ones(2, 3, 5)), "`h1` is (2, 3, 5) torch.float32; expected (2, 3, 4)", id="h1-shape"),
    pytest.param(dict(h1=torch.ones(2, 3, 4, dtype=torch.float16)), "`h1` is (2, 3, 4) torch.float16", id="h1-dtype"),
]


@pytest.mark.parametrize("fn", _impls("forecast"))
@pytest.mark.parametrize("bad,message", FORECAST_ERRORS)
def test_forecast_bad_arguments(fn, bad, message):
    args = dict(coef=torch.ones(2), h0=torch.ones(2, 3, 4), h1=torch.ones(2, 3, 4))
    args.update(bad)
    with pytest.raises(KernelArgumentError, match=re.escape(message)):
        fn(args["coef"], args["h0"], args["h1"], None)


@pytest.mark.parametrize("fn", _impls("forecast_gated_residual"))
def test_forecast_gated_residual_bad_gate(fn):
    h = torch.ones(2, 3, 4)
    with pytest.raises(KernelArgumentError, match=re.escape("`gate` has shape (3, 4); expected (2, 4), (1, 4) or (4,)")):
        fn(h, torch.ones(3, 4), torch.ones(2), h, h, None, -1)
