"""Table 6: searched static schedules (fxcache.search) on the digit DiT and U-Net against the other schedules.

    python bench/table6_search.py [--samples N] [--steps T] [--quick] [--allow-dirty] [--render]

(the same as ``python bench/tables.py --table 6``; options and results: bench/harness.py, bench/results/README.md)

At each FLOP budget (FLOP-ideal speed-up over the generation), ``fxcache.search`` finds a
(step x sublayer) table and its forecast order on the calibration seeds ``SEARCH_SEEDS``
(``cfg.profile_samples`` samples each); every row is then judged on the evaluation seed
(``--seed``, never a search seed) with ``--samples`` samples against the uncached run: FID,
SQNR, class accuracy, and the eager speed figures measured in this run. Rows of the other
schedules: FORA/DeepCache (+ forecast) and TaylorSeer's schedule measured here; the
adaptive policies and diffusers' caches from ``table5.json``, and the seed paper's learned
masks (DiT) from ``table4.json``, when they were measured at the same model, seed, samples
and steps (quality is deterministic, so it is the same figure; their speed-ups come from
that run and are marked). On the U-Net the search runs over ``units="deepcache"``; each
budget's best searched row is also generated on two more evaluation seeds for its FID
spread. The target: at every budget the best searched row beats the best other row at
equal or higher measured speed-up by at least 2 dB SQNR.
"""

from __future__ import annotations

import json
import math
import statistics
import time

import torch

import fxcache
from fxcache.models import load

from harness import (PROFILE_SEEDS, RESULTS, Config, Table, _f, _finish, efficiency_line, gen, log, main, md_header,
                     md_table, meta, plot)
from table5_adaptive import _fx_row, _t5_compile, _t5_reference, taylorseer_schedule

T6_BUDGETS = (2.0, 2.5, 3.0)
#: (method, tie): each unit decided alone, or a step mask (tie="step": BudCache's space)
T6_SEARCHES = (("greedy", None), ("anneal", None), ("evolve", None), ("anneal", "step"))
T6_TRANSFER_BUDGET = 2.5  # the searched rows carried to other lengths and classes
T6_TRANSFER_STEPS = (10, 50)
T6_TRANSFER_SAMPLES = 256
T6_CLASSES = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))  # searched on the first, judged on the second
T6_ORDERS = (0, 1, 2)
T6_ITERS = 60  # candidates per forecast order (anneal, evolve)
T6_SAMPLES = 1024  # as table 5, so its rows are the same generations
SEARCH_SEEDS = (300, 301)  # calibration: never the evaluation seed nor table 5's profile seeds
T6_MARGIN_DB = 2.0
assert not set(SEARCH_SEEDS) & set(PROFILE_SEEDS)


def _label(method: str, tie, budget: float) -> str:
    return f"searched {method}{' step mask' if tie == 'step' else ''} {budget:g}x"


def _searched_row(model, name, steps, cfg, ref, phases, budget, method, tie, iters) -> tuple[dict, object]:
    """One search on the calibration seeds, then its row on the evaluation seed."""
    run = lambda m, s: gen(m, name, steps, cfg.profile_samples, s)  # noqa: E731
    log(f"{name}: search {method} (tie {tie}) at {budget:g}x (seeds {SEARCH_SEEDS}, {cfg.profile_samples} samples, "
        f"forecast {T6_ORDERS}, {iters} candidates per order)")
    t0 = time.perf_counter()
    found = fxcache.search(model, run, speedup=budget, seeds=SEARCH_SEEDS, units=T6_UNITS[name], tie=tie,
                           forecast=T6_ORDERS, method=method, iterations=iters, seed=0, progress=False)
    search_s = time.perf_counter() - t0
    phases["search"] = phases.get("search", 0.0) + search_s
    log(f"  found in {search_s:.0f} s ({found.evaluations} candidates): calibration SQNR {found.score:.2f} dB, "
        f"forecast {found.forecast}, ideal {found.ideal_speedup:.2f}x")
    r = _fx_row(model, found, _label(method, tie, budget), f"searched ({method}{', step mask' if tie else ''})",
                name, steps, cfg, ref, phases, forecast=found.forecast, budget=budget, search_method=method,
                search_tie=tie, search_s=search_s, search_evaluations=found.evaluations,
                calibration_sqnr_db=found.score, search_by_order=found.by_order, mask_text=str(found.mask),
                search_seeds=list(SEARCH_SEEDS))
    return r, found


