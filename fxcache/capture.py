"""Stage 1, capture: a denoiser and example inputs → a flat ``torch.fx.GraphModule``.

``torch.fx.symbolic_trace`` fails on diffusers models (Python control flow on input
values), so capture goes through ``torch.export.export(..., strict=False)``, which
handles every diffusers family fxcache supports and records, on every node,
``node.meta["nn_module_stack"]``: the module the node came from. The exported program
is turned into a plain ``GraphModule`` with the default calling convention (flat
positional inputs, flat outputs); the pytree specs are kept on the :class:`Captured`
record, which flattens calls and rebuilds the model's own output type (a diffusers
output dataclass stays one).

Parameters are never copied: the graph's ``get_attr`` nodes point at the model's own
``Parameter`` objects (a test checks the storage).

Capture happens in eval mode. Training-mode graphs contain random ops (DiT's class
dropout, dropout layers) whose caching would be meaningless.

Canonicalisation done here, because the exported graph carries nodes that make whole
dead regions look alive:
- ``aten._assert_tensor_metadata`` checks are removed (they only assert dtypes that
  export already recorded);
- eval-mode ``aten.dropout(x, p, train=False)`` is replaced by ``x``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import CaptureError

__all__ = ["Captured", "capture", "flatten_call", "signature_of"]


@dataclass
class Captured:
    """A captured denoiser: a flat GraphModule plus the specs to call it like the model."""

    gm: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    signature: tuple
    num_inputs: int
    meta: dict = field(default_factory=dict)

    def call(self, gm: fx.GraphModule | Any, flat_inputs: list, extra: list = ()) -> Any:
        out = gm(*flat_inputs, *extra)
        return pytree.tree_unflatten(list(out), self.out_spec)


_TIMESTEP_NAMES = ("timestep", "timesteps", "t")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _normalize_call(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Python-number timesteps become tensors, so that export does not bake them in.

    On the per-step path: when no argument is a Python number (the usual case) this
    returns at once; otherwise the signature is looked up once per model class."""
    if not any(_is_number(a) for a in args) and not any(_is_number(v) for v in kwargs.values()):
        return args, kwargs
    names = _forward_params(type(model))
    args = list(args)
    for name in _TIMESTEP_NAMES:
        if name not in names:
            continue
        pos = names.index(name)
        if name in kwargs:
            value = kwargs[name]
        elif pos < len(args):
            value = args[pos]
        else:
            continue
        if _is_number(value):
            tensor = torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float32)
            if name in kwargs:
                kwargs = {**kwargs, name: tensor}
            else:
                args[pos] = tensor
    return tuple(args), kwargs


@functools.lru_cache(maxsize=None)
def _forward_params(cls: type) -> list:
    import inspect

    params = list(inspect.signature(cls.forward).parameters)
    return params[1:] if params and params[0] == "self" else params


def flatten_call(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[list, pytree.TreeSpec]:
    args, kwargs = _normalize_call(model, args, kwargs)
    return pytree.tree_flatten((args, kwargs))


def signature_of(flat: list, spec: pytree.TreeSpec) -> tuple:
    """Hashable key of a call: tensor shapes, dtypes, devices; other leaves by value."""
    key: list = [spec]  # TreeSpecs hash and compare by structure
    for leaf in flat:
        if isinstance(leaf, torch.Tensor):
            key.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device.type, leaf.device.index))
        else:
            try:
                hash(leaf)
                key.append(("V", type(leaf).__name__, leaf))
            except TypeError:
                key.append(("V", type(leaf).__name__, repr(leaf)))
    return tuple(key)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _canonicalize(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
        elif node.target is torch.ops.aten.dropout.default:
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
            if not train:
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
    graph.lint()


def capture(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None) -> Captured:
    """Export ``model(*args, **kwargs)`` into a flat GraphModule sharing its parameters."""
    kwargs = dict(kwargs or {})
    args, kwargs = _normalize_call(model, tuple(args), kwargs)
    with _eval_mode(model), torch.no_grad():
        try:
            ep = torch.export.export(model, args, kwargs, strict=False)
        except Exception as exc:  # torch raises many types here; all mean "cannot capture"
            raise CaptureError(
                f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}. fxcache needs a model that "
                f"torch.export.export(model, args, kwargs, strict=False) can capture with these inputs."
            ) from exc
    unlifted = ep.module()
    graph = unlifted.graph
    graph._codegen = fx.graph.CodeGen()  # flat positional inputs and outputs
    gm = fx.GraphModule(unlifted, graph, class_name=f"{type(model).__name__}Graph")
    _canonicalize(gm)
    gm.recompile()
    flat, spec = pytree.tree_flatten((args, kwargs))
    placeholders = graph.find_nodes(op="placeholder")
    if len(placeholders) != len(flat):
        raise CaptureError(
            f"the exported graph of {type(model).__name__} takes {len(placeholders)} inputs but the call "
            f"flattens to {len(flat)}; fxcache cannot map the inputs"
        )
    return Captured(
        gm=gm,
        in_spec=ep.call_spec.in_spec,
        out_spec=ep.call_spec.out_spec,
        signature=signature_of(flat, spec),
        num_inputs=len(flat),
        meta={"model_class": type(model).__name__},
    )
