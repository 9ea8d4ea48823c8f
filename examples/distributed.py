"""fxcache on several processes: data parallel and diffusers' context parallelism.

Launch with torchrun (gloo on CPU, NCCL when every rank has a CUDA device; the code
path is the same):

    torchrun --standalone --nproc_per_node 2 examples/distributed.py --mode data
    torchrun --standalone --nproc_per_node 2 examples/distributed.py --mode context

and without torchrun for the single-process reference of the data mode (one process
generates every batch):

    python examples/distributed.py --mode data

``--mode data``: the embedded model generates ``--samples`` digits in batches of
``--batch``; batch ``i`` is drawn from seed ``seed + i`` and runs on rank ``i % world``,
each rank with its own ``fxcache.compile``d denoiser; rank 0 gathers the batches in
order. Because a batch's noise depends only on its seed and each rank runs the same
graphs on the same batch shapes, the result equals the single-process run bit for bit
(the processes use one intra-op thread each, as torchrun's default; pass the same
``--threads`` to both runs).

``--mode context``: a tiny ``FluxTransformer2DModel`` with
``enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))``: each rank
holds a shard of the token sequence and attention exchanges heads with all-to-all.
fxcache captures the per-rank program *with* its collectives (diffusers' Ulysses
attention uses functional collectives, which ``torch.export`` records as
``_c10d_functional`` ops), so cache buffers hold each rank's shard. Checked: the
compute-everything plan equals the uncached context-parallel run, FORA under context
parallelism matches single-process FORA within fp32 round-off of the collectives, and
each rank's ``plan.cache_bytes`` is reported beside the single-process figure. A
capture without collectives would mean the model ran without parallelism: that is an
error here, never a silent fallback.

A rank whose capture (or any set-up) fails makes every rank raise with that rank's
error (the statuses are exchanged before any step runs), and the process group has a
timeout, so a failure never turns into a hang.

``--json PATH`` writes the figures (equalities, timings, cache bytes) for tests and
the README.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

import fxcache

TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("FXCACHE_DIST_TIMEOUT", "120")))


# ----------------------------------------------------------------- process group
def init() -> tuple[int, int, torch.device]:
    """(rank, world, device); a process group only when launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, torch.device("cpu")
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["LOCAL_WORLD_SIZE"])
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def agree(rank: int, world: int, work) -> object:
    """Run ``work()`` on every rank; if it raised on any rank, raise on every rank with
    the first failing rank's error (exchanged as text before anything else runs)."""
    try:
        result, status = work(), None
    except Exception as exc:  # reported to every rank below
        result, status = None, f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    if world > 1:
        statuses: list = [None] * world
        dist.all_gather_object(statuses, status)
    else:
        statuses = [status]
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if failed:
        r, s = failed[0]
        raise RuntimeError(f"rank {r} failed during set-up, so every rank stops: {s}")
    return result


