"""Which code produced a result: the commit stamp of ``bench/results/*.json``.

A result file names the commit whose code produced it (``git rev-parse HEAD``), and is
refused when the code that ran is not that commit: any tracked file modified (staged or
not) or deleted, or any untracked, non-ignored file, under the watched folders
(``fxcache/``, ``bench/``, ``scripts/``; not ``bench/results/``, the results themselves,
so tables measured one after another do not refuse each other). ``git describe --dirty`` is not enough: it
ignores untracked files, so a new module made a result look as if an older commit had
produced it. ``allow_dirty=True`` (``--allow-dirty`` in ``bench/tables.py``) writes
anyway and records the differing files in the stamp.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Sequence

from ..errors import FxcacheError

__all__ = ["EXCLUDED", "WATCHED", "ProvenanceError", "source_stamp"]

#: The folders whose contents produce results.
WATCHED: tuple[str, ...] = ("fxcache", "bench", "scripts")
#: Folders inside them that hold results, not code.
EXCLUDED: tuple[str, ...] = ("bench/results",)

_STATUS = {"?": "untracked", "M": "modified", "A": "added", "D": "deleted", "R": "renamed", "C": "copied",
           "T": "type changed", "U": "unmerged"}


class ProvenanceError(FxcacheError):
    """Results would not be traceable to a commit (dirty tree, or no git checkout)."""


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or f"git {' '.join(args)} exited with {proc.returncode}")
    return proc.stdout


def _changes(root: Path, watched: Sequence[str], excluded: Sequence[str]) -> list[dict[str, str]]:
    """Paths under ``watched`` (not under ``excluded``) that differ from HEAD, each with what changed."""
    specs = [*watched, *(f":(exclude){e}" for e in excluded)]
    out = _git(root, "status", "--porcelain=v1", "-z", "--untracked-files=all", "--", *specs)
    entries = out.split("\0")
    changes, i = [], 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if not entry:
            continue
        xy, path = entry[:2], entry[3:]
        if "R" in xy or "C" in xy:
            i += 1  # the next entry is the rename's source path
        code = next((c for c in xy if c not in " "), "?")
        changes.append({"path": path, "change": _STATUS.get(code, xy.strip())})
    return sorted(changes, key=lambda c: c["path"])


def source_stamp(
    root: str | os.PathLike,
    *,
    watched: Sequence[str] = WATCHED,
    excluded: Sequence[str] = EXCLUDED,
    allow_dirty: bool = False,
) -> dict[str, Any]:
    """The stamp to record with results produced by the code in checkout ``root``.

    Returns ``{"commit": HEAD's full sha, "dirty": [{"path", "change"}, ...],
    "allow_dirty": bool, "watched": [...], "excluded": [...]}``. Raises :class:`ProvenanceError` when
    ``root`` is not a git checkout with a commit, or when files under ``watched`` (but
    not under ``excluded``) differ from HEAD, unless ``allow_dirty`` (then ``commit`` is None outside a
    checkout and ``dirty`` lists the differing files).
    """
    root = Path(root).resolve()
    folders = ", ".join(f"{w}/" for w in watched)
    try:
        top = Path(_git(root, "rev-parse", "--show-toplevel").strip())
        commit = _git(root, "rev-parse", "--verify", "HEAD").strip()
        changes = _changes(top, watched, excluded)
    except (OSError, RuntimeError) as exc:
        if allow_dirty:
            return {"commit": None, "dirty": [], "allow_dirty": True, "watched": list(watched),
                    "excluded": list(excluded), "note": f"not a git checkout with a commit: {exc}"}
        raise ProvenanceError(
            f"{root}: not a git checkout with a commit ({exc}); results must name the commit that produced "
            f"them: run from a checkout, or pass --allow-dirty (allow_dirty=True) to write them unstamped"
        ) from None
    if changes and not allow_dirty:
        shown = ", ".join(f"{c['path']} ({c['change']})" for c in changes[:5])
        more = f" and {len(changes) - 5} more" if len(changes) > 5 else ""
        raise ProvenanceError(
            f"{top}: {len(changes)} file(s) under {folders} differ from commit {commit[:12]}: {shown}{more}; "
            f"results must come from committed code: commit (or remove) them first, or pass --allow-dirty "
            f"(allow_dirty=True) to write results that record these files"
        )
    return {"commit": commit, "dirty": changes, "allow_dirty": bool(allow_dirty), "watched": list(watched),
            "excluded": list(excluded)}
