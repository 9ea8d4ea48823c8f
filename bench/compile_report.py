"""Compile report for the cached model on a tiny U-Net (DeepCache) and a tiny DiT (FORA):
graph breaks, recompiles after warm-up, compiled graphs, compile time, and the
eager-vs-inductor speed-up of the *cached* model (median of interleaved generations,
one process, one thread). Run: .venv/bin/python bench/compile_report.py"""

import statistics
import time

import torch
from torch._dynamo.utils import counters

import fxcache
from fxcache.testing import tiny


def generation(T, cm):
    cm.reset()
    for t in T.timesteps:
        T.call(cm, t)


def report(family, schedule, repeats=15):
    torch._dynamo.reset()
    counters.clear()
    T = tiny(family, batch=2)
    eager = fxcache.compile(T.model, schedule, backend=None)
    compiled = fxcache.compile(T.model, schedule)
    with torch.no_grad():
        generation(T, eager)
        t0 = time.perf_counter()
        generation(T, compiled)  # compiles each step kind on first use
        compile_s = time.perf_counter() - t0
        warm = dict(counters["stats"])
        times = {"eager": [], "inductor": []}
        for _ in range(repeats):
            for name, cm in (("eager", eager), ("inductor", compiled)):
                t0 = time.perf_counter()
                generation(T, cm)
                times[name].append(time.perf_counter() - t0)
        after = dict(counters["stats"])
    breaks = sum(counters["graph_break"].values())
    recompiles = after.get("unique_graphs", 0) - warm.get("unique_graphs", 0)
    e, c = statistics.median(times["eager"]), statistics.median(times["inductor"])
    print(
        f"{family:7s} {type(schedule).__name__:9s} graph breaks {breaks}, compiles after warm-up {recompiles}, "
        f"compiled graphs {compiled.plan.compiled_graphs}, first generation incl. compile {compile_s:.1f} s, "
        f"generation eager {e * 1e3:.1f} ms vs inductor {c * 1e3:.1f} ms: {e / c:.2f}x "
        f"(ideal from FLOPs {compiled.plan.ideal_speedup:.2f}x vs uncached)"
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    report("unet2d", fxcache.DeepCache(interval=2, branch=1))
    report("dit", fxcache.FORA(interval=2))
