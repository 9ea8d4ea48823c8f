"""Eager vs inductor (with and without weight freezing) on the embedded digit U-Net,
full plan, batch 4: first-call (compile) time and the median of 15 interleaved runs of
10 steps each, in one process. Run: .venv/bin/python bench/compile_speed.py"""
import torch, time, statistics
import fxcache
from fxcache.models import load
torch.set_num_threads(1)
m = load("unet")
x = torch.randn(4, 1, 16, 16)
sched = fxcache.Mask([[True]], ["skip_branch.0"], periodic=True)
variants = {"eager": fxcache.compile(m, sched, backend=None)}
for name, kw in [("inductor_nofreeze", dict(freezing=False)), ("inductor_freeze", dict(freezing=True))]:
    variants[name] = fxcache.compile(m, sched, **kw)
with torch.no_grad():
    for name, cm in variants.items():
        t0 = time.time(); cm(x, torch.tensor(500)); print(name, "first call", round(time.time()-t0, 1), flush=True)
    times = {k: [] for k in variants}
    for r in range(15):
        for name, cm in variants.items():
            t0 = time.perf_counter()
            for t in range(10): cm(x, torch.tensor(900 - t))
            times[name].append(time.perf_counter() - t0)
    for k, v in times.items(): print(k, "median 10 steps", round(statistics.median(v), 4))
