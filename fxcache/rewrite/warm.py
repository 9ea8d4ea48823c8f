"""Warm start: step graphs compiled once, on disk, reused by the next process.

``fxcache.compile(..., backend="inductor", cache_dir=PATH)`` compiles each step graph
(each kind of step, each segment, the repair graph) with AOTInductor into one package
file under ``PATH`` and runs the package; a later process that builds the same graph
for the same inputs loads the package instead of compiling (no dynamo, no AOTAutograd,
no inductor). Chosen by measurement over inductor's own on-disk caches, which still
trace with dynamo and AOTAutograd in every process (``docs/warm_start.md``,
``bench/warm_start.py``).

The model's parameters and buffers are *inputs* of the package, not constants: each
``get_attr`` of a tensor becomes a placeholder, fed the model's own tensor at every
call. So a package holds no weights (it is small), and in-place weight edits are seen,
as under ``torch.compile``. Inductor's ``freezing`` does not apply (nothing to fold).

Key: a SHA-256 over the lifted graph's code, every input's shape, stride, dtype and
device, every parameter's name, shape, stride and dtype, the caller's context (the
plan's kinds of step and units), the inductor options, torch's version and git
revision, fxcache's version, Python's version and the machine. Any change is another
key: a miss, never a wrong load; a package is never loaded by another torch. Next to
``<key>.pt2`` is ``<key>.json``: the key's fields and the package's SHA-256. A package
whose bytes do not match, whose header is unreadable or that AOTInductor cannot load is
refused with a logged reason (logger ``fxcache.warm``) and compiled again, replacing
it. Both files are written atomically.

:data:`stats` counts, in this process, packages ``compiled``, ``loaded`` and
``refused``, and graphs that fell back to ``torch.compile`` (``fallback``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import platform
import sys
import threading
import time
from typing import Any

import torch
import torch.fx as fx

from ..artefacts.store import atomic_path, write_text_atomic

__all__ = ["WarmProgram", "stats", "seconds", "FORMAT", "lift", "model_identity"]

log = logging.getLogger("fxcache.warm")

#: Version of the files' layout; part of the key.
FORMAT = 1

#: Counts in this process: ``compiled``, ``loaded``, ``refused``, ``fallback``.
stats: collections.Counter = collections.Counter()

#: Seconds spent in this process: ``load_s`` (checking and loading packages) and
#: ``compile_s`` (exporting, compiling and writing them).
seconds: collections.Counter = collections.Counter()


def _fxcache_version() -> str:
    try:
        from importlib.metadata import version

        return version("fxcache")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


def _resolve(gm: torch.nn.Module, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _owner(gm: torch.nn.Module, target: str) -> tuple[Any, str]:
    *path, name = target.split(".")
    obj = gm
    for part in path:
        obj = getattr(obj, part)
    return obj, name


def _spec(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        return ["tensor", list(t.shape), list(t.stride()), str(t.dtype), t.device.type]
    return ["value", repr(t)]


def model_identity(gm: fx.GraphModule) -> str:
    """SHA-256 of the whole captured graph: its code and every tensor attribute's name,
    shape, stride and dtype (so a changed model config changes every package's key, even
    of a step graph that does not run the changed part)."""
    h = hashlib.sha256(gm.code.encode())
    for node in gm.graph.find_nodes(op="get_attr"):
        h.update(json.dumps([node.target, _spec(_resolve(gm, node.target))]).encode())
    return h.hexdigest()


def lift(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """A copy of ``gm``'s graph in which every ``get_attr`` of a tensor is a new
    placeholder after the existing ones; the targets, in that order. ``gm``'s
    parameters are shared, never copied."""
    graph = fx.Graph()
    env: dict = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    last = None
    for node in graph.nodes:
        if node.op == "placeholder":
            last = node
    targets: list[str] = []
    for node in list(graph.nodes):
        if node.op != "get_attr" or not isinstance(_resolve(gm, node.target), torch.Tensor):
            continue
        if last is None:
            ctx = graph.inserting_before(next(iter(graph.nodes)))
        else:
            ctx = graph.inserting_after(last)
        with ctx:
            ph = graph.placeholder(f"w_{len(targets)}")
        ph.meta.update(node.meta)
        node.replace_all_uses_with(ph)
        graph.erase_node(node)
        targets.append(node.target)
        last = ph
    graph.lint()
    return fx.GraphModule(gm, graph), targets


def _cpu_flags() -> str:
    """SHA-256 of the CPU's feature flags (Linux ``/proc/cpuinfo``), part of the key: a
    package is built for the vector ISA of the machine that compiled it. Cheap, unlike
    torch's own probe of the ISA, which compiles and loads test programs in subprocesses."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = sorted({line.split(":", 1)[1].strip() for line in f if line.startswith(("flags", "Features"))})
    except OSError:
        flags = [platform.processor()]
    return hashlib.sha256("\n".join(flags).encode()).hexdigest()


