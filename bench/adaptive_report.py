"""Evidence for the design of adaptive caching (docs/schedules.md, "Adaptive caching"), on the CPU.

1. ``torch.cond`` under inductor: the generated wrapper evaluates the predicate on the
   host (``if buf.item():``), i.e. a device-to-host sync per call; counted here by
   patching ``Tensor.item`` around three compiled calls.
2. fxcache's one-step lag on the tiny DiT (FirstBlockCache, TeaCache) and the tiny U-Net
   (AdaptiveDeepCache), backend aot_eager and inductor: graph breaks, compiled graphs,
   recompiles in a second generation, and ``Tensor.item`` calls on the step path.
3. The price of deciding at run time: the adaptive model against the static ``Mask``
   with the very table it chose (same kinds at the same steps), eager FX graphs, median
   of interleaved generations in one process.

Run: .venv/bin/python bench/adaptive_report.py [--skip-inductor]
"""

import argparse
import statistics
import time

import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import fxcache
from fxcache.testing import tiny


class _CountItem:
    def __enter__(self):
        self.calls = 0
        self.orig = torch.Tensor.item

        def item(t):
            self.calls += 1
            return self.orig(t)

        torch.Tensor.item = item
        return self

    def __exit__(self, *exc):
        torch.Tensor.item = self.orig


def cond_evidence() -> None:
    def f(x, ref, thr):
        stat = (x - ref).abs().sum() / ref.abs().sum()
        return torch.cond(stat < thr, lambda x: x * 2, lambda x: torch.sin(x) @ x, (x,))

    x, ref, thr = torch.randn(8, 8), torch.randn(8, 8), torch.tensor(0.5)
    torch._dynamo.reset()
    cf = torch.compile(f, backend="inductor", fullgraph=True)
    _, codes = run_and_get_code(cf, x, ref, thr)
    lines = [ln.strip() for c in codes for ln in c.splitlines() if ".item()" in ln]
    with _CountItem() as n:
        for _ in range(3):
            cf(x, ref, thr)
    print(f"torch.cond under inductor: wrapper lines with .item(): {lines}; Tensor.item calls in 3 calls: {n.calls}")


def _calls(T, steps):
    return [(lambda m, t=t: T.call(m, t)) for t in steps]


def _generation(cm, calls):
    with cm.generation(), torch.no_grad():
        for c in calls:
            c(cm)


def compile_counts(family, schedule, backend, steps) -> None:
    torch._dynamo.reset()
    counters.clear()
    T = tiny(family, batch=2)
    cm = fxcache.compile(T.model, schedule, backend=backend, timestep_rule="off")
    calls = _calls(T, steps)
    t0 = time.perf_counter()
    _generation(cm, calls)
    first = time.perf_counter() - t0
    graphs = counters["stats"]["unique_graphs"]
    with _CountItem() as n:
        _generation(cm, calls)
    rec = "".join("F" if c else "r" for c in cm.decisions()[None])
    print(
        f"{family:7s} {type(schedule).__name__:18s} {backend:9s} graph breaks {sum(counters['graph_break'].values())}, "
        f"compiled graphs {graphs}, recompiles in generation 2: {counters['stats']['unique_graphs'] - graphs}, "
        f"Tensor.item calls in generation 2: {n.calls}, first generation {first:.1f} s, decisions {rec}"
    )


def overhead(family, schedule, steps, repeats=21) -> None:
    T = tiny(family, batch=2)
    calls = _calls(T, steps)
    adaptive = fxcache.compile(T.model, schedule, backend=None, timestep_rule="off")
    _generation(adaptive, calls)
    rec = list(adaptive.decisions()[None])
    plan = adaptive.plan
    table = [plan.table[0] if c else plan.table[1] for c in rec]
    static = fxcache.compile(T.model, fxcache.Mask(table, plan.units), backend=None, timestep_rule="off")
    _generation(static, calls)
    times = {"adaptive": [], "static": []}
    for _ in range(repeats):
        for name, cm in (("adaptive", adaptive), ("static", static)):
            t0 = time.perf_counter()
            _generation(cm, calls)
            times[name].append(time.perf_counter() - t0)
    a, s = statistics.median(times["adaptive"]), statistics.median(times["static"])
    print(
        f"{family:7s} {type(schedule).__name__:18s} eager: adaptive {a * 1e3:.2f} ms vs static Mask of the same "
        f"table {s * 1e3:.2f} ms per {len(steps)}-step generation (x{a / s:.3f}; "
        f"{sum(not c for c in rec)} of {len(rec)} steps reused)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-inductor", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    steps = [torch.tensor(999 - 50 * i) for i in range(20)]
    cases = [("dit", fxcache.FirstBlockCache(0.15)), ("unet2d", fxcache.AdaptiveDeepCache(0.045, branch=1)),
             ("dit", fxcache.TeaCache(0.2))]
    cond_evidence()
    for family, schedule in cases:
        for backend in ("aot_eager",) + (() if a.skip_inductor else ("inductor",)):
            compile_counts(family, schedule, backend, steps)
    for family, schedule in cases:
        overhead(family, schedule, steps)


if __name__ == "__main__":
    main()
