"""Table 1: DeepCache on the digit U-Net against plain DDIM with fewer steps at about the same FLOPs.

    python bench/table1_deepcache.py [--samples N] [--steps T] [--quick] [--allow-dirty] [--render [--plot]]

(the same as ``python bench/tables.py --table 1``; options and results: bench/harness.py, bench/results/README.md)
"""

from __future__ import annotations

import time

import fxcache
from fxcache.models import load

from harness import (Config, Table, _cached_row, _finish, efficiency_line, fewer_rows, log, main, md_header,
                     md_spread, md_table, meta, pair_summary, plot, reference)


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
    return _finish(data, t_start, [ref_row], cfg.out, render1)


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


TABLE = Table(1, table1, render1, "tables_1.png", plot)

if __name__ == "__main__":
    raise SystemExit(main(None, {1: TABLE}, "python bench/table1_deepcache.py", __doc__.split("\n")[0]))
