"""Table 3: block caching on both digit models, without and with scale-shift adapters, against fewer steps.

    python bench/table3_block_caching.py [--samples N] [--steps T] [--quick] [--allow-dirty] [--render [--plot]]

(the same as ``python bench/tables.py --table 3``; options and results: bench/harness.py, bench/results/README.md)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

import fxcache
from fxcache.models import load

from harness import (PROFILE_SEEDS, Config, Table, _cached_row, _finish, efficiency_line, fewer_rows, gen, log, main,
                     md_header, md_spread, md_table, meta, pair_summary, plot, reference, timed)

#: Table 3's configurations: (model, units, thresholds δ). The U-Net's residual layers (its
#: "blocks" in the block-caching paper's sense) and the DiT's whole transformer blocks are
#: units whose module adds its input inside, so a reuse freezes the residual stream too; the
#: DiT's attention and MLP sublayers are residual branches (the add and the adaLN gate stay
#: live), the reading of the paper's "due to the nature of residual connections". The
#: thresholds span about 1.4x to 3x FLOP-ideal speed-up at 20 steps for each profile.
BLOCK_CONFIGS: tuple[tuple[str, Any, tuple[float, ...]], ...] = (
    ("unet", ("resnet", "attention"), (0.05, 0.1, 0.2)),
    ("dit", "transformer_block", (0.1, 0.2, 0.3)),
    ("dit", ("attention", "mlp"), (0.1, 0.2, 0.3)),
)
TRAIN_SEED0 = 1000  # scale-shift training seeds 1000, 1001, ...


def _computed_fraction(cm) -> float:
    p = cm.plan
    cells = len(p.table) * len(p.units)
    return sum(map(sum, p.table)) / cells if cells else 1.0


def _block_cache_model(cfg: Config, name: str, units, steps: int, thresholds, phases: dict) -> dict:
    model = load(name)
    ref, ref_row, spread = reference(model, name, steps, cfg)
    log(f"{name}: profile over seeds {PROFILE_SEEDS} ({cfg.profile_samples} samples each), units {units}")
    prof, prof_s = timed(lambda: fxcache.profile(
        model, lambda m, s: gen(m, name, steps, cfg.profile_samples, s), units=units, seeds=PROFILE_SEEDS,
        progress=False))
    phases["profile"] = phases.get("profile", 0.0) + prof_s
    plain, adapted = [], []
    for d in thresholds:
        sch = fxcache.BlockCache(d, prof, units=units)
        label = f"BlockCache δ={d:g}"
        log(f"{name}: {label}, no adapters")
        cm = fxcache.compile(model, sch, backend=None)
        r = _cached_row(model, cm, sch, label, "BlockCache", name, steps, cfg, ref, phases, threshold=d)
        r.update(computed_fraction=_computed_fraction(cm), mask_text=str(fxcache.Mask(cm.plan.table, cm.plan.units)))
        plain.append(r)
        if _computed_fraction(cm) == 1.0:
            log(f"  δ={d:g} reuses nothing at {steps} steps: no adapters to train")
            continue
        log(f"{name}: {label}, training scale-shift adapters ({cfg.train_iters} iters, lr {cfg.train_lr})")
        adapters, train_s = timed(lambda: fxcache.train_scale_shift(
            model, sch, lambda m, s: gen(m, name, steps, cfg.train_samples, s), iters=cfg.train_iters,
            lr=cfg.train_lr, seeds=[TRAIN_SEED0 + i for i in range(cfg.train_iters)], progress=False))
        phases["scale-shift training"] = phases.get("scale-shift training", 0.0) + train_s
        log(f"  trained in {train_s:.1f} s; loss {adapters.losses[0]:.4g} -> {adapters.losses[-1]:.4g}")
        cm_a = fxcache.compile(model, sch, backend=None, scale_shift=adapters)
        cm_speed = fxcache.compile(model, sch, backend=None, scale_shift=adapters)
        losses = list(adapters.losses)
        adapted.append(_cached_row(
            model, cm_a, None, f"{label} + scale-shift", "BlockCache+SS", name, steps, cfg, ref, phases,
            speed_model=cm_speed, threshold=d, computed_fraction=_computed_fraction(cm), train_s=train_s,
            train_iters=cfg.train_iters, train_lr=cfg.train_lr, train_samples=cfg.train_samples, train_losses=losses,
            train_loss_first10=float(np.mean(losses[:10])), train_loss_last10=float(np.mean(losses[-10:]))))
    t0 = time.perf_counter()
    fewer = fewer_rows(model, name, steps, cfg, ref, plain)
    phases["fewer-step rows"] = phases.get("fewer-step rows", 0.0) + time.perf_counter() - t0
    return {"name": name, "units": units, "spread": spread, "profile_s": prof_s, "ref": ref_row, "plain": plain,
            "adapted": adapted, "fewer": fewer, "profile": prof.to_dict()}


def table3(cfg: Config) -> dict:
    t_start = time.perf_counter()
    steps = cfg.steps_for(3)
    data = meta(3, f"Block caching on both models, DDIM {steps} steps, without and with scale-shift adapters",
                cfg, steps)
    data["phases_s"] = phases = {"quality": 0.0, "speed": 0.0}
    data["profile_seeds"], data["train_seed0"] = list(PROFILE_SEEDS), TRAIN_SEED0
    data["models"] = [_block_cache_model(cfg, name, units, steps, ths, phases) for name, units, ths in BLOCK_CONFIGS]
    return _finish(data, t_start, [p["ref"] for p in data["models"]], cfg.out, render3)


def render3(d: dict) -> str:
    cfg = d["config"]
    cols = (("adapter training", lambda r: f"{r['train_s']:.0f} s, {r['train_iters']} it" if "train_s" in r else "–"),
            ("units computed", lambda r: f"{r['computed_fraction']:.0%}" if "computed_fraction" in r else "–"))
    sections = [md_header(d)]
    for p in d["models"]:
        rows = [p["ref"]]
        by_t = {b["threshold"]: b for b in p["adapted"]}
        for a in p["plain"]:
            rows.append(a)
            if a["threshold"] in by_t:
                rows.append(by_t[a["threshold"]])
        rows += p["fewer"]
        units = p["units"] if isinstance(p["units"], str) else ", ".join(p["units"])
        losses = "; ".join(
            f"{r['setting']}: {r['train_loss_first10']:.4g} → {r['train_loss_last10']:.4g}" for r in p["adapted"])
        masks = "\n\n".join(f"{r['setting']}:\n\n```\n{r['mask_text']}\n```" for r in p["plain"] if "mask_text" in r)
        sections += [
            f"## {p['name']}: units {units}",
            md_spread(p["spread"], p["name"]),
            f"Profile: seeds {d['profile_seeds']} x {cfg['profile_samples']} samples, {p['profile_s']:.1f} s. "
            f"Scale-shift adapters: {cfg['train_iters']} iterations of Adam (lr {cfg['train_lr']:g}), each unrolling "
            f"one {cfg['train_samples']}-sample generation (seed {d['train_seed0']}+i). Distillation loss, mean of the "
            f"first 10 iterations → mean of the last 10: {losses or '–'}.",
            md_table(rows, acc=p["name"] == "dit", extra_cols=cols),
            "\n".join(pair_summary(p["plain"], p["fewer"], "Block caching (no adapters)")),
            "\n".join(_adapter_summary(p["plain"], p["adapted"])),
            efficiency_line(rows),
            f"<details><summary>{p['name']}, units {units}: refresh tables (`#` compute, `.` reuse; steps left to right)</summary>"
            f"\n\n{masks}\n\n</details>",
        ]
    return "\n\n".join(sections)


def _adapter_summary(plain: list[dict], adapted: list[dict]) -> list[str]:
    out, better = [], 0
    by_t = {b["threshold"]: b for b in adapted}
    for a in plain:
        b = by_t.get(a["threshold"])
        if b is None:
            continue
        better += b["sqnr_db"] > a["sqnr_db"]
        out.append(f"- {a['setting']}: scale-shift changes SQNR {a['sqnr_db']:.1f} → {b['sqnr_db']:.1f} dB, "
                   f"FID {a['fid']:.1f} → {b['fid']:.1f}, measured speed-up {a['measured']:.2f}x → {b['measured']:.2f}x.")
    if out:
        out.insert(0, f"Scale-shift adapters raise SQNR in {better} of {len(out)} thresholds:")
    return out


def plot3(data: dict, path: Path) -> None:
    """One panel per model and units."""
    plot(data, path, panels=[
        (f"{p['name']}, units {p['units'] if isinstance(p['units'], str) else ', '.join(p['units'])}",
         [p["ref"]] + p["plain"] + p["adapted"] + p["fewer"]) for p in data["models"]])


TABLE = Table(3, table3, render3, "tables_3.png", plot3)

if __name__ == "__main__":
    raise SystemExit(main(None, {3: TABLE}, "python bench/table3_block_caching.py", __doc__.split("\n")[0]))
