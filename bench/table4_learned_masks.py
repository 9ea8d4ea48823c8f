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

#: (λ1 sparsity, λ2 bimodal, variant) settings of table 4, all with λ1 > λ2 (fxcache.LearnedMask).
#: "paper": the paper's loss (squared feature error of the final block, timestep-aware weights
#: from r_t), learned along the masked denoising; "teacher caches": the same with rollout=False
#: (every step from the teacher's previous-step caches); "sensitivity": fxcache's variant
#: (weights from the measured sensitivity of the final sample, l2 feature loss on the model's
#: output, sparsity weighted by unit FLOPs); "sensitivity, K=k": the same with max_reuse=k.
MASK_SETTINGS: tuple[tuple[float, float, str], ...] = (
    (3e-4, 1e-4, "paper"), (1e-3, 3e-4, "paper"), (3e-3, 1e-3, "paper"), (1e-2, 3e-3, "paper"),
    (1e-3, 3e-4, "teacher caches"),
    (7e-3, 2.3e-3, "sensitivity"), (1e-2, 3.3e-3, "sensitivity"),
    (7e-3, 2.3e-3, "sensitivity, K=2"), (1e-2, 3.3e-3, "sensitivity, K=2"), (1.5e-2, 5e-3, "sensitivity, K=3"),
    (3e-2, 1e-2, "sensitivity, K=4"))
_SENSITIVITY = dict(loss_scaling="sensitivity", feature_loss="l2", cost="flops")
VARIANTS = {
    "paper": (dict(), "final_block"),
    "teacher caches": (dict(rollout=False), "final_block"),
    "sensitivity": (_SENSITIVITY, "output"),
    # ... with a bound on each unit's run of reuse (LearnedMask.max_reuse)
    "sensitivity, K=2": (dict(_SENSITIVITY, max_reuse=2), "output"),
    "sensitivity, K=3": (dict(_SENSITIVITY, max_reuse=3), "output"),
    "sensitivity, K=4": (dict(_SENSITIVITY, max_reuse=4), "output"),
}
#: FORA intervals always measured (the learned rows are compared with FORA interpolated between them)
FORA_INTERVALS = (2, 3, 4, 5)
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
    for l1, l2, variant in MASK_SETTINGS:
        options, feature = VARIANTS[variant]
        conf = fxcache.LearnedMask(lambda_sparsity=l1, lambda_bimodal=l2, iters=cfg.mask_iters, units=MASK_UNITS,
                                   **options)
        label = f"learned mask ({variant}) λ1={l1:g}, λ2={l2:g}"
        log(f"{name}: {label}: learning ({cfg.mask_iters} iters per step, {cfg.mask_samples} samples)")
        mask, learn_s = timed(lambda: fxcache.learn_mask(
            model, lambda m, s: gen(m, name, steps, cfg.mask_samples, MASK_SEED0 + s), conf, feature=feature,
            progress=False))
        phases["mask learning"] += learn_s
        log(f"  learned in {learn_s:.1f} s; computed {mask.computed_fraction:.0%}")
        cm = fxcache.compile(model, mask, backend=None)
        learned.append(_cached_row(model, cm, mask, label, "learned mask", name, steps, cfg, ref, phases,
                                   lambda_sparsity=l1, lambda_bimodal=l2, variant=variant, feature=feature,
                                   config=conf.to_dict(), learn_s=learn_s, mask=mask.to_dict(),
                                   units=list(MASK_UNITS),
                                   mask_text=str(mask), computed_fraction=mask.computed_fraction))
    full, partial = _fora_flops(model, name, cfg.samples)  # the batch the masks' planned FLOPs are counted at
    fora, done = [], {}
    matched = {r["setting"]: fora_interval_for(r["planned_flops"], full, partial, steps) for r in learned}
    for n in sorted(set(FORA_INTERVALS) | {m for m in matched.values() if m > 1}):
        sch = fxcache.FORA(n)
        log(f"{name}: FORA N={n}")
        cm = fxcache.compile(model, sch, backend=None)
        done[n] = _cached_row(model, cm, sch, f"FORA N={n}", "FORA", name, steps, cfg, ref, phases,
                              schedule=sch.to_dict(), matches=[k for k, m in matched.items() if m == n])
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
    old = "variant" not in (learned[0] if learned else {})  # measured before LearnedMask.rollout existed
    how = ("each step trained from the teacher's previous-step caches (before `rollout`)" if old else
           "with the options of each row's variant: 'paper': the paper's loss, learned along the masked model's "
           "own denoising (`rollout=True`, the default); 'teacher caches': the same with `rollout=False`; "
           "'sensitivity': `loss_scaling='sensitivity', feature_loss='l2', cost='flops'` and `feature='output'`; "
           "'K=k': also `max_reuse=k` (a unit reused k steps in a row computes at the next)")
    return "\n\n".join([
        md_header(d),
        md_spread(d["spread"], "dit"),
        f"Masks: `fxcache.learn_mask(model, run, LearnedMask(lambda_sparsity=λ1, lambda_bimodal=λ2, "
        f"iters={cfg['mask_iters']}, units={tuple(units) if isinstance(units, list) else repr(units)}))`, "
        f"{how}; teacher run of {cfg['mask_samples']} samples (seed {d['mask_seed0']}), threshold 0.5, rectified. "
        f"FORA caches the attention and MLP sublayers (gates and residuals recomputed)"
        + ("; the masks cache whole transformer blocks" if units == "transformer_block" else
           "; the masks decide the same sublayers per step") +
        f". FORA is measured at intervals {', '.join(str(f['schedule']['interval']) for f in fora)}; 'planned "
        f"GFLOPs/sample' is per generated sample over the whole generation.",
        md_table(rows, acc=True, extra_cols=cols),
        "\n".join(pair_summary_fora(learned, fora)),
        efficiency_line(rows),
        f"Learned masks (`#` compute, `.` reuse; steps left to right):\n\n{masks}",
    ])