#: rows of table 5 this table measures again (in this run, beside the searched rows)
_REMEASURED = {"dit": ("FORA N=2", "FORA N=3", "TaylorSeer's schedule"), "unet": ("DeepCache 1:2", "DeepCache 1:3")}


def _recorded_rows(table: int, name: str, steps: int, cfg: Config) -> tuple[list[dict], str | None]:
    """Rows of an earlier table (5: the adaptive policies and diffusers' caches; 4: the seed
    paper's learned masks, DiT only) measured at this model, samples, seed and steps: the same
    generations, so the same quality; their speed-ups come from that run (marked, and used on
    the FLOP-ideal basis only)."""
    path = RESULTS / f"table{table}.json"
    if not path.exists():
        return [], f"no bench/results/table{table}.json"
    d = json.loads(path.read_text())
    c = d["config"]
    if (c.get("samples"), c.get("seed"), d.get("steps")) != (cfg.samples, cfg.seed, steps):
        return [], (f"table{table}.json was measured at samples {c.get('samples')}, seed {c.get('seed')}, steps "
                    f"{d.get('steps')}; this run: {cfg.samples}, {cfg.seed}, {steps}")
    if table == 5:
        keep = [r for r in d[name]["rows"] if r["method"] != "uncached"
                and not r["setting"].startswith(_REMEASURED[name])]
    else:
        keep = [r for r in d["rows"] if r["method"] == "learned mask"] if name == "dit" else []
    for r in keep:
        r["method"] = f"table {table}: {r['method']}"
    return keep, None


#: what the search decides per step; on the U-Net DeepCache's skip branches with the layers of the
#: outermost level (searching the branches alone cannot beat DeepCache 1:4 at 3x: +0.6 dB in the
#: first measurement of this table)
T6_UNITS = {"dit": "fora", "unet": "deepcache"}
T6_FID_SEEDS = 2  # further evaluation seeds (seed+1, seed+2) for the FID spread of each budget's best searched row
T6_UNET_SEARCHES = (("greedy", None), ("anneal", None))


def _section(name: str, cfg: Config, steps: int, iters: int, phases: dict) -> dict:
    """One model's rows: searched at every budget, the other schedules, table 5's rows, targets."""
    model = load(name)
    ref, ref_row, spread = _t5_reference(model, name, steps, cfg)
    rows, found = [ref_row], {}
    searches = T6_SEARCHES if name == "dit" else T6_UNET_SEARCHES
    for budget in T6_BUDGETS:
        for method, tie in searches:
            r, found[(budget, method, tie)] = _searched_row(model, name, steps, cfg, ref, phases, budget, method,
                                                            tie, iters)
            rows.append(r)
    t0 = time.perf_counter()
    _fid_spreads(model, name, steps, cfg, rows, found)
    phases["quality"] += time.perf_counter() - t0
    others = []
    if name == "dit":
        for n in (2, 3, 4):
            others.append(_fx_row(model, fxcache.FORA(n), f"FORA N={n}", "FORA", name, steps, cfg, ref, phases))
        for n in (2, 3):
            others.append(_fx_row(model, fxcache.FORA(n), f"FORA N={n} + forecast order 1", "FORA + forecast",
                                  name, steps, cfg, ref, phases, forecast=1))
        for n, o in ((2, 1), (3, 2)):
            sch = taylorseer_schedule(model, name, steps, n, o + 1)
            others.append(_fx_row(model, sch, f"TaylorSeer's schedule (N={n}, warm-up {o + 1}) + forecast order {o}",
                                  "TaylorSeer", name, steps, cfg, ref, phases, forecast=o))
    else:
        for n in (2, 3, 4):
            others.append(_fx_row(model, fxcache.DeepCache(n, 0), f"DeepCache 1:{n}", "DeepCache", name, steps, cfg,
                                  ref, phases))
        for n in (2, 3, 4):
            others.append(_fx_row(model, fxcache.DeepCache(n, 0), f"DeepCache 1:{n} + forecast order 1",
                                  "DeepCache + forecast", name, steps, cfg, ref, phases, forecast=1))
    recorded, why = [], []
    for table in (5, 4) if name == "dit" else (5,):
        got, no = _recorded_rows(table, name, steps, cfg)
        recorded += got
        why.append(no or f"{len(got)} rows from table{table}.json")
    sec = {"spread": spread, "rows": rows + others + recorded,
           "table5_rows": "; ".join(why) + " (quality: the same generations; speed: that run)"}
    if name == "dit":
        best = max((r for r in rows if r.get("budget") == T6_TRANSFER_BUDGET), key=lambda r: r["sqnr_db"])
        t0 = time.perf_counter()
        sec["transfer"] = transfer(model, name, steps, cfg, found[(best["budget"], best["search_method"],
                                                                   best["search_tie"])], best, iters)
        phases["transfer"] = time.perf_counter() - t0
    return sec


