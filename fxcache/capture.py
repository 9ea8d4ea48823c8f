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

Every graph capture returns is **free of mutation**. Export's training IR keeps in-place
ops (``h.mul_(2)``, ``h += x``, ``aten.copy_`` from slice assignment such as
``q[:, :, n:] = ...`` in CogVideoX's rotary embedding), and the rewrite follows data
edges only: an in-place op whose result is not used as a value would vanish from a
rewritten graph. So an exported program that holds an in-place op is functionalised
(``ExportedProgram.run_decompositions({})``: no decomposition beyond what
functionalisation needs), after which every mutation is a value (``slice_scatter``,
``index_put``, ...). Composite ops then come out decomposed: ``reshape`` as ``view``,
``chunk`` as ``split``, ``to`` as ``_to_copy``, ``contiguous`` as ``clone``. A program
without in-place ops (most diffusers models) is kept as exported: functionalising it
would change nothing but double the capture time. :data:`FUNCTIONALIZE` = ``"always"``
functionalises every program (the tests use it to check that both forms work).

What functionalisation cannot remove, a forward that writes a model buffer or one of
its inputs, is a :class:`CaptureError` naming the node and its module; so is any
mutating op left in the graph.

``tensor.data`` in a forward is read as ``tensor.detach()`` while exporting
(:class:`_DataAsDetach`): export cannot trace ``.data``, and under ``no_grad`` the two
are the same view. A write through it is then an in-place op like any other
(functionalised, or refused when it writes the model's state).

Canonicalisation done here, because the exported graph carries nodes that make whole
dead regions look alive:
- ``aten._assert_tensor_metadata`` checks are removed (they only assert dtypes that
  export already recorded);
- eval-mode dropout (``aten.dropout(x, p, train=False)``, which functionalisation
  turns into ``aten.clone(x)``) is replaced by ``x``, as eager mode returns ``x``.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from .errors import CaptureError
from .rewrite import contract

__all__ = ["Captured", "capture", "flatten_call", "signature_of", "FUNCTIONALIZE"]

# "auto": functionalise exported programs that hold an in-place op; "always": all of them
FUNCTIONALIZE = "auto"


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
    """A Python or numpy real scalar (``for t in np_timesteps`` yields numpy scalars)."""
    if isinstance(x, (int, float)):
        return not isinstance(x, bool)
    return isinstance(x, numbers.Real) and type(x).__module__ == "numpy" and type(x).__name__ != "bool"


def _is_integral(x) -> bool:
    return isinstance(x, numbers.Integral)


def _normalize_call(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Python- or numpy-number timesteps become tensors, so that export does not bake them
    in: the tensor the model's own forward makes of that number (:func:`_number_dtype`),
    as a 0-d CPU tensor (every supported forward treats a 0-d tensor as it treats the
    one-element tensor it makes of a number).

    On the per-step path: when no argument is a Python number (the usual case) this
    returns at once; otherwise the signature is looked up once per model class and the
    conversion once per model, argument, number type and device."""
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
            dtype = _number_dtype(model, name, value, tuple(args), kwargs)
            tensor = torch.tensor(value, dtype=dtype)
            if name in kwargs:
                kwargs = {**kwargs, name: tensor}
            else:
                args[pos] = tensor
    return tuple(args), kwargs


# ------------------------------------------------------ what the forward makes of a number
# tensor factories and where each takes its data: (position, keyword)
_FACTORIES = {torch.tensor: (0, "data"), torch.as_tensor: (0, "data"), torch.asarray: (0, "obj"),
              torch.scalar_tensor: (0, "s"), torch.full: (1, "fill_value")}
# model -> {(argument, number type, device type): dtype, or None when the forward made no
# tensor of it}; weak keys: a model that is dropped takes its entries with it
_NUMBER_DTYPES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


class _Made(BaseException):
    """Stops the probe once the forward has made its tensor (a BaseException, so that a
    forward's ``except Exception`` does not swallow it)."""

    def __init__(self, tensor):
        super().__init__()
        self.tensor = tensor


def _holds(x, value) -> bool:
    return x is value or (isinstance(x, (list, tuple)) and any(_holds(e, value) for e in x))


class _NumberProbe(TorchFunctionMode):
    """Stops the forward at the first tensor factory (``torch.tensor([t], dtype=...)``,
    ``torch.as_tensor(t)``, ``torch.full(shape, t)``, ...) called with the number itself."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # as the forward would: its own conversion errors stay its own
        where = _FACTORIES.get(func)
        if where is not None:
            pos, key = where
            data = args[pos] if pos < len(args) else kwargs.get(key)
            if _holds(data, self.value):
                raise _Made(out)
        return out


def _number_dtype(model: torch.nn.Module, name: str, value, args: tuple, kwargs: dict) -> torch.dtype:
    """The dtype of the tensor ``model``'s forward makes of the number ``value`` passed as
    ``name``: found by running the forward with it, stopped at the tensor factory that
    receives the number (for a U-Net the first lines of its forward; nothing after runs).
    ``UNet2DModel`` and ``PriorTransformer`` make ``torch.long`` (a float is truncated),
    ``UNet2DConditionModel`` float64 for a float and int64 for an int. A forward that
    raises for the number (diffusers' transformers want a tensor; ``UNet2DModel`` refuses a
    numpy float32) is a :class:`CaptureError` naming the model's own error. A forward
    that uses the number without making a tensor of it gets int64 for an integer and
    float32 otherwise."""
    device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    key = (name, type(value), device)
    known = _NUMBER_DTYPES.setdefault(model, {})
    if key not in known:
        made = None
        try:
            with _eval_mode(model), torch.no_grad(), _NumberProbe(value):
                # the class's forward: an engine attached in place as ``model.forward``
                # would come back here
                type(model).forward(model, *args, **kwargs)
        except _Made as stop:
            made = stop.tensor
        except Exception as exc:
            raise CaptureError(
                f"{type(model).__name__}.forward does not take {name} = {value!r} ({type(value).__module__}."
                f"{type(value).__name__}): called with it, the model itself raises {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}. Pass {name} as a tensor (as its pipeline does)"
            ) from exc
        if isinstance(made, torch.Tensor):
            known[key] = made.dtype
        else:
            known[key] = None
    dtype = known[key]
    if dtype is None:
        dtype = torch.int64 if _is_integral(value) else torch.float32
    return dtype


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


def _from_eval_dropout(node: fx.Node) -> bool:
    """A plain ``aten.clone`` that functionalisation made of ``aten.dropout(x, p, train=False)``."""
    if node.target is not torch.ops.aten.clone.default or node.kwargs or len(node.args) != 1:
        return False
    stack = list(node.meta.get("from_node") or ())  # provenance: a tree of NodeSource records
    while stack:
        src = stack.pop()
        if str(getattr(src, "target", "")) == "aten.dropout.default":
            return True
        stack.extend(getattr(src, "from_node", None) or ())
    return False


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
        elif _from_eval_dropout(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.lint()


def _module_of(node: fx.Node | None) -> str:
    stack = (node.meta.get("nn_module_stack") if node is not None else None) or {}
    paths = [p for p, _ in stack.values() if p]
    return f"module '{paths[-1]}'" if paths else "the top-level forward"


_MUTATION_KINDS = {
    "BUFFER_MUTATION": "buffer",
    "PARAMETER_MUTATION": "parameter",
    "USER_INPUT_MUTATION": "input",
}


def _functionalize(ep, model: torch.nn.Module):
    """``ep`` with every in-place op turned into a value, or a CaptureError naming the
    state the forward writes (which no graph output can carry)."""
    name = type(model).__name__
    mutates = any(contract.is_mutating(n) for n in ep.graph.nodes) or any(
        getattr(spec.kind, "name", "") != "USER_OUTPUT" for spec in ep.graph_signature.output_specs
    )
    if not mutates and FUNCTIONALIZE != "always":
        return ep
    try:
        ep = ep.run_decompositions({})
    except Exception as exc:  # torch raises many types here; all mean "cannot functionalise"
        raise CaptureError(
            f"torch.export captured {name} but could not functionalise it: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. fxcache needs a graph free of in-place ops; "
            f"rewrite the in-place op as an out-of-place one."
        ) from exc
    by_name = {n.name: n for n in ep.graph.nodes}
    for spec in ep.graph_signature.output_specs:
        kind = getattr(spec.kind, "name", str(spec.kind))
        if kind == "USER_OUTPUT":
            continue
        node = by_name.get(getattr(spec.arg, "name", None))
        source = node.name if node is not None else "?"
        what = _MUTATION_KINDS.get(kind)
        if what is None:
            raise CaptureError(
                f"{name}'s exported program has an output of kind {kind} (node '{source}' in "
                f"{_module_of(node)}): a side effect fxcache cannot keep in a cached graph. Remove it from "
                f"the forward (fxcache caches pure inference forwards)."
            )
        raise CaptureError(
            f"{name}'s forward writes {what} '{spec.target}' in place (node '{source}' in {_module_of(node)}). "
            f"fxcache cannot cache a forward that changes the model's state or its inputs: a cached step "
            f"that skips the write would silently change the result. Compute the value out of place "
            f"(return it instead of writing it into the {what})."
        )
    return ep


def _check_functional(gm: fx.GraphModule, name: str) -> None:
    for node in gm.graph.nodes:
        if contract.is_mutating(node):
            target = node.target
            raise CaptureError(
                f"the captured graph of {name} still holds the in-place op {target} (node '{node.name}' in "
                f"{_module_of(node)}) after functionalisation; fxcache would drop it. Rewrite it as an "
                f"out-of-place op."
            )


class _DataAsDetach(TorchFunctionMode):
    """While exporting: ``tensor.data`` is read as ``tensor.detach()``.

    ``torch.export`` cannot trace ``.data`` (its result becomes a fake tensor in the
    program's constants, and export fails). Under ``no_grad`` the two are the same
    tensor: a view of the same storage, outside autograd; so a write through it
    (CogVideoXPatchEmbed, at a resolution other than its config's, builds its
    positional embedding with ``joint.data[:, n:].copy_(pos)``) is an in-place op that
    functionalisation turns into a value, and a parameter read as ``p.data`` stays a
    read of the parameter instead of a baked copy."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__self__", None) is _DATA and getattr(func, "__name__", "") == "__get__":
            return args[0].detach()
        return func(*args, **(kwargs or {}))


_DATA = torch._C.TensorBase.data  # the getset descriptor whose __get__ is ``tensor.data``


def capture(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None) -> Captured:
    """Export ``model(*args, **kwargs)`` into a flat GraphModule sharing its parameters."""
    kwargs = dict(kwargs or {})
    args, kwargs = _normalize_call(model, tuple(args), kwargs)
    with _eval_mode(model), torch.no_grad():
        try:
            with _DataAsDetach():
                ep = torch.export.export(model, args, kwargs, strict=False)
        except Exception as exc:  # torch raises many types here; all mean "cannot capture"
            raise CaptureError(
                f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}. fxcache needs a model that "
                f"torch.export.export(model, args, kwargs, strict=False) can capture with these inputs."
            ) from exc
        ep = _functionalize(ep, model)
    unlifted = ep.module()
    graph = unlifted.graph
    graph._codegen = fx.graph.CodeGen()  # flat positional inputs and outputs
    gm = fx.GraphModule(unlifted, graph, class_name=f"{type(model).__name__}Graph")
    _canonicalize(gm)
    _check_functional(gm, type(model).__name__)
    gm.recompile()
    flat, spec = pytree.tree_flatten((args, kwargs))
    placeholders = graph.find_nodes(op="placeholder")
    if len(placeholders) != len(flat):
        raise CaptureError(
            f"the exported graph of {type(model).__name__} takes {len(placeholders)} inputs but the call "
            f"flattens to {len(flat)}; fxcache cannot map the inputs"
        )
    contract.maybe_check(gm, where="capture")
    return Captured(
        gm=gm,
        in_spec=ep.call_spec.in_spec,
        out_spec=ep.call_spec.out_spec,
        signature=signature_of(flat, spec),
        num_inputs=len(flat),
        meta={"model_class": type(model).__name__},
    )
