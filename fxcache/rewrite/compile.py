"""Stage 6, compile: each graph through ``torch.compile`` once.

``backend=None`` runs the rewritten FX graphs as they are (eager); any other value is
passed to ``torch.compile(graph, backend=..., fullgraph=True, dynamic=False)``. A graph
is compiled lazily, at the first step that runs it, and never again for the same input
shape: shapes are static and the cache buffers are inputs of fixed shape and layout, so
dynamo's guards hold for the whole generation (the tests count compilations).

Inductor defaults to ``freezing=True`` (without it the CPU U-Nets measured here
compiled about 4x slower and ran no faster). Measured with torch 2.13, freezing does
not bake the weights in for these graphs (which reach the parameters as ``get_attr`` of
the model's own ``Parameter`` objects): in-place weight edits are seen by the compiled
graphs, without recompiling, for linear and convolution weights alike
(``tests/test_generation_state.py::test_in_place_weight_edits_are_seen_under_inductor_freezing``
guards this).
Replaced parameters or modules (a LoRA adapter, ``load_state_dict(assign=True)``) are
detected by the runtime, which captures and compiles again. Freezing applies only
under ``torch.no_grad()`` / ``torch.inference_mode()``, as in diffusers pipelines.

``mode="reduce-overhead"`` means CUDA graphs; the static cache buffers make every
graph safe for them (the runtime marks them static). On CPU tensors it does not apply
and inductor compiles without CUDA graphs; the plan's compile note says so.

With ``cache_dir`` (inductor only) each graph becomes an AOTInductor package instead,
loaded from that folder by later processes (:mod:`.warm`, ``docs/warm_start.md``).

When a plan has more kinds of step than ``max_graphs`` (block caching can give one
kind per step), graphs are compiled per segment instead (:mod:`.segments`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import OptionError, OptionTypeError
from . import contract
from .segments import build_segments

__all__ = ["build_programs", "compile_graph", "COMPILE_MODES", "check_backend", "check_mode", "check_options"]

#: ``torch.compile``'s documented modes; :func:`compile_modes` adds any other mode the
#: installed inductor lists (``torch._inductor.list_mode_options()``).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_modes() -> tuple[str, ...]:
    """The modes ``torch.compile`` accepts with this torch: the documented four and any
    other that inductor lists."""
    try:
        import torch._inductor

        extra = tuple(m for m in torch._inductor.list_mode_options() if m not in COMPILE_MODES)
    except Exception:  # pragma: no cover - an inductor without list_mode_options
        extra = ()
    return COMPILE_MODES + extra


def compile_backends() -> list[str]:
    """Every backend name ``torch.compile`` knows (registered ones included)."""
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def check_backend(backend: Any, what: str = "backend") -> None:
    """``backend`` is None (eager FX graphs), a name ``torch.compile`` knows, or a
    callable backend; otherwise an :class:`~fxcache.errors.OptionError` naming it."""
    if backend is None or callable(backend):
        return
    if not isinstance(backend, str):
        raise OptionTypeError(
            f"{what} = {backend!r} ({type(backend).__name__}) is not allowed; {what} must be None (run the graphs "
            f"eagerly), the name of a torch.compile backend or a callable backend"
        )
    names = compile_backends()
    if backend not in names:
        raise OptionError(
            f"{what} = {backend!r} is not a torch.compile backend; use None (run the graphs eagerly) or one of "
            f"{names} (torch._dynamo.list_backends(exclude_tags=())), or pass a callable backend"
        )


def check_mode(mode: Any, what: str = "mode") -> None:
    """``mode`` is None or one of ``torch.compile``'s modes."""
    if mode is None:
        return
    modes = compile_modes()
    if not isinstance(mode, str) or mode not in modes:
        cls = OptionError if isinstance(mode, str) else OptionTypeError
        raise cls(f"{what} = {mode!r} is not a torch.compile mode; use None or one of {list(modes)}")


