"""Table 4: learned timestep-aware block masks on the digit DiT against FORA at about the same FLOPs.

    python bench/table4_learned_masks.py [--samples N] [--steps T] [--quick] [--allow-dirty] [--render [--plot]]

(the same as ``python bench/tables.py --table 4``; options and results: bench/harness.py, bench/results/README.md)
"""

from __future__ import annotations

import math
import time

import fxcache
from fxcache.models import load

from harness import (Config, Table, _cached_row, _finish, efficiency_line, gen, log, main, md_header, md_spread,
                     md_table, meta, plot, reference, timed)

#: (λ1 sparsity, λ2 bimodal, rollout) settings of table 4, all with λ1 > λ2 (fxcache.LearnedMask);
#: rollout=False is the ablation: every step trained from the teacher's previous-step caches.
MASK_SETTINGS: tuple[tuple[float, float, bool], ...] = (
    (3e-4, 1e-4, True), (1e-3, 3e-4, True), (3e-3, 1e-3, True), (1e-2, 3e-3, True), (1e-3, 3e-4, False))
#: the paper's blocks on a DiT are its MHA and MLP (Sec. 3.2): FORA's units
MASK_UNITS = ("attention", "mlp")
MASK_SEED0 = 2000  # the teacher run of mask learning


def _fora_flops(model, name: str, batch: int) -> tuple[int, int]:
    """FLOPs of FORA's full and partial step on this model at this batch (from a bound plan)."""
    cm = fxcache.compile(model, fxcache.FORA(2), backend=None)
    gen(cm, name, 2, batch, 0)
    kinds = cm.plan.step_kinds
    return kinds[cm.plan.kind_of_step(0)].flops, kinds[cm.plan.kind_of_step(1)].flops


def fora_interval_for(planned: int, full: int, partial: int, steps: int) -> int:
    """The FORA interval whose FLOPs over ``steps`` steps are closest in ratio to ``planned``."""
    def flops(n):
        k = math.ceil(steps / n)
        return k * full + (steps - k) * partial

    return min(range(1, steps + 1), key=lambda n: abs(math.log(flops(n) / planned)))


def table4(cfg: Config) -> dict:
    t_start = time.perf_counter()
    steps, name = cfg.steps_for(4), "dit"
    data = meta(4, f"Learned timestep-aware block masks on the digit DiT vs FORA at about the same FLOPs, DDIM "
                   f"{steps} steps", cfg, steps)
    data["phases_s"] = phases = {"quality": 0.0, "speed": 0.0, "mask learning": 0.0}
    data["mask_seed0"] = MASK_SEED0
    model = load(name)
    ref, ref_row, data["spread"] = reference(model, name, steps, cfg)
    learned = []
    for l1, l2, rollout in MASK_SETTINGS:
        conf = fxcache.LearnedMask(lambda_sparsity=l1, lambda_bimodal=l2, iters=cfg.mask_iters, units=MASK_UNITS,
                                   rollout=rollout)
        label = f"learned mask λ1={l1:g}, λ2={l2:g}" + ("" if rollout else ", teacher caches (rollout=False)")
        log(f"{name}: {label}: learning ({cfg.mask_iters} iters per step, {cfg.mask_samples} samples)")
        mask, learn_s = timed(lambda: fxcache.learn_mask(
            model, lambda m, s: gen(m, name, steps, cfg.mask_samples, MASK_SEED0 + s), conf, progress=False))
        phases["mask learning"] += learn_s
        log(f"  learned in {learn_s:.1f} s; computed {mask.computed_fraction:.0%}")
        cm = fxcache.compile(model, mask, backend=None)
        learned.append(_cached_row(model, cm, mask, label, "learned mask", name, steps, cfg, ref, phases,
                                   lambda_sparsity=l1, lambda_bimodal=l2, rollout=rollout, learn_s=learn_s,
                                   mask=mask.to_dict(), units=list(MASK_UNITS),
                                   mask_text=str(mask), computed_fraction=mask.computed_fraction))
    full, partial = _fora_flops(model, name, cfg.samples)  # the batch the masks' planned FLOPs are counted at
    fora, done = [], {}
    for r in learned:
        n = fora_interval_for(r["planned_flops"], full, partial, steps)
        if n in done:
            done[n]["matches"].append(r["setting"])
            continue
        sch = fxcache.FORA(n)
        log(f"{name}: FORA N={n} (matches {r['setting']})")
        cm = fxcache.compile(model, sch, backend=None)
        done[n] = _cached_row(model, cm, sch, f"FORA N={n}", "FORA", name, steps, cfg, ref, phases,
                              schedule=sch.to_dict(), matches=[r["setting"]])
        fora.append(done[n])
    data["rows"] = [ref_row] + learned + fora
    return _finish(data, t_start, [ref_row], cfg.out, render4)


