"""The four papers' main tables in miniature, on the embedded 16x16 digit models.

    python bench/tables.py [--table 1|2|3|4|5|6|all] [--samples N] [--steps T] [--quick] [--allow-dirty]
    python bench/tables.py --render [--plot]        # rewrite the Markdown from the JSON

1. DeepCache on the U-Net against plain DDIM with fewer steps at about the same FLOPs;
2. FORA on the DiT, the same comparison plus class accuracy;
3. block caching on both models, without and with scale-shift adapters;
4. learned timestep-aware block masks on the DiT against FORA at about the same FLOPs;
5. fxcache's adaptive policies (FirstBlockCache, TeaCache, MagCache, AdaptiveDeepCache) and
   forecasting against diffusers' own caches (bench/peers.py) on the same models: quality
   against measured speed-up, graph breaks and recompiles under inductor; targets asserted
   in bench/test_table5.py. Also plots docs/table_5.png.

Each table goes to ``bench/results/table{n}.json`` (every figure, stamped with the commit
that produced it) and ``table{n}.md`` (rendered from the JSON, then a discussion written
by hand, which this driver keeps when it rewrites the file). How the figures are made,
what each column means and how results are stamped: ``bench/results/README.md``.
A measuring run refuses to start from a tree whose fxcache/, bench/ or scripts/ differ
from HEAD unless ``--allow-dirty`` (recorded in the results); ``--quick`` is a smoke test
(few samples and steps, "not a result") writing to a temporary folder unless ``--out``.

This file is the driver: each table is a module beside it, with its measuring and rendering
(``table1_deepcache.py``, ``table2_fora.py``, ``table3_block_caching.py``,
``table4_learned_masks.py``, ``table5_adaptive.py``, ``table6_search.py``: each also runs alone, ``python
bench/table3_block_caching.py --quick``), over the shared harness ``harness.py`` (the
configuration, generation, quality and speed figures, rows, Markdown, results files,
charts and this command line).
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # the table modules sit beside this file, however it was loaded
    sys.path.insert(0, _HERE)

import harness  # noqa: E402
import table1_deepcache  # noqa: E402
import table2_fora  # noqa: E402
import table3_block_caching  # noqa: E402
import table4_learned_masks  # noqa: E402
import table5_adaptive  # noqa: E402
import table6_search  # noqa: E402

TABLES = {t.n: t for t in (table1_deepcache.TABLE, table2_fora.TABLE, table3_block_caching.TABLE,
                           table4_learned_masks.TABLE, table5_adaptive.TABLE, table6_search.TABLE)}


def main(argv: list[str] | None = None) -> int:
    return harness.main(argv, TABLES, "python bench/tables.py", __doc__.split("\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
