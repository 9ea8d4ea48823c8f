#!/usr/bin/env python
"""Train the embedded models of ``fxcache.models`` on the 16x16 digits.

    .venv/bin/python scripts/train_models.py classifier   # ~1 min, 1500 steps
    .venv/bin/python scripts/train_models.py unet         # stops after ~11.5 min wall
    .venv/bin/python scripts/train_models.py dit          # stops after ~11.5 min wall
    .venv/bin/python scripts/train_models.py samples      # re-render docs/samples_*.png only

Train the classifier first: the denoisers' cards record FID and class accuracy
measured with it.

Each run uses one CPU thread and takes all its randomness from seeded generators,
so it is deterministic given ``--seed`` and the step count. The denoisers use a
constant learning rate after warm-up, so a run of k steps is exactly the first k
steps of any longer run; by default they stop at the first multiple of 100 steps
after ``--max-minutes`` (11.5) of wall time and the card records the steps done and
the command that repeats them without a time limit (``--steps K --max-minutes 0``).
Outputs: ``fxcache/models/<name>.safetensors`` (the EMA weights for the denoisers),
``fxcache/models/<name>.json`` (the model card) and, for the denoisers,
``docs/samples_<name>.png`` (DDIM 50 steps, seed 0; the DiT one row per class).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fxcache import models as fxm  # noqa: E402
from fxcache.evaluation.data import load_digits, split_indices  # noqa: E402

MODEL_DIR = ROOT / "fxcache" / "models"
DOCS = ROOT / "docs"

UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 32,
}

DIT_CONFIG = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "patch_size": 2,
    "num_layers": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    # In diffusers this is the number of classes (CombinedTimestepLabelEmbeddings(num_classes=...)),
    # not of timesteps. Label 10 is the null class (label dropout 0.1 is built into LabelEmbedding).
    "num_embeds_ada_norm": 10,
}

CLASSIFIER_CONFIG = {"channels": 32, "feature_dim": 64, "num_classes": 10, "dropout": 0.2}

DEFAULTS = {
    "unet": {"steps": 3000, "batch_size": 64, "lr": 1e-3, "warmup": 100, "ema": 0.995, "max_minutes": 11.5},
    "dit": {"steps": 3000, "batch_size": 64, "lr": 1e-3, "warmup": 100, "ema": 0.995, "max_minutes": 11.5},
    "classifier": {"steps": 1500, "batch_size": 64, "lr": 2e-3, "warmup": 50, "ema": 0.0, "max_minutes": None},
}


def _versions() -> dict:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()}


def _save(name: str, model: torch.nn.Module, card: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(MODEL_DIR / f"{name}.safetensors"), metadata={"name": name, "seed": str(card["seed"])})
    card["weights_bytes"] = (MODEL_DIR / f"{name}.safetensors").stat().st_size
    card["num_parameters"] = int(sum(p.numel() for p in model.parameters()))
    (MODEL_DIR / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    fxm._card.cache_clear()


def _load_trained(name: str) -> torch.nn.Module:
    """A model just written to MODEL_DIR (the package directory unless --out-dir)."""
    from safetensors.torch import load_file

    card = json.loads((MODEL_DIR / f"{name}.json").read_text())
    model = fxm.build(name, card["config"])
    model.load_state_dict(load_file(str(MODEL_DIR / f"{name}.safetensors")))
    return model.eval().requires_grad_(False)


def _lr_at(step: int, base: float, warmup: int, total: int | None) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base`` by step ``total``, or
    constant when ``total`` is None (then a run of k steps equals the first k steps of
    any longer run, which is what makes ``--max-minutes`` reproducible)."""
    if step < warmup:
        return base * (step + 1) / warmup
    if total is None:
        return base
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


