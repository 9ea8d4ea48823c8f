"""The harness every table of ``bench/tables.py`` runs on (one module per table beside it).

What the tables share: the run's :class:`Config`; one generation (:func:`gen`), its
quality against the uncached reference (:func:`quality`, :func:`reference`) and the speed
figures (:func:`speed_cached`, :func:`speed_fewer`); the rows and their fewer-step
matches; the Markdown (:func:`md_table`, :func:`md_header`, ...) and the results files
(:func:`meta`, :func:`write`, the hand-written discussion they keep); the charts; and
the command line (:func:`main`, with the provenance check before any measuring), which
``bench/tables.py`` and each ``bench/table{n}_*.py`` call with the :class:`Table` records
they run. How the figures are made: ``bench/results/README.md``.
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
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import fxcache.evaluation.metrics as fxmetrics
from fxcache.artefacts.store import atomic_path, write_text_atomic
from fxcache.evaluation.metrics import class_accuracy, fid_digits, psnr, sqnr
from fxcache.evaluation.provenance import ProvenanceError, source_stamp
from fxcache.evaluation.speed import interleaved_times, measure_speedup
from fxcache.models import generate
from fxcache.runtime import CachedModel

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

DEFAULT_STEPS = {1: 50, 2: 50, 3: 20, 4: 20, 5: 20, 6: 20}
PROFILE_SEEDS = (100, 101, 102)  # never the evaluation seed


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
    compile_samples: int = 4  # table 5: batch of the generations whose graph breaks / recompiles are counted
    count_backend: str = "inductor"  # table 5: torch.compile backend of those counts
    mag_samples: int = 8  # table 5: diffusers' MagCache calibration run
    flux_samples: int = 4  # table 5: batch of the tiny Flux generations
    samples_given: bool = False  # --samples was given (else table 5 uses T5_SAMPLES)
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


def interleaved_ratios(fa: Callable[[], Any], fb: Callable[[], Any], cfg: Config,
                       warmup: bool = False) -> tuple[list[float], list[float], list[float]]:
    """``fa`` and ``fb`` (whole generations) timed in ``cfg.repeats`` interleaved pairs under
    ``cfg.threads`` threads, without autograd, after one call of each if ``warmup``: the
    per-pair time ratios a/b, and the times of a and of b."""
    prev = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.no_grad():
            if warmup:
                fa(), fb()
            ta, tb = interleaved_times([fa, fb], cfg.repeats)
    finally:
        torch.set_num_threads(prev)
    return [a / b for a, b in zip(ta, tb)], ta, tb


def speed_fewer(model, name: str, steps: int, fewer: int, cfg: Config) -> dict:
    """Plain DDIM with ``fewer`` steps against ``steps`` steps: interleaved whole
    generations in this process, median of per-pair time ratios."""
    ratios, ta, tb = interleaved_ratios(lambda: gen(model, name, steps, cfg.speed_samples, cfg.seed),
                                        lambda: gen(model, name, fewer, cfg.speed_samples, cfg.seed), cfg)
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
            _f(r["ideal"], "{:.2f}x"),
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


def write_markdown(n: int, data: dict, out: Path, render: Callable[[dict], str]) -> str:
    """Render table{n}.md from its data with the table's ``render``, keeping the discussion already in the file."""
    path = out / f"table{n}.md"
    kept = discussion(path)
    md = f"{render(data)}\n\n{DISCUSSION_MARK}\n\n{kept or _NO_DISCUSSION}\n"
    write_text_atomic(path, md)  # a failure leaves the previous results, not half a file
    return md


def write(n: int, data: dict, out: Path, render: Callable[[dict], str]) -> None:
    data = _clean(data)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"table{n}.json", json.dumps(data, indent=1, allow_nan=False) + "\n")
    had_discussion = discussion(out / f"table{n}.md") is not None
    print(write_markdown(n, _unclean(data), out, render), flush=True)
    log(f"wrote {out / f'table{n}.md'} and table{n}.json"
        + ("; it keeps the hand-written discussion: reread it against the new figures" if had_discussion else ""))


def standalone_config(ap: argparse.ArgumentParser, args, cfg: Config, default_out: Path) -> Config:
    """For a bench script with its own results file (``--out``, ``--quick``, ``--allow-dirty``):
    where it writes (a temporary folder under ``--quick``), the stamp of the code that runs
    (a dirty tree refused unless allowed, as the tables), and the thread count applied."""
    out = args.out or (Path(tempfile.mkdtemp()) / default_out.name if args.quick else default_out)
    try:
        source = source_stamp(ROOT, allow_dirty=args.allow_dirty or args.quick)
    except ProvenanceError as exc:
        ap.error(str(exc))
    cfg = dataclasses.replace(cfg, out=out, source=source)
    torch.set_num_threads(cfg.threads)
    return cfg


def write_standalone(d: dict, out: Path, render: Callable[[dict], str], t0: float) -> None:
    """Write such a script's JSON and Markdown, with its wall time since ``t0``."""
    d["wall_s"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_clean(d), indent=1))
    out.with_suffix(".md").write_text(render(d) + "\n")
    log(f"wrote {out} and {out.with_suffix('.md')} in {d['wall_s']:.0f} s")


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