def _fid_spreads(model, name: str, steps: int, cfg: Config, rows: list[dict], found: dict) -> None:
    """FID of each budget's best searched row (by SQNR) on ``T6_FID_SEEDS`` more evaluation
    seeds, as the uncached reference's spread is measured: ``row["fid_seeds"]``/``["fid_all"]``."""
    from fxcache.evaluation.metrics import fid_digits

    seeds = [cfg.seed + 1 + i for i in range(T6_FID_SEEDS)]
    assert not set(seeds) & set(SEARCH_SEEDS)
    for budget in T6_BUDGETS:
        mine = [r for r in rows if r.get("budget") == budget]
        if not mine:
            continue
        best = max(mine, key=lambda r: r["sqnr_db"])
        f = found[(budget, best["search_method"], best["search_tie"])]
        cm, fids = _t5_compile(model, f, steps, forecast=f.forecast), [best["fid"]]
        for s in seeds:  # gen starts a fresh generation of the CachedModel each time
            log(f"{name}: FID spread of '{best['setting']}', seed {s}")
            fids.append(fid_digits(gen(cm, name, steps, cfg.samples, s)))
        best["fid_seeds"], best["fid_all"] = [cfg.seed, *seeds], fids


def _fid_text(sec: dict) -> str:
    rows = [r for r in sec["rows"] if "fid_all" in r]
    if not rows:
        return "FID seed spread of the searched rows: not measured in this run."
    sp = sec["spread"]
    lines = [f"FID seed spread (each seed {rows[0]['fid_seeds']} a whole run of the row's sample count; "
             f"mean ± sample std):", ""]
    for r in rows:
        f = r["fid_all"]
        lines.append(f"- {r['setting']}: {', '.join(f'{x:.1f}' for x in f)} ({statistics.mean(f):.1f} ± "
                     f"{statistics.stdev(f):.1f})")
    lines.append(f"- uncached: {', '.join(f'{x:.1f}' for x in sp['fid'])} over seeds {sp['seeds']} "
                 f"({sp['mean']:.1f} ± {sp['std']:.1f})")
    return "\n".join(lines)


def table6(cfg: Config) -> dict:
    t_start = time.perf_counter()
    if not cfg.samples_given and not cfg.quick:
        cfg = Config(**{**cfg.__dict__, "samples": T6_SAMPLES})
    steps = cfg.steps_for(6)
    iters = 4 if cfg.quick else T6_ITERS
    data = meta(6, f"Searched static schedules on the digit DiT and U-Net vs the other schedules, DDIM {steps} "
                   f"steps", cfg, steps)
    data["phases_s"] = phases = {"quality": 0.0, "speed": 0.0, "search": 0.0}
    data["settings"] = {"budgets": list(T6_BUDGETS), "searches": [list(x) for x in T6_SEARCHES],
                        "unet_searches": [list(x) for x in T6_UNET_SEARCHES], "units": T6_UNITS,
                        "orders": list(T6_ORDERS), "iterations": iters, "search_seeds": list(SEARCH_SEEDS),
                        "search_samples": cfg.profile_samples, "margin_db": T6_MARGIN_DB}
    for name in ("dit", "unet"):
        data[name] = _section(name, cfg, steps, iters, phases)
    return _finish(data, t_start, [data["dit"]["rows"][0], data["unet"]["rows"][0]], cfg.out, render6)


