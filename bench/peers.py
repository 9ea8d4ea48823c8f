"""diffusers' own caches on the embedded models, for side-by-side tables with fxcache.

    python bench/peers.py [--model dit] [--steps 20] [--samples 8]

prints, for each peer configuration, SQNR against the uncached run, the measured
speed-up (eager, one thread, interleaved with the uncached run) and, under
``torch.compile`` (``--backend``, default ``aot_eager``), the graph breaks and the
number of frames dynamo compiled for one generation after a warm-up generation
(recompiles). Used by ``bench/table5_adaptive.py`` (``python bench/tables.py --table 5``).

Peers (diffusers' hooks, applied to the model with ``diffusers.hooks.apply_*``;
DiTTransformer2DModel is not a ``CacheMixin``, so the hooks are applied directly and
the cache context is set per call like a diffusers pipeline does):

- ``FirstBlockCache(threshold)``: ParaAttention's first-block cache;
- ``MagCache(threshold, max_skip_steps)`` with magnitude ratios calibrated by
  diffusers' own calibration mode on the same model (one uncached-equivalent run);
- ``TaylorSeer(cache_interval, max_order)``: finite-difference forecast of the
  attention and feed-forward outputs (``cache_identifiers`` set to those modules).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxcache import models  # noqa: E402
from fxcache.evaluation import metrics  # noqa: E402

# the modules TaylorSeer forecasts in a DiT / PixArt block (diffusers' default patterns target Flux-like names)
DIT_TAYLOR_MODULES = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]


class DiffusersCached(torch.nn.Module):
    """A model with one of diffusers' cache hooks, called like the model: sets the cache
    context (name, step index, number of steps) before each call, as a pipeline does.
    :meth:`reset` starts a new generation (diffusers' ``_reset_stateful_cache``)."""

    def __init__(self, model: torch.nn.Module, label: str, num_steps: int, context: str = "cond"):
        super().__init__()
        self.model, self.label, self.num_steps, self.context = model, label, num_steps, context
        self.config = model.config
        self.step = 0

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return self.model.dtype

    def reset(self) -> None:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks()
        self.step = 0

    def forward(self, *args, **kwargs):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        if self.step >= self.num_steps:
            self.reset()
        _set_cache_context(self.model, CacheContext(self.context, step_index=self.step,
                                                    num_inference_steps=self.num_steps))
        self.step += 1
        return self.model(*args, **kwargs)


@dataclass
class Peer:
    label: str
    method: str
    build: Callable[[torch.nn.Module, int], DiffusersCached]


def first_block_cache(threshold: float) -> Peer:
    def build(model, steps):
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))
        return DiffusersCached(model, f"diffusers FirstBlockCache({threshold})", steps)

    return Peer(f"diffusers FirstBlockCache({threshold})", "FirstBlockCache", build)


def mag_ratios(name: str, steps: int, samples: int, seed: int = 0) -> list[float]:
    """MagCache's per-step magnitude ratios from diffusers' calibration mode (it prints them),
    from one generation of ``samples`` samples with noise ``seed`` (for a table, a seed
    other than the evaluation seed)."""
    from diffusers.hooks.mag_cache import MagCacheConfig, apply_mag_cache

    model = models.load(name)
    apply_mag_cache(model, MagCacheConfig(calibrate=True, num_inference_steps=steps))
    cached = DiffusersCached(model, "calibration", steps)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        models.generate(cached, num_steps=steps, num_samples=samples, seed=seed,
                        class_labels=labels_for(name, samples))
    line = [ln for ln in text.getvalue().splitlines() if ln.startswith("[")][-1]
    return [float(v) for v in ast.literal_eval(line)]


def mag_cache(threshold: float, ratios: list[float], max_skip_steps: int = 3) -> Peer:
    def build(model, steps):
        from diffusers.hooks.mag_cache import MagCacheConfig, apply_mag_cache

        apply_mag_cache(model, MagCacheConfig(threshold=threshold, max_skip_steps=max_skip_steps,
                                              num_inference_steps=steps, mag_ratios=list(ratios)))
        return DiffusersCached(model, f"diffusers MagCache({threshold})", steps)

    return Peer(f"diffusers MagCache({threshold}, K={max_skip_steps})", "MagCache", build)