# ----------------------------------------------------------------------------- measuring
def _cached_row(model, cm, sch, label, method, name, steps, cfg, ref, phases, speed_model=None, **extra) -> dict:
    t0 = time.perf_counter()
    q, sp, gen_s = eval_cached(model, cm, name, steps, cfg, ref, sch, speed_model=speed_model)
    phases["speed"] += time.perf_counter() - t0 - gen_s
    phases["quality"] += gen_s
    return row(label, method, name, steps, q, sp, gen_s=gen_s, **extra)


def _finish(data: dict, t_start: float, ref_rows: list[dict], out: Path, render: Callable[[dict], str]) -> dict:
    for r in ref_rows:
        data["phases_s"]["quality"] += r["gen_s"]
    data["wall_s"] = time.perf_counter() - t_start
    write(data["table"], data, out, render)
    return data


# ----------------------------------------------------------------------------- plots
def _series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by method, the uncached reference added to each group (speed-up 1)."""
    ref = [r for r in rows if r["method"] == "uncached"]
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] != "uncached":
            out.setdefault(r["method"], list(ref)).append(r)
    return out


def plot(data: dict, path: Path, panels: list[tuple[str, list[dict]]] | None = None) -> None:
    """FID and SQNR against the measured speed-up, one line per method (from the JSON); one
    row of panels per (title, rows), by default one for the table's rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = data["table"]
    if panels is None:
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
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Lay out, write (atomically) and close a chart."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    log(f"plotted {path}")


@dataclass(frozen=True)
class Table:
    """One table as the command line runs it: ``measure`` writes table{n}.json and .md
    (under ``cfg.out``), ``render`` turns that JSON into the Markdown above the discussion,
    ``plot`` draws docs/{figure} from it (``--render --plot``)."""

    n: int
    measure: Callable[[Config], dict]
    render: Callable[[dict], str]
    figure: str
    plot: Callable[[dict, Path], None]


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None, tables: dict[int, Table], prog: str, description: str) -> int:
    """The command line of ``prog`` (``python bench/tables.py`` or one table's module) over ``tables``:
    measure them (after the provenance check) or, with ``--render``, rewrite their Markdown from the JSON."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--table", default="all", choices=[*map(str, tables), "all"],
                    help=argparse.SUPPRESS if len(tables) == 1 else None)  # one table's own module: no choice
    ap.add_argument("--samples", type=int, default=None,
                    help="samples per row for FID/SQNR (default 1024, table 5: 512; quick 32)")
    ap.add_argument("--steps", type=int, default=None,
                    help="DDIM steps of every table (default: 50 for tables 1-2, 20 for tables 3-4; quick 10)")
    ap.add_argument("--quick", action="store_true", help="smoke test: few samples, steps, repeats and iterations")
    ap.add_argument("--speed-samples", type=int, default=None, help="batch of the speed runs (default 16; quick 4)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved pairs per speed figure (default 5; quick 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for everything (default 1)")
    ap.add_argument("--train-iters", type=int, default=None, help="scale-shift iterations (default 100; quick 3)")
    ap.add_argument("--mask-iters", type=int, default=None, help="mask-learning iterations per step (default 100; quick 5)")
    ap.add_argument("--compile-samples", type=int, default=None,
                    help="table 5: batch of the generations whose graph breaks and recompiles are counted (default 4; "
                    "quick 2)")
    ap.add_argument("--count-backend", default=None,
                    help="table 5: torch.compile backend of those counts (default inductor; quick aot_eager)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default bench/results; with --quick a temporary folder)")
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: rewrite table{n}.md from the table{n}.json in --out (e.g. after editing "
                    "the discussion); the header keeps the command that measured the figures")
    ap.add_argument("--plot", action="store_true",
                    help="with --render: also plot FID and SQNR against the measured speed-up to docs/tables_{n}.png "
                    "(table 5: docs/table_5.png, which a measuring run of table 5 also writes)")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="measure although fxcache/, bench/ or scripts/ differ from HEAD (untracked files included); "
                    "the results record the differing files (implied by --quick)")
    args = ap.parse_args(argv)
    which = list(tables) if args.table == "all" else [int(args.table)]
    if args.render:
        out = args.out if args.out is not None else RESULTS
        for n in which:
            path = out / f"table{n}.json"
            if not path.exists():
                log(f"no {path}; nothing to render")
                continue
            data = _unclean(json.loads(path.read_text()))
            write_markdown(n, data, out, tables[n].render)
            log(f"rendered {out / f'table{n}.md'} from {path.name}")
            if args.plot:
                tables[n].plot(data, ROOT / "docs" / tables[n].figure)
        return 0

    q = args.quick
    try:  # before any work: results name the commit whose code produced them
        source = source_stamp(ROOT, allow_dirty=args.allow_dirty or q)
    except ProvenanceError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
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
        compile_samples=pick(args.compile_samples, 4, 2),
        count_backend=pick(args.count_backend, "inductor", "aot_eager"),
        flux_samples=pick(None, 4, 2),
        samples_given=args.samples is not None,
        quick=q,
        out=args.out if args.out is not None else (Path(tempfile.mkdtemp(prefix="fxcache_tables_")) if q else RESULTS),
        command=prog + ("" if not argv else " " + " ".join(argv)),
        source=source,
    )
    torch.set_num_threads(cfg.threads)
    for n in which:
        t0 = time.perf_counter()
        tables[n].measure(cfg)
        log(f"table {n} done in {time.perf_counter() - t0:.0f} s")
    return 0