def _quality(model, schedule, steps: int, n: int, seed: int, labels, forecast: int = 0) -> tuple[float, float]:
    """SQNR against the uncached run at this length and these labels, and the FLOP-ideal
    speed-up of the plan over the generation (no timing: the transfer rows judge quality)."""
    from fxcache.evaluation.metrics import sqnr
    from fxcache.models import generate

    kw = {"forecast": forecast} if forecast else {}
    cm = fxcache.compile(model, schedule, backend=None, num_steps=steps, verbose=False, **kw)
    ys = [labels[i % len(labels)] for i in range(n)]
    with torch.no_grad():
        ref = generate(model, num_steps=steps, num_samples=n, seed=seed, class_labels=ys)
        out = generate(cm, num_steps=steps, num_samples=n, seed=seed, class_labels=ys)
    return sqnr(ref, out), cm.plan.ideal_speedup


def _fora_like(model, steps: int, ideal: float) -> int:
    """The FORA interval whose FLOP-ideal speed-up over ``steps`` is closest to ``ideal``."""
    c = model.config
    x = torch.zeros(1, c.in_channels, c.sample_size, c.sample_size)
    call = {"timestep": torch.tensor([999]), "class_labels": torch.tensor([0])}
    best, best_d = 1, math.inf
    for n in range(1, steps + 1):
        plan = fxcache.plan_for(model, fxcache.FORA(n), x, num_steps=steps, **call)
        d = abs(math.log(plan.ideal_speedup_over(steps) / ideal))
        if d < best_d:
            best, best_d = n, d
    return best


