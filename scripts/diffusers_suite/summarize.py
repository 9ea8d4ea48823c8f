"""Summarise a diffusers-suite run (``scripts/diffusers_suite.sh``) into a Markdown report.

    python summarize.py RESULTS_DIR MODE PIPELINE [PIPELINE ...] > results.md

For each pipeline it reads ``RESULTS_DIR/<pipeline>.off.xml`` (the run without fxcache),
``RESULTS_DIR/<pipeline>.<MODE>.xml`` (the run with the plugin), the plugin's events
``RESULTS_DIR/<pipeline>.<MODE>.events.jsonl`` and ``RESULTS_DIR/<pipeline>.<run>.status``
(the exit code, ``timeout`` when the run was killed).
"""

from __future__ import annotations

import collections
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _one_line(text: str | None) -> str:
    text = (text or "").strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return ""


def read_junit(path: Path) -> dict[str, tuple[str, str]] | None:
    """{test id: (outcome, one-line message)}, outcome in passed/failed/error/skipped."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    out: dict[str, tuple[str, str]] = {}
    for case in root.iter("testcase"):
        tid = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, msg = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                # an error in teardown after a pass still makes the test not pass
                outcome = "failed" if child.tag == "failure" else "error"
                msg = _one_line(child.get("message")) or _one_line(child.text)
                break
            if child.tag == "skipped":
                outcome, msg = "skipped", _one_line(child.get("message"))
        out[tid] = (outcome, msg)
    return out


def read_events(path: Path) -> dict[str, dict]:
    events: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                ev = json.loads(line)
                # junit ids are "dotted.module.Class::name"; event ids are pytest node ids
                events[ev["test"]] = ev
    return events


def nodeid_to_junit(nodeid: str) -> str:
    parts = nodeid.split("::")
    module = parts[0].removesuffix(".py").replace("/", ".")
    return "::".join([".".join([module] + parts[1:-1]), parts[-1]])


def _cause(msg: str) -> str:
    """A grouping key for an error message: the exception type and its text with numbers
    and quoted names blanked."""
    msg = re.sub(r"0x[0-9a-f]+", "0x…", msg)
    msg = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", msg)
    msg = re.sub(r"'[^']*'", "'…'", msg)
    return msg[:160]


def status(results: Path, pipe: str, run: str) -> str:
    p = results / f"{pipe}.{run}.status"
    return p.read_text().strip() if p.exists() else "missing"


def main(results: Path, mode: str, pipes: list[str]) -> str:
    lines = [
        f"# diffusers fast pipeline tests with fxcache (`{mode}` schedule)",
        "",
        "Baseline = the same tests, same stand-ins, without fxcache. *pass w/o*: tests passing without "
        "fxcache; *pass with*: of those, passing with fxcache; *refused*: tests in which fxcache raised an "
        "`FxcacheError` and the plugin detached it (`fxcache.disable`); *cached*: tests in which a cached "
        "denoiser actually ran; *hooked*: tests in which a denoiser with fxcache attached ran while "
        "diffusers'/accelerate's hooks were on it (fxcache steps aside then; not checked); *bit-exact "
        "calls*: cached denoiser calls checked equal to the plain model (full schedule only).",
        "",
        ("Run: " + (results / "run.txt").read_text().strip()) if (results / "run.txt").exists() else "",
        "",
        "| pipeline | tests | pass w/o | pass with | broken (pass w/o, fail with) | fixed | refused | cached | hooked | "
        "bit-exact calls (checked / mismatching tests) | runs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    broken_all: list[tuple[str, str, str]] = []
    refusals_all: list[tuple[str, str, dict]] = []
    switches_all: list[tuple[str, dict]] = []
    totals = collections.Counter()
    for pipe in pipes:
        base = read_junit(results / f"{pipe}.off.xml")
        withf = read_junit(results / f"{pipe}.{mode}.xml")
        events = read_events(results / f"{pipe}.{mode}.events.jsonl")
        runs = f"off: {status(results, pipe, 'off')}, {mode}: {status(results, pipe, mode)}"
        if base is None or withf is None:
            lines.append(f"| {pipe} | - | - | - | - | - | - | - | - | - | {runs} (no junit report) |")
            continue
        ev_by_junit = {nodeid_to_junit(k): v for k, v in events.items()}
        passed_base = {t for t, (o, _) in base.items() if o == "passed"}
        passed_with = {t for t, (o, _) in withf.items() if o == "passed"}
        refused = {t for t, ev in ev_by_junit.items() if ev.get("refusals")}
        cached = {t for t, ev in ev_by_junit.items() if ev.get("cached_calls")}
        hooked = {t for t, ev in ev_by_junit.items() if ev.get("hooked_calls")}
        checked = sum(ev.get("verified_calls", 0) for ev in ev_by_junit.values())
        mism = {t for t, ev in ev_by_junit.items() if ev.get("mismatches")}
        broken = sorted(passed_base - passed_with)
        fixed = sorted(passed_with - passed_base)
        for t in broken:
            outcome, msg = withf.get(t, ("missing", "not run (killed?)"))
            broken_all.append((pipe, t, f"[{outcome}] {msg}"))
        for t, ev in sorted(ev_by_junit.items()):
            for r in ev.get("refusals", []):
                refusals_all.append((pipe, t, r))
            for s in ev.get("switches", []):
                switches_all.append((pipe, s))
        lines.append(
            f"| {pipe} | {len(base)} | {len(passed_base)} | {len(passed_base & passed_with)} | {len(broken)} | "
            f"{len(fixed)} | {len(refused)} | {len(cached)} | {len(hooked)} | {checked} / {len(mism)} | {runs} |"
        )
        totals.update(tests=len(base), base=len(passed_base), both=len(passed_base & passed_with),
                      broken=len(broken), fixed=len(fixed), refused=len(refused), cached=len(cached),
                      hooked=len(hooked))
    lines.append(
        f"| **total** | {totals['tests']} | {totals['base']} | {totals['both']} | {totals['broken']} | "
        f"{totals['fixed']} | {totals['refused']} | {totals['cached']} | {totals['hooked']} | | |"
    )

    lines += ["", "## Tests that pass without fxcache and fail with it, grouped by cause", ""]
    if not broken_all:
        lines.append("None.")
    elif mode == "real":
        numeric = sum(1 for _, _, m in broken_all if m.startswith("[failed] AssertionError")
                      and "bit-identical" not in m)
        lines += [f"With a real caching schedule the outputs change by design: {numeric} of {len(broken_all)} "
                  "are assertion failures of a numerical comparison (an output tolerance, e.g. a hard-coded "
                  "expected slice or two pipeline variants compared to 1e-3); the rest raised an exception "
                  "(what the `real` run checks).", ""]
    groups: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
    for pipe, t, msg in broken_all:
        groups[_cause(msg)].append((pipe, t, msg))
    for key, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"### {len(items)} x `{key}`")
        lines.append("")
        for pipe, t, msg in items:
            lines.append(f"- {pipe}: `{t.split('.')[-1]}` - {msg}")
        lines.append("")

    lines += ["## Refusals (FxcacheError, the plugin detached fxcache)", ""]
    if not refusals_all:
        lines.append("None.")
    rgroups: dict[str, list[str]] = collections.defaultdict(list)
    for pipe, t, r in refusals_all:
        alts = "".join(f"; then {a}" for a in r.get("alternatives", []))
        rgroups[f"{r.get('model')} ({r.get('stage')}): {r.get('error')}{alts}"].append(f"{pipe}: {t.split('.')[-1]}")
    for key, tests in sorted(rgroups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- {len(tests)} x {key}  \n  tests: {', '.join(sorted(set(tests))[:8])}"
                     + (" ..." if len(set(tests)) > 8 else ""))
    if switches_all:
        lines += ["", "## Schedule switches (first schedule did not apply; another was used)", ""]
        sgroups = collections.Counter(f"{pipe}: {s['model']} -> {s['to']} because {s['because']}"
                                      for pipe, s in switches_all)
        for key, n in sgroups.most_common():
            lines.append(f"- {n} x {key}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    sys.stdout.write(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:]))