def fora_at(ideal: float, fora: list[dict]) -> float | None:
    """FORA's SQNR at this FLOP-ideal speed-up, linear in log speed-up between the two
    measured FORA rows around it (None outside them)."""
    pts = sorted((f["ideal"], f["sqnr_db"]) for f in fora if math.isfinite(f["sqnr_db"]))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= ideal <= x1 and x1 > x0:
            return y0 + (y1 - y0) * math.log(ideal / x0) / math.log(x1 / x0)
    return None


def pair_summary_fora(learned: list[dict], fora: list[dict]) -> list[str]:
    by_match = {m: f for f in fora for m in f.get("matches", [])}
    out, wins, met, judged = [], 0, [], 0
    for r in learned:
        f = by_match.get(r["setting"])
        at = fora_at(r["ideal"], fora)
        line = f"- {r['setting']} ({r['planned_gflops_per_sample']:.2f} GFLOPs/sample, ideal {r['ideal']:.2f}x, " \
               f"measured {r['measured']:.2f}x)"
        if f is not None:
            wins += r["fid"] < f["fid"]
            line += (f" vs {f['setting']} ({f['planned_gflops_per_sample']:.2f} GFLOPs/sample, measured "
                     f"{f['measured']:.2f}x): FID {r['fid']:.1f} vs {f['fid']:.1f}, SQNR {r['sqnr_db']:.1f} vs "
                     f"{f['sqnr_db']:.1f} dB, class acc {r['class_acc']:.3f} vs {f['class_acc']:.3f}")
        else:
            line += ": below FORA N=2's speed-up, no FORA row near it"
        if at is not None:
            judged += 1
            line += f"; FORA at the same FLOPs (interpolated): {at:.1f} dB, difference {r['sqnr_db'] - at:+.1f} dB"
            if r["sqnr_db"] >= at:
                met.append(r)
        out.append(line + ".")
    if out:
        paired = sum(r["setting"] in by_match for r in learned)
        out.insert(0, f"The learned mask has the lower FID in {wins} of {paired} pairs (each with the FORA interval of "
                      f"the closest planned FLOPs):")
        by_variant: dict[str, list[int]] = {}
        for r in learned:
            if fora_at(r["ideal"], fora) is None:
                continue
            v = r.get("variant", "learned mask").split(",")[0] + (", K" if ", K=" in r.get("variant", "") else "")
            counts = by_variant.setdefault(v, [0, 0])
            counts[0] += r in met
            counts[1] += 1
        per = "; ".join(f"{v}: {a} of {n}" for v, (a, n) in by_variant.items())
        out.append(f"\nTarget (issue 19): a learned mask at least matches FORA at equal FLOPs (FORA's SQNR interpolated "
                   f"in log FLOP-ideal speed-up between its measured intervals): met by {len(met)} of the {judged} "
                   f"learned rows inside FORA's measured range ({per}).")
    return out


TABLE = Table(4, table4, render4, "tables_4.png", plot)

if __name__ == "__main__":
    raise SystemExit(main(None, {4: TABLE}, "python bench/table4_learned_masks.py", __doc__.split("\n")[0]))
