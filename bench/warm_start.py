"""Warm start: time to the first cached image in a fresh process, cold vs warm.

The embedded U-Net (``fxcache.models.load("unet")``), ``DeepCache(interval=3, branch=1)``,
``backend="inductor"``, ``fxcache.models.generate(model, num_steps=20, num_samples=8)``.
Every run is a new Python process; "to first image" is the wall time from starting the
process to the end of the first generation (interpreter start and imports included), and
the phases are measured inside it. Runs, in order:

1. ``torch.compile``, cold: no ``cache_dir``, an empty ``TORCHINDUCTOR_CACHE_DIR``.
2. ``torch.compile``, inductor's own on-disk caches warm: the same again, same
   ``TORCHINDUCTOR_CACHE_DIR`` (FX graph cache, AOTAutogradCache; what torch does by default).
3. ``cache_dir``, cold: empty ``cache_dir`` and an empty ``TORCHINDUCTOR_CACHE_DIR``.
4. ``cache_dir``, warm: the same ``cache_dir`` and ``TORCHINDUCTOR_CACHE_DIR``.
5. ``cache_dir``, warm, with a new empty ``TORCHINDUCTOR_CACHE_DIR`` (the packages stand alone).

Run: ``.venv/bin/python bench/warm_start.py`` (writes ``bench/results/warm_start.md`` and
``.json``, and the table into ``docs/warm_start.md``). Runs 1-2 are timed twice: with
fxcache's default (inductor ``freezing=True``) and with ``freezing=False``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")

CHILD = r'''
import time, json, sys
T0 = time.perf_counter()
import torch
t_torch = time.perf_counter()
import fxcache, fxcache.models
import fxcache.runtime.engine as eng
from fxcache.rewrite import warm
t_import = time.perf_counter()
args = json.loads(sys.argv[1])
if args["threads"]:
    torch.set_num_threads(args["threads"])
phases = {}
def timed(name):
    f = getattr(eng, name)
    def g(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
    setattr(eng, name, g)
timed("prepare")      # capture (torch.export), units, plan, step graphs
timed("build_entry")  # fusion, buffer layout; programs are compiled lazily, at their first call
t = time.perf_counter()
model = fxcache.models.load("unet")
t_load = time.perf_counter() - t
kw = dict(backend="inductor")
if args["cache_dir"]:
    kw["cache_dir"] = args["cache_dir"]
if args["freezing"] is not None:
    kw["freezing"] = args["freezing"]
cm = fxcache.compile(model, fxcache.DeepCache(interval=3, branch=1), **kw)
t = time.perf_counter()
out = fxcache.models.generate(cm, num_steps=20, num_samples=8)
t_first = time.perf_counter() - t
wall_first = time.time()
t = time.perf_counter()
fxcache.models.generate(cm, num_steps=20, num_samples=8)
t_second = time.perf_counter() - t
torch.save(out, args["out"])
from torch._dynamo.utils import counters
print("RESULT " + json.dumps(dict(
    wall_first_image=wall_first, in_process_to_first_image_s=time.perf_counter() - T0 - t_second,
    import_torch_s=t_torch - T0, import_fxcache_s=t_import - t_torch, load_model_s=t_load,
    capture_rewrite_s=phases.get("prepare", 0.0), build_entry_s=phases.get("build_entry", 0.0),
    first_generation_s=t_first, second_generation_s=t_second,
    warm_stats=dict(warm.stats), warm_load_s=warm.seconds["load_s"], warm_compile_s=warm.seconds["compile_s"],
    inductor_cache={k: v for k, v in counters["inductor"].items() if "cache" in k},
    aot_autograd_cache={k: v for k, v in counters["aot_autograd"].items() if "cache" in k},
)))
'''


def run_warm(repeat, name, *args, **kwargs):
    """A warm run ``repeat`` times (fresh processes): the median one, with every time."""
    rs = sorted((run(name, *args, **kwargs) for _ in range(repeat)), key=lambda r: r["to_first_image_s"])
    r = rs[len(rs) // 2]
    r["all_runs_s"] = [x["to_first_image_s"] for x in rs]
    return r


THREADS = [0]  # --threads: torch.set_num_threads and OMP_NUM_THREADS in every run (0: torch's default)


def run(name, inductor_dir, cache_dir, out, freezing=None):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=inductor_dir,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if THREADS[0]:
        env["OMP_NUM_THREADS"] = str(THREADS[0])
    arg = json.dumps(dict(cache_dir=cache_dir, out=out, freezing=freezing, threads=THREADS[0]))
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    r["to_first_image_s"] = r.pop("wall_first_image") - start
    r["name"] = name
    print(f"{name}: {r['to_first_image_s']:.1f} s to the first cached image", flush=True)
    return r


COLUMNS = [
    ("to_first_image_s", "to first image (process start)"),
    ("import_torch_s", "import torch"),
    ("import_fxcache_s", "import fxcache"),
    ("load_model_s", "load model"),
    ("capture_rewrite_s", "capture + rewrite"),
    ("build_entry_s", "build entry"),
    ("first_generation_s", "1st generation (compiles or loads)"),
    ("warm_load_s", "of which: load packages"),
    ("warm_compile_s", "of which: AOTI compile"),
    ("second_generation_s", "2nd generation"),
]


def report(results, command, same_bits, diff):
    lines = [
        "# Warm start: time to the first cached image in a new process",
        "",
        "Embedded U-Net (`fxcache.models.load(\"unet\")`), `DeepCache(interval=3, branch=1)`, "
        "`backend=\"inductor\"`, `generate(model, num_steps=20, num_samples=8)`; every row is a fresh "
        "process; seconds. Written by `bench/warm_start.py`.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} CPUs visible; intra-op threads: {THREADS[0] or 'torch default'}; "
        f"torch {results[0]['torch']}; "
        f"shared with other jobs, so figures vary from run to run.",
        "",
        "Warm rows: the median of several fresh processes (all of them in the last column); the phases are "
        "that process's. Capture + rewrite and build entry happen inside the 1st generation (at the first call).",
        "",
        "| run | " + " | ".join(h for _, h in COLUMNS) + " | caches | every run |",
        "|---|" + "---|" * len(COLUMNS) + "---|---|",
    ]
    for r in results:
        caches = {**r["warm_stats"], **r["inductor_cache"], **r["aot_autograd_cache"]}
        lines.append(f"| {r['name']} | " + " | ".join(f"{r[k]:.1f}" for k, _ in COLUMNS)
                     + " | " + ", ".join(f"{k}={v}" for k, v in sorted(caches.items()))
                     + " | " + ", ".join(f"{x:.1f}" for x in r.get("all_runs_s", [r["to_first_image_s"]])) + " |")
    cold = next(r for r in results if r["name"].startswith("torch.compile, cold (default"))
    warm = next(r for r in results if r["name"].startswith("cache_dir, warm"))
    lines += [
        "",
        f"Cold (torch.compile, empty caches): {cold['to_first_image_s']:.1f} s; warm start (cache_dir, second "
        f"process, median): {warm['to_first_image_s']:.1f} s; target <= 10 s: "
        f"{'met' if warm['to_first_image_s'] <= 10 else 'NOT met'} (every warm run: "
        f"{', '.join(f'{x:.1f}' for x in warm['all_runs_s'])} s).",
        f"Warm start after imports (process start to first image, less interpreter start and imports): "
        f"{warm['to_first_image_s'] - warm['import_torch_s'] - warm['import_fxcache_s']:.1f} s.",
        f"First image of the warm starts bit-identical to the cold cache_dir run's: {same_bits}; largest "
        f"difference from torch.compile's (default, freezing=True) image: {diff:.2e} (images in [-1, 1]).",
        "",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per warm row; the median is shown")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads of every run (0: torch's default). On a machine shared with other jobs, "
                         "OpenMP threads stall when another process holds a core (see the 2-thread run committed in "
                         "8bf6224: 20-step generations stalled by seconds); 1 makes the runs comparable")
    ap.add_argument("--out", default=os.path.join(RESULTS, "warm_start.md"))
    a = ap.parse_args()
    THREADS[0] = a.threads
    import torch

    results = []
    with tempfile.TemporaryDirectory(prefix="fxcache-warm-") as tmp:
        def d(name):
            return os.path.join(tmp, name)

        variants = [(None, "default: freezing=True"), (False, "freezing=False")]
        for freezing, label in variants:
            ind = d(f"inductor-{freezing}")
            results.append(run(f"torch.compile, cold ({label})", ind, None, d(f"tc-{freezing}.pt"), freezing))
            results.append(run_warm(a.repeat, f"torch.compile, inductor caches warm ({label})", ind, None, d("o.pt"),
                                    freezing))
        results.append(run("cache_dir, cold", d("inductor-aoti"), d("fxcache"), d("cold.pt")))
        results.append(run_warm(a.repeat, "cache_dir, warm", d("inductor-aoti"), d("fxcache"), d("warm.pt")))
        results.append(run_warm(a.repeat, "cache_dir, warm, empty TORCHINDUCTOR_CACHE_DIR", d("inductor-new"),
                                d("fxcache"), d("warm2.pt")))
        same = bool(torch.equal(torch.load(d("cold.pt")), torch.load(d("warm.pt")))
                    and torch.equal(torch.load(d("cold.pt")), torch.load(d("warm2.pt"))))
        diff = float((torch.load(d("cold.pt")) - torch.load(d("tc-None.pt"))).abs().max())
    for r in results:
        r["torch"] = torch.__version__
    command = "cd " + ROOT + " && " + " ".join(shlex.quote(x) for x in [os.path.relpath(sys.executable, ROOT),
                                                                         *sys.argv])
    text = report(results, command, same, diff)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump(dict(command=command, same_bits=same, max_abs_diff_vs_torch_compile=diff, results=results), f,
                  indent=1)
    _update_docs(text)
    print(text)


def _update_docs(text):
    """The table goes into docs/warm_start.md between its markers, so no figure there is typed by hand."""
    path = os.path.join(ROOT, "docs", "warm_start.md")
    begin, end = "<!-- warm_start:begin -->", "<!-- warm_start:end -->"
    with open(path) as f:
        doc = f.read()
    if begin not in doc or end not in doc:
        return
    body = text.split("\n", 2)[2]  # without the title
    doc = doc[: doc.index(begin) + len(begin)] + "\n" + body + "\n" + doc[doc.index(end):]
    with open(path, "w") as f:
        f.write(doc)


if __name__ == "__main__":
    main()