def gather(rank: int, world: int, obj) -> list | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere); NCCL-safe (objects, not tensors on
    a device the backend cannot take)."""
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out if rank == 0 else None


# --------------------------------------------------------------------- data mode
def data_mode(args, rank: int, world: int, device: torch.device) -> dict:
    from fxcache import models

    model = models.load(args.model, device=device)
    schedule = fxcache.DeepCache(interval=args.interval, branch=0) if args.model == "unet" else fxcache.FORA(interval=args.interval)
    if args.fail_rank == rank:
        # an injected capture failure (the launch test): the first layer writes into the
        # model's input in place, which fxcache refuses to capture (CaptureError)
        first = model.conv_in if args.model == "unet" else model.pos_embed.proj
        first.register_forward_pre_hook(lambda module, inputs: inputs[0].mul_(1.0))
    cached = fxcache.compile(model, schedule, backend=args.backend)
    labels = (lambda n, i: (torch.arange(n) + i) % 10) if args.model == "dit" else (lambda n, i: None)

    def warm():  # capture and compile before the clock starts, and before anyone generates
        models.generate(cached, num_steps=args.steps, num_samples=args.batch, seed=args.seed,
                        class_labels=labels(args.batch, 0))
        return cached.plan.cache_bytes

    cache_bytes = agree(rank, world, warm)
    batches = list(range((args.samples + args.batch - 1) // args.batch))
    mine = batches[rank::world]
    out = {}
    start = time.perf_counter()
    for i in mine:
        n = min(args.batch, args.samples - i * args.batch)
        out[i] = models.generate(cached, num_steps=args.steps, num_samples=n, seed=args.seed + i,
                                 class_labels=labels(n, i)).cpu()
    seconds = time.perf_counter() - start
    parts = gather(rank, world, (out, seconds, cache_bytes))
    one_process = None
    if args.baseline and world > 1:
        # the speed-up over one process, in this run: rank 0 generates every batch alone,
        # with the same thread count, while the other ranks wait (no other work running)
        if rank == 0:
            start = time.perf_counter()
            for i in batches:
                n = min(args.batch, args.samples - i * args.batch)
                models.generate(cached, num_steps=args.steps, num_samples=n, seed=args.seed + i,
                                class_labels=labels(n, i))
            one_process = time.perf_counter() - start
        dist.barrier()
    if rank != 0:
        return {}
    merged = {i: x for part, _, _ in parts for i, x in part.items()}
    samples = torch.cat([merged[i] for i in batches])
    if args.out:
        torch.save(samples, args.out)
    return {
        "mode": "data", "world": world, "model": args.model, "samples": samples.shape[0],
        "per_rank_seconds": [s for _, s, _ in parts], "wall_seconds": max(s for _, s, _ in parts),
        "per_rank_cache_bytes": [b for _, _, b in parts], "schedule": repr(schedule),
        "one_process_seconds": one_process,
        "speedup_over_one_process": None if one_process is None else one_process / max(s for _, s, _ in parts),
    }


# ------------------------------------------------------------------ context mode
def tiny_flux(device: torch.device, seed: int = 0):
    """A tiny FluxTransformer2DModel and its inputs; token counts divisible by 2 and 4."""
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval().to(device)
    g = torch.Generator().manual_seed(seed + 1)
    side, text = 8, 8
    x = torch.randn(1, side * side, 16, generator=g)
    enc, pooled = torch.randn(1, text, 32, generator=g), torch.randn(1, 16, generator=g)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(),
                                         indexing="ij"), -1).reshape(-1, 3)
    kw = {"encoder_hidden_states": enc, "pooled_projections": pooled, "img_ids": img_ids,
          "txt_ids": torch.zeros(text, 3)}
    return model, x.to(device), {k: v.to(device) for k, v in kw.items()}


def flow_sample(model, x, kw, steps: int) -> torch.Tensor:
    """Euler steps of the flow ODE from t=1 to t=0 (Flux's sampler without its shift)."""
    ts = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for a, b in zip(ts[:-1], ts[1:]):
            v = model(x, timestep=a.reshape(1).to(x.device), return_dict=False, **kw)[0]
            x = x + (b - a) * v
    return x


@contextlib.contextmanager
def _accelerator_count_at_least_one():
    """diffusers 0.42.1's ``enable_parallelism`` computes ``rank % torch.accelerator.device_count()``,
    which divides by zero on a machine without an accelerator; everything else it does
    (device mesh, hooks, Ulysses all-to-all) works on CPU with gloo. Only on CPU."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def collectives_in(cached) -> int:
    """How many collective ops the captured per-rank programs hold (all entries)."""
    count = 0
    for entry in cached.entries:
        for node in entry.captured.gm.graph.nodes:
            if node.op == "call_function" and "c10d_functional" in str(node.target):
                count += 1
    return count


def context_mode(args, rank: int, world: int, device: torch.device) -> dict:
    from diffusers import ContextParallelConfig

    if world < 2:
        raise SystemExit("--mode context needs at least 2 processes: torchrun --nproc_per_node 2 ...")
    single, x, kw = tiny_flux(device)  # the single-process reference (each rank runs it whole)
    model, _, _ = tiny_flux(device)
    with _accelerator_count_at_least_one():
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))

    plain = flow_sample(model, x, kw, args.steps)
    reference = flow_sample(single, x, kw, args.steps)

    def build():
        full = fxcache.compile(model, fxcache.FORA(interval=1), backend=args.backend)
        fora = fxcache.compile(model, fxcache.FORA(interval=args.interval), backend=args.backend)
        adaptive = fxcache.compile(model, fxcache.FirstBlockCache(args.threshold), backend=args.backend)
        for cm in (full, fora, adaptive):
            flow_sample(cm, x, kw, 1)
        for name, cm in (("compute-everything", full), ("FORA", fora), ("FirstBlockCache", adaptive)):
            if collectives_in(cm) == 0:
                raise fxcache.errors.UnsupportedModelError(
                    f"the {name} capture of the context-parallel model holds no collective: it would run "
                    f"without parallelism; refusing")
        return full, fora, adaptive

    full, fora, adaptive = agree(rank, world, build)
    single_fora = fxcache.compile(single, fxcache.FORA(interval=args.interval), backend=args.backend)
    single_adaptive = fxcache.compile(single, fxcache.FirstBlockCache(args.threshold), backend=args.backend)
    start = time.perf_counter()
    out_full = flow_sample(full, x, kw, args.steps)
    out_fora = flow_sample(fora, x, kw, args.steps)
    seconds = time.perf_counter() - start
    out_single_fora = flow_sample(single_fora, x, kw, args.steps)
    # adaptive: the statistic is all-reduced over the ranks in the graph, so every rank
    # (each with its own shard) makes the decision of the whole tensor
    out_adaptive = flow_sample(adaptive, x, kw, args.steps)
    out_single_adaptive = flow_sample(single_adaptive, x, kw, args.steps)
    decided = adaptive.decisions()[None]
    single_decided = single_adaptive.decisions()[None]
    mine = {
        "rank": rank,
        "full_equals_plain_cp": bool(torch.equal(out_full, plain)),
        "full_max_abs_vs_plain_cp": float((out_full - plain).abs().max()),
        "plain_cp_max_abs_vs_single": float((plain - reference).abs().max()),
        "fora_cp_max_abs_vs_single_fora": float((out_fora - out_single_fora).abs().max()),
        "fora_cp_max_abs_vs_uncached": float((out_fora - plain).abs().max()),
        "adaptive_decisions": [bool(d) for d in decided],
        "adaptive_statistic": [float(v) for v in decided.statistic],
        "single_process_adaptive_decisions": [bool(d) for d in single_decided],
        "single_process_adaptive_statistic": [float(v) for v in single_decided.statistic],
        "adaptive_cp_max_abs_vs_single_adaptive": float((out_adaptive - out_single_adaptive).abs().max()),
        "cache_bytes": fora.plan.cache_bytes,
        "single_process_cache_bytes": single_fora.plan.cache_bytes,
        "collectives_captured": collectives_in(fora),
        "seconds": seconds,
    }
    parts = gather(rank, world, mine)
    if rank != 0:
        return {}
    return {"mode": "context", "world": world, "ulysses_degree": world, "steps": args.steps,
            "fora_interval": args.interval, "ranks": parts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("data", "context"), required=True)
    p.add_argument("--model", choices=("unet", "dit"), default="unet", help="data mode: the embedded model")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--interval", type=int, default=2, help="DeepCache/FORA interval")
    p.add_argument("--threshold", type=float, default=0.33, help="context mode: the FirstBlockCache threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process (equal in both runs)")
    p.add_argument("--backend", default=None, help="torch.compile backend for the step graphs (default: eager)")
    p.add_argument("--out", help="data mode: save the gathered samples (rank 0)")
    p.add_argument("--json", help="write the figures as JSON (rank 0)")
    p.add_argument("--baseline", action="store_true",
                   help="data mode: also time one process generating every batch (rank 0), for the speed-up")
    p.add_argument("--fail-rank", type=int, default=-1, help=argparse.SUPPRESS)  # launch-failure test
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rank, world, device = init()
    done = False
    try:
        result = (data_mode if args.mode == "data" else context_mode)(args, rank, world, device)
        if rank == 0:
            text = json.dumps(result, indent=2)
            print(text)
            if args.json:
                with open(args.json, "w") as f:
                    f.write(text + "\n")
        done = True
    finally:
        if world > 1:
            if done:
                dist.barrier()  # no rank tears its connections down while another still uses them
            dist.destroy_process_group()
    if world > 1:
        # Everything is written and the process group is destroyed. Skip the interpreter's
        # finalisation: gloo's worker threads can abort it (SIGABRT, "terminate called without
        # an active exception", seen once in CI on rank 1; pytorch/pytorch#179291 describes the
        # teardown race), which would turn a finished run into a failed one.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