def transfer(model, name: str, steps: int, cfg: Config, found, best: dict, iters: int) -> dict:
    """Generalisation of the best searched row at ``T6_TRANSFER_BUDGET``: to other lengths
    (``found.mask_for(T)``, the table stretched), against a search at that length and FORA at
    the closest FLOPs with the same forecast order; and from one class set to another."""
    n, seed = T6_TRANSFER_SAMPLES if not cfg.quick else 8, cfg.seed
    all_labels = list(range(10))
    out = {"row": best["setting"], "forecast": found.forecast, "samples": n, "lengths": [], "classes": None}
    for T in T6_TRANSFER_STEPS:
        if cfg.quick:
            T = max(4, T // 5)
        log(f"{name}: transfer of '{best['setting']}' to {T} steps")
        run = lambda m, s, T=T: gen(m, name, T, cfg.profile_samples, s)  # noqa: E731
        direct = fxcache.search(model, run, speedup=T6_TRANSFER_BUDGET, seeds=SEARCH_SEEDS, units="fora",
                                tie=found.tie, forecast=(found.forecast,), method=found.method, iterations=iters,
                                seed=0, progress=False)
        stretched = found.mask_for(T)
        sq_s, id_s = _quality(model, stretched, T, n, seed, all_labels, found.forecast)
        sq_d, id_d = _quality(model, direct, T, n, seed, all_labels, found.forecast)
        k = _fora_like(model, T, id_s)
        sq_f, id_f = _quality(model, fxcache.FORA(k), T, n, seed, all_labels, found.forecast)
        out["lengths"].append({"steps": T, "stretched": [sq_s, id_s], "searched_here": [sq_d, id_d],
                               "fora": [sq_f, id_f, k]})
        log(f"  stretched {sq_s:.1f} dB at {id_s:.2f}x; searched at {T}: {sq_d:.1f} dB at {id_d:.2f}x; FORA N={k}: "
            f"{sq_f:.1f} dB at {id_f:.2f}x")
    a, b = T6_CLASSES
    log(f"{name}: class transfer: searched on classes {a}, judged on {b}")

    def on(labels):
        from fxcache.models import generate

        return lambda m, s: generate(m, num_steps=steps, num_samples=cfg.profile_samples, seed=s,  # noqa: E731
                                     class_labels=[labels[i % len(labels)] for i in range(cfg.profile_samples)])

    kw = dict(speedup=T6_TRANSFER_BUDGET, seeds=SEARCH_SEEDS, units="fora", tie=found.tie,
              forecast=(found.forecast,), method=found.method, iterations=iters, seed=0, progress=False)
    on_a = fxcache.search(model, on(a), **kw)
    on_b = fxcache.search(model, on(b), **kw)
    sq_ab, id_ab = _quality(model, on_a, steps, n, seed, list(b), found.forecast)
    sq_bb, id_bb = _quality(model, on_b, steps, n, seed, list(b), found.forecast)
    out["classes"] = {"searched_on": list(a), "judged_on": list(b), "other_set": [sq_ab, id_ab],
                      "same_set": [sq_bb, id_bb]}
    log(f"  searched on {a}: {sq_ab:.1f} dB on {b}; searched on {b}: {sq_bb:.1f} dB")
    return out


#: the two bases of the target: the issue's (measured speed-up, rows timed in this run only:
#: measured speed-ups of two runs are not comparable, see the README of the results) and
#: FLOP-ideal (every row, tables 5's and 4's included: a plan's FLOPs do not depend on the run)
T6_BASES = ("measured", "ideal")


def _timed_here(r: dict) -> bool:
    return not r["method"].startswith(("table 5:", "table 4:"))


def targets6(rows: list[dict]) -> dict:
    """Per budget and basis: the searched row with the largest margin over the best other row
    at equal or higher speed-up on that basis."""
    out = {"margin_db": T6_MARGIN_DB, "bases": list(T6_BASES), "budgets": []}
    searched = [r for r in rows if r.get("budget") is not None]
    others = [r for r in rows if r.get("budget") is None and r["method"] != "uncached"]
    for b in T6_BUDGETS:
        mine = [r for r in searched if r["budget"] == b]
        if not mine:
            continue
        entry = {"budget": b}
        for basis in T6_BASES:
            # FLOP-ideal: rows with a plan (diffusers' hooks have none: their quality is listed above)
            pool = [r for r in others if (basis == "ideal" and r["ideal"] is not None) or
                    (basis == "measured" and _timed_here(r))]
            best = None
            for r in mine:
                rivals = [o for o in pool if o[basis] >= r[basis]]
                rival = max(rivals, key=lambda o: o["sqnr_db"]) if rivals else None
                margin = r["sqnr_db"] - rival["sqnr_db"] if rival else math.inf
                if best is None or margin > best[2]:
                    best = (r, rival, margin)
            r, rival, margin = best
            # with no rival as fast: the fastest other row, slower (and what the row gains on it)
            fastest = max(pool, key=lambda o: (o[basis], o["sqnr_db"])) if rival is None and pool else None
            if fastest is not None:
                entry[basis + "_fastest"] = {"setting": fastest["setting"], "sqnr_db": fastest["sqnr_db"],
                                             "speedup": fastest[basis], "margin_db": r["sqnr_db"] - fastest["sqnr_db"]}
            entry[basis] = {"best": r["setting"], "sqnr_db": r["sqnr_db"], "speedup": r[basis],
                            "rival": rival["setting"] if rival else None,
                            "rival_sqnr_db": rival["sqnr_db"] if rival else None,
                            "rival_speedup": rival[basis] if rival else None,
                            "margin_db": None if rival is None else margin, "met": margin >= T6_MARGIN_DB}
        out["budgets"].append(entry)
    return out


def _targets_text(t: dict) -> str:
    lines = [f"Targets: at each budget, the searched row with the largest margin over the best other row at equal "
             f"or higher speed-up (target ≥ {t['margin_db']:g} dB SQNR); measured: rows timed in this run; "
             f"FLOP-ideal: every row with a plan, rows recorded from earlier tables included (diffusers' hooks "
             f"have no plan).", ""]
    for e in t["budgets"]:
        for basis in t["bases"]:
            x, word = e[basis], "measured" if basis == "measured" else "FLOP-ideal"
            if x["rival"] is None:
                f = e.get(f"{basis}_fastest")
                also = (f" (the fastest other row, {f['setting']}, has {f['sqnr_db']:.1f} dB at {f['speedup']:.2f}x: "
                        f"{f['margin_db']:+.1f} dB)" if f else "")
                lines.append(f"- {e['budget']:g}x, {word}: {x['best']} {x['sqnr_db']:.1f} dB at {x['speedup']:.2f}x; "
                             f"no other row at that speed-up or higher{also}: met")
            else:
                lines.append(f"- {e['budget']:g}x, {word}: {x['best']} {x['sqnr_db']:.1f} dB at {x['speedup']:.2f}x "
                             f"against {x['rival']} {x['rival_sqnr_db']:.1f} dB at {x['rival_speedup']:.2f}x: "
                             f"margin {x['margin_db']:+.1f} dB: {'met' if x['met'] else 'NOT met'}")
    return "\n".join(lines)


def render6(d: dict) -> str:
    s = d["settings"]
    parts = [md_header(d),
             f"Search: `fxcache.search(model, run, speedup=B, seeds={tuple(s['search_seeds'])}, units=U, "
             f"forecast={tuple(s['orders'])}, method=M, iterations={s['iterations']})` with U = "
             f"{', '.join(f'`{v}` ({k})' for k, v in s['units'].items())}, {s['search_samples']} samples per "
             f"calibration seed; every row judged on seed {d['config']['seed']} with {d['config']['samples']} "
             f"samples against the uncached run."]
    for name, title in (("dit", "DiT"), ("unet", "U-Net")):
        if name in d:
            parts.append(_render_section(d[name], title))
    return "\n\n".join(parts)


def _render_section(sec: dict, title: str) -> str:
    rows = sec["rows"]
    cols = (("search", lambda r: f"{r['search_s']:.0f} s, {r['search_evaluations']} cand." if "search_s" in r
             else "–"),
            ("calib. SQNR", lambda r: _f(r.get("calibration_sqnr_db"), "{:.1f}")),
            ("forecast", lambda r: str(r.get("forecast", 0))))
    masks = "\n\n".join(f"{r['setting']} (forecast order {r['forecast']}):\n\n```\n{r['mask_text']}\n```"
                         for r in rows if "mask_text" in r and r.get("budget") is not None)
    out = [f"## {title}", f"Other rows: {sec['table5_rows']}.", md_table(rows, acc=title == "DiT", extra_cols=cols),
           _targets_text(targets6(rows)), _fid_text(sec)]
    if "transfer" in sec:
        out.append(_transfer_text(sec["transfer"]))
    out += [efficiency_line(rows), f"Searched tables (`#` compute, `.` reuse; steps left to right):\n\n{masks}"]
    return "\n\n".join(out)


def _transfer_text(t: dict | None) -> str:
    if not t:
        return "Generalisation: not measured in this run."
    lines = [f"Generalisation of '{t['row']}' (forecast order {t['forecast']}; SQNR on seed 0, {t['samples']} "
             f"samples; FLOP-ideal speed-up of each plan). A searched table is a plan for its own length: "
             f"another length is refused in a pipeline, so it is carried over explicitly with "
             f"`found.mask_for(T)` (each step follows the searched row at the same relative position):", "",
             "| steps | stretched from the searched table | searched at this length | FORA (same forecast) |",
             "|---|---|---|---|"]
    for x in t["lengths"]:
        lines.append(f"| {x['steps']} | {x['stretched'][0]:.1f} dB at {x['stretched'][1]:.2f}x | "
                     f"{x['searched_here'][0]:.1f} dB at {x['searched_here'][1]:.2f}x | N={x['fora'][2]}: "
                     f"{x['fora'][0]:.1f} dB at {x['fora'][1]:.2f}x |")
    c = t["classes"]
    lines += ["", f"Classes: searched on {c['searched_on']}, judged on {c['judged_on']}: {c['other_set'][0]:.1f} dB "
                  f"at {c['other_set'][1]:.2f}x, against {c['same_set'][0]:.1f} dB at {c['same_set'][1]:.2f}x for "
                  f"the table searched on {c['judged_on']} itself."]
    return "\n".join(lines)


def plot6(data: dict, path) -> None:
    """SQNR and FID against the measured speed-up, one panel row per model, rows timed in
    this run only (the recorded rows of tables 4 and 5 were timed in other runs)."""
    def lines(rows):  # one line per family of schedule (searched by method, FORA, DeepCache, ...)
        return [{**r, "method": r.get("family") or r["method"]} for r in rows if _timed_here(r)]

    plot(data, path, [(title, lines(data[name]["rows"])) for name, title in (("dit", "DiT"), ("unet", "U-Net"))
                      if name in data])


TABLE = Table(6, table6, render6, "tables_6.png", plot6)

if __name__ == "__main__":
    raise SystemExit(main(None, {6: TABLE}, "python bench/table6_search.py", __doc__.split("\n")[0]))