def taylor_seer(interval: int, order: int) -> Peer:
    def build(model, steps):
        from diffusers.hooks.taylorseer_cache import TaylorSeerCacheConfig, apply_taylorseer_cache

        apply_taylorseer_cache(model, TaylorSeerCacheConfig(
            cache_interval=interval, max_order=order, disable_cache_before_step=order + 1,
            taylor_factors_dtype=torch.float32, cache_identifiers=DIT_TAYLOR_MODULES))
        return DiffusersCached(model, f"diffusers TaylorSeer(N={interval}, order={order})", steps)

    return Peer(f"diffusers TaylorSeer(N={interval}, order={order})", "TaylorSeer", build)


def labels_for(name: str, n: int) -> torch.Tensor | None:
    return torch.arange(n) % 10 if name == "dit" else None


def generate(model, name: str, steps: int, samples: int, seed: int = 0) -> torch.Tensor:
    if isinstance(model, DiffusersCached):
        model.reset()
    return models.generate(model, num_steps=steps, num_samples=samples, seed=seed,
                           class_labels=labels_for(name, samples))


def compile_counts(run: Callable[[], Any]) -> dict:
    """Graph breaks and frames compiled by dynamo during ``run()`` (call after a warm-up)."""
    from torch._dynamo.utils import counters

    counters.clear()
    run()
    breaks = sum(counters["graph_break"].values())
    return {"graph_breaks": int(breaks), "frames_compiled": int(counters["stats"]["unique_graphs"])}


def measure(peer: Peer, name: str, steps: int, samples: int, reference: torch.Tensor,
            backend: str | None = "aot_eager", repeats: int = 3) -> dict:
    """SQNR vs ``reference``, eager time per generation (best of ``repeats``), and the
    compile counts of a torch.compile'd model for a second generation."""
    cached = peer.build(models.load(name), steps)
    out = generate(cached, name, steps, samples)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(cached, name, steps, samples)
        best = min(best, time.perf_counter() - t0)
    row = {"label": peer.label, "method": peer.method, "sqnr_db": float(metrics.sqnr(out, reference)),
           "seconds": best}
    if backend:
        row.update(compiled_counts(peer, name, steps, samples, backend))
    return row


def compiled_counts(peer: Peer, name: str, steps: int, samples: int, backend: str) -> dict:
    """The peer on a fresh model under ``torch.compile(backend=backend)``: graph breaks and
    frames compiled in a first generation and in a second one (recompiles), and the
    first generation's wall time (compiling included)."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = peer.build(models.load(name), steps)
    compiled.model = torch.compile(compiled.model, backend=backend)
    t0 = time.perf_counter()
    warm = compile_counts(lambda: generate(compiled, name, steps, samples))  # the first generation
    first_s = time.perf_counter() - t0
    out = compile_counts(lambda: generate(compiled, name, steps, samples))  # a second one
    out.update(first_generation_graph_breaks=warm["graph_breaks"],
               first_generation_frames_compiled=warm["frames_compiled"], first_generation_s=first_s,
               backend=backend)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dit", choices=("dit",))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--backend", default="aot_eager")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base = models.load(args.model)
    reference = generate(base, args.model, args.steps, args.samples)
    t0 = time.perf_counter()
    generate(base, args.model, args.steps, args.samples)
    uncached = time.perf_counter() - t0
    ratios = mag_ratios(args.model, args.steps, args.samples)
    peers = [first_block_cache(0.05), first_block_cache(0.1), first_block_cache(0.2), mag_cache(0.05, ratios),
             mag_cache(0.1, ratios), taylor_seer(2, 1), taylor_seer(3, 2)]
    print(f"uncached: {uncached * 1e3:.0f} ms per generation")
    for peer in peers:
        row = measure(peer, args.model, args.steps, args.samples, reference, backend=args.backend)
        print(f"{row['label']:<42} SQNR {row['sqnr_db']:6.2f} dB  speed-up {uncached / row['seconds']:.2f}x  "
              f"breaks {row.get('first_generation_graph_breaks')}/{row.get('graph_breaks')} (gen 1/gen 2)  "
              f"frames compiled {row.get('first_generation_frames_compiled')}/{row.get('frames_compiled')} (gen 1/gen 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
