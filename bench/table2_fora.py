"""Table 2: FORA on the digit DiT against plain DDIM with fewer steps at about the same FLOPs, with class accuracy.

    python bench/table2_fora.py [--samples N] [--steps T] [--quick] [--allow-dirty] [--render [--plot]]

(the same as ``python bench/tables.py --table 2``; options and results: bench/harness.py, bench/results/README.md)
"""

from __future__ import annotations

import time

import fxcache
from fxcache.models import load

from harness import (Config, Table, _cached_row, _finish, efficiency_line, fewer_rows, log, main, md_header,
                     md_spread, md_table, meta, pair_summary, plot, reference)


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
    return _finish(data, t_start, [ref_row], cfg.out, render2)


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


TABLE = Table(2, table2, render2, "tables_2.png", plot)

if __name__ == "__main__":
    raise SystemExit(main(None, {2: TABLE}, "python bench/table2_fora.py", __doc__.split("\n")[0]))
