"""Residual spans (issue 18): a contiguous run of transformer blocks cached as one
residual per stream, ``out - in``, read as ``in_now + residual``.

The oracle is :func:`_reference.hook_span`: the plain eager model with a pre-hook on the
first block (its inputs) and a forward hook on the last (store ``out - in`` at computed
steps, return ``in_now + stored`` at reused ones), sharing no code with fxcache. Which
input each output adds back is written here per family from diffusers' block
signatures; fxcache reads it from the graph's data flow."""

from __future__ import annotations

import pytest
import torch

import fxcache
from fxcache.errors import UnitError, UnsupportedModelError
from fxcache.schedules import Mask, UnknownUnitError, to_plan
from fxcache.schedules.spans import parse_span, span_name
from fxcache.testing import tiny

from _reference import hook_cache, hook_span, tiny_flux_square

EAGER = dict(backend=None, timestep_rule="off")
STEPS = [torch.tensor(999 - 111 * i) for i in range(7)]
ROWS = (True, False, False, True, False, True, False)  # computed at steps 0, 3, 5

#: (output index or None, input argument name) of each family's blocks
PAIRS = {
    "dit": [(None, "hidden_states")],
    "pixart": [(None, "hidden_states")],
    "wan": [(None, "hidden_states")],
    "flux": [(0, "encoder_hidden_states"), (1, "hidden_states")],
    "sd3": [(1, "hidden_states")],
    "cogvideox": [(0, "hidden_states"), (1, "encoder_hidden_states")],
    # Chroma joins text and image before its single-stream blocks and slices the image out after
    # the last: a span ending there stores the joint stream minus the joined inputs
    "chroma": [(None, ("encoder_hidden_states", "hidden_states"))],
}


def _units(T):
    args, kwargs = T.inputs(STEPS[0])
    return fxcache.units(T.model, *args, **kwargs)


def _blocks(T):
    return [u.name for u in _units(T) if u.kind in ("transformer_block", "single_block")]


def _run(model, T, steps=STEPS):
    with torch.no_grad():
        return [T.output(T.call(model, t)) for t in steps]


def _spans(family):
    """(first, last) block indices of the spans tested on each family."""
    if family == "flux":  # 1 double-stream block, 2 single-stream blocks
        return [(0, 2), (1, 2), (0, 0)]
    if family == "chroma":  # across both kinds of block, into the joint stream
        return [(0, -1)]
    return [(1, -1), (0, -1)]


CASES = [(f, s) for f in PAIRS for s in _spans(f)]


@pytest.mark.parametrize("family,ends", CASES, ids=[f"{f}-{a}..{b}" for f, (a, b) in CASES])
def test_span_reuse_matches_the_hook_reference(family, ends):
    T = tiny(family)
    blocks = _blocks(T)
    span = span_name(blocks[ends[0]], blocks[ends[1]])
    covered = blocks[ends[0]: (ends[1] % len(blocks)) + 1]
    mask = Mask(tuple((c,) for c in ROWS), (span,))
    cm = fxcache.compile(T.model, mask, **EAGER)
    got = _run(cm, T)
    assert cm.plan.units == (span,) and cm.plan.unit_infos[0].kind == "span"
    with hook_span(T.model, covered, PAIRS[family], lambda s: ROWS[s]):
        want = _run(T.model, T)
    plain = _run(T.model, T)
    for step, (g, w, p) in enumerate(zip(got, want, plain)):
        assert torch.equal(g, w), f"step {step}: max |fxcache - reference| = {(g - w).abs().max()}"
        if ROWS[step]:
            assert torch.equal(g, p)
    assert any(not torch.equal(g, p) for g, p in zip(got, plain)), "reuse changed nothing"


@pytest.mark.parametrize("family", ["dit", "flux", "wan"])
def test_compute_everything_with_spans_is_bit_exact(family):
    T = tiny(family)
    blocks = _blocks(T)
    mask = Mask(((True, True),), (span_name(blocks[0], blocks[0]), span_name(blocks[1], blocks[-1])), periodic=True)
    cm = fxcache.compile(T.model, mask, **EAGER)
    for g, p in zip(_run(cm, T), _run(T.model, T)):
        assert torch.equal(g, p)


def test_two_streams_of_equal_shape_pair_by_data_flow():
    """As many text tokens as image tokens: only data flow tells which input each of the
    double-stream block's outputs adds back."""
    T = tiny_flux_square()
    blocks = _blocks(T)
    span = span_name(blocks[0], blocks[0])
    unit = fxcache.plan_for(T.model, Mask(((True,), (False,)), (span,), periodic=True),
                            *T.inputs(STEPS[0])[0], **T.inputs(STEPS[0])[1]).unit_infos[0]
    assert unit.kind == "span"
    mask = Mask(tuple((c,) for c in ROWS), (span,))
    got = _run(fxcache.compile(T.model, mask, **EAGER), T)
    with hook_span(T.model, [blocks[0]], PAIRS["flux"], lambda s: ROWS[s]):
        want = _run(T.model, T)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # the crossed pairing is a different result: the test can tell them apart
    with hook_span(T.model, [blocks[0]], [(0, "hidden_states"), (1, "encoder_hidden_states")], lambda s: ROWS[s]):
        crossed = _run(T.model, T)
    assert any(not torch.equal(g, c) for g, c in zip(got, crossed))


