"""Stage 6, compile: each step-kind graph through ``torch.compile`` once.

``backend=None`` runs the rewritten FX graphs as they are (eager); any other value is
passed to ``torch.compile(graph, backend=..., mode=..., fullgraph=True, dynamic=False)``.
A graph is compiled lazily, on the first step that runs it, and never again for the
same input shape: the graph has static shapes and its cache buffers are inputs of
fixed shape, so dynamo's guards hold for the whole generation.
"""

from __future__ import annotations

import torch

__all__ = ["compile_step_graphs"]


def compile_step_graphs(graphs, options, units=None):
    if options.backend is None:
        return [g.gm for g in graphs], "eager FX graphs, not compiled"
    runners = []
    for g in graphs:
        kwargs = dict(backend=options.backend, fullgraph=True, dynamic=False)
        if options.mode is not None:
            kwargs["mode"] = options.mode
        elif options.options:
            kwargs["options"] = dict(options.options)
        runners.append(torch.compile(g.gm, **kwargs))
    note = f"one torch.compile(fullgraph=True) per step kind, backend={options.backend!r}"
    if options.mode:
        note += f", mode={options.mode!r}"
    return runners, note
