"""The four papers' main tables in miniature, on the embedded 16x16 digit models.

    python bench/tables.py [--table 1|2|3|4|all] [--samples N] [--steps T] [--quick] [--allow-dirty]
    python bench/tables.py --render [--plot]        # rewrite the Markdown from the JSON

1. DeepCache on the U-Net against plain DDIM with fewer steps at about the same FLOPs;
2. FORA on the DiT, the same comparison plus class accuracy;
3. block caching on both models, without and with scale-shift adapters;
4. learned timestep-aware block masks on the DiT against FORA at about the same FLOPs.

Each table goes to ``bench/results/table{n}.json`` (every figure, stamped with the commit
that produced it) and ``table{n}.md`` (rendered from the JSON, then a discussion written
by hand, which this driver keeps when it rewrites the file). How the figures are made,
what each column means and how results are stamped: ``bench/results/README.md``.
A measuring run refuses to start from a tree whose fxcache/, bench/ or scripts/ differ
from HEAD unless ``--allow-dirty`` (recorded in the results); ``--quick`` is a smoke test
(few samples and steps, "not a result") writing to a temporary folder unless ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import fxcache
import fxcache.evaluation.metrics as fxmetrics
from fxcache.evaluation.metrics import class_accuracy, fid_digits, psnr, sqnr
from fxcache.evaluation.provenance import ProvenanceError, source_stamp
from fxcache.evaluation.speed import interleaved_times, measure_speedup
from fxcache.models import generate, load
from fxcache.runtime import CachedModel

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

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
#: (λ1 sparsity, λ2 bimodal) settings of table 4, all with λ1 > λ2 (fxcache.LearnedMask).
MASK_SETTINGS: tuple[tuple[float, float], ...] = ((5e-4, 1.5e-4), (1e-3, 3e-4), (3e-3, 1e-3), (1e-2, 3e-3))
DEFAULT_STEPS = {1: 50, 2: 50, 3: 20, 4: 20}
PROFILE_SEEDS = (100, 101, 102)  # never the evaluation seed
TRAIN_SEED0 = 1000  # scale-shift training seeds 1000, 1001, ...
MASK_SEED0 = 2000  # the teacher run of mask learning


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    samples: int = 1024
    steps: int | None = None  # None: DEFAULT_STEPS per table
    seed: int = 0
    speed_samples: int = 16
    repeats: int = 5
    threads: int = 1
    train_iters: int = 100
    train_lr: float = 1e-3
    train_samples: int = 4
    profile_samples: int = 8
    mask_iters: int = 100
    mask_samples: int = 4
    quick: bool = False
    out: Path = RESULTS
    command: str = ""
    source: dict | None = None  # fxcache.evaluation.provenance.source_stamp of the code that runs

    def steps_for(self, table: int) -> int:
        return self.steps if self.steps is not None else DEFAULT_STEPS[table]


def log(msg: str) -> None:
    print(f"[tables {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- helpers
def labels_for(name: str, n: int) -> torch.Tensor | None:
    return torch.arange(n) % 10 if name == "dit" else None


def gen(model, name: str, steps: int, n: int, seed: int) -> torch.Tensor:
    """One whole generation; a CachedModel starts a fresh cache state."""
    if isinstance(model, CachedModel):
        with model.generation():
            return generate(model, num_steps=steps, num_samples=n, seed=seed, class_labels=labels_for(name, n))
    return generate(model, num_steps=steps, num_samples=n, seed=seed, class_labels=labels_for(name, n))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def quality(images: torch.Tensor, ref: torch.Tensor, name: str) -> dict:
    q = {"fid": fid_digits(images), "sqnr_db": sqnr(ref, images), "psnr_db": psnr(ref, images)}
    if name == "dit":
        q["class_acc"] = class_accuracy(images, labels_for(name, images.shape[0]))
    return q


def ideal_over(plan, steps: int) -> tuple[float, int]:
    """FLOP-ideal speed-up of a (bound) plan over ``steps`` steps, and its planned FLOPs."""
    planned = sum(plan.step_flops(s) for s in range(steps))
    return plan.full_flops * steps / planned, planned


def speed_cached(model_or_cm, schedule, name: str, steps: int, cfg: Config) -> dict:
    """measure_speedup's figures (eager, one process) for one cached model."""
    run = lambda m: gen(m, name, steps, cfg.speed_samples, cfg.seed)  # noqa: E731
    rep = measure_speedup(model_or_cm, schedule, run, backend=None, repeats=cfg.repeats, threads=cfg.threads)
    log(f"  speed: ideal {rep.ideal_speedup:.2f}x, predicted {rep.predicted_speedup:.2f}x, "
        f"measured {rep.measured_speedup:.2f}x ({rep.measured_min:.2f}-{rep.measured_max:.2f})")
    d = rep.to_dict()
    return {
        "ideal": rep.ideal_speedup,
        "predicted": rep.predicted_speedup,
        "measured": rep.measured_speedup,
        "measured_min": rep.measured_min,
        "measured_max": rep.measured_max,
        "efficiency": rep.efficiency,
        # the uncached captured graph (eager) vs the module: the share of (2)/(3) that is not caching
        "graph_vs_module": rep.full_step_s / rep.graph_step_s if rep.graph_step_s else None,
        "report": d,
    }