def render4(d: dict) -> str:
    cfg, rows = d["config"], d["rows"]
    learned = [r for r in rows if r["method"] == "learned mask"]
    fora = [r for r in rows if r["method"] == "FORA"]
    cols = (("learning", lambda r: f"{r['learn_s']:.0f} s" if "learn_s" in r else "–"),
            ("planned GFLOPs/sample", lambda r: f"{r['planned_gflops_per_sample']:.2f}" if "planned_flops" in r
             else "–"))
    masks = "\n\n".join(f"{r['setting']}:\n\n```\n{r['mask_text']}\n```" for r in learned)
    units = learned[0].get("units", "transformer_block") if learned else "transformer_block"
    old = "rollout" not in (learned[0] if learned else {})  # measured before LearnedMask.rollout existed
    how = ("each step trained from the teacher's previous-step caches (before `rollout`)" if old else
           "trained along the masked model's own denoising (`rollout=True`, the default) unless the row says "
           "'teacher caches'")
    return "\n\n".join([
        md_header(d),
        md_spread(d["spread"], "dit"),
        f"Masks: `fxcache.learn_mask(model, run, LearnedMask(lambda_sparsity=λ1, lambda_bimodal=λ2, "
        f"iters={cfg['mask_iters']}, units={tuple(units) if isinstance(units, list) else repr(units)}))`, "
        f"{how}; teacher run of {cfg['mask_samples']} samples (seed {d['mask_seed0']}), threshold 0.5, rectified. "
        f"FORA caches the attention and MLP sublayers (gates and residuals recomputed)"
        + ("; the masks cache whole transformer blocks" if units == "transformer_block" else
           "; the masks decide the same sublayers per step") +
        f". Each mask's FORA interval is the one whose "
        f"planned FLOPs over the {d['steps']} steps are closest; 'planned GFLOPs/sample' is per generated "
        f"sample over the whole generation.",
        md_table(rows, acc=True, extra_cols=cols),
        "\n".join(pair_summary_fora(learned, fora)),
        efficiency_line(rows),
        f"Learned masks (`#` compute, `.` reuse; steps left to right):\n\n{masks}",
    ])


def pair_summary_fora(learned: list[dict], fora: list[dict]) -> list[str]:
    by_match = {m: f for f in fora for m in f.get("matches", [])}
    out, wins = [], 0
    for r in learned:
        f = by_match[r["setting"]]
        wins += r["fid"] < f["fid"]
        out.append(f"- {r['setting']} ({r['planned_gflops_per_sample']:.2f} GFLOPs/sample, measured "
                   f"{r['measured']:.2f}x) vs {f['setting']} ({f['planned_gflops_per_sample']:.2f} GFLOPs/sample, "
                   f"measured {f['measured']:.2f}x): FID "
                   f"{r['fid']:.1f} vs {f['fid']:.1f}, SQNR {r['sqnr_db']:.1f} vs {f['sqnr_db']:.1f} dB, class acc "
                   f"{r['class_acc']:.3f} vs {f['class_acc']:.3f}.")
    if out:
        out.insert(0, f"The learned mask has the lower FID in {wins} of {len(learned)} pairs:")
        met = [r for r in learned if r["planned_flops"] <= by_match[r["setting"]]["planned_flops"]
               and r["sqnr_db"] >= by_match[r["setting"]]["sqnr_db"]]
        out.append(f"\nTarget (issue 19): a learned mask at least matches FORA at equal FLOPs, that is at no more "
                   f"planned FLOPs, at least FORA's SQNR: {'met' if met else 'not met'} "
                   f"({len(met)} of {len(learned)} pairs).")
    return out


TABLE = Table(4, table4, render4, "tables_4.png", plot)

if __name__ == "__main__":
    raise SystemExit(main(None, {4: TABLE}, "python bench/table4_learned_masks.py", __doc__.split("\n")[0]))
