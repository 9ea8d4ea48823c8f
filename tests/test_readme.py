"""The README's Python examples run as written (issue 17): every ```python block is
either executed here, in a fresh namespace and an empty working folder, or listed in
:data:`NOT_RUN` with the reason; a new block must be put in one of the two."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

# (section heading, index of the block in that section) -> why it is not executed here
NOT_RUN = {
    ("Quick start", 1): "needs a diffusers pipeline `pipe` (tests/test_dropin_pipelines.py covers enable/attach)",
    ("The four methods, one example each", 0): "trains adapters and learns a mask with inductor (minutes); it is "
    "docs/methods_example.py, run as a script",
    ("Adaptive caching", 0): "continues the four-methods example (`dit`, `generate`) with the inductor backend",
}
RUN = {("Quick start", 0), ("Forecasting cache reads", 0), ("Residual spans", 0)}


def _blocks() -> dict[tuple[str, int], str]:
    blocks: dict[tuple[str, int], str] = {}
    heading, count = "", {}
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("#").strip()
        elif line.strip() == "```python":
            j = lines.index("```", i + 1)
            k = count.get(heading, 0)
            count[heading] = k + 1
            blocks[(heading, k)] = "\n".join(lines[i + 1: j]) + "\n"
            i = j
        i += 1
    return blocks


def test_every_python_block_is_run_or_says_why_not():
    found = set(_blocks())
    assert found == RUN | set(NOT_RUN), (
        f"README python blocks changed: new {sorted(found - RUN - set(NOT_RUN))}, gone {sorted((RUN | set(NOT_RUN)) - found)}; "
        f"add each to RUN (executed) or NOT_RUN (with the reason)"
    )


@pytest.mark.parametrize("key", sorted(RUN))
def test_readme_example_runs_as_written(key, tmp_path, monkeypatch):
    code = _blocks()[key]
    if "fxcache.models" in code:
        from fxcache import models

        needed = set(re.findall(r'load\("(\w+)"\)', code))
        if not needed <= set(models.available()):
            pytest.skip(f"the embedded models {sorted(needed)} are not all present")
    monkeypatch.chdir(tmp_path)  # anything the example writes lands here
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md: {key[0]} #{key[1]}", "exec"), {"__name__": "__readme__"})
    assert out.getvalue().strip(), "the example prints what it shows"


def test_plan_for_with_forecast_gives_the_cached_models_figures():
    """The README's claim beside the forecasting example: before any call,
    plan_for(...).with_forecast(k) gives what cached.plan gives after the first."""
    import torch

    import fxcache
    from fxcache.testing import tiny

    T = tiny("dit", batch=2)
    cached = fxcache.compile(T.model, fxcache.FORA(interval=3), forecast=2, backend=None)
    with pytest.raises(RuntimeError, match="first call"):
        cached.plan
    args, kwargs = T.inputs(T.timesteps[0])
    before = fxcache.plan_for(T.model, fxcache.FORA(interval=3), *args, **kwargs).with_forecast(2)
    with torch.no_grad():
        T.call(cached, T.timesteps[0])
    assert before.cache_bytes == cached.plan.cache_bytes and before.units == cached.plan.units
