"""Table 6, more: searched schedules on table 5's tiny random Flux, and diffusers' caches on the U-Net.

    python bench/table6_flux.py [--steps T] [--iterations N] [--allow-dirty] [--quick] [--render]

**Tiny Flux** (table 5's random ``FluxTransformer2DModel``, Euler steps of the flow ODE,
batch ``flux_samples``): at each FLOP budget of table 6, ``fxcache.search`` finds a
(step x unit) table over FORA's units (double-stream attention/MLPs, single-stream
branches) and its forecast order on the calibration seeds ``SEARCH_SEEDS``; every row is
then judged on seed 0 (never a search seed): SQNR of the final latents against the
uncached run (random weights: no FID), FLOP-ideal speed-up, and the speed-up measured in
this process (eager, interleaved whole generations; a step of this model lasts
milliseconds, so per-call overheads weigh more than on the digit models). Other rows:
FORA, FORA + forecasting, TaylorSeer's schedule, fxcache's FirstBlockCache and
diffusers' FirstBlockCache hook. The target of table 6 is evaluated the same way: the
best searched row at a budget against the best other row at equal or higher measured
speed-up, margin 2 dB.

**diffusers' caches on the embedded U-Net** (``UNet2DModel``): each of diffusers'
FirstBlockCache, MagCache (calibration mode) and TaylorSeer hooks is applied to the
model and one generation is run; what happens is recorded (an error, or how many hooks
attached and the output's SQNR against the uncached run). This is why table 6's U-Net
section has no diffusers rows.

Writes ``bench/results/table6_flux.json`` and ``.md`` (stamped like the tables:
``bench/results/README.md``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402  (bench/harness.py: the table machinery, shared)
import table5_adaptive as T5  # noqa: E402  (the tiny Flux of table 5)
import table6_search as T6  # noqa: E402  (table 6's budgets, search settings and target)

import fxcache  # noqa: E402
from fxcache.evaluation.metrics import sqnr  # noqa: E402
from fxcache.runtime import CachedModel  # noqa: E402

OUT = H.RESULTS / "table6_flux.json"
F6_SEARCHES = (("greedy", None), ("anneal", None), ("anneal", "step"))
F6_FORA = (2, 3, 4)
F6_FBC = (0.3, 0.5)


def _sample(model, steps: int, batch: int, seed: int) -> torch.Tensor:
    return T5._flux_sample(model, steps, batch, seed)


def flux_section(cfg: H.Config, steps: int, iterations: int, phases: dict) -> dict:
    model = T5._flux_model()
    batch = cfg.flux_samples
    ref = _sample(model, steps, batch, cfg.seed)
    H.log(f"flux: tiny random FluxTransformer2DModel, {steps} Euler steps, batch {batch}")

    def measure(label, family, m, static=True, **extra):
        t0 = time.perf_counter()
        out = _sample(m, steps, batch, cfg.seed)
        ratios, _, _ = H.interleaved_ratios(lambda: _sample(model, steps, batch, cfg.seed),
                                            lambda: _sample(m, steps, batch, cfg.seed), cfg)
        phases["speed"] += time.perf_counter() - t0
        r = {"setting": label, "family": family, "sqnr_db": sqnr(ref, out), "measured": statistics.median(ratios),
             "measured_min": min(ratios), "measured_max": max(ratios),
             "ideal": m.plan.ideal_speedup_over(steps) if static and isinstance(m, CachedModel) else None, **extra}
        ideal = f", ideal {r['ideal']:.2f}x" if r["ideal"] else ""
        H.log(f"  {label}: SQNR {r['sqnr_db']:.2f} dB{ideal}, measured {r['measured']:.2f}x "
              f"({r['measured_min']:.2f}-{r['measured_max']:.2f})")
        return r

    def compiled(schedule, forecast=None):
        """Eager; a searched result brings its own forecast order."""
        kw = {} if forecast is None else {"forecast": forecast}
        return fxcache.compile(model, schedule, backend=None, num_steps=steps, verbose=False, **kw)

    rows = []
    run = lambda m, s: _sample(m, steps, batch, s)  # noqa: E731
    for budget in T6.T6_BUDGETS:
        for method, tie in F6_SEARCHES:
            t0 = time.perf_counter()
            found = fxcache.search(model, run, speedup=budget, seeds=T6.SEARCH_SEEDS, units="fora", tie=tie,
                                   forecast=T6.T6_ORDERS, method=method, iterations=iterations, seed=0,
                                   progress=False)
            search_s = time.perf_counter() - t0
            phases["search"] += search_s
            H.log(f"  searched {method} (tie {tie}) at {budget:g}x in {search_s:.0f} s ({found.evaluations} "
                  f"candidates): calibration SQNR {found.score:.2f} dB, forecast {found.forecast}")
            rows.append(measure(T6._label(method, tie, budget), "searched", compiled(found), budget=budget,
                                search_s=search_s, evaluations=found.evaluations, calibration_sqnr_db=found.score,
                                forecast=found.forecast, mask_text=str(found.mask)))
    for n in F6_FORA:
        rows.append(measure(f"FORA N={n}", "FORA", compiled(fxcache.FORA(n))))
    for n in (2, 3):
        rows.append(measure(f"FORA N={n} + forecast order 1", "FORA + forecast", compiled(fxcache.FORA(n), 1)))
    for n, o in ((2, 1), (3, 2)):
        rows.append(measure(f"TaylorSeer's schedule (N={n}, warm-up {o + 1}) + forecast order {o}", "TaylorSeer",
                            compiled(T5.taylorseer_schedule(model, None, steps, n, o + 1,
                                                            probe_run=lambda m: _sample(m, 1, 1, 0)), o)))
    for t in F6_FBC:
        rows.append(measure(f"FirstBlockCache δ={t:g}", "FirstBlockCache", compiled(fxcache.FirstBlockCache(t)),
                            static=False))
    peers = T5._peers()
    for t in F6_FBC:
        peer = peers.first_block_cache(t)
        rows.append(measure(peer.label, f"diffusers {peer.method}", peer.build(copy.deepcopy(model), steps),
                            static=False))
    return {"config": dict(T5.T5_FLUX_CONFIG, axes_dims_rope=list(T5.T5_FLUX_CONFIG["axes_dims_rope"])),
            "side": T5.T5_FLUX_SIDE, "text_tokens": T5.T5_FLUX_TEXT, "batch": batch, "steps": steps, "rows": rows,
            "targets": targets(rows)}


def targets(rows: list[dict]) -> dict:
    """Table 6's target on these rows (``table6_search.targets6``: per budget and basis, the
    searched row with the largest margin over the best other row at equal or higher speed-up)."""
    return T6.targets6([dict(r, method=r["family"]) for r in rows])


def diffusers_on_unet(cfg: H.Config, steps: int) -> list[dict]:
    """Each of diffusers' cache hooks applied to the embedded UNet2DModel, one generation."""
    import diffusers.hooks as dh
    from fxcache.models import load

    samples = min(cfg.samples, 16)
    ref = H.gen(load("unet"), "unet", steps, samples, cfg.seed)
    cases = (("FirstBlockCache", lambda m: dh.apply_first_block_cache(m, dh.FirstBlockCacheConfig(threshold=0.1))),
             ("MagCache (calibration)", lambda m: dh.apply_mag_cache(m, dh.MagCacheConfig(
                 calibrate=True, num_inference_steps=steps))),
             ("TaylorSeer", lambda m: dh.apply_taylorseer_cache(m, dh.TaylorSeerCacheConfig())))
    out = []
    for label, apply in cases:
        m = load("unet")
        r = {"hook": label}
        try:
            apply(m)
            registries = [mod for mod in m.modules() if getattr(mod, "_diffusers_hook", None) is not None]
            hooks = sum(len(getattr(reg._diffusers_hook, "hooks", {})) for reg in registries)
            r["hooks_attached"] = hooks
            out_img = H.gen(m, "unet", steps, samples, cfg.seed)
            r["sqnr_db"] = sqnr(ref, out_img)
            r["outcome"] = (f"{hooks} hook(s) attached; the generation's SQNR against the uncached run: "
                            f"{r['sqnr_db']:.1f} dB" + (" (the output is unchanged: nothing is cached)"
                                                         if r["sqnr_db"] == float("inf") else ""))
        except Exception as exc:  # what diffusers does with a model it has no block registry for
            r["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            r["outcome"] = f"refused: {r['error']}"
        H.log(f"  diffusers {label} on UNet2DModel: {r['outcome']}")
        out.append(r)
    return out


def render(d: dict) -> str:
    f = d["flux"]
    head = ["setting", "family", "FLOP-ideal", "measured (range)", "SQNR dB ↑", "search"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in f["rows"]:
        lines.append("| " + " | ".join([
            r["setting"], r["family"], f"{r['ideal']:.2f}x" if r.get("ideal") else "–",
            f"{r['measured']:.2f}x ({r['measured_min']:.2f}-{r['measured_max']:.2f})", H._f(r["sqnr_db"], "{:.1f}"),
            f"{r['search_s']:.0f} s, {r['evaluations']} candidates, forecast {r['forecast']}" if "search_s" in r
            else "–"]) + " |")
    c = f["config"]
    u = "\n".join(f"- {r['hook']}: {r['outcome']}" for r in d["unet_diffusers"])
    # the shared header's title, command, code and wall-time lines; its quality and speed lines describe the
    # digit models' generations, so this file states its own below
    keep = ("# ", "- Command", "- Code", "- Wall time")
    lines_kept = [line for line in H.md_header(d).splitlines() if line.startswith(keep)]
    header = lines_kept[0] + "\n\n" + "\n".join(lines_kept[1:])
    return "\n\n".join([
        header,
        f"Speed: eager (`backend=None`), {d['config']['repeats']} interleaved pairs of whole generations against the "
        f"uncached model, median (min-max) of per-pair ratios; only ratios within this process mean anything. "
        f"FLOP-ideal: from the compiled plan over the generation (static schedules only).",
        "## Tiny Flux",
        f"A random `diffusers.FluxTransformer2DModel` ({c['num_layers']} double-stream and {c['num_single_layers']} "
        f"single-stream blocks; {f['side']}x{f['side']} latent tokens, {f['text_tokens']} text tokens, batch "
        f"{f['batch']}), {f['steps']} Euler steps of the flow ODE; searched on seeds {list(T6.SEARCH_SEEDS)}, judged "
        f"on seed {d['config']['seed']}; {d['iterations']} candidates per forecast order.",
        "\n".join(lines),
        T6._targets_text(targets(f["rows"])),
        "## diffusers' caches on the U-Net",
        f"Each hook applied to the embedded `UNet2DModel`, one generation of {min(d['config']['samples'], 16)} "
        f"samples, DDIM {d['steps']} steps:\n\n{u}",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/table6_flux.py", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="steps (default: table 6's)")
    ap.add_argument("--iterations", type=int, default=T6.T6_ITERS, help="search candidates per forecast order")
    ap.add_argument("--quick", action="store_true", help="smoke test: 4 steps, 1 repeat, 4 candidates; not a result")
    ap.add_argument("--allow-dirty", action="store_true")
    ap.add_argument("--render", action="store_true", help="rewrite the Markdown from the JSON; measure nothing")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.render:
        path = args.out or OUT
        path.with_suffix(".md").write_text(render(json.loads(path.read_text())) + "\n")
        H.log(f"rendered {path.with_suffix('.md')} from {path.name}")
        return 0
    cfg = H.Config(steps=args.steps, command="python bench/table6_flux.py " + " ".join(
        argv if argv is not None else sys.argv[1:]))
    iterations = args.iterations
    if args.quick:
        cfg = dataclasses.replace(cfg, samples=4, steps=4, repeats=1, flux_samples=1, quick=True)
        iterations = 4
    cfg = H.standalone_config(ap, args, cfg, OUT)
    steps = cfg.steps_for(6)
    t0 = time.perf_counter()
    phases = {"speed": 0.0, "search": 0.0}
    d = H.meta(6, f"Searched schedules on a tiny random Flux; diffusers' caches on the U-Net, {steps} steps", cfg,
               steps)
    d["phases_s"], d["iterations"] = phases, iterations
    d["flux"] = flux_section(cfg, steps, iterations, phases)
    d["unet_diffusers"] = diffusers_on_unet(cfg, steps)
    H.write_standalone(d, cfg.out, render, t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