def check_options(options: Any, backend: Any, what: str = "options") -> None:
    """``options`` is None or a dict with string keys; for inductor, every key must be
    one of inductor's options (``torch._inductor.list_options()``), which ``torch.compile``
    would otherwise refuse only at the first call."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise OptionTypeError(
            f"{what} = {options!r} ({type(options).__name__}) is not allowed; {what} must be None or a dict of "
            f"torch.compile options, e.g. {{'max_autotune': True}}"
        )
    bad = [k for k in options if not isinstance(k, str)]
    if bad:
        raise OptionTypeError(
            f"{what} = {options!r} has the key {bad[0]!r}; the keys of {what} must be option names (str)"
        )
    if backend == "inductor":
        import torch._inductor

        known = set(torch._inductor.list_options())
        unknown = sorted(k for k in options if k not in known)
        if unknown:
            import difflib

            close = sorted({c for k in unknown for c in difflib.get_close_matches(k, sorted(known), n=3)})
            raise OptionError(
                f"{what} = {options!r}: {unknown} are not inductor options"
                + (f" (close: {close})" if close else "")
                + "; torch._inductor.list_options() lists them"
            )


class _KindProgram:
    """Runs one kind of step as one graph: flat inputs, then its cache buffers."""

    def __init__(self, runner, buffers):
        self.runner = runner
        self.buffers = tuple(buffers)
        self.check = contract.enabled()  # debug mode: outputs share no storage with a buffer

    def __call__(self, flat, bufs):
        out = self.runner(*flat, *[bufs[s] for s in self.buffers])
        if self.check:
            contract.check_outputs_disjoint(out, bufs, where="step graph")
        return out


def _inductor_options(options) -> dict | None:
    import torch._inductor

    merged = dict(torch._inductor.list_mode_options(options.mode)) if options.mode else {}
    freezing = options.freezing if options.freezing is not None else True
    merged["freezing"] = freezing
    merged.update(options.options or {})
    return merged


def compile_graph(gm, options, context=None):
    """``gm`` compiled as ``options`` ask: itself (``backend=None``), an AOTInductor package
    loaded from or written to ``options.cache_dir`` (:mod:`.warm`; ``context`` is part of its
    key), or ``torch.compile``."""
    if options.backend is None:
        return gm
    if getattr(options, "cache_dir", None) is not None:
        from .warm import WarmProgram

        return WarmProgram(gm, options, context, fallback=_torch_compile)
    return _torch_compile(gm, options)


def _torch_compile(gm, options):
    kwargs = dict(backend=options.backend, fullgraph=True, dynamic=False)
    if options.backend == "inductor":
        kwargs["options"] = _inductor_options(options)
    elif options.mode is not None:
        kwargs["mode"] = options.mode
    elif options.options:
        kwargs["options"] = dict(options.options)
    return torch.compile(gm, **kwargs)


def build_programs(gm, units, solved, options, device: torch.device, adapters=None):
    """One callable ``program(flat_inputs, buffers) -> flat_outputs`` per step kind,
    the number of compiled graphs, and a note for ``plan.explain()``."""
    graphs = solved.graphs
    backend = "eager FX graphs, not compiled" if options.backend is None else f"backend={options.backend!r}"
    extra = ""
    if getattr(options, "cache_dir", None) is not None:
        extra += (f", AOTInductor packages in cache_dir={os.fspath(options.cache_dir)!r} (warm start; the weights "
                  f"are inputs of the packages, so freezing does not apply)")
    elif options.backend == "inductor":
        freezing = _inductor_options(options).get("freezing")
        extra += f", freezing={freezing}"
    if options.mode:
        extra += f", mode={options.mode!r}"
        if options.mode == "reduce-overhead" and device.type != "cuda":
            extra += " (CUDA graphs do not apply to CPU tensors: compiled without them)"
    # part of each package's key (warm start): the plan's kinds of step and its units
    context = None
    if getattr(options, "cache_dir", None) is not None:
        from .warm import model_identity

        context = {"model": model_identity(gm), "kind_of_step": [str(k) for k in solved.kind_of_step],
                   "units": [str(u.name) for u in units]}
    use_segments = options.segments is True or (options.segments == "auto" and len(graphs) > options.max_graphs)
    if use_segments:
        programs, segments = build_segments(gm, units, graphs, adapters)
        if programs is not None:
            for i, seg in enumerate(segments):
                seg.runner = compile_graph(seg.gm, options, context and dict(context, segment=i))
            why = (
                f"{len(graphs)} kinds of step > max_graphs={options.max_graphs}: one graph per segment between "
                f"unit boundaries ({len(segments)} segments), so the count grows with units, not steps"
            )
            return programs, len(segments), f"{why}; {backend}{extra}"
        fallback = "; segments could not express every kind of step, so one graph per kind"
    else:
        fallback = ""
    programs = [_KindProgram(compile_graph(g.gm, options, context and dict(context, kind=i)), g.buffers)
                for i, g in enumerate(graphs)]
    return programs, len(graphs), f"one graph per kind of step, fullgraph=True; {backend}{extra}{fallback}"