class _Batches:
    """Endless shuffled mini-batches of indices from a seeded generator (epoch-wise permutations)."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator):
        self.n, self.bs, self.gen = n, batch_size, gen
        self.perm, self.pos = torch.randperm(n, generator=gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.bs > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos : self.pos + self.bs]
        self.pos += self.bs
        return idx


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def _data_card(split: str, n: int) -> dict:
    return {
        "source": "sklearn.datasets.load_digits (1797 8x8 images, labels 0-9)",
        "preprocessing": "bilinear upsampling to 16x16 (F.interpolate, align_corners=False), scaled to [-1, 1]",
        "loader": f"fxcache.evaluation.data.load_digits({split!r})",
        "num_images": n,
    }


# ----------------------------------------------------------------------------- classifier


def train_classifier(args) -> None:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_tr, y_tr = load_digits("train")
    x_va, y_va = load_digits("val")
    model = fxm.build("classifier", CLASSIFIER_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    batches = _Batches(x_tr.shape[0], args.batch_size, gen)
    losses = []
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    for step in tqdm(range(args.steps), desc="classifier", mininterval=2.0):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, args.lr, args.warmup, args.steps)
        idx = batches.next()
        xb, yb = x_tr[idx], y_tr[idx]
        # augmentation: random shifts of up to 1 pixel (padding with background -1), so the
        # classifier is robust to the slight misplacement of generated digits
        dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
        xb = torch.roll(F.pad(xb, (1, 1, 1, 1), value=-1.0), shifts=(dy, dx), dims=(2, 3))[:, :, 1:-1, 1:-1]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    with torch.no_grad():
        val_acc = (model(x_va).argmax(1) == y_va).double().mean().item()
        train_acc = (model(x_tr).argmax(1) == y_tr).double().mean().item()
    print(f"classifier: val accuracy {val_acc:.4f}, train accuracy {train_acc:.4f}, wall {wall:.1f}s")
    card = {
        "name": "classifier",
        "class": "fxcache.models.DigitClassifier",
        "config": CLASSIFIER_CONFIG,
        "purpose": "feature space (64-d penultimate ReLU features) for fxcache.evaluation.metrics.fid_digits; class_accuracy",
        "data": {**_data_card("train", x_tr.shape[0]), "val_split": f"fxcache.evaluation.data.load_digits('val'), {x_va.shape[0]} images"},
        "training": {
            "steps": args.steps, "batch_size": args.batch_size, "optimizer": "AdamW(weight_decay=1e-4)", "lr": args.lr,
            "lr_schedule": f"linear warm-up {args.warmup} steps, cosine to 10%", "augmentation": "random shift of up to 1 px per batch",
            "threads": torch.get_num_threads(),
        },
        "final_loss": float(np.mean(losses[-100:])),
        "final_loss_definition": "mean training cross-entropy over the last 100 steps",
        "val_accuracy": val_acc,
        "train_accuracy": train_acc,
        "training_wall_time_s": round(wall, 1),
        "training_cpu_time_s": round(cpu, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs (wall time depends on their load)",
        "seed": args.seed,
        "command": f"python scripts/train_models.py classifier --seed {args.seed}",
        "versions": _versions(),
    }
    _save("classifier", model, card)


# ----------------------------------------------------------------------------- denoisers


def _denoiser_forward(name: str, model, x, t, y):
    if name == "dit":
        return model(x, t, class_labels=y).sample
    return model(x, t).sample


@torch.no_grad()
def _eval_loss(name: str, model, images, labels, seed: int = 1234) -> float:
    """Noise-prediction MSE over all images at fixed random timesteps and noise (eval mode)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**fxm.SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for i in range(0, images.shape[0], 256):
        x0, y = images[i : i + 256], labels[i : i + 256]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=g)
        pred = _denoiser_forward(name, model, sched.add_noise(x0, noise, t), t, y)
        total += F.mse_loss(pred, noise, reduction="sum").item()
        n += noise.numel()
    return total / n


def train_denoiser(name: str, args) -> None:
    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)  # also drives the DiT's built-in label dropout (torch.rand)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits("all")
    config = UNET_CONFIG if name == "unet" else DIT_CONFIG
    model = fxm.build(name, config)
    ema = copy.deepcopy(model).requires_grad_(False)
    sched = DDPMScheduler(**fxm.SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    batches = _Batches(images.shape[0], args.batch_size, gen)
    losses = []
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    pbar = tqdm(range(args.steps), desc=name, mininterval=5.0)
    steps_done = 0
    for step in pbar:
        if args.max_minutes is not None and step % 100 == 0 and time.perf_counter() - t0 > 60 * args.max_minutes:
            break  # stop on a multiple of 100 steps; the card records the steps actually done
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, args.lr, args.warmup, None)
        idx = batches.next()
        x0, y = images[idx], labels[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        pred = _denoiser_forward(name, model, sched.add_noise(x0, noise, t), t, y)
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        _ema_update(ema, model, decay)
        losses.append(loss.item())
        steps_done = step + 1
        if step % 50 == 0:
            pbar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if args.snapshot_every and steps_done % args.snapshot_every == 0:
            from safetensors.torch import save_file

            snap = Path(args.snapshot_dir) / f"{name}_{steps_done:05d}.safetensors"
            snap.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(snap))
    pbar.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ema.eval()
    eval_loss = _eval_loss(name, ema, images, labels)
    final_loss = float(np.mean(losses[-100:]))
    print(f"{name}: final train loss {final_loss:.4f}, EMA eval loss {eval_loss:.4f}, wall {wall:.1f}s")
    card = {
        "name": name,
        "class": "diffusers.UNet2DModel" if name == "unet" else "diffusers.DiTTransformer2DModel",
        "config": dict(ema.config),
        "conditioning": "unconditional" if name == "unet" else
        "class-conditional, labels 0-9; label 10 = null class for classifier-free guidance (10% label dropout in training)",
        "prediction_type": "epsilon",
        "call": "model(sample, timestep).sample" if name == "unet" else "model(sample, timestep, class_labels=labels).sample",
        "scheduler": {"train": {"class": "diffusers.DDPMScheduler", **fxm.SCHEDULER_CONFIG},
                      "sample": {"class": "diffusers.DDIMScheduler", **fxm.SCHEDULER_CONFIG, **fxm.DDIM_CONFIG, "eta": 0.0}},
        "data": _data_card("all", images.shape[0]),
        "training": {
            "steps": steps_done, "batch_size": args.batch_size, "optimizer": "AdamW(betas=(0.9, 0.99), weight_decay=0)",
            "lr": args.lr, "lr_schedule": f"linear warm-up {args.warmup} steps, then constant", "grad_clip": 1.0,
            "stopping": f"--max-minutes {args.max_minutes}: stopped at the first multiple of 100 steps past the time budget"
            if steps_done < args.steps else f"--steps {args.steps}",
            "ema_decay": args.ema, "weights_saved": "EMA", "threads": torch.get_num_threads(),
        },
        "final_loss": final_loss,
        "final_loss_definition": "mean training noise-prediction MSE over the last 100 steps (online weights)",
        "eval_loss": eval_loss,
        "eval_loss_definition": "noise-prediction MSE of the saved (EMA) weights over all 1797 images, fixed noise/timesteps (seed 1234)",
        "training_wall_time_s": round(wall, 1),
        "training_cpu_time_s": round(cpu, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs (wall time depends on their load)",
        "seed": args.seed,
        "command": f"python scripts/train_models.py {name} --seed {args.seed} --steps {steps_done} --max-minutes 0",
        "versions": _versions(),
    }
    card["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in card["config"].items() if not k.startswith("_")}
    _save(name, ema, card)
    render_samples(name, update_card=True)


# ----------------------------------------------------------------------------- samples


def _grid(x: torch.Tensor, rows: int, cols: int, pad: int = 1) -> np.ndarray:
    x = ((x.clamp(-1, 1) + 1) / 2).squeeze(1).cpu().numpy()
    h, w = x.shape[1:]
    out = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad), np.float32) * 0.5
    for i in range(min(rows * cols, x.shape[0])):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = x[i]
    return out


