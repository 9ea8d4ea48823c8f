"""Cache memory of real denoisers: for each published config of ``fxcache.configs`` at its
pipeline's usual resolution and steps, and each schedule (FORA(3); DeepCache(3, branch 0)
on U-Nets; FirstBlockCache(0.1), as a residual span (the default on transformers) and
as sublayers; DBCache(8, 0, 0.08) on transformers; TeaCache(0.2)), the bytes of one cache state, the total
for the cache states a guided generation holds, and the FLOP-ideal speed-up. Built on the
meta device through the runtime's own build path (no weights, nothing compiled or
allocated). Writes a Markdown table to bench/results/memory_table.md.

    .venv/bin/python bench/memory_table.py [--out bench/results/memory_table.md] [--models sd15,flux-dev]
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import resource
import time

import torch

import fxcache
from fxcache import configs
from fxcache.artefacts.store import write_text_atomic
from fxcache.errors import FxcacheError
from fxcache.plan import _fmt_bytes

ROOT = pathlib.Path(__file__).resolve().parents[1]


def schedules(unet: bool):
    out = [("FORA(3)", fxcache.FORA(interval=3))]
    if unet:
        out.append(("DeepCache(3, branch 0)", fxcache.DeepCache(interval=3, branch=0)))
    out += [("FirstBlockCache(0.1)", fxcache.FirstBlockCache(0.1))]
    if not unet:  # the residual span (the default) against FORA's sublayers, and cache-dit's F8B0
        out += [('FirstBlockCache(0.1, reuse="sublayers")', fxcache.FirstBlockCache(0.1, reuse="sublayers")),
                ("DBCache(8, 0, 0.08)", fxcache.DBCache(8, 0, 0.08))]
    out += [("TeaCache(0.2)", fxcache.TeaCache(0.2))]
    return out


def row(name: str, label: str, schedule) -> dict:
    m = configs.info(name)
    t0 = time.perf_counter()
    try:
        plan = configs.plan_config(name, schedule)
    except FxcacheError as exc:
        why = str(exc).split("; ")[-1]  # fxcache's messages end with the reason or the remedy
        return dict(schedule=label, error=f"{type(exc).__name__}: {why}",
                    seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if plan.adaptive is None:
        speedup = f"{configs.flop_speedup(plan, m.steps):.2f}x"
    else:
        # the best case: every step the policy may reuse reuses (first/last steps full, and
        # at most max_reuse reuses in a row)
        a, full, reuse = plan.adaptive, plan.full_flops, plan.step_kinds[1].flops
        middle = max(m.steps - a.first_steps - a.last_steps, 0)
        full_steps = m.steps - middle + (middle // (a.max_reuse + 1) if a.max_reuse is not None else 0)
        best = m.steps * full / (full_steps * full + (m.steps - full_steps) * reuse)
        speedup = f"adaptive: reused step {reuse / full:.2%} of full; at best {best:.1f}x"
    return dict(schedule=label, units=len(plan.cache_bytes_by_unit()), per_state=plan.cache_bytes,
                total=plan.total_cache_bytes(m.contexts), speedup=speedup, seconds=seconds,
                biggest=max(plan.cache_bytes_by_unit().values()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_table.md"))
    parser.add_argument("--models", default=",".join(configs.NAMES), help="comma-separated config names")
    args = parser.parse_args(argv)
    names = [configs.info(n).name for n in args.models.split(",") if n.strip()]

    lines = [
        "# Cache memory of real denoisers",
        "",
        "Written by `.venv/bin/python bench/memory_table.py`: each published `config.json` "
        "(`fxcache/configs/`) built on the meta device in its pipeline's dtype, its pipeline's "
        "inputs at the usual resolution and steps (batch 1 per prompt), and the plan the "
        "runtime builds at a first call (`fxcache.configs.plan_config`, nothing compiled or "
        "allocated). *Per state*: `plan.cache_bytes`, the buffers of one cache state (one "
        "cache context, one input shape; an adaptive schedule's state buffers included). "
        "*Total*: `plan.total_cache_bytes(contexts)` = contexts x per state, with 2 contexts "
        "for pipelines that run classifier-free guidance (Wan 2.1 calls the model twice per "
        "step, in cache contexts `cond` and `uncond`; SD 1.5, SDXL, SD3.5 and CogVideoX call "
        "it once on a batch of 2, one state of twice the bytes) and 1 for FLUX.1-dev "
        "(guidance-distilled). *FLOP-ideal*: full-step FLOPs x steps / planned FLOPs over the "
        "usual steps; adaptive schedules decide at run time, so their column gives the cost of "
        "a reused step and the best case (every step after the first reused), which the threshold decides "
        "whether a generation gets near. MiB/GiB are 2^20/2^30 bytes. *Plan s*: seconds to capture and plan on "
        f"this machine ({platform.processor() or platform.machine()}, torch {torch.__version__}).",
        "",
        "| model | resolution, steps | schedule | cached units | biggest unit | per state | contexts | total "
        "| FLOP-ideal | plan s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        m = configs.info(name)
        res = f"{m.width}x{m.height}" + (f", {m.frames} frames" if m.frames else "") + f", {m.steps} steps"
        for label, schedule in schedules(m.unet):
            r = row(name, label, schedule)
            if "error" in r:
                line = (f"| {m.label} | {res} | {label} | not applicable: {r['error']} | | | | | | "
                        f"{r['seconds']:.1f} |")
            else:
                line = (f"| {m.label} | {res} | {label} | {r['units']} | {_fmt_bytes(r['biggest'])} | "
                        f"{_fmt_bytes(r['per_state'])} | {m.contexts} | {_fmt_bytes(r['total'])} | {r['speedup']} | "
                        f"{r['seconds']:.1f} |")
            print(line, flush=True)
            lines.append(line)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    lines += ["", f"Peak resident memory of the run: {peak:.2f} GiB."]
    print(lines[-1])
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