def speed_fewer(model, name: str, steps: int, fewer: int, cfg: Config) -> dict:
    """Plain DDIM with ``fewer`` steps against ``steps`` steps: interleaved whole
    generations in this process, median of per-pair time ratios."""
    fa = lambda: gen(model, name, steps, cfg.speed_samples, cfg.seed)  # noqa: E731
    fb = lambda: gen(model, name, fewer, cfg.speed_samples, cfg.seed)  # noqa: E731
    prev = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.no_grad():
            ta, tb = interleaved_times([fa, fb], cfg.repeats)
    finally:
        torch.set_num_threads(prev)
    ratios = [a / b for a, b in zip(ta, tb)]
    m = statistics.median(ratios)
    log(f"  speed: ideal {steps / fewer:.2f}x, measured {m:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
    return {
        "ideal": steps / fewer,
        "predicted": None,
        "measured": m,
        "measured_min": min(ratios),
        "measured_max": max(ratios),
        "efficiency": None,
        "report": {"pair_ratios": ratios, "full_s": ta, "fewer_s": tb},
    }


def docstring_spread(name: str, n: int, steps: int) -> dict | None:
    """The run-to-run FID spread recorded in fxcache.evaluation.metrics' docstring, if it has a
    line for this model, sample count and number of steps."""
    doc = fxmetrics.__doc__ or ""
    pat = re.compile(
        rf"^\* {name}, {n} samples \(DDIM {steps} steps\) vs all real, seeds \[([^\]]*)\]: ([0-9., ]+?) "
        rf"\(mean ([0-9.]+), std ([0-9.]+)\)(.*)$",
        re.M,
    )
    m = pat.search(doc)
    if not m:
        return None
    floor = re.search(rf"^\* {n} random real digits vs all 1797 real .*$", doc, re.M)
    return {
        "source": "fxcache.evaluation.metrics docstring (python -m fxcache.evaluation.metrics --spread)",
        "seeds": [int(s) for s in m.group(1).split(",")],
        "fid": [float(x) for x in m.group(2).split(",")],
        "mean": float(m.group(3)),
        "std": float(m.group(4)),
        "line": m.group(0).lstrip("* ").strip(),
        "floor_line": floor.group(0).lstrip("* ").strip() if floor else None,
    }


def fid_spread(model, name: str, steps: int, cfg: Config, fid_seed0: float) -> dict:
    found = docstring_spread(name, cfg.samples, steps)
    if found is not None:
        return found
    seeds = [cfg.seed, cfg.seed + 1, cfg.seed + 2]
    fids = [fid_seed0]
    for s in seeds[1:]:
        log(f"  FID spread: uncached {name}, seed {s}")
        fids.append(fid_digits(gen(model, name, steps, cfg.samples, s)))
    return {
        "source": f"measured in this run: uncached {name}, {cfg.samples} samples, DDIM {steps} steps, seeds {seeds}",
        "seeds": seeds,
        "fid": fids,
        "mean": float(np.mean(fids)),
        "std": float(np.std(fids, ddof=1)),
        "line": None,
        "floor_line": None,
    }


def _clean(x):
    """JSON-safe: non-finite floats become strings, tuples lists, numpy scalars floats."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, Path):
        return str(x)
    return x


# ----------------------------------------------------------------------------- rows
def row(setting: str, method: str, model: str, steps: int, q: dict, sp: dict | None, **extra) -> dict:
    r = {"setting": setting, "method": method, "model": model, "steps": steps, **q}
    if sp is None:  # the uncached reference
        r.update({"ideal": 1.0, "predicted": 1.0, "measured": 1.0, "measured_min": None, "measured_max": None,
                  "efficiency": None, "report": None})
    else:
        r.update(sp)
    r.update(extra)
    return r


def eval_cached(model, cm, name, steps, cfg, ref, schedule_for_speed, speed_model=None) -> tuple[dict, dict, float]:
    """Quality on cfg.samples images, then the speed figures; returns (quality, speed, gen_s)."""
    imgs, gen_s = timed(lambda: gen(cm, name, steps, cfg.samples, cfg.seed))
    q = quality(imgs, ref, name)
    log(f"  quality: FID {q['fid']:.2f}, SQNR {q['sqnr_db']:.2f} dB" + (
        f", acc {q['class_acc']:.3f}" if "class_acc" in q else ""))
    sp = speed_cached(speed_model if speed_model is not None else model, schedule_for_speed, name, steps, cfg)
    ideal, planned = ideal_over(cm.plan, steps)
    if abs(ideal - sp["ideal"]) > 1e-6 * ideal:
        log(f"  note: plan ideal {ideal:.4f} vs measured-run ideal {sp['ideal']:.4f}")
    sp["planned_flops"] = planned  # over the whole generation of cfg.samples images
    sp["full_flops"] = cm.plan.full_flops  # one uncached step of cfg.samples images
    sp["planned_gflops_per_sample"] = planned / cfg.samples / 1e9
    return q, sp, gen_s


def eval_fewer(model, name, steps, fewer, cfg, ref) -> tuple[dict, dict, float]:
    imgs, gen_s = timed(lambda: gen(model, name, fewer, cfg.samples, cfg.seed))
    q = quality(imgs, ref, name)
    log(f"  quality: FID {q['fid']:.2f}, SQNR {q['sqnr_db']:.2f} dB" + (
        f", acc {q['class_acc']:.3f}" if "class_acc" in q else ""))
    sp = speed_fewer(model, name, steps, fewer, cfg)
    return q, sp, gen_s


_REFERENCES: dict[tuple, tuple] = {}


def reference(model, name, steps, cfg) -> tuple[torch.Tensor, dict, dict]:
    """The uncached run every row is compared with, and the FID spread; computed once per
    (model, steps, samples, seed) in a process (a repeat returns the same row with gen_s 0)."""
    key = (name, steps, cfg.samples, cfg.seed)
    if key in _REFERENCES:
        ref, r, spread = _REFERENCES[key]
        return ref, {**r, "gen_s": 0.0}, spread
    log(f"{name}: uncached reference, DDIM {steps} steps, {cfg.samples} samples, seed {cfg.seed}")
    ref, gen_s = timed(lambda: gen(model, name, steps, cfg.samples, cfg.seed))
    q = quality(ref, ref, name)
    log(f"  quality: FID {q['fid']:.2f}" + (f", acc {q['class_acc']:.3f}" if "class_acc" in q else ""))
    spread = fid_spread(model, name, steps, cfg, q["fid"])
    _REFERENCES[key] = ref, row(f"uncached, DDIM {steps} steps", "uncached", name, steps, q, None, gen_s=gen_s), spread
    return _REFERENCES[key]


def matched_fewer(steps: int, ideal: float) -> int:
    return max(1, min(steps, round(steps / ideal)))


def fewer_rows(model, name, steps, cfg, ref, cached_rows) -> list[dict]:
    """Plain DDIM with T' = round(T / ideal) for each cached row (one row per T')."""
    out, done = [], {}
    for r in cached_rows:
        tp = matched_fewer(steps, r["ideal"])
        if tp == steps:
            continue
        if tp in done:
            done[tp]["matches"].append(r["setting"])
            continue
        log(f"{name}: DDIM {tp} steps (matches {r['setting']})")
        q, sp, gen_s = eval_fewer(model, name, steps, tp, cfg, ref)
        new = row(f"DDIM {tp} steps", "fewer steps", name, tp, q, sp, gen_s=gen_s, matches=[r["setting"]])
        done[tp] = new
        out.append(new)
    return out


# ----------------------------------------------------------------------------- Markdown
def _f(x, fmt="{:.2f}", none="–"):
    if x is None:
        return none
    if isinstance(x, str):
        return x
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return fmt.format(x)


def md_table(rows: list[dict], acc: bool = False, extra_cols: tuple[tuple[str, Callable[[dict], str]], ...] = ()) -> str:
    head = ["setting", "steps", "FLOP-ideal", "predicted", "measured (range)", "graph/module", "FID ↓", "SQNR dB ↑",
            "PSNR dB ↑"]
    if acc:
        head.append("class acc ↑")
    head += [c for c, _ in extra_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        if r["method"] == "uncached":
            measured = "1 (reference)"
        else:
            measured = f"{r['measured']:.2f}x ({r['measured_min']:.2f}-{r['measured_max']:.2f})"
        cells = [
            r["setting"] + (f" ≈ {', '.join(r['matches'])}" if r.get("matches") else ""),
            str(r["steps"]),
            f"{r['ideal']:.2f}x",
            "–" if r.get("predicted") is None or r["method"] == "uncached" else f"{r['predicted']:.2f}x",
            measured,
            _f(r.get("graph_vs_module"), "{:.2f}x"),
            _f(r["fid"], "{:.1f}"),
            _f(r["sqnr_db"], "{:.1f}"),
            _f(r["psnr_db"], "{:.1f}"),
        ]
        if acc:
            cells.append(_f(r.get("class_acc"), "{:.3f}"))
        cells += [fn(r) for _, fn in extra_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def md_spread(spread: dict, name: str) -> str:
    s = f"FID run-to-run spread ({name}; {spread['source']}): "
    s += f"{', '.join(f'{x:.1f}' for x in spread['fid'])} over seeds {spread['seeds']} (mean {spread['mean']:.1f}, std {spread['std']:.1f})."
    if spread.get("floor_line"):
        s += f" Real-digit floor at this sample count: {spread['floor_line']}."
    return s


def md_code(data: dict) -> str:
    """Which code produced the figures: the stamp of the run (or, for results written
    before stamping, what ``git describe`` said, with why it is not to be trusted)."""
    src = data.get("source")
    if src is None:
        return (f"`git describe --dirty` gave `{data['git']}` (written before results were stamped with the "
                f"producing commit; that command ignores untracked files, so the code that ran may be newer)")
    folders = ", ".join(f"{w}/" for w in src["watched"])
    if src.get("excluded"):
        folders += " outside " + ", ".join(f"{e}/" for e in src["excluded"])
    if src["commit"] is None:
        return f"no commit (not a git checkout; written with --allow-dirty: {src.get('note', '')})"
    if not src["dirty"]:
        return f"commit `{src['commit']}` (no changes under {folders})"
    shown = ", ".join(f"{d['path']} ({d['change']})" for d in src["dirty"][:5])
    more = f" and {len(src['dirty']) - 5} more" if len(src["dirty"]) > 5 else ""
    return (f"commit `{src['commit']}` **plus uncommitted changes** (written with --allow-dirty): "
            f"{shown}{more}")


def md_header(data: dict) -> str:
    cfg, steps = data["config"], data["steps"]
    ph = ", ".join(f"{k} {v:.0f} s" for k, v in data["phases_s"].items())
    return "\n".join([
        f"# Table {data['table']}: {data['title']}",
        "",
        f"- Command: `{cfg['command']}`" + (" (quick smoke test: not a result)" if cfg["quick"] else ""),
        f"- Code: {md_code(data)}; torch {data['torch']}; Python {data['python']}; "
        f"{data['cpus']} CPU cores (shared with other jobs); `torch.set_num_threads({cfg['threads']})`.",
        f"- Quality: {cfg['samples']} samples per row, DDIM {steps} steps (trailing spacing, eta 0), seed "
        f"{cfg['seed']} for every row (paired); FID, SQNR and PSNR against the uncached {steps}-step run, as "
        f"defined in [README.md](README.md#quality).",
        f"- Speed: eager (`backend=None`), {cfg['speed_samples']} samples per generation, {cfg['repeats']} "
        f"interleaved pairs, median (min-max) of per-pair ratios; fewer-step rows: {steps}-step vs T'-step "
        f"generations, FLOP-ideal {steps}/T'; columns defined in [README.md](README.md#speed). Only ratios "
        f"within this process mean anything.",
        f"- Wall time of this table: {data['wall_s']:.0f} s ({ph}).",
    ])


def meta(n: int, title: str, cfg: Config, steps: int) -> dict:
    """What every table's JSON records about the run (the Markdown is rendered from it)."""
    config = {k: v for k, v in vars(cfg).items() if k != "source"}
    return {"table": n, "title": title, "command": cfg.command, "config": config, "steps": steps,
            "source": cfg.source, "torch": torch.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


#: Separates the rendered part of a results file from the discussion written by hand
#: after reading it (invisible in rendered Markdown).
DISCUSSION_MARK = ("<!-- Everything below this line is written by hand after reading the figures above; "
                   "bench/tables.py keeps it when it rewrites this file. -->")
_NO_DISCUSSION = ("### Discussion\n\n(not written yet: compare these figures with the paper's and say why they "
                  "differ)")


def discussion(path: Path) -> str | None:
    """The hand-written discussion of a results file, or None if it has none yet."""
    if not path.exists():
        return None
    text = path.read_text()
    i = text.find(DISCUSSION_MARK)
    return text[i + len(DISCUSSION_MARK):].strip("\n") if i >= 0 else None


def write_markdown(n: int, data: dict, out: Path) -> str:
    """Render table{n}.md from its data, keeping the discussion already in the file."""
    path = out / f"table{n}.md"
    kept = discussion(path)
    md = f"{RENDER[n](data)}\n\n{DISCUSSION_MARK}\n\n{kept or _NO_DISCUSSION}\n"
    path.write_text(md)
    return md


def write(n: int, data: dict, out: Path) -> None:
    data = _clean(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"table{n}.json").write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    had_discussion = discussion(out / f"table{n}.md") is not None
    print(write_markdown(n, _unclean(data), out), flush=True)
    log(f"wrote {out / f'table{n}.md'} and table{n}.json"
        + ("; it keeps the hand-written discussion: reread it against the new figures" if had_discussion else ""))


def _num(x):
    """Back from JSON: the strings 'inf'/'nan' written for non-finite floats."""
    return float(x) if isinstance(x, str) and x in ("inf", "-inf", "nan") else x


def _unclean(x):
    if isinstance(x, dict):
        return {k: _unclean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unclean(v) for v in x]
    return _num(x)


def efficiency_line(rows: list[dict]) -> str:
    """The runtime efficiency (measured / predicted) over the cached rows, DESIGN.md's target 0.97."""
    eff = [r["efficiency"] for r in rows if r.get("efficiency") is not None]
    alone = [r["report"]["efficiency_excl_loop"] for r in rows
             if r.get("efficiency") is not None and (r.get("report") or {}).get("efficiency_excl_loop") is not None]
    if not eff:
        return ""
    s = (f"Runtime efficiency of the cached rows (measured / predicted, DESIGN.md target ≥ 0.97): "
         f"{min(eff):.2f}-{max(eff):.2f}")
    if alone:
        s += f"; without the DDIM loop's own work: {min(alone):.2f}-{max(alone):.2f}"
    return s + "."


def pair_summary(cached: list[dict], fewer: list[dict], what: str) -> list[str]:
    """Computed comparison of each cached row with the fewer-step row matching it."""
    by_match = {m: f for f in fewer for m in f.get("matches", [])}
    lines, wins = [], 0
    for r in cached:
        f = by_match.get(r["setting"])
        if f is None:
            continue
        better_fid = r["fid"] < f["fid"]
        better_sqnr = r["sqnr_db"] > f["sqnr_db"]
        wins += better_fid
        gm = r.get("graph_vs_module")
        alone = f", {r['measured'] / gm:.2f}x without the graph-vs-module share" if gm else ""
        lines.append(
            f"- {r['setting']} (ideal {r['ideal']:.2f}x, measured {r['measured']:.2f}x{alone}) vs {f['setting']} "
            f"(ideal {f['ideal']:.2f}x, measured {f['measured']:.2f}x): FID {r['fid']:.1f} vs {f['fid']:.1f} "
            f"({'cached lower' if better_fid else 'fewer steps lower'}), SQNR {r['sqnr_db']:.2f} vs {f['sqnr_db']:.2f} dB "
            f"({'cached higher' if better_sqnr else 'fewer steps higher'})."
        )
    n = len(lines)
    if n:
        lines.insert(0, f"{what} has the lower FID in {wins} of {n} matched pairs:")
    return lines


# ----------------------------------------------------------------------------- tables
def _cached_row(model, cm, sch, label, method, name, steps, cfg, ref, phases, speed_model=None, **extra) -> dict:
    t0 = time.perf_counter()
    q, sp, gen_s = eval_cached(model, cm, name, steps, cfg, ref, sch, speed_model=speed_model)
    phases["speed"] += time.perf_counter() - t0 - gen_s
    phases["quality"] += gen_s
    return row(label, method, name, steps, q, sp, gen_s=gen_s, **extra)


def _finish(data: dict, t_start: float, ref_rows: list[dict], out: Path) -> dict:
    for r in ref_rows:
        data["phases_s"]["quality"] += r["gen_s"]
    data["wall_s"] = time.perf_counter() - t_start
    write(data["table"], data, out)
    return data


# ---- table 1
def table1(cfg: Config) -> dict:
    t_start = time.perf_counter()
    steps, name, branch = cfg.steps_for(1), "unet", 0
    data = meta(1, f"DeepCache on the digit U-Net (skip branch {branch}), DDIM {steps} steps", cfg, steps)
    data["phases_s"] = phases = {"quality": 0.0, "speed": 0.0}
    model = load(name)
    ref, ref_row, data["spread"] = reference(model, name, steps, cfg)
    schedules = [(f"DeepCache 1:{n} uniform", fxcache.DeepCache(n, branch)) for n in (2, 3, 5, 10)]
    schedules.append(("DeepCache 1:10 non-uniform", fxcache.DeepCache(10, branch, uniform=False, num_steps=steps)))
    cached = []
    for label, sch in schedules:
        log(f"{name}: {label} ({sch!r})")
        cm = fxcache.compile(model, sch, backend=None)
        extra = {"schedule": sch.to_dict()}
        if not sch.uniform:
            from fxcache.schedules import deepcache_full_steps

            extra["full_steps"] = list(deepcache_full_steps(steps, sch.interval, sch.center, sch.power)[0])
        cached.append(_cached_row(model, cm, sch, label, "DeepCache", name, steps, cfg, ref, phases, **extra))
    t0 = time.perf_counter()
    fewer = fewer_rows(model, name, steps, cfg, ref, cached)
    phases["fewer-step rows"] = time.perf_counter() - t0
    data.update(branch=branch, rows=[ref_row] + cached + fewer)
    return _finish(data, t_start, [ref_row], cfg.out)


def render1(d: dict) -> str:
    rows = d["rows"]
    cached = [r for r in rows if r["method"] == "DeepCache"]
    fewer = [r for r in rows if r["method"] == "fewer steps"]
    nu = next((r for r in cached if "full_steps" in r), None)
    return "\n\n".join([
        md_header(d),
        md_spread(d["spread"], "unet"),
        md_table(rows),
        f"DeepCache caches `skip_branch.{d['branch']}` (the shallowest skip connection: a partial step runs only "
        f"conv_in, the first down block's resnet, the last up block and conv_out, and reads the rest from the cache)."
        + (f" Non-uniform 1:10 full steps (Eq. 7, centre 0.3T, power 1.4): {nu['full_steps']}." if nu else ""),
        "\n".join(pair_summary(cached, fewer, "DeepCache")),
        efficiency_line(rows),
    ])


# ---- table 2
def table2(cfg: Config) -> dict:
    t_start = time.perf_counter()
    steps, name = cfg.steps_for(2), "dit"
    data = meta(2, f"FORA on the digit DiT, DDIM {steps} steps, class labels cycling 0-9", cfg, steps)
    data["phases_s"] = phases = {"quality": 0.0, "speed": 0.0}
    model = load(name)
    ref, ref_row, data["spread"] = reference(model, name, steps, cfg)
    cached = []
    for n in (2, 3, 5, 7):
        sch = fxcache.FORA(n)
        log(f"{name}: FORA N={n}")
        cm = fxcache.compile(model, sch, backend=None)
        cached.append(_cached_row(model, cm, sch, f"FORA N={n}", "FORA", name, steps, cfg, ref, phases,
                                  schedule=sch.to_dict()))
    t0 = time.perf_counter()
    fewer = fewer_rows(model, name, steps, cfg, ref, cached)
    phases["fewer-step rows"] = time.perf_counter() - t0
    data["rows"] = [ref_row] + cached + fewer
    return _finish(data, t_start, [ref_row], cfg.out)


def render2(d: dict) -> str:
    rows = d["rows"]
    cached = [r for r in rows if r["method"] == "FORA"]
    fewer = [r for r in rows if r["method"] == "fewer steps"]
    return "\n\n".join([
        md_header(d),
        md_spread(d["spread"], "dit"),
        md_table(rows, acc=True),
        "FORA caches every transformer block's attention (`attn1`) and MLP (`ff`) output; the adaLN-zero gates "
        "and residual additions run at every step (`x = x + gate_t * cached`).",
        "\n".join(pair_summary(cached, fewer, "FORA")),
        efficiency_line(rows),
    ])


# ---- table 3
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
    return _finish(data, t_start, [p["ref"] for p in data["models"]], cfg.out)


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


# ---- table 4
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
    for l1, l2 in MASK_SETTINGS:
        conf = fxcache.LearnedMask(lambda_sparsity=l1, lambda_bimodal=l2, iters=cfg.mask_iters,
                                   units="transformer_block")
        label = f"learned mask λ1={l1:g}, λ2={l2:g}"
        log(f"{name}: {label}: learning ({cfg.mask_iters} iters per step, {cfg.mask_samples} samples)")
        mask, learn_s = timed(lambda: fxcache.learn_mask(
            model, lambda m, s: gen(m, name, steps, cfg.mask_samples, MASK_SEED0 + s), conf, progress=False))
        phases["mask learning"] += learn_s
        log(f"  learned in {learn_s:.1f} s; computed {mask.computed_fraction:.0%}")
        cm = fxcache.compile(model, mask, backend=None)
        learned.append(_cached_row(model, cm, mask, label, "learned mask", name, steps, cfg, ref, phases,
                                   lambda_sparsity=l1, lambda_bimodal=l2, learn_s=learn_s, mask=mask.to_dict(),
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
    return _finish(data, t_start, [ref_row], cfg.out)


def render4(d: dict) -> str:
    cfg, rows = d["config"], d["rows"]
    learned = [r for r in rows if r["method"] == "learned mask"]
    fora = [r for r in rows if r["method"] == "FORA"]
    cols = (("learning", lambda r: f"{r['learn_s']:.0f} s" if "learn_s" in r else "–"),
            ("planned GFLOPs/sample", lambda r: f"{r['planned_gflops_per_sample']:.2f}" if "planned_flops" in r
             else "–"))
    masks = "\n\n".join(f"{r['setting']}:\n\n```\n{r['mask_text']}\n```" for r in learned)
    return "\n\n".join([
        md_header(d),
        md_spread(d["spread"], "dit"),
        f"Masks: `fxcache.learn_mask(model, run, LearnedMask(lambda_sparsity=λ1, lambda_bimodal=λ2, "
        f"iters={cfg['mask_iters']}, units='transformer_block'))`, teacher run of {cfg['mask_samples']} samples "
        f"(seed {d['mask_seed0']}), threshold 0.5, rectified. FORA caches the attention and MLP sublayers (gates and "
        f"residuals recomputed); the masks cache whole transformer blocks. Each mask's FORA interval is the one whose "
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
    return out


TABLES = {1: table1, 2: table2, 3: table3, 4: table4}
RENDER = {1: render1, 2: render2, 3: render3, 4: render4}


# ----------------------------------------------------------------------------- plots
def _series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by method, the uncached reference added to each group (speed-up 1)."""
    ref = [r for r in rows if r["method"] == "uncached"]
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] != "uncached":
            out.setdefault(r["method"], list(ref)).append(r)
    return out


def plot(n: int, data: dict, path: Path) -> None:
    """FID and SQNR against the measured speed-up, one line per method (from the JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if n == 3:
        panels = [(f"{p['name']}, units {p['units'] if isinstance(p['units'], str) else ', '.join(p['units'])}",
                   [p["ref"]] + p["plain"] + p["adapted"] + p["fewer"]) for p in data["models"]]
    else:
        panels = [(data["rows"][0]["model"], data["rows"])]
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for (name, rows), (ax_f, ax_s) in zip(panels, axes):
        for method, rs in _series(rows).items():
            rs = sorted(rs, key=lambda r: r["measured"])
            x = [r["measured"] for r in rs]
            style = "--o" if method == "fewer steps" else "-o"
            ax_f.plot(x, [r["fid"] for r in rs], style, label=method)
            ax_s.plot(x[1:], [r["sqnr_db"] for r in rs[1:]], style, label=method)  # the reference's is inf
        ax_f.set(xlabel="measured speed-up (eager, CPU)", ylabel="FID (digits classifier) ↓", title=name)
        ax_s.set(xlabel="measured speed-up (eager, CPU)", ylabel="SQNR vs uncached, dB ↑", title=name)
        ax_f.set_yscale("log")
        for ax in (ax_f, ax_s):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"Table {n}: {data['title']}\n{data['config']['samples']} samples; {data['config']['command']}",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"plotted {path}")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python bench/tables.py", description=__doc__.split("\n")[0])
    ap.add_argument("--table", default="all", choices=["1", "2", "3", "4", "all"])
    ap.add_argument("--samples", type=int, default=None, help="samples per row for FID/SQNR (default 1024; quick 32)")
    ap.add_argument("--steps", type=int, default=None,
                    help="DDIM steps of every table (default: 50 for tables 1-2, 20 for tables 3-4; quick 10)")
    ap.add_argument("--quick", action="store_true", help="smoke test: few samples, steps, repeats and iterations")
    ap.add_argument("--speed-samples", type=int, default=None, help="batch of the speed runs (default 16; quick 4)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved pairs per speed figure (default 5; quick 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for everything (default 1)")
    ap.add_argument("--train-iters", type=int, default=None, help="scale-shift iterations (default 100; quick 3)")
    ap.add_argument("--mask-iters", type=int, default=None, help="mask-learning iterations per step (default 100; quick 5)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default bench/results; with --quick a temporary folder)")
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: rewrite table{n}.md from the table{n}.json in --out (e.g. after editing "
                    "the discussion); the header keeps the command that measured the figures")
    ap.add_argument("--plot", action="store_true",
                    help="with --render: also plot FID and SQNR against the measured speed-up to docs/tables_{n}.png")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="measure although fxcache/, bench/ or scripts/ differ from HEAD (untracked files included); "
                    "the results record the differing files (implied by --quick)")
    args = ap.parse_args(argv)
    which = [1, 2, 3, 4] if args.table == "all" else [int(args.table)]
    if args.render:
        out = args.out if args.out is not None else RESULTS
        for n in which:
            path = out / f"table{n}.json"
            if not path.exists():
                log(f"no {path}; nothing to render")
                continue
            data = _unclean(json.loads(path.read_text()))
            write_markdown(n, data, out)
            log(f"rendered {out / f'table{n}.md'} from {path.name}")
            if args.plot:
                plot(n, data, ROOT / "docs" / f"tables_{n}.png")
        return 0

    q = args.quick
    try:  # before any work: results name the commit whose code produced them
        source = source_stamp(ROOT, allow_dirty=args.allow_dirty or q)
    except ProvenanceError as exc:
        print(f"python bench/tables.py: error: {exc}", file=sys.stderr)
        return 2
    pick = lambda v, full, quick: v if v is not None else (quick if q else full)  # noqa: E731
    cfg = Config(
        samples=pick(args.samples, 1024, 32),
        steps=pick(args.steps, None, 10),
        seed=args.seed,
        speed_samples=pick(args.speed_samples, 16, 4),
        repeats=pick(args.repeats, 5, 2),
        threads=args.threads,
        train_iters=pick(args.train_iters, 100, 3),
        mask_iters=pick(args.mask_iters, 100, 5),
        quick=q,
        out=args.out if args.out is not None else (Path(tempfile.mkdtemp(prefix="fxcache_tables_")) if q else RESULTS),
        command="python bench/tables.py" + ("" if not argv else " " + " ".join(argv)),
        source=source,
    )
    torch.set_num_threads(cfg.threads)
    for n in which:
        t0 = time.perf_counter()
        TABLES[n](cfg)
        log(f"table {n} done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