def _load_package(path: str):
    """The AOTInductor package at ``path``, loaded. ``aoti_load_package`` first probes the
    CPU's vector ISA (seconds: it compiles and loads test programs) only to warn when it
    differs from the compiling machine's; the key already holds the CPU's flags, so the
    loader is called directly, and through ``aoti_load_package`` where that API moved."""
    try:
        from torch.export.pt2_archive._package import AOTICompiledModel

        loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
    except (ImportError, AttributeError, TypeError):
        from torch._inductor import aoti_load_package

        return aoti_load_package(path)
    return AOTICompiledModel(loader)


def _inductor_configs(options) -> dict:
    import torch._inductor

    merged = dict(torch._inductor.list_mode_options(options.mode)) if options.mode else {}
    merged.update(options.options or {})
    merged["freezing"] = False  # the weights are inputs: nothing to freeze
    return merged


class WarmProgram:
    """Callable like ``torch.compile(gm)``: at the first call, the package of ``gm`` for
    these inputs is loaded from ``options.cache_dir`` or compiled and written there;
    every call runs it with the model's current parameters appended."""

    def __init__(self, gm: fx.GraphModule, options, context: Any = None, fallback=None):
        self.gm = gm
        self.fallback = fallback  # (gm, options) -> callable, for a graph with non-tensor inputs
        self.options = options
        self.context = context
        self.runners: dict = {}  # the inputs' layout -> its loaded package
        self.everything = None  # torch.compile of gm, for inputs that are not all tensors
        self.attrs: list | None = None
        self.paths: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, *args):
        if self.everything is not None:
            return self.everything(*args)
        # a package is compiled for one layout of its inputs (shape, stride, dtype, device) and
        # checks none of it: another layout (an expanded timestep, say) gets its own package
        sig = tuple((a.shape, a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else None for a in args)
        runner = self.runners.get(sig)
        if runner is None:
            with self._lock:
                runner = self.runners.get(sig)
                if runner is None:
                    runner = self._prepare(args)
                    if self.everything is not None:
                        return self.everything(*args)
                    self.runners[sig] = runner
        return runner(*args, *[getattr(o, n) for o, n in self.attrs])

    # -- the key -----------------------------------------------------------------
    def _material(self, lifted: fx.GraphModule, targets: list[str], args: tuple) -> dict:
        params = [[t, *_spec(_resolve(self.gm, t))] for t in targets]
        cuda = None
        if any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args):
            cuda = list(torch.cuda.get_device_capability())
        return {
            "format": FORMAT,
            "torch": torch.__version__,
            "torch_git": getattr(torch.version, "git_version", ""),
            "fxcache": _fxcache_version(),
            "python": list(sys.version_info[:2]),
            "machine": platform.machine(),
            "cpu_flags": _cpu_flags(),
            "cuda_capability": cuda,
            "backend": self.options.backend,
            "mode": self.options.mode,
            "inductor_configs": sorted((k, repr(v)) for k, v in _inductor_configs(self.options).items()),
            "context": self.context,
            "inputs": [_spec(a) for a in args],
            "params": params,
            "code": lifted.code,
        }

    # -- load or compile -----------------------------------------------------------
    def _prepare(self, args: tuple):
        lifted, targets = lift(self.gm)
        if not all(isinstance(a, torch.Tensor) for a in args):
            stats["fallback"] += 1
            log.warning("fxcache warm start: a step graph has non-tensor inputs; compiled with torch.compile, "
                        "not cached on disk")
            self.everything = self.fallback(self.gm, self.options)
            return None
        material = self._material(lifted, targets, args)
        blob = json.dumps(material, sort_keys=True, default=str).encode()
        key = hashlib.sha256(blob).hexdigest()
        folder = os.fspath(self.options.cache_dir)
        os.makedirs(folder, exist_ok=True)
        pt2 = os.path.join(folder, f"{key[:40]}.pt2")
        header = os.path.join(folder, f"{key[:40]}.json")
        runner = None
        if os.path.exists(pt2) or os.path.exists(header):
            runner = self._load(pt2, header, key, material)
        else:
            log.info("fxcache warm start: no package for key %s in %s%s", key[:12], folder,
                     _nearest(folder, material))
        if runner is None:
            runner = self._compile(lifted, args, targets, pt2, header, key, material)
        if self.attrs is None:
            self.attrs = [_owner(self.gm, t) for t in targets]
        self.paths.append(pt2)
        return runner

    def _load(self, pt2: str, header: str, key: str, material: dict):
        t0 = time.perf_counter()
        try:
            with open(header, encoding="utf-8") as f:
                head = json.load(f)
            if not isinstance(head, dict) or head.get("key") != key:
                raise ValueError(f"its header {header} is not the header of key {key[:12]}")
            with open(pt2, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if digest != head.get("package_sha256"):
                raise ValueError(f"its bytes do not match the SHA-256 in {header} (damaged or partly written)")
            runner = _load_package(pt2)
        except Exception as e:  # noqa: BLE001 - any failure to load is a refusal, then a compile
            stats["refused"] += 1
            log.warning("fxcache warm start: refused the package %s: %s; compiling it again", pt2,
                        f"{type(e).__name__}: {e}")
            return None
        stats["loaded"] += 1
        seconds["load_s"] += time.perf_counter() - t0
        log.info("fxcache warm start: loaded %s in %.2f s", pt2, time.perf_counter() - t0)
        return runner

    def _compile(self, lifted, args, targets, pt2, header, key, material):
        import torch._inductor

        t = time.perf_counter()
        example = tuple(a.detach() for a in args) + tuple(_resolve(self.gm, n).detach() for n in targets)
        with torch.no_grad():
            ep = torch.export.export(lifted, example, strict=False)
        with atomic_path(pt2) as tmp:
            torch._inductor.aoti_compile_and_package(
                ep, package_path=tmp, inductor_configs=_inductor_configs(self.options))
            with open(tmp, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        write_text_atomic(header, json.dumps({"key": key, "package_sha256": digest, "material": material},
                                             sort_keys=True, indent=1, default=str))
        stats["compiled"] += 1
        # the first process runs the package from disk too, so a second one gives the same bits
        runner = _load_package(pt2)
        seconds["compile_s"] += time.perf_counter() - t
        log.info("fxcache warm start: compiled %s in %.1f s", pt2, time.perf_counter() - t)
        return runner


def _nearest(folder: str, material: dict) -> str:
    """Why a key is new: the fields in which the closest header in ``folder`` differs."""
    best = None
    try:
        names = [n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith(".")]
    except OSError:
        return ""
    for name in names[:200]:
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                other = json.load(f).get("material", {})
        except Exception:  # noqa: BLE001 - a damaged header is no evidence
            continue
        diff = sorted(k for k in set(material) | set(other)
                      if json.dumps(material.get(k), sort_keys=True, default=str)
                      != json.dumps(other.get(k), sort_keys=True, default=str))
        if best is None or len(diff) < len(best[0]):
            best = (diff, name)
    if best is None:
        return ""
    return f" (the closest package there, {best[1]}, differs in {best[0]})"