def render_samples(name: str, num_steps: int = 50, seed: int = 0, update_card: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.set_num_threads(1)
    model = _load_trained(name)
    if name == "unet":
        rows, cols, labels = 8, 8, None
    else:
        rows, cols = 10, 8
        labels = torch.arange(rows).repeat_interleave(cols)
    t0 = time.perf_counter()
    x = fxm.generate(model, num_steps=num_steps, num_samples=rows * cols, seed=seed, class_labels=labels)
    gen_s = time.perf_counter() - t0
    grid = _grid(x, rows, cols)
    fig, ax = plt.subplots(figsize=(cols * 0.7 + 0.6, rows * 0.7 + 0.5), dpi=100)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    if labels is not None:
        ax.set_yticks([1 + r * 17 + 8 for r in range(rows)], [str(r) for r in range(rows)])
        ax.set_ylabel("class label")
    else:
        ax.set_yticks([])
    ax.set_title(f"{name}: DDIM {num_steps} steps, seed {seed}", fontsize=9)
    fig.tight_layout()
    DOCS.mkdir(exist_ok=True)
    out = DOCS / f"samples_{name}.png"
    fig.savefig(out)
    plt.close(fig)
    print(f"wrote {out} ({gen_s:.1f}s to generate {rows * cols} samples)")
    if update_card and "classifier" in fxm.available():
        from fxcache.evaluation import metrics

        n = 1024  # the figure-of-record sample count of fxcache.evaluation.metrics
        lab = torch.arange(n) % 10 if name == "dit" else None
        xs = fxm.generate(model, num_steps=num_steps, num_samples=n, seed=seed, class_labels=lab)
        quality = {"num_samples": n, "ddim_steps": num_steps, "seed": seed, "fid_digits": metrics.fid_digits(xs)}
        if lab is not None:
            quality["class_accuracy"] = metrics.class_accuracy(xs, lab)
        if name == "dit":
            x_rows = metrics.class_accuracy(x, labels)
            quality["figure_class_accuracy"] = x_rows
        print(f"{name} quality: {quality}")
        card = json.loads((MODEL_DIR / f"{name}.json").read_text())
        card["quality"] = quality
        card["samples_figure"] = f"docs/samples_{name}.png"
        (MODEL_DIR / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
        fxm._card.cache_clear()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["classifier", "unet", "dit", "samples"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--ema", type=float)
    ap.add_argument("--max-minutes", type=float, help="denoisers: stop at a multiple of 100 steps after this much wall time (0: no limit)")
    ap.add_argument("--snapshot-every", type=int, default=0, help="save EMA weights every N steps to --snapshot-dir")
    ap.add_argument("--snapshot-dir", default="/tmp/fxcache_snapshots")
    ap.add_argument("--out-dir", help="write weights, card and figure here instead of fxcache/models and docs")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if args.out_dir:
        global MODEL_DIR, DOCS
        MODEL_DIR = DOCS = Path(args.out_dir)
        MODEL_DIR.mkdir(parents=True, exist_ok=True)
    if args.what == "samples":
        for n in ("unet", "dit"):
            if (MODEL_DIR / f"{n}.safetensors").exists():
                render_samples(n)
        return 0
    for k, v in DEFAULTS[args.what].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.max_minutes == 0:
        args.max_minutes = None
    if args.what == "classifier":
        train_classifier(args)
    else:
        train_denoiser(args.what, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
