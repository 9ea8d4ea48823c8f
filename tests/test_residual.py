"""``fxcache.analyze.residual.residual_source``: the input a residual output adds back,
read from data flow, on small exported models whose answer is known by construction."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

from fxcache.analyze.residual import residual_source
from fxcache.capture import capture
from fxcache.errors import UnsupportedModelError


class _Outer(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.a, self.b, self.block = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), block

    def forward(self, x, y):
        return self.block(self.a(x), self.b(y))


def _graph(block):
    """The captured graph, the block's region, the nodes of ``a(x)`` and ``b(y)`` (the
    block's inputs) and the block's outputs."""
    c = capture(_Outer(block).eval(), (torch.randn(1, 4, 8), torch.randn(1, 4, 8)), {})
    gm = c.gm

    def paths(n):
        return [p for p, _ in (n.meta.get("nn_module_stack") or {}).values()]

    region = frozenset(n.name for n in gm.graph.nodes if any(p.startswith("block") for p in paths(n)))
    a = [n.name for n in gm.graph.nodes if paths(n)[-1:] == ["a"]][-1]
    b = [n.name for n in gm.graph.nodes if paths(n)[-1:] == ["b"]][-1]
    outs = [x.name for x in pytree.tree_leaves(gm.graph.find_nodes(op="output")[0].args)]
    return gm, region, a, b, outs


class TwoStreams(torch.nn.Module):
    """(text, image) = (y + g * f(x, y), x + g * f(y, x)): each output adds back its own
    input, both of the same shape; returned in the other order, as Flux does."""

    def __init__(self):
        super().__init__()
        self.f, self.g = torch.nn.Linear(16, 8), torch.nn.Parameter(torch.randn(8))

    def forward(self, x, y):
        image = x + self.g * self.f(torch.cat([x, y], -1)) / 2.0
        text = y + self.g * self.f(torch.cat([y, x], -1))
        return text, image


class Concatenated(torch.nn.Module):
    """Flux's single block: concatenate, add a branch, slice apart."""

    def __init__(self):
        super().__init__()
        self.f = torch.nn.Linear(8, 8)

    def forward(self, x, y):
        h = torch.cat([y, x], dim=1)
        h = h + self.f(h)
        return h[:, :4], h[:, 4:]


class Sum(torch.nn.Module):
    def forward(self, x, y):
        return x + y


class Projected(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Linear(8, 8)

    def forward(self, x, y):
        return self.p(x) + y * y


def test_each_stream_pairs_with_its_own_input_whatever_the_shapes():
    gm, region, a, b, (text, image) = _graph(TwoStreams())
    assert residual_source(gm, image, region) == a
    assert residual_source(gm, text, region) == b


def test_slices_of_a_concatenation_pair_with_the_concatenated_inputs():
    gm, region, a, b, (text, image) = _graph(Concatenated())
    assert residual_source(gm, text, region) == b
    assert residual_source(gm, image, region) == a


def test_several_inputs_are_refused_and_none_is_none():
    gm, region, a, b, (out,) = _graph(Sum())
    with pytest.raises(UnsupportedModelError, match="ambiguous"):
        residual_source(gm, out, region, what="unit 'block'")
    gm, region, a, b, (out,) = _graph(Projected())
    assert residual_source(gm, out, region) is None