def test_a_span_with_sublayers_inside_means_the_hooks_composed():
    """Nested units: the span reused wins; the span computed stores the residual of its
    blocks as they ran, with the reused sublayer's cached output inside."""
    T = tiny("dit")
    blocks = _blocks(T)
    span = span_name(blocks[1], blocks[-1])
    inner = "transformer_blocks.2.ff"
    rows_inner = (True, False, True, False, False, True, False)
    mask = Mask(tuple((a, b) for a, b in zip(ROWS, rows_inner)), (span, inner))
    got = _run(fxcache.compile(T.model, mask, **EAGER), T)
    with hook_cache(T.model, [inner], lambda s: (rows_inner[s],)):
        with hook_span(T.model, blocks[1:], PAIRS["dit"], lambda s: ROWS[s]):
            want = _run(T.model, T)
    for step, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), step


def test_forecast_extrapolates_the_residual():
    T = tiny("dit")
    blocks = _blocks(T)
    span = span_name(blocks[1], blocks[-1])
    rows = (True, True, False, False, True, False, False)
    got = _run(fxcache.compile(T.model, Mask(tuple((c,) for c in rows), (span,)), forecast=1, **EAGER), T)
    with hook_span(T.model, blocks[1:], PAIRS["dit"], lambda s: rows[s], forecast=1):
        want = _run(T.model, T)
    with hook_span(T.model, blocks[1:], PAIRS["dit"], lambda s: rows[s]):
        reuse = _run(T.model, T)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[3], reuse[3])


def test_span_cache_is_one_residual_per_stream():
    """A span's cache is the streams leaving it, whatever its length; FORA's sublayers
    cost two or more such tensors per block."""
    T = tiny("flux")
    args, kwargs = T.inputs(STEPS[0])
    blocks = _blocks(T)
    span = span_name(blocks[0], blocks[-1])
    plan = fxcache.plan_for(T.model, Mask(((True,), (False,)), (span,), periodic=True), *args, **kwargs)
    image = kwargs.get("hidden_states", args[0] if args else None)
    assert plan.cache_bytes == image.numel() * image.element_size()  # only the image stream leaves the last block
    fora = fxcache.plan_for(T.model, fxcache.FORA(2), *args, **kwargs)
    assert fora.cache_bytes >= 3 * plan.cache_bytes


def test_span_names_are_checked():
    T = tiny("dit")
    blocks = _blocks(T)
    args, kwargs = T.inputs(STEPS[0])
    assert parse_span(span_name("a.1", "b.2")) == ("a.1", "b.2") and parse_span("transformer_blocks.1") is None
    with pytest.raises(UnknownUnitError, match="comes before"):
        fxcache.plan_for(T.model, Mask(((True,),), (span_name(blocks[2], blocks[0]),), periodic=True), *args, **kwargs)
    with pytest.raises(UnknownUnitError, match="not transformer blocks"):
        fxcache.plan_for(T.model, Mask(((True,),), (span_name("transformer_blocks.0.attn1", blocks[1]),),
                                       periodic=True), *args, **kwargs)
    overlapping = (span_name(blocks[0], blocks[1]), span_name(blocks[1], blocks[2]))
    with pytest.raises(UnitError, match="overlap"):
        fxcache.plan_for(T.model, Mask(((True, True),), overlapping, periodic=True), *args, **kwargs)
    U = tiny("unet2d")
    a, k = U.inputs(STEPS[0])
    with pytest.raises(UnknownUnitError, match="not transformer blocks"):
        fxcache.plan_for(U.model, Mask(((True,),), ("span:down_blocks.0..up_blocks.1",), periodic=True), *a, **k)
    # pure-Python plans (no model) estimate a span from its blocks
    infos = _units(T).infos()
    plan = to_plan(Mask(((True,), (False,)), (span_name(blocks[1], blocks[-1]),), periodic=True), infos)
    assert plan.unit_infos[0].kind == "span" and plan.unit_infos[0].flops > 0


def test_a_span_starting_in_chromas_joint_stream_and_a_multi_block_probe():
    """Chroma's single-stream blocks take the joined text+image sequence: a span that
    starts there adds back that joined input (the slice after the last block follows it
    into the concatenation). And a probe of several blocks (DBCache Fn=2 on Flux: a double
    and a single block) pairs its residual through all of them."""
    T = tiny("chroma")
    blocks = _blocks(T)
    span = span_name(blocks[2], blocks[-1])
    got = _run(fxcache.compile(T.model, Mask(tuple((c,) for c in ROWS), (span,)), **EAGER), T)
    with hook_span(T.model, blocks[2:], [(None, "hidden_states")], lambda s: ROWS[s]):
        want = _run(T.model, T)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    F = tiny("flux")
    args, kwargs = F.inputs(STEPS[0])
    plan = fxcache.plan_for(F.model, fxcache.DBCache(2, 0, 0.1), *args, **kwargs)
    assert plan.units == ("span:single_transformer_blocks.1..single_transformer_blocks.1",)
