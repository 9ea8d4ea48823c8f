"""Table 5, residual spans: the same adaptive policy three ways on the same model.

    python bench/span_evidence.py [--samples N] [--steps T] [--allow-dirty] [--quick]

For FirstBlockCache, TeaCache and MagCache on the embedded DiT, and FirstBlockCache on
table 5's tiny random Flux: fxcache with ``reuse="span"`` (one residual per stream over
the reused blocks, the default), fxcache with ``reuse="sublayers"`` (FORA's attention
and MLP units of those blocks, the form before residual spans), and diffusers' own hook
(FirstBlockCache, MagCache; diffusers has no TeaCache hook). Per row: quality against
the uncached run (SQNR, PSNR, FID and class accuracy on the DiT; SQNR on Flux), the
measured speed-up (eager, interleaved whole generations in this process, as table 5),
and memory: fxcache's ``plan.cache_bytes`` (per cache state, at the speed runs' batch)
next to the bytes of the cache tensors actually held after a generation (fxcache:
``engine.cache_tensors()``; diffusers: every tensor reachable from its hook registries
that is not a parameter or buffer of the model).

Writes ``bench/results/table5_spans.json`` and ``.md`` (stamped like the tables:
``bench/results/README.md``). Calibration (TeaCache's polynomial, MagCache's ratios,
diffusers' MagCache ratios) as in table 5, on seeds other than the evaluation seed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402  (bench/harness.py: the table machinery, shared)
import table5_adaptive as T5  # noqa: E402  (bench/table5_adaptive.py: table 5's rows)

import fxcache  # noqa: E402

OUT = H.RESULTS / "table5_spans.json"
FBC = (0.08, 0.15)
TEACACHE = (0.1,)
MAGCACHE = (0.03,)
FLUX_FBC = (0.3, 0.5)
FORMS = ("span", "sublayers")


def held_bytes(model: torch.nn.Module, roots) -> int:
    """Bytes of the distinct tensors reachable from ``roots`` (objects, dicts, lists) that
    are not parameters or buffers of ``model`` (a hook's cached values)."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen_obj, seen_ptr, total = set(), set(), 0
    stack = [(r, 0) for r in roots]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen_obj or depth > 8:
            continue
        seen_obj.add(id(obj))
        if isinstance(obj, torch.Tensor):
            ptr = obj.untyped_storage().data_ptr()
            if ptr and ptr not in own and ptr not in seen_ptr:
                seen_ptr.add(ptr)
                total += obj.untyped_storage().nbytes()
            continue
        if isinstance(obj, torch.nn.Module):
            continue
        if isinstance(obj, dict):
            stack += [(v, depth + 1) for v in obj.values()]
        elif isinstance(obj, (list, tuple, set)):
            stack += [(v, depth + 1) for v in obj]
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("diffusers"):
            stack += [(v, depth + 1) for v in vars(obj).values()]
    return total


def peer_bytes(cached) -> int:
    model = cached.model
    regs = [m._diffusers_hook for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None]
    return held_bytes(model, regs)


def fx_bytes(cm) -> tuple[int, int]:
    """(plan.cache_bytes per state, bytes of the cache tensors held) after a generation."""
    held = sum(t.untyped_storage().nbytes() for bufs in fxcache.engine_of(cm).cache_tensors().values()
               for t in bufs.values())
    return cm.plan.cache_bytes, held


def dit_rows(cfg: H.Config, steps: int, phases: dict) -> dict:
    peers = T5._peers()
    name = "dit"
    model = T5.load(name)
    ref, ref_row, _ = T5._t5_reference(model, name, steps, cfg)
    run = lambda m, s: H.gen(m, name, steps, cfg.profile_samples, s)  # noqa: E731
    t0 = time.perf_counter()
    coefficients = fxcache.fit_teacache(fxcache.calibrate.fit.profile_teacache(model, run, seeds=H.PROFILE_SEEDS))
    ratios = fxcache.fit_magcache(fxcache.calibrate.fit.profile_magnitudes(model, run, seeds=H.PROFILE_SEEDS))
    with torch.no_grad():
        peer_ratios = peers.mag_ratios(name, steps, cfg.mag_samples, seed=H.PROFILE_SEEDS[0])
    phases["calibration"] = time.perf_counter() - t0
    K, first = T5.T5_MAG_K, T5.T5_MAG_FIRST
    policies = [(f"FirstBlockCache δ={t:g}", "FirstBlockCache", lambda r, t=t: fxcache.FirstBlockCache(t, reuse=r),
                 peers.first_block_cache(t)) for t in FBC]
    policies += [(f"TeaCache δ={t:g}", "TeaCache",
                  lambda r, t=t: fxcache.TeaCache(t, coefficients=coefficients, reuse=r), None) for t in TEACACHE]
    policies += [(f"MagCache δ={t:g}, K={K}", "MagCache",
                  lambda r, t=t: fxcache.MagCache(t, ratios=ratios, first_steps=first, max_reuse=K, reuse=r),
                  peers.mag_cache(t, peer_ratios, max_skip_steps=K)) for t in MAGCACHE]
    rows = [dict(ref_row, form="–")]
    n = cfg.speed_samples
    for label, family, make, peer in policies:
        for form in FORMS:
            sch = make(form)
            r = T5._fx_row(model, sch, f"{label} ({form})", family, name, steps, cfg, ref, phases, form=form)
            cm = T5._t5_compile(model, sch, steps)
            H.gen(cm, name, steps, n, cfg.seed)
            r["plan_cache_bytes"], r["held_bytes"] = fx_bytes(cm)
            r["units"] = list(cm.plan.units)
            rows.append(r)
        if peer is not None:
            r = T5._peer_row(peer, model, name, steps, cfg, ref, phases, form="diffusers hook")
            cached = peer.build(T5.load(name), steps)
            with torch.no_grad():
                peers.generate(cached, name, steps, n, cfg.seed)
            r["plan_cache_bytes"], r["held_bytes"] = None, peer_bytes(cached)
            r["family"] = family
            rows.append(r)
    return {"name": name, "rows": rows, "bytes_batch": n,
            "calibration": {"teacache_coefficients": list(coefficients), "magcache_ratios": list(ratios),
                            "diffusers_magcache_ratios": list(peer_ratios)}}


def flux_rows(cfg: H.Config, steps: int, phases: dict) -> dict:
    peers = T5._peers()
    t0 = time.perf_counter()
    model = T5._flux_model()
    batch = cfg.flux_samples
    ref = T5._flux_sample(model, steps, batch, cfg.seed)
    rows = []

    def measure(label, family, form, m, nbytes):
        out = T5._flux_sample(m, steps, batch, cfg.seed)
        ta, tb = H.interleaved_times([lambda: T5._flux_sample(model, steps, batch, cfg.seed),
                                      lambda: T5._flux_sample(m, steps, batch, cfg.seed)], cfg.repeats)
        ratios = sorted(a / b for a, b in zip(ta, tb))
        plan_b, held = nbytes(m)
        r = {"setting": label, "family": family, "form": form, "sqnr_db": H.sqnr(ref, out),
             "measured": ratios[len(ratios) // 2], "measured_min": ratios[0], "measured_max": ratios[-1],
             "steps_text": T5._steps_text(m, steps) if isinstance(m, H.CachedModel) else None,
             "plan_cache_bytes": plan_b, "held_bytes": held}
        H.log(f"  flux {label}: SQNR {r['sqnr_db']:.2f} dB, measured {r['measured']:.2f}x, held {held} B")
        rows.append(r)

    for t in FLUX_FBC:
        for form in FORMS:
            cm = fxcache.compile(model, fxcache.FirstBlockCache(t, reuse=form), backend=None, num_steps=steps)
            measure(f"FirstBlockCache δ={t:g} ({form})", "FirstBlockCache", form, cm, fx_bytes)
        peer = peers.first_block_cache(t)
        measure(peer.label, "FirstBlockCache", "diffusers hook", peer.build(copy.deepcopy(model), steps),
                lambda m: (None, peer_bytes(m)))
    phases["tiny flux"] = time.perf_counter() - t0
    return {"batch": batch, "steps": steps, "rows": rows}


def _mib(b) -> str:
    return "–" if b is None else f"{b / 2**20:.3f} MiB" if b >= 2**16 else f"{b / 1024:.1f} KiB"


def render(d: dict) -> str:
    head = ["setting", "form", "FLOP-ideal", "measured (range)", "SQNR dB ↑", "PSNR dB ↑", "FID ↓", "class acc ↑",
            "plan.cache_bytes", "held after a generation", "steps computed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in d["dit"]["rows"]:
        lines.append("| " + " | ".join([
            r["setting"], r.get("form", "–"), H._f(r.get("ideal"), "{:.2f}x"),
            "1 (reference)" if r["method"] == "uncached" else
            f"{r['measured']:.2f}x ({r['measured_min']:.2f}-{r['measured_max']:.2f})",
            H._f(r["sqnr_db"], "{:.1f}"), H._f(r["psnr_db"], "{:.1f}"), H._f(r["fid"], "{:.1f}"),
            H._f(r.get("class_acc"), "{:.3f}"), _mib(r.get("plan_cache_bytes")), _mib(r.get("held_bytes")),
            f"`{r['steps_quality']}`" if r.get("steps_quality") else "–"]) + " |")
    fh = ["setting", "form", "measured (range)", "SQNR dB ↑", "plan.cache_bytes", "held after a generation",
          "steps computed"]
    flines = ["| " + " | ".join(fh) + " |", "|" + "|".join(["---"] * len(fh)) + "|"]
    for r in d["flux"]["rows"]:
        flines.append("| " + " | ".join([
            r["setting"], r["form"], f"{r['measured']:.2f}x ({r['measured_min']:.2f}-{r['measured_max']:.2f})",
            H._f(r["sqnr_db"], "{:.1f}"), _mib(r["plan_cache_bytes"]), _mib(r["held_bytes"]),
            f"`{r['steps_text']}`" if r.get("steps_text") else "–"]) + " |")
    return "\n\n".join([
        H.md_header(d),
        f"Per policy: fxcache with one residual span over the reused blocks (`reuse=\"span\"`, the default), "
        f"fxcache with FORA's attention/MLP sublayers of those blocks (`reuse=\"sublayers\"`), and diffusers' own "
        f"hook where it has one. Memory at batch {d['dit']['bytes_batch']} (the speed runs'): `plan.cache_bytes` "
        f"(one cache state: the slots the plan reads, plus the adaptive state) and the bytes of the cache tensors "
        f"held after a generation (fxcache: `engine_of(cm).cache_tensors()`; diffusers: tensors reachable from its "
        f"hook registries that are not the model's parameters or buffers).",
        "## DiT",
        "\n".join(lines),
        "## Tiny Flux",
        f"Table 5's tiny random Flux, batch {d['flux']['batch']}, {d['flux']['steps']} Euler steps; SQNR of the "
        f"final latents against the uncached run.",
        "\n".join(flines),
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/span_evidence.py", description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=256, help="samples per quality row (default 256)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: table 5's)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 samples, 4 steps, 1 repeat; not a result")
    ap.add_argument("--allow-dirty", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    cfg = H.Config(samples=args.samples, steps=args.steps, command="python bench/span_evidence.py " + " ".join(
        argv if argv is not None else sys.argv[1:]))
    if args.quick:
        cfg = dataclasses.replace(cfg, samples=8, steps=4, speed_samples=2, repeats=1, profile_samples=2,
                                  mag_samples=2, flux_samples=1, quick=True)
    cfg = H.standalone_config(ap, args, cfg, OUT)
    steps = cfg.steps_for(5)
    t0 = time.perf_counter()
    phases = {"quality": 0.0, "speed": 0.0}
    d = H.meta(5, f"Residual spans vs sublayers vs diffusers' hooks, same policy, DDIM {steps} steps", cfg, steps)
    d["phases_s"] = phases
    d["dit"] = dit_rows(cfg, steps, phases)
    d["flux"] = flux_rows(cfg, steps, phases)
    H.write_standalone(d, cfg.out, render, t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
