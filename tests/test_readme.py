"""The documentation's Python examples run as written (issues 17 and 20): every ```python
block in README.md and docs/*.md is either executed here, in a fresh namespace and an
empty working folder, or listed in :data:`NOT_RUN` with the reason; a new block must be
put in one of the two. Every relative link in those files points to a file that exists
(and, for a ``#anchor`` into a Markdown file, to one of its headings)."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# the README is the front page; the design detail lives in docs/ (issue 20)
README_MAX_LINES = 160


def _doc_files() -> list[pathlib.Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def _name(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


# (file, section heading, index of the block in that section) -> why it is not executed here
NOT_RUN = {
    ("docs/warm_start.md", "Warm start: reuse compiled step graphs in a new process", 0): "a fragment (`model`) that "
    "compiles with inductor and AOTInductor (minutes); tests/test_warm_start.py runs the same in fresh processes",
    ("docs/usage.md", "Quick start", 1): "needs a diffusers pipeline `pipe` (tests/test_dropin_pipelines.py covers "
    "enable/attach; the README's U-Net recipe runs one)",
    ("docs/schedules.md", "The four methods, one example each", 0): "trains adapters and learns a mask with inductor "
    "(minutes); it is docs/methods_example.py, run as a script",
    ("docs/schedules.md", "Adaptive caching", 0): "continues the four-methods example (`dit`, `generate`) with the "
    "inductor backend",
}
RUN = {
    ("README.md", "Recipes", 0),  # a U-Net pipeline with DeepCache
    ("README.md", "Recipes", 1),  # a transformer with FORA
    ("README.md", "Recipes", 2),  # an adaptive schedule, decisions()
    ("docs/usage.md", "Quick start", 0),
    ("docs/schedules.md", "Forecasting cache reads", 0),
    ("docs/schedules.md", "Residual spans", 0),
    ("docs/schedules.md", "Searched schedules", 0),
}


def _scan(path: pathlib.Path):
    """Yield ("heading", text) for each heading outside code fences, ("block", (info, code))
    for each fenced block and ("text", line) for each line of prose."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^(\s*)(`{3,}|~{3,})(.*)$", line)
        if fence:
            marker = fence.group(2)
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(marker):
                j += 1
            yield "block", (fence.group(3).strip(), "\n".join(lines[i + 1: j]) + "\n")
            i = j + 1
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            yield "heading", heading.group(1)
        else:
            yield "text", line
        i += 1


def _blocks() -> dict[tuple[str, str, int], str]:
    blocks: dict[tuple[str, str, int], str] = {}
    for path in _doc_files():
        heading, count = "", {}
        for kind, value in _scan(path):
            if kind == "heading":
                heading = value
            elif kind == "block" and value[0] == "python":
                k = count.get(heading, 0)
                count[heading] = k + 1
                blocks[(_name(path), heading, k)] = value[1]
    return blocks


def test_every_python_block_is_run_or_says_why_not():
    found = set(_blocks())
    assert not RUN & set(NOT_RUN)
    assert found == RUN | set(NOT_RUN), (
        f"python blocks in README.md / docs/*.md changed: new {sorted(found - RUN - set(NOT_RUN))}, "
        f"gone {sorted((RUN | set(NOT_RUN)) - found)}; add each to RUN (executed) or NOT_RUN (with the reason)"
    )


def test_the_readme_recipes_are_run():
    assert {key for key in _blocks() if key[0] == "README.md"} <= RUN


@pytest.mark.parametrize("key", sorted(RUN))
def test_example_runs_as_written(key, tmp_path, monkeypatch):
    code = _blocks()[key]
    if "fxcache.models" in code:
        from fxcache import models

        needed = set(re.findall(r'load\("(\w+)"\)', code))
        if not needed <= set(models.available()):
            pytest.skip(f"the embedded models {sorted(needed)} are not all present")
    monkeypatch.chdir(tmp_path)  # anything the example writes lands here
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"{key[0]}: {key[1]} #{key[2]}", "exec"), {"__name__": "__readme__"})
    assert out.getvalue().strip(), "the example prints what it shows"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for kind, value in _scan(path):
        if kind == "heading":
            slug = _slug(value)
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: pathlib.Path):
    for kind, value in _scan(path):
        if kind in ("text", "heading"):
            prose = re.sub(r"`[^`]*`", "", value)  # no links inside inline code
            for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose):
                yield target


def test_every_relative_link_points_to_a_file_that_exists():
    bad, checked = [], 0
    for path in _doc_files():
        for target in _links(path):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            checked += 1
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                bad.append(f"{_name(path)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{_name(path)}: {target} (no heading #{anchor} in {dest.name})")
    assert checked > 10
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [there](missing.md), [here](#title), [nope](#other) and `[code](x.md)`.\n"
                    "```\n[in a fence](gone.md)\n```\n")
    assert list(_links(page)) == ["missing.md", "#title", "#other"]
    assert _anchors(page) == {"title"}
    assert _slug("Using fxcache: `enable` and `compile`") == "using-fxcache-enable-and-compile"
    assert _slug("When does a new generation start?") == "when-does-a-new-generation-start"


def test_the_readme_is_a_front_page():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines: put design detail in docs/ (issue 20)"


def test_plan_for_with_forecast_gives_the_cached_models_figures():
    """docs/schedules.md's claim beside the forecasting example: before any call,
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
